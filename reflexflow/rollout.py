"""The batched scheduled-sampling rollout, written once over the ops it uses.

Each sample i is rolled k_i Euler steps (k_i = 0 allowed) from (x_t0, t0), exact twin of
the per-sample loop (:func:`reflexflow.reference.euler_rollout_per_sample`). Two plans:

* per-sample k (the prefix plan): one host read of k (``k.tolist()``) gives the active
  counts n_j = #{i : k_i > j}; the batch is sorted once by k, descending and stable (on
  k's device, by the plan op), so at step j the samples still rolling out are the prefix
  of length n_j and the model sees only them (sum(k_i) sample-forwards), through
  zero-copy views, with one gather at the start and one scatter at the end:

      x[:n_j] += step[:n_j] * v(x[:n_j], tau_j[:n_j])          j = 0 .. max k - 1

* ``fixed_k=K`` (the masked static plan): every k_i is known to lie in {0, ..., K}
  without reading k. K full-batch steps; at step j only the rows with k_i > j move:

      x = where(k > j, x + step * v(x, tau), x);   tau = where(k > j, tau + step, tau)

  No sort, no host read (torch.compile traces it with fullgraph=True; CUDA graphs capture
  it with k as an input buffer, :mod:`reflexflow.graphs`). Rows with k_i = 0 come back
  bit-identical to x_t0, and with every k_i = K the result is bit-identical to K plain
  steps x += step * v.

The ops (:class:`RolloutOps`) are the PyTorch twins below (:data:`TORCH_OPS`) or the
C++/CUDA ops ``torch.ops.reflexflow.*`` (:data:`reflexflow.native.NATIVE_OPS`), which give
bit-identical results. The state, tau and step are in the state's dtype (float32, or
float64), whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .batching import index_batch, prefix_batch
from .conventions import VelocityModel
from .reference import VelocityFn

if TYPE_CHECKING:  # graphs imports this module
    from .graphs import GraphCache

__all__ = [
    "RolloutOps",
    "RolloutJob",
    "TORCH_OPS",
    "active_counts",
    "check_fixed_k",
    "euler_rollout",
    "prefix_rollout",
    "static_rollout",
    "masked_euler_steps",
    "rollout_plan",
    "euler_update",
    "euler_update_masked",
    "call_velocity",
    "input_cast",
]


@dataclasses.dataclass(frozen=True)
class RolloutOps:
    """The ops a rollout plan runs on.

    name: "torch" or "native" (part of a CUDA graph's key).
    plan(k, t0, step, kmax) -> (order, counts, times, steps): :func:`rollout_plan`.
    update(state, v, h, next_input): state += h * v in place: :func:`euler_update`.
    masked_update(state, tau, v, h, k, j, next_input): the same on the rows with k > j,
    and tau += h there: :func:`euler_update_masked`.
    fused: the native ops' contract: the state buffers are contiguous, and the update
    also writes the next model input, already cast to the model's dtype (a
    :class:`VelocityModel` with an input_dtype), in the same pass over memory.
    """

    name: str
    plan: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    update: Callable[..., None]
    masked_update: Callable[..., None]
    fused: bool


@dataclasses.dataclass(frozen=True)
class RolloutJob:
    """One rollout, as the plans (and :mod:`reflexflow.graphs`) take it.

    ops: the :class:`RolloutOps` to run on; velocity: v(x, t, kwargs); x: (B, *S) start
    states x_t0; tau0, h: (B,) start times and step sizes in x's dtype; k: (B,) int64
    step counts on x's device; kwargs: the model_kwargs (batch-first tensors).
    """

    ops: RolloutOps
    velocity: VelocityFn
    x: Tensor
    tau0: Tensor
    h: Tensor
    k: Tensor
    kwargs: Any


def active_counts(ks: list[int]) -> list[int]:
    """counts[j] = #{i : k_i > j} for j < max k, from k already on the host (a list).

    Raises ValueError for a negative k_i.
    """
    kmax = max(ks, default=0)  # fullgraph=True with per-sample k: use k_draw="fixed"
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


def check_fixed_k(fixed_k: Any) -> int:
    """fixed_k as an int >= 0, else TypeError / ValueError."""
    if isinstance(fixed_k, bool) or not isinstance(fixed_k, int):
        raise TypeError(f"fixed_k must be an int or None, got {fixed_k!r}")
    if fixed_k < 0:
        raise ValueError(f"fixed_k must be >= 0, got {fixed_k}")
    return fixed_k


def call_velocity(
    velocity: VelocityFn, x: Tensor, t: Tensor, kwargs: Any, model_input: Tensor | None
) -> Tensor:
    """velocity(x, t, kwargs), passing ``model_input`` (x already cast) when given."""
    if model_input is None:
        return velocity(x, t, kwargs)
    return velocity(x, t, kwargs, model_input=model_input)


def input_cast(velocity: VelocityFn, state: Tensor) -> torch.dtype | None:
    """The model input dtype a fused update should write, or None (no cast needed)."""
    if isinstance(velocity, VelocityModel) and velocity.input_dtype is not None:
        if velocity.input_dtype != state.dtype:
            return velocity.input_dtype
    return None


def _input_buffer(ops: RolloutOps, velocity: VelocityFn, state: Tensor) -> Tensor | None:
    """state cast to the model's dtype, refreshed by a fused update; None otherwise."""
    cast = input_cast(velocity, state) if ops.fused else None
    return None if cast is None else state.to(cast)


def euler_rollout(
    velocity: VelocityFn,
    x_t0: Tensor,
    t0: Tensor,
    k: Tensor,
    step: Tensor,
    model_kwargs: Any = None,
    *,
    fixed_k: int | None = None,
    ops: RolloutOps | None = None,
    graphs: GraphCache | None = None,
) -> Tensor:
    """Roll each sample k_i Euler steps of size step_i from (x_t0, t0); returns x^_t1.

    x^_i = x_t0[i] after k_i steps x += step_i * v(x, tau), tau += step_i. Runs under
    torch.no_grad; x_t0 is not modified; samples with k_i = 0 come back unchanged (bit
    for bit). Per-sample k: the prefix plan, one host read (``k.tolist()``).
    ``fixed_k=K``: the caller guarantees every k_i lies in {0, ..., K} (not checked:
    checking would read k; k_i is taken as min(max(k_i, 0), K)), so the masked static plan
    runs: K full-batch steps, no sort and no host read. ``ops``: :data:`TORCH_OPS`
    (default) or :data:`reflexflow.native.NATIVE_OPS`. ``graphs``: the CUDA graphs that
    run static plans (``fixed_k``, and per-sample k that are all equal; where a graph
    cannot be captured the plan runs eagerly).
    """
    ops = TORCH_OPS if ops is None else ops
    steps = None if fixed_k is None else check_fixed_k(fixed_k)
    with torch.no_grad():
        dtype = x_t0.dtype
        tau0, h = t0.to(dtype), step.to(dtype)
        # per-sample k: the one host read, the prefix lengths (read before any move)
        # torch.compile(fullgraph=True) stops here: per-sample k needs this host read; use
        # k_draw="fixed" (and ss_prob=1) for a static plan with no host read
        active = None if steps is not None else active_counts(k.tolist())  # k_draw="fixed"
        k = k.to(device=x_t0.device, dtype=torch.int64)
        job = RolloutJob(ops, velocity, x_t0, tau0, h, k, model_kwargs)
        if active is not None:
            if not active:
                return x_t0.clone()
            if graphs is None or active[-1] != x_t0.shape[0]:
                return prefix_rollout(job, active)
            steps = len(active)  # every k_i equal: a static plan
        if graphs is not None and steps > 0:
            out = graphs.run(job, steps)
            if out is not None:
                return out
        return static_rollout(job, steps)


def prefix_rollout(job: RolloutJob, active: list[int]) -> Tensor:
    """The prefix plan: x[:n_j] += h[:n_j] * v(x[:n_j], tau_j[:n_j]) on the batch sorted
    by k (``ops.plan`` sorts it, once; given the step count it reads nothing)."""
    x, ops = job.x, job.ops
    batch = x.shape[0]
    order, _, times, steps = ops.plan(job.k, job.tau0, job.h, len(active))
    xs = x.index_select(0, order)
    kwargs = index_batch(job.kwargs, batch, order)
    xin = _input_buffer(ops, job.velocity, xs)
    for j, n in enumerate(active):
        v = call_velocity(
            job.velocity,
            xs[:n],
            times[j, :n],
            prefix_batch(kwargs, batch, n),
            None if xin is None else xin[:n],
        )
        nxt = None if xin is None or j + 1 == len(active) else xin[:n]
        ops.update(xs[:n], v, steps[:n], nxt)
    out = torch.empty_like(x)
    out.index_copy_(0, order, xs)
    return out


def static_rollout(job: RolloutJob, steps: int) -> Tensor:
    """The masked static plan, eagerly, on copies of x and tau0; no host read."""
    state = job.x.clone(memory_format=torch.contiguous_format) if job.ops.fused else job.x.clone()
    tau = job.tau0.clone(memory_format=torch.contiguous_format)  # updated in place
    xin = _input_buffer(job.ops, job.velocity, state)
    masked_euler_steps(dataclasses.replace(job, x=state, tau0=tau), steps, xin)
    return state


def masked_euler_steps(job: RolloutJob, steps: int, model_input: Tensor | None = None) -> None:
    """The masked static plan's loop, in place on (job.x, job.tau0): for j < steps,
    v = v(x, tau); ``job.ops.masked_update`` moves the rows with k > j.

    ``model_input``: a buffer holding x cast to the model's dtype, refreshed by the
    (fused) update and passed to the model; None lets the velocity cast itself.
    """
    for j in range(steps):
        v = call_velocity(job.velocity, job.x, job.tau0, job.kwargs, model_input)
        nxt = None if model_input is None or j + 1 == steps else model_input
        job.ops.masked_update(job.x, job.tau0, v, job.h, job.k, j, nxt)


def rollout_plan(
    k: Tensor, t0: Tensor, step: Tensor, kmax: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Twin of ``torch.ops.reflexflow.rollout_plan``: (order, counts, times, steps).

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
    """Twin of ``torch.ops.reflexflow.euler_update_``, in place.

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
    """Twin of ``torch.ops.reflexflow.euler_update_masked_``, in place.

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


TORCH_OPS = RolloutOps(
    name="torch",
    plan=rollout_plan,
    update=euler_update,
    masked_update=euler_update_masked,
    fused=False,
)
