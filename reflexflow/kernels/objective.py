"""The fused objective, one op in one file: ``fused_objective(path, spec, inputs)``.

Triton twin of ``reflexflow.reference.objective(path, spec, inputs)``: same
:class:`~reflexflow.objective.ObjectiveSpec` and :class:`~reflexflow.objective.
ObjectiveInputs` in, same :class:`~reflexflow.objective.ObjectiveTerms` out, same
gradients. Top to bottom (Liger-Kernel's layout): the op's flat schema with named fields
(:class:`OpArgs`, the only place that knows positions), the host forward (checks, launch
plan, launches), the op ``reflexflow::fused_objective`` (``triton_op``, on CUDA and under
the interpreter alike) with its fake twin right below it, the backward op, the autograd,
and the public functions (:func:`fused_objective`, :func:`supports`, the fail-soft policy
of backend="auto"). Kernels: objective_kernels.py; launch plan: layout.py.

The forward op returns (loss, fc_loss, adr_loss, per_sample, w, g0, g1): g0, g1 are the
gradients of ``loss`` for grad_output 1, written by the forward's single pass over the
inputs and kept for backward, which only scales them. Launches (N elements, linear/GVP
path, no torch op between them, no host sync):

* a sample fits one program (layout.SMALL_TILE_MAX): sample_kernel + finalize_kernel
  forward, scale_kernel backward: 3 launches; in eager the backward scales the stored
  gradients in place and moves no bytes when the factor is 1 (plain loss.backward()).
* larger samples: stats_kernel (when FC or the direction loss needs it), plane_kernel,
  grad_kernel, finalize_kernel forward, scale_kernel backward: at most 5 launches.
* fc_filter="fft": the larger-sample kernels, the map filtered by torch (a few launches).

Backward (:func:`_backward`): scale_kernel multiplies the workspace in place by
per-sample factors (eager; the forward op recomputes a spent or missing workspace), the
functional backward op when traced, the reference's gradients for create_graph=True or,
under fail_soft, after a failing kernel (:func:`note_failure`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from .. import reference as ref
from ..objective import FCSpec, ObjectiveInputs, ObjectiveSpec, ObjectiveTerms
from . import layout
from ._jit import INTERPRET
from .layout import (
    V_JOINT,
    V_SEPARATE,
    V_SHARED,
    Plan,
    kernel_values,
    launch,
    path_coefficients,
    path_kind,
    path_of,
    plan_of,
    unused,
    validate,
    writes_g1,
)
from .objective_kernels import (
    finalize_kernel,
    grad_kernel,
    plane_kernel,
    sample_kernel,
    scale_kernel,
    stats_kernel,
)

__all__ = [
    "fused_objective",
    "supports",
    "is_out_of_memory",
    "note_failure",
    "OpArgs",
    "fused_objective_op",
    "fused_objective_backward_op",
    "V_SEPARATE",
    "V_JOINT",
    "V_SHARED",
]

POISON = False  # tests set True: buffers start as NaN so an unwritten element shows
BLOCK = 1024  # positions per program of the larger-sample kernels
SCALE_BLOCK = 1024
SCALE_PROGRAMS = 64 if INTERPRET else 2048
_FAILED: list[str] = []  # the first failure of the Triton path under fail_soft=True


# ------------------------------------------------------------------ the op's schema


class OpArgs(NamedTuple):
    """The op's inputs by name. torch.library needs a flat schema: :meth:`pack` and
    :meth:`from_flat` are the only code that sees positions."""

    v0: Tensor  # (B, *S), or the joint (2B, *S) output when v_mode is V_JOINT
    v1: Tensor | None  # None without an ADR term, or when v0 is joint / shared
    x1: Tensor
    eps: Tensor
    x_hat: Tensor
    u0: Tensor | None
    v_adr: Tensor | None
    fc_delta: Tensor | None
    t0: Tensor
    t1: Tensor
    coef: Tensor | None  # (B, 7) path_coefficients when path_kind is 0
    k: Tensor
    fc_active: Tensor | None
    fm_weight: Tensor | None
    adr_weight: Tensor | None
    v_mode: int  # V_SEPARATE, V_JOINT or V_SHARED (v1 is v0)
    path_kind: int  # 1 linear, 2 GVP (coefficients in-kernel), 0 the table coef
    # the ObjectiveSpec, flat: its fields, and FCSpec's as fc_<field>
    lambda_adr: float
    adr_loss: str
    norm_eps: float
    norm_floor: float
    fc_lambda_fc: float
    fc_filter: str
    fc_sigma: float
    fc_size: int
    fc_cutoff: float
    fc_per_channel: bool
    fc_signed: bool
    fc_form: str
    need_g0: bool  # write the gradient workspace g0 (backward recomputes what is missing)
    need_g1: bool
    return_w: bool
    fail_soft: bool  # backend="auto": a failing backward falls back to the reference
    scale_in_place: bool  # backward may scale g0, g1 in place (the caller dropped them)

    def pack(self) -> tuple[Any, ...]:
        """The flat tuple the op takes."""
        return tuple(self)

    @classmethod
    def from_flat(cls, flat: tuple[Any, ...], named: dict[str, Any] | None = None) -> OpArgs:
        """The named arguments of the op's flat inputs (and any passed by keyword)."""
        return cls(*flat, **(named or {}))

    @staticmethod
    def spec_fields(spec: ObjectiveSpec) -> dict[str, Any]:
        """The spec's fields under OpArgs' names."""
        out = {n: getattr(spec, n) for n in _SPEC_FIELDS}
        out.update({f"fc_{n}": getattr(spec.fc, n) for n in _FC_FIELDS})
        kinds = OpArgs.__annotations__
        return {n: float(v) if kinds[n] == "float" else v for n, v in out.items()}

    def spec(self) -> ObjectiveSpec:
        """The ObjectiveSpec these arguments compute."""
        fc = FCSpec(**{n: getattr(self, f"fc_{n}") for n in _FC_FIELDS})
        return ObjectiveSpec(fc=fc, **{n: getattr(self, n) for n in _SPEC_FIELDS})

    def inputs(self) -> ObjectiveInputs:
        """The ObjectiveInputs of these arguments (v0 / v1 / v_joint per v_mode)."""
        if self.v_mode == V_JOINT:
            vs = dict(v_joint=self.v0)
        else:
            vs = dict(v0=self.v0, v1=self.v0 if self.v_mode == V_SHARED else self.v1)
        return ObjectiveInputs(**{n: getattr(self, n) for n in _DATA_FIELDS}, **vs)


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# The spec fields the kernels implement (OpArgs carries them); a spec with any other field
# off its default is ObjectiveSpec.reference_only, which supports() refuses.
_FC_FIELDS = tuple(n for n in _names(FCSpec) if f"fc_{n}" in OpArgs.__annotations__)
_SPEC_FIELDS = tuple(n for n in _names(ObjectiveSpec) if n in OpArgs.__annotations__)
_DATA_FIELDS = tuple(n for n in _names(ObjectiveInputs) if n not in ("v0", "v1", "v_joint"))
_TENSOR_FIELDS = tuple(n for n, a in OpArgs.__annotations__.items() if "Tensor" in str(a))


class OpOut(NamedTuple):
    """The op's outputs: the terms, the map w, and the gradient workspace g0, g1."""

    loss: Tensor
    fc_loss: Tensor
    adr_loss: Tensor
    per_sample: Tensor
    w: Tensor
    g0: Tensor
    g1: Tensor


# --------------------------------------------------------------- the host forward


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _outputs(a: OpArgs, p: Plan) -> OpOut:
    """The op's outputs, allocated (the fake twin returns them as they are)."""
    dev, batch, sample_shape = a.x1.device, p.batch, tuple(a.x1.shape[1:])
    loss, fc_loss, adr_loss = (_alloc((), p.out_dtype, dev) for _ in range(3))
    g0 = _alloc(a.v0.shape, a.v0.dtype, dev) if a.need_g0 else a.v0.new_empty((0,))
    g1 = _alloc(a.v1.shape, a.v1.dtype, dev) if writes_g1(a) else a.v0.new_empty((0,))
    if p.has_fc and a.return_w:
        w_shape = (batch, p.map_channels, *sample_shape[1:]) if len(sample_shape) > 1 else None
        w = _alloc(w_shape or a.x1.shape, p.w_dtype, dev)
    else:
        w = a.x1.new_empty((0,), dtype=p.w_dtype)
    per_sample = _alloc((batch,), p.out_dtype, dev)
    return OpOut(loss, fc_loss, adr_loss, per_sample, w, g0, g1)


def _forward(a: OpArgs) -> OpOut:
    """The op body (see the module docstring): checks, plan, launches."""
    validate(a, _TENSOR_FIELDS)
    p = plan_of(a)
    out = _outputs(a, p)
    values = kernel_values(a, p, out)
    plan = layout.sample_plan(p.lay, layout.SMALL_TILE_MAX) if p.filt != 3 else None
    if plan is not None:
        values["NBLK"] = 1
        values["part"] = _alloc((2, p.batch, 1), torch.float32, a.x1.device)
        _sample_path(a, p, plan, values)
    else:
        values["NBLK"] = triton.cdiv(p.lay.positions, BLOCK)
        values["part"] = _large_path(a, p, values)
    nblk = layout.next_pow2(values["NBLK"])
    values.update(BN=min(64, nblk), BB=max(1, 1024 // min(64, nblk)))
    launch(finalize_kernel, (1,), values)
    return out


def _sample_path(a: OpArgs, p: Plan, plan: layout.SamplePlan, values: dict) -> None:
    """sample_kernel: the whole objective of R samples per program."""
    lay, filtered = p.lay, p.has_fc and p.filt != 0
    n_map = p.batch * p.map_channels * lay.positions
    scratch = _alloc((n_map,), torch.float32, a.x1.device) if filtered else unused(a.x1.device)
    exact = plan.rows == 1 and plan.cb == lay.channels and plan.sb == lay.positions
    values.update(scratch=scratch, R=plan.rows, CB=plan.cb, SB=plan.sb, MASKED=not exact)
    grid = (triton.cdiv(p.batch, plan.rows),)
    launch(sample_kernel, grid, values, num_warps=plan.num_warps)


def _large_path(a: OpArgs, p: Plan, values: dict) -> Tensor:
    """stats_kernel, plane_kernel (or the torch fft of the map), grad_kernel for samples
    that do not fit one program; returns the per-program sums part (2, B, NBLK)."""
    dev, f32, lay, nblk = a.x1.device, torch.float32, p.lay, values["NBLK"]
    rows = p.batch * p.map_channels
    norms_needed = p.has_v1 and a.adr_loss == "direction"
    nplanes = rows * lay.frames
    v = dict(values, BLOCK=BLOCK, NORMS=norms_needed)
    v["map_raw"] = _alloc((rows, lay.positions), f32, dev) if p.has_fc else unused(dev)
    v["part"] = _alloc((3, p.batch, nblk), f32, dev) if norms_needed else unused(dev)
    if p.has_fc or norms_needed:
        need_delta = (p.has_fc and not v["HAS_FCD"]) or (norms_needed and not v["HAS_VA"])
        launch(stats_kernel, (p.batch * nblk,), dict(v, NEED_DELTA=need_delta))
    v["norms"] = _alloc((p.batch, 3), f32, dev) if norms_needed else unused(dev)
    v["plane_sum"] = _alloc((nplanes,), f32, dev) if p.has_fc else unused(dev)
    v["mapf"] = unused(dev)
    if p.has_fc and p.filt == 3:  # fft: torch on the map (N / C elements), then the norms
        sizes = (lay.height, lay.width) if lay.n_axes == 2 else (lay.width,)
        m = v["map_raw"].view(nplanes, *sizes)
        m = ref._fft_lowpass(m, a.fc_cutoff, lay.n_axes, not a.fc_signed)
        v["mapf"] = m.reshape(rows, lay.positions).contiguous()
        v["plane_sum"] = (m.abs() if a.fc_signed else m).reshape(nplanes, -1).sum(dim=1)
    run_planes = p.has_fc and p.filt != 3
    if run_planes or norms_needed:
        filtered = run_planes and p.filt != 0
        if filtered:
            v["mapf"] = _alloc((rows, lay.positions), f32, dev)
        elif run_planes:
            v["mapf"] = v["map_raw"]
        two_pass = filtered and lay.n_axes == 2
        v["tmp"] = _alloc((rows, lay.positions), f32, dev) if two_pass else unused(dev)
        n_launch = nplanes if run_planes else 0
        planes = dict(v, NPLANES=n_launch, HAS_FC=run_planes, FILT=p.filt if filtered else 0)
        planes.update(src=v["map_raw"], dst=v["mapf"])
        planes["BN"] = min(256, layout.next_pow2(nblk))
        launch(plane_kernel, (n_launch + (p.batch if norms_needed else 0),), planes)
    part = _alloc((2, p.batch, nblk), f32, dev)
    need_delta = p.has_v1 and not v["HAS_VA"]
    grads = dict(v, part=part, NEED_DELTA=need_delta, NEED_X=need_delta or not v["HAS_U0"])
    grads["BN"] = min(64, layout.next_pow2(lay.channels * lay.frames))
    launch(grad_kernel, (p.batch * nblk,), grads)
    return part


# ------------------------------------------------------------------------ the ops


@triton_op("reflexflow::fused_objective", mutates_args=())
def fused_objective_op(
    v0: Tensor,
    v1: Tensor | None,
    x1: Tensor,
    eps: Tensor,
    x_hat: Tensor,
    u0: Tensor | None,
    v_adr: Tensor | None,
    fc_delta: Tensor | None,
    t0: Tensor,
    t1: Tensor,
    coef: Tensor | None,
    k: Tensor,
    fc_active: Tensor | None,
    fm_weight: Tensor | None,
    adr_weight: Tensor | None,
    v_mode: int,
    path_kind: int,
    lambda_adr: float,
    adr_loss: str,
    norm_eps: float,
    norm_floor: float,
    fc_lambda_fc: float,
    fc_filter: str,
    fc_sigma: float,
    fc_size: int,
    fc_cutoff: float,
    fc_per_channel: bool,
    fc_signed: bool,
    fc_form: str,
    need_g0: bool,
    need_g1: bool,
    return_w: bool,
    fail_soft: bool,
    scale_in_place: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op: OpArgs' fields, flat (torch.library's schema); see :func:`_forward`."""
    return tuple(_forward(OpArgs(**locals())))  # the parameters are exactly OpArgs' fields


@fused_objective_op.register_fake
def _fused_objective_fake(*flat: Any, **named: Any) -> tuple[Tensor, ...]:
    """Fake twin: the forward's checks and allocations, no launch."""
    a = OpArgs.from_flat(flat, named)
    validate(a, _TENSOR_FIELDS)
    return tuple(_outputs(a, plan_of(a)))


def _scaled_copies(
    src0: Tensor,
    src1: Tensor | None,
    g_loss: Tensor | None,
    g_term0: Tensor | None,
    g_term1: Tensor | None,
    g_rows: Tensor | None,
    batch: int,
    joint: bool,
    factors: list[float],
) -> tuple[Tensor, Tensor]:
    """The backward op's body (traced graphs): (s0 src0, s1 src1), per-sample factors
    s = a g_loss + f g_term + p B g_rows[b] (factors (a0, f0, p0, a1, f1, p1), see
    scale_kernel). joint: src0 is the (2B, ...) gradient, its halves scale with s0, s1."""
    out0 = torch.empty_like(src0)
    out1 = torch.empty_like(src1) if src1 is not None else src0.new_empty((0,))
    grads = (g_loss, g_term0, g_term1, g_rows)
    dst = (out0, out1 if src1 is not None else None)
    _scale((src0, src1), dst, grads, batch, joint, factors, in_place=False, traced=True)
    return out0, out1


fused_objective_backward_op = triton_op("reflexflow::fused_objective_backward", mutates_args=())(
    _scaled_copies
)


def _scale(src, dst, grads, batch, joint, factors, in_place: bool, traced: bool) -> None:
    """Launch scale_kernel: dst = s * src for the stored gradients (src, dst: (region 0,
    region 1 or None)); grads (g_loss, g_term0, g_term1, g_rows), None where absent."""
    dev, g_rows = src[0].device, grads[3]
    per_sample = src[0].numel() // (2 * batch if joint else batch)
    nblk = triton.cdiv(per_sample, SCALE_BLOCK)
    pointers = dict(zip(("src0", "src1", "dst0", "dst1"), (*src, *dst), strict=True))
    pointers.update(zip(("g_loss", "g_term0", "g_term1", "g_rows"), grads, strict=True))
    flags = ("HAS_GL", "HAS_G0", "HAS_G1", "HAS_GR")
    given = {flag: g is not None for flag, g in zip(flags, grads, strict=True)}
    values = dict(
        {n: x if x is not None else unused(dev) for n, x in pointers.items()},
        **dict(zip(("a0", "f0", "p0", "a1", "f1", "p1"), factors, strict=True)),
        **given,
        rows_stride=g_rows.stride(0) if g_rows is not None else 0,
        B=batch,
        S=per_sample,
        NBLK=nblk,
        TWO=joint or src[1] is not None,
        JOINT=joint,
        IN_PLACE=in_place,
        BLOCK=SCALE_BLOCK,
    )
    items = (2 if values["TWO"] else 1) * batch * nblk
    launch(scale_kernel, (min(items, SCALE_PROGRAMS),), values, traced=traced)


# ------------------------------------------------------------------------ autograd


def _is_traced(t: Tensor) -> bool:
    """True for the fake / functional tensors of torch.compile and make_fx tracing."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)


def _setup_context(ctx, inputs, output) -> None:
    """Save the gradient workspace and every tensor input for backward."""
    a, out = OpArgs.from_flat(inputs), OpOut(*output)
    ctx.save_for_backward(out.g0, out.g1, *(getattr(a, n) for n in _TENSOR_FIELDS))
    ctx.args = a._replace(**dict.fromkeys(_TENSOR_FIELDS))  # the non-tensor arguments
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(out.w, out.g0, out.g1)
    ctx.consumed = False


def _saved(ctx) -> tuple[Tensor, Tensor, OpArgs]:
    g0, g1, *tensors = ctx.saved_tensors
    return g0, g1, ctx.args._replace(**dict(zip(_TENSOR_FIELDS, tensors, strict=True)))


def _scale_factors(v_mode: int, lambda_adr: float, regions: list[int]) -> list[float]:
    """(a0, f0, p0, a1, f1, p1) for the stored gradients of ``regions`` (0: v0, 1: v1).

    v0: d loss/d v0 = g0 (g_loss + g_fc + B g_rows). v1 (stored with c1 = lambda_adr, or
    1 when lambda_adr = 0): g1 (g_loss + g_adr / lambda + B g_rows), or g1 g_adr when
    lambda_adr = 0. Shared (one buffer, G0 + lambda G1): g (g_loss + B g_rows).
    """
    if v_mode == V_SHARED:
        table = {0: (1.0, 0.0, 1.0)}
    elif lambda_adr != 0:
        table = {0: (1.0, 1.0, 1.0), 1: (1.0, 1.0 / lambda_adr, 1.0)}
    else:
        table = {0: (1.0, 1.0, 1.0), 1: (0.0, 1.0, 0.0)}
    second = table[regions[1]] if len(regions) > 1 else (0.0, 0.0, 0.0)
    return [*table[regions[0]], *second]


def _fast_backward(ctx, g0: Tensor, g1: Tensor, a: OpArgs, grads: tuple) -> tuple:
    """Scale the stored gradients (recomputing them first when spent or missing)."""
    g_loss, g_fc, g_adr, g_rows = grads
    batch, traced = a.x1.shape[0], _is_traced(a.x1)
    needs = OpArgs.from_flat(ctx.needs_input_grad)
    need0, need1 = needs.v0, needs.v1
    missing = (need0 and g0.numel() == 0) or (need1 and g1.numel() == 0)
    shared_split = a.v_mode == V_SHARED and (g_fc is not None or g_adr is not None)
    recompute = ctx.consumed or shared_split or missing
    if recompute:
        if shared_split:
            a = a._replace(v1=a.v0, v_mode=V_SEPARATE)
        a = a._replace(need_g0=True, need_g1=True, return_w=False)
        out = OpOut(*fused_objective_op(*a.pack()))
        g0, g1 = out.g0, out.g1
    joint = a.v_mode == V_JOINT
    bufs = [(g, r) for g, r in ((g0, 0), (g1, 1)) if g.numel() > 0]
    if not bufs:
        return None, None
    regions = [0, 1] if joint else [r for _, r in bufs]
    terms = {0: g_fc, 1: g_adr}
    factors = _scale_factors(a.v_mode, a.lambda_adr, regions)
    src = (bufs[0][0], bufs[1][0] if len(bufs) > 1 else None)
    term1 = terms[regions[1]] if len(regions) > 1 else None
    scale_grads = (g_loss, terms[regions[0]], term1, g_rows)
    if traced:
        dst = fused_objective_backward_op(*src, *scale_grads, batch, joint, factors)
        dst = (dst[0], dst[1] if src[1] is not None else None)
    elif recompute or a.scale_in_place:  # the buffers are ours: in place, skip factors of 1
        _scale(src, src, scale_grads, batch, joint, factors, in_place=True, traced=False)
        dst = src
        ctx.consumed = ctx.consumed or not recompute
    else:  # a direct caller holds them: scale into new tensors
        dst = tuple(torch.empty_like(s) if s is not None else None for s in src)
        _scale(src, dst, scale_grads, batch, joint, factors, in_place=False, traced=False)
    scaled = {r: d for (_, r), d in zip(bufs, dst, strict=False)}
    if shared_split:
        return scaled[0] + scaled[1], None
    return (scaled.get(0) if need0 else None), (scaled.get(1) if need1 else None)


def _reference_backward(a: OpArgs, grads: tuple, create_graph: bool) -> tuple:
    """Gradients for v0, v1 from the reference objective re-run on the saved inputs."""
    path = path_of(a.path_kind, a.t0, a.t1, a.coef)
    leaves = [a.v0] + ([a.v1] if a.v_mode == V_SEPARATE and a.v1 is not None else [])
    with torch.enable_grad():
        terms = ref.objective(path, a.spec(), a.inputs())
        outs = (terms.loss, terms.fc_loss, terms.adr_loss, terms.per_sample)
        pairs = [
            (o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o is not None
        ]
        wanted = [x for x in leaves if x.requires_grad]
        got = [None] * len(wanted)
        if pairs and wanted:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                wanted,
                [g for _, g in pairs],
                allow_unused=True,
                create_graph=create_graph,
            )
    by_leaf = dict(zip(map(id, wanted), got, strict=True))
    res = [by_leaf.get(id(x)) for x in leaves]
    return res[0], res[1] if len(res) > 1 else None


def _input_grads(dv0: Tensor | None, dv1: Tensor | None) -> tuple:
    """The gradients of the op's inputs: v0's and v1's, None for every other input."""
    return OpArgs(**dict.fromkeys(OpArgs._fields))._replace(v0=dv0, v1=dv1).pack()


def _backward(ctx, g_loss, g_fc, g_adr, g_rows, *_unused_grads):
    """Gradients for v0 and v1 from those of loss, fc_loss, adr_loss, per_sample."""
    grads = (g_loss, g_fc, g_adr, g_rows)
    if all(g is None for g in grads):
        return _input_grads(None, None)
    g0, g1, a = _saved(ctx)
    if torch.is_grad_enabled() and not _is_traced(a.x1):  # create_graph=True
        dv = _reference_backward(a, grads, create_graph=True)
    elif _is_traced(a.x1) or not a.fail_soft:
        dv = _fast_backward(ctx, g0, g1, a, grads)
    else:  # backend="auto": a failing kernel falls back to the reference, once for all
        try:
            dv = _fast_backward(ctx, g0, g1, a, grads)
        except Exception as err:
            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=4)
            dv = _reference_backward(a, grads, create_graph=False)
    return _input_grads(*dv)


fused_objective_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public functions


_SAMPLE_TENSORS = ("x1", "eps", "x_hat", "u0", "v_adr", "fc_delta")
_ROW_TENSORS = ("t0", "t1", "k", "fc_active", "fm_weight", "adr_weight")
_NO_GRAD = ("x1", "eps", "x_hat", "u0")  # the op differentiates v0, v1, v_joint only


def _model_outputs(inputs: ObjectiveInputs) -> tuple[int, Tensor, Tensor | None]:
    """(v_mode, the op's v0, the op's v1) of inputs: joint, shared (v1 is v0) or separate."""
    v0, v1 = inputs.model_outputs()
    if inputs.v_joint is not None:
        return V_JOINT, inputs.v_joint, None
    if v1 is not None and v1 is v0:
        return V_SHARED, v0, None
    return V_SEPARATE, v0, v1


def _check_inputs(inputs: ObjectiveInputs, v_mode: int, v0: Tensor, v1: Tensor | None) -> None:
    """Shapes of every input and no gradient wanted for data (ValueError naming it)."""
    x1 = inputs.x1
    if x1.dim() < 2 or x1.shape[0] == 0:
        raise ValueError(f"x1 must have shape (B, ...) with B >= 1, got {tuple(x1.shape)}")
    shape, batch = tuple(x1.shape), x1.shape[0]
    v_shape = (2 * batch, *shape[1:]) if v_mode == V_JOINT else shape
    named = [("v_joint" if v_mode == V_JOINT else "v0", v0, v_shape), ("v1", v1, shape)]
    named += [(n, getattr(inputs, n), shape) for n in _SAMPLE_TENSORS]
    named += [(n, getattr(inputs, n), (batch,)) for n in _ROW_TENSORS]
    for name, x, want in named:
        if x is not None and tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if torch.is_grad_enabled():
        for name in _NO_GRAD:
            x = getattr(inputs, name)
            if x is not None and x.requires_grad:
                raise ValueError(
                    f"{name} requires grad: the fused objective differentiates v0 and v1 "
                    "only (use the reference, backend='torch')"
                )


def _op_args(path: Any, spec: ObjectiveSpec, inputs: ObjectiveInputs, **flags: bool) -> OpArgs:
    """The op's arguments for (path, spec, inputs): contiguous tensors (one copy, only
    when strided), the v mode, the path's kind (or coefficient table). flags: return_w,
    fail_soft."""
    v_mode, v0, v1 = _model_outputs(inputs)
    _check_inputs(inputs, v_mode, v0, v1)
    kind = path_kind(path)
    grad_on = torch.is_grad_enabled()

    def c(name: str) -> Tensor | None:
        x = getattr(inputs, name)
        return None if x is None else x.detach().contiguous()

    return OpArgs(
        v0=v0.contiguous(),
        v1=None if v1 is None else v1.contiguous(),
        **{n: c(n) for n in (*_SAMPLE_TENSORS, *_ROW_TENSORS)},
        coef=path_coefficients(path, inputs.t0, inputs.t1) if kind == 0 else None,
        v_mode=v_mode,
        path_kind=kind,
        **OpArgs.spec_fields(spec),
        need_g0=grad_on and v0.requires_grad,
        need_g1=grad_on and v1 is not None and v1.requires_grad,
        return_w=flags["return_w"],
        fail_soft=flags["fail_soft"],
        scale_in_place=True,  # the workspace outputs are dropped: backward scales in place
    )


def _fused(path, spec, inputs, return_w: bool, fail_soft: bool) -> ObjectiveTerms:
    a = _op_args(path, spec, inputs, return_w=return_w, fail_soft=fail_soft)
    out = OpOut(*fused_objective_op(*a.pack()))
    has_v1 = a.v_mode != V_SEPARATE or a.v1 is not None
    return ObjectiveTerms(
        loss=out.loss,
        fc_loss=out.fc_loss,
        per_sample=out.per_sample,
        adr_loss=out.adr_loss if has_v1 else None,
        w=out.w if spec.fc.lambda_fc != 0 and return_w else None,
    )


def fused_objective(
    path: Any,
    spec: ObjectiveSpec,
    inputs: ObjectiveInputs,
    *,
    return_w: bool = True,
    fail_soft: bool = False,
) -> ObjectiveTerms:
    """Triton twin of ``reference.objective(path, spec, inputs)``: same terms and
    gradients, L = L_FC + lambda_adr L_ADR with, per sample, fc_i = fm_weight_i mean(W
    (v0 - u0)^2) (W = w, or w^2 for form "squared") and adr_i = adr_weight_i * the ADR
    term (mse or direction).

    Returns loss, fc_loss, adr_loss (None without v1), per_sample (B,), w (None when
    lambda_fc = 0 or return_w=False: writing it costs N / C stores); v_adr = delta = None
    (they stay in registers). With v_joint the gradient comes back in that layout; with
    v1 the same tensor as v0 (fm_input "biased") one gradient G0 + G1. Compute is fp32
    (route fp64 to the reference, see :func:`supports`). Differentiates v0, v1 or v_joint
    only: x1, eps, x_hat, u0 requiring grad are refused (ValueError).

    fail_soft=True is backend="auto": when the Triton path fails to compile or launch,
    forward or backward, one RuntimeWarning and the reference from then on for the whole
    process; argument errors (ValueError, TypeError) and out-of-memory errors propagate.
    """
    if not fail_soft:
        return _fused(path, spec, inputs, return_w, fail_soft=False)
    if not _FAILED:
        try:
            return _fused(path, spec, inputs, return_w, fail_soft=True)
        except (ValueError, TypeError):
            raise
        except Exception as err:  # a Triton compile/launch failure: fail soft
            if is_out_of_memory(err):
                raise
            note_failure(err, stacklevel=2)
    return ref.objective(path, spec, inputs)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure (torch.OutOfMemoryError, a CUDA "out of memory"): never a
    reason to leave the kernels, as the reference needs more memory still."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def note_failure(err: BaseException, stacklevel: int = 2) -> None:
    """Record the Triton path's failure under fail_soft: one RuntimeWarning, and
    fused_objective(..., fail_soft=True) uses the reference from now on."""
    if not _FAILED:
        warnings.warn(
            f"reflexflow: the Triton loss kernels failed ({err!r}); backend='auto' uses "
            "the PyTorch reference from now on (backend='triton' shows the error)",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
    _FAILED.append(repr(err))


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def supports(path: Any, spec: ObjectiveSpec, inputs: ObjectiveInputs) -> bool:
    """True when :func:`fused_objective` computes this call, False when it must stay on
    the reference: a device Triton cannot run here (CUDA needs triton; CPU needs
    TRITON_INTERPRET=1), float64 tensors (the kernels compute in fp32), x1, eps, x_hat
    or u0 requiring grad while grad mode is on, an empty batch, a spec with an option the
    kernels do not implement (``spec.reference_only``: the peers' FC normalisation, channel
    reduction, FC added to FM, an ADR target with gradient). Every other spec, any layout,
    strides and path take the fused path. Metadata only."""
    from . import triton_usable

    if spec.reference_only:
        return False

    v, x1 = inputs.v_joint if inputs.v_joint is not None else inputs.v0, inputs.x1
    if not isinstance(v, Tensor) or not isinstance(x1, Tensor):
        return False
    if not triton_usable(x1.device.type) or x1.dim() < 2 or x1.shape[0] == 0:
        return False
    grad_on = torch.is_grad_enabled()
    names = ("v0", "v1", "v_joint", *_SAMPLE_TENSORS, "fm_weight", "adr_weight")
    for name in names:
        x = getattr(inputs, name)
        if x is None:
            continue
        if not isinstance(x, Tensor) or x.device != x1.device or x.dtype not in _FLOATS:
            return False
        if name in _NO_GRAD and grad_on and x.requires_grad:
            return False
    return True
