#!/usr/bin/env bash
# MINEDRAFT server on two GPUs: the target on GPU 0 with FlashInfer attention,
# the drafter on GPU 1 drafting one sub-batch while the target verifies the other.
#   launch/serve_gpu_two.sh [sglang args...]
# Environment (defaults in brackets):
#   TARGET        target model folder [the Qwen2.5-Coder 1.5B from `python -m minedraft_sglang.lab.real_models`]
#   DRAFT         draft model folder  [the Qwen2.5-Coder 0.5B, same place]
#   K             drafts per request, --speculative-num-steps [4]
#   MODE          --minedraft-mode psd|auto|sequential [psd]
#   DRAFT_DEVICE  --minedraft-draft-device [cuda:1]
#   MEM_FRACTION  --mem-fraction-static [0.85: GPU 0 holds only the target; the
#                 rest is its activation and CUDA-graph headroom]
#   HOST, PORT    [127.0.0.1, 30000]
#   PYTHON        [the repo's .venv, else python3]
# GPUs are the first two visible ones: CUDA_VISIBLE_DEVICES=2,3 picks others.
# Arguments come last, so any flag above can also be overridden on the command
# line (SGLang's argparse keeps the last value), e.g.
#   launch/serve_gpu_two.sh --max-running-requests 64 --minedraft-tetris
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
models="${MINEDRAFT_CACHE_DIR:-$HOME/.cache/minedraft_sglang/real-models}"
TARGET="${TARGET:-$models/qwen2.5-coder-1.5b}"
DRAFT="${DRAFT:-$models/qwen2.5-coder-0.5b}"
K="${K:-4}"

exec "$PYTHON" -m sglang.launch_server \
    --model-path "$TARGET" \
    --speculative-algorithm MINEDRAFT \
    --speculative-draft-model-path "$DRAFT" \
    --speculative-num-steps "$K" \
    --minedraft-mode "${MODE:-psd}" \
    --minedraft-draft-device "${DRAFT_DEVICE:-cuda:1}" \
    --attention-backend flashinfer \
    --mem-fraction-static "${MEM_FRACTION:-0.85}" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \
    "$@"
