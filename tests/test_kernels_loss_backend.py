"""ReflexFlowLoss(backend="triton") against backend="torch" (the reference objective)."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.kernels import triton_usable
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec
from reflexflow.stages import select_objective
from tests.helpers import one_step_inputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_usable(DEV), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)


def _run(backend: str, **knobs):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEV)
    x1 = torch.randn(4, 3, 6, 7, generator=torch.Generator().manual_seed(1)).to(DEV)
    gen = torch.Generator(DEV).manual_seed(2)
    knobs = {"num_sampling_steps": 10, **knobs}
    loss_fn = rf.ReflexFlowLoss(backend=backend, **knobs)
    out = loss_fn(lambda x, t: net(x) * (1 + t.view(-1, 1, 1, 1)), x1, generator=gen)
    out.backward()
    return out, net.weight.grad.clone()


@needs_triton
@pytest.mark.parametrize(
    "knobs",
    [
        dict(rollout_steps=2, ss_prob=0.5),
        dict(adr_loss="mse", fc_per_channel=True, fc_filter="box", path="gvp"),
        dict(fc_source="velocity", fc_t_max=0.5),
        dict(lambda_adr=0.0),
        dict(preset="defar"),
        # the kernels' forms of the peers' presets (their own forms are reference_only)
        dict(preset="arioso", adr_target_grad=False),
        dict(preset="simpletuner", fc_normalize="mean", num_sampling_steps=1000),
        dict(preset="grid-direction", joint_forward=True),
        dict(preset="defar", target="stable"),
        dict(preset="defar", memory="lean"),
        dict(preset="defar", loss_weighting="cosmap", weight_adr=True, path="vp"),
    ],
    ids=[
        "direction",
        "mse_per_channel",
        "fc_velocity",
        "fc_only",
        "defar",
        "arioso",
        "simpletuner",
        "grid-direction-joint",
        "stable",
        "lean",
        "weighted-vp",
    ],
)
def test_triton_backend_gives_reference_loss_and_gradients(knobs, monkeypatch):
    from reflexflow import kernels

    calls = []
    fused = kernels.fused_objective
    monkeypatch.setattr(
        kernels, "fused_objective", lambda *a, **kw: calls.append(1) or fused(*a, **kw)
    )
    want, want_grad = _run("torch", **knobs)
    assert not calls
    got, got_grad = _run("triton", **knobs)
    assert calls  # the kernels ran (no silent route to the reference)
    assert torch.equal(got.k, want.k) and torch.equal(got.t0, want.t0)
    for name in ("loss", "fc_loss", "adr_loss"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.fc_weight, want.fc_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def _route(backend: str):
    z = torch.zeros(2, 3)
    inputs = ObjectiveInputs(x1=z, eps=z, x_hat=z, t0=z[:, 0], t1=z[:, 0], k=z[:, 0].long(), v0=z)
    return select_objective(backend, rf.get_path("linear"), ObjectiveSpec(), inputs)


def test_auto_uses_reference_on_cpu_and_torch_always():
    assert _route("auto") is ref.objective
    assert _route("torch") is ref.objective


def test_triton_backend_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _route("triton")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        rf.ReflexFlowConfig(backend="cuda")


@needs_triton
def test_reflexflow_loss_step_breaks_no_graph_in_the_kernels():
    """The fused op lands inside a captured graph; in fixed-k mode (k_draw="fixed",
    ss_prob=1) the whole compiled ReflexFlowLoss has no graph break at all."""
    torch._dynamo.reset()
    net = torch.nn.Conv2d(3, 3, 3, padding=1).to(DEV)
    loss_fn = rf.ReflexFlowLoss(
        backend="triton", k_draw="fixed", rollout_steps=2, num_sampling_steps=10
    )
    x1 = torch.randn(4, 3, 6, 6, device=DEV)
    explained = torch._dynamo.explain(lambda x: loss_fn(lambda y, t: net(y), x).loss)(x1)
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert "reflexflow.fused_objective.default" in ops
    assert explained.graph_break_count == 0, explained.break_reasons


@needs_triton
def test_auto_falls_back_to_reference_once_the_triton_path_fails(monkeypatch):
    from reflexflow.kernels import fused_objective
    from reflexflow.kernels import objective as fo

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(fo.sample_kernel, "run", broken)
    monkeypatch.setattr(fo, "_FAILED", [])
    p, spec = rf.get_path("linear"), ObjectiveSpec()
    x = torch.randn(3, 2, 5, 4, device=DEV)
    t = torch.full((3,), 0.3, device=DEV)
    inputs = one_step_inputs(x, -x, x, t, t + 0.1, v0=x, v1=x + 1)
    with pytest.warns(RuntimeWarning, match="Triton loss kernels failed"):
        got = fused_objective(p, spec, inputs, fail_soft=True)
    torch.testing.assert_close(got.loss, ref.objective(p, spec, inputs).loss)
    fused_objective(p, spec, inputs, fail_soft=True)  # no second warning, no second attempt
    assert len(fo._FAILED) == 1


@needs_triton
def test_auto_does_not_hide_argument_errors(monkeypatch):
    from reflexflow.kernels import fused_objective
    from reflexflow.kernels import objective as fo

    monkeypatch.setattr(fo, "_FAILED", [])
    x = torch.randn(2, 3)
    t = torch.full((2,), 0.3)
    inputs = one_step_inputs(x.clone().requires_grad_(), x, x, t, t, v0=x, v1=x)
    with pytest.raises(ValueError, match="x1"):
        fused_objective(rf.get_path("linear"), ObjectiveSpec(), inputs, fail_soft=True)
    assert fo._FAILED == []
