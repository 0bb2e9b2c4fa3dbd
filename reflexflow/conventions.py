"""The two time conventions and the boundary where the user's model is made canonical.

============  ======================  ==========================  ==================
convention    data / noise            path (linear)               model predicts
============  ======================  ==========================  ==================
data_at_1     data t = 1, noise t = 0  x_t = t x1 + (1 - t) eps    u = x1 - eps
noise_at_1    data s = 0, noise s = 1  x = (1 - s) x0 + s eps      eps - x0
============  ======================  ==========================  ==================

noise_at_1 (diffusers, SD3, Flux) maps onto the canonical one by t = 1 - sigma and
v = -v_model. The conversion happens once, here; inside, everything is canonical.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .batching import unwrap_kwargs
from .checks import CONVENTIONS
from .model_state import modules_of, rollout_mode

__all__ = [
    "CONVENTIONS",
    "check_convention",
    "to_canonical_time",
    "from_canonical_time",
    "VelocityModel",
]


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def to_canonical_time(t: Tensor, convention: str) -> Tensor:
    """t (data_at_1) or 1 - sigma (noise_at_1)."""
    return t if convention == "data_at_1" else 1 - t


def from_canonical_time(t: Tensor, convention: str) -> Tensor:
    """Inverse of :func:`to_canonical_time` (the map is an involution)."""
    return to_canonical_time(t, convention)


class VelocityModel:
    """Wraps ``model(x, t, **kwargs)`` in the user's convention as a canonical velocity.

    __call__(x, t, kwargs) takes the state x (float32/64) and canonical times t (B,);
    the model sees x cast to ``input_dtype``, and times in its own convention times
    ``timestep_scale`` (e.g. 1000 for SD3-style timesteps); its output must be a
    floating-point tensor of x's shape on x's device, and is returned in the state's
    dtype, negated under noise_at_1.
    ``mode="eval"`` runs each call with the model in eval mode (its submodules' own flags
    restored after the call): how the loss's no-grad rollout calls the model;
    ``rollout_modules`` are switched too (modules the callable reaches in a way
    :func:`reflexflow.model_state.modules_of` cannot see).

    This is the boundary where the user's model is called, so it names what went wrong
    there: x on the meta device, model parameters or model_kwargs tensors on another
    device than x (ValueError), the input dtype differing from the parameters' dtype
    (TypeError with the fix), a diffusers-style transformer called without
    :class:`reflexflow.adapters.DiffusersModelAdapter` (TypeError), and a non-tensor,
    non-floating, wrong-shape or wrong-device output.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        convention: str = "data_at_1",
        *,
        input_dtype: torch.dtype | None = None,
        timestep_scale: float = 1.0,
        mode: str = "train",
        rollout_modules: tuple[nn.Module, ...] = (),
        input_name: str = "x1",
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.model = model
        self.convention = check_convention(convention)
        self.input_dtype = input_dtype
        self.timestep_scale = float(timestep_scale)
        self.mode = mode
        self.rollout_modules = tuple(rollout_modules)
        self.input_name = input_name  # how errors name the user's input (x1, noise)
        self.calls = 0  # model invocations
        self.sample_forwards = 0  # samples passed through the model, summed over calls
        self._inputs_checked = False

    def with_mode(self, mode: str) -> VelocityModel:
        """This velocity, calling the model in ``mode`` ("eval" or "train", as it is)."""
        return VelocityModel(
            self.model,
            self.convention,
            input_dtype=self.input_dtype,
            timestep_scale=self.timestep_scale,
            mode=mode,
            rollout_modules=self.rollout_modules,
            input_name=self.input_name,
        )

    def model_time(self, t: Tensor) -> Tensor:
        tm = from_canonical_time(t, self.convention)
        return tm * self.timestep_scale if self.timestep_scale != 1.0 else tm

    def __call__(
        self, x: Tensor, t: Tensor, kwargs: Any = None, *, model_input: Tensor | None = None
    ) -> Tensor:
        """v(x, t); ``model_input``: x already cast to input_dtype (the fused Euler update
        writes it), passed to the model instead of casting x again."""
        if model_input is not None:
            inp = model_input
        else:
            inp = x if self.input_dtype is None else x.to(self.input_dtype)
        model_kwargs = unwrap_kwargs(kwargs)
        if not self._inputs_checked and not torch.compiler.is_compiling():
            _check_devices(self.model, inp, model_kwargs, self.rollout_modules, self.input_name)
            self._inputs_checked = True
        try:
            with rollout_mode(self.model, self.mode, self.rollout_modules):
                out = self.model(inp, self.model_time(t), **model_kwargs)
        except (RuntimeError, TypeError) as err:
            named = _named_call_error(
                err, self.model, inp, model_kwargs, self.rollout_modules, self.input_name
            )
            if named is None:
                raise
            raise named from err
        self.calls += 1
        self.sample_forwards += x.shape[0]
        _check_output(out, x)
        if out.device != x.device:
            where = _device_mismatches(
                self.model, inp, model_kwargs, self.rollout_modules, self.input_name
            )
            raise ValueError(
                f"model returned a tensor on {out.device}, {self.input_name} is on "
                f"{x.device}" + (f": {where}" if where else "")
            )
        v = out.to(x.dtype)
        return -v if self.convention == "noise_at_1" else v


def _check_output(out: Any, x: Tensor) -> None:
    if not isinstance(out, Tensor):
        hint = ""
        if isinstance(out, (tuple, list)) or hasattr(out, "sample"):
            hint = (
                " (a diffusers-style output: wrap the model in "
                "reflexflow.adapters.DiffusersModelAdapter, or return out[0] / out.sample)"
            )
        raise TypeError(f"model must return a tensor, got {type(out).__name__}{hint}")
    if not out.is_floating_point():
        raise TypeError(
            f"model must return a floating-point velocity, got a tensor of dtype {out.dtype}"
        )
    if out.shape != x.shape:
        raise ValueError(
            f"model returned shape {tuple(out.shape)}, expected the input's shape {tuple(x.shape)}"
        )


def _parameter(model: Any, extra: tuple[nn.Module, ...]) -> Tensor | None:
    """The first floating-point parameter of the modules the model runs, or None."""
    for root in (*modules_of(model), *extra):
        for p in root.parameters():
            if p.is_floating_point():
                return p
    return None


def _check_devices(model: Any, inp: Tensor, kwargs: dict, extra: tuple, name: str) -> None:
    """ValueError for x, a model_kwargs tensor or the model's parameters on the meta
    device (no data; torch may even compute garbage from meta weights without an error),
    unless a forward hook materialises the weights (accelerate's offload). Other devices
    are checked on failure (:func:`_device_mismatches`): a model may keep its parameters
    elsewhere on purpose (CPU offload)."""
    if inp.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: meta tensors carry no data to draw from or "
            f"integrate; pass real tensors ({name}.to(device))"
        )
    p = _parameter(model, extra)
    if p is not None and p.device.type == "meta" and not _has_forward_hooks(model, extra):
        raise ValueError(
            f"the model's parameters are on the meta device, {name} on {inp.device}: "
            "meta weights carry no data; load or materialise them "
            f"(model.to_empty(device=...) and load_state_dict, or model.to({name}.device))"
        )

    def check(value: Tensor, where: str) -> None:
        if value.device.type == "meta":
            raise ValueError(
                f"{where} is on the meta device, {name} on {inp.device}: every model_kwargs "
                f"tensor must hold data on {name}'s device ({where}.to({name}.device))"
            )

    _walk_tensors(kwargs, "model_kwargs", check)


def _has_forward_hooks(model: Any, extra: tuple) -> bool:
    return any(
        m._forward_pre_hooks or hasattr(m, "_hf_hook")
        for root in (*modules_of(model), *extra)
        for m in root.modules()
    )


def _device_mismatches(model: Any, inp: Tensor, kwargs: dict, extra: tuple, name: str) -> str:
    """What sits on another device than x: the model's parameters, model_kwargs tensors
    (ndim >= 1); "" when nothing does."""
    found = []
    p = _parameter(model, extra)
    if p is not None and p.device != inp.device:
        found.append(f"the model's parameters are on {p.device}")

    def check(value: Tensor, where: str) -> None:
        if value.device != inp.device and value.dim() > 0:
            found.append(f"{where} is on {value.device}")

    _walk_tensors(kwargs, "model_kwargs", check)
    if not found:
        return ""
    return (
        f"{'; '.join(found)}, {name} on {inp.device}: the model's parameters and every "
        f"model_kwargs tensor must be on {name}'s device (model.to({name}.device), "
        f"tensor.to({name}.device))"
    )


def _walk_tensors(obj: Any, where: str, fn: Callable[[Tensor, str], None]) -> None:
    if isinstance(obj, Tensor):
        fn(obj, where)
    elif isinstance(obj, Mapping):
        for key, val in obj.items():
            _walk_tensors(val, f"{where}[{key!r}]", fn)
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        for i, val in enumerate(obj):
            _walk_tensors(val, f"{where}[{i}]", fn)


_DEVICE_MISMATCH = ("device", "cuda", "should be the same", "Expected all tensors")
_DTYPE_MISMATCH = (
    "should be the same",
    "expected scalar type",
    "must have the same dtype",
    "same dtype",
    "expected both",
    "dtype mismatch",
    "found dtype",
    "expected m1 and m2 to have the same dtype",
)


def _named_call_error(
    err: Exception,
    model: Any,
    inp: Tensor,
    kwargs: dict,
    extra: tuple[nn.Module, ...],
    name: str = "x1",
) -> Exception | None:
    """A clearer error for a failed model call, or None to re-raise ``err`` as it is."""
    text = str(err)
    if isinstance(err, RuntimeError) and any(s in text for s in _DEVICE_MISMATCH):
        where = _device_mismatches(model, inp, kwargs, extra, name)
        if where:
            return ValueError(f"{where} ({type(err).__name__}: {text.splitlines()[0]})")
    if isinstance(err, RuntimeError) and any(s in text for s in _DTYPE_MISMATCH):
        p = _parameter(model, extra)
        if p is not None and p.dtype != inp.dtype:
            return TypeError(
                f"the model was called with {name}'s dtype {inp.dtype}, but its parameters "
                f"are {p.dtype} ({type(err).__name__}: {text.splitlines()[0]}). The model "
                f"sees {name}'s dtype: pass {name}.to({p.dtype}), or keep the parameters "
                f"{p.dtype} and call under torch.autocast(device_type="
                f"{inp.device.type!r}, dtype={inp.dtype}) for mixed precision"
            )
    if isinstance(err, TypeError) and _takes_hidden_states(model):
        return TypeError(
            f"the model's forward takes diffusers' arguments (hidden_states, timestep, ...), "
            f"and calling it as model(x, t, **model_kwargs) failed ({text}). Wrap it: "
            "reflexflow.adapters.DiffusersModelAdapter(transformer), with "
            'ReflexFlowLoss(**reflexflow.adapters.diffusers_knobs("sd3"))'
        )
    return None


def _takes_hidden_states(model: Any) -> bool:
    fn = getattr(model, "forward", model)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "hidden_states" in params
