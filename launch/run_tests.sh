#!/usr/bin/env bash
# Set up, then run the whole test suite (real SGLang servers on CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
source launch/cpu_env.sh
exec .venv/bin/python -m pytest -ra "$@"
