# Source this file (bash) to run the stock SGLang server on a CPU-only machine:
#   source launch/cpu_env.sh && python -m sglang.launch_server --device cpu ...
# (launch/serve_cpu.sh does that with the flags CPU serving needs.)

# SGLang's CPU branches (and its non-vllm rotary embedding) key on this.
export SGLANG_USE_CPU_ENGINE=1
# One OpenMP thread per process: on a 2-core machine oversubscribed threads made
# identical batches take 5-11 s instead of 0.25 s.
export OMP_NUM_THREADS=1
# Models are built locally; never reach for the hub.
export HF_HUB_OFFLINE=1

# sgl_kernel's CUDA library cannot load here; it then falls back to
# `import common_ops`, which this directory provides (pure-torch CPU ops).
_minedraft_shim="$(cd "$(dirname "${BASH_SOURCE[0]}")/../minedraft_sglang/cpu_kernels/shim" && pwd)"
case ":${PYTHONPATH:-}:" in
    *":${_minedraft_shim}:"*) ;;
    *) export PYTHONPATH="${_minedraft_shim}${PYTHONPATH:+:${PYTHONPATH}}" ;;
esac
unset _minedraft_shim
