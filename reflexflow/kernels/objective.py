"""``fused_objective``: the public door of the fused objective, reference.objective's twin.

It checks the arguments, makes strided inputs contiguous (one copy, only when needed),
picks the op's mode (separate v0/v1, the joint 2B output, or one tensor for both) and
calls ``torch.ops.reflexflow.fused_objective``. :func:`supports` tells a caller (the loss)
whether a call can take this path or must stay on the reference.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from .. import reference as ref

__all__ = ["fused_objective", "fused_objective_soft", "supports"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SAMPLE_TENSORS = ("x1", "eps", "x_hat", "u0", "v_adr", "fc_delta")
_ROW_TENSORS = ("t0", "t1", "k", "fc_active", "fm_weight", "adr_weight")


def fused_objective(
    path: ref.PathLike,
    *,
    v0: Tensor | None = None,
    v1: Tensor | None = None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    t0: Tensor,
    t1: Tensor,
    k: Tensor,
    lambda_adr: float = 10.0,
    lambda_fc: float = 1.0,
    adr_loss: str = "direction",
    fc_active: Tensor | None = None,
    fc_delta: Tensor | None = None,
    per_channel: bool = False,
    fc_signed: bool = False,
    fc_form: str = "weight",
    fc_filter: str = "gaussian",
    fc_sigma: float = 2.0,
    fc_size: int = 5,
    fc_cutoff: float = 0.25,
    fm_weight: Tensor | None = None,
    adr_weight: Tensor | None = None,
    u0: Tensor | None = None,
    v_adr: Tensor | None = None,
    v_joint: Tensor | None = None,
    norm_eps: float = ref.NORM_EPS,
    norm_floor: float = ref.NORM_FLOOR,
    return_w: bool = True,
) -> dict[str, Tensor | None]:
    """Triton twin of :func:`reflexflow.reference.objective`: same arguments, outputs and
    gradients (L = L_FC + lambda_adr L_ADR, per sample fc_i = fm_weight_i mean(w (v0 -
    u0)^2), adr_i = adr_weight_i * ADR term; see the reference for every knob).

    Returns loss, fc_loss, adr_loss (None without v1), per_sample (B,), w (None when
    lambda_fc = 0 or return_w=False; writing it costs N / C stores), and v_adr = delta =
    None (they stay in registers). With ``v_joint`` (the (2B, ...) output of one model
    call) the gradient comes back in that layout; with v0 and v1 the same tensor
    (fm_input="biased") one gradient G0 + G1 comes back. Compute is fp32 (fp64 inputs
    too: route them to the reference, see :func:`supports`). Differentiates v0, v1 or
    v_joint only; x1, eps, x_hat, u0 requiring grad are refused (ValueError).
    """
    return _run(locals(), fail_soft=False)


def fused_objective_soft(path: ref.PathLike, **kwargs: Any) -> dict[str, Tensor | None]:
    """fused_objective for backend="auto": a backward kernel that fails to compile or
    launch falls back to the reference's gradients (kernels.note_failure)."""
    bound = inspect.signature(fused_objective).bind(path, **kwargs)
    bound.apply_defaults()
    return _run(dict(bound.arguments), fail_soft=True)


def _same_shape(name: str, x: Tensor | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def _run(kw: dict[str, Any], fail_soft: bool) -> dict[str, Tensor | None]:
    """fused_objective's body; fail_soft (backend="auto") lets a failing backward kernel
    fall back to the reference's gradients."""
    from .objective_op import (
        V_JOINT,
        V_SEPARATE,
        V_SHARED,
        fused_objective_op,
        path_coefficients,
        path_kind,
    )

    adr_loss, fc_filter, fc_form = kw["adr_loss"], kw["fc_filter"], kw["fc_form"]
    if adr_loss not in ("direction", "mse"):
        raise ValueError(f"adr_loss must be 'direction' or 'mse', got {adr_loss!r}")
    if fc_filter not in ref.FILTERS:
        raise ValueError(f"fc_filter must be one of {ref.FILTERS}, got {fc_filter!r}")
    if fc_form not in ("weight", "squared"):
        raise ValueError(f"fc_form must be 'weight' or 'squared', got {fc_form!r}")
    if fc_filter == "box" and (int(kw["fc_size"]) < 1 or int(kw["fc_size"]) % 2 == 0):
        raise ValueError(f"fc_size must be odd and >= 1, got {kw['fc_size']}")
    v0, v1, v_joint = kw["v0"], kw["v1"], kw["v_joint"]
    if v_joint is not None:
        if v0 is not None or v1 is not None:
            raise ValueError("pass either v_joint or v0/v1, not both")
        mode, v0, v1 = V_JOINT, v_joint, None
    elif v0 is None:
        raise ValueError("v0 (or v_joint) is required")
    elif v1 is not None and v1 is v0:
        mode, v1 = V_SHARED, None
    else:
        mode = V_SEPARATE
    x1 = kw["x1"]
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, ...) with B >= 1, got {tuple(x1.shape)}")
    batch, shape = x1.shape[0], tuple(x1.shape)
    _same_shape(
        "v_joint" if mode == V_JOINT else "v0",
        v0,
        (2 * batch, *shape[1:]) if mode == V_JOINT else shape,
    )
    _same_shape("v1", v1, shape)
    for name in _SAMPLE_TENSORS:
        _same_shape(name, kw[name], shape)
    for name in _ROW_TENSORS:
        _same_shape(name, kw[name], (batch,))
    grad_on = torch.is_grad_enabled()
    for name in ("x1", "eps", "x_hat", "u0"):
        x = kw[name]
        if x is not None and grad_on and x.requires_grad:
            raise ValueError(
                f"{name} requires grad: the fused objective differentiates v0 and v1 only "
                "(use the reference, backend='torch')"
            )
    path = kw["path"]
    kind = path_kind(path)
    t0, t1 = kw["t0"], kw["t1"]
    coef = path_coefficients(path, t0, t1) if kind == 0 else None

    def c(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().contiguous()

    need_g0 = grad_on and v0.requires_grad
    need_g1 = grad_on and v1 is not None and v1.requires_grad
    loss, fc_loss, adr_loss_t, per_sample, w, _, _ = fused_objective_op(
        v0.contiguous(),
        None if v1 is None else v1.contiguous(),
        c(x1),
        c(kw["eps"]),
        c(kw["x_hat"]),
        c(kw["u0"]),
        c(kw["v_adr"]),
        c(kw["fc_delta"]),
        c(t0),
        c(t1),
        coef,
        c(kw["k"]),
        c(kw["fc_active"]),
        c(kw["fm_weight"]),
        c(kw["adr_weight"]),
        mode,
        kind,
        float(kw["lambda_adr"]),
        float(kw["lambda_fc"]),
        adr_loss == "direction",
        bool(kw["per_channel"]),
        bool(kw["fc_signed"]),
        fc_form == "squared",
        fc_filter,
        float(kw["fc_sigma"]),
        int(kw["fc_size"]),
        float(kw["fc_cutoff"]),
        float(kw["norm_eps"]),
        float(kw["norm_floor"]),
        need_g0,
        need_g1,
        bool(kw["return_w"]),
        fail_soft,
        True,  # the workspace outputs are dropped below: backward may scale them in place
    )
    has_v1 = mode != V_SEPARATE or v1 is not None
    return {
        "loss": loss,
        "fc_loss": fc_loss,
        "adr_loss": adr_loss_t if has_v1 else None,
        "per_sample": per_sample,
        "w": w if kw["lambda_fc"] != 0 and kw["return_w"] else None,
        "v_adr": None,
        "delta": None,
    }


def supports(**kwargs: Any) -> bool:
    """True when :func:`fused_objective` computes this call (same keyword arguments as
    reference.objective), False when it must stay on the reference.

    False for: a device Triton cannot run here (CUDA needs triton; CPU needs
    TRITON_INTERPRET=1), float64 tensors (the kernels compute in fp32), x1, eps, x_hat or
    u0 requiring grad while grad mode is on (the fused op differentiates v only), an
    empty batch, or knobs the reference would reject. Everything else (every filter, both
    ADR losses, v_joint, shared v0 = v1, weights, explicit targets, signed and squared FC,
    any layout, any strides, any path) takes the fused path. Checks metadata only.
    """
    from . import triton_usable

    v = kwargs.get("v_joint")
    if v is None:
        v = kwargs.get("v0")
    x1 = kwargs.get("x1")
    if not isinstance(v, Tensor) or not isinstance(x1, Tensor):
        return False
    if not triton_usable(x1.device.type) or x1.dim() < 2 or x1.shape[0] == 0:
        return False
    if kwargs.get("adr_loss", "direction") not in ("direction", "mse"):
        return False
    if kwargs.get("fc_filter", "gaussian") not in ref.FILTERS:
        return False
    if kwargs.get("fc_form", "weight") not in ("weight", "squared"):
        return False
    if kwargs.get("fc_filter", "gaussian") == "box" and int(kwargs.get("fc_size", 5)) % 2 == 0:
        return False
    grad_on = torch.is_grad_enabled()
    for name in ("v0", "v1", "v_joint", *_SAMPLE_TENSORS, "fm_weight", "adr_weight"):
        x = kwargs.get(name)
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.device != x1.device or x.dtype not in _FLOATS:
            return False
        if name in ("x1", "eps", "x_hat", "u0") and grad_on and x.requires_grad:
            return False
    return True
