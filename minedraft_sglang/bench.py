"""Side-by-side benchmark: plain decoding, sequential speculative decoding (SD)
and PSD, on the same models and prompts, in one invocation.

    python -m minedraft_sglang.bench [--quick] [--pair tiny|tiny-agree] [--out FILE.json]
    launch/bench_cpu.sh [same flags]          (adds the CPU environment)

Runs. B is --batch-size, the sub-batch size SD and PSD share:

    plain@B    no speculation, B requests in flight
    plain@2B   no speculation, 2B in flight
    seq@B      --minedraft-mode sequential, B in flight: SD at PSD's sub-batch size
    seq@2B     --minedraft-mode sequential, 2B in flight: SD at PSD's concurrency
    psd@2B     --minedraft-mode psd, 2B in flight: two sub-batches of B

Each server is started when its turn comes and stopped before the next one
starts (an idle SGLang scheduler busy-polls, so a second server would steal
cores from the one being measured). The client's
concurrency sets the running batch: every server gets --max-running-requests 2B,
the most any of its runs sends, so nothing ever queues in the server, and the
two runs of an engine share one server (one ~1 min startup fewer) with its
prefix cache flushed before each run. --parallel-startup (for tests) starts all
three at once with --sleep-on-idle and measures them one at a time once all
are up.

Metrics, per run (N requests, every one max_new_tokens long with ignore_eos):

    tok/s        sum(completion_tokens) / makespan; makespan is time.monotonic()
                 from before the first request is sent to after the last reply
    accept       mean accept length: sum(spec_accept_length * spec_verify_ct) /
                 sum(spec_verify_ct) over requests (= tokens per target verify,
                 the bonus token included); none for plain runs
    TPOT         mean over requests of e2e_latency / completion_tokens, where
                 e2e_latency is the server's receive-to-finish time of the
                 request (so queueing and prefill are included)
    lat/req      makespan / N: the paper's "end-to-end latency"
    t_d, t_v     mean draft interval (k draft steps, = k*t_d) and verify
                 interval per engine step, from --minedraft-trace-file; for psd
                 over its overlapped steps only (steps where one sub-batch was
                 empty run sequentially and are counted as fallback steps)
    t_step       mean engine step (first start to last end of the two intervals)
    overlap      mean trace "overlap" over psd steps (0 = back to back, 1 = the
                 shorter stage fully hidden); 0 for sequential runs

Ideal PSD speedup over SD at the same sub-batch size: (k*t_d + t_v) / max(k*t_d, t_v)
with k*t_d and t_v (the t_d and t_v columns) from seq@B's steps that verified a
full batch of B.

Greedy outputs of every run must equal plain@B's token for token: exactness is
the contract, so a difference makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from statistics import mean
from typing import Optional

import requests

from minedraft_sglang.launcher import Server, minedraft_args

# Varied English sentences (lengths, punctuation, a question, digits); the
# tiny models' tokenizer was trained on this vocabulary.
PROMPTS = [
    "The farmer walked to the old barn in the morning and",
    "Once upon a time, in a quiet village by the river, there lived a",
    "Alice opened the letter slowly because she knew that",
    "The history of science is full of simple ideas that",
    "When the winter came, the birds flew south and the",
    "Write a short story about a clever fox who learns to read.",
    "The server answered every request quickly, but the memory",
    "My teacher always said that the best answer to a hard question is",
    "In 1969 the city built a new bridge across the lake, and",
    "Why do cats sleep so much during the day?",
    "The recipe needs bread, cheese, honey and a cup of warm milk.",
    "After the storm, the children ran into the garden to look for",
    "A good program is easy to read, easy to test and",
    "The old king looked out of the castle window and saw",
    "Tomorrow we will walk through the forest to the mountain lake.",
    "Music, language and nature: three things that make life",
]

PAIRS = {
    # Unrelated random target and draft: acceptance near 1, so this measures
    # the machinery's cost, not a speedup from good drafts.
    "tiny": ("target", "draft"),
    # The draft agrees with the target on every token: acceptance k + 1.
    "tiny-agree": ("bigram", "bigram-draft"),
}

FULL = dict(num_prompts=32, max_new_tokens=64, batch_size=4)
QUICK = dict(num_prompts=8, max_new_tokens=16, batch_size=2)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for what each metric is.",
    )
    p.add_argument("--pair", choices=sorted(PAIRS), default="tiny",
                   help="tiny models to use (default tiny: unrelated target/draft)")
    p.add_argument("--target-path", help="target model folder (overrides --pair)")
    p.add_argument("--draft-path", help="draft model folder (overrides --pair)")
    p.add_argument("--num-prompts", "-n", type=int, help=f"N requests per run (default {FULL['num_prompts']})")
    p.add_argument("--max-new-tokens", type=int, help=f"tokens per request (default {FULL['max_new_tokens']})")
    p.add_argument("--batch-size", "-b", type=int,
                   help=f"B: SD's batch and PSD's sub-batch size (default {FULL['batch_size']})")
    p.add_argument("--num-steps", "-k", type=int, default=3, help="k draft tokens per verify (default 3)")
    p.add_argument("--seed", type=int, default=0, help="prompt order seed")
    p.add_argument("--prompts-file", help='jsonl, one {"prompt": ...} a line (default: built-in sentences)')
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes unless given: N={QUICK['num_prompts']}, "
                        f"max_new_tokens={QUICK['max_new_tokens']}, B={QUICK['batch_size']}")
    p.add_argument("--server-args", default="",
                   help='extra sglang arguments for every server, one string: --server-args="--flag value"')
    p.add_argument("--log-dir", help="keep server logs and traces here (default: a temporary folder)")
    p.add_argument("--parallel-startup", action="store_true",
                   help="start all servers at once (with --sleep-on-idle), then measure them one at a time: "
                        "faster startup, for tests; the default starts each when its turn comes")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds per server start")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if (args.target_path is None) != (args.draft_path is None):
        p.error("--target-path and --draft-path go together")
    if min(args.num_prompts, args.max_new_tokens, args.batch_size, args.num_steps) < 1:
        p.error("sizes must be >= 1")
    return args


def model_paths(args) -> tuple[str, str, str]:
    """(pair name, target folder, draft folder)."""
    if args.target_path:
        return "custom", args.target_path, args.draft_path
    # Imported here: it pulls in torch and transformers, which explicit paths
    # do not need.
    from minedraft_sglang import tiny_models

    target, draft = PAIRS[args.pair]
    return args.pair, str(tiny_models.model_path(target)), str(tiny_models.model_path(draft))


def make_prompts(n: int, seed: int, prompts_file: Optional[str]) -> list[str]:
    """N prompts: the source list reshuffled (fixed seed) as often as needed,
    so every prompt is used once before any is used twice."""
    source = PROMPTS
    if prompts_file:
        lines = Path(prompts_file).read_text().splitlines()
        source = [json.loads(line)["prompt"] for line in lines if line.strip()]
        if not source:
            sys.exit(f"error: {prompts_file} holds no prompts")
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        round_ = list(source)
        rng.shuffle(round_)
        prompts += round_
    return prompts[:n]


# ------------------------------------------------------------------ serving

def engine_args(engine: str, target: str, draft: str, k: int, max_running: int,
                trace: Path, extra: list[str]) -> list[str]:
    cap = ["--max-running-requests", str(max_running)]
    if engine == "plain":
        return ["--model-path", target, *cap, *extra]
    return minedraft_args(target, draft, engine, k, [*cap, "--minedraft-trace-file", str(trace), *extra])


def send_all(server: Server, prompts: list[str], max_new_tokens: int, concurrency: int) -> tuple[list[dict], float]:
    """Every prompt through /generate with at most ``concurrency`` in flight;
    returns the replies (in prompt order) and the makespan in seconds."""
    def one(prompt: str) -> dict:
        return server.generate(prompt, max_new_tokens, sampling={"ignore_eos": True})

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, prompts))
    return replies, time.monotonic() - t0


def flush_cache(server: Server) -> None:
    # Each run starts with an empty prefix cache, whatever ran before it on
    # this server. The server refuses while requests are still finishing.
    for _ in range(20):
        if requests.post(server.url + "/flush_cache", timeout=60).status_code == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{server.url}/flush_cache kept failing")


def read_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ metrics

def request_metrics(replies: list[dict], makespan: float) -> dict:
    metas = [r["meta_info"] for r in replies]
    tokens = sum(m["completion_tokens"] for m in metas)
    verifies = sum(m.get("spec_verify_ct", 0) for m in metas)
    accept = None
    if verifies:
        spec = [m for m in metas if m.get("spec_verify_ct")]
        accept = sum(m["spec_accept_length"] * m["spec_verify_ct"] for m in spec) / verifies
    return {
        "completion_tokens": tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan,
        "accept_length": accept,
        "verify_count": verifies,
        "tpot_ms": 1000 * mean(m["e2e_latency"] / m["completion_tokens"] for m in metas),
        "makespan_per_request_ms": 1000 * makespan / len(metas),
    }


def _span(interval) -> float:
    return interval[1] - interval[0]


def stage_times(steps: list[dict]) -> dict:
    """Mean draft, verify and whole-step time (ms) and batch sizes of ``steps``."""
    if not steps:
        return {"t_draft_step_ms": None, "t_verify_ms": None, "t_step_ms": None,
                "mean_verify_bs": None, "mean_draft_bs": None}
    return {
        "t_draft_step_ms": 1000 * mean(_span(s["draft"]) for s in steps),
        "t_verify_ms": 1000 * mean(_span(s["verify"]) for s in steps),
        "t_step_ms": 1000 * mean(max(s["draft"][1], s["verify"][1]) - min(s["draft"][0], s["verify"][0])
                                 for s in steps),
        "mean_verify_bs": mean(s["verify_bs"] for s in steps),
        "mean_draft_bs": mean(s["draft_bs"] for s in steps),
    }


def trace_metrics(engine: str, steps: list[dict]) -> dict:
    if engine == "plain":
        return {"steps": None, "fallback_steps": None, **stage_times([]), "overlap": None}
    if engine == "sequential":
        return {"steps": len(steps), "fallback_steps": 0, **stage_times(steps), "overlap": 0.0}
    psd = [s for s in steps if s["mode"] == "psd"]
    return {
        "steps": len(psd),
        # Steps where one sub-batch was empty (start-up, the tail) ran the
        # whole batch sequentially; they are left out of the stage times.
        "fallback_steps": len(steps) - len(psd),
        **stage_times(psd),
        "overlap": mean(s["overlap"] for s in psd) if psd else None,
    }


def ideal_bound(seq_steps: list[dict], batch_size: int) -> Optional[float]:
    """(k*t_d + t_v) / max(k*t_d, t_v) from SD's full-batch steps at size B:
    PSD's best throughput gain over SD at the same sub-batch size."""
    full = [s for s in seq_steps if s["verify_bs"] == batch_size] or seq_steps
    if not full:
        return None
    t_d = mean(_span(s["draft"]) for s in full)
    t_v = mean(_span(s["verify"]) for s in full)
    return (t_d + t_v) / max(t_d, t_v)


def mismatches(replies: list[dict], reference: list[dict]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(replies, reference)) if a["output_ids"] != b["output_ids"]]


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(args, pair: str, target: str, draft: str) -> dict:
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        # A busy machine skews every number; the load says how busy it was.
        "loadavg_start": list(os.getloadavg()),
        "torch": _version("torch"),
        "sglang": _version("sglang"),
        "pair": pair,
        "target": target,
        "draft": draft,
        "k": args.num_steps,
        "B": args.batch_size,
        "N": args.num_prompts,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "prompts_file": args.prompts_file,
        "quick": args.quick,
        "parallel_startup": args.parallel_startup,
        "server_args": args.server_args,
    }


# ------------------------------------------------------------------ report

COLUMNS = [
    # (header, key, format)
    ("run", "name", "{}"),
    ("conc", "concurrency", "{}"),
    ("tok/s", "throughput_tok_s", "{:.1f}"),
    ("accept", "accept_length", "{:.2f}"),
    ("TPOT ms", "tpot_ms", "{:.2f}"),
    ("lat/req ms", "makespan_per_request_ms", "{:.1f}"),
    ("t_d ms", "t_draft_step_ms", "{:.2f}"),
    ("t_v ms", "t_verify_ms", "{:.2f}"),
    ("t_step ms", "t_step_ms", "{:.2f}"),
    ("overlap", "overlap", "{:.2f}"),
    ("verify bs", "mean_verify_bs", "{:.1f}"),
]


def table(runs: list[dict]) -> str:
    rows = [[h for h, _, _ in COLUMNS]]
    for run in runs:
        rows.append([("-" if run[key] is None else fmt.format(run[key])) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def summary(by_name: dict[str, dict], bound: Optional[float]) -> dict:
    tput = {name: run["throughput_tok_s"] for name, run in by_name.items()}
    return {
        "ideal_psd_speedup": bound,
        "psd_over_seq_same_sub_batch": _ratio(tput["psd@2B"], tput["seq@B"]),
        "psd_over_seq_same_concurrency": _ratio(tput["psd@2B"], tput["seq@2B"]),
        "psd_over_plain_same_concurrency": _ratio(tput["psd@2B"], tput["plain@2B"]),
        "seq_over_plain_same_concurrency": _ratio(tput["seq@2B"], tput["plain@2B"]),
    }


# ------------------------------------------------------------------ main

# engine -> the concurrencies (in units of B) it is measured at.
PLAN = [("plain", (1, 2)), ("sequential", (1, 2)), ("psd", (2,))]
SHORT = {"plain": "plain", "sequential": "seq", "psd": "psd"}


class Engine:
    """One server configuration and the concurrencies (in units of B) it is
    measured at; its --max-running-requests is the largest of them."""

    def __init__(self, engine: str, units: tuple[int, ...], args, target: str, draft: str, workdir: Path):
        self.engine = engine
        self.units = units
        self.max_running = args.batch_size * max(units)
        self.trace = workdir / f"{engine}.trace.jsonl"
        extra = shlex.split(args.server_args)
        if args.parallel_startup:
            # The servers waiting their turn must not poll for work while
            # another one is measured.
            extra = ["--sleep-on-idle", *extra]
        self.cmd = engine_args(engine, target, draft, args.num_steps, self.max_running, self.trace, extra)
        self.log = workdir / f"{engine}.log"
        self.server: Optional[Server] = None

    def start(self) -> None:
        print(f"[bench] starting {self.engine} server (--max-running-requests {self.max_running}, log {self.log})",
              flush=True)
        self.started = time.monotonic()
        self.server = Server(self.cmd, self.log)

    def wait_ready(self, timeout: float) -> None:
        self.server.wait_ready(timeout)
        print(f"[bench]   {self.engine} ready {time.monotonic() - self.started:.0f} s after its start", flush=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def measure(e: Engine, args, prompts: list[str]) -> list[tuple[dict, list[dict], list[dict]]]:
    """Every run of one (ready) server: (run record, replies, trace steps) each."""
    B = args.batch_size
    # First-use costs (allocator growth, the drafter thread's start) are paid
    # here, with both PSD sub-batches filled, not inside a run.
    send_all(e.server, ["Warm up: the quick brown fox."] * e.max_running, min(8, args.max_new_tokens), e.max_running)
    out = []
    for units in e.units:
        name = f"{SHORT[e.engine]}@{'' if units == 1 else units}B"
        concurrency = units * B
        flush_cache(e.server)
        start = len(read_trace(e.trace))
        replies, makespan = send_all(e.server, prompts, args.max_new_tokens, concurrency)
        steps = read_trace(e.trace)[start:]
        record = {
            "name": name,
            "engine": e.engine,
            "concurrency": concurrency,
            "sub_batch_size": B if e.engine == "psd" else concurrency,
            "max_running_requests": e.max_running,
            **request_metrics(replies, makespan),
            **trace_metrics(e.engine, steps),
        }
        print(f"[bench]   {name}: {record['throughput_tok_s']:.1f} tok/s", flush=True)
        out.append((record, replies, steps))
    return out


def run_all(args, target: str, draft: str, prompts: list[str], workdir: Path) -> list:
    engines = [Engine(engine, units, args, target, draft, workdir) for engine, units in PLAN]
    results = []
    try:
        if args.parallel_startup:
            # Startups overlap, but every server is up (and idle) before the
            # first measurement starts.
            for e in engines:
                e.start()
            for e in engines:
                e.wait_ready(args.startup_timeout)
        for e in engines:
            if e.server is None:
                e.start()
                e.wait_ready(args.startup_timeout)
            results += measure(e, args, prompts)
            e.stop()
    finally:
        for e in engines:
            e.stop()
    return results


def print_report(args, runs: list[dict], s: dict, diffs: dict[str, list[int]]) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    B = args.batch_size
    print()
    print(table(runs))
    print()
    print(f"psd / seq throughput: {fmt(s['psd_over_seq_same_sub_batch'])}x at the same sub-batch size "
          f"(B={B}), {fmt(s['psd_over_seq_same_concurrency'])}x at the same concurrency ({2 * B})")
    print(f"ideal psd speedup (k*t_d + t_v) / max(k*t_d, t_v) from seq@B's stage times: "
          f"{fmt(s['ideal_psd_speedup'])}x")
    print(f"psd / plain at concurrency {2 * B}: {fmt(s['psd_over_plain_same_concurrency'])}x; "
          f"seq / plain: {fmt(s['seq_over_plain_same_concurrency'])}x")
    if s["outputs_identical"]:
        print(f"greedy outputs identical across all {len(runs)} runs "
              f"({args.num_prompts} prompts x {args.max_new_tokens} tokens)")
    for name, d in diffs.items():
        if d:
            print(f"MISMATCH: {name} differs from plain@B on prompts {d}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    pair, target, draft = model_paths(args)
    prompts = make_prompts(args.num_prompts, args.seed, args.prompts_file)
    env = environment(args, pair, target, draft)
    print(f"[bench] {pair}: target {target}, draft {draft}; k={args.num_steps} B={args.batch_size} "
          f"N={args.num_prompts} max_new_tokens={args.max_new_tokens}", flush=True)

    with tempfile.TemporaryDirectory(prefix="minedraft-bench-") as tmp:
        workdir = Path(args.log_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run_all(args, target, draft, prompts, workdir)
    env["loadavg_end"] = list(os.getloadavg())

    runs = [record for record, _, _ in results]
    by_name = {record["name"]: record for record in runs}
    replies = {record["name"]: r for record, r, _ in results}
    seq_steps = next(steps for record, _, steps in results if record["name"] == "seq@B")
    bound = ideal_bound(seq_steps, args.batch_size)
    by_name["psd@2B"]["ideal_psd_speedup"] = bound

    # Exactness is the contract: every run's greedy tokens equal plain@B's.
    diffs = {name: mismatches(r, replies["plain@B"]) for name, r in replies.items()}
    identical = not any(diffs.values())
    report = {
        "env": env,
        "runs": runs,
        "summary": {
            **summary(by_name, bound),
            "outputs_identical": identical,
            "mismatched_prompts": {name: d for name, d in diffs.items() if d},
        },
    }
    print_report(args, runs, report["summary"], diffs)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
