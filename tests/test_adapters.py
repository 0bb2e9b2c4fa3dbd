"""Adapters: flow_matching schedulers, torchcfm matchers, SiT's Transport, diffusers models.

Here third-party packages are replaced by stand-ins that follow their documented formulas
(SiT, which is not on the package registry, by tests/sit_standin.py); tests/test_peers.py
runs the same adapters against the real diffusers, flow_matching and torchcfm.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import reflexflow as rf
from reflexflow import adapters
from reflexflow import reference as ref
from tests.helpers import ConvVelocity
from tests.sit_standin import SiTStandIn, sit_linear_training_losses

B = 4
X = torch.randn(B, 3, 8, 8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = torch.linspace(0.0, 0.99, 23, dtype=torch.float64)


def _same_path(p, q, t=T):
    for name in ("a", "s", "da", "ds"):
        torch.testing.assert_close(getattr(p, name)(t), getattr(q, name)(t), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ flow_matching stand-ins
# flow_matching.path.scheduler: scheduler(t) -> SchedulerOutput(alpha_t, sigma_t, d_alpha_t,
# d_sigma_t), x_t = sigma_t x_0 + alpha_t x_1, x_0 noise, x_1 data.


def cond_ot(t):
    return SimpleNamespace(
        alpha_t=t, sigma_t=1 - t, d_alpha_t=torch.ones_like(t), d_sigma_t=-torch.ones_like(t)
    )


def cosine(t):
    c, s = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
    return SimpleNamespace(
        alpha_t=s, sigma_t=c, d_alpha_t=0.5 * math.pi * c, d_sigma_t=-0.5 * math.pi * s
    )


def vp(t, beta_min=0.1, beta_max=20.0):
    """flow_matching's VPScheduler formulas (as a dict, which path_from_scheduler accepts)."""
    b, B = beta_min, beta_max
    T_ = 0.5 * (1 - t) ** 2 * (B - b) + (1 - t) * b
    dT = -(1 - t) * (B - b) - b
    return {
        "alpha_t": torch.exp(-0.5 * T_),
        "sigma_t": torch.sqrt(1 - torch.exp(-T_)),
        "d_alpha_t": -0.5 * dT * torch.exp(-0.5 * T_),
        "d_sigma_t": 0.5 * dT * torch.exp(-T_) / torch.sqrt(1 - torch.exp(-T_)),
    }


@pytest.mark.parametrize(
    "scheduler, path", [(cond_ot, rf.LinearPath()), (cosine, rf.GVPPath()), (vp, rf.VPPath())]
)
def test_flow_matching_schedulers_map_onto_the_named_paths(scheduler, path):
    _same_path(adapters.path_from_scheduler(scheduler), path)


def test_loss_with_scheduler_path_equals_loss_with_named_path():
    net = torch.nn.Linear(4, 4).double()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    draws = dict(
        noise=torch.randn(6, 4, generator=g, dtype=torch.float64),
        t=torch.rand(6, generator=g, dtype=torch.float64) * 0.5,
        k=torch.tensor([0, 1, 2, 1, 2, 0]),
    )
    knobs = dict(rollout_steps=2, num_sampling_steps=10)
    a = rf.reflexflow_loss(
        lambda x, t: net(x), x1, path=adapters.path_from_scheduler(cosine), **knobs, **draws
    )
    b = rf.reflexflow_loss(lambda x, t: net(x), x1, path="gvp", **knobs, **draws)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)


def test_path_from_scheduler_rejects_bad_input():
    with pytest.raises(TypeError, match="scheduler"):
        adapters.path_from_scheduler(3)
    with pytest.raises(TypeError, match="sigma_t"):
        adapters.path_from_scheduler(lambda t: SimpleNamespace(alpha_t=t)).s(T)


# ----------------------------------------------------------------- torchcfm stand-ins
class ConditionalFlowMatcher:
    def __init__(self, sigma=0.0):
        self.sigma = sigma


class ExactOptimalTransportConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


class SchrodingerBridgeConditionalFlowMatcher(ConditionalFlowMatcher):
    pass


def test_torchcfm_matchers_map_onto_paths():
    assert isinstance(adapters.torchcfm_path(ConditionalFlowMatcher(0.0)), rf.LinearPath)
    assert isinstance(
        adapters.torchcfm_path(ExactOptimalTransportConditionalFlowMatcher()), rf.LinearPath
    )
    assert isinstance(
        adapters.torchcfm_path(VariancePreservingConditionalFlowMatcher()), rf.GVPPath
    )


def test_lipman_path_reproduces_target_cfm_sample_and_target():
    # torchcfm TargetConditionalFlowMatcher: x_t = t x1 + (1 - (1 - sigma) t) eps,
    # u_t = (x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t)
    sigma = 0.05
    path = adapters.torchcfm_path(TargetConditionalFlowMatcher(sigma))
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(7, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(7, 3, generator=g, dtype=torch.float64)
    t = torch.rand(7, generator=g, dtype=torch.float64)
    xt = t[:, None] * x1 + (1 - (1 - sigma) * t[:, None]) * eps
    ut = (x1 - (1 - sigma) * xt) / (1 - (1 - sigma) * t[:, None])
    torch.testing.assert_close(ref.interpolate(path, x1, eps, t), xt)
    torch.testing.assert_close(ref.velocity_target(path, x1, eps, t), ut)


def test_torchcfm_matchers_without_affine_equivalent_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        adapters.torchcfm_path(ConditionalFlowMatcher(0.1))
    with pytest.raises(ValueError, match="Schrodinger"):
        adapters.torchcfm_path(SchrodingerBridgeConditionalFlowMatcher(1.0))
    with pytest.raises(TypeError, match="matcher"):
        adapters.torchcfm_path(object())


# ---------------------------------------------------------------------------- SiT
class LabelRecordingModel(torch.nn.Module):
    """model(x, t, y) with a null class at index num_classes; records the labels it sees."""

    def __init__(self, num_classes=3, dim=4):
        super().__init__()
        self.emb = torch.nn.Embedding(num_classes + 1, dim)
        self.lin = torch.nn.Linear(dim, dim)
        self.seen = []

    def forward(self, x, t, y):
        self.seen.append((x.detach().clone(), y.clone()))
        return self.lin(x) + self.emb(y) * t[:, None]


def _same_labels_in_every_call(calls, expected):
    """Each call saw the step's labels: as a multiset, ``expected`` repeated len / B times
    (a rollout call on a prefix of the sorted batch sees a sub-multiset)."""
    B = expected.shape[0]
    assert calls
    for labels in calls:
        seen = torch.bincount(labels, minlength=int(expected.max()) + 1)
        want = torch.bincount(expected, minlength=seen.numel())
        if labels.shape[0] % B == 0:
            assert torch.equal(seen, want * (labels.shape[0] // B))
        else:
            assert bool((seen <= want).all())


def test_sit_adapter_matches_reflexflow_loss_and_drops_labels_consistently():
    torch.manual_seed(0)
    model = LabelRecordingModel()
    B = 64
    x1 = torch.randn(B, 4)
    y = torch.randint(0, 3, (B,))
    sit = adapters.SiTTransportAdapter(
        "Linear",
        num_classes=3,
        class_dropout_prob=0.5,
        rollout_steps=1,
        num_sampling_steps=10,
        preset="grid-direction",
        joint_forward=True,
    )
    terms = sit.training_losses(model, x1, {"y": y}, generator=torch.Generator().manual_seed(0))
    assert terms["loss"].shape == (B,)  # per sample, as SiT's training_losses
    # the labels are dropped once, first, with the step's generator; every model call
    # (rollout, gradient calls, in any order or batching) sees those labels
    expected = adapters.drop_labels(y, 0.5, 3, torch.Generator().manual_seed(0))
    _same_labels_in_every_call([labels for _, labels in model.seen], expected)
    dropped = expected == 3
    assert 10 < int(dropped.sum()) < 54
    out = terms["output"]

    # without dropout it is ReflexFlowLoss with path "linear" on the same draws
    plain = adapters.SiTTransportAdapter("Linear", rollout_steps=1, num_sampling_steps=10)
    draws = dict(noise=torch.randn(B, 4), t=out.t0, k=out.k)
    a = plain.training_losses(model, x1, {"y": y}, **draws)["loss"]
    b = rf.ReflexFlowLoss(rollout_steps=1, num_sampling_steps=10)(
        model, x1, model_kwargs={"y": y}, **draws
    )
    torch.testing.assert_close(a.mean(), b.loss)


def test_sit_adapter_reads_a_transport_and_refuses_non_velocity():
    enum = SimpleNamespace
    transport = SimpleNamespace(path_type=enum(name="GVP"), model_type=enum(name="VELOCITY"))
    assert isinstance(adapters.SiTTransportAdapter(transport).loss_fn.config.path, rf.GVPPath)
    with pytest.raises(ValueError, match="velocity"):
        adapters.SiTTransportAdapter(SimpleNamespace(path_type="Linear", model_type="NOISE"))
    with pytest.raises(ValueError, match="path_type"):
        adapters.SiTTransportAdapter("Cosine")
    with pytest.raises(ValueError, match="class_dropout_prob"):
        adapters.SiTTransportAdapter("Linear", class_dropout_prob=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        adapters.SiTTransportAdapter("Linear", num_classes=0)
    # a probability > 0 needs the null label's id: from num_classes or the model's embedder
    no_embedder = adapters.SiTTransportAdapter("Linear", class_dropout_prob=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        no_embedder.training_losses(
            LabelRecordingModel(), torch.randn(2, 4), {"y": torch.ones(2).long()}
        )


# ----------------------------------------------------------------------- diffusers
class TinyTransformer(torch.nn.Module):
    """diffusers-shaped stand-in: forward(hidden_states, timestep, encoder_hidden_states,
    return_dict) on (B, L, D) tokens, returns a tuple; records the timesteps it sees."""

    def __init__(self, dim=8):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.timesteps = []

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True):
        self.timesteps.append(timestep.detach().clone())
        h = self.proj(hidden_states) * (timestep[:, None, None] / 1000.0)
        if encoder_hidden_states is not None:
            h = h + encoder_hidden_states.mean(1, keepdim=True)
        assert return_dict is False
        return (h,)


def _pack(x):  # (B, C, H, W) -> (B, H*W/4, 4C): 2x2 patches as tokens (Flux-style)
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, 4 * C)


def _unpack(tokens, like):
    B, C, H, W = like.shape
    return tokens.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 2, 4, 6)
    assert torch.equal(_unpack(_pack(x), x), x)


def test_sd3_timesteps_are_sigma_times_1000_and_loss_equals_canonical():
    torch.manual_seed(0)
    tr = TinyTransformer()
    model = adapters.DiffusersModelAdapter(tr, pack=_pack, unpack=_unpack)
    B = 4
    x0 = torch.randn(B, 2, 4, 4)  # clean latents (data at sigma = 0)
    ctx = torch.randn(B, 3, 8)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(B, generator=g) * 0.5 + 0.4  # rollout start sigma (noise_at_1)
    k = torch.tensor([0, 1, 2, 1])
    knobs = dict(
        rollout_steps=2, num_sampling_steps=10, joint_forward=True, preset="grid-direction"
    )
    sd3 = adapters.diffusers_knobs("sd3", precondition_outputs=False)  # weight 1
    out = rf.ReflexFlowLoss(**sd3, **knobs)(
        model, x0, noise=noise, t=sigma, k=k, model_kwargs={"encoder_hidden_states": ctx}
    )
    joint = tr.timesteps[-1]
    torch.testing.assert_close(joint, 1000 * torch.cat([out.t0, out.t1]).float())
    assert bool((joint >= 0).all() and (joint <= 1000).all())

    # the same step in the canonical convention: t = 1 - sigma, v = -model output
    def canonical(x, t, encoder_hidden_states):
        return -model(x, 1000 * (1 - t), encoder_hidden_states=encoder_hidden_states)

    can = rf.ReflexFlowLoss(**knobs)(
        canonical, x0, noise=noise, t=1 - sigma, k=k, model_kwargs={"encoder_hidden_states": ctx}
    )
    torch.testing.assert_close(out.loss, can.loss, rtol=1e-5, atol=1e-6)


def test_flux_knobs_pass_sigma_and_shifted_sampler_is_in_range():
    assert adapters.diffusers_knobs("flux")["timestep_scale"] == 1.0
    s = adapters.ShiftedSigmaSampler(3.0)(
        1000, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    u = torch.sigmoid(torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=s.dtype))
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))
    with pytest.raises(ValueError, match="family"):
        adapters.diffusers_knobs("sdxl")


# ------------------------------------------------------------------------ examples
@pytest.mark.parametrize(
    "name, needs, argv",
    [
        ("sit_style.py", (), []),
        ("diffusers_style.py", ("diffusers",), ["--family", "sd3", "--sample-steps", "4"]),
        ("diffusers_style.py", ("diffusers",), ["--family", "flux", "--sample-steps", "4"]),
        ("flow_matching_paths.py", ("flow_matching", "torchcfm"), []),
    ],
)
def test_example_runs_at_toy_size(name, needs, argv, capsys, monkeypatch):
    for module in needs:  # the peer examples use the real packages
        pytest.importorskip(module)
    monkeypatch.setattr(sys, "argv", [name, "--steps", "2", *argv])
    runpy.run_path(os.path.join(ROOT, "examples", name), run_name="__main__")
    printed = capsys.readouterr().out
    assert "loss" in printed and "nan" not in printed


def test_sampler_timestep_scale_and_noise_at_1_equal_canonical_sampling():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    seen = []

    def sd3_model(x, timestep):  # noise_at_1 model taking timesteps in [0, 1000]
        seen.append(timestep)
        return net(x) * (timestep[:, None] / 1000.0)

    noise = torch.randn(3, 4)
    a = rf.sample(sd3_model, noise, steps=5, convention="noise_at_1", timestep_scale=1000.0)
    b = rf.sample(lambda x, t: -sd3_model(x, 1000 * (1 - t)), noise, steps=5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(seen[0], torch.full((3,), 1000.0))  # starts at sigma = 1


class ICPlan:  # SiT's plan class names; SiT's Transport stores no path_type
    pass


class GVPCPlan:
    pass


class VPCPlan:
    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max


class SiTLikeTransport:
    """The attributes SiT's transport.Transport keeps (willisma/SiT transport/transport.py)."""

    def __init__(self, plan):
        self.model_type = SimpleNamespace(name="VELOCITY")
        self.loss_type = SimpleNamespace(name="NONE")
        self.path_sampler = plan
        self.train_eps = 0.0
        self.sample_eps = 0.0


@pytest.mark.parametrize(
    "plan, expected",
    [(ICPlan(), rf.LinearPath), (GVPCPlan(), rf.GVPPath), (VPCPlan(0.2, 10.0), rf.VPPath)],
)
def test_sit_adapter_reads_the_path_from_a_real_transports_path_sampler(plan, expected):
    adapter = adapters.SiTTransportAdapter(SiTLikeTransport(plan))
    path = adapter.loss_fn.config.path
    assert isinstance(path, expected)
    if isinstance(plan, VPCPlan):
        assert (path.beta_min, path.beta_max) == (0.2, 10.0)


def test_sit_adapter_rejects_an_unknown_plan():
    with pytest.raises(ValueError, match="path_sampler must be a SiT ICPlan"):
        adapters.SiTTransportAdapter(SiTLikeTransport(object()))


# ------------------------------------------------- SiT's contract (tests/sit_standin.py)


def _sit_batch(B=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, 2, 4, 4, generator=g)
    y = torch.randint(0, classes, (B,), generator=g)
    x0 = torch.randn(B, 2, 4, 4, generator=g)
    t = torch.rand(B, generator=g)  # SiT's t ~ U[0, 1)
    t[0], t[1] = 0.9995, 0.0  # any t in [0, 1) is valid SiT input, past 1 - t_eps too
    return x1, y, x0, t


def test_sit_adapter_fm_returns_sits_per_sample_loss_on_the_same_draws():
    model = SiTStandIn(class_dropout_prob=0.0)
    x1, y, x0, t = _sit_batch()
    want = sit_linear_training_losses(model, x1, {"y": y}, t=t, x0=x0)["loss"]
    adapter = adapters.SiTTransportAdapter("Linear", method="fm")
    got = adapter.training_losses(model, x1, {"y": y}, noise=x0, t=t)
    assert got["loss"].shape == (8,)
    torch.testing.assert_close(got["loss"], want, rtol=1e-5, atol=1e-6)
    # train.py's loss = loss_dict["loss"].mean(): same value and gradient as SiT's
    got["loss"].mean().backward()
    mine = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    want.mean().backward()
    theirs = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sit_adapter_per_sample_loss_averages_to_the_library_loss_with_its_gradient():
    model = SiTStandIn(class_dropout_prob=0.0)
    x1, y, x0, _ = _sit_batch()
    draws = dict(noise=x0, t=torch.linspace(0.0, 0.9, 8), k=torch.tensor([1, 0] * 4))
    knobs = dict(rollout_steps=1, num_sampling_steps=10)
    got = adapters.SiTTransportAdapter("Linear", **knobs).training_losses(
        model, x1, {"y": y}, **draws
    )
    assert got["loss"].shape == (8,)
    got["loss"].mean().backward()
    mine = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    want = rf.ReflexFlowLoss(**knobs)(model, x1, model_kwargs={"y": y}, **draws)
    want.loss.backward()
    torch.testing.assert_close(got["loss"].mean(), want.loss)
    for a, b in zip(mine, [p.grad for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(a, b)
    assert set(got) >= {"loss", "fc_loss", "adr_loss", "bias_norm", "t", "output"}


def test_sit_adapter_takes_over_the_models_own_label_dropout():
    # SiT's train.py builds the model with class_dropout_prob=0.1: its table has the null
    # row; the adapter drops labels once per step and turns the model's own dropout off
    model = SiTStandIn(num_classes=5, class_dropout_prob=0.5).train()
    adapter = adapters.SiTTransportAdapter("Linear", rollout_steps=1, num_sampling_steps=10)
    assert adapter.label_dropout(model)[:2] == (0.5, 5)
    x1, y, _, _ = _sit_batch(B=64)
    adapter.training_losses(model, x1, {"y": y}, generator=torch.Generator().manual_seed(1))
    assert model.y_embedder.dropout_prob == 0.5  # restored
    # one drop per step (the first draw of the step's generator), none inside the model
    expected = adapters.drop_labels(y, 0.5, 5, torch.Generator().manual_seed(1))
    _same_labels_in_every_call(model.labels_seen, expected)
    dropped = expected == 5
    assert 10 < int(dropped.sum()) < 54 and torch.equal(expected[~dropped], y[~dropped])
    # through a DDP-style wrapper (.module) as SiT's train.py passes it
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert adapters.sit_label_embedder(wrapper) is model.y_embedder


def test_sit_adapter_refuses_to_drop_labels_when_the_table_has_no_null_row():
    model = SiTStandIn(num_classes=5, class_dropout_prob=0.0)  # 5 rows: no null class
    assert model.y_embedder.embedding_table.num_embeddings == 5
    adapter = adapters.SiTTransportAdapter("Linear", class_dropout_prob=0.1)
    x1, y, _, _ = _sit_batch()
    with pytest.raises(
        ValueError, match="no null row.*class_dropout_prob > 0.*class_dropout_prob=0"
    ):
        adapter.training_losses(model, x1, {"y": y})
    # without dropout both set-ups train, and the default follows the model (0 here)
    for p in (0.0, None):
        out = adapters.SiTTransportAdapter("Linear", class_dropout_prob=p).training_losses(
            model, x1, {"y": y}
        )
        assert torch.isfinite(out["loss"]).all()
    with pytest.raises(ValueError, match="num_classes=7"):
        adapters.SiTTransportAdapter(num_classes=7, class_dropout_prob=0.1).label_dropout(model)


class _HiddenTableSiT(torch.nn.Module):
    """A model that keeps its label table out of sight (no y_embedder): no null row."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.table = torch.nn.Embedding(num_classes, 4)

    def forward(self, x, t, y):
        return x * self.table(y).sum(1)[:, None] + t[:, None]


def test_sit_adapter_explains_an_index_error_from_a_table_it_cannot_see():
    adapter = adapters.SiTTransportAdapter("Linear", num_classes=3, class_dropout_prob=1.0)
    x1 = torch.randn(4, 4)
    with pytest.raises(ValueError, match="null class 3.*class_dropout_prob > 0"):
        adapter.training_losses(_HiddenTableSiT(), x1, {"y": torch.zeros(4, dtype=torch.long)})


def test_sit_sample_ode_num_steps_is_num_sampling_steps_plus_one():
    # SiT's sample_ode(sampling_method="euler", num_steps=M) runs torchdiffeq's odeint
    # on linspace(0, 1, M): M - 1 Euler steps, reflexflow.sample(steps=M - 1)
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = SiTStandIn(class_dropout_prob=0.0).eval()
    y = torch.arange(3)
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def drift(t, x):
        return model(x, torch.ones(x.shape[0]) * t, y)

    M = 11
    with torch.no_grad():
        sit = torchdiffeq.odeint(drift, z, torch.linspace(0, 1, M), method="euler")[-1]
        ours = rf.sample(model, z, steps=M - 1, model_kwargs={"y": y})
    torch.testing.assert_close(ours, sit, rtol=1e-5, atol=1e-6)


def test_sit_adapter_refuses_the_lean_memory_mode():
    with pytest.raises(ValueError, match="memory='lean' does not fit SiT's contract"):
        adapters.SiTTransportAdapter("Linear", memory="lean")


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
