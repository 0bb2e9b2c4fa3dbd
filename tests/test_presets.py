"""Presets are data: named knob values, overridable, resolved once into the config."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import presets
from tests.helpers import ConvVelocity


def test_the_default_is_the_authors_own_reading():
    cfg = rf.ReflexFlowConfig()
    assert cfg.preset == "defar"
    assert (cfg.adr_loss, cfg.lambda_adr, cfg.fc_source) == ("mse", 1.0, "velocity")
    assert cfg.explicit == frozenset()


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_sets_every_preset_field_and_says_where_it_comes_from(name):
    assert set(presets.PRESETS[name]) == set(presets.PRESET_FIELDS)
    assert len(presets.describe(name)) > 80
    cfg = rf.ReflexFlowConfig(preset=name)
    for field, value in presets.PRESETS[name].items():
        assert getattr(cfg, field) == value, field


def test_explicit_knobs_override_the_preset_and_survive_a_preset_change():
    cfg = rf.ReflexFlowConfig(preset="arioso", lambda_adr=0.5)
    assert cfg.lambda_adr == 0.5 and cfg.adr_loss == "direction" and cfg.rollout_grad
    assert cfg.explicit == {"lambda_adr"}
    other = cfg.replace(preset="grid-direction")
    assert other.lambda_adr == 0.5  # given explicitly: kept
    assert other.rollout_grad is False and other.step_schedule == "grid"  # from the new preset
    again = rf.ReflexFlowConfig.from_preset("arioso", lambda_adr=0.5)
    assert all(getattr(again, f) == getattr(cfg, f) for f in presets.PRESET_FIELDS)


def test_replace_without_preset_keeps_the_preset_and_records_the_change():
    cfg = rf.ReflexFlowConfig().replace(adr_loss="direction")
    assert cfg.preset == "defar" and cfg.adr_loss == "direction"
    assert cfg.explicit == {"adr_loss"}
    assert cfg.replace(preset="arioso").adr_loss == "direction"


def test_preset_knobs_are_a_fresh_copy():
    knobs = presets.preset_knobs("defar")
    knobs["lambda_adr"] = 123.0
    assert presets.PRESETS["defar"]["lambda_adr"] == 1.0
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.preset_knobs("v2")


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_trains_a_step(name):
    net = ConvVelocity()
    out = rf.ReflexFlowLoss(preset=name)(net, torch.randn(4, 3, 8, 8), generator=torch.Generator())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_simpletuner_trains_the_fm_and_adr_terms_on_the_same_biased_call():
    net = ConvVelocity()
    calls = []

    def counting(x, t):
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return net(x, t)

    k = torch.tensor([1, 4, 0, 2])
    rf.reflexflow_loss(counting, torch.randn(4, 3, 8, 8), k=k, preset="simpletuner")
    with_grad = [n for n, grad in calls if grad]
    assert with_grad == [4]  # one gradient-carrying call: v(x^_t1, t1)
    # the full no-grad rollout (sum k = 7 sample-forwards) and the clean prediction at t1
    assert sum(n for n, grad in calls if not grad) == 7 + 4


def test_arioso_lets_the_adr_gradient_flow_through_the_first_call():
    cfg = rf.ReflexFlowConfig(preset="arioso")
    assert cfg.rollout_grad and not cfg.shares_first_call and not cfg.joint_call
    inputs = []
    net = ConvVelocity()

    def recording(x, t):
        inputs.append(x)
        return net(x, t)

    rf.reflexflow_loss(recording, torch.randn(4, 3, 8, 8), preset="arioso")
    assert inputs[-1].requires_grad  # the second call's input carries the first's graph


def test_replace_rebuilds_the_time_sampler_from_new_logit_knobs():
    cfg = rf.ReflexFlowConfig(time_sampler="logit_normal").replace(logit_mean=1.0)
    assert cfg.sampler.mean == 1.0 and cfg.time_sampler == "logit_normal"


def test_only_simpletuner_draws_the_rollouts_end_and_k_from_zero():
    for name in presets.PRESETS:
        cfg = rf.ReflexFlowConfig(preset=name)
        want = (0, "end") if name == "simpletuner" else (1, "start")
        assert (cfg.k_min, cfg.time_draw) == want, name


@pytest.mark.parametrize(
    "knobs, error, match",
    [
        ({"k_min": 2}, ValueError, "k_min must be one of"),
        ({"k_min": True}, ValueError, "k_min must be one of"),
        ({"time_draw": "middle"}, ValueError, "time_draw must be one of"),
        ({"time_draw": "end", "step_schedule": "single"}, ValueError, "needs step_schedule='grid'"),
    ],
)
def test_draw_knobs_are_validated(knobs, error, match):
    with pytest.raises(error, match=match):
        rf.ReflexFlowConfig(**knobs)


def test_an_end_time_draw_with_unrolled_samples_trains_a_step():
    net = ConvVelocity()
    out = rf.ReflexFlowLoss(
        preset="simpletuner", time_draw="end", k_min=0, rollout_steps=3, num_sampling_steps=1000
    )(net, torch.randn(8, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def _worst_row_at_the_end(path: str, t_eps: float, remedy: float | None) -> float:
    """defar's largest per-sample loss with every rollout ending at t1 = 1 - t_eps."""
    torch.manual_seed(0)
    net = ConvVelocity().double()
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x1.shape, generator=g, dtype=torch.float64)
    t = torch.full((4,), 1 - t_eps - 1 / 50, dtype=torch.float64)  # t1 = t + h = 1 - t_eps
    out = rf.reflexflow_loss(
        net,
        x1,
        noise=noise,
        t=t,
        k=torch.ones(4, dtype=torch.int64),
        path=path,
        t_eps=t_eps,
        adr_x1_from=remedy,
        backend="torch",
    )
    torch.testing.assert_close(out.t1, torch.full_like(t, 1 - t_eps))
    return float(out.per_sample_loss.detach().max())


@pytest.mark.parametrize("path", ["linear", "gvp", "vp"])
def test_defar_per_sample_loss_stays_bounded_as_t1_goes_to_one(path):
    assert rf.ReflexFlowConfig().adr_x1_from == 0.9  # the remedy is the default
    t_eps = (1e-2, 1e-3, 1e-4, 1e-5)
    on = [_worst_row_at_the_end(path, e, 0.9) for e in t_eps]
    off = [_worst_row_at_the_end(path, e, None) for e in t_eps]
    # with the remedy the worst row does not grow as t1 -> 1 (measured: flat within 3%)
    assert max(on) <= 1.05 * on[0]
    # without it, it grows like 1 / (1 - t1)^2: x100 per decade of t_eps
    # (measured; x22 on vp from 1e-2 to 1e-3)
    for near, nearer in zip(off, off[1:], strict=False):
        assert nearer > 10 * near
    assert off[-1] > 1e5 * on[-1]


def test_describe_returns_its_text_and_prints_nothing(capsys):
    text = presets.describe("defar")
    assert text == presets.SOURCES["defar"]
    assert capsys.readouterr().out == ""
    assert "Returns the text" in presets.describe.__doc__
