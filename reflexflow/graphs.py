"""CUDA-graph capture of the rollout's masked static plan, and the cache of captured graphs.

A static-plan rollout (``fixed_k=K``, or per-sample k that are all equal) on CUDA is
captured once per graph key (:func:`graph_key`) as a CUDA graph of K model calls and
masked updates, k an input buffer (one graph serves every k in {0..K}), and replayed: x,
t0, step, k and the tensors of model_kwargs are copied into its static buffers first.
:class:`GraphCache` keeps up to :data:`MAX_GRAPHS` graphs, least recently used dropped
first; a model that cannot be captured makes :class:`CaptureError`, after which the key
is remembered as not capturable, one RuntimeWarning per model is issued and the caller
runs the plan eagerly. The cache belongs to one :class:`reflexflow.engine.RolloutEngine`
(a :class:`reflexflow.ReflexFlowLoss` owns its engine): its graphs, and the models they
keep alive, go with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .batching import Unbatched, attributes, map_tensors
from .conventions import VelocityModel
from .model_state import modules_of
from .reference import VelocityFn
from .rollout import RolloutJob, input_cast, masked_euler_steps

__all__ = ["GraphCache", "CapturedRollout", "CaptureError", "graph_key", "MAX_GRAPHS"]

MAX_GRAPHS = 8
# failed keys remembered (a key made anew every step, e.g. an unbatched tensor rebuilt
# each step, would otherwise grow the set without bound)
UNCAPTURABLE_KEYS = 64
# Graphs whose capture failed after the caching allocator began routing to their pool:
# the allocator's routing filter refers to the graph object, so it must outlive the process.
_ABANDONED: list = []


class CaptureError(RuntimeError):
    """The CUDA-graph capture of a rollout failed (the model is not capturable)."""


def _signature(obj: Any, in_place: bool = False) -> Any:
    """Hashable description of model_kwargs: tensor shapes/dtypes (their values are
    copied into the graph's buffers at replay), other values' repr. Inside
    :class:`Unbatched` (read by the graph in place, never copied) and inside any other
    object, a tensor is also keyed by its storage address, so another tensor means
    another capture."""
    if isinstance(obj, Tensor):
        where = (_storage_ptr(obj),) if in_place else ()
        return ("T", tuple(obj.shape), obj.dtype, str(obj.device), *where)
    if isinstance(obj, dict):
        return ("D", tuple((key, _signature(val, in_place)) for key, val in obj.items()))
    if isinstance(obj, (list, tuple)):
        return ("L", type(obj), tuple(_signature(val, in_place) for val in obj))
    if isinstance(obj, Unbatched):
        return ("U", _signature(obj.value, True))
    attrs = attributes(obj)
    if not any(isinstance(val, Tensor) for val in attrs.values()):
        return ("V", repr(obj))  # functions, modules, ...: repr holds their address
    # an object holding tensors (a dataclass, ...): its tensors by address, the rest by repr
    return (
        "O",
        type(obj),
        tuple(
            (key, _signature(val, True) if isinstance(val, Tensor) else repr(val))
            for key, val in attrs.items()
        ),
    )


def _copy_tensors(dst: Any, src: Any) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for key in dst:
            _copy_tensors(dst[key], src[key])
    elif isinstance(dst, (list, tuple)):
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
    """The nn.Modules a velocity function runs (a VelocityModel's through its model, plus
    its rollout_modules): see :func:`reflexflow.model_state.modules_of`."""
    if not isinstance(velocity, VelocityModel):
        return modules_of(velocity)
    extra = [m for m in velocity.rollout_modules if isinstance(m, nn.Module)]
    return [*modules_of(velocity.model), *extra]


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
    ops_name: str,
    model_kwargs: Any,
) -> tuple:
    """What a captured rollout graph depends on; a change of any part means a new capture.

    The velocity's identity (model, convention, timestep scale, input dtype), the state's
    shape, dtype and device, the step count, the ops ("native" or "torch") and the model
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
        ops_name,
        _signature(model_kwargs),
        _model_state(velocity),
        _autocast_state(x.device.type),
    )


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


class CapturedRollout:
    """One captured static-plan rollout: input buffers and the CUDA graph that updates them.

    Captured for ``steps`` masked Euler steps of (state, tau) on ``ops``, k an input
    buffer; ``cast``: the model input dtype a fused update writes (None: none). The
    warm-up and the capture run under the caller's autocast with its cache off, on a side
    stream, under a device guard for x's device.
    """

    def __init__(self, job: RolloutJob, steps: int, cast: torch.dtype | None) -> None:
        x = job.x
        self.source = job.velocity  # kept alive, so its id in the cache key is never reused
        self.steps = steps
        with torch.cuda.device(x.device):
            # contiguous buffers whatever x's layout (channels_last, permuted): the fused
            # update requires them
            self.buffers = RolloutJob(
                job.ops,
                copy.copy(job.velocity),  # its call counters are not the caller's
                x.clone(memory_format=torch.contiguous_format),
                job.tau0.clone(memory_format=torch.contiguous_format),
                job.h.clone(memory_format=torch.contiguous_format),
                job.k.clone(memory_format=torch.contiguous_format),
                map_tensors(job.kwargs, lambda a: a.clone()),
            )
            self.xin = None if cast is None else self.buffers.x.to(cast)
            stream = torch.cuda.Stream(device=x.device)
            with _capture_autocast(x.device.type):
                stream.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(stream):  # warm-up outside the capture: the model's
                    self._body()  # own errors surface here, as they would eagerly
                torch.cuda.current_stream(x.device).wait_stream(stream)
                self.graph = _capture(self._body, x.device, stream)

    def _body(self) -> None:
        masked_euler_steps(self.buffers, self.steps, self.xin)

    def run(self, job: RolloutJob) -> Tensor:
        """Copy the job's inputs into the buffers, replay, return a copy of the final state."""
        buf = self.buffers
        with torch.cuda.device(buf.x.device):
            buf.x.copy_(job.x)
            buf.tau0.copy_(job.tau0)
            buf.h.copy_(job.h)
            buf.k.copy_(job.k)
            _copy_tensors(buf.kwargs, job.kwargs)
            if self.xin is not None:
                self.xin.copy_(job.x)
            self.graph.replay()
            return buf.x.clone()


class GraphCache:
    """The captured rollouts of one engine, by :func:`graph_key`: at most ``capacity``,
    least recently used dropped first; keys whose capture failed are remembered (and run
    eagerly), with one RuntimeWarning per model."""

    def __init__(self, capacity: int = MAX_GRAPHS) -> None:
        self.capacity = capacity
        self.graphs: dict[tuple, CapturedRollout] = {}  # in order of use, oldest first
        # key -> the velocity that failed: held, so that its id (part of the key) cannot be
        # reused by a new model, which would then run eagerly without a try
        self.uncapturable: dict[tuple, Any] = {}
        self._warned: set[tuple] = set()

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self) -> None:
        """Drop the captured graphs (and the references they hold to models)."""
        self.graphs.clear()
        self.uncapturable.clear()

    def run(self, job: RolloutJob, steps: int) -> Tensor | None:
        """x^_t1 by replaying (capturing first if new) the graph of this static plan;
        None when the model cannot be captured (then the caller runs the plan eagerly)."""
        # any mapping as a dict: keyed, copied
        job = dataclasses.replace(job, kwargs=map_tensors(job.kwargs, lambda a: a))
        velocity, x = job.velocity, job.x
        cast = input_cast(velocity, x) if job.ops.fused else None
        key = graph_key(velocity, x, steps, cast, job.ops.name, job.kwargs)
        if key in self.uncapturable:
            return None
        entry = self.graphs.pop(key, None)  # re-inserted last: least recently used first
        if entry is None:
            while len(self.graphs) >= self.capacity:
                self.graphs.pop(next(iter(self.graphs)))
            try:
                entry = CapturedRollout(job, steps, cast)
            except CaptureError as err:
                self.uncapturable[key] = velocity
                while len(self.uncapturable) > UNCAPTURABLE_KEYS:  # oldest first
                    self.uncapturable.pop(next(iter(self.uncapturable)))
                self._warn_uncapturable(velocity, err)
                return None
        self.graphs[key] = entry
        out = entry.run(job)
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
            stacklevel=5,
        )
