"""Checks of a ReflexFlowConfig beyond each knob's own range: nothing is accepted silently.

* :func:`check_user_objects` (ValueError / TypeError): ``rollout_modules``; a custom path
  whose s(t) is not > 0 on [0, 1 - t_eps] (the ADR target divides by s(t1)); a
  ``time_sampler`` callable that cannot be called as ``sampler(batch, device,
  generator)``; ``backend="triton"`` with TRITON_INTERPRET=1 set after triton was
  imported. A RuntimeWarning for a t_eps below :data:`T_EPS_FLOAT32_MIN`.
* :func:`warn_ignored_knobs` (UserWarning): a knob given explicitly that the chosen
  method, preset or other knobs never read (e.g. ``method="fm", lambda_adr=5``).

None of these run while torch.compile traces (a config built inside a graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .checks import check_own_convention
from .paths import PATHS
from .presets import PRESET_FIELDS

__all__ = [
    "raise_at_first",
    "T_EPS_FLOAT32_MIN",
    "check_user_objects",
    "warn_ignored_knobs",
    "ignored_knobs",
    "check_path",
]

# Below this t_eps, the float32 ADR term at t1 = 1 - t_eps differs from float64 by more
# than 0.3% (measured, linear/gvp/vp, 64 samples (3, 8, 8), mse ADR: 9e-5 at 1e-3, 3.3e-4
# at 1e-4, 2.7e-3 at 1e-5, 2.6% at 3e-6 and 1e-6, 30% at 1e-7): 1 - t rounds in float32.
T_EPS_FLOAT32_MIN = 1e-5
PATH_GRID = 1025  # points of the grid on which a custom path's s(t) is checked


def _compiling() -> bool:
    return torch.compiler.is_compiling()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# frames a warning skips: the library, generated code (a dataclass's __init__), and the
# context-manager / decorator plumbing of contextlib and torch (torch.no_grad)
_SKIPPED = (
    _PACKAGE_DIR,
    "<string>",
    os.path.abspath(contextlib.__file__),
    os.path.dirname(os.path.abspath(torch.__file__)),
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for warnings.warn (called from the caller of this function)
    that points at the first frame outside reflexflow (and outside generated code,
    contextlib and torch): the user's line, however deep the library call."""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_SKIPPED):
            return level
        frame, level = frame.f_back, level + 1
    return level


# -- user objects ----------------------------------------------------------------------


def check_rollout_modules(value: Any) -> tuple[nn.Module, ...]:
    """``rollout_modules``: a tuple (or list) of nn.Modules, returned as a tuple."""
    if isinstance(value, nn.Module):
        return (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(m, nn.Module) for m in value):
        raise TypeError(
            "rollout_modules must be a tuple of nn.Modules (the modules the model callable "
            f"runs, switched to eval mode for the no-grad rollout), got {value!r:.120}"
        )
    return tuple(value)


def raise_at_first(bad: torch.Tensor, message: Callable[[int], str]) -> None:
    """ValueError(message(i)) for the first row i where ``bad`` is True (one host sync)."""
    if bool(bad.any()):
        raise ValueError(message(int(bad.nonzero()[0, 0])))


def check_path(path: Any, t_eps: float, *, positive_s: bool) -> None:
    """ValueError unless a custom path's coefficients a, s, da, ds are tensors of t's shape
    on [0, 1 - t_eps], finite there (a, da, ds: for t > 0, as a' = n t^(n - 1) may be
    infinite at 0), and, with ``positive_s`` (the loss divides by s), s(t) > 0.

    The ADR target v_adr = u_t1 + (s'(t1) / s(t1)) delta divides by s(t1); a path with
    s = 0 before t = 1 drops the correction (or makes it Inf/NaN). A coefficient of
    another shape would be broadcast (or fail deep inside the loss). Built-in paths are
    not checked (their s > 0 on [0, 1)). A path that cannot be evaluated on a float64
    CPU grid is left to the loss.
    """
    if isinstance(path, tuple(PATHS.values())):
        return
    t = torch.linspace(0.0, 1.0 - t_eps, PATH_GRID, dtype=torch.float64)
    try:
        with torch.no_grad():
            coefficients = path.coefficients(t)  # the one call the loss makes
        values = {name: getattr(coefficients, name) for name in ("s", "a", "da", "ds")}
    except Exception:  # noqa: BLE001 - e.g. a path bound to CUDA tensors: not checkable here
        return
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.shape != t.shape:
            raise ValueError(
                f"path.{name}(t) must return a tensor of t's shape {tuple(t.shape)}, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )
    s = values["s"]
    raise_at_first(
        ~(torch.isfinite(s) & ((s > 0) if positive_s else True)),
        lambda i: (
            f"the path's s(t) must be {'> 0' if positive_s else 'finite'} on [0, 1 - t_eps] "
            f"= [0, {1 - t_eps:.6g}]{' (the ADR target divides by s(t1))' if positive_s else ''}"
            f"; s({float(t[i]):.6g}) = {float(s[i]):.6g}"
            + (
                ". Use a path whose noise scale reaches 0 only at t = 1, or raise t_eps"
                if positive_s
                else ""
            )
        ),
    )
    inner = t > 0  # a derivative may be infinite at t = 0 (a = t^n, n < 1), never drawn
    for name in ("a", "da", "ds"):
        value = values[name]
        raise_at_first(
            inner & ~torch.isfinite(value),
            lambda i, name=name, value=value: (
                f"the path's {name}(t) must be finite on (0, 1 - t_eps] = "
                f"(0, {1 - t_eps:.6g}]; {name}({float(t[i]):.6g}) = {float(value[i]):.6g}"
            ),
        )


def check_time_sampler(sampler: Callable[..., Any]) -> None:
    """TypeError unless ``sampler(2, torch.device("cpu"), generator)`` can be called (the
    loss checks its output on the real batch). Runs on a private generator, with the
    global CPU RNG restored. ValueError when its ``convention`` attribute, where set, is
    not a convention."""
    check_own_convention("time_sampler", sampler)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            sampler(2, torch.device("cpu"), gen)
    except TypeError as err:
        raise TypeError(
            "time_sampler must be callable as time_sampler(batch, device, generator) and "
            f"return a (batch,) tensor in [0, 1]; calling it with (2, cpu, a Generator) "
            f"raised TypeError: {err}"
        ) from err
    except Exception:  # noqa: BLE001 - device-specific samplers are checked by the loss
        return


def triton_interpreter_mismatch() -> bool:
    """True when TRITON_INTERPRET=1 is set now but triton was imported without it (its
    own jit functions were then built for a GPU, and no kernel can run on the CPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or "triton" not in sys.modules:
        return False
    try:
        from triton.language import standard
    except Exception:  # noqa: BLE001 - an unusual triton: nothing to compare
        return False
    probe = getattr(standard, "sigmoid", None) or getattr(standard, "zeros_like", None)
    return probe is not None and type(probe).__name__ != "InterpretedFunction"


def check_user_objects(cfg: Any) -> None:
    """The checks of user objects and environment (see the module docstring)."""
    if _compiling():
        return
    if cfg.t_eps < T_EPS_FLOAT32_MIN:
        warnings.warn(
            f"t_eps={cfg.t_eps:g} is below {T_EPS_FLOAT32_MIN:g}: near t = 1 - t_eps the "
            "ADR target's s'(t1)/s(t1) amplifies float32 rounding (measured: 2.6% off the "
            "float64 ADR term at t_eps = 1e-6, 30% at 1e-7); keep t_eps >= 1e-5 or train "
            "in float64",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    divides_by_s = (cfg.method == "reflexflow" and cfg.lambda_adr != 0) or (cfg.target == "stable")
    check_path(cfg.path, cfg.t_eps, positive_s=divides_by_s)
    if not isinstance(cfg.time_sampler, str):
        check_time_sampler(cfg.sampler)
    if cfg.backend == "triton" and triton_interpreter_mismatch():
        raise ValueError(
            "backend='triton': TRITON_INTERPRET=1 was set after triton was imported, so "
            "triton's own functions were built for a GPU and its CPU interpreter cannot run "
            "the kernels. Set TRITON_INTERPRET=1 before triton is first imported (before "
            "importing torch._inductor, reflexflow.kernels or triton), e.g. in the shell"
        )


# -- knobs the configuration never reads -----------------------------------------------

# every FC knob: the presets' fc_* fields and the two filter sizes
_FC_KNOBS = (*(f for f in PRESET_FIELDS if f.startswith("fc_")), "fc_size", "fc_cutoff")
_ROLLOUT_KNOBS = (
    "rollout_steps",
    "num_sampling_steps",
    "k_draw",
    "step_schedule",
    "ss_prob",
    "rollout_grad",
    "rollout_mode",
    "cuda_graph",
)


def _is_given(cfg: Any, name: str) -> bool:
    """A preset knob given explicitly (``cfg.explicit``), or another knob off its
    field's default."""
    if name in PRESET_FIELDS:
        return name in cfg.explicit
    field = next(f for f in dataclasses.fields(cfg) if f.name == name)
    value = getattr(cfg, name)
    return not (
        value is field.default or (type(value) is type(field.default) and value == field.default)
    )


def ignored_knobs(cfg: Any) -> dict[str, str]:
    """{knob: why it is ignored} for the knobs the configuration never reads."""
    why: dict[str, str] = {}

    def ignore(names: tuple[str, ...], reason: str) -> None:
        for name in names:
            why.setdefault(name, reason)

    method = cfg.method
    if method != "reflexflow":
        ignore(
            ("lambda_adr", "adr_loss", "weight_adr", "fm_input"),
            f"method={method!r} has no ADR term",
        )
        ignore(("lambda_fc", *_FC_KNOBS), f"method={method!r} has no FC term")
    if method in ("fm", "ip"):
        reason = f"method={method!r} has no rollout"
        ignore((*_ROLLOUT_KNOBS, "rollout_modules"), reason)
    if method != "ip":
        ignore(("ip_gamma",), f"ip_gamma is the input perturbation of method='ip', not {method!r}")
    if method == "reflexflow":
        if cfg.lambda_adr == 0:
            ignore(("adr_loss", "weight_adr"), "lambda_adr = 0: there is no ADR term")
            ignore(("memory",), "lambda_adr = 0: memory='lean' has no ADR term to defer")
        if cfg.lambda_fc == 0:
            ignore(_FC_KNOBS, "lambda_fc = 0: there is no FC term")
        if cfg.lambda_adr == 0 and cfg.lambda_fc == 0:
            ignore(
                (*_ROLLOUT_KNOBS, "rollout_modules"),
                "lambda_adr = lambda_fc = 0: nothing rolls out",
            )
    elif method in ("fm", "ip", "ss"):
        ignore(("memory",), f"memory='lean' splits the ADR term, which method={method!r} lacks")
    if cfg.step_schedule == "single":
        ignore(
            ("num_sampling_steps", "rollout_steps", "k_draw"),
            "step_schedule='single' takes one step of random length (1 - t_eps - t0) U(0, 1)",
        )
    elif cfg.rollout_steps == 1:
        ignore(("k_draw",), "rollout_steps=1: every rollout has one step")
    if cfg.fc_filter != "gaussian":
        ignore(("fc_sigma",), f"fc_sigma is the gaussian filter's; fc_filter={cfg.fc_filter!r}")
    if cfg.fc_filter != "box":
        ignore(("fc_size",), f"fc_size is the box filter's; fc_filter={cfg.fc_filter!r}")
    if cfg.fc_filter != "fft":
        ignore(("fc_cutoff",), f"fc_cutoff is the fft filter's; fc_filter={cfg.fc_filter!r}")
    if cfg.fc_signed:
        ignore(
            ("fc_per_channel", "fc_channel_reduce"),
            "fc_signed=True low-passes delta itself, with no channel reduction",
        )
    elif cfg.fc_per_channel:
        ignore(("fc_channel_reduce",), "fc_per_channel=True keeps each channel: nothing to reduce")
    if cfg.loss_weighting is None:
        ignore(("weight_adr",), "weight_adr weights the ADR term by loss_weighting, which is None")
    if cfg.target != "stable":
        ignore(
            ("stable_ref", "stable_gather"),
            f"the reference bank is target='stable''s; target={cfg.target!r}",
        )
    if cfg.time_sampler != "logit_normal":
        ignore(
            ("logit_mean", "logit_std"), "logit_mean/logit_std set time_sampler='logit_normal' only"
        )
    if cfg.rollout_mode != "eval":
        ignore(("rollout_modules",), "rollout_mode='train' runs the modules as they are")
    return {name: reason for name, reason in why.items() if _is_given(cfg, name)}


def warn_ignored_knobs(cfg: Any) -> None:
    """One UserWarning naming every knob given explicitly that the configuration ignores."""
    if _compiling():
        return
    ignored = ignored_knobs(cfg)
    if ignored:
        lines = "; ".join(f"{name} ({reason})" for name, reason in sorted(ignored.items()))
        warnings.warn(
            f"these knobs are ignored by this configuration: {lines}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


# -- inputs of the public functions beside the loss (sample, exposure_bias) -------------


def check_batch_tensor(name: str, x: Any) -> None:
    """TypeError / ValueError unless ``x`` is a floating tensor (B, ...) with B >= 1 and
    ndim >= 2, on a device that holds data (not meta): what the loss asks of x1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B, ...) with B >= 1 and ndim >= 2, got {tuple(x.shape)}"
        )
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: meta tensors carry no data")


def check_model_kwargs(model_kwargs: Any, batch: int, unbatched: Any) -> dict | None:
    """``model_kwargs`` checked as the loss checks them (a mapping; batch-shaped tensors
    have first axis ``batch`` unless their key is in ``unbatched``)."""
    from collections.abc import Mapping

    from .batching import prepare_kwargs

    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    if isinstance(unbatched, str) or not isinstance(unbatched, (tuple, list)):
        raise TypeError(f"unbatched_kwargs must be a tuple of keys, got {unbatched!r}")
    return prepare_kwargs(model_kwargs, batch, tuple(unbatched))


def check_generator(generator: Any, x: torch.Tensor, name: str = "x1") -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r:.80}")
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, {name} on {x.device}")
