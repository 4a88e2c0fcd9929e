"""The installed ``minedraft-sglang-cpu`` command serves a MINEDRAFT request
from a bare environment: no sourced launch/cpu_env.sh, no PYTHONPATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args

pytestmark = pytest.mark.server

# What launch/cpu_env.sh or the command itself sets: the test removes them all.
SETUP_VARS = ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")


def test_console_command_serves_without_the_env_script(tmp_path):
    command = Path(sys.executable).parent / "minedraft-sglang-cpu"
    assert command.is_file(), "not installed: pip install -e ."
    bare = {k: v for k, v in os.environ.items() if k not in SETUP_VARS}
    args = minedraft_args(str(tiny_models.model_path("bigram")), str(tiny_models.model_path("bigram-draft")), "psd")
    with Server(args, tmp_path / "server.log", command=[str(command)], base_env=bare) as server:
        out = server.generate("the farmer", 8)
        info = requests.get(server.url + "/server_info", timeout=30).json()
    assert out["meta_info"]["completion_tokens"] == 8
    assert out["meta_info"]["spec_verify_ct"] >= 1
    assert info["internal_states"][0]["minedraft"]["mode"] == "psd"
