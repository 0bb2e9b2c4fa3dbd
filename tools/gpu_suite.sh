#!/usr/bin/env bash
# One command that validates reflexflow's GPU paths on a fresh CUDA machine (no network):
# builds the extension for the GPU, runs every test with CUDA visible, the sync-debug check,
# compute-sanitizer (memcheck, racecheck) and the loss / rollout / step benchmarks, each
# under a time limit, and writes one results JSON per suite plus summary.md into OUT.
#
#   bash tools/gpu_suite.sh OUT                                  # everything
#   bash tools/gpu_suite.sh OUT --parts build,tests,sync,sanitizer
#   bash tools/gpu_suite.sh OUT --parts build,loss,rollout,step
#
# Exit code: 1 when a validation step (build, tests, sync, sanitizer) fails, 0 otherwise
# (a failing benchmark is recorded, not fatal); without CUDA it prints
# "no CUDA: nothing to validate" and exits 0. Details: tools/gpu_suite.py.
set -u
if [ "$#" -lt 1 ]; then
  echo "usage: bash tools/gpu_suite.sh OUT [--parts a,b,...] [--budget SECONDS]" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHON="$PY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m tools.gpu_suite "$@"
