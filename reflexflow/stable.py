"""Stable (posterior-weighted) targets: the fast path and the reference-set ring buffer.

The stable target (Xu et al. 2023, "Stable Target Field"; docs/method.md section 3) replaces
the single-sample targets u_t and v_adr by the velocity of the posterior over a reference
set X = {x1_j}, j = 1..R (the batch, optionally followed by recent batches):

    w_ij  = softmax_j( -|| x_i - a(t_i) x1_j ||^2 / (2 s_i^2) )
    x1~_i = sum_j w_ij x1_j
    v~_i  = a'(t_i) x1~_i + s'(t_i) (x_i - a(t_i) x1~_i) / s_i ,  s_i = max(s(t_i), s_floor)

It is attention: queries x_i, keys a(t_i) x1_j, values x1_j, a per-query temperature
1 / (2 s_i^2). Dropping the per-query constant |x_i|^2, the logits are

    l_ij = (a_i / s_i^2) ( <x_i, x1_j>  -  (a_i / 2) |x1_j|^2 )

one (B x D) by (D x R) matmul (addmm onto the rank-1 term), a per-row scale of the
(B, R) logits (cheaper than scaling the (B, D) queries when R < D), a row softmax and a
(B x R) by (R x D) matmul. Reference twin:
:func:`reflexflow.reference.stable_target`. docs/stable-targets.md has the costs, the
numerics choices and the DDP rule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .paths import PathLike, get_path
from .reference import STABLE_S_FLOOR, check_stable_inputs

__all__ = ["stable_target", "StableReferenceBank", "STABLE_S_FLOOR"]


@torch.no_grad()
def stable_target(
    path: PathLike,
    x: Tensor,
    t: Tensor,
    ref_x1: Tensor,
    *,
    mask: Tensor | None = None,
    s_floor: float = STABLE_S_FLOOR,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Posterior-weighted velocity target v~(x, t) over the references ref_x1 (fast path).

        l_ij = (a_i / s_i^2) (<x_i, x1_j> - (a_i / 2) |x1_j|^2)   (-inf where not mask)
        w = softmax_j(l),  x1~ = w @ X,  v~ = a' x1~ + s' (x - a x1~) / s,  s = max(s(t), s_floor)

    x (B, *S) states, t (B,) canonical times, ref_x1 (R, *S) references shared by all
    queries; mask (B, R) bool optionally restricts query i to the references j with
    mask[i, j] (e.g. the same class label; every row needs one True: checked, one host
    sync). Computes in float64 when x or ref_x1 is float64, else in float32 (bf16 / fp16
    inputs are upcast; autocast is switched off inside); returns v~ in x's dtype, and with
    return_weights also w (B, R) in the compute dtype. Never carries a gradient.
    With R = 1 (or a mask leaving each query its own x1 only) v~ equals u_t on the path
    and v_adr at a biased state; see reference.stable_target for the s_floor rule.
    """
    check_stable_inputs(x, t, ref_x1, mask)
    if not s_floor > 0:
        raise ValueError(f"s_floor must be > 0, got {s_floor}")
    dtype = torch.float64 if torch.float64 in (x.dtype, ref_x1.dtype) else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.detach().flatten(1).to(dtype)
        rf = ref_x1.detach().flatten(1).to(dtype)
        # per-query scalars in float64 (B numbers; MPS has no float64): s(t) near 0 in
        # float32 would lose digits that 1 / s amplifies
        cdt = torch.float32 if x.device.type == "mps" else torch.float64
        tt = t.detach().to(cdt)
        c = get_path(path).coefficients(tt).to(cdt)
        a, da, ds, s = c.a, c.da, c.ds, c.s.clamp_min(s_floor)
        scale = a / (s * s)  # per-query inverse temperature times a

        def col(c: Tensor) -> Tensor:
            return c.to(dtype)[:, None]

        # the per-query factors act on the (B, R) logits, not on the (B, D) queries
        half_sq = col(-0.5 * a) * torch.linalg.vector_norm(rf, dim=1).square()[None]
        logits = torch.addmm(half_sq, xf, rf.t()).mul_(col(scale))
        if mask is not None:
            logits.masked_fill_(~mask, float("-inf"))
        w = torch.softmax(logits, dim=1)
        x1_tilde = w @ rf
        residual = torch.addcmul(xf, col(a), x1_tilde, value=-1)  # x - a x1~
        v = torch.addcmul(x1_tilde.mul_(col(da)), residual, col(ds / s))
    v = v.reshape(x.shape).to(x.dtype)
    return (v, w) if return_weights else v


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StableReferenceBank:
    """Reference set of the stable target: the current batch followed by a ring buffer of
    the ``size`` most recent data samples x1 (detached, on the data's device and dtype).

    Per training step: ``ref = bank.reference(x1)`` (the batch first, so rows 0..B-1 of
    ref are x1 itself), compute the targets, then ``bank.update(x1)``. Calling update
    before reference would put the batch into the set twice.

    DDP: by default each rank's reference set is its local batch plus its local buffer,
    no communication. With ``gather=True`` the batch part is the global batch: x1 is
    all-gathered (torch.distributed.all_gather_into_tensor; every rank must pass the
    same batch shape), ordered as the local batch followed by the other ranks' batches in
    rank order, and update stores the global batch, so all ranks hold the same buffer.
    reference is then a collective call (every rank must make it); update reuses the
    global batch gathered by the preceding reference call on the same tensor object, and
    gathers again (collectively) otherwise. Without an initialised process group,
    gather=True is the local batch (a world of one).
    """

    def __init__(self, size: int, gather: bool = False) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        if not isinstance(gather, bool):
            raise TypeError(f"gather must be a bool, got {type(gather).__name__}")
        self.size = size
        self.gather = gather
        self._buffer: Tensor | None = None
        self._filled = 0
        self._next = 0
        self._last: tuple[Tensor, Tensor] | None = None  # (x1, its batch part) of reference

    def __len__(self) -> int:
        """Number of samples held in the buffer (at most size)."""
        return self._filled

    def __repr__(self) -> str:
        return f"StableReferenceBank(size={self.size}, gather={self.gather}, held={self._filled})"

    def reset(self) -> None:
        """Empty the buffer (its shape, dtype and device are set again by the next update)."""
        self._buffer, self._filled, self._next, self._last = None, 0, 0, None

    def _check(self, x1: Tensor) -> None:
        if not isinstance(x1, Tensor) or not x1.is_floating_point() or x1.dim() < 2:
            raise TypeError("x1 must be a floating-point tensor of shape (B, *S)")
        buf = self._buffer
        if buf is not None and (
            buf.shape[1:] != x1.shape[1:] or buf.dtype != x1.dtype or buf.device != x1.device
        ):
            raise ValueError(
                f"x1 must match the buffer: shape (B, {', '.join(map(str, buf.shape[1:]))}), "
                f"{buf.dtype} on {buf.device}; got {tuple(x1.shape)}, {x1.dtype} on "
                f"{x1.device} (call reset() to change them)"
            )

    def _batch_part(self, x1: Tensor) -> Tensor:
        """The local batch, or with gather the global batch with the local rows first."""
        rank, world = _world()
        if not self.gather or world == 1:
            return x1.detach()
        if self._last is not None and self._last[0] is x1:
            return self._last[1]
        local = x1.detach()
        gathered = local.new_empty((world * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(gathered, local.contiguous())
        b = local.shape[0]
        part = torch.cat([local, gathered[: rank * b], gathered[(rank + 1) * b :]])
        self._last = (x1, part)
        return part

    def reference(self, x1: Tensor) -> Tensor:
        """The reference set (R, *S): the batch part (x1, or the global batch with
        gather=True), followed by the len(self) buffered samples. No gradient."""
        self._check(x1)
        part = self._batch_part(x1)
        if self._filled == 0:
            return part
        return torch.cat([part, self._buffer[: self._filled]])

    def update(self, x1: Tensor) -> None:
        """Store the batch part of x1 (its last ``size`` rows when larger), overwriting
        the oldest samples."""
        self._check(x1)
        if self.size == 0:
            self._last = None
            return
        part = self._batch_part(x1)
        self._last = None
        if self._buffer is None:
            self._buffer = x1.new_empty((self.size, *x1.shape[1:]))
        n = min(part.shape[0], self.size)
        index = (self._next + torch.arange(n, device=x1.device)) % self.size
        self._buffer.index_copy_(0, index, part[part.shape[0] - n :])
        self._next = (self._next + n) % self.size
        self._filled = min(self._filled + n, self.size)
