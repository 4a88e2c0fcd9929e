"""``minedraft-sglang-cpu``'s environment and command line (the server itself
runs in tests/server/test_cpu_server_command.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minedraft_sglang.cpu import server as cpu_server


def test_environment_puts_the_kernel_shim_first_and_keeps_the_callers_paths():
    env = cpu_server.cpu_environ({"PYTHONPATH": "/a:/b", "OMP_NUM_THREADS": "4"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(cpu_server.SHIM_DIR), "/a", "/b"]
    assert (cpu_server.SHIM_DIR / "common_ops.py").is_file()
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "4"  # the caller's choice stands
    # Otherwise one thread per allowed core, shared among the scheduler ranks.
    cores = len(os.sched_getaffinity(0))
    assert cpu_server.cpu_environ({})["OMP_NUM_THREADS"] == str(cores)
    assert cpu_server.cpu_environ({}, ["--tp", "2"])["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    # Idempotent: a second pass adds nothing.
    assert cpu_server.cpu_environ(env)["PYTHONPATH"] == env["PYTHONPATH"]


def test_cpu_flags_come_before_the_callers_so_the_caller_wins():
    cmd = cpu_server.server_command(["--model-path", "m", "--mem-fraction-static", "0.5"], python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    assert cmd[-4:] == ["--model-path", "m", "--mem-fraction-static", "0.5"]
    assert cmd.index("--device") < cmd.index("--model-path")


def test_print_env_is_what_cpu_env_sh_evaluates():
    shell = (
        f'eval "$({sys.executable} -m minedraft_sglang.cpu.server --print-env)"; '
        "echo $SGLANG_USE_CPU_ENGINE $OMP_NUM_THREADS; echo $PYTHONPATH"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS")}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, check=True).stdout
    flags, path = out.splitlines()
    assert flags == f"1 {len(os.sched_getaffinity(0))}"
    assert path.split(os.pathsep)[0] == str(cpu_server.SHIM_DIR)


@pytest.mark.parametrize(
    "args,ranks",
    [
        ([], 1),
        (["--tp", "2"], 2),
        (["--tp-size=4", "--model-path", "m"], 4),
        (["--tensor-parallel-size", "2", "--dp", "3"], 6),
        (["--tp", "2", "--pp-size", "2", "--tp", "3"], 6),  # the last value wins, as in argparse
        (["--pipeline-parallel-size=2", "--data-parallel-size", "2"], 4),
    ],
)
def test_num_ranks_reads_sglangs_parallel_flags(args, ranks):
    assert cpu_server.num_ranks(args) == ranks


def test_threads_bind_shares_out_the_cores():
    assert cpu_server.threads_bind(2, [0, 1]) == "0|1"
    assert cpu_server.threads_bind(2, [5, 4, 7, 6]) == "4,5|6,7"
    assert cpu_server.threads_bind(3, [0, 1, 2, 3, 4]) == "0|1,2|3,4"
    # Fewer cores than ranks: they take turns.
    assert cpu_server.threads_bind(3, [2, 3]) == "2|3|2"


def test_environment_binds_threads_for_several_ranks_unless_the_caller_did():
    env = cpu_server.cpu_environ({}, ["--model-path", "m", "--tp", "2"])
    assert env[cpu_server.BIND_VAR] == cpu_server.threads_bind(2, os.sched_getaffinity(0))
    assert cpu_server.BIND_VAR not in cpu_server.cpu_environ({}, ["--model-path", "m"])
    mine = cpu_server.cpu_environ({cpu_server.BIND_VAR: "0-3|4-7"}, ["--tp", "2"])
    assert mine[cpu_server.BIND_VAR] == "0-3|4-7"
