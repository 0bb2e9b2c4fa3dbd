"""The presets' draws against what the peers' own code drew (fixtures in tests/data/peers/).

Each fixture was produced by running the peer's own functions (SimpleTuner's
build_rollout_schedule and _apply_flow_matching_rollout, takenoko's ReflexFlowHelper,
Arioso's sample_t1) on fixed inputs; the file records the repository, commit, functions,
what was stubbed, and the command. See docs/peer-readings.md. The losses and gradients in
the same fixtures are held against the library by phase 2 of the peer-readings issue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import reflexflow as rf
from reflexflow.draws import draw, end_grid_times
from reflexflow.time_sampling import LogitNormalTime, ShiftedLogitNormalTime

DATA = Path(__file__).parent / "data" / "peers"


def _fixture(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["simpletuner", "takenoko", "arioso"])
def test_every_fixture_names_its_source_commit_command_and_stand_ins(name):
    fixture = _fixture(name)
    assert len(fixture["source"]["commit"]) == 40
    assert fixture["source"]["files"] and fixture["stubbed"]
    assert fixture["command"].endswith(f"tests/data/peers/{name}.json")
    assert (DATA / f"{name}.json").stat().st_size < 200 * 1024


# --------------------------------------------------------------------------- SimpleTuner


def _simpletuner_indices(sigmas, k, n=1000, t_eps=1e-3):
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    t0, t1, k_eff = end_grid_times(sigma, torch.tensor(k), n, t_eps, k_given=False)
    return (
        torch.round(n * (1 - t1)).long(),  # end index (SimpleTuner's target timestep)
        torch.round(n * (1 - t0)).long(),  # start index (its source timestep)
        k_eff,
    )


@pytest.mark.parametrize("label", ["grid_1000_sigma_on_grid", "as_shipped"])
def test_end_time_draw_puts_the_rollout_where_simpletuners_plan_does(label):
    case = next(c for c in _fixture("simpletuner")["cases"] if c["label"] == label)
    plan = case["plan"]
    target, source, k = _simpletuner_indices(case["sigmas"], plan["rollout_steps"])
    rolled = k > 0
    assert torch.equal(k, torch.tensor(plan["rollout_steps"]))  # k = 0 included
    assert torch.equal(target[rolled], torch.tensor(plan["target_timesteps"])[rolled])
    assert torch.equal(source[rolled], torch.tensor(plan["source_timesteps"])[rolled])
    # a sample that does not roll out keeps its drawn (continuous) time, as SimpleTuner's
    # unchanged noisy input and timesteps do
    t0, t1, _ = end_grid_times(
        torch.tensor(case["sigmas"], dtype=torch.float64), k, 1000, 1e-3, k_given=True
    )
    stays = ~rolled
    want = 1 - torch.tensor(case["biased_timesteps"], dtype=torch.float64) / 1000
    torch.testing.assert_close(t1[stays], want[stays], rtol=0, atol=1e-15)
    torch.testing.assert_close(t0[stays], t1[stays], rtol=0, atol=0)


def test_end_time_draw_cuts_k_where_simpletuner_clamps_the_source_index():
    draws = _fixture("simpletuner")["draws"]
    target, source, k = _simpletuner_indices(draws["sigmas"], draws["rollout_steps"])
    steps_run = torch.tensor(draws["model_calls_in_rollout"])  # SimpleTuner's own step count
    ends_at_data = torch.tensor(draws["target_timesteps"]) == 0
    # where SimpleTuner's end index is >= 1 the library runs the same number of steps...
    assert torch.equal(k[~ends_at_data], steps_run[~ends_at_data])
    assert torch.equal(target[k > 0], torch.tensor(draws["target_timesteps"])[k > 0])
    assert torch.equal(source[k > 0], torch.tensor(draws["source_timesteps"])[k > 0])
    # ...and where it ends at index 0 (t = 1, pure data: s(t1) = 0) the library does not
    # roll out (t1 <= 1 - t_eps); SimpleTuner rolls out onto the data there
    assert bool(ends_at_data.any()) and bool((steps_run[ends_at_data] > 0).all())
    assert bool((k[ends_at_data] == 0).all())


def _end_time_config(**extra):
    """SimpleTuner's end-time draw: k ~ U{0..3} steps of 1/1000, noise_at_1."""
    return rf.ReflexFlowConfig(
        preset="simpletuner",
        time_draw="end",
        k_min=0,
        rollout_steps=3,
        num_sampling_steps=1000,
        convention="noise_at_1",
        **extra,
    )


def test_end_time_draw_through_the_config_matches_the_plan_in_noise_at_1():
    case = next(
        c for c in _fixture("simpletuner")["cases"] if c["label"] == "grid_1000_sigma_on_grid"
    )
    cfg = _end_time_config()
    x1 = torch.zeros(6, 2, 4, 4, dtype=torch.float64)
    sigmas = torch.tensor(case["sigmas"], dtype=torch.float64)
    k = torch.tensor(case["plan"]["rollout_steps"])
    d = draw(cfg, x1, torch.zeros_like(x1), sigmas, k, None)
    rolled = k > 0
    source = torch.tensor(case["plan"]["source_timesteps"], dtype=torch.float64)
    target = torch.tensor(case["plan"]["target_timesteps"], dtype=torch.float64)
    torch.testing.assert_close(d.t1[rolled], (1 - target / 1000)[rolled], rtol=0, atol=1e-15)
    torch.testing.assert_close(d.t0[rolled], (1 - source / 1000)[rolled], rtol=0, atol=1e-15)
    torch.testing.assert_close(d.t1[~rolled], (1 - sigmas)[~rolled], rtol=0, atol=1e-15)
    assert torch.equal(d.k, k) and d.fixed_k is None
    torch.testing.assert_close(d.step, torch.full_like(d.t0, 1e-3))


def test_end_time_draw_refuses_an_explicit_k_that_does_not_fit_the_grid():
    cfg = rf.ReflexFlowConfig(
        preset="simpletuner", time_draw="end", k_min=0, rollout_steps=3, num_sampling_steps=1000
    )
    x1 = torch.zeros(2, 3, dtype=torch.float64)
    k = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="does not fit the 1/1000 grid"):
        draw(cfg, x1, None, torch.tensor([0.5, 0.9995], dtype=torch.float64), k, None)
    with pytest.raises(ValueError, match="does not fit the 1/1000 grid"):  # start past t = 0
        draw(cfg, x1, None, torch.tensor([0.5, 0.0015], dtype=torch.float64), k + 1, None)


def test_k_min_zero_draws_every_length_from_zero_to_k_like_simpletuners_offsets():
    # SimpleTuner: offsets = torch.randint(0, max_step_offset + 1, (B,)) (plan.py)
    cfg = rf.ReflexFlowConfig(preset="simpletuner", k_min=0, rollout_steps=3)
    d = draw(cfg, torch.zeros(8000, 2), None, None, None, torch.Generator().manual_seed(0))
    counts = torch.bincount(d.k, minlength=4).double() / 8000
    assert counts.shape == (4,)
    torch.testing.assert_close(
        counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02, rtol=0
    )
    assert rf.draws.static_k(cfg) is None


def test_end_time_draw_from_the_logit_normal_sampler_follows_simpletuners_sigma():
    # SimpleTuner's sigma = sigmoid(N(0, 1)); the end of a rolled-out sample is floored
    # onto the grid, so 1 - t1 <= sigma < 1 - t1 + 1/1000 where it rolls out
    cfg = _end_time_config(time_sampler="logit_normal")
    g = torch.Generator().manual_seed(3)
    d = draw(cfg, torch.zeros(4000, 2, dtype=torch.float64), None, None, None, g)
    # the draw consumes the generator as eps, k, then the sampler: replay it
    g2 = torch.Generator().manual_seed(3)
    torch.randn(4000, 2, generator=g2, dtype=torch.float64)
    torch.rand(4000, generator=g2)
    torch.randint(0, 4, (4000,), generator=g2)
    sigma = LogitNormalTime()(4000, torch.device("cpu"), g2)
    rolled = d.k > 0
    end = 1 - d.t1.double()
    assert bool((end[rolled] <= sigma[rolled] + 1e-12).all())
    assert bool((sigma[rolled] - end[rolled] < 1e-3).all())
    torch.testing.assert_close(end[~rolled], sigma[~rolled], rtol=0, atol=1e-15)
    assert 0.7 < float(rolled.double().mean()) < 0.8  # k ~ U{0..3}: 3/4 roll out


# --------------------------------------------------------------------------- takenoko


def test_shifted_logit_normal_is_takenokos_renoise_time():
    fixture = _fixture("takenoko")
    sampler = ShiftedLogitNormalTime(shift=0.6, low=0.05, high=0.95)
    for case in fixture["cases"]:
        base = torch.tensor(case["logit_normal_base"], dtype=torch.float64)
        z = torch.log(base / (1 - base))  # the helper's randn, recovered from sigmoid(randn)
        want = torch.tensor(case["ts"], dtype=torch.float64)
        # takenoko computes in float32: agreement to its rounding
        torch.testing.assert_close(sampler.transform(z), want, rtol=1e-6, atol=1e-7)
        # and the state the helper fed the model is the path at ts with the same noise
        got = torch.tensor(case["ts_from_helper_input"], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shifted_logit_normal_draws_stay_in_takenokos_clamp_and_shift_moves_them_low():
    sampler = ShiftedLogitNormalTime(shift=0.6, low=0.05, high=0.95)
    u = sampler(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert u.dtype == torch.float64
    assert float(u.min()) >= 0.05 and float(u.max()) <= 0.95
    # shift 0.6 < 1 pulls the logit-normal (median 0.5) towards 0: median 0.6 / 1.6
    assert abs(float(u.median()) - 0.375) < 0.01
    plain = ShiftedLogitNormalTime()(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        plain, LogitNormalTime()(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shift": 0.0}, "shift must be > 0"),
        ({"low": 0.6, "high": 0.5}, "0 <= low < high <= 1"),
        ({"std": -1.0}, "std must be > 0"),
        ({"mean": float("nan")}, "mean must be finite"),
    ],
)
def test_shifted_logit_normal_refuses_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShiftedLogitNormalTime(**kwargs)


def test_shifted_logit_normal_is_accepted_as_a_time_sampler_without_a_range_check():
    sampler = ShiftedLogitNormalTime(shift=3.0)
    out = rf.reflexflow_loss(
        lambda x, t: x * 0 + t[:, None],
        torch.randn(4, 2),
        method="fm",
        time_sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    assert math.isfinite(float(out.loss))


# --------------------------------------------------------------------------- Arioso


def test_arioso_single_step_end_is_within_t_eps_of_arioso_on_the_same_uniform():
    # Arioso: t1 = t0 + (1 - t0) U (sample_t1); the library: t1 = t0 + (1 - t_eps - t0) U
    fixture = _fixture("arioso")
    t0 = torch.tensor(fixture["inputs"]["t0"], dtype=torch.float64)
    t1 = torch.tensor(fixture["inputs"]["t1"], dtype=torch.float64)
    frac = (t1 - t0) / (1 - t0)
    assert bool(((frac >= 0) & (frac <= 1)).all())
    cfg = rf.ReflexFlowConfig(preset="arioso")
    gen = torch.Generator().manual_seed(0)
    replay = torch.Generator().manual_seed(0)
    x1 = torch.zeros(6, 4, 8, dtype=torch.float64)
    d = draw(cfg, x1, torch.zeros_like(x1), t0, torch.ones(6, dtype=torch.long), gen)
    ours = torch.rand(6, generator=replay, dtype=torch.float64)  # the library's own U
    torch.testing.assert_close(d.t1, t0 + (1 - cfg.t_eps - t0) * ours, rtol=0, atol=1e-15)
    # on Arioso's U the two ends differ by at most t_eps
    assert float(((t0 + (1 - cfg.t_eps - t0) * frac) - t1).abs().max()) <= cfg.t_eps


# --------------------------------------------------------------- phase 2: losses and gradients
#
# Each preset named after a source, on the fixture's own inputs and draws (explicit t, k,
# t1 and noise), against the loss, terms and parameter gradients the source's own code
# returned. Tolerances: float64 1e-6 relative on the loss and the terms, 1e-5 on the
# gradients (max abs error / max abs gradient, per parameter); the residual is the
# sources' own float32 casts (docs/peer-readings.md). float32: 1e-5 on the loss, 1e-4 on
# the gradients (both sides round in float32; measured 9e-8 and 3.4e-7 at most).

TOL = {"float64": (1e-6, 1e-5), "float32": (1e-5, 1e-4)}


class _TinyVelocity(torch.nn.Module):
    """The fixtures' model: v(x, tau) = W2 silu(W1 [flatten(x), tau] + b1) + b2."""

    def __init__(self, dim: int, hidden: int = 12) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim + 1, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.flatten(1), tau.reshape(-1, 1).to(x.dtype)], dim=1)
        return self.l2(torch.nn.functional.silu(self.l1(h))).reshape(x.shape)


class _AriosoPath(rf.paths.AffinePath):
    """Arioso's path x_t = (1 - (1 - sigma) t) x0 + t x1, sigma = 1e-4 (Arioso/cfm.py)."""

    sigma = 1e-4

    def a(self, t):
        return t

    def s(self, t):
        return 1 - (1 - self.sigma) * t

    def da(self, t):
        return torch.ones_like(t)

    def ds(self, t):
        return torch.full_like(t, -(1 - self.sigma))


def _model(fixture: dict, dtype: torch.dtype) -> _TinyVelocity:
    net = _TinyVelocity(32).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.tensor(fixture["model"]["weights"][name], dtype=torch.float64))
    return net


def _tensor(values, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def _assert_agrees(net, out, case, terms):
    loss_tol, grad_tol = TOL[case["dtype"]]
    assert abs(float(out.loss.detach()) - case["loss"]) <= loss_tol * abs(case["loss"])
    for ours, theirs in terms:
        assert abs(float(ours.detach()) - theirs) <= loss_tol * abs(theirs)
    for name, p in net.named_parameters():
        want = torch.tensor(case["grads"][name], dtype=torch.float64)
        err = float((p.grad.double() - want).abs().max() / want.abs().max())
        assert err <= grad_tol, (name, err)


def _cases(name: str, label: str | None = None) -> list:
    fixture = _fixture(name)
    return [c for c in fixture["cases"] if label is None or c.get("label") == label]


@pytest.mark.parametrize(
    "case", _cases("simpletuner", "grid_1000_sigma_on_grid"), ids=lambda c: c["dtype"]
)
def test_simpletuner_preset_reproduces_simpletuners_loss_and_gradients(case):
    fixture = _fixture("simpletuner")
    dtype = getattr(torch, case["dtype"])
    net = _model(fixture, dtype)
    out = rf.reflexflow_loss(
        net,  # SimpleTuner's model sees sigma (timesteps / 1000) and predicts eps - x1
        _tensor(fixture["inputs"]["x1_latents"], dtype),
        noise=_tensor(fixture["inputs"]["noise"], dtype),
        t=torch.tensor(case["sigmas"], dtype=torch.float64),  # the drawn END sigma
        k=torch.tensor(case["plan"]["rollout_steps"]),  # its offsets, 0 included
        preset="simpletuner",
        convention="noise_at_1",
        backend="torch",
    )
    out.loss.backward()
    terms = []
    if "fm_fc_term" in case:  # the float32 case records the loss and gradients only
        terms = [(out.fc_loss, case["fm_fc_term"]), (out.adr_loss, case["adr_term_unweighted"])]
    _assert_agrees(net, out, case, terms)


@pytest.mark.parametrize(
    "label, worst",
    [("as_shipped_sigma_on_grid", 7.5e-4), ("grid_1000_continuous_sigma", 3.0e-4)],
)
def test_simpletuner_preset_does_not_copy_the_grid_slip_or_the_off_grid_clean_call(label, worst):
    # the two SimpleTuner effects the library does not copy (its 1/999 state grid, its
    # clean prediction at the continuous sigma) move the gradients by 3e-4 to 7.5e-4
    fixture = _fixture("simpletuner")
    (case,) = _cases("simpletuner", label)
    net = _model(fixture, torch.float64)
    out = rf.reflexflow_loss(
        net,
        _tensor(fixture["inputs"]["x1_latents"], torch.float64),
        noise=_tensor(fixture["inputs"]["noise"], torch.float64),
        t=torch.tensor(case["sigmas"], dtype=torch.float64),
        k=torch.tensor(case["plan"]["rollout_steps"]),
        preset="simpletuner",
        convention="noise_at_1",
        backend="torch",
    )
    out.loss.backward()
    errs = [
        float((p.grad - torch.tensor(case["grads"][n])).abs().max())
        / float(torch.tensor(case["grads"][n]).abs().max())
        for n, p in net.named_parameters()
    ]
    assert 1e-5 < max(errs) < 1.5 * worst


@pytest.mark.parametrize("case", _cases("arioso"), ids=lambda c: f"{c['label']}-{c['dtype']}")
def test_arioso_preset_reproduces_ariosos_loss_and_gradients(case):
    fixture = _fixture("arioso")
    dtype = getattr(torch, case["dtype"])
    net = _model(fixture, dtype)
    inputs = fixture["inputs"]
    out = rf.reflexflow_loss(
        net,
        _tensor(inputs["x1"], dtype),
        noise=_tensor(inputs["x0_noise"], dtype),  # its prior mel, the path's x0
        t=torch.tensor(inputs["t0"], dtype=torch.float64),
        t1=torch.tensor(inputs["t1"], dtype=torch.float64),  # its own sample_t1
        k=torch.ones(6, dtype=torch.int64),
        preset="arioso",
        path=_AriosoPath(),
        backend="torch",
        # as shipped its target carries gradient; "target_detached" is its code with
        # .detach() added, the library's adr_target_grad=False
        adr_target_grad=case["label"] == "as_shipped",
    )
    out.loss.backward()
    terms = [(out.fc_loss, case["fm_loss"]), (out.adr_loss, case["adr_loss"])]
    _assert_agrees(net, out, case, terms)


@pytest.mark.parametrize("case", _cases("takenoko"), ids=lambda c: c["dtype"])
def test_takenoko_preset_reproduces_takenokos_loss_and_gradients(case):
    fixture = _fixture("takenoko")
    dtype = getattr(torch, case["dtype"])
    net = _model(fixture, dtype)
    out = rf.reflexflow_loss(
        net,
        _tensor(fixture["inputs"]["x1_latents"], dtype),
        noise=_tensor(fixture["inputs"]["noise"], dtype),
        t=torch.tensor(case["sigmas"], dtype=torch.float64),  # the trainer's sigma
        t1=torch.tensor(case["ts"], dtype=torch.float64),  # the helper's re-noise sigma
        k=torch.ones(6, dtype=torch.int64),
        preset="takenoko",
        convention="noise_at_1",
        backend="torch",
    )
    out.loss.backward()
    # the library's FC term is takenoko's base FM loss plus its FC term (fc_adds_fm)
    terms = [
        (out.fc_loss, case["base_fm_loss"] + case["fc_loss"]),
        (out.adr_loss, case["adr_loss"]),
    ]
    _assert_agrees(net, out, case, terms)


def test_takenokos_adr_target_is_colinear_with_its_fm_target():
    # the fixture's cosine, and the library's own v_adr on a re-noised input: u_t1 = x1 - eps
    fixture = _fixture("takenoko")
    cosines = torch.tensor(fixture["cases"][0]["cosine_adr_target_vs_fm_target"])
    torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=0, atol=1e-12)
    x1 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x1)
    t1 = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    path = rf.paths.LinearPath()
    x_hat = rf.reference.interpolate(path, x1, eps, t1)
    v_adr = rf.reference.adr_target(path, x1, eps, x_hat, t1)
    torch.testing.assert_close(v_adr, x1 - eps)


def test_preset_draws_follow_their_sources():
    x1 = torch.zeros(4000, 2, dtype=torch.float64)
    # takenoko: every sample re-noised at t1 = 1 - ts, ts in takenoko's clamp [0.05, 0.95]
    cfg = rf.ReflexFlowConfig(preset="takenoko")
    d = draw(cfg, x1, None, None, None, torch.Generator().manual_seed(0))
    assert bool((d.k == 1).all())
    sigma = 1 - d.t1
    assert float(sigma.min()) >= 0.05 - 1e-12 and float(sigma.max()) <= 0.95 + 1e-12
    assert abs(float(sigma.median()) - 0.375) < 0.02  # shift 0.6 moves the median to 0.375
    # its t0 is the trainer's sigma = shift-3 logit-normal (median 0.75), read noise-ward
    assert abs(float((1 - d.t0).median()) - 0.75) < 0.02
    # SimpleTuner: k ~ U{0..10}, the end on the 1/1000 grid, the start k steps before it
    cfg = rf.ReflexFlowConfig(preset="simpletuner")
    d = draw(cfg, x1, None, None, None, torch.Generator().manual_seed(0))
    assert int(d.k.min()) == 0 and int(d.k.max()) == 10
    rolled = d.k > 0
    ends = 1000 * (1 - d.t1[rolled])
    torch.testing.assert_close(ends, ends.round(), rtol=0, atol=1e-9)
    torch.testing.assert_close(
        d.t0[rolled], d.t1[rolled] - 1e-3 * d.k[rolled].double(), rtol=0, atol=1e-12
    )
    # Arioso: one step, t1 within [t0, 1 - t_eps]
    cfg = rf.ReflexFlowConfig(preset="arioso")
    d = draw(cfg, x1, None, None, None, torch.Generator().manual_seed(0))
    assert bool((d.k == 1).all()) and bool((d.t1 >= d.t0).all())
    assert float(d.t1.max()) <= 1 - cfg.t_eps


@pytest.mark.parametrize("name", ["simpletuner", "arioso", "takenoko"])
def test_describe_names_the_sources_file_and_commit(name):
    fixture = _fixture(name)
    text = rf.presets.describe(name)
    assert fixture["source"]["commit"][:7] in text
    assert any(Path(f.split(":")[0]).name in text for f in fixture["source"]["files"])
