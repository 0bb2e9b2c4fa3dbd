"""The exact oracle (docs/method.md section 7) and the oracle study of `reflexflow demo`.

u* is checked three ways: against a self-normalised Monte-Carlo estimate of E[u_t | x_t],
by integrating it (Heun, many steps) from noise to the mixture's moments, and at the path's
ends. The study runs end to end on a tiny setting.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from reflexflow.demo.oracle import dct_matrix, make_oracle
from reflexflow.demo.oracle_metrics import OracleScorer
from reflexflow.paths import GVPPath, LinearPath
from reflexflow.sampler import sample

SMALL = (1, 4, 4)  # 16 dimensions: small enough for exact checks by sampling


@pytest.fixture(scope="module")
def small():
    return make_oracle(num_components=3, shape=SMALL, seed=3)


def test_dct_basis_is_orthonormal_and_coefficients_round_trip(small):
    d = dct_matrix(16)
    assert torch.allclose(d @ d.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, *SMALL, dtype=torch.float64)
    y = small.to_coeffs(x)
    assert torch.allclose(small.from_coeffs(y), x, atol=1e-12)
    assert torch.allclose(y.square().sum((1, 2, 3)), x.square().sum((1, 2, 3)), atol=1e-10)


def test_log_prob_matches_a_full_covariance_gaussian_mixture(small):
    """log p(x) in the DCT basis equals the mixture of N(U mu_k, U diag(lambda_k) U^T)."""
    eye = torch.eye(small.dim, dtype=torch.float64).reshape(small.dim, *SMALL)
    basis = small.from_coeffs(eye).flatten(1).T  # column i = U e_i
    x, _ = small.sample(7, torch.Generator().manual_seed(0))
    comps = []
    for k in range(small.num_components):
        mean = basis @ small.means[k].flatten()
        cov = basis @ torch.diag(small.variances[k].flatten()) @ basis.T
        mvn = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
        comps.append(small.weights[k].log() + mvn.log_prob(x.flatten(1)))
    expected = torch.logsumexp(torch.stack(comps, 1), 1)
    assert torch.allclose(small.log_prob(x), expected, atol=1e-8)


@pytest.mark.parametrize("path", [LinearPath(), GVPPath()], ids=["linear", "gvp"])
@pytest.mark.parametrize("t", [0.3, 0.6])
def test_velocity_matches_a_monte_carlo_posterior_mean(path, t):
    """u*(x_t) = E[a' x1 + s' eps | x_t], estimated by weighting prior draws of x1 with
    N(x_t; a x1, s^2 I) (self-normalised importance sampling; 4 dimensions, so that the
    prior is a good enough proposal)."""
    small = make_oracle(num_components=3, shape=(1, 2, 2), seed=5)
    gen = torch.Generator().manual_seed(1)
    tt = torch.tensor([t], dtype=torch.float64)
    a, s, da, ds = (float(f(tt)) for f in (path.a, path.s, path.da, path.ds))
    x1_true, _ = small.sample(3, gen)
    x_t = a * x1_true + s * torch.randn(x1_true.shape, generator=gen, dtype=torch.float64)
    draws, _ = small.sample(200_000, gen)
    exact = small.velocity(x_t, t, path)
    for i in range(3):
        logw = -(x_t[i] - a * draws).square().flatten(1).sum(1) / (2 * s * s)
        w = torch.softmax(logw, 0)
        assert 1.0 / w.square().sum() > 500  # enough effective samples for the tolerance
        x1_post = (w[:, None] * draws.flatten(1)).sum(0)
        u_mc = da * x1_post + ds * (x_t[i].flatten() - a * x1_post) / s
        scale = exact[i].abs().max()
        assert (u_mc - exact[i].flatten()).abs().max() < 0.05 * scale + 0.02


def test_velocity_is_finite_at_both_ends_and_takes_the_limits(small):
    gen = torch.Generator().manual_seed(2)
    x, _ = small.sample(4, gen)
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    mean = small.from_coeffs(small.mean().reshape(1, *SMALL))
    # t = 0: x_0 = eps carries no information, so u* = E[x1] - eps (linear path)
    assert torch.allclose(small.velocity(noise, 0.0), mean - noise, atol=1e-10)
    # t = 1: x_1 = x1 and E[eps | x1] = 0, so u* = x1
    assert torch.allclose(small.velocity(x, 1.0), x, atol=1e-10)
    per_sample = small.velocity(x, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    assert torch.isfinite(per_sample).all()
    assert torch.allclose(per_sample[2:], x[2:], atol=1e-10)


def test_integrating_the_exact_velocity_reproduces_the_mixture_moments(small):
    """Heun with 100 steps of u* from N(0, I) lands on the mixture: its mean and its
    per-coefficient variances within sampling error."""
    n = 4000
    noise = torch.randn(
        (n, *SMALL), generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    x = sample(small, noise, 100, solver="heun")
    y = small.to_coeffs(x).flatten(1)
    var = small.coefficient_variance().flatten()
    assert ((y.mean(0) - small.mean()).abs() < 4 * (var / n).sqrt()).all()
    assert ((y.var(0) / var - 1).abs() < 0.12).all()
    comp = small.responsibilities(x).argmax(1)
    hist = torch.bincount(comp, minlength=3).double() / n
    assert (hist - small.weights).abs().max() < 0.03


def test_euler_samples_of_u_star_lose_variance_with_few_steps():
    """The discretisation floor is real: 5 Euler steps of the exact field under-disperse,
    and more steps approach the exact variance (low and high bands)."""
    mix = make_oracle()
    scorer = OracleScorer(mix, (5, 20), num_samples=300, bias_samples=16)
    few, many = scorer.floor["scores"]["5"], scorer.floor["scores"]["20"]
    assert few["band_high"] < many["band_high"] < 1.05
    assert few["fd"] > many["fd"]
    assert few["err_own"] < 1e-20  # Euler's own velocity is u* itself


def test_exact_samples_score_near_their_ideal_and_a_shift_is_seen():
    mix = make_oracle()
    scorer = OracleScorer(mix, (5,), num_samples=64, bias_samples=8)
    x, _ = mix.sample(1500, torch.Generator().manual_seed(9))
    good = scorer.sample_scores(x)
    assert abs(good["band_low"] - 1) < 0.15 and abs(good["band_high"] - 1) < 0.1
    assert good["mode_tv"] < 0.05
    assert good["loglik"] == pytest.approx(float(mix.log_prob(x).mean()) / mix.dim)
    bad = scorer.sample_scores(x + 0.5)
    assert bad["fd"] > good["fd"] + 0.2 * mix.dim


# -- the study end to end ---------------------------------------------------------------------

TINY = ["--dataset", "oracle", "--quick", "--steps", "3", "--seeds", "2", "--eval-steps", "2,3"]
TINY += ["--num-samples", "24", "--bias-samples", "8", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from reflexflow.cli import main

    out = tmp_path_factory.mktemp("oracle")
    args = [*TINY, "--methods", "fm,reflexflow,fm-long,fm-equal-compute"]
    args += ["--equal-compute-ratio", "2.5", "--long-factor", "2"]
    rc = main(["demo", *args, "--out", str(out / "o"), "--cache-dir", str(out / "cache")])
    assert rc == 0
    return out, json.loads((out / "o" / "results.json").read_text())


def test_oracle_study_writes_its_tables_and_figures(tiny_run):
    out, res = tiny_run
    for name in ("results.md", "samples.png", "fd-vs-steps.png", "bands.png", "exposure-bias.png"):
        path = out / "o" / name
        assert path.is_file() and path.stat().st_size > 0, name
    md = (out / "o" / "results.md").read_text()
    assert "u* (exact field)" in md and "exact samples" in md and "Git commit" in md
    for n in ("2", "3"):
        floor = res["floor"]["scores"][n]
        assert floor["path_dev"] == 0.0 and floor["fd"] > 0
        for run in res["runs"]:
            s = run["scores"][n]
            assert all(math.isfinite(v) for v in s.values()), (run["method"], s)
            assert s["path_dev"] > 0 and s["err_own"] > 0 and s["err_clean"] > 0
            assert len(run["curves"][n]["path_dev"]) == int(n)


def test_oracle_rows_train_the_stated_steps_and_knobs(tiny_run):
    from reflexflow.presets import DEFAULT_PRESET, preset_knobs

    _, res = tiny_run
    steps = {r["method"]: r["steps"] for r in res["runs"]}
    assert steps == {"fm": 3, "reflexflow": 3, "fm-long": 6, "fm-equal-compute": 8}
    # the steps each row actually trained (one loss per step), not only the recorded number
    trained = {r["method"]: len(r["loss_curve"]) for r in res["runs"]}
    assert trained == steps
    rf = next(r for r in res["runs"] if r["method"] == "reflexflow")
    assert rf["knobs"] == {"preset": DEFAULT_PRESET}
    for knob, value in preset_knobs(DEFAULT_PRESET).items():
        assert rf["loss_config"][knob] == value, knob
    assert res["cost_ratio"]["ratio"] == 2.5
    assert set(res["vs_fm"]) == {"reflexflow", "fm-long", "fm-equal-compute"}
    assert res["vs_fm"]["reflexflow"]["2"]["fd"]["n"] == 2


def test_a_rerun_with_the_same_settings_resumes_from_the_run_cache(tiny_run, monkeypatch):
    from reflexflow.cli import main
    from reflexflow.demo import study

    out, first = tiny_run

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(study, "train", no_training)
    args = [*TINY, "--methods", "fm,reflexflow,fm-long,fm-equal-compute"]
    args += ["--equal-compute-ratio", "2.5", "--long-factor", "2"]
    rc = main(["demo", *args, "--out", str(out / "again"), "--cache-dir", str(out / "cache")])
    assert rc == 0
    again = json.loads((out / "again" / "results.json").read_text())
    assert [r["scores"] for r in again["runs"]] == [r["scores"] for r in first["runs"]]


def test_plain_demo_runs_the_oracle_with_the_default_preset_as_reflexflow():
    from reflexflow.cli import build_parser
    from reflexflow.demo.cli import config_from_args
    from reflexflow.demo.methods import method_knobs
    from reflexflow.presets import DEFAULT_PRESET

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["demo"]))
    assert cfg.dataset == "oracle" and "reflexflow" in cfg.methods and "fm" in cfg.methods
    assert method_knobs("reflexflow", lambda_adr=3.0) == {"preset": DEFAULT_PRESET}
    demo = parser._subparsers._group_actions[0].choices["demo"]
    text = " ".join(demo.format_help().split())
    assert f"reflexflow = the library's default preset ({DEFAULT_PRESET}" in text
    digits = config_from_args(parser.parse_args(["demo", "--dataset", "digits"]))
    assert "reflexflow" not in digits.methods and "gd-direction" in digits.methods


def test_oracle_results_md_is_rendered_from_results_json(tiny_run):
    from reflexflow.demo.oracle_report import rerender

    out, _ = tiny_run
    written = (out / "o" / "results.md").read_text()
    assert rerender(out / "o") == written
    assert "method=reflexflow, preset=defar" in written and "method=fm," in written
