"""``minedraft-sglang-cpu``: the stock SGLang server on a CPU-only machine.

    minedraft-sglang-cpu --model-path PATH [sglang.launch_server args...]
    python -m minedraft_sglang.cpu.server ...                  (the same)
    python -m minedraft_sglang.cpu.server --print-env          (shell exports, for the stock command)

It runs ``python -m sglang.launch_server`` with the CPU flags below first and
the caller's arguments after them (SGLang's argparse keeps the last value, so
each can be overridden), in an environment set up *before* Python starts:
SGLang decides "CPU or not" once, while its first modules import, and the
``sgl_kernel`` fallback module must be importable in every process it spawns.
The plugin runs too late for either (``docs/design.md``, "CPU serving").
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# sgl_kernel's CUDA library cannot load without a GPU; it then falls back to
# `import common_ops`, which this folder provides (cpu/kernels/ops.py).
SHIM_DIR = Path(__file__).resolve().parent / "kernels" / "shim"

CPU_ENV = {
    # SGLang's CPU branches (and its non-vllm rotary embedding) key on this.
    "SGLANG_USE_CPU_ENGINE": "1",
    # Models are local folders; never reach for the hub.
    "HF_HUB_OFFLINE": "1",
}
# Also set (see cpu_environ): OMP_NUM_THREADS, one OpenMP thread per core
# each scheduler rank may use. More runnable threads than cores is ruinous
# (several 2-thread servers on 2 cores: identical batches took 5-11 s instead
# of 0.25 s), fewer leaves cores idle (plain decoding of the real 1.5B on 2
# cores: 1.68x faster than on 1 thread). A MINEDRAFT worker with a CPU drafter
# sets its two sides' thread counts itself, step by step (cpu/affinity.py).

# - torch_native serves plain prefill/decode, but speculative decoding needs
#   the intel_amx backend's draft/verify support; asking for intel_amx via
#   --attention-backend is rewritten to torch_native without AMX, the split
#   prefill/decode flags are not.
# - CUDA graphs on CPU mean a torch.compile graph runner that rejects
#   speculative decoding; the per-phase flags (not the deprecated
#   --disable-cuda-graph) keep that overridable.
# - The memory flags keep the KV pool small on a 24 GiB machine.
# - --sleep-on-idle: an idle scheduler otherwise polls at full speed, and on a
#   2-core machine two idle servers take a core away from a busy one.
CPU_FLAGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--prefill-attention-backend", "intel_amx",
    "--decode-attention-backend", "intel_amx",
    "--mem-fraction-static", "0.1",
    "--max-total-tokens", "16384",
    "--cuda-graph-backend-decode", "disabled",
    "--cuda-graph-backend-prefill", "disabled",
    "--sleep-on-idle",
)  # fmt: skip


# SGLang's flags whose product is the number of scheduler ranks, with the
# spellings its argparse accepts (aliases and unique abbreviations).
RANK_FLAGS = {
    "--tp-size": "tp",
    "--tp": "tp",
    "--tensor-parallel-size": "tp",
    "--dp-size": "dp",
    "--dp": "dp",
    "--data-parallel-size": "dp",
    "--pp-size": "pp",
    "--pipeline-parallel-size": "pp",
}

BIND_VAR = "SGLANG_CPU_OMP_THREADS_BIND"


def num_ranks(args: Sequence[str]) -> int:
    """Scheduler processes the arguments ask for (dp x tp x pp; the last value of a flag wins)."""
    sizes = {"tp": 1, "dp": 1, "pp": 1}
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in RANK_FLAGS:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            if value.isdigit():
                sizes[RANK_FLAGS[flag]] = int(value)
    return sizes["tp"] * sizes["dp"] * sizes["pp"]


def threads_bind(ranks: int, cores: Sequence[int]) -> str:
    """A value for SGLANG_CPU_OMP_THREADS_BIND: the cores split into ``ranks``
    contiguous groups, or, with fewer cores than ranks, one core each in turn."""
    cores = sorted(cores)
    if ranks > len(cores):
        return "|".join(str(cores[r % len(cores)]) for r in range(ranks))
    bounds = [len(cores) * r // ranks for r in range(ranks + 1)]
    return "|".join(",".join(map(str, cores[lo:hi])) for lo, hi in zip(bounds, bounds[1:]))


def cpu_environ(env: Mapping[str, str], args: Sequence[str] = ()) -> dict[str, str]:
    """``env`` with CPU serving set up for the server arguments ``args``: by
    default every core this process may use works, one OpenMP thread per
    core, shared among the scheduler ranks (an OMP_NUM_THREADS or thread
    binding of the caller's is kept)."""
    out = {**env, "SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")}
    cores = os.sched_getaffinity(0)
    ranks = num_ranks(args)
    out.setdefault("OMP_NUM_THREADS", str(max(1, len(cores) // ranks)))
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SHIM_DIR) not in paths:
        out["PYTHONPATH"] = os.pathsep.join([str(SHIM_DIR), *paths])
    if ranks > 1 and not out.get(BIND_VAR):
        # Without a binding SGLang gives each rank a NUMA node and refuses more
        # ranks than nodes; the cores this process may use are
        # shared out instead.
        out[BIND_VAR] = threads_bind(ranks, cores)
    return out


def server_command(args: Sequence[str], python: str = sys.executable) -> list[str]:
    return [python, "-m", "sglang.launch_server", *CPU_FLAGS, *args]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    env = cpu_environ(os.environ, argv)
    if argv == ["--print-env"]:
        for name in (*CPU_ENV, "OMP_NUM_THREADS", "PYTHONPATH"):
            print(f"export {name}={shlex.quote(env[name])}")
        return
    cmd = server_command(argv)
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
