"""RolloutEngine: the batched scheduled-sampling rollout behind ReflexFlowLoss.

Each sample i is rolled k_i Euler steps (k_i = 0 allowed) in one batched pass.

Per-sample k (the sorted plan): the batch is sorted once by k descending (stable), so at
step j the active samples are the prefix of length n_j = #{k_i > j}; the model sees only
that prefix (sum(k_i) sample-forwards in all), through zero-copy views; one gather at the
start, one scatter at the end; batch-shaped model_kwargs follow the permutation. One host
sync: ``k.tolist()`` (the prefix lengths).

    x[:n_j] += step[:n_j] * v(x[:n_j], tau_j[:n_j])      j = 0 .. max k - 1

``fixed_k=K`` (every k_i known to lie in {0, ..., K}): the masked static plan, no host
sync on any path: K full-batch steps, row i moving at step j only where k_i > j

    x = where(k > j, x + step * v(x, tau), x);  tau = where(k > j, tau + step, tau)

backend "native": the C++/CUDA ops (``rollout_plan``; ``euler_update_`` and
``euler_update_masked_``, which also write the next model input already cast to the
model's dtype); "torch": the pure-PyTorch twins in :mod:`reflexflow.rollout`; "auto" (and
"triton", which has no rollout kernel): native where the extension has a kernel for the
device. Under torch.compile the engine traces the torch twin (no extension lookups in the
graph). ``cuda_graph=True`` on CUDA: a rollout whose plan is static (``fixed_k``, or every
k_i equal) is captured once per graph key (:func:`graph_key`) as a CUDA graph, k an input
buffer, and replayed; a model that cannot be captured runs eagerly (one RuntimeWarning).
The state stays float32/float64 while the model may run in bf16/fp16.
Oracle: :func:`reflexflow.reference.euler_rollout_per_sample`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import native
from .batching import index_batch, map_tensors, prefix_batch
from .conventions import VelocityModel
from .model_state import modules_of
from .reference import VelocityFn
from .rollout import (
    active_counts,
    call_velocity,
    check_fixed_k,
    euler_rollout,
    euler_update,
    euler_update_masked,
    masked_euler_steps,
    plan_tensors,
)

__all__ = ["RolloutEngine", "rollout", "clear_graph_cache", "graph_key", "ENGINE_BACKENDS"]

ENGINE_BACKENDS = ("auto", "torch", "native", "triton")
_MAX_GRAPHS = 8
# Graphs whose capture failed after the caching allocator began routing to their pool:
# the allocator's routing filter refers to the graph object, so it must outlive the process.
_ABANDONED: list = []


class CaptureError(RuntimeError):
    """The CUDA-graph capture of a rollout failed (the model is not capturable)."""


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
            getattr(velocity, "mode", None),  # the mode the model is called in, if set
        )
    if hasattr(velocity, "__self__") and hasattr(velocity, "__func__"):  # a bound method
        return (id(velocity.__self__), velocity.__func__)
    return (id(velocity),)  # the cached graph keeps velocity alive: the id is not reused


def _modules_of(velocity: Any) -> list[nn.Module]:
    """The nn.Modules a velocity function runs (a VelocityModel's through its model): see
    :func:`reflexflow.model_state.modules_of`."""
    return modules_of(velocity.model if isinstance(velocity, VelocityModel) else velocity)


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return id(t)


def _model_state(velocity: Any) -> tuple:
    """(training flags of every submodule, storage addresses of every parameter and buffer)
    of the modules velocity runs: what a captured graph has baked in."""
    modules = [m for root in _modules_of(velocity) for m in root.modules()]
    flags = tuple(m.training for m in modules)
    tensors = itertools.chain.from_iterable(
        itertools.chain(m._parameters.values(), m._buffers.values()) for m in modules
    )
    return flags, tuple(_storage_ptr(t) for t in tensors if t is not None)


def _autocast_state(device_type: str) -> tuple:
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def graph_key(
    velocity: VelocityFn,
    x: Tensor,
    steps: int,
    cast: torch.dtype | None,
    use_native: bool,
    model_kwargs: Any,
) -> tuple:
    """What a captured rollout graph depends on; a change of any part means a new capture.

    The velocity's identity (model, convention, timestep scale, input dtype), the state's
    shape, dtype and device, the step count, the update (native or torch) and the model
    input dtype, the structure of model_kwargs (shapes, dtypes, other values), the
    training flag of every submodule, the storage address of every parameter and buffer
    (``model.to()``, ``load_state_dict(assign=True)``, an EMA swap move them; in-place
    optimizer steps do not), and autocast's state and dtype on x's device type.
    """
    return (
        _model_key(velocity),
        tuple(x.shape),
        x.dtype,
        str(x.device),
        steps,
        cast,
        use_native,
        _signature(model_kwargs),
        _model_state(velocity),
        _autocast_state(x.device.type),
    )


def _cast_dtype(velocity: VelocityFn, state: Tensor) -> torch.dtype | None:
    """The model input dtype the fused update should write, or None (no cast needed)."""
    if isinstance(velocity, VelocityModel) and velocity.input_dtype is not None:
        if velocity.input_dtype != state.dtype:
            return velocity.input_dtype
    return None


def _native_update(state: Tensor, v: Tensor, h: Tensor, next_input: Tensor | None) -> None:
    torch.ops.reflexflow.euler_update_(state, v, h, next_input)


def _native_masked(
    state: Tensor, tau: Tensor, v: Tensor, h: Tensor, k: Tensor, j: int, nxt: Tensor | None
) -> None:
    torch.ops.reflexflow.euler_update_masked_(state, tau, v, h, k, j, nxt)


def _capture_autocast(device_type: str) -> torch.autocast:
    """The caller's autocast state and dtype with the weight-cast cache off: a capture must
    record the casts of the live weights, not reads of cached copies that are freed when
    the caller's autocast block exits (torch.cuda.make_graphed_callables' rule)."""
    enabled, dtype = _autocast_state(device_type)
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


def _abandon_capture(graph: Any, device_index: int, pool: Any, *, end: bool) -> None:
    """Leave a failed capture cleanly: the stream out of capture mode and the caching
    allocator no longer routing to the graph's pool."""
    if end:
        try:
            graph.capture_end()
            return  # the capture itself was valid: the graph owns and releases its pool
        except RuntimeError:
            pass  # invalidated: the capture is over, but capture_end raised before the
            # allocator stopped routing to the pool
    _ABANDONED.append(graph)
    for finish in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        with contextlib.suppress(RuntimeError, AttributeError, TypeError):
            getattr(torch._C, finish)(device_index, pool)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("reflexflow: a failed CUDA-graph capture could not be ended")


def _capture(body: Any, device: torch.device, stream: Any) -> Any:
    """Capture body() on ``stream`` into a new CUDA graph (its own memory pool).

    Any failure inside the capture ends it, restores the current stream and the caching
    allocator, and raises :class:`CaptureError` (CUDA out-of-memory is re-raised as is).
    """
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(device)
    with torch.cuda.stream(stream):  # restores the caller's stream whatever happens
        # thread_local: a DataLoader's pin-memory thread cannot invalidate the capture
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            body()
        except BaseException as err:
            _abandon_capture(graph, index, pool, end=True)
            if isinstance(err, torch.cuda.OutOfMemoryError) or not isinstance(err, Exception):
                raise
            raise CaptureError(f"{type(err).__name__}: {err}") from err
        try:
            graph.capture_end()
        except RuntimeError as err:
            _abandon_capture(graph, index, pool, end=False)
            raise CaptureError(f"{type(err).__name__}: {err}") from err
    return graph


class _Graph:
    """One captured static-plan rollout: input buffers and the CUDA graph that updates them.

    Captured for steps masked Euler steps of (state, tau) with k as an input buffer; the
    warm-up and the capture run under the caller's autocast with its cache off, on a side
    stream, under a device guard for x's device.
    """

    def __init__(self, velocity, x, tau, h, k, steps, kwargs, use_native, cast) -> None:
        self.source = velocity  # kept alive, so its id in the cache key is never reused
        self.velocity = copy.copy(velocity)  # its call counters are not the caller's
        self.steps = steps
        self.update = _native_masked if use_native else euler_update_masked
        with torch.cuda.device(x.device):
            # contiguous buffers whatever x's layout (channels_last, permuted): the fused
            # update requires them
            self.state = x.clone(memory_format=torch.contiguous_format)
            self.tau = tau.clone(memory_format=torch.contiguous_format)
            self.h = h.clone(memory_format=torch.contiguous_format)
            self.k = k.clone(memory_format=torch.contiguous_format)
            self.kwargs = map_tensors(kwargs, lambda a: a.clone())
            self.xin = None if cast is None else self.state.to(cast)
            stream = torch.cuda.Stream(device=x.device)
            with _capture_autocast(x.device.type):
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):  # warm-up outside the capture: the model's
                    self._body()  # own errors surface here, as they would eagerly
                torch.cuda.current_stream(x.device).wait_stream(stream)
                self.graph = _capture(self._body, x.device, stream)

    def _body(self) -> None:
        masked_euler_steps(
            self.velocity,
            self.state,
            self.tau,
            self.h,
            self.k,
            self.steps,
            self.kwargs,
            self.update,
            self.xin,
        )

    def run(self, x: Tensor, tau: Tensor, h: Tensor, k: Tensor, kwargs: Any) -> Tensor:
        with torch.cuda.device(self.state.device):
            self.state.copy_(x)
            self.tau.copy_(tau)
            self.h.copy_(h)
            self.k.copy_(k)
            _copy_tensors(self.kwargs, kwargs)
            if self.xin is not None:
                self.xin.copy_(x)
            self.graph.replay()
            return self.state.clone()


class RolloutEngine:
    """Batched Euler rollout: x^_t1 from (x_t0, t0, k, step).

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
        self._uncapturable: set[tuple] = set()
        self._warned: set[tuple] = set()

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

    def uses_graph(self, x: Tensor) -> bool:
        """Whether a static-plan rollout of state x is captured as a CUDA graph."""
        return self.cuda_graph and x.is_cuda

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
        ``fixed_k=K``: the caller guarantees every k_i lies in {0, ..., K} (not checked:
        that would read k; k_i is taken as min(max(k_i, 0), K)); the masked static plan
        runs K full-batch steps with no host sync. Without it, one host sync (k.tolist()).
        """
        if torch.compiler.is_compiling():  # traced: the torch twin (Inductor fuses its update)
            return euler_rollout(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)
        steps = None if fixed_k is None else check_fixed_k(fixed_k)
        use_native = self.uses_native(x_t0)
        graph = self.uses_graph(x_t0)
        if not (use_native or graph):
            return euler_rollout(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)
        with torch.no_grad():
            dtype = x_t0.dtype
            tau0, h = t0.to(dtype), step.to(dtype)
            # per-sample k: the one host sync, the prefix lengths (read before any move)
            active = None if steps is not None else active_counts(k.tolist())
            k = k.to(device=x_t0.device, dtype=torch.int64)
            if active is not None:
                if not active:
                    return x_t0.clone()
                if not (graph and active[-1] == x_t0.shape[0]):
                    return self._prefix_rollout(
                        velocity, x_t0, tau0, h, k, active, model_kwargs, use_native
                    )
                steps = len(active)  # every k_i equal: a static plan
            if graph and steps > 0:
                out = self._graph_rollout(
                    velocity, x_t0, tau0, h, k, steps, model_kwargs, use_native
                )
                if out is not None:
                    return out
            return self._static_rollout(velocity, x_t0, tau0, h, k, steps, model_kwargs, use_native)

    def _static_rollout(self, velocity, x, tau0, h, k, steps, kwargs, use_native) -> Tensor:
        """The masked static plan, eagerly (native op or torch twin); no host sync."""
        state = x.clone(memory_format=torch.contiguous_format) if use_native else x.clone()
        tau = tau0.clone(memory_format=torch.contiguous_format)  # updated in place
        cast = _cast_dtype(velocity, state) if use_native else None
        xin = None if cast is None else state.to(cast)
        update = _native_masked if use_native else euler_update_masked
        masked_euler_steps(velocity, state, tau, h, k, steps, kwargs, update, xin)
        return state

    def _prefix_rollout(self, velocity, x, tau0, h, k, active, kwargs, use_native) -> Tensor:
        """The sorted plan: model calls on shrinking prefixes (sum k sample-forwards)."""
        batch = x.shape[0]
        plan = torch.ops.reflexflow.rollout_plan if use_native else plan_tensors
        order, _, times, steps = plan(k, tau0, h, len(active))  # kmax given: no host read
        xs = x.index_select(0, order)
        kwargs = index_batch(kwargs, batch, order)
        cast = _cast_dtype(velocity, xs) if use_native else None
        xin = None if cast is None else xs.to(cast)
        update = _native_update if use_native else euler_update
        for j, n in enumerate(active):
            v = call_velocity(
                velocity,
                xs[:n],
                times[j, :n],
                prefix_batch(kwargs, batch, n),
                None if xin is None else xin[:n],
            )
            nxt = None if xin is None or j + 1 == len(active) else xin[:n]
            update(xs[:n], v, steps[:n], nxt)
        out = torch.empty_like(x)
        out.index_copy_(0, order, xs)
        return out

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the references they hold to models)."""
        self._graphs.clear()
        self._uncapturable.clear()

    def _graph_rollout(self, velocity, x, tau0, h, k, steps, kwargs, use_native) -> Tensor | None:
        """Replay (capturing first if new) the graph of this rollout; None when the model
        cannot be captured (then the caller runs the eager plan)."""
        kwargs = map_tensors(kwargs, lambda a: a)  # any mapping as a dict: keyed, copied
        cast = _cast_dtype(velocity, x) if use_native else None
        key = graph_key(velocity, x, steps, cast, use_native, kwargs)
        if key in self._uncapturable:
            return None
        entry = self._graphs.pop(key, None)  # re-inserted last: least recently used first
        if entry is None:
            while len(self._graphs) >= _MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            try:
                entry = _Graph(velocity, x, tau0, h, k, steps, kwargs, use_native, cast)
            except CaptureError as err:
                self._uncapturable.add(key)
                self._warn_uncapturable(velocity, err)
                return None
        self._graphs[key] = entry
        out = entry.run(x, tau0, h, k, kwargs)
        if isinstance(velocity, VelocityModel):  # replays bypass the Python counters
            velocity.calls += entry.steps
            velocity.sample_forwards += entry.steps * x.shape[0]
        return out

    def _warn_uncapturable(self, velocity: VelocityFn, err: CaptureError) -> None:
        model = _model_key(velocity)
        if model in self._warned:
            return
        self._warned.add(model)
        warnings.warn(
            f"reflexflow: the rollout could not be captured as a CUDA graph ({err}); it runs "
            "eagerly for this model. Typical cause: a host-to-device copy or a host sync "
            "inside the model (e.g. .to(t.device) of a CPU tensor in a timestep embedding)",
            RuntimeWarning,
            stacklevel=4,
        )


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
