"""Train a toy flow-matching model with ReflexFlowLoss under DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py --steps 50 --cpu    # CPU: gloo
    torchrun --nproc_per_node=8 examples/train_ddp.py --steps 50 --amp    # GPUs: nccl, bf16
    torchrun --nproc_per_node=2 examples/train_ddp.py --cpu --lean        # FM's memory peak

The loss needs nothing special from DDP: the two gradient-carrying model calls build one
autograd graph per step and the rollout runs under torch.no_grad, so neither static_graph
nor find_unused_parameters is needed. Each rank draws its own noise, t and k (seed the
generator per rank); DDP averages the gradients. With --lean (memory="lean") the step's
backward is ``out.backward()``: the FM term's backward runs before the ADR term's forward
and the gradients are all-reduced once, by the second.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import reflexflow as rf  # noqa: E402
from reflexflow.demo.toy_models import TimeChannelConv  # noqa: E402


def toy_batch(batch: int, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Smooth random images: low-frequency noise upsampled from 4x4."""
    low = torch.randn(batch, 3, 4, 4, generator=generator).to(device)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="per-rank batch")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the model")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA exists")
    p.add_argument("--lean", action="store_true", help='memory="lean": FM\'s activation peak')
    args = p.parse_args()

    use_cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
    model = nn.parallel.DistributedDataParallel(TimeChannelConv().to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = rf.ReflexFlowLoss(
        num_sampling_steps=20, rollout_steps=2, memory="lean" if args.lean else "default"
    )
    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # noise, t, k per rank
    data_gen = torch.Generator().manual_seed(rank)

    for step in range(args.steps):
        x1 = toy_batch(args.batch, args.size, data_gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            out = loss_fn(model, x1, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.backward()  # the same as out.loss.backward() unless memory="lean"
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)  # for logging only
        if rank == 0:
            print(f"step {step} loss {loss.item() / dist.get_world_size():.4f}", flush=True)
    del model, opt  # DDP's reducer holds the process group: release it first
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()
    print(f"rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
