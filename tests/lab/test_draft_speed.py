"""The per-call drafter benchmark runs end to end on the tiny draft model."""

from __future__ import annotations

import json
import os

from minedraft_sglang.lab import draft_speed, tiny_models


def test_reports_a_median_per_mode_dtype_and_batch(capsys):
    saved = os.sched_getaffinity(0)
    try:
        draft_speed.main(
            [
                *("--draft", str(tiny_models.model_path("draft")), "--batches", "1,3", "--calls", "2"),
                *("--cores", "0", "--vocabs", "0,512"),
            ]
        )
    finally:
        os.sched_setaffinity(0, saved)
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    names = {f"eager {dtype} b={b}{v}" for dtype in ("float32", "bfloat16") for b in (1, 3) for v in ("", " vocab=512")}
    assert set(report["median_ms"]) == set(report["warmup_s"]) == names
    assert all(ms > 0 for ms in report["median_ms"].values())
