"""Loading the C++/CUDA extension ``reflexflow._C``: prebuilt, else JIT-built, else none.

Order: (1) the module built by ``pip install`` (setup.py), loaded with
torch.ops.load_library; (2) a JIT build of csrc/ with torch.utils.cpp_extension.load,
cached in torch's extensions directory (one line on stderr while it compiles; from the
checkout's csrc/, or the copy a wheel ships in reflexflow/_csrc; needs ninja and a C++
compiler); (3) nothing: a warning that says why, and the pure-PyTorch engine
(:mod:`reflexflow.rollout`) runs instead. Never raises.

Environment: REFLEXFLOW_NO_EXT=1 skips the extension (no warning);
REFLEXFLOW_NO_JIT=1 skips step (2).
The ops, once loaded: ``torch.ops.reflexflow.rollout_plan``,
``torch.ops.reflexflow.euler_update_`` and ``torch.ops.reflexflow.euler_update_masked_``;
their fake kernels are registered here so torch.compile can trace them; the rollout runs
them as :data:`NATIVE_OPS`. Reference twins (:data:`reflexflow.rollout.TORCH_OPS`):
:func:`reflexflow.rollout.rollout_plan`, :func:`reflexflow.rollout.euler_update`,
:func:`reflexflow.rollout.euler_update_masked`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from .rollout import RolloutOps

__all__ = [
    "load_extension",
    "extension_status",
    "has_kernel",
    "NATIVE_OPS",
    "CSRC",
    "SOURCES",
    "OPS",
]

# the checkout's csrc/ (editable install), else the copy a wheel ships in reflexflow/_csrc
_CHECKOUT_CSRC = Path(__file__).resolve().parent.parent / "csrc"
CSRC = _CHECKOUT_CSRC if _CHECKOUT_CSRC.is_dir() else Path(__file__).resolve().parent / "_csrc"
SOURCES = ("ops.cpp", "rollout.cpp")
CUDA_SOURCES = ("rollout_cuda.cu",)
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
JIT_NAME = "reflexflow_jit_C"
OPS = ("rollout_plan", "euler_update_", "euler_update_masked_")

_state: dict = {
    "tried": False,
    "loaded": False,
    "source": None,
    "reason": None,
    "warned_cuda": False,
}


def _load_prebuilt() -> str | None:
    """Load the setup.py-built library; returns None on success, else the reason."""
    try:
        spec = importlib.util.find_spec("reflexflow._C")
    except (ImportError, ValueError) as err:  # pragma: no cover - odd import states
        return f"no prebuilt reflexflow._C ({err})"
    if spec is None or spec.origin is None:
        return "no prebuilt reflexflow._C"
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as err:
        return f"prebuilt reflexflow._C failed to load ({err})"
    return None


def _jit_with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and CUDA_HOME is not None and torch.cuda.is_available()


def _load_jit() -> str | None:
    """JIT-build csrc/ (cached); returns None on success, else the reason."""
    if os.environ.get("REFLEXFLOW_NO_JIT") == "1":
        return "REFLEXFLOW_NO_JIT=1"
    sources = [CSRC / name for name in SOURCES]
    if not all(p.is_file() for p in sources):
        return f"no C++ sources to JIT-build at {CSRC}"
    try:
        from torch.utils import cpp_extension

        with_cuda = _jit_with_cuda()
        if with_cuda:
            sources += [CSRC / name for name in CUDA_SOURCES]
        where = cpp_extension._get_build_directory(JIT_NAME, verbose=False)
        if not os.path.exists(os.path.join(where, f"{JIT_NAME}.so")):
            print(
                f"reflexflow: compiling the C++ rollout extension"
                f"{' with CUDA' if with_cuda else ''} (first use only, about a minute; "
                f"cached in {where})",
                file=sys.stderr,
            )
        cpp_extension.load(
            name=JIT_NAME,
            sources=[str(p) for p in sources],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # any compiler or loader failure means: fall back
        first = str(err).strip().splitlines()
        return f"JIT build failed: {type(err).__name__}: {first[0] if first else ''}"
    return None


def _register_fakes() -> None:
    """Meta/fake kernels: shapes only, so torch.compile can trace the ops."""

    @torch.library.register_fake("reflexflow::rollout_plan")
    def _plan_fake(k, t0, step, kmax=None):
        if kmax is None:  # read from k on the device: data-dependent
            kmax = torch.library.get_ctx().new_dynamic_size()
        batch = k.shape[0]
        return (
            k.new_empty(batch),
            k.new_empty(kmax),
            t0.new_empty(kmax, batch),
            step.new_empty(batch),
        )

    @torch.library.register_fake("reflexflow::euler_update_")
    def _euler_fake(state, v, h, next_input=None):
        return None

    @torch.library.register_fake("reflexflow::euler_update_masked_")
    def _euler_masked_fake(state, tau, v, h, k, j, next_input=None):
        return None


def load_extension() -> bool:
    """True when ``torch.ops.reflexflow.*`` is usable; tries once per process."""
    if _state["tried"]:
        return _state["loaded"]
    _state["tried"] = True
    if os.environ.get("REFLEXFLOW_NO_EXT") == "1":
        _state["reason"] = "REFLEXFLOW_NO_EXT=1"
        return False
    prebuilt = _load_prebuilt()
    if prebuilt is None:
        _state["source"] = "prebuilt"
    else:
        jit = _load_jit()
        if jit is not None:
            _state["reason"] = f"{prebuilt}; {jit}"
            warnings.warn(
                f"reflexflow: C++ rollout extension unavailable ({_state['reason']}); "
                "using the pure-PyTorch rollout engine",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        _state["source"] = "jit"
    missing = [op for op in OPS if not hasattr(torch.ops.reflexflow, op)]
    if missing:  # a library built from older sources (the op set grew since)
        _state["reason"] = (
            f"the {_state['source']} extension is out of date (no {', '.join(missing)}); "
            "rebuild it: pip install --no-build-isolation -e . (or python setup.py build_ext "
            "--inplace)"
        )
        warnings.warn(
            f"reflexflow: {_state['reason']}; using the pure-PyTorch rollout engine",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    _register_fakes()
    _state["loaded"] = True
    return True


def extension_status() -> dict:
    """{'tried', 'loaded', 'source' ('prebuilt' | 'jit' | None), 'reason', 'warned_cuda'}."""
    return dict(_state)


def has_kernel(device: torch.device | str) -> bool:
    """True when the loaded extension has kernels for ``device``'s type (CPU, CUDA)."""
    if not load_extension():
        return False
    kind = torch.device(device).type
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(kind)
    found = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "reflexflow::euler_update_", key
    )
    if not found and kind == "cuda" and not _state.get("warned_cuda"):
        _state["warned_cuda"] = True
        warnings.warn(
            f"reflexflow: the {_state['source']} C++ extension has no CUDA kernels (built "
            "without CUDA); CUDA rollouts use the pure-PyTorch engine. Rebuild it where a "
            "GPU is visible, or with REFLEXFLOW_FORCE_CUDA=1",
            RuntimeWarning,
            stacklevel=2,
        )
    return found


def _plan(k, t0, step, kmax=None):
    return torch.ops.reflexflow.rollout_plan(k, t0, step, kmax)


def _update(state, v, h, next_input=None) -> None:
    torch.ops.reflexflow.euler_update_(state, v, h, next_input)


def _masked_update(state, tau, v, h, k, j, next_input=None) -> None:
    torch.ops.reflexflow.euler_update_masked_(state, tau, v, h, k, j, next_input)


# The extension's ops as the rollout's ops (load the extension before running them).
NATIVE_OPS = RolloutOps(
    name="native", plan=_plan, update=_update, masked_update=_masked_update, fused=True
)
