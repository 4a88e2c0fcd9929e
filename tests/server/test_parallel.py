"""PSD really runs the draft and the verify at the same time, on different cores.

Proven from the kernel's view of a real server, not from our own bookkeeping:
the CPU sets of the two threads (``/proc/<pid>/task/<tid>/status``) and the
CPU time the scheduler process burns per second of wall time. Timestamps
alone prove nothing here: two threads time-sharing one core produce
overlapping wall-clock intervals too.

The models (``tiny_models.WIDE_MODELS``, random bfloat16 weights, ~330 MB) make
a forward tens of milliseconds of arithmetic, so the figures measure the
forwards, not Python overhead. With both threads on one core (the pinning
bug this test was written for) every check below fails: the CPU sets
intersect, CPU time grows at ~1.0x wall time, and a PSD step costs about
draft + verify.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from statistics import median

import psutil
import pytest

from minedraft_sglang.cpu_affinity import parse_cores
from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args

pytestmark = pytest.mark.server

DRAFTER_THREAD = "minedraft-draft"  # its OS-level name (worker._init_drafter_thread)
WINDOW_S = 5.0


@pytest.fixture(scope="module")
def wide_psd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wide-psd")
    target, draft = (str(tiny_models.wide_model_path(n)) for n in ("wide-target", "wide-draft"))
    trace = tmp / "trace.jsonl"
    args = minedraft_args(target, draft, "psd", 3, ["--minedraft-trace-file", str(trace), "--dtype", "bfloat16"])
    with Server(args, tmp / "server.log") as server:
        yield server, trace


def _scheduler_pid(server: Server) -> int:
    names = {p.pid: p.name() for p in psutil.Process(server.proc.pid).children(recursive=True)}
    pids = [pid for pid, name in names.items() if name.startswith("sglang::schedul")]
    assert len(pids) == 1, names
    return pids[0]


def _threads(pid: int) -> dict[int, str]:
    task = Path(f"/proc/{pid}/task")
    return {int(t.name): (t / "comm").read_text().strip() for t in task.iterdir()}


def _cpus_allowed(pid: int, tid: int) -> set[int]:
    # The kernel writes the list in the syntax --minedraft-draft-cores takes.
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(parse_cores(line.split(":", 1)[1].strip()))
    raise AssertionError(f"no Cpus_allowed_list for task {tid}")


def _cpu_seconds(stat_path: str) -> float:
    """utime + stime of a process or thread (``/proc/.../stat`` fields 14, 15)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _steps(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _span(interval) -> float:
    return interval[1] - interval[0]


def test_psd_draft_and_verify_run_in_parallel_on_disjoint_cores(wide_psd):
    server, trace = wide_psd
    pid = _scheduler_pid(server)

    # Sequential steps of this server: one request alone leaves the other
    # sub-batch empty, so each step drafts, then verifies (sub-batch size 1).
    trace.write_text("")
    server.generate("the cat sat on the mat", 48, sampling={"ignore_eos": True})
    sequential = [s for s in _steps(trace) if s["mode"] == "sequential"]

    # PSD steps: two requests, one per sub-batch (sub-batch size 1 again).
    trace.write_text("")
    load = [_start(server, p) for p in ("hello there my friend", "once upon a time there")]
    deadline = time.monotonic() + 120
    while sum(s["mode"] == "psd" for s in _steps(trace)) < 5:
        assert time.monotonic() < deadline and all(t.is_alive() for t in load), "no PSD steps"
        time.sleep(0.1)
    threads = _threads(pid)
    drafter = [tid for tid, name in threads.items() if name == DRAFTER_THREAD]
    assert len(drafter) == 1, threads
    drafter_tid = drafter[0]
    # The scheduler's event loop, which runs the target's prefill and verify,
    # is the process's main thread.
    verifier_tid = pid
    cpu0 = {t: _cpu_seconds(f"/proc/{pid}/task/{t}/stat") for t in (drafter_tid, verifier_tid)}
    process0, wall0 = _cpu_seconds(f"/proc/{pid}/stat"), time.monotonic()
    time.sleep(WINDOW_S)
    process1, wall1 = _cpu_seconds(f"/proc/{pid}/stat"), time.monotonic()
    cpu1 = {t: _cpu_seconds(f"/proc/{pid}/task/{t}/stat") for t in (drafter_tid, verifier_tid)}
    assert all(t.is_alive() for t in load), "a request ended inside the measured window: make them longer"
    for t in load:
        t.join()

    window = [s for s in _steps(trace) if s["verify"][1] > wall0 and s["verify"][0] < wall1]
    psd = [s for s in _steps(trace) if s["mode"] == "psd" and s["verify_bs"] == 1 and s["draft_bs"] == 1]
    figures = {
        "drafter_cores": sorted(_cpus_allowed(pid, drafter_tid)),
        "verifier_cores": sorted(_cpus_allowed(pid, verifier_tid)),
        "cpu_per_wall": (process1 - process0) / (wall1 - wall0),
        "drafter_cpu_per_wall": (cpu1[drafter_tid] - cpu0[drafter_tid]) / (wall1 - wall0),
        "verifier_cpu_per_wall": (cpu1[verifier_tid] - cpu0[verifier_tid]) / (wall1 - wall0),
        "psd_step_median_s": median(s["step_seconds"] for s in psd),
        "sequential_draft_plus_verify_median_s": median(_span(s["draft"]) + _span(s["verify"]) for s in sequential),
        "psd_steps_in_window": sum(s["mode"] == "psd" for s in window),
        "steps_in_window": len(window),
    }
    figures["psd_step_over_sequential"] = (
        figures["psd_step_median_s"] / figures["sequential_draft_plus_verify_median_s"]
    )
    print(json.dumps(figures))
    assert len(sequential) >= 20 and len(psd) >= 20, figures
    # The window measured PSD steps, nothing else.
    assert figures["psd_steps_in_window"] >= 0.9 * figures["steps_in_window"] > 0, figures
    # (a) Disjoint CPU sets, as the kernel has them.
    assert not set(figures["drafter_cores"]) & set(figures["verifier_cores"]), figures
    # (b) Two cores busy at once: the drafter's and the verifier's threads each
    # burn CPU most of the window, and the process more than 1.5 s per second.
    assert figures["cpu_per_wall"] >= 1.5, figures
    assert min(figures["drafter_cpu_per_wall"], figures["verifier_cpu_per_wall"]) >= 0.5, figures
    # ... and that buys time: a PSD step costs at most 0.8x this server's
    # sequential draft + verify at the same sub-batch size.
    assert figures["psd_step_over_sequential"] <= 0.8, figures


def _start(server: Server, prompt: str) -> threading.Thread:
    t = threading.Thread(target=server.generate, args=(prompt, 400), kwargs={"sampling": {"ignore_eos": True}})
    t.start()
    return t
