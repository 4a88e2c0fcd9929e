#!/usr/bin/env bash
# MINEDRAFT server on one GPU: target and drafter both on GPU 0, the drafter on
# its own CUDA stream so its kernels run beside the target's verify.
#   launch/serve_gpu_single.sh [sglang args...]
# It is launch/serve_gpu_two.sh with DRAFT_DEVICE=cuda:0 and the target's memory
# share cut for the drafter. Environment (defaults in brackets):
#   TARGET, DRAFT, K, MODE, HOST, PORT, PYTHON   as in launch/serve_gpu_two.sh
#   DRAFT_MAX_LEN  --minedraft-draft-max-len, tokens per request in the drafter's KV cache [4096]
#   MEM_FRACTION   --mem-fraction-static [computed: the drafter's KV cache (256
#                  requests x DRAFT_MAX_LEN tokens, allocated at startup) lives on
#                  this GPU outside SGLang's pool, so the target's share shrinks
#                  by that much (its weights SGLang counts itself);
#                  `python -m minedraft_sglang.devices --help`]
# Arguments come last and override the flags above (SGLang keeps the last value);
# set DRAFT_MAX_LEN rather than passing --minedraft-draft-max-len, so that the
# memory estimate follows it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then PYTHON="$here/../.venv/bin/python"; else PYTHON=python3; fi
fi
DRAFT="${DRAFT:-${MINEDRAFT_CACHE_DIR:-$HOME/.cache/minedraft_sglang/real-models}/qwen2.5-coder-0.5b}"
DRAFT_MAX_LEN="${DRAFT_MAX_LEN:-4096}"
if [ -z "${MEM_FRACTION:-}" ]; then
    MEM_FRACTION="$("$PYTHON" -m minedraft_sglang.devices --draft-model-path "$DRAFT" --gpu 0 --max-len "$DRAFT_MAX_LEN")"
fi
export PYTHON DRAFT MEM_FRACTION DRAFT_DEVICE=cuda:0
exec bash "$here/serve_gpu_two.sh" --minedraft-draft-max-len "$DRAFT_MAX_LEN" "$@"
