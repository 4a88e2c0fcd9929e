#!/usr/bin/env bash
# Set up, then serve one request through a MINEDRAFT server on CPU (tiny models).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
source launch/cpu_env.sh
exec .venv/bin/python -m minedraft_sglang.lab.quickstart "$@"
