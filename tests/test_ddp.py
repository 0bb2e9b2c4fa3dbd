"""ReflexFlowLoss under torch.distributed: 2 gloo processes on CPU, float64.

The averaged gradients of DDP (shared first call, joint 2B forward, two calls,
torch.compile(DDP(model)), memory="lean" with a constant loss scale and with gradient
accumulation over micro-batches) and of FSDP2 ``fully_shard`` (default and lean) equal
the gradients of one process on the same global batch (same noise, t, k), to 1e-10
(float64), and DDP all-reduces the gradients exactly once per step (one bucket here).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ddp_worker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 180

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed gloo",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def _launch(script: list[str], world: int = 2, attempts: int = 3) -> list:
    """Start ``world`` ranks of ``script`` as torchrun does (env://), wait with a timeout.

    The rendezvous port is probed free here and bound by rank 0 a moment later; on a busy
    machine another process can take it in between, and rank 0 then fails with
    EADDRINUSE: the launch is retried on a new port (up to ``attempts`` times). (Hosting
    the store in this process and letting the ranks join it as torchrun's agent store
    avoids the race but made a rank abort at exit now and then: 'terminate called without
    an active exception'.) Output goes to files (a full pipe cannot stall a rank); a rank
    that fails stops the others at once.
    """
    for attempt in range(attempts):
        results = _launch_once(script, world, _free_port())
        failed = [r for r in results if r.returncode != 0]
        if not failed:
            return results
        taken = any(any(m in r.stdout for m in PORT_TAKEN) for r in failed)
        if not taken or attempt + 1 == attempts:
            report = "\n".join(
                f"rank {rank} exited with {r.returncode}:\n{r.stdout[-3000:]}"
                for rank, r in enumerate(results)
            )
            raise AssertionError(report)
    raise AssertionError("unreachable")


def _launch_once(script: list[str], world: int, port: int) -> list:
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        logs.append(tempfile.TemporaryFile(mode="w+"))
        procs.append(
            subprocess.Popen(
                [sys.executable, *script],
                env=env,
                cwd=ROOT,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    results = []
    for p, log in zip(procs, logs, strict=True):
        log.seek(0)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, log.read()))
        log.close()
    return results


def test_ddp_and_fsdp2_gradients_equal_single_process_in_every_forward_and_memory_mode(tmp_path):
    out = tmp_path / "grads.pt"
    _launch([os.path.join(HERE, "ddp_worker.py"), str(out)])
    result = torch.load(out)

    assert set(result) == set(ddp_worker.MODES)
    for mode, got in result.items():
        knobs = ddp_worker.MODES[mode][1]
        single = {k: v for k, v in knobs.items() if k not in ddp_worker.MODE_ONLY}
        model = ddp_worker.make_model()
        ddp_worker.loss_on(model, ddp_worker.global_batch(), **single).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad.abs().max() > 1e-3  # a real gradient, not zeros
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=0, atol=1e-10)
        if mode.startswith("ddp") and mode != "ddp-compiled":
            assert got["allreduces"] == 1, mode  # one bucket, reduced once per step


@pytest.mark.parametrize("extra", [[], ["--lean"]], ids=["default", "lean"])
def test_train_ddp_example_runs_two_gloo_ranks(extra):
    results = _launch(
        [
            os.path.join(ROOT, "examples", "train_ddp.py"),
            "--steps",
            "2",
            "--size",
            "8",
            "--batch",
            "4",
            "--cpu",
            *extra,
        ]
    )
    assert "step 1" in results[0].stdout
