"""Print a step result file as the Markdown table of benchmarks/README.md.

python benchmarks/step_markdown.py benchmarks/results/step-cpu.json
"""

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machinery.report import step_markdown  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/step_markdown.py RESULT.json")
    with open(sys.argv[1]) as f:
        print(step_markdown(json.load(f)))
