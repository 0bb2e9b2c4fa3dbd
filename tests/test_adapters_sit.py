"""reflexflow/adapters/sit.py: SiT's Transport.training_losses contract (against
tests/sit_standin.py, a stand-in of SiT, which is not on the package registry): the same
loss, label dropout once per step, the path read from a transport, refusals named."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import reflexflow as rf
from reflexflow import adapters
from tests.sit_standin import SiTStandIn, sit_linear_training_losses

B = 4


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


def test_sit_adapter_with_class_dropout_prob_zero_keeps_every_label_in_every_call():
    # the model was built with label dropout; the adapter's 0 switches it off, too
    model = SiTStandIn(num_classes=5, class_dropout_prob=0.5).train()
    adapter = adapters.SiTTransportAdapter(
        "Linear", class_dropout_prob=0.0, rollout_steps=1, num_sampling_steps=10
    )
    x1, y, _, _ = _sit_batch(B=64)
    adapter.training_losses(model, x1, {"y": y}, generator=torch.Generator().manual_seed(1))
    assert model.y_embedder.dropout_prob == 0.5  # restored
    _same_labels_in_every_call(model.labels_seen, y)
    assert all(int((labels == 5).sum()) == 0 for labels in model.labels_seen)


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
