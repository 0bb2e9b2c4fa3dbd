"""Record tests/golden/values.pt from tests/golden/cases.py (python -m tests.golden.record)."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.golden.cases import CASES, run_case

OUT = Path(__file__).with_name("values.pt")

if __name__ == "__main__":
    torch.save({name: run_case(name) for name in CASES}, OUT)
    print(f"wrote {len(CASES)} cases to {OUT}")
