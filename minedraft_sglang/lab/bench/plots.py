"""The benchmark's figures: throughput vs concurrency, a draft/verify
timeline (PNG) and the same intervals as a Chrome trace (chrome://tracing,
Perfetto), which --rescore reads back. Manual: docs/lab.md.

Steps are the worker's StepRecords (--minedraft-trace-file): ``draft`` and
``verify`` are (start, end) in seconds on the scheduler process's monotonic
clock; verify runs on the scheduler thread, draft on ``draft_thread`` (the
scheduler thread itself in sequential mode, the drafter thread in psd mode).
"""

from __future__ import annotations

import json
from pathlib import Path

from minedraft_sglang.metrics import Interval, StepMode, StepRecord

SCHEDULER_THREAD = "MainThread"
# The StepRecord fields a Chrome trace does not keep read back as this.
NOT_KEPT = -1


def _pyplot():
    # Imported on use with a file backend: the bench runs headless and most
    # of its users never draw.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_concurrency(runs: list[dict], path: Path) -> None:
    """One line per mode: output tok/s against requests in flight."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    modes: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        modes.setdefault(r["mode"], []).append((r["concurrency"], r["throughput_tok_s"]))
    for mode, points in modes.items():
        points.sort()
        ax.plot([c for c, _ in points], [t for _, t in points], marker="o", label=mode)
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("output tokens / s")
    ax.set_xticks(sorted({r["concurrency"] for r in runs}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def window(steps: list[StepRecord], n: int, mode: StepMode | None = None) -> list[StepRecord]:
    """``n`` consecutive steps from the middle of the run (past start-up,
    before the tail), of ``mode`` only if given (all if none is)."""
    chosen = [s for s in steps if mode is None or s.mode == mode] or steps
    start = max(0, len(chosen) // 2 - n // 2)
    return chosen[start : start + n]


def _rows(steps: list[StepRecord]) -> list[tuple[str, str, Interval, StepRecord]]:
    """(thread, stage, interval, step) for every interval of ``steps``."""
    out = []
    for s in steps:
        out.append((SCHEDULER_THREAD, "verify", s.verify, s))
        out.append((s.draft_thread, "draft", s.draft, s))
    return out


def _thread_label(thread: str) -> str:
    return "scheduler thread (target)" if thread == SCHEDULER_THREAD else f"{thread} (drafter)"


def _thread_of(label: str) -> str:
    """The thread name _thread_label made ``label`` from."""
    return SCHEDULER_THREAD if label == _thread_label(SCHEDULER_THREAD) else label.rsplit(" ", 1)[0]


COLORS = {"verify": "tab:blue", "draft": "tab:orange"}


def timeline(traces: dict[str, list[StepRecord]], path: Path) -> None:
    """One panel per run: a row per thread, a bar per draft/verify interval,
    times in ms from the first step shown."""
    plt = _pyplot()
    traces = {name: steps for name, steps in traces.items() if steps}
    if not traces:
        return
    fig, axes = plt.subplots(len(traces), 1, figsize=(8, 1.3 + 1.2 * len(traces)), dpi=100, squeeze=False)
    for ax, (name, steps) in zip(axes[:, 0], traces.items()):
        rows = _rows(steps)
        t0 = min(iv[0] for _, _, iv, _ in rows)
        threads = sorted({t for t, _, _, _ in rows}, key=lambda t: t != SCHEDULER_THREAD)
        for thread, stage, (a, b), s in rows:
            y = threads.index(thread)
            ax.barh(
                y,
                1000 * (b - a),
                left=1000 * (a - t0),
                height=0.6,
                color=COLORS[stage],
                edgecolor="black",
                linewidth=0.4,
            )
            bs = s.verify_bs if stage == "verify" else s.draft_bs
            ax.text(
                1000 * (a + b) / 2 - 1000 * t0, y, f"{stage[0]}{s.step}\nbs {bs}", ha="center", va="center", fontsize=6
            )
        ax.set_yticks(range(len(threads)), [_thread_label(t) for t in threads], fontsize=7)
        ax.set_ylim(-0.6, len(threads) - 0.4)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms (v = verify, d = draft, step number, batch size)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def chrome_trace(traces: dict[str, list[StepRecord]], path: Path) -> None:
    """Every interval as a complete ("X") event: one process per run, one
    thread row per scheduler/drafter thread, microseconds from the run's start."""
    events = []
    for pid, (name, steps) in enumerate(traces.items(), start=1):
        if not steps:
            continue
        rows = _rows(steps)
        t0 = min(iv[0] for _, _, iv, _ in rows)
        threads = sorted({t for t, _, _, _ in rows}, key=lambda t: t != SCHEDULER_THREAD)
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        for tid, thread in enumerate(threads, start=1):
            events.append(
                {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": _thread_label(thread)}}
            )
        for thread, stage, (a, b), s in rows:
            events.append(
                {
                    "ph": "X",
                    "name": stage,
                    "cat": s.mode.value,
                    "pid": pid,
                    "tid": threads.index(thread) + 1,
                    "ts": round(1e6 * (a - t0), 1),
                    "dur": round(1e6 * (b - a), 1),
                    "args": {
                        "step": s.step,
                        "verify_bs": s.verify_bs,
                        "draft_bs": s.draft_bs,
                        "overlap": s.overlap,
                        "accept_lens": list(s.accept_lens),
                    },
                }
            )
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}) + "\n")


def read_chrome_trace(path: Path) -> dict[str, list[StepRecord]]:
    """The steps chrome_trace wrote, per run, with times in seconds from the
    run's first interval; pid, k and verified_drafts are not in the trace
    and read back as NOT_KEPT."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    runs = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): _thread_of(e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    # run -> step -> stage -> its event
    stages: dict[str, dict[int, dict[str, dict]]] = {name: {} for name in runs.values()}
    for e in events:
        if e["ph"] == "X":
            stages[runs[e["pid"]]].setdefault(e["args"]["step"], {})[e["name"]] = e
    return {name: [_record(by_step[i], threads) for i in sorted(by_step)] for name, by_step in stages.items()}


def _record(stages: dict[str, dict], threads: dict[tuple[int, int], str]) -> StepRecord:
    """The step of one "draft" and one "verify" event."""
    draft, verify = stages["draft"], stages["verify"]
    args = verify["args"]
    return StepRecord(
        step=args["step"],
        pid=NOT_KEPT,
        mode=StepMode(verify["cat"]),
        draft=_interval(draft),
        verify=_interval(verify),
        verify_bs=args["verify_bs"],
        draft_bs=args["draft_bs"],
        verified_drafts=NOT_KEPT,
        k=NOT_KEPT,
        draft_thread=threads[(draft["pid"], draft["tid"])],
        accept_lens=tuple(args["accept_lens"]),
    )


def _interval(event: dict) -> Interval:
    return event["ts"] / 1e6, (event["ts"] + event["dur"]) / 1e6
