"""Worker of tests/test_ddp.py: one rank of a 2-process gloo group (CPU).

Run as ``python tests/ddp_worker.py OUTFILE`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (what torchrun sets). For each mode in MODES, on a fresh model:
DistributedDataParallel with the shared first call (the default, "ddp"), the joint 2B
forward ("ddp-joint"), two calls ("ddp-two-call"), ``torch.compile(DDP(model))``
("ddp-compiled", aot_eager backend), memory="lean" ("ddp-lean", its backward scaled by a
constant as a GradScaler would, and "ddp-lean-accum": two micro-batches, the first under
``no_sync``), and FSDP2 ``fully_shard`` ("fsdp2", "fsdp2-lean"). Each rank takes its share
of a fixed global batch (same noise, t, k as the single-process run in the test),
computes ReflexFlowLoss, runs backward; DDP counts its gradient all-reduces with a comm
hook. Rank 0 saves {mode: {"grads": {name: full averaged gradient}, "allreduces": n}}.
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
SCALE = 1024.0  # a GradScaler-style constant loss scale (the lean modes divide it out)


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


def loss_on(model, batch: dict, **knobs):
    """The ReflexFlowOutput of the loss on ``batch`` (its ``.backward()`` runs the step)."""
    loss_fn = rf.ReflexFlowLoss(**{**KNOBS, **knobs})
    x1 = batch["x1"]
    return loss_fn(model, x1, noise=batch["noise"], t=batch["t"], k=batch["k"])


# mode -> (wrapper, loss knobs)
MODES = {
    "ddp": ("ddp", {}),
    "ddp-joint": ("ddp", {"joint_forward": True}),
    "ddp-two-call": ("ddp", {"share_first_call": False}),
    "ddp-compiled": ("ddp-compiled", {}),
    "ddp-lean": ("ddp", {"memory": "lean"}),
    "ddp-lean-accum": ("ddp", {"memory": "lean"}),
    "ddp-lean-wrapped": ("ddp-wrapped", {"memory": "lean"}),
    "ddp-lean-fc-only": ("ddp", {"memory": "lean", "lambda_adr": 0.0}),
    "fsdp2": ("fsdp2", {}),
    "fsdp2-lean": ("fsdp2", {"memory": "lean"}),
}
# knobs of the forward and memory modes, which leave the gradients as they are
MODE_ONLY = ("memory", "joint_forward", "share_first_call")


class Wrapper(torch.nn.Module):
    """A model that runs a DDP inside (as DiffusersModelAdapter(DDP(net)) would)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t)


def wrap(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "ddp-wrapped":
        return Wrapper(torch.nn.parallel.DistributedDataParallel(model))
    if kind == "ddp-compiled":  # torch.compile(DDP(model)): dynamo's DDPOptimizer path
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return torch.compile(ddp, backend="aot_eager")
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def count_allreduces(ddp: torch.nn.Module, counter: list[int]) -> None:
    """Register a comm hook that all-reduces as DDP does and counts its calls."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        counter[0] += 1
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)


def step(wrapped, kind: str, mode: str, batch: dict, knobs: dict) -> None:
    """One training step's backward on ``batch`` in ``mode``."""
    if mode == "ddp-lean-accum":  # two micro-batches, gradient sync on the last only
        half = batch["x1"].shape[0] // 2
        parts = [
            {key: val[i * half : (i + 1) * half] for key, val in batch.items()} for i in (0, 1)
        ]
        with wrapped.no_sync():
            loss_on(wrapped, parts[0], **knobs).backward(loss_scale=0.5)
        loss_on(wrapped, parts[1], **knobs).backward(loss_scale=0.5)
    elif knobs.get("memory") == "lean":
        loss_on(wrapped, batch, **knobs).backward(loss_scale=SCALE)
    else:
        loss_on(wrapped, batch, **knobs).loss.backward()


def main(outfile: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = global_batch()
    per = GLOBAL_BATCH // world
    mine = {key: val[rank * per : (rank + 1) * per] for key, val in full.items()}
    result = {}
    for mode, (kind, knobs) in MODES.items():
        model = make_model()
        wrapped = wrap(model, kind)  # keep it alive until backward: DDP's reducer lives in it
        counter = [0]
        if kind == "ddp":
            count_allreduces(wrapped, counter)
        elif kind == "ddp-wrapped":
            count_allreduces(wrapped.inner, counter)
        step(wrapped, kind, mode, mine, knobs)
        scale = SCALE if knobs.get("memory") == "lean" and mode != "ddp-lean-accum" else 1.0
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
                g = g.full_tensor()
            grads[name] = g.detach().clone() / scale
        counted = kind in ("ddp", "ddp-wrapped")
        result[mode] = {"grads": grads, "allreduces": counter[0] if counted else None}
    if rank == 0:
        torch.save(result, outfile)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} finished", flush=True)  # tests/test_ddp.py reads it


if __name__ == "__main__":
    main(sys.argv[1])
