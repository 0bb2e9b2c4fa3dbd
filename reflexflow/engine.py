"""RolloutEngine: the batched scheduled-sampling rollout behind ReflexFlowLoss.

Each sample i is rolled k_i Euler steps (k_i = 0 allowed) in one batched pass:
the batch is sorted once by k descending (stable), so at step j the active samples are
the prefix of length n_j = #{k_i > j}; the model sees only that prefix (sum(k_i)
sample-forwards in all), through zero-copy views; one gather at the start, one scatter
at the end; batch-shaped model_kwargs follow the permutation.

    x[:n_j] += step[:n_j] * v(x[:n_j], tau_j[:n_j])      j = 0 .. max k - 1

backend "native": the C++/CUDA ops (``rollout_plan``; ``euler_update_``, which also
writes the next model input already cast to the model's dtype); "torch": the
pure-PyTorch twin :func:`reflexflow.rollout.euler_rollout`; "auto" (and "triton",
which has no rollout kernel): native where the extension has a kernel for the device.
Under torch.compile the engine traces the torch twin (no extension lookups in the graph;
the graph breaks only at the plan's host sync). Fixed k (every k_i equal) on CUDA with
``cuda_graph=True``: the whole rollout is
captured once per (model, shapes, dtypes, k) as a CUDA graph and replayed.
The state stays float32/float64 while the model may run in bf16/fp16.
Oracle: :func:`reflexflow.reference.euler_rollout_per_sample`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from . import native
from .batching import index_batch, map_tensors, prefix_batch
from .conventions import VelocityModel
from .reference import VelocityFn
from .rollout import euler_rollout, euler_update, plan_tensors

__all__ = ["RolloutEngine", "rollout", "clear_graph_cache", "ENGINE_BACKENDS"]

ENGINE_BACKENDS = ("auto", "torch", "native", "triton")
_MAX_GRAPHS = 8


def _signature(obj: Any) -> Any:
    """Hashable description of model_kwargs: tensor shapes/dtypes, other values' repr."""
    if isinstance(obj, Tensor):
        return ("T", tuple(obj.shape), obj.dtype, str(obj.device))
    if isinstance(obj, dict):
        return ("D", tuple((key, _signature(val)) for key, val in obj.items()))
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return ("L", tuple(_signature(val) for val in obj))
    return ("V", repr(obj))


def _copy_tensors(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for key in dst:
            _copy_tensors(dst[key], src[key])
    elif isinstance(dst, (list, tuple)) and not hasattr(dst, "_fields"):
        for a, b in zip(dst, src, strict=True):
            _copy_tensors(a, b)


def _model_key(velocity: VelocityFn) -> tuple:
    if isinstance(velocity, VelocityModel):
        return (
            id(velocity.model),
            velocity.convention,
            velocity.timestep_scale,
            velocity.input_dtype,
        )
    if hasattr(velocity, "__self__") and hasattr(velocity, "__func__"):  # a bound method
        return (id(velocity.__self__), velocity.__func__)
    return (id(velocity),)  # the cached graph keeps velocity alive: the id is not reused


def _cast_dtype(velocity: VelocityFn, state: Tensor) -> torch.dtype | None:
    """The model input dtype the fused update should write, or None (no cast needed)."""
    if isinstance(velocity, VelocityModel) and velocity.input_dtype is not None:
        if velocity.input_dtype != state.dtype:
            return velocity.input_dtype
    return None


def _call(velocity: VelocityFn, x: Tensor, t: Tensor, kwargs: Any, xin: Tensor | None) -> Tensor:
    if xin is None:
        return velocity(x, t, kwargs)
    return velocity(x, t, kwargs, model_input=xin)


class _Graph:
    """One captured fixed-k rollout: static buffers and the CUDA graph that updates them."""

    def __init__(self, velocity, x, times, steps, kwargs, update, cast) -> None:
        self.source = velocity  # kept alive, so its id in the cache key is never reused
        self.velocity = copy.copy(velocity)  # its call counters are not the caller's
        # contiguous buffers whatever x's layout (channels_last, permuted): the fused
        # update requires them
        self.state = x.clone(memory_format=torch.contiguous_format)
        self.times = times.clone()
        self.steps = steps.clone()
        self.kwargs = map_tensors(kwargs, lambda a: a.clone())
        self.xin = None if cast is None else self.state.to(cast)
        self.update = update
        self.k = times.shape[0]
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up outside the capture
            self._body()
        torch.cuda.current_stream(x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        for j in range(self.k):
            v = _call(self.velocity, self.state, self.times[j], self.kwargs, self.xin)
            last = j + 1 == self.k
            self.update(self.state, v, self.steps, None if last else self.xin)

    def run(self, x: Tensor, times: Tensor, steps: Tensor, kwargs: Any) -> Tensor:
        self.state.copy_(x)
        self.times.copy_(times)
        self.steps.copy_(steps)
        _copy_tensors(self.kwargs, kwargs)
        if self.xin is not None:
            self.xin.copy_(x)
        self.graph.replay()
        return self.state.clone()


def _native_update(state: Tensor, v: Tensor, h: Tensor, next_input: Tensor | None) -> None:
    torch.ops.reflexflow.euler_update_(state, v, h, next_input)


class RolloutEngine:
    """Batched prefix-compacted Euler rollout: x^_t1 from (x_t0, t0, k, step).

    x^_i = x_t0[i] after k_i steps x += step_i * v(x, tau), tau += step_i (per-sample
    loop twin: :func:`reflexflow.reference.euler_rollout_per_sample`; pure-PyTorch
    engine twin: :func:`reflexflow.rollout.euler_rollout`).
    """

    def __init__(self, backend: str = "auto", *, cuda_graph: bool = False) -> None:
        if backend not in ENGINE_BACKENDS:
            raise ValueError(f"backend must be one of {ENGINE_BACKENDS}, got {backend!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        self.backend = backend
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, _Graph] = {}

    def uses_native(self, x: Tensor) -> bool:
        """Whether a rollout of state x runs on the C++/CUDA ops."""
        if self.backend == "torch" or x.dtype not in (torch.float32, torch.float64):
            return False
        if self.backend == "native":
            if not native.has_kernel(x.device):
                status = native.extension_status()
                raise RuntimeError(
                    f"backend='native': no reflexflow extension kernel for {x.device.type} "
                    f"({status['reason'] or 'extension built without this device'})"
                )
            return True
        return native.has_kernel(x.device)

    def __call__(
        self,
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

        Runs under torch.no_grad; x_t0 is not modified; k_i = 0 returns x_t0[i] unchanged.
        ``fixed_k``: the caller guarantees every k_i equals it (a static plan, no host sync).
        """
        if torch.compiler.is_compiling():  # traced: the torch twin (Inductor fuses its update)
            return euler_rollout(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)
        use_native = self.uses_native(x_t0)
        graph = self.cuda_graph and x_t0.is_cuda
        if not (use_native or graph):
            return euler_rollout(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)
        with torch.no_grad():
            plan = torch.ops.reflexflow.rollout_plan if use_native else plan_tensors
            order, counts, times, steps = plan(k, t0.to(x_t0.dtype), step.to(x_t0.dtype))
            active = counts.tolist()  # the one host sync: prefix lengths
            batch = x_t0.shape[0]
            if not active:
                return x_t0.clone()
            update = _native_update if use_native else euler_update
            if graph and active[-1] == batch:  # fixed k: static shapes, identity order
                return self._graph_rollout(velocity, x_t0, times, steps, model_kwargs, update)
            xs = x_t0.index_select(0, order)
            kwargs = index_batch(model_kwargs, batch, order)
            cast = _cast_dtype(velocity, xs) if use_native else None
            xin = None if cast is None else xs.to(cast)
            for j, n in enumerate(active):
                v = _call(
                    velocity,
                    xs[:n],
                    times[j, :n],
                    prefix_batch(kwargs, batch, n),
                    None if xin is None else xin[:n],
                )
                nxt = None if xin is None or j + 1 == len(active) else xin[:n]
                update(xs[:n], v, steps[:n], nxt)
            out = torch.empty_like(x_t0)
            out.index_copy_(0, order, xs)
        return out

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the references they hold to models)."""
        self._graphs.clear()

    def _graph_rollout(self, velocity, x, times, steps, kwargs, update) -> Tensor:
        kwargs = map_tensors(kwargs, lambda a: a)  # any mapping as a dict: keyed, copied
        cast = _cast_dtype(velocity, x) if update is _native_update else None
        key = (
            _model_key(velocity),
            tuple(x.shape),
            x.dtype,
            str(x.device),
            times.shape[0],
            cast,
            update is _native_update,
            _signature(kwargs),
        )
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= _MAX_GRAPHS:
                self._graphs.clear()
            entry = _Graph(velocity, x, times, steps, kwargs, update, cast)
            self._graphs[key] = entry
        out = entry.run(x, times, steps, kwargs)
        if isinstance(velocity, VelocityModel):  # replays bypass the Python counters
            velocity.calls += entry.k
            velocity.sample_forwards += entry.k * x.shape[0]
        return out


_ENGINES: dict[tuple[str, bool], RolloutEngine] = {}


def rollout(
    velocity: VelocityFn,
    x_t0: Tensor,
    t0: Tensor,
    k: Tensor,
    step: Tensor,
    model_kwargs: Any = None,
    *,
    backend: str = "auto",
    cuda_graph: bool = False,
    fixed_k: int | None = None,
) -> Tensor:
    """x^_t1 by a process-wide :class:`RolloutEngine` (its CUDA graphs are cached)."""
    key = (backend, cuda_graph)
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = RolloutEngine(backend, cuda_graph=cuda_graph)
    return engine(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)


def clear_graph_cache() -> None:
    """Drop every CUDA graph captured by :func:`rollout` (the loss's engines)."""
    for engine in _ENGINES.values():
        engine.clear_graphs()
