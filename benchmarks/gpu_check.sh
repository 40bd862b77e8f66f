#!/usr/bin/env bash
# GPU check: portres's forward and gradient parity and ResNet-50 speed on an NVIDIA GPU, in 10 minutes,
# offline (wheels carried in .whl/, see `make gpu-wheels`). The steps are in benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU (make gpu-check)
#   bash benchmarks/gpu_check.sh --dry-run    # what it would install and run
#   bash benchmarks/gpu_check.sh --sim        # the same steps on the CPU, small
#
# PYTHON: the interpreter whose torch (with CUDA) the check uses (default python3).
# GPU_CHECK_TIMEOUT_S: the hard stop for everything (default 600); the script plans within 30 s less.
set -u
cd "$(dirname "$0")/.."
limit=${GPU_CHECK_TIMEOUT_S:-600}
export GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-$((limit > 60 ? limit - 30 : limit))}
# SIGTERM at the limit: the script stops the check in flight, prints its summary and exits with its own status
python=${PYTHON:-python3}
unset PYTHON  # tinygrad reads PYTHON as its own switch (its Python emulator device), an integer
exec timeout --preserve-status --kill-after=20 "$limit" "$python" -u benchmarks/gpu_check.py "$@"
