"""Worker of tests/test_stable.py's DDP test: one rank of a 2-process gloo group (CPU).

Run as ``python tests/stable_ddp_worker.py OUTDIR`` with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set. Rank r's batches hold sample ids 10 r + {0, 1} (step 0) and
100 + 10 r + {0, 1} (step 1); each row is filled with its id. Two banks run side by
side: gather=True and gather=False. Writes OUTDIR/rank<r>.pt with the ids of each
reference set (in order) and the number of all-gathers made.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reflexflow import stable  # noqa: E402


def batch(first: int) -> torch.Tensor:
    return torch.arange(first, first + 2, dtype=torch.float32).view(2, 1).expand(2, 3).clone()


def main(outdir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = [0]
    gather = dist.all_gather_into_tensor

    def counted(*args, **kwargs):
        calls[0] += 1
        return gather(*args, **kwargs)

    dist.all_gather_into_tensor = counted
    banks = {
        "gather": stable.StableReferenceBank(6, gather=True),
        "local": stable.StableReferenceBank(6),
    }
    out: dict = {name: [] for name in banks}
    for first in (10 * rank, 100 + 10 * rank):
        x1 = batch(first)
        for name, bank in banks.items():
            out[name].append([int(v) for v in bank.reference(x1)[:, 0]])
            bank.update(x1)
    out["gathers"] = calls[0]
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
