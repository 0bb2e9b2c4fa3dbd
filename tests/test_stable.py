"""Stable (posterior-weighted) targets: reflexflow.stable against reference.stable_target.

Twin test: the fast path (expanded logits, two matmuls) on inputs rounded to the dtype,
against the reference (literal squared distances) in float64 on the same rounded inputs.
Tolerance as max |error| over max |reference|: fp64 1e-12, fp32 1e-5, bf16 1e-2 (the
result is rounded to bf16). Data: clustered samples (spread 0.3 around a common centre),
so that at middle times the weights are spread over several references, not one-hot.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow import stable
from reflexflow.paths import get_path
from tests.helpers import ConvVelocity

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16"}
T_EPS = 1e-3
BATCH, SHAPE, EXTRA = 6, (2, 3, 4), 10


class SquarePath:
    """A user path (not shipped): a = t^2, s = 1 - t^2."""

    def a(self, t):
        return t * t

    def s(self, t):
        return 1 - t * t

    def da(self, t):
        return 2 * t

    def ds(self, t):
        return -2 * t


def _path(name):
    return SquarePath() if name == "square" else get_path(name)


PATH_NAMES = ["linear", "gvp", "vp", "square"]


def _times(regime: str, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(BATCH, generator=g, dtype=torch.float64)
    if regime == "near0":
        return 2e-3 * u
    if regime == "middle":
        return 0.3 + 0.4 * u
    return 1 - T_EPS - 1e-3 * u  # near 1 - t_eps, the largest t the loss allows


def _data(path, regime: str, refs: str, seed: int = 0):
    """x1 (B, *S), eps, t (B,), a biased state x, and the reference set, float64."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(SHAPE, generator=g, dtype=torch.float64)

    def cluster(n):
        return centre + 0.3 * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)

    x1, eps = cluster(BATCH), torch.randn(BATCH, *SHAPE, generator=g, dtype=torch.float64)
    t = _times(regime, g)
    x = ref.interpolate(path, x1, eps, t) + 0.05 * torch.randn(x1.shape, generator=g).double()
    ref_x1 = {"one": x1[:1], "batch": x1, "more": torch.cat([x1, cluster(EXTRA)])}[refs]
    return x1, eps, t, x, ref_x1


def _rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _round(dtype, *tensors):
    return [z.to(dtype) for z in tensors]


@pytest.mark.parametrize("refs", ["one", "batch", "more"], ids=["R1", "RB", "R>B"])
@pytest.mark.parametrize("regime", ["near0", "middle", "near1"])
@pytest.mark.parametrize("path_name", PATH_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_fast_path_matches_reference_per_dtype_path_time_and_reference_size(
    dtype, path_name, regime, refs
):
    path = _path(path_name)
    _, _, t, x, ref_x1 = _data(path, regime, refs)
    x, ref_x1 = _round(dtype, x, ref_x1)
    t = t if dtype == torch.float64 else t.float()
    v, w = stable.stable_target(path, x, t, ref_x1, return_weights=True)
    v_ref, w_ref = ref.stable_target(
        path, x.double(), t.double(), ref_x1.double(), return_weights=True
    )
    assert v.dtype == x.dtype and v.shape == x.shape
    assert w.shape == (x.shape[0], ref_x1.shape[0])
    assert _rel_err(v, v_ref) <= TOL[dtype]
    assert float((w.double() - w_ref).abs().max()) <= max(TOL[dtype], 1e-5)
    if regime == "middle" and refs != "one":  # the softmax is exercised, not one-hot
        assert float(w_ref.max(dim=1).values.min()) < 0.9


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("regime", ["near0", "middle", "near1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_weights_are_nonnegative_and_sum_to_one(impl, regime, dtype):
    path = get_path("linear")
    _, _, t, x, ref_x1 = _data(path, regime, "more", seed=1)
    x, ref_x1 = _round(dtype, x, ref_x1)
    _, w = impl(path, x, t, ref_x1, return_weights=True)
    assert bool((w >= 0).all())
    torch.testing.assert_close(w.sum(dim=1), torch.ones_like(w[:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("path_name", PATH_NAMES)
@pytest.mark.parametrize("tol,dtype", [(1e-10, torch.float64), (1e-4, torch.float32)])
def test_own_sample_only_gives_the_fm_target_u_t_exactly(impl, path_name, tol, dtype):
    """R = 1 per query (mask = identity over the batch, and literally R = 1): v~ = u_t.

    fp64: 1e-10 relative; fp32: 1e-4, the rounding of x_t divided by s(t) >= 1e-3."""
    path = _path(path_name)
    g = torch.Generator().manual_seed(2)
    x1, eps = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1 - T_EPS, 16, dtype=torch.float64)
    x_t = ref.interpolate(path, x1, eps, t)
    u_t = ref.velocity_target(path, x1, eps, t)
    x1_r, x_r, t_r = x1.to(dtype), x_t.to(dtype), t.to(dtype)
    eye = torch.eye(16, dtype=torch.bool)
    v = impl(path, x_r, t_r, x1_r, mask=eye)
    assert _rel_err(v, u_t) <= tol
    for i in (0, 7, 15):
        one = impl(path, x_r[i : i + 1], t_r[i : i + 1], x1_r[i : i + 1])
        assert _rel_err(one, u_t[i : i + 1]) <= tol


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("path_name", PATH_NAMES)
@pytest.mark.parametrize("tol,dtype", [(1e-10, torch.float64), (1e-4, torch.float32)])
def test_own_sample_only_gives_the_adr_target_v_adr_exactly(impl, path_name, tol, dtype):
    """R = 1 at a biased state x^_t1: v~(x^, t1) = a' x1 + s' (x^ - a x1) / s = v_adr."""
    path = _path(path_name)
    g = torch.Generator().manual_seed(3)
    x1, eps, bias = torch.randn(3, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    t1 = torch.linspace(0.05, 1 - T_EPS, 16, dtype=torch.float64)
    x_hat = ref.interpolate(path, x1, eps, t1) + 0.3 * bias
    v_adr = ref.adr_target(path, x1, eps, x_hat, t1)
    eye = torch.eye(16, dtype=torch.bool)
    v = impl(path, x_hat.to(dtype), t1.to(dtype), x1.to(dtype), mask=eye)
    assert _rel_err(v, v_adr) <= tol


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_weights_are_uniform_where_a_is_zero(impl, dtype):
    """Linear path at t = 0: a = 0, every reference equally likely, x1~ = mean."""
    path = get_path("linear")
    g = torch.Generator().manual_seed(4)
    x, ref_x1 = torch.randn(5, 7, generator=g).to(dtype), torch.randn(9, 7, generator=g).to(dtype)
    t = torch.zeros(5)
    v, w = impl(path, x, t, ref_x1, return_weights=True)
    torch.testing.assert_close(w, torch.full_like(w, 1 / 9), rtol=1e-6, atol=0)
    cdt = w.dtype
    want = ref_x1.to(cdt).mean(0) - x.to(cdt)  # a'(0) x1~ + s'(0) (x - 0) / 1
    assert _rel_err(v, want.expand_as(v)) <= TOL[dtype]


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("path_name", ["linear", "gvp", "vp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_weights_collapse_to_the_own_sample_near_one_without_nan(impl, path_name, dtype):
    """t = 1 - t_eps: the temperature 1 / (2 s^2) is large; log-sum-exp keeps it finite
    and the weights are one-hot on the nearest reference (the state's own x1)."""
    path = get_path(path_name)
    x1, eps, t, x, ref_x1 = _data(path, "near1", "more", seed=5)
    x, ref_x1 = _round(dtype, x, ref_x1)
    v, w = impl(path, x, t.float(), ref_x1, return_weights=True)
    assert torch.isfinite(v).all() and torch.isfinite(w).all()
    assert torch.equal(w.argmax(dim=1), torch.arange(BATCH))
    torch.testing.assert_close(w.max(dim=1).values, torch.ones(BATCH), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_t_equal_one_is_finite_and_gives_the_marginal_velocity(impl, dtype):
    """s(1) = 0 is floored: no division by zero; at x = x1 (linear, t = 1) the target is
    a'(1) x1~ = x1, the marginal velocity (eps is not identifiable from x at s = 0)."""
    path = get_path("linear")
    x1, _, _, _, ref_x1 = _data(path, "middle", "more", seed=6)
    x1, ref_x1 = _round(dtype, x1, ref_x1)
    v = impl(path, x1, torch.ones(BATCH, dtype=x1.dtype), ref_x1)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, x1, rtol=0, atol=0)


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
def test_target_carries_no_gradient(impl):
    path = get_path("gvp")
    _, _, t, x, ref_x1 = _data(path, "middle", "more", seed=7)
    x, t, ref_x1 = (z.clone().requires_grad_() for z in (x, t, ref_x1))
    with torch.enable_grad():
        v, w = impl(path, x, t, ref_x1, return_weights=True)
    assert not v.requires_grad and v.grad_fn is None
    assert not w.requires_grad and w.grad_fn is None


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
def test_mask_gives_zero_weight_outside_and_equals_the_restricted_reference_set(impl):
    path = get_path("linear")
    _, _, t, x, ref_x1 = _data(path, "middle", "more", seed=8)
    g = torch.Generator().manual_seed(8)
    mask = torch.rand(BATCH, ref_x1.shape[0], generator=g) < 0.5
    mask[:, 0] = True
    v, w = impl(path, x, t, ref_x1, mask=mask, return_weights=True)
    assert bool((w[~mask] == 0).all())
    for i in range(BATCH):
        alone = ref.stable_target(path, x[i : i + 1], t[i : i + 1], ref_x1[mask[i]])
        torch.testing.assert_close(v[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def test_fast_path_ignores_autocast():
    path = get_path("linear")
    _, _, t, x, ref_x1 = _data(path, "middle", "more", seed=9)
    x, ref_x1, t = x.float(), ref_x1.float(), t.float()
    plain = stable.stable_target(path, x, t, ref_x1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = stable.stable_target(path, x, t, ref_x1)
    assert torch.equal(plain, under)


@pytest.mark.compile
def test_fast_path_compiles_without_graph_break():
    """torch.compile(fullgraph=True) captures stable_target whole (aot_eager backend: the
    graph capture is what a compiled loss needs; no C++ code generation here)."""
    path = get_path("gvp")
    _, _, t, x, ref_x1 = _data(path, "middle", "more", seed=13)
    x, t, ref_x1 = x.float(), t.float(), ref_x1.float()
    compiled = torch.compile(
        lambda x, t, r: stable.stable_target(path, x, t, r), backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(compiled(x, t, ref_x1), stable.stable_target(path, x, t, ref_x1))


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
def test_compute_dtype_follows_the_widest_input_and_result_has_x_dtype(impl):
    path = get_path("linear")
    _, _, t, x, ref_x1 = _data(path, "middle", "batch", seed=10)
    v, w = impl(path, x.bfloat16(), t.float(), ref_x1.float(), return_weights=True)
    assert v.dtype == torch.bfloat16 and w.dtype == torch.float32
    v, w = impl(path, x.float(), t.float(), ref_x1, return_weights=True)
    assert v.dtype == torch.float32 and w.dtype == torch.float64


@pytest.mark.parametrize("impl", [ref.stable_target, stable.stable_target], ids=["ref", "fast"])
def test_bad_arguments_are_rejected_by_name(impl):
    path = get_path("linear")
    x, ref_x1, t = torch.randn(4, 3), torch.randn(5, 3), torch.rand(4)
    with pytest.raises(ValueError, match="t must have shape"):
        impl(path, x, t[:3], ref_x1)
    with pytest.raises(ValueError, match="ref_x1 must have shape"):
        impl(path, x, t, torch.randn(5, 4))
    with pytest.raises(ValueError, match="ref_x1 must have shape"):
        impl(path, x, t, torch.randn(0, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        impl(path, x[0], t[:1], ref_x1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        impl(path, x.long(), t, ref_x1)
    with pytest.raises(TypeError, match="mask must be a bool"):
        impl(path, x, t, ref_x1, mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="mask must have shape"):
        impl(path, x, t, ref_x1, mask=torch.ones(4, 4, dtype=torch.bool))
    empty_row = torch.ones(4, 5, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="at least one reference in every row"):
        impl(path, x, t, ref_x1, mask=empty_row)
    with pytest.raises(ValueError, match="s_floor must be > 0"):
        impl(path, x, t, ref_x1, s_floor=0.0)


def test_high_dimensional_weights_collapse_except_at_high_noise():
    """docs/method.md's caveat, measured: D = 4096, 16 independent samples; the own sample
    takes nearly all the weight at t = 0.5, while near t = 0 the weights are spread."""
    path = get_path("linear")
    g = torch.Generator().manual_seed(11)
    x1, eps = torch.randn(2, 16, 4, 32, 32, generator=g)
    own = []
    for t_value in (0.02, 0.5):
        t = torch.full((16,), t_value)
        _, w = stable.stable_target(
            path, ref.interpolate(path, x1, eps, t), t, x1, return_weights=True
        )
        own.append(float(w.diagonal().mean()))
    assert own[0] < 0.5 and own[1] > 0.999
    assert not math.isnan(sum(own))


# --- the reference bank -------------------------------------------------------------------


def _ids(batch: torch.Tensor) -> list[int]:
    """Rows are filled with their sample id: the sorted ids of a set of rows."""
    return sorted(int(v) for v in batch[:, 0, 0])


def _batch(first: int, n: int) -> torch.Tensor:
    return torch.arange(first, first + n, dtype=torch.float32).view(n, 1, 1).expand(n, 2, 3).clone()


def test_bank_reference_is_the_batch_followed_by_the_most_recent_samples():
    bank = stable.StableReferenceBank(5)
    b0, b1, b2 = _batch(0, 3), _batch(10, 3), _batch(20, 3)
    assert torch.equal(bank.reference(b0), b0) and len(bank) == 0
    bank.update(b0)
    got = bank.reference(b1)
    assert torch.equal(got[:3], b1) and _ids(got[3:]) == [0, 1, 2]
    bank.update(b1)
    got = bank.reference(b2)
    assert torch.equal(got[:3], b2) and _ids(got[3:]) == [1, 2, 10, 11, 12]
    assert len(bank) == 5


def test_bank_keeps_the_last_rows_of_a_batch_larger_than_its_size():
    bank = stable.StableReferenceBank(4)
    bank.update(_batch(0, 3))
    bank.update(_batch(10, 6))
    assert _ids(bank.reference(_batch(50, 1))[1:]) == [12, 13, 14, 15]


def test_bank_stores_a_detached_copy_in_the_data_dtype():
    bank = stable.StableReferenceBank(4)
    x1 = _batch(0, 2).double().requires_grad_()
    bank.update(x1)
    with torch.no_grad():
        x1.mul_(0)  # the buffer holds a copy
    got = bank.reference(torch.full((1, 2, 3), 7.0, dtype=torch.float64))
    assert got.dtype == torch.float64 and not got.requires_grad
    assert _ids(got[1:]) == [0, 1]
    assert not bank.reference(x1).requires_grad


def test_bank_of_size_zero_is_the_batch_alone():
    bank = stable.StableReferenceBank(0)
    bank.update(_batch(0, 3))
    assert torch.equal(bank.reference(_batch(5, 2)), _batch(5, 2)) and len(bank) == 0


def test_bank_rejects_a_changed_shape_or_dtype_until_reset_and_bad_arguments():
    bank = stable.StableReferenceBank(4)
    bank.update(_batch(0, 2))
    with pytest.raises(ValueError, match="x1 must match the buffer"):
        bank.reference(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="x1 must match the buffer"):
        bank.update(_batch(0, 2).double())
    bank.reset()
    bank.update(torch.zeros(2, 3, 2))
    assert len(bank) == 2
    with pytest.raises(ValueError, match="size must be an int"):
        stable.StableReferenceBank(-1)
    with pytest.raises(ValueError, match="size must be an int"):
        stable.StableReferenceBank(2.0)
    with pytest.raises(TypeError, match="gather must be a bool"):
        stable.StableReferenceBank(2, gather=1)
    with pytest.raises(TypeError, match="x1 must be a floating-point"):
        bank.update(torch.zeros(2, dtype=torch.long))


def test_bank_gather_without_a_process_group_is_the_local_batch():
    bank = stable.StableReferenceBank(4, gather=True)
    bank.update(_batch(0, 2))
    got = bank.reference(_batch(10, 2))
    assert torch.equal(got[:2], _batch(10, 2)) and _ids(got[2:]) == [0, 1]


def test_bank_reference_feeds_the_stable_target_with_the_batch_first():
    """The loss's use: ref = bank.reference(x1); rows 0..B-1 are x1, so a mask
    [eye(B) | 0] keeps each query on its own sample (the R = 1 identity)."""
    path = get_path("linear")
    bank = stable.StableReferenceBank(8)
    g = torch.Generator().manual_seed(12)
    bank.update(torch.randn(8, 2, 3, generator=g))
    x1, eps = torch.randn(2, 4, 2, 3, generator=g)
    t = torch.rand(4, generator=g) * 0.9
    ref_x1 = bank.reference(x1)
    mask = torch.zeros(4, ref_x1.shape[0], dtype=torch.bool)
    mask[:, :4] = torch.eye(4, dtype=torch.bool)
    v = stable.stable_target(path, ref.interpolate(path, x1, eps, t), t, ref_x1, mask=mask)
    assert _rel_err(v, ref.velocity_target(path, x1, eps, t)) <= 1e-5


@pytest.mark.distributed
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed gloo",
)
def test_bank_gather_uses_the_global_batch_local_rows_first_and_local_bank_stays_local(
    tmp_path,
):
    """2 gloo ranks: with gather=True the batch part is the local batch then the other
    rank's, update reuses that gather (one all-gather per step) and both ranks buffer the
    global batch; with gather=False each rank sees its own samples only."""
    from tests.test_ddp import HERE, _launch

    _launch([os.path.join(HERE, "stable_ddp_worker.py"), str(tmp_path)])
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        me, other = 10 * rank, 10 * (1 - rank)
        assert got["gather"][0] == [me, me + 1, other, other + 1]
        assert got["gather"][1][:4] == [100 + me, 101 + me, 100 + other, 101 + other]
        assert sorted(got["gather"][1][4:]) == [0, 1, 10, 11]
        assert got["gathers"] == 2
        assert got["local"] == [[me, me + 1], [100 + me, 101 + me, me, me + 1]]


# -- target="stable" through the loss ------------------------------------------------


def test_stable_target_with_a_batch_of_one_is_the_conditional_target():
    """R = 1 (the sample's own x1 is the whole reference set): v~ = u_t and v_adr."""
    net = ConvVelocity().double()
    x1 = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    draws = dict(noise=torch.randn_like(x1), t=torch.tensor([0.3], dtype=torch.float64))
    for knobs in ({"method": "fm"}, {"preset": "defar", "k": torch.ones(1, dtype=torch.long)}):
        plain = rf.reflexflow_loss(net, x1, **draws, **knobs)
        stable = rf.reflexflow_loss(net, x1, target="stable", **draws, **knobs)
        torch.testing.assert_close(stable.loss, plain.loss, rtol=1e-10, atol=1e-12)


def test_stable_target_runs_with_a_bank_of_recent_batches_and_backpropagates():
    net = ConvVelocity()
    loss_fn = rf.ReflexFlowLoss(target="stable", stable_ref=16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = loss_fn(net, torch.randn(4, 3, 6, 6, generator=gen), generator=gen)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    assert len(loss_fn.stable_bank) == 12  # three batches of 4 kept


def test_the_loss_targets_use_the_banks_earlier_batches_as_references():
    """fm with target="stable": after one step the reference set is the batch followed by
    the previous batch, and the loss is the FM error against that stable target (not
    against the batch-only one)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 6).double()

    def model(x, t):
        return net(x) * (1 + t.view(-1, 1))

    loss_fn = rf.ReflexFlowLoss(method="fm", target="stable", stable_ref=4)
    first = 0.3 * torch.randn(4, 6, dtype=torch.float64)
    second = first + 0.05 * torch.randn_like(first)  # neighbours: the bank's rows matter
    loss_fn(model, first)
    eps, t = torch.randn_like(second), torch.rand(4, dtype=torch.float64)
    out = loss_fn(model, second, noise=eps, t=t)
    path = get_path("linear")
    x_t = ref.interpolate(path, second, eps, t)
    with torch.no_grad():
        v = model(x_t, t)
    banked = ref.stable_target(path, x_t, t, torch.cat([second, first]))
    batch_only = ref.stable_target(path, x_t, t, second)
    want = (v - banked).square().mean()
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-10, atol=1e-12)
    assert abs(float(want - (v - batch_only).square().mean())) > 1e-3


def test_stable_fm_without_rollout_differs_from_fm_on_a_batch_of_neighbours():
    net = ConvVelocity().double()
    x1 = torch.randn(1, 3, 6, 6, dtype=torch.float64).repeat(4, 1, 1, 1)
    x1 = x1 + 0.01 * torch.randn_like(x1)  # close neighbours: the posterior spreads
    draws = dict(noise=torch.randn_like(x1), t=torch.full((4,), 0.5, dtype=torch.float64))
    plain = rf.reflexflow_loss(net, x1, method="fm", **draws)
    stable = rf.reflexflow_loss(net, x1, method="fm", target="stable", **draws)
    assert not torch.allclose(stable.loss, plain.loss)


def test_scheduled_sampling_with_stable_target_keeps_the_unrectified_target():
    """ss + target="stable" uses the posterior-weighted target at the clean x_t1: with a
    batch of one it is u_t1, as plain ss (not the rectified v_adr)."""
    net = ConvVelocity().double()
    x1 = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    draws = dict(
        noise=torch.randn_like(x1),
        t=torch.tensor([0.3], dtype=torch.float64),
        k=torch.ones(1).long(),
    )
    plain = rf.reflexflow_loss(net, x1, method="ss", **draws)
    stable = rf.reflexflow_loss(net, x1, method="ss", target="stable", **draws)
    torch.testing.assert_close(stable.loss, plain.loss, rtol=1e-10, atol=1e-12)


def test_the_stable_bank_is_not_updated_by_a_validation_pass():
    net = ConvVelocity()
    loss_fn = rf.ReflexFlowLoss(target="stable", stable_ref=8)
    with torch.no_grad():
        loss_fn(net, torch.randn(4, 3, 6, 6))
    assert len(loss_fn.stable_bank) == 0
    loss_fn(net, torch.randn(4, 3, 6, 6))
    assert len(loss_fn.stable_bank) == 4


def test_a_reference_bank_knob_without_a_bank_is_an_error():
    with pytest.raises(ValueError, match="needs a reference bank"):
        rf.reflexflow_loss(ConvVelocity(), torch.randn(2, 3, 6, 6), target="stable", stable_ref=8)
