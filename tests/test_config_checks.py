"""Checks of a configuration beyond each knob's range (reflexflow/config_checks.py): knobs
the configuration never reads warn, custom paths and time samplers are checked, t_eps
below float32's threshold warns, TRITON_INTERPRET set too late is named."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import reflexflow as rf
from reflexflow import adapters
from reflexflow.config_checks import T_EPS_FLOAT32_MIN


@pytest.mark.parametrize(
    "knobs, name",
    [
        (dict(method="fm", lambda_adr=5.0), "lambda_adr"),
        (dict(method="fm", rollout_steps=3), "rollout_steps"),
        (dict(method="ss", lambda_fc=2.0), "lambda_fc"),
        (dict(ip_gamma=0.3), "ip_gamma"),
        (dict(preset="arioso", num_sampling_steps=20), "num_sampling_steps"),
        (dict(fc_filter="box", fc_sigma=3.0), "fc_sigma"),
        (dict(logit_mean=1.0), "logit_mean"),
        (dict(stable_ref=4), "stable_ref"),
        (dict(lambda_adr=0.0, adr_loss="direction"), "adr_loss"),
        (dict(fc_per_channel=True, fc_channel_reduce="l2"), "fc_channel_reduce"),
        (dict(fc_signed=True, fc_per_channel=True), "fc_per_channel"),
        (dict(fc_signed=True, fc_channel_reduce="l2"), "fc_channel_reduce"),
    ],
)
def test_a_knob_the_configuration_ignores_warns_naming_it(knobs, name):
    with pytest.warns(UserWarning, match=rf"ignored by this configuration: .*{name} \("):
        rf.ReflexFlowConfig(**knobs)


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        dict(preset="arioso"),
        dict(preset="simpletuner"),
        dict(method="fm"),
        dict(method="ip", ip_gamma=0.2),
        dict(fc_filter="box", fc_size=3),
        dict(time_sampler="logit_normal", logit_mean=0.5),
        dict(target="stable", stable_ref=8),
        dict(method="fm", preset="defar"),
        dict(fc_per_channel=True),
        dict(fc_channel_reduce="l2"),
        dict(fc_signed=True, fc_form="squared"),
    ],
)
def test_knobs_that_are_read_do_not_warn(knobs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.ReflexFlowConfig(**knobs)


def _zero_noise_path(t_zero: float) -> adapters.FunctionPath:
    return adapters.FunctionPath(
        a=lambda t: t,
        s=lambda t: (t_zero - t).clamp_min(0),
        da=torch.ones_like,
        ds=lambda t: -(t < t_zero).to(t.dtype),
    )


def test_custom_path_with_zero_noise_scale_before_one_is_refused():
    with pytest.raises(ValueError, match=r"s\(t\) must be > 0 on \[0, 1 - t_eps\].*s\(0\.5"):
        rf.ReflexFlowLoss(path=_zero_noise_path(0.5))
    rf.ReflexFlowConfig(path=_zero_noise_path(0.5), method="fm")  # no ADR: no division
    rf.ReflexFlowConfig(path=adapters.LipmanOTPath(0.1))  # s > 0 on [0, 1]


@pytest.mark.parametrize("method", ["fm", "reflexflow"])
@pytest.mark.parametrize(
    "coefficient, bad, message",
    [
        ("da", lambda t: 1.0, r"path.da\(t\) must return a tensor of t's shape"),
        ("a", lambda t: t.sum(), r"path.a\(t\) must return a tensor of t's shape"),
        ("a", lambda t: t[:1], r"path.a\(t\) must return a tensor of t's shape"),
        (
            "ds",
            lambda t: torch.where(t > 0.5, torch.full_like(t, float("inf")), -torch.ones_like(t)),
            r"the path's ds\(t\) must be finite on \(0, 1 - t_eps\] = .*; ds\(0\.5",
        ),
    ],
)
def test_a_custom_path_coefficient_of_the_wrong_shape_or_not_finite_is_named(
    method, coefficient, bad, message
):
    parts = dict(
        a=lambda t: t, s=lambda t: 1 - t, da=torch.ones_like, ds=lambda t: -torch.ones_like(t)
    )
    parts[coefficient] = bad
    with pytest.raises(ValueError, match=message):
        rf.ReflexFlowConfig(path=adapters.FunctionPath(**parts), method=method)


@pytest.mark.parametrize("method", ["fm", "reflexflow"])
def test_a_custom_path_whose_derivative_is_infinite_only_at_t_zero_trains(method):
    # flow_matching's PolynomialConvexScheduler(n < 1): a = t^n, a' = n t^(n - 1), inf at 0
    path = adapters.FunctionPath(
        a=lambda t: t**0.5,
        s=lambda t: 1 - t**0.5,
        da=lambda t: 0.5 * t**-0.5,
        ds=lambda t: -0.5 * t**-0.5,
    )
    out = rf.reflexflow_loss(lambda x, t: -x, torch.randn(8, 3), path=path, method=method)
    assert torch.isfinite(out.loss)


def test_t_eps_below_the_float32_threshold_warns():
    with pytest.warns(UserWarning, match=r"t_eps=1e-07 is below 1e-05.*float32"):
        rf.ReflexFlowConfig(t_eps=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.ReflexFlowConfig(t_eps=T_EPS_FLOAT32_MIN)


def test_time_sampler_of_the_wrong_signature_is_refused_at_config_time():
    state = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"time_sampler\(batch, device, generator\)"):
        rf.ReflexFlowConfig(time_sampler=lambda batch: torch.rand(batch))
    rf.ReflexFlowConfig(time_sampler=lambda b, d, g: torch.rand(b, generator=g))
    rf.ReflexFlowConfig(time_sampler=lambda b, d, g: torch.rand(b))  # global RNG, restored
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


def test_triton_interpret_set_after_triton_import_is_named():
    pytest.importorskip("triton")
    script = (
        "import os, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import reflexflow as rf\n"
        "try:\n"
        "    rf.ReflexFlowConfig(backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    root = __file__.rsplit("/tests/", 1)[0]
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "TRITON_INTERPRET=1 was set after triton was imported" in proc.stdout, proc.stderr
    assert "before triton is first imported" in proc.stdout
