"""The benchmark: its run plan, aggregation and figures on hand-made data
(fast), and the quick mode end to end on real servers (four of them, three
started together), which must report every field with a sane value. No
timing thresholds: this machine's timings are noise; the numbers are checked
for shape, not speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from minedraft_sglang.lab import launcher
from minedraft_sglang.lab.bench import aggregate, cli, measure, plots, servers
from minedraft_sglang.lab.bench.plan import RunSpec, build_plan
from minedraft_sglang.metrics import StepMode, StepRecord

REPO = Path(__file__).resolve().parents[2]

RUNS = [
    "plain@B",
    "plain@2B",
    "plain-tp@B",
    "plain-tp@2B",
    "STANDALONE@B",
    "STANDALONE@2B",
    "seq@B",
    "seq@2B",
    "psd@2B",
]
B, N, TOKENS, K = 2, 6, 12, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plan_is_data_driven():
    runs = build_plan(2, ["tetris"], [1, 4])
    names = [s.name for s in runs]
    assert names[:10] == [*RUNS, "tetris@2B"]
    tetris = runs[9]
    assert (tetris.engine, tetris.flags, tetris.concurrency, tetris.sub_batch_size) == (
        "psd",
        ("--minedraft-tetris",),
        4,
        2,
    )
    # Concurrency 1 is new for every mode; 4 (= 2B) already exists for all of them.
    assert names[10:] == ["plain@1", "plain-tp@1", "STANDALONE@1", "seq@1", "psd@1", "tetris@1"]
    assert runs[-1].flags == ("--minedraft-tetris",)
    with pytest.raises(SystemExit):
        cli.parse_args(["--variants", "nope"])


def test_k_sweep_runs_at_2b_only_and_adaptive_expands():
    names = [s.name for s in build_plan(1, ["adaptive", "ksweep"], [4])]
    assert [n for n in names if n.startswith("psd-k")] == ["psd-k1@2B", "psd-k2@2B", "psd-k4@2B"]
    assert "adaptive@2B" in names and "adaptive@4" in names and "psd-k1@4" not in names
    ahead = [s for s in build_plan(1, ["ahead"], [4]) if s.mode == "ahead"]
    assert [(s.name, s.engine, s.flags) for s in ahead] == [("ahead@B", "auto", ("--minedraft-k", "fixed"))]
    only = [s.name for s in build_plan(1, ["adaptive", "ksweep"], [4], modes=["adaptive"])]
    assert only == ["plain@B", "plain@2B", "adaptive@2B", "plain@4", "adaptive@4"]


def test_exactness_is_enforced_in_float32_only():
    assert servers.served_dtype("") == "float32"
    assert servers.served_dtype("--mem-fraction-static 0.8 --dtype bfloat16") == "bfloat16"
    ref = [{"output_ids": [1, 2, 3, 4]}, {"output_ids": [5, 6]}]
    run = [{"replies": [{"output_ids": [1, 2, 9, 4]}, {"output_ids": [5, 6]}]}]
    assert aggregate.agreement(run, ref) == {"identical_requests": 1, "requests": 2, "mean_common_prefix": 2.0}


def test_rounds_alternate_direction():
    assert measure.order(["a", "b", "c"], 3) == [
        (0, "a"),
        (0, "b"),
        (0, "c"),
        (1, "c"),
        (1, "b"),
        (1, "a"),
        (2, "a"),
        (2, "b"),
        (2, "c"),
    ]


def _reply(ids, ttft, latency, verify_ct=None, accept=None):
    meta = {"completion_tokens": len(ids), "e2e_latency": latency}
    if verify_ct:
        meta.update(spec_verify_ct=verify_ct, spec_accept_length=accept)
    return {"output_ids": ids, "meta_info": meta, "ttft_s": ttft, "latency_s": latency}


def _step(i, mode, draft, verify, bs=2, thread="MainThread"):
    return StepRecord(
        step=i,
        pid=1,
        mode=StepMode(mode),
        draft=tuple(draft),
        verify=tuple(verify),
        verify_bs=bs,
        draft_bs=bs,
        verified_drafts=K * bs,
        k=K,
        draft_thread=thread,
        accept_lens=(2,) * bs,
    )


def test_run_record_means_over_repeats():
    spec = RunSpec("seq@B", "seq", "sequential", 2)
    # Repeat 1: 10 tokens in 1 s; requests: ttft 0.1 s, 0.1 + 4 * 0.05 s.
    one = {
        "replies": [_reply([1] * 5, 0.1, 0.3, 2, 2.5), _reply([2] * 5, 0.1, 0.3, 3, 1.0)],
        "makespan": 1.0,
        "steps": [_step(0, "sequential", (0, 0.01), (0.01, 0.03))],
    }
    two = {**one, "makespan": 0.5, "steps": [_step(0, "sequential", (0, 0.03), (0.03, 0.05))]}
    r = aggregate.run_record(spec, [one, two])
    assert r["throughput_repeats"] == [10.0, 20.0]
    assert r["throughput_tok_s"] == 15.0 and r["throughput_stdev"] == 5.0
    assert r["ttft_ms"] == pytest.approx(100) and r["tpot_ms"] == pytest.approx(50)
    # (2.5 * 2 + 1.0 * 3) / 5 verifies
    assert r["accept_length"] == pytest.approx(1.6)
    # draft 10 and 30 ms, verify 20 ms: means over repeats
    assert r["t_draft_step_ms"] == pytest.approx(20) and r["t_verify_ms"] == pytest.approx(20)
    assert r["t_step_ms"] == pytest.approx(40) and r["overlap"] == 0.0
    # 2 requests x 2 tokens in 30 ms, then in 50 ms
    assert r["in_step_tok_s"] == pytest.approx((4 / 0.03 + 4 / 0.05) / 2)
    assert r["makespan_per_request_ms"] == pytest.approx(375)


def test_ratio_per_round_pairs_each_round_with_its_own_best_baseline():
    def run(mode, tputs, c=1):
        return {
            "mode": mode,
            "concurrency": c,
            "throughput_tok_s": sum(tputs) / len(tputs),
            "throughput_repeats": tputs,
        }

    # The machine slows in round 2 for everyone: the ratio of means hides
    # that the defaults beat the best baseline in every round.
    runs = [
        run("plain", [4.0, 2.0, 3.0]),
        run("STANDALONE", [5.0, 2.5, 4.0]),
        run("adaptive", [5.5, 2.75, 4.4]),
        run("adaptive", [1.0, 1.0, 1.0], c=2),  # no baseline at its concurrency
    ]
    aggregate.add_ratios(runs)
    assert runs[2]["vs_best_baseline_rounds"] == pytest.approx([1.1, 1.1, 1.1])
    assert runs[2]["vs_best_baseline_median"] == pytest.approx(1.1)
    assert runs[1]["vs_best_baseline_rounds"] == [1.0, 1.0, 1.0]
    assert runs[0]["vs_best_baseline_median"] == pytest.approx(0.8)  # median of 0.8, 0.8, 0.75
    assert runs[3]["vs_best_baseline_rounds"] == [] and runs[3]["vs_best_baseline_median"] is None


def test_draft_prefill_is_drafting_beyond_the_median():
    # Drafts of 1, 1, 5, 1 s at one batch size: the 5 s one holds 4 s of prompt
    # prefill; a lone psd step is its own median.
    steps = [_step(i, "sequential", (0, d), (d, d + 1)) for i, d in enumerate((1, 1, 5, 1))]
    steps.append(_step(4, "psd", (0, 2), (0, 3)))
    assert aggregate.draft_prefill_seconds(steps) == pytest.approx(4.0)
    metrics = aggregate.trace_metrics(RunSpec("seq@B", "seq", "sequential", 2), steps[:4], 8)
    assert metrics["draft_prefill_ms_per_request"] == pytest.approx(500.0)
    assert metrics["t_draft_median_ms"] == pytest.approx(1000.0) and metrics["t_draft_step_ms"] == pytest.approx(2000)


def test_chrome_trace_and_timeline(tmp_path):
    seq = [_step(0, "sequential", (10.0, 10.01), (10.01, 10.03))]
    psd = [
        _step(5, "psd", (20.0, 20.01), (20.0, 20.02), thread="minedraft-drafter_0"),
        _step(6, "sequential", (20.02, 20.03), (20.03, 20.04)),
    ]
    path = tmp_path / "trace.json"
    plots.chrome_trace({"seq@B": seq, "psd@2B": psd}, path)
    events = json.loads(path.read_text())["traceEvents"]
    meta = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M"}
    assert meta[(1, 0)] == "seq@B" and meta[(2, 0)] == "psd@2B"
    assert meta[(2, 1)] == "scheduler thread (target)" and meta[(2, 2)] == "minedraft-drafter_0 (drafter)"
    spans = [(e["pid"], e["tid"], e["name"], e["ts"], e["dur"]) for e in events if e["ph"] == "X"]
    assert spans == [
        (1, 1, "verify", 10000.0, 20000.0),
        (1, 1, "draft", 0.0, 10000.0),
        (2, 1, "verify", 0.0, 20000.0),
        (2, 2, "draft", 0.0, 10000.0),
        (2, 1, "verify", 30000.0, 10000.0),
        (2, 1, "draft", 20000.0, 10000.0),
    ]
    # Read back (for --rescore): the same steps, times from the run's start.
    back = plots.read_chrome_trace(path)
    assert [s.step for s in back["psd@2B"]] == [5, 6] and back["psd@2B"][0].mode is StepMode.PSD
    assert [s.draft_thread for s in back["psd@2B"]] == ["minedraft-drafter_0", "MainThread"]
    assert back["psd@2B"][1].verify == pytest.approx((0.03, 0.04))
    assert back["psd@2B"][0].accept_lens == (2, 2) and back["psd@2B"][0].verify_bs == 2
    assert back["seq@B"][0].step_seconds == pytest.approx(0.03)
    assert plots.window(psd, 1, StepMode.PSD) == psd[:1]
    png = tmp_path / "timeline.png"
    plots.timeline({"seq@B": seq, "psd@2B": psd}, png)
    assert png.read_bytes()[:8] == PNG_MAGIC


class _Stub:
    """A mode server that records what the pool asks of it."""

    def __init__(self, mode: str, events: list[str]):
        self.mode, self.events = mode, events

    def start(self):
        self.events.append(f"start {self.mode}")

    def wait_ready(self):
        self.events.append(f"ready {self.mode}")

    def warm_up(self):
        self.events.append(f"warm {self.mode}")

    def stop(self):
        self.events.append(f"stop {self.mode}")


def test_servers_started_together_warm_up_one_at_a_time_once_all_are_up():
    events: list[str] = []
    a, b, c = (_Stub(m, events) for m in "abc")
    servers.Pool([a, b, c, a], capacity=3).visit(0)
    assert events == ["start a", "start b", "start c", "ready a", "ready b", "ready c", "warm a", "warm b", "warm c"]


def test_a_server_whose_port_was_taken_starts_again_on_a_new_port(tmp_path, monkeypatch):
    started = []

    class TakenOnce:
        """The first server's port is taken before it binds."""

        def __init__(self, *args, **kwargs):
            started.append(self)

        def wait_ready(self, timeout):
            if len(started) == 1:
                raise launcher.PortTaken("port taken")
            return self

    monkeypatch.setattr(servers, "Server", TakenOnce)
    settings = servers.ServerSettings("t", "d", 3, (), tmp_path, 1.0, ("hi",), 1, frozenset({0}))
    s = servers.ModeServer("plain", [RunSpec("plain@B", "plain", "plain", 1)], settings)
    s.start()
    s.wait_ready()
    assert len(started) == 2 and s.server is started[1] and s.starts == 2


@pytest.mark.server
def test_bench_quick_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "bench_cpu.sh"),
            "--quick",
            "-b",
            str(B),
            "-n",
            str(N),
            "--max-new-tokens",
            str(TOKENS),
            "-k",
            str(K),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy outputs identical" in proc.stdout
    report = json.loads(out.read_text())

    env = report["env"]
    assert (env["k"], env["B"], env["N"], env["max_new_tokens"], env["repeats"]) == (K, B, N, TOKENS, 1)
    assert env["max_alive"] == 3  # --quick's default: the CI time budget
    for key in ("date", "cpu_count", "torch", "sglang", "target", "draft", "command", "cores"):
        assert env[key], key
    cores = len(os.sched_getaffinity(0))

    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == RUNS
    for name, r in runs.items():
        assert r["completion_tokens"] == N * TOKENS, name  # ignore_eos
        assert r["concurrency"] == (2 * B if name.endswith("2B") else B)
        assert len(r["throughput_repeats"]) == 1 and r["throughput_stdev"] == 0
        for key in ("throughput_tok_s", "ttft_ms", "tpot_ms", "makespan_per_request_ms", "vs_plain", "vs_standalone"):
            assert 0 < r[key] < math.inf, (name, key)
        # Every server on the same cores, each with a thread (or a --tp rank) per core.
        assert r["cores"] == env["cores"] and r["threads"], name
        assert 0 < r["cpu_per_wall"] <= cores + 0.5 and r["busy_threads"] >= 1, name
        assert 0 <= r["steal_per_wall"] <= os.cpu_count() and len(r["steal_repeats"]) == 1, name
        assert r["major_faults"] >= 0 and len(r["major_faults_repeats"]) == 1, name
        assert r["vs_best_baseline"] > 0 and r["vs_best_baseline_median"] > 0, name
        assert (r["choices"] is None) == (r["engine"] in ("plain", "plain-tp", "standalone")), name
        if r["engine"] == "plain-tp":
            assert f"--tp {cores}" in r["threads"], name
            continue
        if r["engine"] == "plain":
            assert r["vs_plain"] == 1 and r["accept_length"] is None and r["overlap"] is None
            continue
        assert 1 <= r["accept_length"] <= K + 1, name
        assert 0 < r["predicted_tok_s"] < math.inf and -1 < r["prediction_error"] < math.inf, name
        if r["engine"] == "standalone":
            assert r["vs_standalone"] == 1 and r["steps"] is None and r["overlap"] is None
            continue
        assert r["steps"] > 0, name
        assert r["t_draft_step_ms"] > 0 and r["t_verify_ms"] > 0 and r["t_step_ms"] > 0, name
        assert 0 < r["in_step_tok_s"] < math.inf, name
        assert 0 < r["t_draft_median_ms"] and 0 < r["t_verify_median_ms"] and 0 < r["t_step_median_ms"], name
        assert r["draft_prefill_ms_per_request"] >= 0, name
        assert 0 <= r["overlap"] <= 1, name
    assert runs["seq@B"]["overlap"] == runs["seq@2B"]["overlap"] == 0
    # PSD's sub-batch is B: each step verifies one half of the 2B running requests.
    assert runs["psd@2B"]["sub_batch_size"] == B and runs["psd@2B"]["mean_verify_bs"] <= B
    assert runs["seq@2B"]["mean_verify_bs"] > runs["seq@B"]["mean_verify_bs"]

    summary = report["summary"]
    assert summary["outputs_identical"] is True and not summary["mismatched_prompts"]
    for key, value in summary.items():
        if key.startswith(("psd_over", "seq_over", "standalone_over")):
            assert 0 < value < math.inf, key
    assert 0 <= summary["psd_overlap"] <= 1

    cm = report["cost_model"]
    assert 0 <= cm["alpha"] <= 1 and 1 <= cm["ideal_psd_speedup"] <= 2
    assert [(p["run"], p["model"]) for p in cm["predictions"]] == [
        ("STANDALONE@B", "sd"),
        ("STANDALONE@2B", "sd"),
        ("seq@B", "sd"),
        ("seq@2B", "sd"),
        ("psd@2B", "psd isolated"),
        ("psd@2B", "psd contention"),
    ]
    for p in cm["predictions"]:
        assert 0 < p["predicted_tok_s"] <= p["steady_state_tok_s"], p
        assert p["predicted_step_ms"] > 0 and p["error"] > -1, p
        if p["run"].startswith(("seq", "psd")):
            assert p["step_error"] > -1 and p["measured_median_step_ms"] > 0, p
    assert all(s > 0 for s in cm["slowdown"]) and cm["draft_prefill_s_per_request"] >= 0
    for mode in ("sd", "psd"):
        assert 1 <= cm["plan_isolated"][mode]["k"] <= 8 and cm["plan_isolated"][mode]["in_flight"] <= 2 * B

    figures = report["figures"]
    for key in ("throughput_png", "timeline_png"):
        with open(figures[key], "rb") as f:
            assert f.read(8) == PNG_MAGIC, key
    events = json.loads(open(figures["chrome_trace"]).read())["traceEvents"]
    processes = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert processes == {"seq@B", "seq@2B", "psd@2B"}
    assert sum(e["ph"] == "X" for e in events) == 2 * sum(
        runs[n]["steps"] + runs[n]["fallback_steps"] for n in processes
    )
