"""Per-step timing: the step record and trace file, overlap ratio,
Prometheus metrics, log line.

``StepRecord`` is the contract between the worker, which writes one per engine
step, and whoever reads the trace (``--minedraft-trace-file``: one JSON object
per line), such as the benchmark's timeline and Chrome trace.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import threading

logger = logging.getLogger(__name__)

# Same cadence as SGLang's own "Decode batch" log line.
LOG_INTERVAL = 40

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StepMode(str, enum.Enum):
    """What the drafter does while the target verifies, in one engine step."""

    # Drafts the other sub-batch for its next step.
    PSD = "psd"
    # Nothing: the verified requests were drafted before the verify (classic SD).
    SEQUENTIAL = "sequential"
    # Drafts the verified requests' next step, betting every draft is accepted (PEARL).
    DRAFT_AHEAD = "draft_ahead"
    # k = 0: the whole batch verifies its last token alone, a plain decode step.
    PLAIN = "plain"

    def __str__(self) -> str:
        return self.value


Interval = tuple[float, float]  # (start, end), time.monotonic() seconds


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    pid: int
    mode: StepMode
    # psd: the other sub-batch's drafting; sequential: the drafting before
    # the verify; draft_ahead: the guess drafted beside it.
    draft: Interval
    verify: Interval
    verify_bs: int
    draft_bs: int
    # Drafts the target verified, summed over requests (TETRIS verifies fewer than k each).
    verified_drafts: int
    # Drafts per verified request (0: a plain decode step).
    k: int
    draft_thread: str
    # [verify_bs] tokens each verified request committed: accepted drafts + 1.
    accept_lens: tuple[int, ...]
    # CPU cores each stage ran on (split while they overlap); 0: not managed
    # (a GPU drafter, TP), and in traces written before cores were recorded.
    verify_cores: int = 0
    draft_cores: int = 0

    @property
    def step_seconds(self) -> float:
        return max(self.draft[1], self.verify[1]) - min(self.draft[0], self.verify[0])

    @property
    def overlap(self) -> float:
        return overlap_ratio(self.draft, self.verify, self.step_seconds)

    def to_json(self) -> str:
        """One trace line; the derived ``step_seconds`` and ``overlap`` are
        written too, for readers without this class."""
        fields = dataclasses.asdict(self)
        return json.dumps({**fields, "step_seconds": self.step_seconds, "overlap": self.overlap})

    @classmethod
    def from_json(cls, line: str) -> StepRecord:
        raw = json.loads(line)
        values = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
        return cls(
            **{
                **values,
                "mode": StepMode(values["mode"]),
                "draft": tuple(values["draft"]),
                "verify": tuple(values["verify"]),
                "accept_lens": tuple(values["accept_lens"]),
            }
        )


def read_trace(path) -> list[StepRecord]:
    with open(path) as f:
        return [StepRecord.from_json(line) for line in f if line.strip()]


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

        self.draft = Histogram("minedraft_draft_seconds", "Drafting time per engine step.", buckets=_SECONDS_BUCKETS)
        self.verify = Histogram(
            "minedraft_verify_seconds", "Target verify time per engine step.", buckets=_SECONDS_BUCKETS
        )
        self.step = Histogram(
            "minedraft_step_seconds",
            "Wall time per engine step (draft and verify together).",
            buckets=_SECONDS_BUCKETS,
        )
        self.accept = Histogram(
            "minedraft_accept_length",
            "Tokens committed per verified request (accepted drafts + bonus).",
            buckets=tuple(range(1, num_steps + 2)),
        )
        self.overlap = Gauge(
            "minedraft_overlap_ratio",
            "(draft + verify - step) / min(draft, verify) of the last PSD step; 1.0 = perfect overlap.",
            multiprocess_mode="mostrecent",
        )

    def observe(self, record: StepRecord) -> None:
        self.draft.observe(record.draft[1] - record.draft[0])
        self.verify.observe(record.verify[1] - record.verify[0])
        self.step.observe(record.step_seconds)
        for n in record.accept_lens:
            self.accept.observe(n)
        if record.mode is StepMode.PSD:
            self.overlap.set(record.overlap)


class StepTracer:
    def __init__(self, path: str | None, prometheus: PrometheusMetrics | None = None):
        self.path = path
        self.prometheus = prometheus
        self.count = 0
        self.mode_counts: dict[str, int] = {}
        self.overlap_sum = 0.0
        self._window: list[StepRecord] = []
        self._lock = threading.Lock()

    def summary(self) -> dict:
        psd = self.mode_counts.get(StepMode.PSD.value, 0)
        return {
            "steps": dict(self.mode_counts),
            "mean_overlap_ratio": self.overlap_sum / psd if psd else None,
        }

    def add(self, record: StepRecord) -> None:
        """One step, numbered ``self.count`` by its maker: to the trace file,
        Prometheus, the periodic log line and the summary."""
        self.count += 1
        mode = record.mode
        self.mode_counts[mode.value] = self.mode_counts.get(mode.value, 0) + 1
        if mode is StepMode.PSD:
            self.overlap_sum += record.overlap
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(record.to_json() + "\n")
        if self.prometheus is not None:
            self.prometheus.observe(record)
        self._window.append(record)
        if len(self._window) >= LOG_INTERVAL:
            self._log_window()

    def _log_window(self) -> None:
        records = self._window
        lens = [n for r in records for n in r.accept_lens]
        psd = [r.overlap for r in records if r.mode is StepMode.PSD]
        logger.info(
            "MineDraft steps %d-%d: psd %d, other %d, sub-batch sizes (mean) %.1f verify / %.1f draft, "
            "accept len %.2f, overlap ratio %s",
            records[0].step,
            records[-1].step,
            len(psd),
            len(records) - len(psd),
            sum(r.verify_bs for r in records) / len(records),
            sum(r.draft_bs for r in records) / len(records),
            sum(lens) / max(len(lens), 1),
            f"{sum(psd) / len(psd):.2f}" if psd else "n/a",
        )
        self._window = []
