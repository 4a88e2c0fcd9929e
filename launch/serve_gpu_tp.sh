#!/usr/bin/env bash
# MINEDRAFT server with a tensor-parallel target, the paper's layout: the target
# on GPUs 0..N-1 (--tp N), the drafter on GPU N. TP rank 0 owns the drafter,
# decides every step and sends the other ranks what to verify (docs/gpu.md,
# "Tensor parallelism").
#   launch/serve_gpu_tp.sh [sglang args...]
# It is launch/serve_gpu_two.sh with --tp N and DRAFT_DEVICE=cuda:N.
# Environment (defaults in brackets):
#   TP            N, the target's GPUs [the visible GPUs but one]
#   DRAFT_DEVICE  --minedraft-draft-device [cuda:N]
#   TARGET, DRAFT, K, MODE, MEM_FRACTION, HOST, PORT, PYTHON   as in launch/serve_gpu_two.sh
# GPUs are the first N+1 visible ones: CUDA_VISIBLE_DEVICES=3,4,5 picks others.
# Arguments come last and override the flags above (SGLang keeps the last value).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${TP:-}" ]; then
    gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
    if [ "$gpus" -lt 2 ]; then
        echo "error: $gpus CUDA device(s) visible; a TP target beside its drafter needs at least 2 (or set TP)" >&2
        exit 1
    fi
    TP=$((gpus - 1))
fi
export PYTHON DRAFT_DEVICE="${DRAFT_DEVICE:-cuda:$TP}"
exec bash "$here/serve_gpu_two.sh" --tp "$TP" "$@"
