"""MINEDRAFT with a tensor-parallel target (``--tp 2``, one CPU core per rank): the drafter lives on TP rank 0,
which decides every step and sends the other rank what to verify (``tp_sync.py``).

Greedy output is token-identical to the plain ``--tp 1`` server in psd and sequential modes; sampled output
passes the chi-square test of ``test_sampling.py``. Before the exchange each rank drafted and planned on its
own: ranks that verify different drafts meet in the forward's all-reduce with different shapes or rows.
"""

from __future__ import annotations

import pytest
import requests
from conftest import K
from test_sampling import PROMPT, TEMPERATURE, TOP_K, _p_value, _sample, exact  # noqa: F401 - exact is a fixture
from test_server import _check_greedy_identical

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import minedraft_args

pytestmark = pytest.mark.server

TP = ["--tp", "2"]


@pytest.fixture(scope="module")
def servers(pool):
    target, draft = (str(tiny_models.model_path(name)) for name in ("target", "draft"))
    # The target drafting for itself: most drafts accepted (and, sampled, both acceptance branches taken);
    # the unrelated draft: most rejected.
    pool.register("psd-self-tp2", minedraft_args(target, target, "psd", K, TP))
    pool.register("seq-tp2", minedraft_args(target, draft, "sequential", K, TP))
    return pool


def _minedraft_state(server) -> dict:
    info = requests.get(server.url + "/server_info", timeout=30).json()
    return info["internal_states"][0]["minedraft"]


def _check_runs_on_two_ranks(pool, name: str) -> None:
    log = pool.log_text(name).splitlines()
    assert any("TP1]" in line and "TP rank 1 verifies what TP rank 0 decides" in line for line in log)
    kv_lines = [line for line in log if "MineDraft: drafter KV cache" in line]
    assert kv_lines and all("TP0]" in line for line in kv_lines), "a drafter outside TP rank 0"


@pytest.mark.parametrize("name, mode", [("psd-self-tp2", "psd"), ("seq-tp2", "sequential")])
def test_tp2_greedy_identical_to_plain_tp1(servers, name, mode):
    server = servers.get(name)
    _check_greedy_identical(servers.get("plain-target"), server)
    _check_runs_on_two_ranks(servers, name)
    steps = _minedraft_state(server)["steps"]
    assert steps.get(mode, 0) > 0, steps


def test_tp2_sampling_matches_target_distribution(servers, exact):  # noqa: F811 - the fixture
    server = servers.get("psd-self-tp2")
    p = _p_value(_sample(server), exact)
    assert p > 1e-3, p
    # The drafts were really put to the test: some accepted, some rejected.
    meta = server.generate([PROMPT] * 50, 8, sampling={"temperature": TEMPERATURE, "top_k": TOP_K})
    accept = [m["meta_info"]["spec_accept_length"] for m in meta]
    assert 1.05 < sum(accept) / len(accept) < 3.9
    assert _minedraft_state(server)["steps"].get("psd", 0) > 0
