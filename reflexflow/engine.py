"""RolloutEngine: the batched scheduled-sampling rollout behind ReflexFlowLoss.

x^_i = x_t0[i] after k_i Euler steps x += step_i * v(x, tau), tau += step_i, k_i = 0
allowed, in one batched pass (the plans: :mod:`reflexflow.rollout`). The engine picks
the ops and owns the CUDA graphs:

* backend (the loss's ``rollout_backend``): "native" runs the C++/CUDA ops
  (:data:`reflexflow.native.NATIVE_OPS`: ``rollout_plan``; ``euler_update_`` and
  ``euler_update_masked_``, which also write the next model input already cast to the
  model's dtype) and raises ValueError where the extension has no kernel for the device;
  "torch" the PyTorch twins (:data:`reflexflow.rollout.TORCH_OPS`); "auto" native where
  the extension loaded with a kernel for the device, else torch. Both give bit-identical
  results. A state that is not float32/float64 runs on the twins. Under torch.compile the
  engine traces the twins (no extension lookups in the graph).
* ``cuda_graph=True`` on CUDA: a rollout whose plan is static (``fixed_k``, or every k_i
  equal) is captured once per graph key as a CUDA graph, k an input buffer, and
  replayed; a model that cannot be captured runs eagerly (one RuntimeWarning)
  (:mod:`reflexflow.graphs`). The graphs live in the engine: a
  :class:`reflexflow.ReflexFlowLoss` owns its engine, so deleting the loss frees them.

Oracle: :func:`reflexflow.reference.euler_rollout_per_sample`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import native
from .graphs import GraphCache
from .reference import VelocityFn
from .rollout import TORCH_OPS, RolloutOps, euler_rollout

__all__ = ["RolloutEngine", "ROLLOUT_BACKENDS"]

ROLLOUT_BACKENDS = ("auto", "native", "torch")


class RolloutEngine:
    """Batched Euler rollout: x^_t1 from (x_t0, t0, k, step).

    x^_i = x_t0[i] after k_i steps x += step_i * v(x, tau), tau += step_i (per-sample
    loop twin: :func:`reflexflow.reference.euler_rollout_per_sample`). ``backend``: one
    of :data:`ROLLOUT_BACKENDS` (the ops); ``cuda_graph``: capture static plans on CUDA.
    """

    def __init__(self, backend: str = "auto", *, cuda_graph: bool = False) -> None:
        if backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"backend must be one of {ROLLOUT_BACKENDS}, got {backend!r}")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {cuda_graph!r}")
        self.backend = backend
        self.cuda_graph = cuda_graph
        self.graphs = GraphCache()

    def ops_for(self, x: Tensor) -> RolloutOps:
        """The ops a rollout of state x runs on (native or the PyTorch twins)."""
        if self.backend == "torch" or x.dtype not in (torch.float32, torch.float64):
            return TORCH_OPS
        if native.has_kernel(x.device):
            return native.NATIVE_OPS
        if self.backend == "native":
            reason = native.extension_status()["reason"] or "extension built without it"
            raise ValueError(
                f"rollout_backend='native' needs the reflexflow C++ extension with a "
                f"{x.device.type} kernel, which is unavailable here ({reason}); use "
                "rollout_backend='auto' or 'torch'"
            )
        return TORCH_OPS

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
        if torch.compiler.is_compiling():  # traced: the twins (Inductor fuses their update)
            return euler_rollout(velocity, x_t0, t0, k, step, model_kwargs, fixed_k=fixed_k)
        return euler_rollout(
            velocity,
            x_t0,
            t0,
            k,
            step,
            model_kwargs,
            fixed_k=fixed_k,
            ops=self.ops_for(x_t0),
            graphs=self.graphs if self.uses_graph(x_t0) else None,
        )

    def clear_graphs(self) -> None:
        """Drop the captured CUDA graphs (and the references they hold to models)."""
        self.graphs.clear()

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the captured graphs (a copy captures its own)."""
        state = dict(self.__dict__)
        state["graphs"] = GraphCache(self.graphs.capacity)
        return state
