"""The stages of one loss call (docs/method.md), each a small typed function.

    validate -> context -> draw (:mod:`.draws`) -> rollout_state -> gradient_calls
    -> term_targets (:mod:`.targets`) -> objective_terms -> the output (:mod:`.loss`)

Every stage reads a frozen :class:`StepContext` and the typed results of the stages before
it, and returns its own (a NamedTuple); nothing is mutated along the way. The methods
differ only in their stages' branches: fm and ip call the model once at x_t0 (ip on a
perturbed input), ss calls it at the rolled-out state against the unrectified target, and
all three are the objective with :data:`reflexflow.objective.FLOW_MATCHING`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import reference as ref
from .batching import prepare_kwargs, repeat_batch
from .config import ReflexFlowConfig
from .config_checks import check_batch_tensor, check_generator
from .conventions import VelocityModel
from .draws import Draws, state_dtype
from .engine import RolloutEngine
from .finite import check_stage
from .model_state import ddp_no_sync, is_fsdp1
from .objective import ObjectiveInputs, ObjectiveSpec, ObjectiveTerms
from .paths import PathLike

if TYPE_CHECKING:
    from .targets import Targets

__all__ = [
    "StepContext",
    "RolloutState",
    "GradientCalls",
    "ObjectiveFn",
    "validate",
    "step_context",
    "run_rollout",
    "rollout_state",
    "gradient_calls",
    "select_objective",
    "objective_terms",
]

ObjectiveFn = Callable[[PathLike, ObjectiveSpec, ObjectiveInputs], ObjectiveTerms]


# -- validate and context ---------------------------------------------------------


def _check_data(x1: Any, noise: Any) -> None:
    check_batch_tensor("x1", x1)
    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a tensor or None, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
        if noise.shape != x1.shape:
            raise ValueError(
                f"noise must have x1's shape {tuple(x1.shape)}, got {tuple(noise.shape)}"
            )
        if noise.device != x1.device:
            raise ValueError(f"noise is on {noise.device}, x1 on {x1.device}")


def validate(
    cfg: ReflexFlowConfig,
    model: Any,
    x1: Any,
    noise: Any,
    model_kwargs: Any,
    generator: torch.Generator | None,
    stable_bank: Any,
) -> None:
    """TypeError / ValueError naming the argument unless the call's inputs fit the config;
    with check_finite, ValueError when x1 or noise has NaN or Inf (stage "data")."""
    _check_data(x1, noise)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    check_generator(generator, x1)
    if cfg.target == "stable" and stable_bank is None and (cfg.stable_ref or cfg.stable_gather):
        raise ValueError(
            "stable_ref > 0 or stable_gather=True needs a reference bank across steps: use "
            "ReflexFlowLoss (it keeps one) or pass stable_bank=StableReferenceBank(...)"
        )
    if cfg.memory == "lean" and is_fsdp1(model):
        raise ValueError(
            "memory='lean' does not support FSDP1 (FullyShardedDataParallel): its no_sync "
            "keeps unsharded gradients; use FSDP2 fully_shard, or memory='default'"
        )
    if cfg.check_finite:
        check_stage("data", x1=x1, noise=noise)


@dataclass(frozen=True)
class StepContext:
    """What every stage of one loss call reads; fixed for the call.

    spec: the objective's choices (FLOW_MATCHING for fm, ip, ss and for zero lambdas);
    data: x1 in the state dtype (float64 stays, else float32); velocity: the model as a
    canonical velocity; kwargs: the prepared model_kwargs; defers_adr: memory="lean" with
    an ADR term under grad mode (the ADR call waits for ``out.backward()``, and the FM
    forward skips the DDP gradient sync).
    """

    cfg: ReflexFlowConfig
    spec: ObjectiveSpec
    model: Any
    velocity: VelocityModel
    data: Tensor
    kwargs: Any
    generator: torch.Generator | None
    stable_bank: Any
    engine: RolloutEngine
    defers_adr: bool

    @property
    def path(self) -> PathLike:
        return self.cfg.path

    @property
    def batch(self) -> int:
        return self.data.shape[0]


def step_context(
    cfg: ReflexFlowConfig,
    model: Any,
    x1: Tensor,
    model_kwargs: Mapping[str, Any] | None,
    generator: torch.Generator | None,
    stable_bank: Any,
    engine: RolloutEngine | None = None,
) -> StepContext:
    """The call's context: spec, state-dtype data, velocity model, prepared kwargs."""
    return StepContext(
        cfg=cfg,
        spec=cfg.objective_spec,
        model=model,
        velocity=VelocityModel(
            model,
            cfg.convention,
            input_dtype=x1.dtype,
            timestep_scale=cfg.timestep_scale,
            rollout_modules=cfg.rollout_modules,
        ),
        data=x1.to(state_dtype(x1)),
        kwargs=prepare_kwargs(model_kwargs, x1.shape[0], cfg.unbatched_kwargs),
        generator=generator,
        stable_bank=stable_bank,
        engine=(
            engine
            if engine is not None
            else RolloutEngine(cfg.rollout_backend, cuda_graph=cfg.cuda_graph)
        ),
        defers_adr=(
            cfg.memory == "lean"
            and cfg.method == "reflexflow"
            and cfg.lambda_adr != 0
            and torch.is_grad_enabled()
        ),
    )


def _fm_sync_off(ctx: StepContext) -> contextlib.AbstractContextManager:
    """No DDP gradient sync for the FM forward when lean defers the ADR term."""
    return ddp_no_sync(ctx.model) if ctx.defers_adr else contextlib.nullcontext()


# -- rollout state ----------------------------------------------------------------


class RolloutState(NamedTuple):
    """The states of one step. x_hat: x^_t1 (x_t0 without a rollout; keeps the graph of
    its Euler step with rollout_grad); x_t1: the clean state at t1; v0: v(x_t0, t0) with
    grad when the rollout's first call is shared with the FM term, else None;
    bias_norm: (B,) ||x^_t1 - x_t1||, detached (None without a rollout)."""

    x_t0: Tensor
    x_t1: Tensor
    x_hat: Tensor
    v0: Tensor | None
    bias_norm: Tensor | None


def run_rollout(
    ctx: StepContext, x: Tensor, t: Tensor, k: Tensor, step: Tensor, fixed_k: int | None
) -> Tensor:
    """x after k_i no-grad Euler steps of size step_i from times t: the one call of the
    rollout engine (the loss's :class:`reflexflow.engine.RolloutEngine`), the model in
    rollout_mode."""
    velocity = ctx.velocity.with_mode(ctx.cfg.rollout_mode)
    return ctx.engine(velocity, x, t, k, step, ctx.kwargs, fixed_k=fixed_k)


def _rolled(ctx: StepContext, d: Draws, x_t0: Tensor) -> tuple[Tensor, Tensor | None]:
    """(x^_t1, v0 = v(x_t0, t0) with grad when the first call is shared, else None)."""
    cfg = ctx.cfg
    rolled = ref.bcast(d.k > 0, x_t0).bool()
    if cfg.rollout_grad:  # one Euler step whose output keeps its graph
        v0 = ctx.velocity(x_t0, d.t0, ctx.kwargs)
        return torch.where(rolled, x_t0 + ref.bcast(d.step, x_t0) * v0, x_t0), v0
    if not cfg.shares_first_call:
        return run_rollout(ctx, x_t0, d.t0, d.k, d.step, d.fixed_k), None
    with _fm_sync_off(ctx):
        v0 = ctx.velocity(x_t0, d.t0, ctx.kwargs)
    x_first = torch.where(rolled, x_t0 + ref.bcast(d.step, x_t0) * v0.detach(), x_t0)
    if cfg.max_rollout_steps == 1:
        return x_first, v0
    rest = (d.k - 1).clamp_min(0)
    fixed = None if d.fixed_k is None else d.fixed_k - 1
    return run_rollout(ctx, x_first, d.t0 + d.step, rest, d.step, fixed), v0


def rollout_state(ctx: StepContext, d: Draws) -> RolloutState:
    """x_t0 = a(t0) x1 + s(t0) eps; with a rollout x^_t1 and x_t1, else x^ = x_t1 = x_t0."""
    x_t0 = ref.interpolate(ctx.path, ctx.data, d.eps, d.t0)
    if not ctx.cfg.rolls_out:  # k = 0 and t1 = t0 for every sample
        return RolloutState(x_t0, x_t0, x_t0, None, None)
    if ctx.cfg.biased_input == "renoise":  # takenoko: on the path at t1, no model call
        x_t1 = ref.interpolate(ctx.path, ctx.data, d.eps, d.t1)
        return RolloutState(x_t0, x_t1, x_t1, None, torch.zeros_like(d.t1))
    x_hat, v0 = _rolled(ctx, d, x_t0)
    x_t1 = ref.interpolate(ctx.path, ctx.data, d.eps, d.t1)
    bias_norm = (x_hat - x_t1).detach().flatten(1).norm(dim=1)
    if ctx.cfg.check_finite:
        check_stage("rollout state", x_hat=x_hat)
    return RolloutState(x_t0, x_t1, x_hat, v0, bias_norm)


# -- gradient-carrying calls --------------------------------------------------------


class GradientCalls(NamedTuple):
    """The gradient-carrying model outputs of one step.

    v0: the FM-type term's output (v(x_t0, t0); ip: at the perturbed input; ss and
    fm_input "biased": v(x^_t1, t1)); v1: v(x^_t1, t1) for the ADR term (None without
    one, or deferred); v_joint: both as one (2B, ...) output (joint_forward); deferred:
    memory="lean" makes the ADR call inside ``out.backward()``.
    """

    v0: Tensor | None = None
    v1: Tensor | None = None
    v_joint: Tensor | None = None
    deferred: bool = False

    def biased_output(self, batch: int) -> Tensor | None:
        """v(x^_t1, t1) when a gradient call already computed it (detached), else None."""
        if self.v1 is not None:
            return self.v1.detach()
        return None if self.v_joint is None else self.v_joint[batch:].detach()


def _perturbed(ctx: StepContext, d: Draws, x_t0: Tensor) -> Tensor:
    """ip's model input x_t0 + ip_gamma s(t0) xi, xi ~ N(0, I)."""
    data = ctx.data
    xi = torch.randn(data.shape, device=data.device, generator=ctx.generator, dtype=data.dtype)
    return x_t0 + ctx.cfg.ip_gamma * ref.bcast(ctx.path.s(d.t0), data) * xi


def _calls(ctx: StepContext, d: Draws, state: RolloutState) -> GradientCalls:
    cfg, velocity, kwargs = ctx.cfg, ctx.velocity, ctx.kwargs
    if not cfg.rolls_out:  # fm, ip, or zero lambdas: one call at x_t0
        x_in = _perturbed(ctx, d, state.x_t0) if cfg.method == "ip" else state.x_t0
        return GradientCalls(v0=velocity(x_in, d.t0, kwargs))
    if cfg.method == "ss" or cfg.fm_input == "biased":  # one call at the biased input
        v = velocity(state.x_hat, biased_label(cfg, d), kwargs)
        return GradientCalls(v0=v) if cfg.method == "ss" else GradientCalls(v0=v, v1=v)
    if cfg.joint_call:
        x = torch.cat([state.x_t0, state.x_hat])
        v = velocity(x, torch.cat([d.t0, d.t1]), repeat_batch(kwargs, ctx.batch, 2))
        return GradientCalls(v_joint=v)
    v0 = state.v0
    if v0 is None:
        with _fm_sync_off(ctx):
            v0 = velocity(state.x_t0, d.t0, kwargs)
    if cfg.lambda_adr == 0:
        return GradientCalls(v0=v0)
    if ctx.defers_adr:
        return GradientCalls(v0=v0, deferred=True)
    return GradientCalls(v0=v0, v1=velocity(state.x_hat, d.t1, kwargs))


def biased_label(cfg: ReflexFlowConfig, d: Draws) -> Tensor:
    """The time the model is told at the biased input x^: t1, or t0 with biased_input
    "renoise" (takenoko keeps the original label: its exposure is the label mismatch)."""
    return d.t0 if cfg.biased_input == "renoise" else d.t1


def gradient_calls(ctx: StepContext, d: Draws, state: RolloutState) -> GradientCalls:
    """The FM and ADR terms' model calls: one call (fm, ip, ss, fm_input "biased"), the
    shared or a separate FM call and the ADR call, or one joint 2B call."""
    calls = _calls(ctx, d, state)
    if ctx.cfg.check_finite:
        check_stage("model outputs", v0=calls.v0, v1=calls.v1, v_joint=calls.v_joint)
    return calls


# -- objective ----------------------------------------------------------------------


def select_objective(
    backend: str, path: PathLike, spec: ObjectiveSpec, inputs: ObjectiveInputs
) -> ObjectiveFn:
    """reference.objective, or its Triton twin (docs/method.md section 5).

    "torch": the reference. "triton": the kernels (CUDA, or CPU under
    TRITON_INTERPRET=1; ValueError where Triton cannot run), the reference for a call
    ``kernels.supports`` refuses (float64, inputs that need a gradient). "auto": the
    kernels for CUDA data when triton imports and supports the call (they fall back to
    the reference, one warning, if they fail to compile or launch), else the reference.
    A spec with an option the kernels do not implement (``spec.reference_only``: the
    peers' FC forms, adr_target_grad) runs on the reference under every backend.
    """
    if backend == "torch" or spec.reference_only:
        return ref.objective
    from . import kernels

    device = inputs.x1.device.type
    if backend == "triton":
        if not kernels.triton_usable(device):
            raise ValueError(
                f"backend='triton' cannot run on {device} tensors here: it needs the "
                "triton package and a CUDA device (or TRITON_INTERPRET=1 set before "
                "triton is imported, for Triton's CPU interpreter)"
            )
        return kernels.fused_objective if kernels.supports(path, spec, inputs) else ref.objective
    if device == "cuda" and kernels.triton_available() and kernels.supports(path, spec, inputs):
        return functools.partial(kernels.fused_objective, fail_soft=True)
    return ref.objective


def objective_terms(
    ctx: StepContext, d: Draws, state: RolloutState, calls: GradientCalls, targets: Targets
) -> ObjectiveTerms:
    """The objective on this step's calls and targets.

    The model may run under torch.autocast; the loss's own math does not (the FC
    filter's conv would run in bf16/fp16): w, v_adr and the loss stay in the state dtype.
    A deferred ADR term (memory="lean") leaves the FM half: the objective without v1.
    """
    adr = not calls.deferred
    inputs = ObjectiveInputs(
        x1=ctx.data,
        eps=d.eps,
        # the target keeps x^'s graph only when it carries gradient (Arioso)
        x_hat=state.x_hat if ctx.spec.adr_target_grad else state.x_hat.detach(),
        t0=targets.fm_time,
        t1=d.t1,
        k=d.k,
        v0=calls.v0,
        v1=calls.v1,
        v_joint=calls.v_joint,
        fc_active=targets.fc_active,
        fc_delta=targets.fc_delta,
        fm_weight=targets.fm_weight,
        adr_weight=targets.adr_weight if adr else None,
        u0=targets.u0,
        v_adr=targets.v_adr if adr else None,
    )
    with torch.autocast(ctx.data.device.type, enabled=False):
        objective = select_objective(ctx.cfg.backend, ctx.path, ctx.spec, inputs)
        return objective(ctx.path, ctx.spec, inputs)
