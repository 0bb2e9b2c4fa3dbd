"""Worker of tests/test_ddp.py: one rank of a 2-process gloo group (CPU).

Run as ``python tests/ddp_worker.py OUTFILE`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (what torchrun sets). For each mode in MODES, on a fresh model: "ddp"
(DistributedDataParallel, joint 2B forward), "ddp-split" (DDP, joint_forward=False: two
gradient-carrying calls), "ddp-compiled" (``torch.compile(DDP(model))``, aot_eager
backend) and "fsdp2" (``fully_shard``). Each rank takes its share of a
fixed global batch (same noise, t, k as the single-process run in the test), computes
ReflexFlowLoss, runs backward; rank 0 saves {mode: {name: full averaged gradient}}.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402

GLOBAL_BATCH = 8
KNOBS = dict(rollout_steps=2, num_sampling_steps=10, lambda_adr=10.0, lambda_fc=1.0)


class TinyNet(torch.nn.Module):
    """A 2-layer conv velocity model with a time input, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(
            self.inp(torch.cat([x, t.view(-1, 1, 1, 1).expand_as(x[:, :1])], 1))
        )
        return self.out(h)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyNet().double()


def global_batch() -> dict:
    """x1, noise, t, k of the global batch (fixed seed; k mixes 0, 1 and 2)."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(GLOBAL_BATCH, 2, 6, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    t = torch.rand(GLOBAL_BATCH, generator=g, dtype=torch.float64) * (1 - 1e-3 - 0.1 * k)
    return dict(x1=x1, noise=noise, t=t, k=k)


def loss_on(model, batch: dict, **knobs) -> torch.Tensor:
    loss_fn = rf.ReflexFlowLoss(**{**KNOBS, **knobs})
    x1 = batch["x1"]
    return loss_fn(model, x1, noise=batch["noise"], t=batch["t"], k=batch["k"]).loss


MODES = ("ddp", "ddp-split", "ddp-compiled", "fsdp2")


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode in ("ddp", "ddp-split"):
        return torch.nn.parallel.DistributedDataParallel(model)
    if mode == "ddp-compiled":  # torch.compile(DDP(model)): dynamo's DDPOptimizer path
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return torch.compile(ddp, backend="aot_eager")
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def main(outfile: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = global_batch()
    per = GLOBAL_BATCH // world
    mine = {key: val[rank * per : (rank + 1) * per] for key, val in full.items()}
    result = {}
    for mode in MODES:
        model = make_model()
        wrapped = wrap(model, mode)  # keep it alive until backward: DDP's reducer lives in it
        loss = loss_on(wrapped, mine, joint_forward=(mode != "ddp-split"))
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
                g = g.full_tensor()
            grads[name] = g.detach().clone()
        result[mode] = grads
    if rank == 0:
        torch.save(result, outfile)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
