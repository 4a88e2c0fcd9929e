"""The installed ``minedraft-sglang-cpu`` command serves a MINEDRAFT request
from a bare environment: no sourced launch/cpu_env.sh, no PYTHONPATH."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import free_port, minedraft_args

pytestmark = pytest.mark.server

# What launch/cpu_env.sh or the command itself sets: the test removes them all.
SETUP_VARS = ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")


def test_console_command_serves_without_the_env_script(tmp_path):
    command = Path(sys.executable).parent / "minedraft-sglang-cpu"
    assert command.is_file(), "not installed: pip install -e ."
    env = {k: v for k, v in os.environ.items() if k not in SETUP_VARS}
    port = free_port()
    args = minedraft_args(str(tiny_models.model_path("bigram")), str(tiny_models.model_path("bigram-draft")), "psd")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(command), *args, "--dtype", "float32", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(url + "/health_generate", timeout=30).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        out = requests.post(
            url + "/generate",
            json={"text": "the farmer", "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
            timeout=300,
        ).json()
        assert out["meta_info"]["completion_tokens"] == 8
        assert out["meta_info"]["spec_verify_ct"] >= 1
        info = requests.get(url + "/server_info", timeout=30).json()
        assert info["internal_states"][0]["minedraft"]["mode"] == "psd"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
