"""Nothing silent: every bad input is a named error, every ignored knob a warning.

Each test names what it proves; the before/after messages are listed in the CHANGELOG
(## Unreleased, "Nothing silent").
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import reflexflow as rf
from reflexflow import adapters, presets
from reflexflow.config_checks import T_EPS_FLOAT32_MIN
from tests.helpers import ConvVelocity

B = 4
X = torch.randn(B, 3, 8, 8)


class DropoutBN(nn.Module):
    """Dropout and BatchNorm: computes differently, and updates statistics, in train mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.modes = []

    def forward(self, x, t):
        self.modes.append((torch.is_grad_enabled(), self.training))
        return self.drop(self.bn(x))


_GLOBAL_NET = DropoutBN()


def module_level_model(x, t):
    """A model reached only through this module's globals."""
    return _GLOBAL_NET(x, t)


ROLLOUT = dict(preset="grid-direction", rollout_steps=3, k_draw="fixed", num_sampling_steps=10)


def _bn_updates(net: DropoutBN, fn) -> int:
    before = net.bn.num_batches_tracked.item()
    fn()
    return net.bn.num_batches_tracked.item() - before


# -- 1. the eval-mode rollout finds (or is told) the modules ------------------------------


def test_module_level_function_model_rolls_out_in_eval_mode():
    _GLOBAL_NET.train()
    _GLOBAL_NET.modes.clear()
    updates = _bn_updates(_GLOBAL_NET, lambda: rf.reflexflow_loss(module_level_model, X, **ROLLOUT))
    assert updates == 2  # the two gradient calls; the 2 rollout calls run in eval mode
    rollout = [train for grad, train in _GLOBAL_NET.modes if not grad]
    assert rollout == [False, False]
    assert _GLOBAL_NET.training


def test_module_in_a_container_is_switched_when_named_in_rollout_modules():
    net = DropoutBN().train()
    nets = {"velocity": net}  # a dict: no attribute, closure cell or global names the module

    def model(x, t):
        return nets["velocity"](x, t)

    updates = _bn_updates(
        net, lambda: rf.reflexflow_loss(model, X, rollout_modules=(net,), **ROLLOUT)
    )
    assert updates == 2
    assert [train for grad, train in net.modes if not grad] == [False, False]
    assert net.training and net.drop.training  # every flag restored


def test_named_rollout_modules_give_the_same_loss_as_passing_the_module():
    """Forward modes agree: a wrapper naming its module rolls out exactly as the module."""
    net = ConvVelocity()
    holder = {"net": net}
    knobs = dict(rollout_steps=2, k_draw="fixed", num_sampling_steps=10)
    direct = rf.reflexflow_loss(net, X, generator=torch.Generator().manual_seed(3), **knobs)
    named = rf.reflexflow_loss(
        lambda x, t: holder["net"](x, t),
        X,
        generator=torch.Generator().manual_seed(3),
        rollout_modules=(net,),
        **knobs,
    )
    torch.testing.assert_close(named.loss, direct.loss, rtol=0, atol=0)


def test_eval_rollout_that_finds_no_module_warns_once_naming_rollout_mode():
    net = DropoutBN().train()
    box = [net]

    def hidden(x, t):
        return box[0](x, t)

    with pytest.warns(
        RuntimeWarning, match=r"rollout_mode='eval' found no nn.Module.*rollout_modules"
    ):
        rf.reflexflow_loss(hidden, X, **ROLLOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.reflexflow_loss(hidden, X, **ROLLOUT)  # once per callable
        rf.reflexflow_loss(hidden, X, rollout_mode="train", **ROLLOUT)


def test_rollout_modules_must_hold_modules():
    with pytest.raises(TypeError, match="rollout_modules must be a tuple of nn.Modules"):
        rf.ReflexFlowConfig(rollout_modules=("net",))


# -- 2. knobs that nothing reads, custom paths, t_eps ------------------------------------


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


def test_t_eps_below_the_float32_threshold_warns():
    with pytest.warns(UserWarning, match=r"t_eps=1e-07 is below 1e-05.*float32"):
        rf.ReflexFlowConfig(t_eps=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf.ReflexFlowConfig(t_eps=T_EPS_FLOAT32_MIN)


# -- 3. named errors at the model call ----------------------------------------------------


@pytest.mark.parametrize(
    "x_dtype, model_dtype",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_x1_dtype_other_than_the_models_names_both_and_the_fix(x_dtype, model_dtype):
    model = ConvVelocity().to(model_dtype)
    match = (
        rf"x1's dtype {x_dtype}, but its parameters are {model_dtype}.*"
        rf"x1\.to\({model_dtype}\).*torch\.autocast"
    )
    with pytest.raises(TypeError, match=match) as info:
        rf.reflexflow_loss(model, X.to(x_dtype))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error is kept


def test_noise_dtype_other_than_the_models_is_named_in_sample():
    with pytest.raises(TypeError, match=r"noise's dtype torch\.float16.*noise\.to"):
        rf.sample(ConvVelocity(), X.half(), 2)


def test_meta_tensors_are_named():
    with pytest.raises(ValueError, match="x1 is on the meta device"):
        rf.reflexflow_loss(ConvVelocity(), X.to("meta"))
    with pytest.raises(
        ValueError,
        match=r"model's parameters are on the meta device, x1 on cpu",
    ):
        rf.reflexflow_loss(ConvVelocity().to("meta"), X)
    labels = torch.zeros(B, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] is on the meta device, x1 on cpu"):
        rf.reflexflow_loss(ConvVelocity(num_classes=3), X, model_kwargs={"y": labels})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_model_on_another_device_is_named():
    with pytest.raises(ValueError, match=r"the model's parameters are on cuda:0, x1 on cpu"):
        rf.reflexflow_loss(ConvVelocity().cuda(), X)
    labels = torch.zeros(B, dtype=torch.long)
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] is on cpu, x1 on cuda:0"):
        rf.reflexflow_loss(ConvVelocity(num_classes=3).cuda(), X.cuda(), model_kwargs={"y": labels})


def test_a_model_returning_a_non_floating_tensor_is_refused():
    with pytest.raises(TypeError, match="floating-point velocity.*torch.int64"):
        rf.reflexflow_loss(lambda x, t: x.long(), X)
    with pytest.raises(TypeError, match=r"got tuple.*DiffusersModelAdapter"):
        rf.reflexflow_loss(lambda x, t: (x,), X)


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


# -- exposure_bias and sample check their inputs as the loss does -------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x1=X[:0]), ValueError, r"x1 must have shape \(B, \.\.\.\) with B >= 1"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
        (dict(batch_size=-1), ValueError, "batch_size must be >= 1"),
        (dict(num_times=0), ValueError, "num_times must be >= 1"),
        (dict(cutoff=2.0), ValueError, "cutoff must be <= 1"),
        (dict(t_eps=-1.0), ValueError, "t_eps must be > 0"),
        (dict(t0=torch.tensor([])), ValueError, "t0 must hold at least one"),
        (dict(t0=torch.tensor([float("nan")])), ValueError, r"t0 must lie in \[0"),
        (
            dict(model_kwargs={"y": torch.zeros(B + 1, dtype=torch.long)}),
            ValueError,
            r"model_kwargs\['y'\] has shape \(5,\)",
        ),
        (dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict or None"),
        (dict(x1=X.to("meta")), ValueError, "x1 is on the meta device"),
    ],
)
def test_exposure_bias_names_bad_inputs(kwargs, error, match):
    args = {"x1": X, "num_times": 2, **kwargs}
    x1 = args.pop("x1")
    with pytest.raises(error, match=match):
        rf.exposure_bias(ConvVelocity(num_classes=3), x1, **args)


@pytest.mark.parametrize(
    "noise, kwargs, error, match",
    [
        (torch.randn(B), {}, ValueError, r"noise must have shape \(B, \.\.\.\)"),
        (X[:0], {}, ValueError, r"noise must have shape \(B, \.\.\.\) with B >= 1"),
        (X.to("meta"), {}, ValueError, "noise is on the meta device"),
        (X.long(), {}, TypeError, "noise must be a floating-point tensor"),
        (X, dict(steps=2.0), ValueError, "steps must be an int >= 1"),
        (X, dict(convention="sigma"), ValueError, "convention must be one of"),
        (X, dict(timestep_scale=0), ValueError, "timestep_scale must be > 0"),
        (X, dict(t_start="0"), TypeError, "t_start must be a number"),
        (X, dict(model_kwargs=[1]), TypeError, "model_kwargs must be a dict or None"),
        (
            X,
            dict(model_kwargs={"y": torch.zeros(B + 1, dtype=torch.long)}),
            ValueError,
            r"model_kwargs\['y'\] has shape \(5,\)",
        ),
    ],
)
def test_sample_names_bad_inputs(noise, kwargs, error, match):
    steps = kwargs.pop("steps", 2)
    with pytest.raises(error, match=match):
        rf.sample(ConvVelocity(num_classes=3), noise, steps, **kwargs)


def test_sample_passes_unbatched_kwargs_as_they_are():
    ids = torch.arange(6).view(3, 2)  # not batch-shaped (Flux's img_ids)
    seen = []

    def model(x, t, img_ids):
        seen.append(img_ids)
        return -x

    rf.sample(model, X, 2, model_kwargs={"img_ids": ids}, unbatched_kwargs=("img_ids",))
    assert len(seen) == 2 and all(s is ids for s in seen)


def test_sample_refuses_a_model_returning_a_non_floating_tensor():
    with pytest.raises(TypeError, match="floating-point velocity"):
        rf.sample(lambda x, t: x.long(), X, 2)


# -- 5. SiT's label embedder contract -----------------------------------------------------


class _RenamedTableEmbedder(nn.Module):
    """A LabelEmbedder whose table is not named embedding_table."""

    def __init__(self, num_classes: int, dropout_prob: float) -> None:
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, 4)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob


class _SiTWithRenamedTable(nn.Module):
    def __init__(self, dropout_prob: float) -> None:
        super().__init__()
        self.y_embedder = _RenamedTableEmbedder(3, dropout_prob)
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t, y):
        return self.lin(x) + self.y_embedder.table(y)


def test_sit_adapter_refuses_a_label_dropping_embedder_outside_the_contract():
    adapter = adapters.SiTTransportAdapter("Linear", num_sampling_steps=10)
    x1, y = torch.randn(B, 4), {"y": torch.zeros(B, dtype=torch.long)}
    with pytest.raises(
        ValueError, match=r"does not follow SiT's LabelEmbedder contract.*embedding_table"
    ):
        adapter.training_losses(_SiTWithRenamedTable(0.1), x1, y)
    out = adapter.training_losses(_SiTWithRenamedTable(0.0), x1, y)  # drops nothing itself
    assert out["loss"].shape == (B,)


# -- 6. presets.describe returns its text -------------------------------------------------


def test_describe_returns_its_text_and_prints_nothing(capsys):
    text = presets.describe("defar")
    assert text == presets.SOURCES["defar"]
    assert capsys.readouterr().out == ""
    assert "Returns the text" in presets.describe.__doc__


# -- callables and adapters the user passes -----------------------------------------------


def test_loss_weighting_of_the_wrong_signature_or_with_negative_weights_is_refused():
    with pytest.raises(TypeError, match=r"loss_weighting must be callable as loss_weighting\(t\)"):
        rf.ReflexFlowConfig(loss_weighting=lambda: 1.0)
    with pytest.raises(ValueError, match="finite, non-negative weights; got min -1"):
        rf.reflexflow_loss(ConvVelocity(), X, loss_weighting=lambda t: -torch.ones_like(t))
    with pytest.raises(TypeError, match="floating-point weights, got torch.int64"):
        rf.reflexflow_loss(ConvVelocity(), X, loss_weighting=lambda t: torch.ones_like(t).long())


def test_adapter_helpers_name_bad_arguments():
    with pytest.raises(TypeError, match="y must hold integer class labels"):
        adapters.drop_labels(torch.zeros(B), 0.1, 3)
    with pytest.raises(TypeError, match="prob must be a number"):
        adapters.drop_labels(torch.zeros(B, dtype=torch.long), "0.1", 3)
    with pytest.raises(ValueError, match=r"tokens must have shape \(4, 16, 12\)"):
        adapters.flux_unpack_latents(torch.randn(4, 16, 8), torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="height must be an even int"):
        adapters.flux_latent_image_ids(7, 8)
    with pytest.raises(TypeError, match="sample_arg must be a keyword name"):
        adapters.DiffusersModelAdapter(nn.Identity(), sample_arg=None)
    with pytest.raises(TypeError, match="unpack must be callable or None"):
        adapters.DiffusersModelAdapter(nn.Identity(), pack=lambda x: x, unpack=3)
    adapter = adapters.SiTTransportAdapter("Linear", class_dropout_prob=0.0)
    with pytest.raises(TypeError, match="model_kwargs must be a dict or None, got list"):
        adapter.training_losses(ConvVelocity(), X, [1])
    with pytest.raises(TypeError, match="label_key must be a str"):
        adapters.SiTTransportAdapter("Linear", label_key=0)
