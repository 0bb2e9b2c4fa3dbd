"""reflexflow/adapters/diffusers.py, diffusers_sigmas.py and flux.py: SD3 / Flux models
(a stand-in transformer), the scripts' sigmas and weighting, Flux's latent packing;
tests/test_peers.py runs the real diffusers."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import adapters


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


@pytest.mark.parametrize("sampler", ["shifted", "scripts"])
def test_sigma_samplers_draw_sigmas_under_either_loss_convention(sampler):
    """A sigma sampler's draws are sigmas whatever the loss's convention: the same
    generator gives the same canonical t0 = 1 - sigma under data_at_1 and noise_at_1."""
    make = {
        "shifted": lambda: adapters.ShiftedSigmaSampler(3.0),
        "scripts": lambda: adapters.DiffusersSigmaSampler("logit_normal", shift=3.0),
    }[sampler]
    x1 = torch.randn(2000, 2)
    t0 = {}
    for convention in ("data_at_1", "noise_at_1"):
        loss = rf.ReflexFlowLoss(method="fm", time_sampler=make(), convention=convention)
        out = loss(lambda x, t: -x, x1, generator=torch.Generator().manual_seed(0))
        t0[convention] = rf.conventions.to_canonical_time(out.t0.double(), convention)
    torch.testing.assert_close(t0["data_at_1"], t0["noise_at_1"])
    assert float(t0["data_at_1"].mean()) < 0.4  # shift 3 moves sigma up: t0 towards noise


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: adapters.DiffusersSigmaSampler(logit_mean=float("nan")), "logit_mean"),
        (lambda: adapters.DiffusersSigmaSampler(logit_mean=float("-inf")), "logit_mean"),
        (lambda: adapters.DiffusersSigmaSampler(mode_scale=float("nan")), "mode_scale"),
        (
            lambda: adapters.DiffusersSigmaSampler(sigmas=torch.tensor([0.5, float("nan")])),
            "sigmas must lie in",
        ),
        (lambda: adapters.ShiftedSigmaSampler(float("inf")), "shift"),
        (lambda: adapters.ShiftedSigmaSampler(mean=float("nan")), "mean"),
        (lambda: adapters.ShiftedSigmaSampler(logit_normal="no"), "logit_normal"),
        (lambda: adapters.scheduler_sigma_table(shift=float("inf")), "shift"),
        (lambda: adapters.scheduler_sigma_table(mu=float("nan")), "mu"),
        (lambda: adapters.flux_shift_mu(1024, base_seq_len=256, max_seq_len=256), "differ"),
        (lambda: adapters.flux_shift_mu(1024, max_shift=float("nan")), "max_shift"),
    ],
)
def test_non_finite_or_degenerate_sigma_parameters_are_refused_by_name(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()
