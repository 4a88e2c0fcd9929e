"""The measurement: --repeats rounds, each visiting every server (in reverse
order on odd rounds), each visit running that server's runs; one Sample per
run and round. Manual: docs/lab.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psutil
from tqdm import tqdm

from minedraft_sglang.cpu.affinity import format_cores, stat_fields
from minedraft_sglang.lab.bench.aggregate import Sample, request_metrics
from minedraft_sglang.lab.bench.client import flush_cache, send_all
from minedraft_sglang.lab.bench.plan import RunSpec
from minedraft_sglang.lab.bench.servers import ModeServer, Pool, ServerSettings, mode_servers, stop_all

T = TypeVar("T")


def order(servers: list[T], repeats: int) -> list[tuple[int, T]]:
    """(round, server) visits: every server each round, serpentine, so slow
    drift of the machine lands on every mode alike and the last server of a
    round is the first of the next (no restart between)."""
    visits = []
    for r in range(repeats):
        visits += [(r, s) for s in (servers if r % 2 == 0 else servers[::-1])]
    return visits


def run_all(
    plan: list[RunSpec],
    *,
    settings: ServerSettings,
    max_alive: int,
    repeats: int,
    prompts: list[str],
    max_new_tokens: int,
) -> dict[str, list[Sample]]:
    """Every run of ``plan`` ``repeats`` times, with at most ``max_alive``
    servers alive: run name -> one Sample per repeat. Every server is stopped
    on return, also on an error."""
    servers = mode_servers(plan, settings)
    visits = order(servers, repeats)
    pool = Pool([s for _, s in visits], max_alive)
    samples: dict[str, list[Sample]] = {spec.name: [] for spec in plan}
    bar = tqdm(total=repeats * len(plan) * len(prompts), unit="req", desc="bench", mininterval=1)
    try:
        for index, (round_, s) in enumerate(visits):
            pool.visit(index)
            for spec in s.specs:
                bar.set_description(f"{spec.name} #{round_ + 1}")
                sample = run_once(s, spec, prompts, max_new_tokens=max_new_tokens, on_done=lambda: bar.update(1))
                samples[spec.name].append(sample)
                tput = request_metrics(sample["replies"], sample["makespan"])["throughput_tok_s"]
                steal, faults = sample["steal_per_wall"], sample["major_faults"]
                tqdm.write(
                    f"[bench]   {spec.name} round {round_ + 1}: {tput:.1f} tok/s, steal {steal:.2f} cpu/wall, "
                    f"{faults} major faults"
                )
    finally:
        bar.close()
        # Every server: the pool's, and any started but never ready.
        stop_all(servers)
    return samples


def run_once(
    server: ModeServer, spec: RunSpec, prompts: list[str], *, max_new_tokens: int, on_done: Callable[[], None]
) -> Sample:
    """``spec`` on its ready ``server``, from an empty prefix cache."""
    url = server.server.url
    flush_cache(url)
    before = len(server.steps())
    pid = server.server.proc.pid
    cpu = thread_cpu_seconds(pid)
    faults = major_faults(pid)
    steal = psutil.cpu_times().steal
    replies, makespan = send_all(
        url, prompts, max_new_tokens=max_new_tokens, concurrency=spec.concurrency, on_done=on_done
    )
    used = thread_cpu_seconds(pid)
    stolen = psutil.cpu_times().steal - steal
    faulted = major_faults(pid) - faults
    burnt = [t - cpu.get(key, 0.0) for key, t in used.items()]
    return {
        "replies": replies,
        "makespan": makespan,
        "steps": server.steps()[before:],
        # The kernel's view of the hardware a run used: CPU seconds of the
        # server's processes per second of the run, and the threads that each
        # worked at least a fifth of it.
        "cpu_per_wall": sum(burnt) / makespan,
        "busy_threads": sum(b >= 0.2 * makespan for b in burnt),
        # CPU seconds per second the hypervisor gave to other guests (every
        # core, /proc/stat): a slow round with steal is the host's, not ours.
        "steal_per_wall": stolen / makespan,
        # Pages the server's processes waited on the disk for: memory the
        # kernel took back (a file mapping such as an mmapped checkpoint)
        # and the run needed again.
        "major_faults": faulted,
        "cores": format_cores(server.settings.cores),
        "threads": server.threads,
    }


def thread_cpu_seconds(pid: int) -> dict[tuple[int, int], float]:
    """User + system CPU seconds of every thread of ``pid`` and its
    descendants, by (process, thread) id."""
    out = {}
    for proc in _tree(pid):
        try:
            out.update({(proc.pid, t.id): t.user_time + t.system_time for t in proc.threads()})
        except psutil.NoSuchProcess:
            continue
    return out


def major_faults(pid: int) -> int:
    """Major page faults so far of ``pid`` and its descendants (their
    threads', exited ones included: /proc/PID/stat's majflt)."""
    total = 0
    for proc in _tree(pid):
        try:
            total += int(stat_fields(f"/proc/{proc.pid}/stat")[9])
        except OSError:  # the process ended meanwhile
            continue
    return total


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]
