#!/usr/bin/env bash
# Set up, check format and lint (ruff, configured in pyproject.toml), then run the whole test suite
# (real SGLang servers on CPU). Arguments go to pytest, e.g. `launch/run_tests.sh tests/unit`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
source launch/cpu_env.sh
# One OpenMP thread per plain test server: the suite keeps up to three servers
# alive and drives two at once, and more busy threads than cores is ruinous.
# (A MINEDRAFT server's worker sets its own thread counts, from its cores.)
export OMP_NUM_THREADS=1
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
