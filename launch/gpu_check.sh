#!/usr/bin/env bash
# GPU check, one command, under 10 minutes on one H100, no network:
#   launch/gpu_check.sh [--out FILE.json] [--target 8b] [--draft 1b] [--batch 32] [--k 4] [--ctx 1024] [--iters 20]
#   launch/gpu_check.sh --cpu-smoke          # the same code paths on CPU with tiny shapes (what CI runs)
# It checks FlashInfer's chain-verify attention and our acceptance functions on
# the GPU against plain references, then times one PSD step against one SD step
# on random-weight Llama shapes (8B target, 1B draft, bf16 by default; with two
# GPUs visible also with the drafter on the second). Shapes: NAME or
# NAME:field=value,... e.g. --target 8b:layers=16. All flags: --help.
# Exit status: 0 passed, 1 a check or the benchmark failed, 2 no GPU.
# Needs only torch, triton and flashinfer-python, not SGLang: the repository is
# put on PYTHONPATH, so this works without installing the package.
# Interpreter: $PYTHON, else the repo's .venv, else python3.
# The first run compiles FlashInfer's kernels (JIT, cached in ~/.cache/flashinfer).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m minedraft_sglang.lab.gpu_check "$@"
