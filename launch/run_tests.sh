#!/usr/bin/env bash
# Set up, check format and lint (ruff, configured in pyproject.toml), then run the whole test suite
# (real SGLang servers on CPU). Arguments go to pytest, e.g. `launch/run_tests.sh tests/unit`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
source launch/cpu_env.sh
.venv/bin/ruff format --check --quiet .
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -ra "$@"
