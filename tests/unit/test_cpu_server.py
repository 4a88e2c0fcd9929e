"""``minedraft-sglang-cpu``'s environment and command line (the server itself
runs in tests/server/test_cpu_server_command.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from minedraft_sglang import cpu_server


def test_environment_puts_the_kernel_shim_first_and_keeps_the_callers_paths():
    env = cpu_server.cpu_environ({"PYTHONPATH": "/a:/b", "OMP_NUM_THREADS": "4"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(cpu_server.SHIM_DIR), "/a", "/b"]
    assert (cpu_server.SHIM_DIR / "common_ops.py").is_file()
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "4"  # the caller's choice stands
    assert cpu_server.cpu_environ({})["OMP_NUM_THREADS"] == "1"
    # Idempotent: a second pass adds nothing.
    assert cpu_server.cpu_environ(env)["PYTHONPATH"] == env["PYTHONPATH"]


def test_cpu_flags_come_before_the_callers_so_the_caller_wins():
    cmd = cpu_server.server_command(["--model-path", "m", "--mem-fraction-static", "0.5"], python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    assert cmd[-4:] == ["--model-path", "m", "--mem-fraction-static", "0.5"]
    assert cmd.index("--device") < cmd.index("--model-path")


def test_print_env_is_what_cpu_env_sh_evaluates():
    shell = (
        f'eval "$({sys.executable} -m minedraft_sglang.cpu_server --print-env)"; '
        "echo $SGLANG_USE_CPU_ENGINE $OMP_NUM_THREADS; echo $PYTHONPATH"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, check=True).stdout
    flags, path = out.splitlines()
    assert flags == "1 1"
    assert path.split(os.pathsep)[0] == str(cpu_server.SHIM_DIR)
