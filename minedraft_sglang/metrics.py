"""Per-step timing: overlap ratio, Prometheus metrics, log line, JSON trace."""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

# Same cadence as SGLang's own "Decode batch" log line.
LOG_INTERVAL = 40

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def overlap_ratio(draft: tuple[float, float], verify: tuple[float, float], step: float) -> float:
    """(draft + verify - step) / min(draft, verify): 1.0 when the shorter
    stage is fully hidden behind the longer one, 0.0 when they run back to back."""
    d = draft[1] - draft[0]
    v = verify[1] - verify[0]
    shortest = min(d, v)
    if shortest <= 0:
        return 0.0
    return max(0.0, min(1.0, (d + v - step) / shortest))


class PrometheusMetrics:
    """Created in the scheduler process; SGLang's /metrics (prometheus
    multiprocess mode, with --enable-metrics) aggregates them."""

    def __init__(self, num_steps: int):
        from prometheus_client import Gauge, Histogram

        self.draft = Histogram(
            "minedraft_draft_seconds", "Drafting time per engine step.", buckets=_SECONDS_BUCKETS
        )
        self.verify = Histogram(
            "minedraft_verify_seconds", "Target verify time per engine step.", buckets=_SECONDS_BUCKETS
        )
        self.step = Histogram(
            "minedraft_step_seconds", "Wall time per engine step (draft and verify together).",
            buckets=_SECONDS_BUCKETS,
        )
        self.accept = Histogram(
            "minedraft_accept_length", "Tokens committed per verified request (accepted drafts + bonus).",
            buckets=tuple(range(1, num_steps + 2)),
        )
        self.overlap = Gauge(
            "minedraft_overlap_ratio",
            "(draft + verify - step) / min(draft, verify) of the last PSD step; 1.0 = perfect overlap.",
            multiprocess_mode="mostrecent",
        )

    def observe(self, record: dict, accept_lens: Sequence[int]) -> None:
        self.draft.observe(record["draft"][1] - record["draft"][0])
        self.verify.observe(record["verify"][1] - record["verify"][0])
        self.step.observe(record["step_seconds"])
        for n in accept_lens:
            self.accept.observe(n)
        if record["mode"] == "psd":
            self.overlap.set(record["overlap"])


class StepTracer:
    def __init__(self, path: Optional[str], prometheus: Optional[PrometheusMetrics] = None):
        self.path = path
        self.prometheus = prometheus
        self.count = 0
        self.mode_counts: dict[str, int] = {}
        self.overlap_sum = 0.0
        self._window: list[tuple[dict, Sequence[int]]] = []
        self._lock = threading.Lock()

    def summary(self) -> dict:
        psd = self.mode_counts.get("psd", 0)
        return {
            "steps": dict(self.mode_counts),
            "mean_overlap_ratio": self.overlap_sum / psd if psd else None,
        }

    def step(
        self, mode, draft, verify, verify_bs, draft_bs, draft_thread: str,
        accept_lens: Sequence[int], verified_drafts: int, k: int,
    ) -> dict:
        start = min(draft[0], verify[0])
        step = max(draft[1], verify[1]) - start
        record = {
            "step": self.count,
            "pid": os.getpid(),
            "mode": mode,
            "draft": list(draft),
            "verify": list(verify),
            "verify_bs": verify_bs,
            "draft_bs": draft_bs,
            "step_seconds": step,
            "verified_drafts": verified_drafts,
            # Drafts per verified request (0: a plain decode step).
            "k": k,
            "overlap": overlap_ratio(draft, verify, step),
            "draft_thread": draft_thread,
        }
        self.count += 1
        self.mode_counts[mode] = self.mode_counts.get(mode, 0) + 1
        if mode == "psd":
            self.overlap_sum += record["overlap"]
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps({**record, "accept_lens": list(accept_lens)}) + "\n")
        if self.prometheus is not None:
            self.prometheus.observe(record, accept_lens)
        self._window.append((record, accept_lens))
        if len(self._window) >= LOG_INTERVAL:
            self._log_window()
        return record

    def _log_window(self) -> None:
        records = [r for r, _ in self._window]
        lens = [n for _, a in self._window for n in a]
        psd = [r["overlap"] for r in records if r["mode"] == "psd"]
        logger.info(
            "MineDraft steps %d-%d: psd %d, sequential %d, sub-batch sizes (mean) %.1f verify / %.1f draft, "
            "accept len %.2f, overlap ratio %s",
            records[0]["step"], records[-1]["step"], len(psd), len(records) - len(psd),
            sum(r["verify_bs"] for r in records) / len(records),
            sum(r["draft_bs"] for r in records) / len(records),
            sum(lens) / max(len(lens), 1),
            f"{sum(psd) / len(psd):.2f}" if psd else "n/a",
        )
        self._window.clear()
