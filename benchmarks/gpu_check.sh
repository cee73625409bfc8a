#!/usr/bin/env bash
# The prepared GPU check of issue 27: one markdown table, at most 8 minutes on
# one H100 or H200 (benchmarks/gpu_check.py says what each row measures).
#
#   benchmarks/gpu_check.sh [--out FILE]     # on the GPU machine; default ./gpu_check.md
#   benchmarks/gpu_check.sh --cpu [--out F]  # smoke mode: tiny shapes on the CPU, the same
#                                            # code paths (tests/benchmarks_test.py runs it)
#
# The whole run is cut at GPU_CHECK_LIMIT_S seconds (default 470): the table
# keeps the rows written by then. XLA_PYTHON_CLIENT_MEM_FRACTION defaults to
# 0.92 here (JAX's own default, 0.75, leaves 20 GB of an 80 GB card unused;
# the train-step row compares its compiled bytes with what JAX may allocate).
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${GPU_CHECK_LIMIT_S:-470}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
if [[ " $* " == *" --cpu "* ]]; then
  export JAX_PLATFORMS=cpu
fi
python="${PYTHON:-python}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then
  python=.venv/bin/python
fi
start=$(date +%s)
status=0
timeout --signal=INT --kill-after=20 "$limit" "$python" benchmarks/gpu_check.py "$@" || status=$?
echo "gpu_check: $(( $(date +%s) - start )) s, exit status $status" >&2
exit "$status"
