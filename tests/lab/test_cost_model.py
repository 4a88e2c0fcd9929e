"""Cost model and planner: hand-computed cases (numbers worked out in the
comments), so a wrong formula fails here."""

from __future__ import annotations

import json

import pytest

from minedraft_sglang.lab import cost_model as cm

# Stage times used below, in seconds: t_d(b) = 0.002 + 0.001*b per draft
# token, t_v(b, k) = 0.010 + 0.001*b*(k+1).
LINEAR = cm.StageTimes(draft=cm.Linear(0.002, 0.001), verify=cm.Linear(0.010, 0.001))
# Constant: t_d = 10 ms, t_v = 30 ms whatever the batch.
FLAT = cm.StageTimes(draft=cm.Linear(0.010), verify=cm.Linear(0.030))


def test_accept_length():
    assert cm.accept_length(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert cm.accept_length(1.0, 4) == 5
    assert cm.accept_length(0.0, 3) == 1
    with pytest.raises(ValueError):
        cm.accept_length(1.5, 3)


def test_alpha_from_accept_length_inverts_it():
    assert cm.alpha_from_accept_length(1.875, 3) == pytest.approx(0.5, abs=1e-9)
    assert cm.alpha_from_accept_length(1.0, 3) == pytest.approx(0.0, abs=1e-9)
    assert cm.alpha_from_accept_length(4.0, 3) == pytest.approx(1.0, abs=1e-9)
    for alpha in (0.1, 0.37, 0.8, 0.95):
        assert cm.alpha_from_accept_length(cm.accept_length(alpha, 5), 5) == pytest.approx(alpha, abs=1e-9)
    with pytest.raises(ValueError):
        cm.alpha_from_accept_length(4.5, 3)


def test_linear_fit():
    line = cm.Linear.fit([(1, 3), (3, 7)])
    assert (line.intercept, line.slope) == pytest.approx((1.0, 2.0))
    assert line(10) == pytest.approx(21)
    # One x value: the mean; noise that makes bigger batches cheaper: the mean.
    assert cm.Linear.fit([(2, 5), (2, 7)]) == cm.Linear(6.0)
    assert cm.Linear.fit([(1, 7), (3, 5)]) == cm.Linear(6.0)
    # Steeper than proportional ((1, 1), (3, 5): intercept -1): through the
    # origin instead, slope (1*1 + 3*5) / (1 + 9) = 1.6.
    assert cm.Linear.fit([(1, 1), (3, 5)]) == cm.Linear(0.0, pytest.approx(1.6))
    with pytest.raises(ValueError):
        cm.Linear.fit([])


def test_stage_times_fit_draft_per_request_and_verify_per_token():
    times = cm.StageTimes.fit(
        [
            cm.Measurement(b=2, k=3, t_draft_token=0.010, t_verify=0.050),
            cm.Measurement(b=4, k=3, t_draft_token=0.014, t_verify=0.070),
        ]
    )
    # draft: (0.014 - 0.010) / (4 - 2) = 0.002 per request, 0.006 at b = 0
    assert (times.draft.intercept, times.draft.slope) == pytest.approx((0.006, 0.002))
    # verify against tokens b*(k+1) = 8 and 16: 0.0025 per token, 0.030 at 0
    assert (times.verify.intercept, times.verify.slope) == pytest.approx((0.030, 0.0025))
    assert times.t_v(3, 1) == pytest.approx(0.030 + 0.0025 * 6)


def test_steps_throughput_and_ideal_speedup():
    # Balanced stages (k*t_d = t_v = 30 ms): SD 60 ms a step, PSD 30 ms, 2x.
    assert cm.sd_step(FLAT, 4, 3) == pytest.approx(0.060)
    assert cm.psd_step(FLAT, 4, 3) == pytest.approx(0.030)
    assert cm.ideal_speedup(FLAT, 4, 3) == pytest.approx(2.0)
    # b * L / step: 4 * 1.875 / 0.060 = 125 tok/s; PSD verifies 4 per 30 ms.
    assert cm.sd_throughput(FLAT, 4, 3, 0.5) == pytest.approx(125.0)
    assert cm.psd_throughput(FLAT, 4, 3, 0.5) == pytest.approx(250.0)
    # Unbalanced (k=2: 20 ms draft, 30 ms verify): 50 / 30.
    assert cm.ideal_speedup(FLAT, 4, 2) == pytest.approx(5 / 3)
    # Drafting twice as slow beside the verify: max(60, 30) = SD's 60 ms.
    assert cm.psd_step(FLAT, 4, 3, slowdown_draft=2.0) == pytest.approx(0.060)
    assert cm.psd_throughput(FLAT, 4, 3, 0.5, slowdown_draft=2.0, slowdown_verify=1.5) == pytest.approx(125.0)


def test_makespan_waves():
    # alpha 1, k 3: L = 4; 9 tokens = 1 from prefill + 2 rounds of 4.
    # SD, 2 in flight, 5 requests: waves 2, 2, 1, each 2 rounds of 60 ms + 0.1 s prefill.
    assert cm.makespan(FLAT, k=3, alpha=1.0, n_requests=5, tokens=9, in_flight=2, prefill_s=0.1) == pytest.approx(
        3 * (0.1 + 2 * 0.060)
    )
    # PSD, 4 in flight: a wave of 4 (a round = two 30 ms steps over halves of
    # 2), then a lone request (sequential: 60 ms a round).
    assert cm.makespan(FLAT, k=3, alpha=1.0, n_requests=5, tokens=9, in_flight=4, psd=True) == pytest.approx(
        2 * 2 * 0.030 + 2 * 0.060
    )
    # The drafter's prefill, 0.5 s a prompt, adds 5 * 0.5 s whatever the waves.
    assert cm.makespan(
        FLAT, k=3, alpha=1.0, n_requests=5, tokens=9, in_flight=2, prefill_s=0.1, draft_prefill_s=0.5
    ) == pytest.approx(3 * (0.1 + 2 * 0.060) + 2.5)
    # The last, smaller wave is cheaper with batch-dependent stage times:
    # sd_step(1, k=1) = 0.003 + 0.012 = 0.015, sd_step(2, 1) = 0.004 + 0.014 = 0.018;
    # alpha 0, k 1: L = 1, 3 tokens = 2 rounds.
    assert cm.makespan(LINEAR, k=1, alpha=0.0, n_requests=3, tokens=3, in_flight=2) == pytest.approx(
        2 * 0.018 + 2 * 0.015
    )


def test_plan_picks_k_and_batch():
    p = cm.plan(LINEAR, alpha=1.0, max_concurrency=4, k_max=5)
    # SD, alpha 1 (L = k+1): k=5, b=4: step 5*0.006 + 0.010 + 0.004*6 = 0.064 s,
    # 4*6 / 0.064 = 375 tok/s, better than any smaller k or b.
    assert (p["sd"]["k"], p["sd"]["batch"], p["sd"]["in_flight"]) == (5, 4, 4)
    assert p["sd"]["throughput"] == pytest.approx(375.0)
    # PSD, sub-batch <= 2: k=5, b=2: max(5*0.004, 0.010 + 0.002*6) = 0.022 s, 12 / 0.022.
    assert (p["psd"]["k"], p["psd"]["batch"], p["psd"]["in_flight"]) == (5, 2, 4)
    assert p["psd"]["throughput"] == pytest.approx(12 / 0.022)
    assert p["psd_over_sd"] == pytest.approx(12 / 0.022 / 375)
    # Useless drafts (alpha 0): the cheapest k, the biggest batch.
    p0 = cm.plan(LINEAR, alpha=0.0, max_concurrency=4, k_max=5)
    assert (p0["sd"]["k"], p0["sd"]["batch"]) == (1, 4)


def test_plan_tpot_limit():
    # TPOT <= 10 ms: SD at b=4 needs 0.014 + 0.010k <= 0.010(k+1) (never);
    # at b=3, 0.013 + 0.008k <= 0.010(k+1) holds from k=2; k=5 is best there:
    # step 0.053 s, 18 / 0.053 tok/s, TPOT 8.8 ms.
    p = cm.plan(LINEAR, alpha=1.0, max_concurrency=4, k_max=5, tpot_limit=0.010)
    assert (p["sd"]["k"], p["sd"]["batch"]) == (5, 3)
    assert p["sd"]["throughput"] == pytest.approx(18 / 0.053)
    assert p["sd"]["tpot_s"] <= 0.010
    # PSD (5, 2): TPOT 2 * 0.022 / 6 = 7.3 ms, within the limit.
    assert (p["psd"]["k"], p["psd"]["batch"]) == (5, 2)
    none = cm.plan(LINEAR, alpha=1.0, max_concurrency=4, k_max=5, tpot_limit=0.001)
    assert none == {"sd": None, "psd": None, "psd_over_sd": None}


def test_relative_error():
    assert cm.relative_error(110.0, 100.0) == pytest.approx(0.10)
    assert cm.relative_error(85.0, 100.0) == pytest.approx(-0.15)
    assert cm.relative_error(None, 100.0) is None
    assert cm.relative_error(1.0, 0.0) is None


def _run(name, mode, engine, concurrency, t_draft_ms=None, t_verify_ms=None, accept=None, bs=None):
    return {
        "name": name,
        "mode": mode,
        "engine": engine,
        "concurrency": concurrency,
        "sub_batch_size": concurrency // 2 if engine == "psd" else concurrency,
        "t_draft_step_ms": t_draft_ms,
        "t_verify_ms": t_verify_ms,
        "accept_length": accept,
        "mean_verify_bs": bs,
    }


REPORT = {
    "env": {"k": 3, "B": 2},
    "runs": [
        _run("plain@B", "plain", "plain", 2),
        _run("seq@B", "seq", "sequential", 2, 30.0, 50.0, 1.875, 2.0),
        _run("seq@2B", "seq", "sequential", 4, 42.0, 70.0, 1.875, 4.0),
        _run("psd@2B", "psd", "psd", 4, 60.0, 75.0, 1.875, 2.0),
        _run("tetris@2B", "tetris", "psd", 4, 90.0, 90.0, 1.5, 2.0),
    ],
}


def test_from_bench_with_medians():
    runs = [dict(r) for r in REPORT["runs"]]
    # Medians (ms): seq@B draft 24 (8 a token), verify 40; seq@2B 30, 50;
    # psd@2B 48, 60; drafter prefill 300 and 500 ms per request.
    for r, (d, v, prefill) in zip(runs[1:], [(24, 40, 300), (30, 50, 500), (48, 60, 900), (80, 80, 0)]):
        r.update(t_draft_median_ms=d, t_verify_median_ms=v, draft_prefill_ms_per_request=prefill)
    inputs = cm.from_bench({**REPORT, "runs": runs})
    assert [p.t_draft_token for p in inputs["points"]] == pytest.approx([0.008, 0.010])
    assert [p.t_verify for p in inputs["points"]] == pytest.approx([0.040, 0.050])
    # The sequential runs' mean, 0.4 s; psd's own figure is not an input.
    assert inputs["draft_prefill_s"] == pytest.approx(0.4)
    assert inputs["slowdown"] == pytest.approx((2.0, 1.5))  # 48/24, 60/40


def test_from_bench_older_report_uses_means():
    inputs = cm.from_bench(REPORT)
    assert inputs["draft_prefill_s"] == 0
    assert inputs["k"] == 3
    assert inputs["alpha"] == pytest.approx(0.5, abs=1e-9)
    # Per draft token: 10 ms at b=2, 14 ms at b=4.
    assert [p.t_draft_token for p in inputs["points"]] == pytest.approx([0.010, 0.014])
    assert (inputs["times"].draft.intercept, inputs["times"].draft.slope) == pytest.approx((0.006, 0.002))
    # psd@2B (sub-batch 2) against seq@B: drafts 60/30, verifies 75/50; the
    # TETRIS run is not the plain psd mode and is ignored.
    assert inputs["slowdown"] == pytest.approx((2.0, 1.5))


def test_from_bench_needs_a_sequential_run():
    with pytest.raises(ValueError, match="sequential"):
        cm.from_bench({"env": {"k": 3, "B": 2}, "runs": REPORT["runs"][:1]})


def test_cli_prints_the_plan(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(REPORT))
    assert cm.main(["--from", str(path), "--k-max", "4"]) == 0
    out = capsys.readouterr().out
    assert "alpha 0.500" in out
    assert "b=2.0: t_d 10.00 ms/token, t_v 50.00 ms" in out
    assert "at most 4 in flight" in out
    assert out.count("SD : k=") == 2 and out.count("PSD: k=") == 2  # isolated, and with the slowdown
    assert "draft x2.00, verify x1.50" in out


def test_core_split_pays_where_a_second_core_barely_speeds_a_stage():
    """lab/core_split: the planner's rates on hypothetical two-core machines. A second core that does not
    speed a stage makes the overlap win; one that doubles its speed makes each stage alone on both win."""
    from minedraft_sglang.lab import core_split
    from minedraft_sglang.metrics import StepMode

    for speedup, overlap_wins in ((1.0, True), (2.0, False)):
        p = core_split.planner((0.200, 0.002), (0.060, 0.001), speedup, alpha=0.8, k=3)
        for batch in (1, 4):
            (alone, r_alone), (overlap, r_overlap) = core_split.best(p, batch)
            assert alone.mode in (StepMode.PLAIN, StepMode.SEQUENTIAL)
            assert overlap.mode in (StepMode.PSD, StepMode.DRAFT_AHEAD) and overlap.draft_cores == 1
            assert (r_overlap > r_alone) == overlap_wins, (speedup, batch)
