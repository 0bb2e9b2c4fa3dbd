"""torch.compile: a compiled model inside the loss, and the compiled reference objective.

Marked ``compile`` (deselect with ``-m "not compile"``): inductor on a 2-core CPU takes
about 20 s for the tiny MLP below; the reference objective uses the aot_eager backend,
which proves the same thing about graph capture (fullgraph=True: no graph break) without
C++ code generation.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import reflexflow as rf
from reflexflow import reference as ref
from reflexflow.objective import ObjectiveInputs, ObjectiveSpec

pytestmark = pytest.mark.compile

# inductor needs a C++ compiler on CPU; aot_eager still exercises dynamo and AOTAutograd
BACKEND = "inductor" if (torch.cuda.is_available() or shutil.which("g++")) else "aot_eager"


class MLP(nn.Module):
    def __init__(self, dim=4, width=16):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim + 1, width), nn.Linear(width, dim)

    def forward(self, x, t):
        return self.l2(torch.nn.functional.silu(self.l1(torch.cat([x, t[:, None]], 1))))


def _compiles() -> tuple[int, int]:
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def test_compiled_model_in_fixed_k_mode_matches_eager_and_never_recompiles_after_first_step():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = MLP()
    compiled_net = MLP()
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net, backend=BACKEND)
    # fixed k and ss_prob = 1: every step has the same shapes (rollout: B, then one 2B call)
    loss_fn = rf.ReflexFlowLoss(k_draw="fixed", ss_prob=1.0, rollout_steps=2, num_sampling_steps=10)

    x1 = torch.randn(8, 4)
    out_c = loss_fn(compiled, x1, generator=torch.Generator().manual_seed(0))
    out_e = loss_fn(eager, x1, generator=torch.Generator().manual_seed(0))
    out_c.loss.backward()
    out_e.loss.backward()
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    for pc, pe in zip(compiled_net.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6)
    after_warmup = _compiles()
    assert after_warmup[1] >= 1  # the model was really compiled

    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        out = loss_fn(compiled, torch.randn(8, 4, generator=gen), generator=gen)
        out.loss.backward()
    assert _compiles() == after_warmup  # no new frame compiled, no recompile


def _objective_inputs(shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    B = shape[0]
    x1 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    k = torch.tensor([0, 1, 2, 1])
    t0 = torch.rand(B, generator=g, dtype=dtype) * 0.7
    t1 = t0 + 0.1 * k
    x_hat = ref.interpolate(rf.LinearPath(), x1, eps, t1) + 0.1 * torch.randn(
        shape, generator=g, dtype=dtype
    )
    v0 = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    v1 = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    return dict(v0=v0, v1=v1, x1=x1, eps=eps, x_hat=x_hat, t0=t0, t1=t1, k=k)


@pytest.mark.parametrize(
    "shape, path, knobs",
    [
        ((4, 3, 8, 8), "linear", dict(fc_filter="gaussian", adr_loss="direction")),
        ((4, 3, 8, 8), "gvp", dict(fc_filter="box", adr_loss="mse")),
        ((4, 2, 8), "vp", dict(fc_filter="gaussian", fc_per_channel=True)),
        ((4, 5), "linear", dict(adr_loss="direction")),
    ],
)
def test_reference_objective_compiles_with_fullgraph_and_matches_eager(shape, path, knobs):
    torch._dynamo.reset()
    p = rf.get_path(path)
    inputs = _objective_inputs(shape)
    spec, typed = ObjectiveSpec().replace(**knobs), ObjectiveInputs(**inputs)
    compiled = torch.compile(ref.objective, fullgraph=True, backend="aot_eager")
    got = compiled(p, spec, typed)
    g_got = torch.autograd.grad(got.loss, [inputs["v0"], inputs["v1"]])
    want = ref.objective(p, spec, typed)
    g_want = torch.autograd.grad(want.loss, [inputs["v0"], inputs["v1"]])
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loss_with_varying_k_graph_breaks_only_at_the_rollout_plan_host_sync():
    """Compiling the whole loss with per-sample k (k ~ U{1..K}) breaks the graph only where
    the rollout plan reads k on the host (k.max(), bincount, .tolist()); fixed-k mode has
    no break (next test)."""
    torch._dynamo.reset()
    net = MLP()

    def step(x1):
        return rf.reflexflow_loss(net, x1, k_draw="uniform", rollout_steps=2, num_sampling_steps=10)

    explanation = torch._dynamo.explain(step)(torch.randn(8, 4))
    assert explanation.graph_break_count >= 1
    files = {r.user_stack[-1].filename.replace("\\", "/") for r in explanation.break_reasons}
    assert files and all(f.endswith("reflexflow/rollout.py") for f in files), files


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_loss_compiles_with_fullgraph_in_fixed_k_mode(backend):
    """k_draw="fixed", ss_prob=1: every drawn k is K, the rollout plan is static (no host
    sync), so the whole loss (draws, rollout, 2B forward, objective) is one graph."""
    if backend == "triton":
        from reflexflow.kernels import triton_usable

        if not triton_usable("cpu"):
            pytest.skip("triton is not usable on CPU here (needs TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t):
        return net(x) * (1 + t.view(-1, 1, 1, 1))

    loss_fn = rf.ReflexFlowLoss(
        rollout_steps=2, k_draw="fixed", ss_prob=1.0, num_sampling_steps=10, backend=backend
    )
    compiled = torch.compile(lambda x: loss_fn(model, x).loss, fullgraph=True, backend="aot_eager")
    x1 = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    eager = loss_fn(model, x1).loss
    torch.manual_seed(1)
    traced = compiled(x1)
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    traced.backward()
    assert net.weight.grad is not None and bool(torch.isfinite(net.weight.grad).all())


def test_fullgraph_compiles_with_a_callable_time_sampler_and_loss_weighting():
    """The per-step value checks of user callables (time_sampler, loss_weighting) are host
    syncs: skipped while tracing, so the SD3 recipe compiles as one graph."""
    from reflexflow import adapters

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    def model(x, t):
        return net(x) * (1 + t.view(-1, 1, 1, 1))

    knobs = adapters.diffusers_knobs("sd3", weighting_scheme="logit_normal")
    loss_fn = rf.ReflexFlowLoss(ss_prob=1.0, backend="torch", **knobs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: loss_fn(model, x).loss, fullgraph=True, backend="eager")
    x1 = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    eager = loss_fn(model, x1).loss
    torch.manual_seed(1)
    torch.testing.assert_close(compiled(x1), eager, rtol=1e-5, atol=1e-6)


def test_fullgraph_with_per_sample_k_names_the_fixed_k_remedy_in_its_error():
    """Dynamo stops at the rollout's one host read of k; its error shows that source line,
    which names k_draw="fixed" (the static plan with no host read)."""
    from tests.helpers import ConvVelocity

    net = ConvVelocity()
    loss_fn = rf.ReflexFlowLoss(preset="grid-direction", rollout_steps=2, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: loss_fn(net, x).loss, fullgraph=True)
    with pytest.raises(Exception, match='k_draw="fixed"'):
        compiled(torch.randn(4, 3, 8, 8))
