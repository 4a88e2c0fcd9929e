#!/usr/bin/env bash
# Issue 21's GPU smoke checks, one command on one lent GPU (no SGLang needed:
# torch, transformers and flashinfer-python), one line per check, a few minutes:
#   launch/gpu_smoke.sh               # PASS|FAIL|SKIP name (seconds): detail, then a total line
#   launch/gpu_smoke.sh --cpu-smoke   # the part that runs on CPU (what CI runs)
# Exit status: 0 nothing failed, 1 a check failed, 2 no GPU. docs/gpu.md, "Smoke checks".
# Interpreter: $PYTHON, else the repo's .venv, else python3. The repository goes
# on PYTHONPATH, so the package need not be installed. The first run compiles
# FlashInfer's kernels (JIT, cached in ~/.cache/flashinfer; needs nvcc).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_SMOKE_TIMEOUT:-480}" "$PYTHON" -m minedraft_sglang.lab.gpu_smoke "$@"
