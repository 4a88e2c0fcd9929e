"""The side-by-side benchmark runs end to end (three real servers, started
together to save time, measured one at a time) and reports every field with a
sane value. No timing thresholds: this machine's timings are noise; the numbers
are checked for shape, not speed."""

from __future__ import annotations

import json
import subprocess

import pytest

from minedraft_sglang.launcher import REPO

pytestmark = pytest.mark.server

RUNS = ["plain@B", "plain@2B", "seq@B", "seq@2B", "psd@2B"]
B, N, TOKENS, K = 2, 6, 12, 3


def test_bench_quick_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "bench_cpu.sh"), "--quick", "-b", str(B), "-n", str(N),
         "--max-new-tokens", str(TOKENS), "-k", str(K), "--parallel-startup", "--out", str(out)],
        capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy outputs identical" in proc.stdout
    report = json.loads(out.read_text())

    env = report["env"]
    assert (env["k"], env["B"], env["N"], env["max_new_tokens"]) == (K, B, N, TOKENS)
    for key in ("date", "cpu_count", "torch", "sglang", "target", "draft"):
        assert env[key], key

    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == RUNS
    for name, r in runs.items():
        assert r["completion_tokens"] == N * TOKENS, name  # ignore_eos
        assert r["throughput_tok_s"] > 0 and r["tpot_ms"] > 0 and r["makespan_per_request_ms"] > 0, name
        assert r["concurrency"] == (2 * B if name.endswith("2B") else B)
        if r["engine"] == "plain":
            assert r["accept_length"] is None and r["overlap"] is None
            continue
        assert 1 <= r["accept_length"] <= K + 1, name
        assert r["steps"] > 0, name
        assert r["t_draft_step_ms"] > 0 and r["t_verify_ms"] > 0 and r["t_step_ms"] > 0, name
        assert 0 <= r["overlap"] <= 1, name
    assert runs["seq@B"]["overlap"] == runs["seq@2B"]["overlap"] == 0
    # PSD's sub-batch is B: each step verifies one half of the 2B running requests.
    assert runs["psd@2B"]["mean_verify_bs"] <= B
    assert runs["seq@2B"]["mean_verify_bs"] > runs["seq@B"]["mean_verify_bs"]

    summary = report["summary"]
    assert summary["outputs_identical"] is True and not summary["mismatched_prompts"]
    assert 1 <= summary["ideal_psd_speedup"] <= 2
    for key in ("psd_over_seq_same_sub_batch", "psd_over_seq_same_concurrency",
                "psd_over_plain_same_concurrency", "seq_over_plain_same_concurrency"):
        assert summary[key] > 0, key
