"""Batched scheduled-sampling rollout, pure PyTorch (the reference twin of the C++ engine).

Two plans, both exact twins of the per-sample loop
(:func:`reflexflow.reference.euler_rollout_per_sample`):

* per-sample k (the sorted plan): the batch is sorted once by rollout length k, descending
  (stable), so that at step j the samples still rolling out are a contiguous prefix: each
  model call sees only the active samples (sum(k_i) sample-forwards in all, not
  B * max k), through zero-copy prefix views, with one gather at the start and one
  scatter at the end. It needs the prefix lengths on the host: one host read of k.
  Per step: x[:n_j] += step[:n_j] * v(x[:n_j], tau[:n_j]); tau[:n_j] += step[:n_j].
* ``fixed_k=K`` (the masked static plan): every k_i is known to lie in {0, ..., K} without
  reading k. K full-batch steps; at step j only the rows with k_i > j move:

      x = where(k > j, x + step * v(x, tau), x);   tau = where(k > j, tau + step, tau)

  No sort, no host read (torch.compile traces it with fullgraph=True; CUDA graphs capture
  it with k as an input buffer). Rows with k_i = 0 come back bit-identical to x_t0, and
  with every k_i = K the result is bit-identical to K plain steps x += step * v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .batching import index_batch, prefix_batch
from .reference import VelocityFn, bcast

__all__ = [
    "rollout_plan",
    "active_counts",
    "euler_rollout",
    "plan_tensors",
    "euler_update",
    "euler_update_masked",
    "masked_euler_steps",
    "call_velocity",
]

MaskedUpdate = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, "Tensor | None"], None]


def active_counts(ks: list[int]) -> list[int]:
    """counts[j] = #{i : k_i > j} for j < max k, from k already on the host (a list).

    Raises ValueError for a negative k_i.
    """
    kmax = max(ks, default=0)
    if ks and min(ks) < 0:
        raise ValueError(f"k must be >= 0, got min {min(ks)}")
    hist = [0] * (kmax + 1)
    for ki in ks:
        hist[ki] += 1
    counts, above = [0] * kmax, 0
    for j in range(kmax - 1, -1, -1):  # #{k_i > j} = #{k_i >= j + 1}
        above += hist[j + 1]
        counts[j] = above
    return counts


def rollout_plan(k: Tensor) -> tuple[Tensor, list[int]]:
    """Sort order (k descending, stable) and the active count at each step j < max k.

    One host sync: the single transfer ``k.tolist()`` (the counts are needed on the host
    to slice the prefixes); the sort stays on k's device.
    """
    order = torch.sort(k, descending=True, stable=True).indices
    return order, active_counts(k.tolist())


def call_velocity(
    velocity: VelocityFn, x: Tensor, t: Tensor, kwargs: Any, model_input: Tensor | None
) -> Tensor:
    """velocity(x, t, kwargs), passing ``model_input`` (x already cast) when given."""
    if model_input is None:
        return velocity(x, t, kwargs)
    return velocity(x, t, kwargs, model_input=model_input)


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
    unchanged (bit for bit). ``fixed_k=K``: the caller guarantees every k_i lies in
    {0, ..., K} (not checked: checking would read k; k_i is taken as min(max(k_i, 0), K)),
    so the masked static plan runs: K full-batch steps, no sort and no host sync
    (torch.compile traces it without a graph break).
    """
    if fixed_k is not None:
        steps = check_fixed_k(fixed_k)
        with torch.no_grad():
            xs = x_t0.clone()
            tau = t0.to(xs.dtype).clone()
            masked_euler_steps(
                velocity, xs, tau, step.to(xs.dtype), k, steps, model_kwargs, euler_update_masked
            )
        return xs
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


def check_fixed_k(fixed_k: Any) -> int:
    """fixed_k as an int >= 0, else TypeError / ValueError."""
    if isinstance(fixed_k, bool) or not isinstance(fixed_k, int):
        raise TypeError(f"fixed_k must be an int or None, got {fixed_k!r}")
    if fixed_k < 0:
        raise ValueError(f"fixed_k must be >= 0, got {fixed_k}")
    return fixed_k


def masked_euler_steps(
    velocity: VelocityFn,
    state: Tensor,
    tau: Tensor,
    h: Tensor,
    k: Tensor,
    steps: int,
    model_kwargs: Any,
    update: MaskedUpdate,
    model_input: Tensor | None = None,
) -> None:
    """The masked static plan, in place on (state, tau): for j < steps,
    v = v(state, tau); update(state, tau, v, h, k, j, next input), which moves only the
    rows with k > j (:func:`euler_update_masked` or its C++/CUDA op).

    ``model_input``: a buffer holding state cast to the model's dtype, refreshed by the
    update (fused) and passed to the model; None lets the velocity cast itself.
    """
    for j in range(steps):
        v = call_velocity(velocity, state, tau, model_kwargs, model_input)
        nxt = None if model_input is None or j + 1 == steps else model_input
        update(state, tau, v, h, k, j, nxt)


def plan_tensors(
    k: Tensor, t0: Tensor, step: Tensor, kmax: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference twin of ``torch.ops.reflexflow.rollout_plan``: (order, counts, times, steps).

    order = stable sort of k, descending; the plan has K = kmax steps if given (no host
    read of k), else max k (one host read); counts[j] = #{i : k_i > j} for j < K;
    steps = step[order]; times[j] = t0[order] + steps added j times (tau = tau + h, the
    rounding of the loop), shape (K, B).
    """
    order = torch.sort(k, descending=True, stable=True).indices
    steps_out = len(active_counts(k.tolist())) if kmax is None else kmax
    counts = (k.unsqueeze(0) > torch.arange(steps_out, device=k.device).unsqueeze(1)).sum(1)
    steps = step.index_select(0, order)
    tau = t0.index_select(0, order)
    rows = []
    for _ in range(steps_out):
        rows.append(tau)
        tau = tau + steps
    times = torch.stack(rows) if rows else t0.new_empty(0, k.shape[0])
    return order, counts, times, steps


def euler_update(state: Tensor, v: Tensor, h: Tensor, next_input: Tensor | None = None) -> None:
    """Reference twin of ``torch.ops.reflexflow.euler_update_``, in place.

    state += h * v (v cast to state's dtype; h of shape (n,) per sample, or one value);
    next_input, when given, receives the new state cast to its own dtype.
    """
    hb = h.to(state.dtype).reshape(-1, *([1] * (state.dim() - 1)))
    state += hb * v.to(state.dtype)
    if next_input is not None:
        next_input.copy_(state)


def euler_update_masked(
    state: Tensor,
    tau: Tensor,
    v: Tensor,
    h: Tensor,
    k: Tensor,
    j: int,
    next_input: Tensor | None = None,
) -> None:
    """Reference twin of ``torch.ops.reflexflow.euler_update_masked_``, in place.

    On the rows r with k[r] > j only: state[r] += h[r] * v[r]; tau[r] += h[r];
    next_input[r] = state[r] cast to next_input's dtype. The other rows are left bit for
    bit (a select, not a multiply by 0: NaN/inf in their v or -0.0 in their state cannot
    leak). h: shape (n,) or one value, cast to state's dtype.
    """
    live = k > j
    hs = h.to(state.dtype)
    hb = hs.reshape(-1, *([1] * (state.dim() - 1)))
    rows = live.reshape(-1, *([1] * (state.dim() - 1)))
    state.copy_(torch.where(rows, state + hb * v.to(state.dtype), state))
    tau.copy_(torch.where(live, tau + hs, tau))
    if next_input is not None:
        next_input.copy_(torch.where(rows, state.to(next_input.dtype), next_input))
