"""ReflexFlowLoss under torch.distributed: 2 gloo processes on CPU, float64.

The averaged gradients of DDP (shared first call, joint 2B forward, two calls,
torch.compile(DDP(model)), memory="lean" with a constant loss scale and with gradient
accumulation over micro-batches) and of FSDP2 ``fully_shard`` (default and lean) equal
the gradients of one process on the same global batch (same noise, t, k), to 1e-10
(float64), and DDP all-reduces the gradients exactly once per step (one bucket here).
"""

from __future__ import annotations

import datetime
import os
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


def _launch(script: list[str], world: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``world`` ranks of ``script`` as torchrun does, wait with a timeout.

    Like torchrun's agent, this process hosts the rendezvous TCPStore (bound to a free
    port by the kernel and held open) and the ranks join it as clients
    (TORCHELASTIC_USE_AGENT_STORE=True). Probing a free port and letting rank 0 bind it
    later is a race: another process on a busy machine can take the port in between, and
    rank 0 then fails with EADDRINUSE. Output goes to files (a full pipe cannot stall a
    rank); a rank that fails stops the others at once.
    """
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    procs, logs = [], []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            TORCHELASTIC_USE_AGENT_STORE="True",
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
    del store
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited with {r.returncode}:\n{r.stdout[-3000:]}"
    return results


def test_ddp_and_fsdp2_gradients_equal_single_process_in_every_forward_and_memory_mode(tmp_path):
    out = tmp_path / "grads.pt"
    _launch([os.path.join(HERE, "ddp_worker.py"), str(out)])
    result = torch.load(out)

    model = ddp_worker.make_model()
    ddp_worker.loss_on(model, ddp_worker.global_batch()).loss.backward()
    assert set(result) == set(ddp_worker.MODES)
    for mode, got in result.items():
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
