"""tools/compile_check.py (the sm_90 compile check of the Triton kernels) without Triton:
one message naming what to install, no traceback."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import hide_module
from tools import compile_check

ROOT = Path(__file__).resolve().parent.parent


def test_without_triton_main_names_the_extra_and_exits_2(monkeypatch, capsys):
    hide_module(monkeypatch, "triton")
    assert compile_check.main(["--case", "sit_4x32x32_fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'install the "triton" extra' in err
    assert 'pip install -e ".[triton]"' in err


def test_without_triton_the_module_prints_one_message_and_no_traceback():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton now fails, as uninstalled
        "from tools.compile_check import main\n"
        "raise SystemExit(main([]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {compile_check.MISSING_TRITON}"]
