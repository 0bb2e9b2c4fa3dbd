"""Batched scheduled-sampling rollout, pure PyTorch (the reference twin of the C++ engine).

The batch is sorted once by rollout length k, descending (stable), so that at step j
the samples still rolling out are a contiguous prefix: each model call sees only the
active samples (sum(k_i) sample-forwards in all, not B * max k), through zero-copy
prefix views, with one gather at the start and one scatter at the end.
Per-step update: x[:n_j] += step[:n_j] * v(x[:n_j], tau[:n_j]); tau[:n_j] += step[:n_j].
Oracle: :func:`reflexflow.reference.euler_rollout_per_sample`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batching import index_batch, prefix_batch
from .reference import VelocityFn, bcast

__all__ = ["rollout_plan", "euler_rollout", "plan_tensors", "euler_update"]


def rollout_plan(k: Tensor) -> tuple[Tensor, list[int]]:
    """Sort order (k descending, stable) and the active count at each step j < max k.

    One host sync (the counts are needed on the host to slice the prefix).
    """
    order = torch.sort(k, descending=True, stable=True).indices
    kmax = int(k.max()) if k.numel() else 0
    counts = torch.bincount(k.clamp_min(0), minlength=kmax + 1)
    # active at step j: samples with k > j
    active = counts.flip(0).cumsum(0).flip(0)[1:].tolist() if kmax > 0 else []
    return order, active


def euler_rollout(
    velocity: VelocityFn,
    x_t0: Tensor,
    t0: Tensor,
    k: Tensor,
    step: Tensor,
    model_kwargs: Any = None,
    *,
    fixed_k: int | None = None,
) -> Tensor:
    """Roll each sample k_i Euler steps of size step_i from (x_t0, t0); returns x^_t1.

    Runs under torch.no_grad. x_t0 is not modified. Samples with k_i = 0 come back
    unchanged (bit for bit). ``fixed_k``: the caller guarantees every k_i equals it, so
    the plan is static: fixed_k full-batch steps, no sort and no host sync (torch.compile
    traces it without a graph break).
    """
    if fixed_k is not None:
        return _euler_rollout_static(velocity, x_t0, t0, step, model_kwargs, fixed_k)
    batch = x_t0.shape[0]
    order, active = rollout_plan(k)
    if not active:
        return x_t0.clone()
    with torch.no_grad():
        xs = x_t0.index_select(0, order)
        ts = t0.index_select(0, order).clone()
        hs = step.index_select(0, order)
        kwargs = index_batch(model_kwargs, batch, order)
        for n in active:
            v = velocity(xs[:n], ts[:n], prefix_batch(kwargs, batch, n))
            xs[:n] += bcast(hs[:n], xs) * v
            ts[:n] += hs[:n]
        out = torch.empty_like(x_t0)
        out.index_copy_(0, order, xs)
    return out


def _euler_rollout_static(
    velocity: VelocityFn, x_t0: Tensor, t0: Tensor, step: Tensor, model_kwargs: Any, steps: int
) -> Tensor:
    """Every sample rolled ``steps`` Euler steps: x += step * v(x, tau); tau += step."""
    with torch.no_grad():
        xs = x_t0.clone()
        ts = t0.clone()
        for _ in range(steps):
            xs += bcast(step, xs) * velocity(xs, ts, model_kwargs)
            ts += step
    return xs


def plan_tensors(k: Tensor, t0: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference twin of ``torch.ops.reflexflow.rollout_plan``: (order, counts, times, steps).

    order = stable sort of k, descending; counts[j] = #{i : k_i > j} for j < max k;
    steps = step[order]; times[j] = t0[order] + steps added j times (tau = tau + h, the
    rounding of the loop), shape (max k, B).
    """
    order, active = rollout_plan(k)
    steps = step.index_select(0, order)
    tau = t0.index_select(0, order)
    rows = []
    for _ in active:
        rows.append(tau)
        tau = tau + steps
    times = torch.stack(rows) if rows else t0.new_empty(0, k.shape[0])
    return order, torch.tensor(active, dtype=torch.int64, device=k.device), times, steps


def euler_update(state: Tensor, v: Tensor, h: Tensor, next_input: Tensor | None = None) -> None:
    """Reference twin of ``torch.ops.reflexflow.euler_update_``, in place.

    state += h * v (v cast to state's dtype; h of shape (n,) per sample, or one value);
    next_input, when given, receives the new state cast to its own dtype.
    """
    hb = h.to(state.dtype).reshape(-1, *([1] * (state.dim() - 1)))
    state += hb * v.to(state.dtype)
    if next_input is not None:
        next_input.copy_(state)
