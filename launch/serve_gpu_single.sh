#!/usr/bin/env bash
# MINEDRAFT server on one GPU: target and drafter both on GPU 0, the drafter on
# its own CUDA stream so its kernels run beside the target's verify.
#   launch/serve_gpu_single.sh [sglang args...]
# Environment (defaults in brackets):
#   TARGET, DRAFT, K, MODE, HOST, PORT, PYTHON   as in launch/serve_gpu_two.sh
#   DRAFT_MAX_LEN  --minedraft-draft-max-len, tokens per request in the drafter's KV cache [4096]
#   MEM_FRACTION   --mem-fraction-static [computed: the drafter's weights and its
#                  largest KV cache (256 requests x DRAFT_MAX_LEN tokens) live on
#                  this GPU outside SGLang's pool, so the target's share shrinks
#                  by that much; `python -m minedraft_sglang.devices --help`]
# Arguments come last and override the flags above (SGLang keeps the last value);
# set DRAFT_MAX_LEN rather than passing --minedraft-draft-max-len, so that the
# memory estimate follows it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
models="${MINEDRAFT_CACHE_DIR:-$HOME/.cache/minedraft_sglang/real-models}"
TARGET="${TARGET:-$models/qwen2.5-coder-1.5b}"
DRAFT="${DRAFT:-$models/qwen2.5-coder-0.5b}"
K="${K:-4}"
DRAFT_MAX_LEN="${DRAFT_MAX_LEN:-4096}"
if [ -z "${MEM_FRACTION:-}" ]; then
    MEM_FRACTION="$("$PYTHON" -m minedraft_sglang.devices --draft-model-path "$DRAFT" --gpu 0 \
        --max-len "$DRAFT_MAX_LEN")"
fi

exec "$PYTHON" -m sglang.launch_server \
    --model-path "$TARGET" \
    --speculative-algorithm MINEDRAFT \
    --speculative-draft-model-path "$DRAFT" \
    --speculative-num-steps "$K" \
    --minedraft-mode "${MODE:-psd}" \
    --minedraft-draft-device cuda:0 \
    --minedraft-draft-max-len "$DRAFT_MAX_LEN" \
    --attention-backend flashinfer \
    --mem-fraction-static "$MEM_FRACTION" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-30000}" \
    "$@"
