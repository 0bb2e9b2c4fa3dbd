"""CUDA graphs of the rollout's static plan (reflexflow/graphs.py): the graph key, the
cache (least recently used, per engine, per loss), and a failed capture falling back to the
eager plan. Runs on CPU with a stand-in graph."""

from __future__ import annotations

import pytest
import torch

import reflexflow as rf
from reflexflow import graphs as graphs_mod
from reflexflow.engine import RolloutEngine
from reflexflow.reference import euler_rollout_per_sample
from tests.helpers import TinyNet, assert_rollout_matches_oracle, rollout_inputs


def test_clear_graphs_empties_the_engines_cache():
    eng = RolloutEngine("torch", cuda_graph=True)
    eng.graphs.graphs[("fake",)] = object()
    eng.graphs.uncapturable[("other",)] = None
    eng.clear_graphs()
    assert len(eng.graphs) == 0 and not eng.graphs.uncapturable


def test_a_copied_engine_leaves_the_captured_graphs_behind():
    import copy
    import pickle

    eng = RolloutEngine("torch", cuda_graph=True)
    eng.graphs.graphs[("fake",)] = object()
    for twin in (copy.deepcopy(eng), pickle.loads(pickle.dumps(eng))):
        assert len(twin.graphs) == 0 and twin.graphs is not eng.graphs
        assert (twin.backend, twin.cuda_graph) == ("torch", True)
    assert len(eng.graphs) == 1


class _Wrapper:
    """A velocity object holding its network as an attribute (seen one level deep)."""

    def __init__(self) -> None:
        self.net = TinyNet()

    def __call__(self, x, t, kwargs=None):
        return self.net(x, t)


def _key(velocity, x):
    return graphs_mod.graph_key(velocity, x, 2, None, "torch", {})


@pytest.mark.parametrize("form", ["velocity_model", "module", "bound_method", "wrapper"])
def test_graph_key_follows_mode_storage_and_autocast(form):
    """A captured graph bakes in the training flags, the weights' addresses and autocast:
    the key must change with each, and stay put across in-place optimizer steps."""
    wrapper = _Wrapper()
    net = wrapper.net
    velocity = {
        "velocity_model": rf.VelocityModel(net),
        "module": net,
        "bound_method": net.forward,
        "wrapper": wrapper,
    }[form]
    x = torch.zeros(2, 3, 6, 6)
    base = _key(velocity, x)
    assert _key(velocity, x) == base  # stable
    with torch.no_grad():
        net.conv.weight.add_(1.0)  # an in-place optimizer step: same storage
    assert _key(velocity, x) == base
    net.eval()
    assert _key(velocity, x) != base
    net.train()
    net.conv.eval()  # a submodule's flag alone
    assert _key(velocity, x) != base
    net.train()
    assert _key(velocity, x) == base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _key(velocity, x)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = _key(velocity, x)
    assert len({base, bf16, fp16}) == 3
    state = {name: p.detach().clone() for name, p in net.state_dict().items()}
    net.load_state_dict(state, assign=True)  # new storages
    moved = _key(velocity, x)
    assert moved != base
    ema = [p.detach().clone() for p in net.parameters()]
    live = [p.data for p in net.parameters()]
    for p, e in zip(net.parameters(), ema, strict=True):
        p.data = e  # an EMA swap
    assert _key(velocity, x) not in (base, moved)
    for p, data in zip(net.parameters(), live, strict=True):
        p.data = data  # swapped back: the earlier key (and graph) applies again
    assert _key(velocity, x) == moved
    net.to(torch.float64)
    assert _key(velocity, x) != moved


def test_graph_key_separates_models_shapes_steps_and_kwargs():
    graph_key = graphs_mod.graph_key
    a, b = rf.VelocityModel(TinyNet()), rf.VelocityModel(TinyNet())
    x = torch.zeros(2, 3, 6, 6)
    y = {"y": torch.zeros(2, dtype=torch.int64)}
    keys = {
        graph_key(a, x, 2, None, "torch", y),
        graph_key(b, x, 2, None, "torch", y),
        graph_key(a, x[:1], 2, None, "torch", y),
        graph_key(a, x, 3, None, "torch", y),
        graph_key(a, x, 2, torch.bfloat16, "native", y),
        graph_key(a, x, 2, None, "torch", {"y": torch.zeros(2, 4)}),
        graph_key(a, x.double(), 2, None, "torch", y),
    }
    assert len(keys) == 7


def test_graph_key_tells_apart_tensors_the_graph_reads_in_place():
    """Unbatched kwargs and objects are not copied into the graph's buffers at replay but
    read where they are: another tensor must mean another key, even when the two print
    alike (repr summarises long tensors with "...")."""
    from reflexflow.batching import prepare_kwargs

    a, b = torch.zeros(2000), torch.zeros(2000)
    b[500] = 7.0
    assert repr(a) == repr(b)

    def sig(kwargs):
        return graphs_mod._signature(kwargs)

    ids_a = prepare_kwargs({"ids": [a]}, 2, ("ids",))
    ids_b = prepare_kwargs({"ids": [b]}, 2, ("ids",))
    assert sig(ids_a) != sig(ids_b)
    assert sig(ids_a) == sig(prepare_kwargs({"ids": [a]}, 2, ("ids",)))

    class Holder:
        def __init__(self, e):
            self.e = e

    assert sig({"c": Holder(a)}) != sig({"c": Holder(b)})
    assert sig({"y": torch.zeros(2)}) == sig({"y": torch.ones(2)})  # copied in at replay


def test_graph_key_tells_apart_functions_and_keeps_a_module_across_optimizer_steps():
    """Objects without tensor attributes are described by repr: two functions (their
    addresses) differ; a module's key does not follow its weights' values."""
    import functools

    def sig(kwargs):
        return graphs_mod._signature(kwargs)

    def f(x):
        return x + 1

    def g(x):
        return x * 2

    assert sig({"act": f}) != sig({"act": g})
    assert sig({"act": functools.partial(torch.add)}) != sig({"act": functools.partial(torch.mul)})
    net = torch.nn.Linear(3, 3)
    before = sig({"m": net})
    with torch.no_grad():
        net.weight.add_(1.0)  # an optimizer step
    assert sig({"m": net}) == before


class _FakeGraph:
    """Stands in for a captured graph on CPU: records captures, replays eagerly."""

    made: list = []
    fail: bool = False

    def __init__(self, job, steps, cast) -> None:
        type(self).made.append(job.velocity)
        if type(self).fail:
            raise graphs_mod.CaptureError(
                "RuntimeError: operation not permitted when stream is capturing"
            )
        self.velocity, self.steps = job.velocity, steps

    def run(self, job):
        return RolloutEngine("torch")(
            self.velocity, job.x, job.tau0, job.k, job.h, job.kwargs, fixed_k=self.steps
        )


def _patch_graphs(monkeypatch, fail: bool) -> None:
    monkeypatch.setattr(graphs_mod, "CapturedRollout", _FakeGraph)
    monkeypatch.setattr(_FakeGraph, "made", [])
    monkeypatch.setattr(_FakeGraph, "fail", fail)


def _graph_engine(monkeypatch, fail: bool) -> RolloutEngine:
    _patch_graphs(monkeypatch, fail)
    engine = RolloutEngine("torch", cuda_graph=True)
    monkeypatch.setattr(engine, "uses_graph", lambda x: True)
    return engine


def test_each_loss_owns_its_engine_and_deleting_the_loss_frees_its_graphs(monkeypatch):
    """No process-wide registry: the graphs (and the model they keep alive) go with the
    ReflexFlowLoss that captured them; the functional form uses a fresh or a given engine."""
    import gc
    import weakref

    _patch_graphs(monkeypatch, fail=False)
    monkeypatch.setattr(RolloutEngine, "uses_graph", lambda self, x: self.cuda_graph)
    kw = dict(rollout_steps=2, num_sampling_steps=20, k_draw="fixed", cuda_graph=True)
    x1 = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(19))
    net = TinyNet()
    loss_fn = rf.ReflexFlowLoss(**kw)
    assert loss_fn.engine is not rf.ReflexFlowLoss(**kw).engine
    loss_fn(net, x1, generator=torch.Generator().manual_seed(0))
    assert len(loss_fn.engine.graphs) == 1 and len(_FakeGraph.made) == 1
    loss_fn(net, x1, generator=torch.Generator().manual_seed(1))
    assert len(_FakeGraph.made) == 1  # replayed from the loss's own cache
    given = RolloutEngine(cuda_graph=True)
    for seed in (2, 3):
        rf.reflexflow_loss(net, x1, generator=torch.Generator().manual_seed(seed), **kw)
        rf.reflexflow_loss(
            net, x1, generator=torch.Generator().manual_seed(seed), engine=given, **kw
        )
    assert len(_FakeGraph.made) == 4  # a fresh engine per call without engine=
    assert len(given.graphs) == 1
    alive = weakref.ref(net)
    _FakeGraph.made.clear()
    del net, given
    gc.collect()
    assert alive() is not None  # loss_fn's graph still holds the model
    del loss_fn
    gc.collect()
    assert alive() is None


def test_failed_capture_warns_once_remembers_the_key_and_runs_eagerly(monkeypatch):
    import warnings

    engine = _graph_engine(monkeypatch, fail=True)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs(batch=5, kmax=2, seed=15)
    want = RolloutEngine("torch")(vm, x, t0, k, h, fixed_k=2)
    with pytest.warns(RuntimeWarning, match="could not be captured.*not permitted"):
        got = engine(vm, x, t0, k, h, fixed_k=2)
    assert torch.equal(got, want) and len(_FakeGraph.made) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second capture attempt
        assert torch.equal(engine(vm, x, t0, k, h, fixed_k=2), want)
        assert len(_FakeGraph.made) == 1
        engine(vm, x[:3], t0[:3], k[:3], h[:3], fixed_k=2)  # a new key: tried, not warned
    assert len(_FakeGraph.made) == 2
    other = rf.VelocityModel(TinyNet())
    with pytest.warns(RuntimeWarning, match="could not be captured"):  # another model
        engine(other, x, t0, k, h, fixed_k=2)
    # each remembered key holds its velocity: its id (part of the key) cannot be reused
    assert all(v is vm or v is other for v in engine.graphs.uncapturable.values())
    assert len(engine.graphs.uncapturable) == 3
    monkeypatch.setattr(graphs_mod, "UNCAPTURABLE_KEYS", 4)
    for n in range(2, 5):  # three more keys (batch sizes): the oldest two are dropped
        engine(vm, x[:n], t0[:n], k[:n], h[:n], fixed_k=2)
    assert len(engine.graphs.uncapturable) == 4


def test_graph_cache_is_least_recently_used_and_keyed_by_model_state(monkeypatch):
    engine = _graph_engine(monkeypatch, fail=False)
    x, t0, k, h = rollout_inputs(batch=4, kmax=2, seed=16)
    models = [rf.VelocityModel(TinyNet()) for _ in range(graphs_mod.MAX_GRAPHS + 1)]
    for vm in models[:-1]:
        engine(vm, x, t0, k, h, fixed_k=2)
    engine(models[0], x, t0, k, h, fixed_k=2)  # a hit: now the most recent
    assert len(_FakeGraph.made) == graphs_mod.MAX_GRAPHS
    engine(models[-1], x, t0, k, h, fixed_k=2)  # evicts models[1], the least recent
    assert len(engine.graphs) == graphs_mod.MAX_GRAPHS
    engine(models[0], x, t0, k, h, fixed_k=2)
    assert len(_FakeGraph.made) == graphs_mod.MAX_GRAPHS + 1
    engine(models[1], x, t0, k, h, fixed_k=2)
    assert len(_FakeGraph.made) == graphs_mod.MAX_GRAPHS + 2
    models[0].model.eval()  # a new key: captured again
    engine(models[0], x, t0, k, h, fixed_k=2)
    assert len(_FakeGraph.made) == graphs_mod.MAX_GRAPHS + 3


def test_per_sample_k_all_equal_takes_the_graph_and_mixed_k_does_not(monkeypatch):
    engine = _graph_engine(monkeypatch, fail=False)
    vm = rf.VelocityModel(TinyNet())
    x, t0, k, h = rollout_inputs(batch=6, kmax=3, seed=17)
    assert_rollout_matches_oracle(engine, vm, x, t0, k, h)
    assert _FakeGraph.made == []  # mixed k: the sorted prefix plan
    equal = torch.full((6,), 3)
    torch.testing.assert_close(
        engine(vm, x, t0, equal, h),
        euler_rollout_per_sample(vm, x, t0, equal, h),
        rtol=1e-5,
        atol=1e-6,
    )
    assert len(_FakeGraph.made) == 1
