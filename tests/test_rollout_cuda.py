"""CUDA: the CUDA ops and the graph-captured fixed-k rollout against the references.

TF32 is pinned off for every test here (an autouse fixture): the references' convolutions
and matmuls would otherwise round to TF32 on Ampere/Hopper and the tight comparisons
would measure TF32, not the code.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import reflexflow as rf
from reflexflow import native
from reflexflow.engine import RolloutEngine
from reflexflow.reference import euler_rollout_per_sample
from reflexflow.rollout import euler_update, euler_update_masked, rollout_plan
from tests.helpers import TinyNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def ops():
    if not native.has_kernel("cuda"):
        pytest.skip(f"extension has no CUDA kernels: {native.extension_status()}")
    return torch.ops.reflexflow


def _inputs(batch=16, kmax=4, dtype=torch.float32, fixed=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=dtype)
    k = torch.full((batch,), kmax) if fixed else torch.randint(0, kmax + 1, (batch,), generator=gen)
    h = torch.full((batch,), 1 / 32, dtype=dtype)
    t0 = torch.rand(batch, generator=gen, dtype=dtype) * (1 - kmax * h)
    return [a.cuda() for a in (x, t0, k, h)]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("v_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("out_dtype", [None, *FLOATS], ids=str)
def test_cuda_fused_euler_matches_torch(ops, state_dtype, v_dtype, out_dtype):
    gen = torch.Generator().manual_seed(1)
    state = torch.randn(7, 3, 5, 5, generator=gen, dtype=state_dtype).cuda()
    v = torch.randn(7, 5, 5, 3, generator=gen).to(v_dtype).cuda().permute(0, 3, 1, 2)
    h = torch.rand(7, generator=gen, dtype=state_dtype).cuda()
    out = None if out_dtype is None else torch.empty(state.shape, dtype=out_dtype, device="cuda")
    ref_state, ref_out = state.clone(), None if out is None else out.clone()
    euler_update(ref_state, v, h, ref_out)
    ops.euler_update_(state, v, h, out)
    assert torch.equal(state, ref_state)
    if out is not None:
        assert torch.equal(out, ref_out)
    ops.euler_update_(state[:0], v[:0], h[:0])  # empty prefix is a no-op


def test_cuda_plan_matches_torch_twin(ops):
    for batch, kmax in [(37, 5), (1, 0), (0, 0), (2000, 3)]:
        gen = torch.Generator().manual_seed(batch)
        k = torch.randint(0, kmax + 1, (batch,), generator=gen).cuda()
        t0 = torch.rand(batch, generator=gen).cuda()
        step = torch.rand(batch, generator=gen).cuda() * 0.1
        for given in (None, 0, kmax, kmax + 2):
            got = ops.rollout_plan(k, t0, step, given)
            want = rollout_plan(k, t0, step, given)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and torch.equal(g, w), (batch, kmax, given)
    with pytest.raises(RuntimeError, match="k must be >= 0"):
        ops.rollout_plan(
            *(a.cuda() for a in (torch.tensor([1, -1]), torch.zeros(2), torch.zeros(2)))
        )


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("v_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_masked_euler_matches_torch_twin(ops, state_dtype, v_dtype, out_dtype):
    gen = torch.Generator().manual_seed(2)
    state = torch.randn(7, 3, 5, 5, generator=gen, dtype=state_dtype).cuda()
    v = torch.randn(7, 5, 5, 3, generator=gen).to(v_dtype).cuda().permute(0, 3, 1, 2)
    h = torch.rand(7, generator=gen, dtype=state_dtype).cuda() * 0.1
    tau = torch.rand(7, generator=gen, dtype=state_dtype).cuda()
    k = torch.tensor([0, 1, 2, 3, 2, 0, 1], device="cuda")
    out = None if out_dtype is None else torch.randn(7, 3, 5, 5, device="cuda").to(out_dtype)
    for j in range(4):
        ref = [state.clone(), tau.clone(), None if out is None else out.clone()]
        euler_update_masked(ref[0], ref[1], v, h, k, j, ref[2])
        ops.euler_update_masked_(state, tau, v, h, k, j, out)
        assert torch.equal(state, ref[0]) and torch.equal(tau, ref[1])
        if out is not None:
            assert torch.equal(out, ref[2])


def test_cuda_kernels_past_the_launch_limits(ops):
    """More elements than 65535 blocks x 256 threads (the grid-stride loop, rows that do not
    divide the stride) and more than 65535 rows: the same values as the torch twins."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    n, row = 3, 6_000_001  # 18M elements, rows straddling the grid stride
    state = torch.randn(n, row, device="cuda", generator=gen)
    v = torch.randn(n, row, device="cuda", generator=gen).bfloat16()
    h = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    out = torch.empty(n, row, device="cuda", dtype=torch.bfloat16)
    ref, ref_out = state.clone(), out.clone()
    euler_update(ref, v, h, ref_out)
    ops.euler_update_(state, v, h, out)
    assert torch.equal(state, ref) and torch.equal(out, ref_out)
    k = torch.tensor([0, 2, 1], device="cuda")
    tau, ref_tau = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    ref = state.clone()
    euler_update_masked(ref, ref_tau, v, h, k, 1)
    ops.euler_update_masked_(state, tau, v, h, k, 1)
    assert torch.equal(state, ref) and torch.equal(tau, ref_tau)
    rows = 70_000  # batch axis beyond 65535
    state = torch.randn(rows, 3, device="cuda", generator=gen, dtype=torch.float64)
    v = torch.randn(rows, 3, device="cuda", generator=gen)
    h = torch.rand(rows, device="cuda", generator=gen, dtype=torch.float64)
    k = torch.randint(0, 3, (rows,), device="cuda", generator=gen)
    tau = torch.rand(rows, device="cuda", generator=gen, dtype=torch.float64)
    ref, ref_tau = state.clone(), tau.clone()
    euler_update_masked(ref, ref_tau, v, h, k, 0)
    ops.euler_update_masked_(state, tau, v, h, k, 0)
    assert torch.equal(state, ref) and torch.equal(tau, ref_tau)


def test_cuda_ops_make_no_host_sync_and_the_check_catches_one(ops):
    """torch.cuda.set_sync_debug_mode("error") around the update ops and the plan with kmax
    given; the plan without kmax reads (min k, max k) once, which the check must catch."""
    state, t0, k, h = _inputs()
    xin = torch.empty(state.shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(state)
    tau = t0.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.euler_update_(state, v, h, xin)
        ops.euler_update_masked_(state, tau, v, h, k, 1, xin)
        ops.rollout_plan(k, t0, h, 4)
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.rollout_plan(k, t0, h)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_engine_matches_per_sample_loop(ops, backend):
    vm = rf.VelocityModel(TinyNet().cuda())
    x, t0, k, h = _inputs()
    kwargs = {"y": torch.randint(0, 5, (16,), device="cuda")}
    got = RolloutEngine(backend)(vm, x, t0, k, h, kwargs)
    want = euler_rollout_per_sample(vm, x, t0, k, h, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_fixed_k_matches_reference(ops, backend, model_dtype):
    net = TinyNet().cuda().to(model_dtype)
    vm = rf.VelocityModel(net, input_dtype=model_dtype)
    engine = RolloutEngine(backend, cuda_graph=True)
    for seed in range(3):  # first call captures, later calls replay with new inputs
        x, t0, k, h = _inputs(fixed=True)
        x = x + seed
        kwargs = {"y": torch.full((16,), seed, device="cuda")}
        got = engine(vm, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(vm, x, t0, k, h, kwargs)
        tol = 1e-5 if model_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(engine.graphs) == 1
    vm2 = rf.VelocityModel(net, input_dtype=model_dtype)
    engine(vm2, x, t0, k, h, kwargs)
    assert vm2.sample_forwards == int(k.sum()) and vm2.calls == int(k.max())


def test_cuda_loss_with_graph_matches_torch_backend(ops):
    net = TinyNet().cuda()
    x1 = torch.randn(8, 3, 8, 8, device="cuda")
    kw = dict(rollout_steps=3, num_sampling_steps=20, k_draw="fixed")
    out = {}
    torch_only = dict(backend="torch", rollout_backend="torch")
    for name, extra in (("graph", dict(cuda_graph=True)), ("torch", torch_only)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        out[name] = rf.ReflexFlowLoss(**kw, **extra)(net, x1, generator=gen)
    torch.testing.assert_close(out["graph"].loss, out["torch"].loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_rollout_of_a_channels_last_state_matches_reference(ops, model_dtype):
    """The captured graph's buffers are contiguous whatever the input layout: the fused
    update needs contiguous state and next-input buffers."""
    net = TinyNet().cuda().to(model_dtype)
    vm = rf.VelocityModel(net, input_dtype=model_dtype)
    x, t0, k, h = _inputs(fixed=True)
    x = x.contiguous(memory_format=torch.channels_last)
    kwargs = {"y": torch.zeros(16, dtype=torch.int64, device="cuda")}
    got = RolloutEngine("native", cuda_graph=True)(vm, x, t0, k, h, kwargs)
    want = RolloutEngine("torch")(vm, x, t0, k, h, kwargs)
    tol = 1e-5 if model_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_cuda_graph_cache_never_replays_another_models_graph(ops):
    """Bound methods are new objects at every access: the cache keys them by their
    instance and function, and keeps what it captured alive, so ids are never reused."""

    class Wrapper:
        def __init__(self, scale):
            self.net, self.scale = TinyNet().cuda(), scale

        def vel(self, x, t, kwargs):
            return self.scale * self.net(x, t, **(kwargs or {}))

    engine = RolloutEngine("torch", cuda_graph=True)
    x, t0, k, h = _inputs(fixed=True)
    kwargs = {"y": torch.zeros(16, dtype=torch.int64, device="cuda")}
    for scale in (1.0, -1.0, 2.0, 0.5):
        w = Wrapper(scale)
        got = engine(w.vel, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(w.vel, x, t0, k, h, kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        del w


def test_cuda_graph_replays_copy_labels_given_in_any_mapping(ops):
    from types import MappingProxyType

    vm = rf.VelocityModel(TinyNet().cuda())
    engine = RolloutEngine("native", cuda_graph=True)
    x, t0, k, h = _inputs(fixed=True)
    for label in (0, 3):  # the second call replays: its labels must reach the graph
        kwargs = MappingProxyType({"y": torch.full((16,), label, device="cuda")})
        got = engine(vm, x, t0, k, h, kwargs)
        want = RolloutEngine("torch")(vm, x, t0, k, h, dict(kwargs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_fixed_k_masked_plan_with_zeros_matches_per_sample_loop(ops, backend):
    vm = rf.VelocityModel(TinyNet().cuda())
    x, t0, k, h = _inputs(kmax=4)
    kwargs = {"y": torch.arange(16, device="cuda") % 5}
    got = RolloutEngine(backend)(vm, x, t0, k, h, kwargs, fixed_k=4)
    want = euler_rollout_per_sample(vm, x, t0, k, h, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[k == 0], x[k == 0])


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_fixed_k_with_every_k_equal_is_bit_identical_to_plain_steps(ops, backend):
    vm = rf.VelocityModel(TinyNet().cuda())
    x, t0, k, h = _inputs(kmax=3, fixed=True)
    got = RolloutEngine(backend)(vm, x, t0, k, h, fixed_k=3)
    with torch.no_grad():
        want, tau = x.clone(), t0.clone()
        for _ in range(3):
            want += h.view(-1, 1, 1, 1) * vm(want, tau)
            tau += h
    assert torch.equal(got, want)


def test_cuda_fixed_k_native_and_torch_engines_agree_bit_for_bit(ops):
    vm = rf.VelocityModel(TinyNet().cuda())
    x, t0, k, h = _inputs(kmax=3)
    got = RolloutEngine("native")(vm, x, t0, k, h, fixed_k=3)
    assert torch.equal(got, RolloutEngine("torch")(vm, x, t0, k, h, fixed_k=3))


@pytest.mark.parametrize(
    "backend, cuda_graph", [("torch", False), ("native", False), ("torch", True), ("native", True)]
)
def test_cuda_fixed_k_rollout_makes_no_host_sync(ops, backend, cuda_graph):
    net = TinyNet().cuda().to(torch.bfloat16)
    vm = rf.VelocityModel(net, input_dtype=torch.bfloat16)
    engine = RolloutEngine(backend, cuda_graph=cuda_graph)
    x, t0, k, h = _inputs(kmax=3)
    kwargs = {"emb": torch.randn(16, 2, 4, device="cuda")}  # no indexing in the model
    want = engine(vm, x, t0, k, h, kwargs, fixed_k=3)  # warm-up (and the capture)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = engine(vm, x, t0, k, h, kwargs, fixed_k=3)
        with pytest.raises(RuntimeError, match="synchroniz"):  # per-sample k: its one read
            RolloutEngine(backend)(vm, x, t0, k, h, kwargs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_graph_takes_k_as_an_input_buffer(ops, backend):
    """fixed_k=K with k_i in {0..K}: one graph serves every k pattern."""
    vm = rf.VelocityModel(TinyNet().cuda())
    engine = RolloutEngine(backend, cuda_graph=True)
    x, t0, _, h = _inputs(kmax=3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        k = torch.randint(0, 4, (16,), generator=gen).cuda()
        got = engine(vm, x, t0, k, h, fixed_k=3)
        want = RolloutEngine(backend)(vm, x, t0, k, h, fixed_k=3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[k == 0], x[k == 0])
    assert len(engine.graphs) == 1


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_graph_replays_read_live_weights_under_bf16_autocast(ops, backend):
    """Captured inside the caller's bf16 autocast, whose weight-cast cache is already full
    (the loss's forward ran first): the graph must record the casts of the live fp32
    weights, so replays after an optimizer step and after the cache was freed agree with
    cuda_graph=False."""
    net = TinyNet().cuda()
    vm = rf.VelocityModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=2.0)
    graph, eager = RolloutEngine(backend, cuda_graph=True), RolloutEngine(backend)
    x, t0, k, h = _inputs(kmax=3)
    previous = None
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(x, t0).float().sum()  # fills autocast's cache of bf16 weight copies
            got = graph(vm, x, t0, k, h, fixed_k=3)
            want = eager(vm, x, t0, k, h, fixed_k=3)
        # reuse the memory of the freed cache entries
        junk = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(16)]
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        assert bool(torch.isfinite(got).all())
        if previous is not None:  # the weights moved: so must the rollout
            assert (got - previous).abs().max() > 2e-2
        previous = got
        loss = net(x, t0).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del junk
    assert len(graph.graphs) == 1  # in-place steps and one autocast state: one capture


class _ModeNet(nn.Module):
    """Different velocities in train and eval mode (what dropout/BatchNorm amount to)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, t):
        return self.conv(x) * (0.5 if self.training else -0.5)


def test_cuda_graph_is_recaptured_for_train_and_eval_mode(ops):
    net = _ModeNet().cuda()
    vm = rf.VelocityModel(net)
    graph = RolloutEngine("native", cuda_graph=True)
    x, t0, k, h = _inputs(kmax=2)
    for mode in ("eval", "train", "eval"):
        getattr(net, mode)()
        got = graph(vm, x, t0, k, h, fixed_k=2)
        want = RolloutEngine("native")(vm, x, t0, k, h, fixed_k=2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(graph.graphs) == 2


@pytest.mark.parametrize("change", ["load_state_dict_assign", "ema_swap"])
def test_cuda_graph_is_recaptured_when_the_weights_move(ops, change):
    """After load_state_dict(assign=True) or an EMA swap the old storages are freed and
    reused: a replay of the old graph would read them."""
    net = TinyNet().cuda()
    vm = rf.VelocityModel(net)
    graph = RolloutEngine("native", cuda_graph=True)
    x, t0, k, h = _inputs(kmax=2)
    before = graph(vm, x, t0, k, h, fixed_k=2)
    new = {name: 0.3 * torch.randn_like(p) for name, p in net.state_dict().items()}
    if change == "load_state_dict_assign":
        net.load_state_dict(new, assign=True)
    else:
        for name, p in net.named_parameters():
            p.data = new[name]
    del new
    junk = [torch.full((1 << 12,), float("nan"), device="cuda") for _ in range(64)]
    got = graph(vm, x, t0, k, h, fixed_k=2)
    want = RolloutEngine("native")(vm, x, t0, k, h, fixed_k=2)
    del junk
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - before).abs().max() > 1e-3 and len(graph.graphs) == 2


class _HostTensorNet(nn.Module):
    """DiT/SiT's timestep_embedding builds its frequencies on the CPU and copies them with
    .to(t.device): fine eagerly, illegal inside a CUDA-graph capture."""

    def __init__(self, sync: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.sync = sync

    def forward(self, x, t):
        if self.sync == "to_device":
            freqs = torch.exp(-torch.arange(0, 4, dtype=torch.float32)).to(t.device)
            scale = 1 + (t[:, None].float() * freqs[None]).mean(1)
        else:  # a host read
            scale = 1 + t.float() * float(t.max().item() > 2)
        return torch.tanh(self.conv(x)) * scale.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("sync", ["to_device", "item"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_graph_capture_failure_falls_back_to_eager_and_leaves_cuda_usable(ops, sync, backend):
    net = _HostTensorNet(sync).cuda()
    vm = rf.VelocityModel(net)
    graph = RolloutEngine(backend, cuda_graph=True)
    x, t0, k, h = _inputs(kmax=2)
    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = graph(vm, x, t0, k, h, fixed_k=2)
    want = RolloutEngine(backend)(vm, x, t0, k, h, fixed_k=2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == stream
    assert len(graph.graphs) == 0 and len(graph.graphs.uncapturable) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        again = graph(vm, x, t0, k, h, fixed_k=2)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-6)
    torch.cuda.synchronize()  # no sticky error
    # the allocator and the capture machinery still work: a good model captures and replays
    good = rf.VelocityModel(TinyNet().cuda())
    fresh = RolloutEngine(backend, cuda_graph=True)
    for _ in range(2):
        torch.testing.assert_close(
            fresh(good, x, t0, k, h, fixed_k=2),
            RolloutEngine(backend)(good, x, t0, k, h, fixed_k=2),
            rtol=1e-5,
            atol=1e-6,
        )
    assert len(fresh.graphs) == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_graph_and_ops_on_a_second_device_while_the_first_is_current(ops, backend):
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    vm = rf.VelocityModel(TinyNet().to(dev))
    x, t0, k, h = (a.to(dev) for a in _inputs(kmax=3))
    graph = RolloutEngine(backend, cuda_graph=True)
    for _ in range(2):  # capture, then replay
        got = graph(vm, x, t0, k, h, fixed_k=3)
        want = RolloutEngine(backend)(vm, x, t0, k, h, fixed_k=3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got.device == dev and torch.cuda.current_device() == 0
    torch.testing.assert_close(
        RolloutEngine(backend)(vm, x, t0, k, h), euler_rollout_per_sample(vm, x, t0, k, h)
    )
