"""Bad MINEDRAFT input fails at startup with one clear line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from minedraft_sglang import tiny_models
from minedraft_sglang.launcher import SERVE_CPU

CASES = {
    "unknown mode": (["--minedraft-mode", "fast"], "--minedraft-mode"),
    "missing draft device": (["--minedraft-draft-device", "cuda:3"], "--minedraft-draft-device 'cuda:3': no such device"),
    "vocab mismatch": (["@mismatch"], "has vocabulary size 1088"),
    "missing draft path": (["--speculative-draft-model-path", "/nonexistent/draft"], "no such directory"),
    "tree drafts": (["--speculative-eagle-topk", "2"], "--speculative-eagle-topk must be 1"),
}


def _launch(extra: list[str]) -> subprocess.CompletedProcess:
    target = str(tiny_models.model_path("target"))
    draft = str(tiny_models.model_path("draft"))
    if extra == ["@mismatch"]:
        extra = ["--speculative-draft-model-path", str(tiny_models.model_path("mismatch-vocab"))]
    args = ["--model-path", target, "--speculative-algorithm", "MINEDRAFT",
            "--speculative-draft-model-path", draft, *extra, "--port", "1"]
    return subprocess.run(
        ["bash", str(SERVE_CPU), *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.fixture(scope="module")
def results():
    with ThreadPoolExecutor(len(CASES)) as ex:
        futures = {name: ex.submit(_launch, extra) for name, (extra, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_startup_error_is_one_clear_line(results, name):
    proc = results[name]
    expected = CASES[name][1]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-3000:]
