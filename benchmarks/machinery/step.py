"""End-to-end training-step benchmark: plain FM against ReflexFlowLoss, and the FLOP ideal.

One *step* is ``zero_grad; loss = loss_fn(model, x1); loss.backward(); opt.step()``
(AdamW). Configurations: plain flow matching (a hand-written step, what a user has
before adopting the library) and ReflexFlowLoss (preset "defar" with state-space FC,
plus one row with its velocity-space FC) with K in {1, 2, 4} Euler rollout steps
(``k_draw="fixed"``, ``ss_prob=1``: every sample rolls exactly K steps, so the work is
deterministic), in each forward mode: "shared" (the default: the FM term's call is the
rollout's first step), "joint" (one 2B call after a full rollout), "two-call" (two
calls after a full rollout) and "lean" (memory="lean": the FM backward runs before the
ADR forward), for every backend the installed
:class:`~reflexflow.config.ReflexFlowConfig` accepts and the device can run.

The ideal of a configuration is what its model work alone costs at plain-FM speed:

    F(c)        model FLOPs of one step of c (torch.utils.flop_counter: the rollout's
                no-grad forwards, the gradient-carrying forwards and their backward)
    opt         time of the optimizer step alone (the same for every configuration)
    ideal(c)    = opt + (time(fm) - opt) * F(c) / F(fm)
    vs_ideal(c) = time(c) / ideal(c)          (1.00 = no overhead beyond model work)

Everything in plain FM's step except the optimizer (data draws, the loss's few
elementwise ops, Python) is scaled with the FLOPs, so the ideal charges ReflexFlow
nothing for them beyond FM's own share.

For ReflexFlow with K rollout steps and batch B, with f = forward FLOPs of a batch of
B and b = backward FLOPs: F(fm) = f + b and F(c) = 2 (f + b) + (K - 1) f for the shared
and lean modes, 2 (f + b) + K f for joint and two-call, so F(c) / F(fm) = 2 + (K - 1) f /
(f + b) (2.00 at K = 1) or 2 + K f / (f + b) (about 2 + K / 3). Velocity-space FC adds
one no-grad forward at x_t1 (f; two in lean mode, which cannot reuse v(x^_t1, t1)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from reflexflow.config import ReflexFlowConfig
from reflexflow.demo.toy_models import build_model
from reflexflow.loss import ReflexFlowLoss

__all__ = [
    "StepSpec",
    "step_specs",
    "available_backends",
    "make_loss_fn",
    "plain_fm_loss",
    "count_step_flops",
    "saved_activation_bytes",
    "make_train_step",
    "run_step_benchmark",
    "summarize",
    "paired_ratios",
    "spread_entry",
    "CANDIDATE_BACKENDS",
    "NOISE_LIMIT",
    "MIN_REPS",
]

CANDIDATE_BACKENDS = ("torch", "triton", "auto")
# a timed figure whose (max - min) over the timed rounds exceeds this share of its median,
# or that has fewer than MIN_REPS rounds, is reported but not held against its goal
NOISE_LIMIT = 0.20
MIN_REPS = 3
MODES = ("shared", "joint", "two-call", "lean")
MODE_KNOBS: dict[str, dict[str, Any]] = {
    "shared": {},
    "joint": {"joint_forward": True},
    "two-call": {"share_first_call": False},
    "lean": {"memory": "lean"},
}
LossFn = Callable[[nn.Module, Tensor, torch.Generator], Any]  # returns x with x.backward()


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One benchmarked configuration: plain FM, or ReflexFlow with K, mode, backend, FC."""

    method: str  # "fm" or "reflexflow"
    rollout_steps: int = 0
    mode: str | None = None  # one of MODES
    backend: str | None = None
    fc_source: str = "state"

    @property
    def name(self) -> str:
        if self.method != "reflexflow":
            return self.method
        fc = " vel-FC" if self.fc_source == "velocity" else ""
        return f"reflexflow K={self.rollout_steps} {self.mode}{fc} [{self.backend}]"


def available_backends(device: torch.device | str) -> tuple[list[str], dict[str, str]]:
    """Backends among CANDIDATE_BACKENDS that ReflexFlowConfig accepts and ``device`` runs.

    Returns (usable, skipped) where skipped maps a backend to the reason it is left out
    (the installed config rejects it, or it needs CUDA and the device is not CUDA).
    """
    device = torch.device(device)
    usable, skipped = [], {}
    for backend in CANDIDATE_BACKENDS:
        try:
            ReflexFlowConfig(backend=backend)
        except (ValueError, TypeError) as err:
            skipped[backend] = f"not accepted by this install ({err})"
            continue
        if backend == "triton" and device.type != "cuda":
            skipped[backend] = "needs a CUDA device (the Triton CPU interpreter is not a benchmark)"
            continue
        usable.append(backend)
    return usable, skipped


def step_specs(
    backends: Iterable[str],
    rollout_steps: Sequence[int] = (1, 2, 4),
    modes: Sequence[str] = MODES,
    velocity_fc: bool = True,
) -> list[StepSpec]:
    """Plain FM first, then every (backend, K, mode) ReflexFlow configuration with
    state-space FC, and (velocity_fc) the default preset's velocity-space FC at the
    smallest K in the shared mode."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {MODES}, got {mode!r}")
    specs = [StepSpec("fm")]
    for backend in backends:
        for k in rollout_steps:
            for mode in modes:
                specs.append(StepSpec("reflexflow", k, mode, backend))
        if velocity_fc and rollout_steps:
            specs.append(StepSpec("reflexflow", min(rollout_steps), "shared", backend, "velocity"))
    return specs


def plain_fm_loss(model: nn.Module, x1: Tensor, generator: torch.Generator) -> Tensor:
    """Hand-written flow matching: mean ||v(x_t, t) - (x1 - eps)||^2, x_t = t x1 + (1-t) eps.

    The user's baseline before adopting the library (linear path, t ~ U(0, 1)).
    Reference twin: :func:`reflexflow.reference.fm_loss` on the linear path.
    """
    b = x1.shape[0]
    t = torch.rand(b, device=x1.device, generator=generator)
    eps = torch.randn(x1.shape, device=x1.device, generator=generator)
    tb = t.view(b, *([1] * (x1.dim() - 1)))
    x_t = tb * x1 + (1 - tb) * eps
    return (model(x_t, t).float() - (x1 - eps)).square().mean()


def make_loss_fn(spec: StepSpec, num_sampling_steps: int = 50) -> LossFn:
    """``loss_fn(model, x1, generator) -> out`` for ``spec``; ``out.backward()`` runs the
    step's backward (a tensor for FM, a ReflexFlowOutput for ReflexFlow).

    ReflexFlow runs the "defar" preset with ``spec.fc_source``, k_draw="fixed" and
    ss_prob=1 (every sample rolls K steps of h = 1 / num_sampling_steps) in
    ``spec.mode``, all other knobs at their defaults.
    """
    if spec.method == "fm":
        return plain_fm_loss
    if spec.method != "reflexflow":
        raise ValueError(f"spec.method must be 'fm' or 'reflexflow', got {spec.method!r}")
    if spec.mode not in MODES:
        raise ValueError(f"spec.mode must be one of {MODES}, got {spec.mode!r}")
    loss = ReflexFlowLoss(
        preset="defar",
        fc_source=spec.fc_source,
        rollout_steps=spec.rollout_steps,
        num_sampling_steps=num_sampling_steps,
        k_draw="fixed",
        ss_prob=1.0,
        backend=spec.backend,
        **MODE_KNOBS[spec.mode],
    )

    def loss_fn(model: nn.Module, x1: Tensor, generator: torch.Generator) -> Any:
        return loss(model, x1, generator=generator)

    return loss_fn


class _CallCounter:
    """Wraps a model, counting calls and samples passed through it."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.calls, self.samples = model, 0, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        self.samples += x.shape[0]
        return self.model(x, t)


def _math_sdpa() -> contextlib.AbstractContextManager:
    """Force the math attention kernel: it decomposes into counted matmuls on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def count_step_flops(
    model: nn.Module, loss_fn: LossFn, x1: Tensor, generator: torch.Generator
) -> dict[str, int]:
    """Model FLOPs of one loss forward + backward, and the model calls it makes.

    FLOPs are torch.utils.flop_counter's (matmuls, convolutions, attention; 2 per
    multiply-add) inside ``model``'s forwards and their backward, counted with the math
    attention kernel so that the count is the same on every device. What the loss
    itself counts outside the model (the FC filter's small convolution) is returned
    apart as other_flops. The model's gradients are cleared afterwards.
    Returns {"flops", "other_flops", "calls", "sample_forwards"}.
    """
    counter = _CallCounter(model)
    with FlopCounterMode(display=False) as fc, _math_sdpa():
        loss = loss_fn(counter, x1, generator)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model_flops = sum(fc.get_flop_counts().get(type(model).__name__, {}).values())
    return {
        "flops": int(model_flops),
        "other_flops": int(fc.get_total_flops() - model_flops),
        "calls": counter.calls,
        "sample_forwards": counter.samples,
    }


class _Saved:
    """What autograd keeps of one saved tensor: the tensor, counted while it is alive."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def saved_activation_bytes(
    model: nn.Module, loss_fn: LossFn, x1: Tensor, generator: torch.Generator
) -> int:
    """Peak bytes of the distinct tensors autograd holds for backward during one step (not
    weights): the memory the gradient-carrying forwards keep until their backward.

    Every saved tensor is tracked from the forward that saves it until autograd frees it
    (its graph is backpropagated), through the step's backward too (memory="lean" runs a
    forward inside it); the peak of the live total is returned. Measurable on every
    device (saved-tensor hooks), unlike a process peak on CPU.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live: dict[int, list[int]] = {}  # storage pointer -> [bytes, references]
    state = {"now": 0, "peak": 0}

    def release(ptr: int) -> None:
        entry = live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            state["now"] -= entry[0]
            del live[ptr]

    def pack(x: Tensor) -> Any:
        storage = x.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in params or ptr == 0:
            return x
        entry = live.setdefault(ptr, [0, 0])
        if entry[1] == 0:
            entry[0] = storage.nbytes()
            state["now"] += entry[0]
            state["peak"] = max(state["peak"], state["now"])
        entry[1] += 1
        handle = _Saved(x)
        weakref.finalize(handle, release, ptr)
        return handle

    def unpack(obj: Any) -> Tensor:
        return obj.tensor if isinstance(obj, _Saved) else obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = loss_fn(model, x1, generator)
        out.backward()
        del out
    gc.collect()
    model.zero_grad(set_to_none=True)
    return state["peak"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _with_amp(loss_fn: LossFn, device: torch.device, amp: str) -> LossFn:
    """loss_fn with its forward under the step's autocast (backward stays outside)."""

    def wrapped(model: nn.Module, x1: Tensor, generator: torch.Generator) -> Any:
        with _autocast(device, amp):
            return loss_fn(model, x1, generator)

    return wrapped


def make_train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    x1: Tensor,
    generator: torch.Generator,
    *,
    amp: str = "none",
    sync: bool = False,
) -> Callable[[], None]:
    """One training step: zero_grad; out = loss_fn(model, x1) (under bf16 autocast when
    amp="bf16"); out.backward(); opt.step(); then a CUDA synchronize when ``sync``."""
    device = x1.device

    forward = _with_amp(loss_fn, device, amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = forward(model, x1, generator)
        loss.backward()
        opt.step()
        if sync:
            _sync(device)

    return step


_OPT = StepSpec("optimizer-only")


def _optimizer_only(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """opt.step() alone, on fixed zero gradients installed before each call (no allocation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for p in params]

    def step() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    return step


def _timed(step: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one step and, on CUDA, its peak allocated bytes."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def _bench_model(
    name: str,
    size: str,
    batch: int,
    specs: list[StepSpec],
    *,
    device: torch.device,
    amp: str,
    reps: int,
    warmup: int,
    num_sampling_steps: int,
    seed: int,
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    model, shape = build_model(name, size)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x1 = torch.randn(batch, *shape, device=device)
    params = sum(p.numel() for p in model.parameters())

    steps, info = {}, {}
    for spec in specs:
        loss_fn = make_loss_fn(spec, num_sampling_steps)
        measured = _with_amp(loss_fn, device, amp)  # saved tensors in the step's dtypes
        info[spec] = count_step_flops(model, measured, x1, torch.Generator(device).manual_seed(0))
        info[spec]["saved"] = saved_activation_bytes(
            model, measured, x1, torch.Generator(device).manual_seed(0)
        )
        gen = torch.Generator(device).manual_seed(seed)
        steps[spec] = make_train_step(model, opt, loss_fn, x1, gen, amp=amp)

    steps[_OPT] = _optimizer_only(model, opt)
    order = [*specs, _OPT]
    for _ in range(warmup):
        for spec in order:
            steps[spec]()
    times: dict[StepSpec, list[float]] = {s: [] for s in order}
    peaks: dict[StepSpec, int | None] = {s: None for s in order}
    for _ in range(reps):  # round robin: load changes on a shared machine hit all alike
        for spec in order:
            seconds, peak = _timed(steps[spec], device)
            times[spec].append(seconds)
            if peak is not None:
                peaks[spec] = max(peaks[spec] or 0, peak)

    fm = specs[0]
    fm_time, fm_flops = statistics.median(times[fm]), info[fm]["flops"]
    opt_time = min(statistics.median(times[_OPT]), fm_time)
    rows = []
    for spec in specs:
        med = statistics.median(times[spec])
        ratio = info[spec]["flops"] / fm_flops
        ideal = opt_time + (fm_time - opt_time) * ratio
        rows.append(
            {
                "model": name,
                "size": size,
                "params": params,
                "shape": list(shape),
                "batch": batch,
                "config": spec.name,
                "method": spec.method,
                "rollout_steps": spec.rollout_steps,
                "mode": spec.mode,
                "fc_source": spec.fc_source if spec.method == "reflexflow" else None,
                "backend": spec.backend,
                "model_calls": info[spec]["calls"],
                "sample_forwards": info[spec]["sample_forwards"],
                "gflop": info[spec]["flops"] / 1e9,
                "other_gflop": info[spec]["other_flops"] / 1e9,
                "flop_ratio": ratio,
                "time_ms": 1e3 * med,
                "time_min_ms": 1e3 * min(times[spec]),
                "time_max_ms": 1e3 * max(times[spec]),
                "spread": (max(times[spec]) - min(times[spec])) / med,
                "times_ms": [1e3 * s for s in times[spec]],
                "optimizer_ms": 1e3 * opt_time,
                "ideal_ms": 1e3 * ideal,
                "vs_ideal": med / ideal,
                "vs_fm": med / fm_time,
                "peak_mem_mib": None if peaks[spec] is None else peaks[spec] / 2**20,
                "saved_act_mib": info[spec]["saved"] / 2**20,
            }
        )
    shared = {
        (r["backend"], r["rollout_steps"], r["fc_source"]): r for r in rows if r["mode"] == "shared"
    }
    for r in rows:
        base = shared.get((r["backend"], r["rollout_steps"], r["fc_source"]))
        r["vs_shared"] = None if base is None else r["time_ms"] / base["time_ms"]
        r["saved_vs_fm"] = r["saved_act_mib"] / rows[0]["saved_act_mib"]
    return rows


def run_step_benchmark(
    device: torch.device | str = "cpu",
    *,
    models: Sequence[str] = ("dit", "unet"),
    size: str | None = None,
    batch: int | None = None,
    rollout_steps: Sequence[int] = (1, 2, 4),
    modes: Sequence[str] = MODES,
    backends: Sequence[str] | None = None,
    reps: int = 5,
    warmup: int = 1,
    amp: str | None = None,
    num_sampling_steps: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Time one optimizer step per configuration and compare it with its FLOP ideal.

    ideal = time(fm) * FLOPs(config) / FLOPs(fm); vs_ideal = time / ideal (median of
    ``reps`` steps, configurations interleaved round-robin after ``warmup`` rounds).
    Defaults: size "small" on CPU and "gpu" on CUDA; batch 8 on CPU, 64 on CUDA;
    amp "none" on CPU and "bf16" (autocast) on CUDA; every usable backend.
    Returns {"settings": ..., "rows": [...], "skipped_backends": {backend: reason}}.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    size = size if size is not None else ("gpu" if on_gpu else "small")
    batch = batch if batch is not None else (64 if on_gpu else 8)
    amp = amp if amp is not None else ("bf16" if on_gpu else "none")
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp must be 'none' or 'bf16', got {amp!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    usable, skipped = available_backends(device)
    if backends is not None:
        bad = [b for b in backends if b not in usable]
        if bad:
            raise ValueError(f"backends {bad} are not usable here: {skipped or usable}")
        usable = list(backends)
    specs = step_specs(usable, rollout_steps, modes)
    rows: list[dict[str, Any]] = []
    for name in models:
        rows += _bench_model(
            name,
            size,
            batch,
            specs,
            device=device,
            amp=amp,
            reps=reps,
            warmup=warmup,
            num_sampling_steps=num_sampling_steps,
            seed=seed,
        )
    settings = {
        "device": str(device),
        "models": list(models),
        "size": size,
        "batch": batch,
        "amp": amp,
        "rollout_steps": list(rollout_steps),
        "modes": list(modes),
        "preset": "defar (fc_source state; one velocity-FC row)",
        "backends": usable,
        "reps": reps,
        "warmup": warmup,
        "num_sampling_steps": num_sampling_steps,
        "optimizer": "AdamW",
        "k_draw": "fixed",
        "ss_prob": 1.0,
        "peak_memory": "torch.cuda.max_memory_allocated over the step (weights, grads and "
        "AdamW state included)"
        if on_gpu
        else "n/a on CPU (no allocator peak counter; saved_act_mib is measured instead)",
    }
    return {
        "settings": settings,
        "rows": rows,
        "skipped_backends": skipped,
        "summary": summarize(rows),
    }


def paired_ratios(num: dict[str, Any], den: dict[str, Any]) -> list[float]:
    """Per-round ratios num_i / den_i of two rows' timed steps (the configurations run
    round-robin, so round i of each met the same machine load)."""
    return [a / b for a, b in zip(num["times_ms"], den["times_ms"], strict=True)]


def spread_entry(value: float, row: dict[str, Any], samples: list[float]) -> dict[str, Any]:
    """A summary figure with its spread: {"value", "model", "config", "min", "max", "reps",
    "spread", "noisy"}; spread = (max - min) / median of ``samples`` (one per timed round),
    noisy when spread > NOISE_LIMIT or fewer than MIN_REPS rounds were timed."""
    med = statistics.median(samples)
    spread = (max(samples) - min(samples)) / med if med else float("inf")
    return {
        "value": value,
        "model": row["model"],
        "config": row["config"],
        "min": min(samples),
        "max": max(samples),
        "reps": len(samples),
        "spread": spread,
        "noisy": spread > NOISE_LIMIT or len(samples) < MIN_REPS,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets, each with its row: the worst vs_ideal over ReflexFlow rows (goal <= 1.05
    on H100/H200); the K = 1 shared (state FC) step's time over FM's (goal <= 2.1 on CPU,
    2.05 on H100/H200) and over the joint mode's (goal <= 0.9); the worst lean saved
    activations over FM's (goal <= 1.1). Every timed figure carries its min, max and
    spread over the timed rounds (:func:`spread_entry`)."""
    rf = [r for r in rows if r["method"] == "reflexflow"]
    fm_of = {r["model"]: r for r in rows if r["method"] == "fm"}
    out: dict[str, Any] = {
        "max_vs_ideal": None,
        "k1_shared_vs_fm": None,
        "k1_shared_vs_joint": None,
        "max_lean_saved_vs_fm": None,
    }

    def entry(value: float, row: dict[str, Any]) -> dict[str, Any]:
        return {"value": value, "model": row["model"], "config": row["config"]}

    if rf:
        worst = max(rf, key=lambda r: r["vs_ideal"])
        out["max_vs_ideal"] = spread_entry(
            worst["vs_ideal"], worst, [t / worst["ideal_ms"] for t in worst["times_ms"]]
        )
    k1 = [r for r in rf if r["rollout_steps"] == 1 and r["fc_source"] == "state" and r["mode"]]
    shared = [r for r in k1 if r["mode"] == "shared"]
    if shared:
        worst = max(shared, key=lambda r: r["vs_fm"])
        out["k1_shared_vs_fm"] = spread_entry(
            worst["vs_fm"], worst, paired_ratios(worst, fm_of[worst["model"]])
        )
    joint = [r for r in k1 if r["mode"] == "joint" and r["vs_shared"]]
    if joint:  # shared / joint = 1 / (joint / shared)
        worst = min(joint, key=lambda r: r["vs_shared"])
        base = next(
            r for r in shared if (r["model"], r["backend"]) == (worst["model"], worst["backend"])
        )
        out["k1_shared_vs_joint"] = spread_entry(
            1 / worst["vs_shared"], worst, paired_ratios(base, worst)
        )
    lean = [r for r in rf if r["mode"] == "lean"]
    if lean:  # saved-tensor bytes: counted, not timed
        worst = max(lean, key=lambda r: r["saved_vs_fm"])
        out["max_lean_saved_vs_fm"] = entry(worst["saved_vs_fm"], worst)
    return out
