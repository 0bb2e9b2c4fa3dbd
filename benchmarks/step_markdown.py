"""Print a step result file as the Markdown table of benchmarks/README.md.

python benchmarks/step_markdown.py benchmarks/results/step-cpu.json
"""

import json
import sys

from reflexflow.bench.report import step_markdown

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/step_markdown.py RESULT.json")
    with open(sys.argv[1]) as f:
        print(step_markdown(json.load(f)))
