#!/usr/bin/env bash
# Run the stock SGLang server on CPU: launch/serve_cpu.sh --model-path PATH [sglang args...]
# Our flags come first and yours are appended, so any of them can be overridden
# (SGLang's argparse keeps the last value given). Interpreter: $PYTHON or python.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"

# - torch_native serves plain prefill/decode, but speculative decoding needs the
#   intel_amx backend's draft/verify support; asking for intel_amx via
#   --attention-backend is rewritten to torch_native without AMX, the split
#   prefill/decode flags are not.
# - CUDA graphs on CPU mean a torch.compile graph runner that rejects speculative
#   decoding; the per-phase flags (not the deprecated --disable-cuda-graph)
#   keep that overridable.
# - The memory flags keep the KV pool small on a 24 GiB machine.
# - --sleep-on-idle: an idle scheduler otherwise polls at full speed, and on a
#   2-core machine two idle servers take a core away from a busy one.
exec "${PYTHON:-python}" -m sglang.launch_server \
    --device cpu \
    --attention-backend torch_native \
    --prefill-attention-backend intel_amx \
    --decode-attention-backend intel_amx \
    --mem-fraction-static 0.1 \
    --max-total-tokens 16384 \
    --cuda-graph-backend-decode disabled \
    --cuda-graph-backend-prefill disabled \
    --sleep-on-idle \
    "$@"
