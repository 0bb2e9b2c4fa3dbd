"""memory="lean": the FM term's backward runs before the ADR term's forward.

The two terms are independent given the detached x^_t1, so the gradients equal the
default mode's (float64, 1e-10), with a constant loss scale as a GradScaler applies, with
a real torch.amp.GradScaler, and over gradient accumulation; the saved activations peak
at FM's (at most 1.1x a plain FM step's on a small DiT). DDP and FSDP2 are in
tests/test_ddp.py.
"""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from benchmarks.machinery.step import StepSpec, make_loss_fn, plain_fm_loss, saved_activation_bytes
from reflexflow.demo.toy_models import build_model
from tests.helpers import ConvVelocity

B, SHAPE = 6, (6, 3, 6, 6)
K = torch.tensor([0, 1, 2, 2, 1, 2])


def _draws():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(*SHAPE, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.7
    return dict(noise=noise, t=t, k=K), x1


def _grads(knobs, backward, model_kwargs=None, num_classes=0):
    draws, x1 = _draws()
    net = ConvVelocity(num_classes=num_classes).double()
    out = rf.reflexflow_loss(
        net,
        x1,
        model_kwargs=model_kwargs,
        rollout_steps=2,
        num_sampling_steps=10,
        **draws,
        **knobs,
    )
    backward(out)
    return out, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize(
    "knobs",
    [
        {"preset": "defar"},
        {"preset": "grid-direction"},
        {"preset": "defar", "loss_weighting": "cosmap", "weight_adr": True},
        {"preset": "grid-direction", "share_first_call": False},
    ],
    ids=["defar", "grid-direction", "weighted", "two-call"],
)
def test_lean_gradients_equal_the_default_modes_under_a_constant_loss_scale(knobs):
    scale = 512.0
    want, want_grads = _grads(knobs, lambda out: (scale * out.loss).backward())
    got, got_grads = _grads({**knobs, "memory": "lean"}, lambda out: out.backward(loss_scale=scale))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.loss, want.loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(got.adr_loss, want.adr_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.per_sample_loss, want.per_sample_loss, rtol=1e-12, atol=0)


def test_lean_with_a_grad_scaler_equals_the_default_mode_with_it():
    def scaled(lean):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return lambda out: out.backward(scaler) if lean else scaler.scale(out.loss).backward()

    _, want = _grads({}, scaled(False))
    _, got = _grads({"memory": "lean"}, scaled(True))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lean_gradient_accumulation_over_micro_batches_equals_one_batch():
    draws, x1 = _draws()
    full_net = ConvVelocity().double()
    rf.reflexflow_loss(
        full_net, x1, rollout_steps=2, num_sampling_steps=10, **draws
    ).loss.backward()
    net = ConvVelocity().double()
    for part in (slice(0, 3), slice(3, 6)):
        out = rf.reflexflow_loss(
            net,
            x1[part],
            noise=draws["noise"][part],
            t=draws["t"][part],
            k=draws["k"][part],
            rollout_steps=2,
            num_sampling_steps=10,
            memory="lean",
        )
        out.backward(loss_scale=0.5)
    for a, b in zip(net.parameters(), full_net.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_lean_mode_runs_the_fm_backward_before_the_adr_forward():
    events = []
    net = ConvVelocity()

    def model(x, t):
        events.append("forward with grad" if torch.is_grad_enabled() else "forward no grad")
        v = net(x, t)
        if v.requires_grad:
            v.register_hook(lambda g: events.append("backward") or g)
        return v

    out = rf.reflexflow_loss(
        model, torch.randn(*SHAPE), preset="grid-direction", memory="lean", rollout_steps=1
    )
    assert events == ["forward with grad"]  # the shared call; the ADR call is deferred
    out.backward()
    assert events == ["forward with grad", "backward", "forward with grad", "backward"]


def test_lean_loss_is_only_readable_after_backward_and_backward_runs_once():
    out = rf.reflexflow_loss(ConvVelocity(), torch.randn(*SHAPE), memory="lean")
    with pytest.raises(RuntimeError, match=r"call out.backward\(\)"):
        _ = out.loss
    assert out.fc_loss is not None and out.adr_loss is None
    out.backward()
    assert torch.isfinite(out.loss) and out.adr_loss is not None
    with pytest.raises(RuntimeError, match="already called"):
        out.backward()


def test_lean_backward_inside_no_grad_applies_both_halves_like_outside():
    """out.backward() under torch.no_grad() backpropagates both terms (as loss.backward()
    does there), instead of applying the FM half and then failing unretryably."""
    want, want_grads = _grads({"preset": "defar", "memory": "lean"}, lambda out: out.backward())

    def inside_no_grad(out):
        with torch.no_grad():
            out.backward()

    got, got_grads = _grads({"preset": "defar", "memory": "lean"}, inside_no_grad)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    assert got.adr_loss is not None and got.per_sample_loss is not None


def test_lean_mode_without_grad_computes_every_term_at_once():
    """Under no_grad there is no backward to defer the ADR term to: lean mode gives the
    default mode's loss and terms at once (same draws)."""
    net, x1 = ConvVelocity(), torch.randn(*SHAPE)
    with torch.no_grad():
        out = rf.reflexflow_loss(net, x1, memory="lean", generator=torch.Generator().manual_seed(3))
        want = rf.reflexflow_loss(net, x1, generator=torch.Generator().manual_seed(3))
    assert out.adr_loss is not None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.adr_loss, want.adr_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.fc_loss, want.fc_loss, rtol=1e-6, atol=1e-7)


def test_lean_mode_under_autocast_reenters_the_callers_autocast_for_the_adr_forward():
    dtypes = []
    net = ConvVelocity()

    def model(x, t):
        h = net.conv1(x)
        dtypes.append(h.dtype)
        return net(x, t)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rf.reflexflow_loss(model, torch.randn(*SHAPE), memory="lean", preset="grid-direction")
    out.backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert out.loss.dtype == torch.float32


def test_lean_mode_refuses_fsdp1_with_a_clear_error():
    fsdp = pytest.importorskip("torch.distributed.fsdp")

    class Fake(fsdp.FullyShardedDataParallel):
        def __init__(self):  # no process group needed to test the refusal
            torch.nn.Module.__init__(self)

        def forward(self, x, t):
            return x

    with pytest.raises(ValueError, match="FSDP1"):
        rf.reflexflow_loss(Fake(), torch.randn(*SHAPE), memory="lean")


def test_lean_saved_activations_peak_at_most_1_1x_plain_fm_on_a_small_dit():
    model, shape = build_model("dit", "quick")
    x1 = torch.randn(4, *shape)
    gen = torch.Generator().manual_seed(0)
    fm = saved_activation_bytes(model, plain_fm_loss, x1, gen)
    saved = {
        mode: saved_activation_bytes(
            model, make_loss_fn(StepSpec("reflexflow", 1, mode, "torch")), x1, gen
        )
        for mode in ("shared", "lean")
    }
    assert saved["lean"] <= 1.1 * fm, (saved, fm)
    assert saved["shared"] > 1.5 * fm  # the default holds both gradient calls' activations
