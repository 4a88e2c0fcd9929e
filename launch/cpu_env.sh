# Source this file (bash) to run the stock SGLang command on a CPU-only machine:
#   source launch/cpu_env.sh && python -m sglang.launch_server --device cpu ...
# It exports what `minedraft-sglang-cpu` (minedraft_sglang/cpu/server.py) sets up itself:
# SGLANG_USE_CPU_ENGINE=1, OMP_NUM_THREADS (one thread per core this shell may use), HF_HUB_OFFLINE=1
# and our sgl_kernel CPU ops on PYTHONPATH. Interpreter: $PYTHON, else the repo's .venv, else python.
# It cannot know your --tp: for N > 1 ranks on one NUMA node also export each rank's share, e.g.
# OMP_NUM_THREADS=1 SGLANG_CPU_OMP_THREADS_BIND="0|1" for --tp 2 on 2 cores (minedraft-sglang-cpu and
# serve_cpu.sh set both themselves).
_minedraft_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then _minedraft_py="$PYTHON"
elif [ -x "$_minedraft_repo/.venv/bin/python" ]; then _minedraft_py="$_minedraft_repo/.venv/bin/python"
else _minedraft_py=python; fi
eval "$("$_minedraft_py" -m minedraft_sglang.cpu.server --print-env)"
unset _minedraft_repo _minedraft_py
