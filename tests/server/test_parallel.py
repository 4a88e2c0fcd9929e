"""Every allowed core works, and the split follows the step: proven from the kernel's view of a real server.

A MINEDRAFT server with a CPU drafter owns the scheduler process's cores. A stage that runs alone (a plain
decode step) must use all of them; while the drafter drafts beside the target's verify (PSD) the two sides
must run on disjoint cores. Evidence is the kernel's, never our bookkeeping: the CPU time of every thread
(``/proc/<pid>/task/<tid>/stat``), each thread's state and CPU set (``status``), sampled while steps run.
Timestamps alone prove nothing here: two threads time-sharing one core produce overlapping wall-clock
intervals too.

The models (``tiny_models.WIDE_MODELS``, random bfloat16 weights, ~330 MB) make a forward tens of
milliseconds of arithmetic, so the figures measure the forwards, not Python overhead. The draft is unrelated
to the target (acceptance near zero), so with ``--minedraft-k auto`` the planner settles on plain decode
steps. Before the cores followed the step (the split was fixed at startup), a plain step ran on one core
with one thread: CPU time 1.0x wall.
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
from conftest import BUILT

from minedraft_sglang.cpu.affinity import parse_cores, stat_fields
from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args, start_ready

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) != 2, reason="the figures are for exactly two cores"),
]

DRAFTER_THREAD = "minedraft-draft"  # its OS-level name, inherited by its OpenMP threads
WINDOW_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def alone(pool):
    """The figures are the kernel's view of the whole machine: the test pool's idle servers still wake now
    and then, so they stop first."""
    pool.close()


def _wide_server(tmp: Path, name: str, mode: str, extra: list[str]):
    target, draft = (str(tiny_models.wide_model_path(n)) for n in ("wide-target", "wide-draft"))
    trace = tmp / f"{name}.trace.jsonl"
    # The draft's three layers at k = 3 against the target's eight keep both sides busy most of a PSD
    # step with the checkpoint's weights; with the CPU default's int8 copy the drafter worked 0.49 CPU
    # seconds per second of the window (2026-12-06 suite run), under the 0.5 asked of each side below.
    args = minedraft_args(
        target, draft, mode, 3, ["--minedraft-trace-file", str(trace), "--dtype", "bfloat16", *BUILT, *extra]
    )
    # On a new port when the first was taken before the server bound it (2026-12-08: one suite run).
    return start_ready(args, tmp / f"{name}.log"), trace


@pytest.fixture(scope="module")
def wide_psd(tmp_path_factory):
    server, trace = _wide_server(tmp_path_factory.mktemp("wide-psd"), "psd", "psd", [])
    with server:
        yield server, trace


@pytest.fixture(scope="module")
def wide_auto(tmp_path_factory):
    server, trace = _wide_server(tmp_path_factory.mktemp("wide-auto"), "auto", "auto", ["--minedraft-k", "auto"])
    with server:
        yield server, trace


def _scheduler_pid(server: Server) -> int:
    names = {p.pid: p.name() for p in psutil.Process(server.proc.pid).children(recursive=True)}
    pids = [pid for pid, name in names.items() if name.startswith("sglang::schedul")]
    assert len(pids) == 1, names
    return pids[0]


def _task(pid: int, tid: int) -> dict:
    """One thread as the kernel has it: name, CPU seconds, state and CPU set."""
    task = Path(f"/proc/{pid}/task/{tid}")
    stat = stat_fields(task / "stat")
    status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
    return {
        "name": (task / "comm").read_text().strip(),
        "cpu_s": (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"),
        "state": stat[0],
        "cores": frozenset(parse_cores(status["Cpus_allowed_list"].strip())),
    }


def _tasks(pid: int) -> dict[int, dict]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(t.name)] = _task(pid, int(t.name))
        except (OSError, KeyError):  # the thread ended meanwhile
            continue
    return out


def _steps(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def _start(server: Server, prompt: str, tokens: int = 400) -> threading.Thread:
    t = threading.Thread(target=server.generate, args=(prompt, tokens), kwargs={"sampling": {"ignore_eos": True}})
    t.start()
    return t


def _wait_for(trace: Path, mode: str, count: int, load: list[threading.Thread]) -> None:
    deadline = time.monotonic() + 180
    while sum(s["mode"] == mode for s in _steps(trace)) < count:
        assert time.monotonic() < deadline and all(t.is_alive() for t in load), f"no {mode} steps"
        time.sleep(0.1)


def _watch(pid: int, seconds: float) -> dict:
    """Every thread's CPU seconds over ``seconds`` and, sampled every 20 ms, the CPU sets of the threads
    running (state R) at that moment, by thread id."""
    start, t0 = _tasks(pid), time.monotonic()
    samples = []
    while time.monotonic() - t0 < seconds:
        samples.append({tid: t["cores"] for tid, t in _tasks(pid).items() if t["state"] == "R"})
        time.sleep(0.02)
    wall = time.monotonic() - t0
    end = _tasks(pid)
    burnt = {tid: end[tid]["cpu_s"] - start.get(tid, {"cpu_s": 0.0})["cpu_s"] for tid in end}
    return {"t0": t0, "wall": wall, "burnt": burnt, "names": {tid: end[tid]["name"] for tid in end}, "samples": samples}


def _sides(seen: dict) -> tuple[set[int], set[int]]:
    """The threads that computed in the window (a tenth of it or more), as (drafter's side: its name,
    inherited by its OpenMP threads; verify side: the rest). SGLang's other threads, which wake now and
    then on cores of their own choosing, are neither."""
    busy = {tid for tid, b in seen["burnt"].items() if b >= 0.1 * seen["wall"]}
    drafter = {tid for tid in busy if seen["names"][tid] == DRAFTER_THREAD}
    return drafter, busy - drafter


def test_plain_steps_use_every_core(wide_auto):
    """A window of plain decode steps: the target's threads burn >= 1.6 s of CPU per second of wall time on
    two cores (1.0x when the target decodes on one core, as before the split followed the step)."""
    server, trace = wide_auto
    pid = _scheduler_pid(server)
    load = [_start(server, p, 600) for p in ("hello there my friend", "once upon a time there")]
    _wait_for(trace, "plain", 20, load)
    seen = _watch(pid, WINDOW_S)
    assert all(t.is_alive() for t in load), "a request ended inside the measured window: make them longer"
    for t in load:
        t.join()
    window = [s for s in _steps(trace) if seen["t0"] < s["verify"][0] and s["verify"][1] < seen["t0"] + seen["wall"]]
    target = sum(b for tid, b in seen["burnt"].items() if seen["names"][tid] != DRAFTER_THREAD)
    figures = {
        "plain_steps": sum(s["mode"] == "plain" for s in window),
        "steps": len(window),
        # As the worker recorded it (absent from traces of before the cores followed the step).
        "cores_per_plain_step": sorted({s.get("verify_cores", 0) for s in window if s["mode"] == "plain"}),
        "target_cpu_per_wall": target / seen["wall"],
        "process_cpu_per_wall": sum(seen["burnt"].values()) / seen["wall"],
    }
    print(json.dumps(figures))
    # The window measured plain steps (the planner explores other options for a few steps now and then).
    assert figures["plain_steps"] >= 0.8 * figures["steps"] > 0, figures
    assert figures["target_cpu_per_wall"] >= 1.6, figures
    assert figures["cores_per_plain_step"] == [2], figures


def test_psd_steps_draft_and_verify_on_disjoint_cores_at_once(wide_psd):
    """PSD steps: whenever both sides have a thread running, their CPU sets are disjoint; both sides burn
    CPU most of the window, the process more than 1.3 s per second; and a PSD step takes at most 0.8x its
    own draft + verify (the stages ran at the same time)."""
    server, trace = wide_psd
    pid = _scheduler_pid(server)
    load = [_start(server, p) for p in ("hello there my friend", "once upon a time there")]
    _wait_for(trace, "psd", 5, load)
    seen = _watch(pid, WINDOW_S)
    assert all(t.is_alive() for t in load), "a request ended inside the measured window: make them longer"
    for t in load:
        t.join()
    drafter_side, verify_side = _sides(seen)
    both = [
        (
            frozenset().union(*(c for t, c in s.items() if t in drafter_side)),
            frozenset().union(*(c for t, c in s.items() if t in verify_side)),
        )
        for s in seen["samples"]
        if drafter_side & s.keys() and verify_side & s.keys()
    ]
    overlapping = [(d, v) for d, v in both if d & v]
    window = [s for s in _steps(trace) if seen["t0"] < s["verify"][0] and s["verify"][1] < seen["t0"] + seen["wall"]]
    psd = [s for s in window if s["mode"] == "psd"]
    drafter_cpu = sum(b for tid, b in seen["burnt"].items() if seen["names"][tid] == DRAFTER_THREAD)
    span = lambda interval: interval[1] - interval[0]  # noqa: E731
    figures = {
        "drafter_side_threads": len(drafter_side),
        "verify_side_threads": len(verify_side),
        "samples_both_running": len(both),
        "samples_sharing_a_core": len(overlapping),
        "drafter_cpu_per_wall": drafter_cpu / seen["wall"],
        "verify_cpu_per_wall": (sum(seen["burnt"].values()) - drafter_cpu) / seen["wall"],
        "process_cpu_per_wall": sum(seen["burnt"].values()) / seen["wall"],
        "psd_steps": len(psd),
        "steps": len(window),
        "step_over_draft_plus_verify": median(s["step_seconds"] / (span(s["draft"]) + span(s["verify"])) for s in psd),
    }
    print(json.dumps(figures))
    assert figures["psd_steps"] >= 0.9 * figures["steps"] > 0, figures
    assert figures["samples_both_running"] >= 20 and figures["samples_sharing_a_core"] == 0, figures
    # 1.60 alone on the machine; both threads on one core (the bug this test was first written for) gives
    # ~1.0.
    assert figures["process_cpu_per_wall"] >= 1.3, figures
    assert min(figures["drafter_cpu_per_wall"], figures["verify_cpu_per_wall"]) >= 0.5, figures
    assert figures["step_over_draft_plus_verify"] <= 0.8, figures
