#!/usr/bin/env bash
# Run the stock SGLang server on CPU: launch/serve_cpu.sh --model-path PATH [sglang args...]
# The same as the installed `minedraft-sglang-cpu` command (minedraft_sglang/cpu/server.py, which
# holds the CPU flags and environment and says why each is there). Our flags come first and yours
# are appended, so any of them can be overridden (SGLang's argparse keeps the last value given).
# With --tp/--dp/--pp above 1 it shares this process's cores among the ranks
# (SGLANG_CPU_OMP_THREADS_BIND) unless you set that variable.
# Interpreter: $PYTHON, else the repo's .venv, else python.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python; fi
fi
exec "$PYTHON" -m minedraft_sglang.cpu.server "$@"
