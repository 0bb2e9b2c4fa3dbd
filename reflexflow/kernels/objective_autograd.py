"""Autograd of ``reflexflow::fused_objective`` (registered by objective_op).

The forward op wrote the gradients of ``loss`` for grad_output 1 (outputs 5, 6, the
workspace); backward turns them into the gradients for the incoming grad_outputs of
loss, fc_loss, adr_loss and per_sample:

* eager, plain tensors: scale_kernel multiplies the workspace in place by per-sample
  factors and skips every block whose factor is exactly 1, then hands it to autograd (a
  leaf takes it as .grad without a copy). When the workspace is spent (a second
  backward through a retained graph), was not written (need_g* False) or holds G0 + G1 of
  a shared v while fc_loss / adr_loss need them apart, the forward op recomputes it from
  the saved inputs. A direct op caller that keeps the workspace passes
  scale_in_place=False: the factors then go into new tensors.
* traced (torch.compile, make_fx: fake / functional tensors): the functional backward op
  (out = s g), so AOTAutograd and Inductor see pure ops.
* create_graph=True: the reference's gradients (differentiable), from the saved inputs.
* fail_soft (backend="auto"): a failing kernel (not an out-of-memory error) is replaced by
  the reference's gradients from the saved inputs, once for all (kernels.note_failure).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..paths import GVPPath, LinearPath
from . import objective_op as op

__all__ = ["setup_context", "backward", "reference_call"]


def _is_traced(t: Tensor) -> bool:
    """True for the fake / functional tensors of torch.compile and make_fx tracing."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def setup_context(ctx, inputs, output) -> None:
    """Save the gradient workspace (outputs 5, 6) and every input for backward."""
    ctx.save_for_backward(output[5], output[6], *(x for x in inputs if isinstance(x, Tensor)))
    ctx.slots = tuple(i for i, x in enumerate(inputs) if isinstance(x, Tensor))
    ctx.args = list(inputs)  # non-tensor arguments read from here; tensors from saved
    for i in ctx.slots:
        ctx.args[i] = None
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(output[4], output[5], output[6])
    ctx.consumed = False


def _saved_args(ctx) -> tuple[Tensor, Tensor, list]:
    saved = ctx.saved_tensors
    args = list(ctx.args)
    for i, x in zip(ctx.slots, saved[2:], strict=True):
        args[i] = x
    return saved[0], saved[1], args


def _scale_factors(v_mode: int, lambda_adr: float, regions: list[int]) -> tuple[float, ...]:
    """(a0, f0, p0, a1, f1, p1) for the stored gradients of ``regions`` (0: v0, 1: v1).

    v0: d loss/d v0 = g0 (g_loss + g_fc + B g_rows). v1 (stored with c1 = lambda_adr, or
    1 when lambda_adr = 0): g1 (g_loss + g_adr / lambda + B g_rows), or g1 g_adr when
    lambda_adr = 0. Shared (one buffer, G0 + lambda G1): g (g_loss + B g_rows).
    """
    if v_mode == op.V_SHARED:
        table = {0: (1.0, 0.0, 1.0)}
    elif lambda_adr != 0:
        table = {0: (1.0, 1.0, 1.0), 1: (1.0, 1.0 / lambda_adr, 1.0)}
    else:
        table = {0: (1.0, 1.0, 1.0), 1: (0.0, 1.0, 0.0)}
    first = table[regions[0]]
    second = table[regions[1]] if len(regions) > 1 else (0.0, 0.0, 0.0)
    return (*first, *second)


def _fast_backward(ctx, g0, g1, args, grads) -> tuple[Tensor | None, Tensor | None]:
    """Scale the stored gradients (recomputing them first when spent or missing)."""
    g_loss, g_fc, g_adr, g_rows = grads
    v_mode, lambda_adr = args[15], args[17]
    batch = args[2].shape[0]
    traced = _is_traced(args[2])
    need0, need1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    missing = (need0 and g0.numel() == 0) or (need1 and g1.numel() == 0)
    if v_mode == op.V_JOINT and need0 and g0.numel() == 0:
        missing = True
    shared_split = v_mode == op.V_SHARED and (g_fc is not None or g_adr is not None)
    recompute = ctx.consumed or shared_split or missing
    if recompute:
        a = list(args)
        if shared_split:
            a[1], a[15] = a[0], op.V_SEPARATE
        a[29] = a[30] = True
        a[31] = False
        out = op.fused_objective_op(*a)
        g0, g1, v_mode = out[5], out[6], a[15]
    joint = v_mode == op.V_JOINT
    bufs = [(g, r) for g, r in ((g0, 0), (g1, 1)) if g.numel() > 0]
    if not bufs:
        return None, None
    regions = [0, 1] if joint else [r for _, r in bufs]
    terms = {0: g_fc, 1: g_adr}
    factors = _scale_factors(v_mode, lambda_adr, regions)
    src0 = bufs[0][0]
    src1 = bufs[1][0] if len(bufs) > 1 else None
    t0, t1 = terms[regions[0]], terms[regions[1]] if len(regions) > 1 else None
    if traced:
        dst0, out1 = op.fused_objective_backward_op(
            src0, src1, g_loss, t0, t1, g_rows, batch, joint, *factors
        )
        dst1 = out1 if src1 is not None else None
    elif recompute or args[33]:  # the buffers are ours: scale in place, skip factors of 1
        op._scale(
            src0,
            src1,
            src0,
            src1,
            g_loss,
            t0,
            t1,
            g_rows,
            batch,
            joint,
            factors,
            in_place=True,
            traced=False,
        )
        dst0, dst1 = src0, src1
        if not recompute:
            ctx.consumed = True
    else:  # a direct caller holds them: scale into new tensors
        dst0 = torch.empty_like(src0)
        dst1 = torch.empty_like(src1) if src1 is not None else None
        op._scale(
            src0,
            src1,
            dst0,
            dst1,
            g_loss,
            t0,
            t1,
            g_rows,
            batch,
            joint,
            factors,
            in_place=False,
            traced=False,
        )
    scaled = {bufs[0][1]: dst0}
    if dst1 is not None:
        scaled[bufs[1][1]] = dst1
    if shared_split:
        return scaled[0] + scaled[1], None
    return (scaled.get(0) if need0 else None), (scaled.get(1) if need1 else None)


class _TablePath:
    """A path whose coefficients come from the (B, 7) table (reference fallback only)."""

    def __init__(self, t0: Tensor, t1: Tensor, coef: Tensor) -> None:
        self.t0, self.t1, self.coef = t0, t1, coef

    def a(self, t: Tensor) -> Tensor:
        return self.coef[:, 2]

    def s(self, t: Tensor) -> Tensor:
        return self.coef[:, 3]

    def da(self, t: Tensor) -> Tensor:
        return self.coef[:, 0] if t is self.t0 else self.coef[:, 4]

    def ds(self, t: Tensor) -> Tensor:
        return self.coef[:, 1] if t is self.t0 else self.coef[:, 5]


def reference_call(args: list) -> tuple[dict, list[Tensor]]:
    """reference.objective on the op's arguments; returns (its outputs, the v inputs)."""
    (
        v0,
        v1,
        x1,
        eps,
        x_hat,
        u0,
        v_adr,
        fc_delta,
        t0,
        t1,
        coef,
        k,
        fc_active,
        fm_weight,
        adr_weight,
        v_mode,
        kind,
        lambda_adr,
        lambda_fc,
        direction,
        per_channel,
        fc_signed,
        fc_squared,
        fc_filter,
        fc_sigma,
        fc_size,
        fc_cutoff,
        norm_eps,
        norm_floor,
    ) = args[:29]
    path = {1: LinearPath(), 2: GVPPath()}.get(kind) or _TablePath(t0, t1, coef)
    if v_mode == op.V_JOINT:
        vs, leaves = dict(v_joint=v0, v0=None, v1=None), [v0]
    elif v_mode == op.V_SHARED:
        vs, leaves = dict(v0=v0, v1=v0), [v0]
    else:
        vs, leaves = dict(v0=v0, v1=v1), [v0] + ([v1] if v1 is not None else [])
    from . import _legacy_reference  # TEMPORARY ADAPTER (branch loss), see kernels/__init__

    out = _legacy_reference(
        path,
        x1=x1,
        eps=eps,
        x_hat=x_hat,
        t0=t0,
        t1=t1,
        k=k,
        lambda_adr=lambda_adr,
        lambda_fc=lambda_fc,
        adr_loss="direction" if direction else "mse",
        fc_active=fc_active,
        fc_delta=fc_delta,
        per_channel=per_channel,
        fc_signed=fc_signed,
        fc_form="squared" if fc_squared else "weight",
        fc_filter=fc_filter,
        fc_sigma=fc_sigma,
        fc_size=fc_size,
        fc_cutoff=fc_cutoff,
        fm_weight=fm_weight,
        adr_weight=adr_weight,
        u0=u0,
        v_adr=v_adr,
        norm_eps=norm_eps,
        norm_floor=norm_floor,
        **vs,
    )
    return out, leaves


def _reference_backward(args, grads, create_graph: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients for v0, v1 from reference.objective re-run on the saved inputs."""
    with torch.enable_grad():
        out, leaves = reference_call(args)
        pairs = [
            (out[key], g)
            for key, g in zip(("loss", "fc_loss", "adr_loss", "per_sample"), grads, strict=True)
            if g is not None and out[key] is not None
        ]
        wanted = [x for x in leaves if x.requires_grad]
        got = (
            torch.autograd.grad(
                [o for o, _ in pairs],
                wanted,
                [g for _, g in pairs],
                allow_unused=True,
                create_graph=create_graph,
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
    by_leaf = dict(zip(map(id, wanted), got, strict=True))
    res = [by_leaf.get(id(x)) for x in leaves]
    if args[15] == op.V_SEPARATE:
        return res[0], res[1] if len(res) > 1 else None
    return res[0], None


def backward(ctx, g_loss, g_fc, g_adr, g_rows, *_unused):
    """Gradients for v0 and v1 from those of loss, fc_loss, adr_loss, per_sample."""
    grads = (g_loss, g_fc, g_adr, g_rows)
    if all(g is None for g in grads):
        return (None,) * op.N_OP_ARGS
    g0, g1, args = _saved_args(ctx)
    if torch.is_grad_enabled() and not _is_traced(args[2]):  # create_graph=True
        dv0, dv1 = _reference_backward(args, grads, create_graph=True)
    elif _is_traced(args[2]) or not args[32]:
        dv0, dv1 = _fast_backward(ctx, g0, g1, args, grads)
    else:  # backend="auto": a failing kernel falls back to the reference, once for all
        try:
            dv0, dv1 = _fast_backward(ctx, g0, g1, args, grads)
        except Exception as err:
            from . import is_out_of_memory, note_failure

            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=4)
            dv0, dv1 = _reference_backward(args, grads, create_graph=False)
    return (dv0, dv1) + (None,) * (op.N_OP_ARGS - 2)
