"""Validated configuration of the ReflexFlow loss: every knob, its default and its source.

Knobs that define what is trained come from a named preset (:mod:`reflexflow.presets`;
default "defar") unless given; the rest have fixed defaults. Every knob is declared with
:func:`knob` (its default, what it does and where the default comes from); docs/knobs.md
is generated from those declarations (``python -m tools.knobs``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import check_bool, check_choice, check_number
from .config_checks import check_rollout_modules, check_user_objects, warn_ignored_knobs
from .conventions import check_convention
from .engine import ROLLOUT_BACKENDS
from .objective import (
    ADR_LOSSES,
    FC_CHANNEL_REDUCE,
    FC_FILTERS,
    FC_FORMS,
    FC_NORMALIZE,
    FLOW_MATCHING,
    ObjectiveSpec,
)
from .paths import get_path
from .presets import DEFAULT_PRESET, PRESET_FIELDS, PRESETS, preset_knobs
from .reference import NORM_EPS, NORM_FLOOR
from .time_sampling import get_time_sampler
from .weighting import check_loss_weighting

__all__ = ["ReflexFlowConfig", "METHODS", "BACKENDS", "ROLLOUT_BACKENDS", "FROM_PRESET"]

METHODS = ("reflexflow", "fm", "ip", "ss")
BACKENDS = ("auto", "torch", "triton")
K_MINS = (0, 1)
# knob -> the values it may take (checked in this order; the objective's own choices are
# defined once, in reflexflow.objective)
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "k_draw": ("fixed", "uniform"),
    "time_draw": ("start", "end"),
    "step_schedule": ("grid", "single"),
    "fm_input": ("clean", "biased"),
    "adr_loss": ADR_LOSSES,
    "fc_filter": FC_FILTERS,
    "fc_source": ("state", "velocity"),
    "fc_form": FC_FORMS,
    "target": ("conditional", "stable"),
    "fc_normalize": FC_NORMALIZE,
    "fc_channel_reduce": FC_CHANNEL_REDUCE,
    "biased_input": ("rollout", "renoise"),
    "rollout_mode": ("eval", "train"),
    "memory": ("default", "lean"),
    "backend": BACKENDS,
    "rollout_backend": ROLLOUT_BACKENDS,
}


def knob(default: Any, doc: str, source: str = "") -> Any:
    """A knob of :class:`ReflexFlowConfig`: ``dataclasses.field(default=default)`` with
    ``metadata={"doc": doc, "source": source}`` (docs/knobs.md is generated from these by
    tools/knobs.py). ``source``: where the default comes from ("" for a preset knob, whose
    values come with their sources from :mod:`reflexflow.presets`, or when nothing needs
    saying)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "source": source})


# Default of a knob that the preset sets (see :data:`reflexflow.presets.PRESETS`): the
# Ellipsis, a constant torch.compile traces through when a config is built in a graph.
FROM_PRESET: Any = ...


def _refuse_first(*rules: tuple[Any, str]) -> None:
    """ValueError(message) for the first (broken, message) rule that is broken, in order."""
    for broken, message in rules:
        if broken:
            raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class ReflexFlowConfig:
    """All knobs of the loss (docs/method.md), validated on construction.

    The knobs listed in :data:`reflexflow.presets.PRESET_FIELDS` default to the values
    of ``preset`` (default "defar"); a knob given explicitly overrides its preset value.
    ``explicit`` records which preset knobs were given. The forward mode is resolved into
    ``shares_first_call`` and ``joint_call`` (see ``_resolve_forward_mode``), the time
    sampler into ``sampler``. Copy a config with :meth:`replace` (``dataclasses.replace``
    would keep the old preset's values of the knobs that follow the preset).
    """

    # Each knob: knob(default, doc, source) (docs/knobs.md is generated from these; see
    # tools/knobs.py). A preset knob's default is FROM_PRESET: its value comes from the preset.
    preset: str = knob(
        DEFAULT_PRESET, "the reading whose values the *preset* knobs take (docs/method.md)"
    )
    method: str = knob(
        FROM_PRESET,
        '`"reflexflow"`; also `"fm"` (plain flow matching), `"ip"` (input perturbation), '
        '`"ss"` (scheduled sampling, unrectified target u_t1)',
    )
    path: Any = knob(
        "linear",
        'rectified flow / CondOT; `"gvp"`, `"vp"` (SiT, beta 0.1 to 20), or an object with '
        "`a, s, da, ds`",
        "the papers (linear path)",
    )
    convention: str = knob(
        "data_at_1", '`"noise_at_1"` for diffusers (sigma = 1 - t)', "SiT, the papers"
    )
    timestep_scale: float = knob(1.0, "the model sees t (or sigma) times this (1000 for SD3)")
    rollout_steps: int = knob(FROM_PRESET, "K: the longest rollout (k <= K Euler steps)")
    num_sampling_steps: int = knob(
        FROM_PRESET, "N, the inference steps: the rollout's Euler step is h = 1/N"
    )
    k_draw: str = knob(
        FROM_PRESET,
        '`"uniform"`: k ~ U{1..K} per sample; `"fixed"`: k = K (static shapes, no host sync)',
    )
    k_min: int = knob(
        FROM_PRESET,
        "k ~ U{k_min..K}: 1, or 0 as SimpleTuner (some samples are not rolled out)",
    )
    time_draw: str = knob(
        FROM_PRESET,
        '`"start"`: t0 is drawn; `"end"`: the rollout\'s end t1 is drawn on the 1/N grid '
        "(SimpleTuner; grid schedule only)",
    )
    step_schedule: str = knob(
        FROM_PRESET,
        '`"grid"`: k steps of h; `"single"`: one step t0 -> t0 + (1 - t_eps - t0) U',
    )
    ss_prob: float = knob(
        FROM_PRESET,
        "fraction of samples rolled out; the rest get k = 0 (w = 1, v_adr = u_t1)",
    )
    t_eps: float = knob(1e-3, "rolled-out samples keep t1 <= 1 - t_eps, so s(t1) > 0", "ours")
    time_sampler: Any = knob(
        FROM_PRESET,
        '`"uniform"`, `"logit_normal"` (SD3) or a callable; draws u in [0, 1] (your '
        "convention, unless the sampler has a `convention` attribute), scaled to "
        "t0 = u (1 - t_eps - k h)",
    )
    logit_mean: float = knob(0.0, 'mean of `"logit_normal"` time sampling', "SD3")
    logit_std: float = knob(1.0, 'std of `"logit_normal"` time sampling', "SD3")
    fm_input: str = knob(
        FROM_PRESET,
        '`"clean"`: FM at v(x_t0, t0); `"biased"`: the FM term is v(x^_t1, t1) against '
        "u_t1, the same call as ADR (SimpleTuner)",
    )
    adr_loss: str = knob(
        FROM_PRESET,
        '`"mse"` (DEFAR) or `"direction"` (per sample ||v/|v| - v_adr/|v_adr|||^2)',
    )
    lambda_adr: float = knob(FROM_PRESET, "weight of the ADR term")
    lambda_fc: float = knob(FROM_PRESET, "strength of FC: per-sample mean weight 1 + lambda_fc")
    fc_filter: str = knob(
        FROM_PRESET,
        '`"gaussian"` (`fc_sigma`), `"box"` (`fc_size`), `"fft"` ideal low-pass '
        '(`fc_cutoff`), `"none"`',
    )
    fc_sigma: float = knob(FROM_PRESET, "gaussian low-pass sigma in pixels (truncated at 3 sigma)")
    fc_size: int = knob(5, 'box filter size (odd) for `fc_filter="box"`', "ours")
    fc_cutoff: float = knob(
        0.25, 'ideal low-pass cutoff, share of Nyquist, for `fc_filter="fft"`', "ours"
    )
    fc_per_channel: bool = knob(FROM_PRESET, "one FC map per channel instead of the channel mean")
    fc_signed: bool = knob(
        FROM_PRESET, "signed element-wise map normalised by mean |m| (SimpleTuner)"
    )
    fc_form: str = knob(FROM_PRESET, '`"weight"`: w r^2; `"squared"`: (w r)^2')
    fc_normalize: str = knob(
        FROM_PRESET,
        '`"mean"`: w = 1 + lambda_fc m / mean(m); `"sum"`: m / max(sum m, 1e-6) (SimpleTuner, '
        "takenoko: w - 1 of size 1/N, a near no-op on large latents)",
    )
    fc_channel_reduce: str = knob(
        FROM_PRESET,
        '`"mean_abs"`: unsigned map m = mean_c |delta|; `"l2"`: max(||delta||_channels, 1e-6) '
        "(takenoko)",
    )
    fc_adds_fm: bool = knob(
        FROM_PRESET,
        "`True`: the FC term is plain FM plus the FC-weighted FM on top (takenoko: the FM "
        "error counts twice)",
    )
    fc_t_max: float | None = knob(
        FROM_PRESET, "a float applies FC only where canonical t0 < fc_t_max (high noise)"
    )
    fc_source: str = knob(
        FROM_PRESET,
        '`"state"`: delta = x^_t1 - x_t1; `"velocity"`: v(x^_t1, t1) - v(x_t1, t1) (one '
        "extra no-grad forward; two when the model has dropout or batch norm in training "
        'mode and `rollout_mode="eval"`)',
    )
    target: str = knob(
        FROM_PRESET,
        '`"conditional"`; `"stable"`: posterior-weighted targets over the batch '
        "(docs/stable-targets.md), beyond the papers",
    )
    stable_ref: int = knob(
        0, 'extra reference samples kept from recent batches (`target="stable"`)', "ours"
    )
    stable_gather: bool = knob(
        False, "all-gather the batch across ranks for the stable reference set", "ours"
    )
    loss_weighting: Any = knob(
        None,
        'per-sample weight of the FM term: `"none"`, `"sigma_sqrt"`, `"cosmap"` (SD3/Flux '
        "scripts' schemes, functions of sigma = 1 - t) or a callable of t in your convention "
        "(in its own, if it has a `convention` attribute)",
        "diffusers' training scripts",
    )
    weight_adr: bool = knob(False, "also weight the ADR term (at t1) by `loss_weighting`", "ours")
    norm_eps: float = knob(
        FROM_PRESET,
        f"absolute lower bound of the norms in the direction loss ({NORM_EPS:g}; Arioso 1e-8)",
    )
    norm_floor: float = knob(
        FROM_PRESET,
        "the direction loss also bounds |v1| below by `norm_floor * |v_adr|`, "
        "so a zero-initialised output layer (SiT, DiT) does not get ~1/norm_eps gradients; "
        f"0 turns it off ({NORM_FLOOR:g} in ours: 0.01 left the demo's direction-ADR rows "
        "unchanged, 0.1 made them worse, docs/demo.md; the peers have none)",
    )
    adr_target_grad: bool = knob(
        FROM_PRESET,
        "`True`: the ADR target v_adr is not detached, so the ADR gradient also flows "
        "through x^_t1 into v(x_t0, t0) (Arioso; needs `rollout_grad`)",
    )
    adr_x1_from: float | None = knob(
        FROM_PRESET,
        "near-t = 1 remedy of the mse ADR term: rows with t1 > t_c are weighted "
        "min(1, (c(t1)/c(t_c))^2), c = s / (a' s - a s') (the data-space error; linear: "
        "c = 1 - t), so the per-sample loss stays bounded as t1 -> 1; None: off",
    )
    biased_input: str = knob(
        FROM_PRESET,
        '`"rollout"`: x^_t1 by the model\'s own Euler rollout; `"renoise"` (takenoko): '
        "x^ = x_t1 on the path at an independent t1 (no rollout), the model called at "
        "(x^, t0) with the original label",
    )
    renoise_shift: float = knob(
        0.6, '`biased_input="renoise"`: shift of the noise-ward re-noise time', "takenoko"
    )
    renoise_range: tuple[float, float] = knob(
        (0.05, 0.95), '`biased_input="renoise"`: clamp of the noise-ward re-noise time', "takenoko"
    )
    rollout_grad: bool = knob(
        FROM_PRESET,
        "`True` lets the ADR gradient flow through the one Euler step into v(x_t0, t0) (Arioso)",
    )
    rollout_mode: str = knob(
        "eval",
        "the no-grad calls (rollout, velocity-space bias) simulate inference: eval mode (no "
        "dropout; BatchNorm uses its running statistics), each submodule's flag restored "
        'after; `"train"` runs them as they are',
        "ours (inference has no dropout)",
    )
    rollout_modules: tuple = knob(
        (),
        "modules the model callable runs that the loss cannot find (held in a dict or another "
        'container): switched to eval mode with it for the no-grad calls (`rollout_mode="eval"`)',
        "ours",
    )
    share_first_call: bool | None = knob(
        None,
        "auto: the FM term's call v(x_t0, t0) is also the rollout's first step, computed "
        "once with grad, wherever exact (no rollout_grad, fm_input clean)",
        "ours",
    )
    joint_forward: bool | None = knob(
        None,
        "`True`: v(x_t0, t0) and v(x^_t1, t1) as one 2B call after a full no-grad rollout "
        "(no sharing; BatchNorm statistics then mix both halves)",
        "ours (off)",
    )
    memory: str = knob(
        "default",
        '`"lean"`: the FM backward runs (and frees its graph) before the ADR forward, so the '
        "step's peak activation memory is FM's; call `out.backward()`",
        "ours",
    )
    unbatched_kwargs: tuple[str, ...] = knob(
        (),
        "top-level `model_kwargs` keys that are not batch-shaped (Flux's `img_ids`); every "
        "other tensor must have first axis B",
    )
    ip_gamma: float = knob(0.1, 'input perturbation strength (`method="ip"`)', "Ning et al. 2023")
    backend: str = knob(
        "auto",
        "Triton kernels for CUDA data when triton imports, else the reference; "
        '`"triton"` forces the kernels, `"torch"` the reference',
    )
    rollout_backend: str = knob(
        "auto",
        'the rollout\'s ops: `"auto"` the C++/CUDA extension when it loaded, else PyTorch; '
        '`"native"` requires the extension; `"torch"` the PyTorch twins',
    )
    cuda_graph: bool = knob(False, "capture fixed-k rollouts on CUDA as CUDA graphs")
    check_finite: bool = knob(False, "opt-in NaN/Inf checks (a host sync)")
    # resolved on construction (not arguments): the preset knobs given explicitly, and
    # the forward mode (see _resolve_forward_mode)
    explicit: frozenset = dataclasses.field(init=False, compare=False, repr=False)
    shares_first_call: bool = dataclasses.field(init=False, compare=False, repr=False)
    joint_call: bool = dataclasses.field(init=False, compare=False, repr=False)
    # the time sampler built from time_sampler, logit_mean and logit_std
    sampler: Any = dataclasses.field(init=False, compare=False, repr=False)
    # the objective's choices (reflexflow.objective.ObjectiveSpec), built and validated once
    objective_spec: ObjectiveSpec = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        given = {f for f in PRESET_FIELDS if getattr(self, f) is not FROM_PRESET}
        for name, value in preset_knobs(self.preset).items():
            if name not in given:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "explicit", frozenset(given))
        self._validate_knobs()
        self._resolve_forward_mode()
        reads_spec = self.method == "reflexflow" and self.rolls_out
        spec = ObjectiveSpec.from_config(self) if reads_spec else FLOW_MATCHING
        object.__setattr__(self, "objective_spec", spec)

    def _validate_knobs(self) -> None:
        for name, choices in CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        object.__setattr__(self, "path", get_path(self.path))
        check_convention(self.convention)
        check_number("timestep_scale", self.timestep_scale, low=0, low_open=True)
        check_number("rollout_steps", self.rollout_steps, low=1, integer=True)
        check_number("num_sampling_steps", self.num_sampling_steps, low=1, integer=True)
        if isinstance(self.k_min, bool) or self.k_min not in K_MINS:
            raise ValueError(f"k_min must be one of {K_MINS}, got {self.k_min!r}")
        check_number("ss_prob", self.ss_prob, low=0, high=1)
        check_number("t_eps", self.t_eps, low=0, high=0.5, low_open=True)
        check_number("logit_mean", self.logit_mean)
        check_number("logit_std", self.logit_std, low=0, low_open=True)
        object.__setattr__(
            self,
            "sampler",
            get_time_sampler(
                self.time_sampler, logit_mean=self.logit_mean, logit_std=self.logit_std
            ),
        )
        check_number("lambda_adr", self.lambda_adr, low=0)
        check_number("lambda_fc", self.lambda_fc, low=0)
        check_number("fc_sigma", self.fc_sigma, low=0)
        check_number("fc_size", self.fc_size, low=1, integer=True)
        if self.fc_size % 2 == 0:
            raise ValueError(f"fc_size must be odd, got {self.fc_size}")
        check_number("fc_cutoff", self.fc_cutoff, low=0, high=1, low_open=True)
        if self.fc_t_max is not None:
            check_number("fc_t_max", self.fc_t_max, low=0, high=1)
        check_number("stable_ref", self.stable_ref, low=0, integer=True)
        object.__setattr__(self, "loss_weighting", check_loss_weighting(self.loss_weighting))
        check_number("norm_eps", self.norm_eps, low=0, low_open=True)
        check_number("norm_floor", self.norm_floor, low=0, high=1)
        if self.adr_x1_from is not None:
            check_number("adr_x1_from", self.adr_x1_from, low=0, high=1, low_open=True)
            if self.adr_x1_from >= 1:
                raise ValueError(f"adr_x1_from must be < 1 (a time t_c), got {self.adr_x1_from}")
        self._validate_renoise()
        check_number("ip_gamma", self.ip_gamma, low=0)
        for name in (
            "fc_per_channel",
            "fc_signed",
            "rollout_grad",
            "check_finite",
            "cuda_graph",
            "stable_gather",
            "weight_adr",
            "fc_adds_fm",
            "adr_target_grad",
        ):
            check_bool(name, getattr(self, name))
        for name in ("joint_forward", "share_first_call"):
            check_bool(name, getattr(self, name), optional=True)
        keys = self.unbatched_kwargs
        if isinstance(keys, str) or not isinstance(keys, (tuple, list)):
            raise TypeError(f"unbatched_kwargs must be a tuple of keys, got {keys!r}")
        if not all(isinstance(key, str) for key in keys):
            raise TypeError(f"unbatched_kwargs must hold strings (model_kwargs keys), got {keys!r}")
        object.__setattr__(self, "unbatched_kwargs", tuple(keys))
        _refuse_first(
            (
                self.step_schedule == "grid" and self.rollout_steps * self.step >= 1 - self.t_eps,
                f"rollout_steps={self.rollout_steps} Euler steps of h = 1/num_sampling_steps = "
                f"{self.step:.4g} do not fit before t = 1 - t_eps = {1 - self.t_eps}",
            ),
            (
                self.time_draw == "end" and self.step_schedule != "grid",
                "time_draw='end' draws where a rollout of k grid steps ends: it needs "
                "step_schedule='grid'",
            ),
            (
                self.rollout_grad and self.step_schedule == "grid" and self.rollout_steps != 1,
                "rollout_grad needs one Euler step per rollout: use "
                "step_schedule='single' or rollout_steps=1",
            ),
            (
                self.adr_target_grad and not self.rollout_grad,
                "adr_target_grad=True needs rollout_grad=True (without it x^_t1 has no "
                "graph, and the target no gradient to keep)",
            ),
            (
                self.target == "stable" and self.method == "ip",
                "target='stable' is defined for method fm, ss and reflexflow, not ip",
            ),
        )
        # user objects and environment (reflexflow.config_checks)
        object.__setattr__(self, "rollout_modules", check_rollout_modules(self.rollout_modules))
        check_user_objects(self)

    def _validate_renoise(self) -> None:
        check_number("renoise_shift", self.renoise_shift, low=0, low_open=True)
        span = self.renoise_range
        if not (isinstance(span, (tuple, list)) and len(span) == 2):
            raise TypeError(f"renoise_range must be a pair (low, high), got {span!r}")
        for value in span:
            check_number("renoise_range", value, low=0, high=1)
        if not span[0] < span[1]:
            raise ValueError(f"renoise_range must have low < high, got {span!r}")
        object.__setattr__(self, "renoise_range", (float(span[0]), float(span[1])))
        if self.biased_input == "renoise":
            if self.method != "reflexflow" or self.fm_input != "biased":
                raise ValueError(
                    "biased_input='renoise' (takenoko) needs method='reflexflow' and "
                    "fm_input='biased': its one gradient call v(x^, t0) serves both terms"
                )
            if self.rollout_grad or self.time_draw != "start":
                raise ValueError(
                    "biased_input='renoise' has no rollout: rollout_grad must be False and "
                    "time_draw 'start'"
                )

    def _resolve_forward_mode(self) -> None:
        """How the gradient-carrying model calls run: ``shares_first_call`` and ``joint_call``.

        The FM term's call v(x_t0, t0) is also the rollout's first step. By default
        (share_first_call None) it is computed once, with grad, and the rollout continues
        from its detached value, wherever that is exact: method "reflexflow" with a
        rollout, fm_input "clean" and rollout_grad off. joint_forward=True asks instead for
        v(x_t0, t0) and v(x^_t1, t1) as one 2B call after a full no-grad rollout;
        share_first_call=False (joint_forward unset) for two separate calls after it.
        """
        can_share = (
            self.rolls_out and self.method == "reflexflow" and self.fm_input == "clean"
        ) and not self.rollout_grad
        two_calls = (
            self.method == "reflexflow" and self.lambda_adr != 0 and self.fm_input == "clean"
        )
        _refuse_first(
            (
                self.rollout_grad and self.joint_forward,
                "joint_forward=True is impossible with rollout_grad=True: the second "
                "model call's input depends on the first call's output",
            ),
            (
                self.share_first_call and not can_share,
                "share_first_call=True needs method='reflexflow' with a rollout, "
                "fm_input='clean' and rollout_grad=False (with rollout_grad the first call "
                "is shared already, and carries both gradients)",
            ),
            (
                self.share_first_call and self.joint_forward,
                "share_first_call=True and joint_forward=True exclude each other: the shared "
                "call runs before the rollout, the joint 2B call after it",
            ),
            (
                self.joint_forward and not two_calls,
                "joint_forward=True needs two gradient-carrying calls (method='reflexflow', "
                "lambda_adr > 0, fm_input='clean')",
            ),
        )
        if self.share_first_call is not None:
            share = self.share_first_call
        else:
            share = can_share and not self.joint_forward
        object.__setattr__(self, "shares_first_call", bool(share))
        object.__setattr__(self, "joint_call", bool(self.joint_forward))
        lean = self.memory == "lean"
        _refuse_first(
            (
                lean and self.rollout_grad,
                "memory='lean' needs independent terms; with rollout_grad=True the ADR "
                "gradient flows into the first call",
            ),
            (
                lean and self.joint_forward,
                "memory='lean' runs the two terms apart: not joint_forward",
            ),
            (
                lean and self.method == "reflexflow" and self.fm_input == "biased",
                "memory='lean' has nothing to split with fm_input='biased' (both terms "
                "use the same model call)",
            ),
        )
        warn_ignored_knobs(self)  # knobs given explicitly that this configuration never reads

    @property
    def step(self) -> float:
        """Inference Euler step h = 1 / num_sampling_steps."""
        return 1.0 / self.num_sampling_steps

    @property
    def uses_rollout(self) -> bool:
        """The method has a rollout (ss, reflexflow): k may be > 0."""
        return self.method in ("ss", "reflexflow")

    @property
    def rolls_out(self) -> bool:
        """A rollout runs: ss, or reflexflow with an ADR or FC term (with lambda_adr =
        lambda_fc = 0 the loss is plain FM at t0, and k is 0)."""
        return self.uses_rollout and (
            self.method == "ss" or self.lambda_adr != 0 or self.lambda_fc != 0
        )

    @property
    def max_rollout_steps(self) -> int:
        """The longest rollout: 1 for the single-step schedule, else rollout_steps."""
        return 1 if self.step_schedule == "single" else self.rollout_steps

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ReflexFlowConfig:
        """The knobs of preset ``name`` with ``overrides`` on top."""
        return cls(preset=name, **overrides)

    def replace(self, **changes: Any) -> ReflexFlowConfig:
        """A copy with ``changes``. Preset knobs that were never given explicitly (here or
        when this config was built) follow the (possibly new) preset."""
        explicit = set(self.explicit) | (set(changes) & set(PRESET_FIELDS))
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        for name in PRESET_FIELDS:
            if name not in explicit:
                kwargs[name] = FROM_PRESET
        kwargs.update(changes)
        return ReflexFlowConfig(**kwargs)


def config_fields() -> tuple[str, ...]:
    """The knob names ReflexFlowConfig takes as arguments."""
    return tuple(f.name for f in dataclasses.fields(ReflexFlowConfig) if f.init)
