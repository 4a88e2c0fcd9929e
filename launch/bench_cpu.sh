#!/usr/bin/env bash
# Side-by-side benchmark on CPU: plain, STANDALONE, sequential SD, PSD; same models and prompts.
#   launch/bench_cpu.sh [--quick] [--pair tiny|tiny-agree] [--variants tetris] [--out FILE.json] [...]
# (all flags: launch/bench_cpu.sh --help). Interpreter: $PYTHON, else the repo's .venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/launch/cpu_env.sh"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
exec "$PYTHON" -m minedraft_sglang.lab.bench "$@"
