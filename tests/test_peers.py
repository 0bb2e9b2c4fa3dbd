"""reflexflow against the real peers: diffusers, Meta's flow_matching and torchcfm.

Install them with the ``peers`` extra (see README); each test skips cleanly when its
package is absent. Plain flow matching through reflexflow (method="fm") must equal each
peer's own loss and path objects on the same draws; the recipes (diffusers_knobs, the
ExactOT pairing) must reproduce what the peers' training code really does.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import reflexflow as rf
from reflexflow import adapters
from reflexflow import reference as ref

# --------------------------------------------------------------------------- helpers


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters() if p.grad is not None]


class _MLP(torch.nn.Module):
    """v(x, t[, y]) for (B, D) data."""

    def __init__(self, dim: int = 6, classes: int = 0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim)
        )
        self.emb = torch.nn.Embedding(classes, dim + 1) if classes else None

    def forward(self, x, t, y=None):
        h = torch.cat([x, t[:, None].to(x.dtype)], 1)
        if self.emb is not None:
            h = h + self.emb(y)
        return self.net(h)


# ----------------------------------------------------------------- flow_matching (Meta)


def _flow_matching_schedulers():
    sched = pytest.importorskip("flow_matching.path.scheduler")
    return {
        "CondOT": (sched.CondOTScheduler(), "linear"),
        "Cosine": (sched.CosineScheduler(), "gvp"),
        "VP": (sched.VPScheduler(beta_min=0.1, beta_max=20.0), "vp"),
        "LinearVP": (sched.LinearVPScheduler(), None),
        "PolynomialConvex": (sched.PolynomialConvexScheduler(n=2.0), None),
    }


@pytest.mark.parametrize("name", ["CondOT", "Cosine", "VP", "LinearVP", "PolynomialConvex"])
def test_flow_matching_affine_prob_path_equals_reflexflow_path(name):
    from flow_matching.path import AffineProbPath

    scheduler, named = _flow_matching_schedulers()[name]
    g = _gen()
    x1 = torch.randn(9, 3, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(9, 3, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.01, 0.98, 9, dtype=torch.float64)
    peer = AffineProbPath(scheduler).sample(x_0=x0, x_1=x1, t=t)
    for path in [adapters.path_from_scheduler(scheduler)] + ([named] if named else []):
        path = rf.get_path(path)
        torch.testing.assert_close(ref.interpolate(path, x1, x0, t), peer.x_t)
        torch.testing.assert_close(ref.velocity_target(path, x1, x0, t), peer.dx_t)


@pytest.mark.parametrize("name", ["CondOT", "Cosine", "VP", "PolynomialConvex"])
def test_fm_equals_flow_matching_training_loss_and_gradient(name):
    # flow_matching's training recipe (its README and examples): t ~ U(0, 1),
    # path_sample = path.sample(x_0=noise, x_1=data, t=t),
    # loss = (model(path_sample.x_t, path_sample.t) - path_sample.dx_t).pow(2).mean()
    from flow_matching.path import AffineProbPath

    scheduler, _ = _flow_matching_schedulers()[name]
    torch.manual_seed(0)
    model = _MLP()
    g = _gen(1)
    x1, x0 = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    t = torch.rand(16, generator=g) * 0.98
    peer = AffineProbPath(scheduler).sample(x_0=x0, x_1=x1, t=t)
    want = (model(peer.x_t, peer.t) - peer.dx_t).pow(2).mean()
    want.backward()
    g_want = _grads(model)
    model.zero_grad()
    path = adapters.path_from_scheduler(scheduler)
    got = rf.reflexflow_loss(model, x1, noise=x0, t=t, method="fm", path=path)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(model), g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reflexflow_runs_on_a_flow_matching_path_and_backpropagates():
    scheduler, _ = _flow_matching_schedulers()["Cosine"]
    torch.manual_seed(0)
    model = _MLP()
    out = rf.reflexflow_loss(
        model,
        torch.randn(8, 6),
        path=adapters.path_from_scheduler(scheduler),
        rollout_steps=2,
        num_sampling_steps=10,
        generator=_gen(),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(bool(torch.isfinite(g).all()) for g in _grads(model))


# --------------------------------------------------------------------------- torchcfm


def _matchers():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    return {
        "CFM": cfm.ConditionalFlowMatcher(sigma=0.0),
        "VP": cfm.VariancePreservingConditionalFlowMatcher(sigma=0.0),
        "Target": cfm.TargetConditionalFlowMatcher(sigma=0.05),
    }


@pytest.mark.parametrize("name", ["CFM", "VP", "Target"])
def test_fm_equals_torchcfm_matcher_loss(name):
    # torchcfm's recipe: t, xt, ut = FM.sample_location_and_conditional_flow(x0, x1);
    # loss = ((model(xt, t) - ut) ** 2).mean()
    matcher = _matchers()[name]
    torch.manual_seed(0)
    model = _MLP()
    g = _gen(2)
    x1, x0 = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    t = torch.rand(12, generator=g) * 0.98
    t, xt, ut, eps = matcher.sample_location_and_conditional_flow(x0, x1, t=t, return_noise=True)
    want = ((model(xt, t) - ut) ** 2).mean()
    # the path's noise: x0 for CFM and VP (their sigma = 0 noise eps is unused),
    # torchcfm's fresh eps for the Lipman target path (it ignores x0)
    noise = eps if name == "Target" else x0
    got = rf.reflexflow_loss(
        model, x1, noise=noise, t=t, method="fm", path=adapters.torchcfm_path(matcher)
    )
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)


def test_exact_ot_redraws_x0_and_x1_and_the_documented_recipe_matches_guided_cfm():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    matcher = cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    torch.manual_seed(0)
    model = _MLP(classes=4)
    g = _gen(3)
    x1 = torch.randn(16, 6, generator=g) + 3.0
    x0 = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    t = torch.rand(16, generator=g) * 0.98

    # torchcfm's own labelled OT-CFM step
    np.random.seed(0)
    t, xt, ut, _, y1 = matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y, t=t)
    want = ((model(xt, t, y1) - ut) ** 2).mean()

    # the recipe of docs/usage.md: re-draw both sides and the labels, pass all three
    np.random.seed(0)
    x0_ot, x1_ot, _, y1_ot = matcher.ot_sampler.sample_plan_with_labels(x0, x1, y1=y)
    assert not torch.equal(x1_ot, x1)  # the plan re-draws x1 too (rows repeat / drop)
    assert torch.equal(y1_ot, y1)
    got = rf.reflexflow_loss(
        model,
        x1_ot,
        noise=x0_ot,
        t=t,
        method="fm",
        path=adapters.torchcfm_path(matcher),
        model_kwargs={"y": y1_ot},
    )
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    # passing only the re-drawn x0 (the old advice) trains on other pairs
    wrong = rf.reflexflow_loss(
        model, x1, noise=x0_ot, t=t, method="fm", path="linear", model_kwargs={"y": y}
    )
    assert not torch.allclose(wrong.loss, want)


# --------------------------------------------------------------------------- diffusers

SCHEMES = ["logit_normal", "mode", "none", "sigma_sqrt", "cosmap"]


def _diffusers():
    return pytest.importorskip("diffusers")


def _script_sigmas(scheduler, scheme: str, batch: int, generator: torch.Generator):
    """What train_dreambooth_sd3.py / train_dreambooth_flux.py do, step by step."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=generator,
    )
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    # the scripts' get_sigmas: the sigma whose timestep equals each drawn timestep
    step = [(scheduler.timesteps == ts).nonzero().item() for ts in timesteps]
    return timesteps, scheduler.sigmas[step]


def _sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**adapters.SD3_SCHEDULER)


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**adapters.FLUX_SCHEDULER)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_diffusers_knobs_draw_the_training_scripts_sigmas(family, scheme):
    _diffusers()
    scheduler = _sd3_scheduler() if family == "sd3" else _flux_scheduler()
    _, want = _script_sigmas(scheduler, scheme, 4096, _gen(5))
    for knobs in (
        adapters.diffusers_knobs(family, weighting_scheme=scheme),
        adapters.diffusers_knobs(family, weighting_scheme=scheme, scheduler=scheduler),
    ):
        got = knobs["time_sampler"](4096, torch.device("cpu"), _gen(5))
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want.double(), rtol=0, atol=0)


def test_sd3_default_draw_is_shifted_as_the_script_and_flux_is_not():
    _diffusers()
    sd3 = adapters.diffusers_knobs("sd3")["time_sampler"](20000, torch.device("cpu"), _gen(0))
    flux = adapters.diffusers_knobs("flux")["time_sampler"](20000, torch.device("cpu"), _gen(0))
    # SD3: logit-normal u through shift 3 (the issue measured the script's mean 0.715);
    # Flux: uniform u on its unshifted table (use_dynamic_shifting skips the shift)
    assert abs(float(sd3.mean()) - 0.715) < 0.01
    assert abs(float(flux.mean()) - 0.5) < 0.01
    assert torch.equal(_flux_scheduler().sigmas, adapters.scheduler_sigma_table(1000))


def test_flux_image_seq_len_applies_the_schedulers_dynamic_shift():
    _diffusers()
    latent_hw = (64, 64)  # 512 px through the 8x VAE: (64 / 2)^2 = 1024 packed tokens
    seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    mu = adapters.flux_shift_mu(seq_len)
    # calculate_shift: linear from (256, 0.5) to (4096, 1.15)
    assert adapters.flux_shift_mu(256) == pytest.approx(0.5)
    assert adapters.flux_shift_mu(4096) == pytest.approx(1.15)
    scheduler = _flux_scheduler()
    want = scheduler.time_shift(mu, 1.0, scheduler.sigmas)  # what set_timesteps(mu=) applies
    torch.testing.assert_close(adapters.scheduler_sigma_table(1000, mu=mu), want)
    for knobs in (
        adapters.diffusers_knobs("flux", image_seq_len=seq_len),
        adapters.diffusers_knobs("flux", image_seq_len=seq_len, scheduler=_flux_scheduler()),
    ):
        torch.testing.assert_close(knobs["time_sampler"].sigmas, want)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        adapters.diffusers_knobs("flux", image_seq_len=seq_len, scheduler=_sd3_scheduler())
    scheduler.set_timesteps(28, mu=mu)  # the pipeline's inference schedule
    inference = scheduler.sigmas[:-1]
    unshifted = torch.linspace(1.0, 1 / 1000, 28)
    torch.testing.assert_close(inference, scheduler.time_shift(mu, 1.0, unshifted))


def test_diffusers_knobs_accept_overrides_and_refuse_bad_input():
    _diffusers()
    sampler = adapters.ShiftedSigmaSampler(3.0)
    knobs = adapters.diffusers_knobs("sd3", time_sampler=sampler, num_sampling_steps=28)
    assert knobs["time_sampler"] is sampler and knobs["num_sampling_steps"] == 28
    with pytest.raises(ValueError, match="convention"):
        adapters.diffusers_knobs("sd3", convention="data_at_1")
    with pytest.raises(ValueError, match="weighting_scheme"):
        adapters.diffusers_knobs("sd3", weighting_scheme="snr")
    with pytest.raises(ValueError, match="image_seq_len"):
        adapters.diffusers_knobs("sd3", image_seq_len=1024)
    with pytest.raises(TypeError, match="weighting_scheme"):
        adapters.diffusers_knobs("sd3", logit_normal=False)
    used = copy.deepcopy(_sd3_scheduler())
    used.set_timesteps(28)
    with pytest.raises(ValueError, match="set_timesteps"):
        adapters.diffusers_knobs("sd3", scheduler=used)


def test_scheduler_scale_noise_is_the_noise_at_1_path_and_timesteps_are_1000_sigma():
    _diffusers()
    scheduler = _sd3_scheduler()
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas * 1000)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    x0 = torch.randn(1, 2, 4, 4)
    noise = torch.randn_like(x0)
    noisy = scheduler.scale_noise(x0, scheduler.timesteps[3:4], noise)
    ours = ref.interpolate(rf.LinearPath(), x0, noise, 1 - scheduler.sigmas[3:4])
    torch.testing.assert_close(noisy, ours)


# (joint_attention_dim, pooled_projection_dim): the prompt embeddings' widths of the tiny models
_TEXT_DIMS = {"sd3": (16, 8), "flux": (32, 32)}


def _text_kwargs(family: str, batch: int, tokens: int, generator=None) -> dict:
    """Random prompt embeddings of the tiny ``family`` model's widths, as model kwargs."""
    text, pooled = _TEXT_DIMS[family]
    return {
        "encoder_hidden_states": torch.randn(batch, tokens, text, generator=generator),
        "pooled_projections": torch.randn(batch, pooled, generator=generator),
    }


def _tiny_transformer(model_class, family: str, **dims):
    """``model_class`` with one layer of two heads and ``family``'s text widths, weights
    drawn from seed 0."""
    text, pooled = _TEXT_DIMS[family]
    torch.manual_seed(0)
    return model_class(
        num_layers=1,
        num_attention_heads=2,
        joint_attention_dim=text,
        pooled_projection_dim=pooled,
        **dims,
    )


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel

    # 4-channel 8x8 latents in 2x2 patches; the caption projection is 2 heads x 8
    return _tiny_transformer(
        SD3Transformer2DModel,
        "sd3",
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        attention_head_dim=8,
        caption_projection_dim=16,
    )


def _script_loss(pred, target, sigmas, scheme: str) -> torch.Tensor:
    """The loss of train_dreambooth_sd3.py and train_dreambooth_flux.py: the per-sample
    mean of compute_loss_weighting_for_sd3(scheme, sigmas) (pred - target)^2 in fp32,
    then the batch mean."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    squared = weighting.float() * (pred.float() - target.float()) ** 2
    return torch.mean(squared.reshape(len(pred), -1), 1).mean()


@pytest.mark.parametrize(
    "scheme, precondition",
    [("logit_normal", True), ("logit_normal", False), ("sigma_sqrt", False), ("cosmap", True)],
)
def test_fm_equals_the_sd3_training_script_loss(scheme, precondition):
    _diffusers()  # before any diffusers import: skips cleanly without diffusers
    transformer = _tiny_sd3()
    scheduler = _sd3_scheduler()
    B = 4
    g = _gen(7)
    latents = torch.randn(B, 4, 8, 8, generator=g)
    noise = torch.randn(B, 4, 8, 8, generator=g)
    kw = _text_kwargs("sd3", B, tokens=5, generator=g)
    timesteps, sigmas = _script_sigmas(scheduler, scheme, B, _gen(8))
    # train_dreambooth_sd3.py, step by step
    s = sigmas.view(B, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, **kw, return_dict=False)[0]
    if precondition:
        pred = pred * (-s) + noisy
    target = latents if precondition else noise - latents
    want = _script_loss(pred, target, s, scheme)

    knobs = adapters.diffusers_knobs(
        "sd3", weighting_scheme=scheme, precondition_outputs=precondition, method="fm"
    )
    drawn = knobs["time_sampler"](B, torch.device("cpu"), _gen(8))
    torch.testing.assert_close(drawn, sigmas.double(), rtol=0, atol=0)
    got = rf.ReflexFlowLoss(**knobs)(
        adapters.DiffusersModelAdapter(transformer),
        latents,
        noise=noise,
        t=drawn,
        model_kwargs=kw,
    )
    torch.testing.assert_close(got.loss, want, rtol=1e-4, atol=1e-6)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    return _tiny_transformer(
        FluxTransformer2DModel,
        "flux",
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_single_layers=1,
        attention_head_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _flux_adapter(transformer):
    """The Flux transformer behind the adapter that packs latents into 2x2 tokens and back."""
    return adapters.DiffusersModelAdapter(
        transformer, pack=adapters.flux_pack_latents, unpack=adapters.flux_unpack_latents
    )


def _flux_inputs(B: int, txt_len: int, g: torch.Generator, size: int = 8):
    """(latents (B, 4, size, size), model kwargs); the ids are not batch-shaped: img_ids
    ((size / 2)^2, 3) and txt_ids (txt_len, 3)."""
    latents = torch.randn(B, 4, size, size, generator=g)
    kw = _text_kwargs("flux", B, tokens=txt_len, generator=g)
    kw["img_ids"] = adapters.flux_latent_image_ids(size, size)
    kw["txt_ids"] = torch.zeros(txt_len, 3)
    return latents, kw


def test_flux_packing_roundtrips_and_image_ids_follow_the_packed_grid():
    x = torch.randn(2, 4, 6, 10)
    tokens = adapters.flux_pack_latents(x)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(adapters.flux_unpack_latents(tokens, x), x)
    # token (r, c) holds the 2x2 patch at rows 2r..2r+1, columns 2c..2c+1, channel-major
    assert torch.equal(tokens[:, 1 * 5 + 2].view(2, 4, 2, 2), x[:, :, 2:4, 4:6])
    ids = adapters.flux_latent_image_ids(6, 10)
    assert ids.shape == (15, 3) and ids[7].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="even"):
        adapters.flux_pack_latents(torch.randn(1, 4, 5, 6))


def test_fm_equals_the_flux_training_script_loss():
    _diffusers()
    transformer = _tiny_flux()
    scheduler = _flux_scheduler()
    B = 3
    g = _gen(9)
    latents, kw = _flux_inputs(B, txt_len=5, g=g)
    noise = torch.randn(latents.shape, generator=g)
    timesteps, sigmas = _script_sigmas(scheduler, "none", B, _gen(10))
    # train_dreambooth_flux.py, step by step (no guidance embedding in this tiny model)
    s = sigmas.view(B, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    packed = adapters.flux_pack_latents(noisy)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, **kw, return_dict=False)[0]
    pred = adapters.flux_unpack_latents(pred, latents)
    want = _script_loss(pred, noise - latents, s, "none")

    knobs = adapters.diffusers_knobs("flux", method="fm")
    assert knobs["unbatched_kwargs"] == ("img_ids", "txt_ids")
    drawn = knobs["time_sampler"](B, torch.device("cpu"), _gen(10))
    got = rf.ReflexFlowLoss(**knobs)(
        _flux_adapter(transformer), latents, noise=noise, t=drawn, model_kwargs=kw
    )
    torch.testing.assert_close(got.loss, want, rtol=1e-4, atol=1e-6)


def test_reflexflow_trains_flux_with_ids_as_long_as_the_batch_left_unbatched():
    # img_ids and txt_ids whose length equals B would pass for batch-shaped without the
    # unbatched_kwargs mark: the 2B call would double them and Flux's RoPE would fail
    _diffusers()
    transformer = _tiny_flux()
    B = 4
    g = _gen(11)
    # 4x4 latents: (4 / 2)^2 = 4 = B packed tokens, and B text tokens: both ids are (4, 3)
    latents, kw = _flux_inputs(B, txt_len=B, g=g, size=4)
    loss_fn = rf.ReflexFlowLoss(
        **adapters.diffusers_knobs("flux", num_sampling_steps=10, rollout_steps=2)
    )
    out = loss_fn(_flux_adapter(transformer), latents, model_kwargs=kw, generator=_gen(12))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sum(float(p.grad.abs().sum()) for p in transformer.parameters() if p.grad is not None)


def test_reflexflow_trains_sd3_with_the_script_recipe():
    _diffusers()
    transformer = _tiny_sd3()
    seen = []
    transformer.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["timestep"]), with_kwargs=True
    )
    loss_fn = rf.ReflexFlowLoss(
        **adapters.diffusers_knobs("sd3", num_sampling_steps=28, rollout_steps=2)
    )
    B = 3
    kw = _text_kwargs("sd3", B, tokens=5)
    out = loss_fn(
        adapters.DiffusersModelAdapter(transformer),
        torch.randn(B, 4, 8, 8),
        model_kwargs=kw,
        generator=_gen(13),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # the shared first call at the start times, then calls at the end times (the ADR
    # term's, and the clean prediction of the velocity-space bias)
    torch.testing.assert_close(seen[0], 1000 * out.t0)
    assert sum(torch.allclose(s, 1000 * out.t1) for s in seen) == 2
    assert bool(((out.t0 > 0) & (out.t0 <= 1)).all())


def test_weighting_matches_compute_loss_weighting_for_sd3():
    _diffusers()
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    for scheme in SCHEMES:
        want = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigma).double()
        got = adapters.DiffusersLossWeighting(scheme)(sigma)
        torch.testing.assert_close(got, want)
        pre = adapters.DiffusersLossWeighting(scheme, precondition_outputs=True)(sigma)
        torch.testing.assert_close(pre, want * sigma**2)
    cosmap_at_half = float(adapters.DiffusersLossWeighting("cosmap")(torch.tensor(0.5)))
    assert cosmap_at_half == pytest.approx(4 / math.pi, rel=1e-6)


def test_sd3_transformer_without_the_adapter_is_pointed_to_diffusers_model_adapter():
    """SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, ...) called as
    model(x, t, **kw) fails with diffusers' own TypeError; the loss names the adapter."""
    _diffusers()
    transformer = _tiny_sd3()
    kw = _text_kwargs("sd3", 2, tokens=3)
    loss_fn = rf.ReflexFlowLoss(**adapters.diffusers_knobs("sd3", num_sampling_steps=28))
    with pytest.raises(TypeError, match=r"hidden_states.*DiffusersModelAdapter") as info:
        loss_fn(transformer, torch.randn(2, 4, 8, 8), model_kwargs=kw)
    assert "multiple values" in str(info.value.__cause__)  # diffusers' error is kept
    out = loss_fn(
        adapters.DiffusersModelAdapter(transformer), torch.randn(2, 4, 8, 8), model_kwargs=kw
    )
    assert torch.isfinite(out.loss)


def test_peer_tests_skip_without_diffusers_instead_of_failing(tmp_path):
    """With diffusers unimportable, the SD3 script-loss cases (which imported diffusers
    before their importorskip) and the adapter hint skip instead of failing."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:randomly', '-p', 'no:cacheprovider', "
        "'tests/test_peers.py', '-k', 'sd3_training_script or sd3_transformer_without', "
        f"'--junitxml={tmp_path / 'r.xml'}']))\n"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600
    )
    report = (tmp_path / "r.xml").read_text()
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert 'failures="0"' in report and 'errors="0"' in report
    assert 'skipped="5"' in report  # the four SD3 script cases and the adapter hint
