"""Side-by-side benchmark: plain decoding, SGLang's STANDALONE speculative
decoding, MINEDRAFT sequential (classic SD) and MINEDRAFT psd, on the same
models, prompts and concurrency, in one invocation.

    python -m minedraft_sglang.lab.bench [--quick] [--pair tiny|tiny-agree] [--out FILE.json]
    launch/bench_cpu.sh [same flags]          (adds the CPU environment)

Runs (a list of RunSpec: name, mode, engine, server flags, concurrency; runs
of one mode share a server). B is --batch-size, the sub-batch size SD and PSD
share:

    plain@B, plain@2B           no speculation
    STANDALONE@B, STANDALONE@2B SGLang's built-in SD, same draft model and k
    seq@B                       MINEDRAFT sequential: SD at PSD's sub-batch size
    seq@2B                      SD at PSD's concurrency (PSD keeps 2B in flight)
    psd@2B                      MINEDRAFT psd: two sub-batches of B
    tetris@2B                   psd with --minedraft-tetris (--variants tetris)
    adaptive@2B                 --minedraft-mode auto --minedraft-k auto: what a user
                                gets without choosing (--variants adaptive)
    psd-k1@2B, psd-k2@2B, ...   psd at fixed k = 1, 2, 4 (--variants ksweep; 2B only)
    eagle-seq@B, eagle@2B       sequential and psd with the tiny EAGLE head
    eagle3-seq@B, eagle3@2B     (--variants eagle,eagle3; tiny pair only)

--concurrency C1,C2,... adds a run of every mode at each of those
concurrencies (requests in flight), for the throughput-vs-concurrency plot.
Another drafter variant is one more entry in VARIANTS.

Order: --repeats R rounds; each round visits every server, in reverse order
on odd rounds, so slow drift of the machine lands on every mode alike (and
the last server of a round is the first of the next: no restart between).
Servers are started when their turn comes and stopped once they have no
visit left or to make room: one alive by default, so nothing else runs
while a server is measured. --max-alive 2 or 3 (--quick: 3) starts that
many together, which saves wall time (a server's start is mostly CPU-bound
imports) at the price of idle servers beside the measured one (they sleep:
serve_cpu.sh passes --sleep-on-idle). Every server gets
--max-running-requests equal to the largest concurrency it serves, so
nothing queues in the server; its prefix cache is flushed before each run.

Client: our own threads posting streamed /generate requests, not
sglang.bench_serving: exactness is the contract, and only /generate returns
each request's output token ids and its own spec_verify_ct /
spec_accept_length (bench_serving returns decoded texts and one
server-wide accept length); it also saves a client process start per run,
which the CI time budget cannot spare. The timings are the ones bench_serving
reports, taken the same way (client clock, streaming).

Metrics, per run (N requests, every one max_new_tokens long with ignore_eos;
with R > 1, the mean over repeats):

    tok/s        sum(completion_tokens) / makespan; makespan is time.monotonic()
                 from before the first request is sent to after the last reply
    TTFT         mean time from sending a request to its first streamed token
    TPOT         mean over requests of (latency - TTFT) / (tokens - 1)
    lat/req      makespan / N: the paper's "end-to-end latency"
    accept       mean accept length: sum(spec_accept_length * spec_verify_ct) /
                 sum(spec_verify_ct) over requests (= tokens per target verify,
                 the bonus token included); none for plain runs
    t_d, t_v     mean draft interval (k draft steps, = k*t_d) and verify
                 interval per engine step, from --minedraft-trace-file; for psd
                 over its overlapped steps only (steps where one sub-batch was
                 empty run sequentially and are counted as fallback steps)
    t_step       mean engine step (first start to last end of the two intervals)
    overlap      mean trace "overlap" over psd steps (0 = back to back, 1 = the
                 shorter stage fully hidden); 0 for sequential runs
    x plain, x SA   throughput over plain's / STANDALONE's at the same concurrency
    (JSON only)  medians of the stage and step times, which leave out the
                 drafter's prefill of newly joined prompts (it lands in their
                 first draft); that prefill per request (drafting beyond the
                 median); in_step_tok_s, tokens committed per second of step time

Cost model (minedraft_sglang/lab/cost_model.py): fitted to the sequential runs'
median stage times, drafter prefill and acceptance; its predicted throughput
and step are printed next to each measured speculative run with the relative
error. For psd two predictions: "isolated" (stage times as measured alone:
two devices that share nothing) and "contention" (with the slowdown each
stage showed in the psd run). --rescore REPORT recomputes the trace figures
and the cost model of a written report from the Chrome trace next to it.

Figures (--plot-dir, default next to --out): throughput vs concurrency per
mode, a timeline of draft/verify intervals per thread for a few steps of each
MINEDRAFT run, and every step of those runs as a Chrome trace JSON.

Greedy outputs of every run must equal the first plain run's token for token:
a MINEDRAFT run that differs makes the exit status 1 (STANDALONE's
differences are reported: SGLang's exactness is not this project's contract).
That holds in float32 (the default). With --server-args="--dtype bfloat16"
the outputs are compared and reported per run (identical requests, mean
common prefix), not required to match: a verify's wider matmuls round
differently from a one-token decode, for SGLang's own SD too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import sys
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from statistics import mean, median, pstdev
from typing import Callable, Optional

import requests
from tqdm import tqdm

from minedraft_sglang.lab import plots, cost_model
from minedraft_sglang.lab.launcher import Server, minedraft_args

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


@dataclass(frozen=True)
class RunSpec:
    """One measured run. ``mode`` names the server configuration (runs of
    one mode share a server); ``engine`` is plain, standalone or a
    --minedraft-mode; ``flags`` are extra server flags of the mode."""

    name: str
    mode: str
    engine: str
    concurrency: int
    flags: tuple[str, ...] = ()
    # False: run at this concurrency only, not at every --concurrency too.
    expand: bool = True

    @property
    def sub_batch_size(self) -> int:
        # PSD verifies one of its two halves per step (the bigger one).
        return (self.concurrency + 1) // 2 if self.engine == "psd" else self.concurrency


def base_runs(B: int) -> list[RunSpec]:
    return [
        RunSpec("plain@B", "plain", "plain", B),
        RunSpec("plain@2B", "plain", "plain", 2 * B),
        RunSpec("STANDALONE@B", "STANDALONE", "standalone", B),
        RunSpec("STANDALONE@2B", "STANDALONE", "standalone", 2 * B),
        RunSpec("seq@B", "seq", "sequential", B),
        RunSpec("seq@2B", "seq", "sequential", 2 * B),
        RunSpec("psd@2B", "psd", "psd", 2 * B),
    ]


# Optional runs (--variants NAME,...): a drafter variant is one more entry.
def _eagle_runs(head: str, B: int) -> list[RunSpec]:
    # The tiny heads are trained for the tiny target (tiny_eagle.py); no
    # EAGLE head for the real pair can be had offline.
    from minedraft_sglang.lab import tiny_eagle

    flags = ("--speculative-draft-model-path", str(tiny_eagle.model_path(head)))
    return [RunSpec(f"{head}-seq@B", f"{head}-seq", "sequential", B, flags),
            RunSpec(f"{head}@2B", head, "psd", 2 * B, flags)]


VARIANTS: dict[str, Callable[[int], list[RunSpec]]] = {
    "tetris": lambda B: [RunSpec("tetris@2B", "tetris", "psd", 2 * B, ("--minedraft-tetris",))],
    # What a user gets without choosing k or a mode: draft-ahead below two
    # requests, psd above, k chosen every step in 0..k (0: plain decoding).
    "adaptive": lambda B: [RunSpec("adaptive@2B", "adaptive", "psd", 2 * B,
                                   ("--minedraft-mode", "auto", "--minedraft-k", "auto"))],
    # psd at fixed k = 1, 2, 4 beside the base run's -k: what the adaptive
    # choice is measured against.
    "ksweep": lambda B: [RunSpec(f"psd-k{k}@2B", f"psd-k{k}", "psd", 2 * B,
                                 ("--speculative-num-steps", str(k)), expand=False) for k in (1, 2, 4)],
    "eagle": lambda B: _eagle_runs("eagle", B),
    "eagle3": lambda B: _eagle_runs("eagle3", B),
}


def build_plan(B: int, variants: list[str], concurrencies: list[int],
               modes: Optional[list[str]] = None) -> list[RunSpec]:
    runs = base_runs(B) + [spec for v in variants for spec in VARIANTS[v](B)]
    protos = OrderedDict((r.mode, r) for r in runs if r.expand)
    for c in concurrencies:
        for mode, proto in protos.items():
            if not any(r.mode == mode and r.concurrency == c for r in runs):
                runs.append(RunSpec(f"{mode}@{c}", mode, proto.engine, c, proto.flags))
    # The reference for the exactness check is the first run: plain first.
    return [r for r in runs if not modes or r.mode in modes or r.mode == "plain"]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


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
    p.add_argument("--repeats", "-r", type=int, default=1, help="rounds over all runs (default 1)")
    p.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=[],
                   help=f"optional runs, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--concurrency", type=_int_list, default=[],
                   help="extra concurrencies (requests in flight) to run every mode at, e.g. 1,2,8")
    p.add_argument("--modes", type=lambda s: [m for m in s.split(",") if m], default=[],
                   help="run only these modes (plain, STANDALONE, seq, psd, or a variant's such as adaptive) "
                        "and plain, the exactness reference; default: all")
    p.add_argument("--seed", type=int, default=0, help="prompt order seed")
    p.add_argument("--prompts-file", help='jsonl, one {"prompt": ...} a line (default: built-in sentences)')
    p.add_argument("--prompt-set", help="a named set from minedraft_sglang.lab.prompt_sets (humaneval, mtbench, ...)")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes unless given: N={QUICK['num_prompts']}, "
                        f"max_new_tokens={QUICK['max_new_tokens']}, B={QUICK['batch_size']}")
    p.add_argument("--server-args", default="",
                   help='extra sglang arguments for every server, one string: --server-args="--flag value"')
    p.add_argument("--log-dir", help="keep server logs and traces here (default: a temporary folder)")
    p.add_argument("--max-alive", type=int, choices=(1, 2, 3),
                   help="servers alive at once, started together (default 1, with --quick 3: faster, for CI)")
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds per server start")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot-dir", help="write the PNGs and the Chrome trace here (default: --out's folder)")
    p.add_argument("--timeline-steps", type=int, default=6, help="steps per run in the timeline PNG (default 6)")
    p.add_argument("--rescore", metavar="REPORT",
                   help="run nothing: recompute REPORT's trace metrics and cost model from the trace.chrome.json "
                        "next to it (after a cost-model change), print them, write them to --out if given")
    args = p.parse_args(argv)
    sizes = {**QUICK, "max_alive": 3} if args.quick else {**FULL, "max_alive": 1}
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.prompts_file and args.prompt_set:
        p.error("--prompts-file and --prompt-set exclude each other")
    if (args.target_path is None) != (args.draft_path is None):
        p.error("--target-path and --draft-path go together")
    if min(args.num_prompts, args.max_new_tokens, args.batch_size, args.num_steps, args.repeats,
           *args.concurrency) < 1:
        p.error("sizes must be >= 1")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if {"eagle", "eagle3"} & set(args.variants) and (args.target_path or args.pair != "tiny"):
        p.error("the eagle/eagle3 variants use heads trained for the tiny target: --pair tiny only")
    return args


def model_paths(args) -> tuple[str, str, str]:
    """(pair name, target folder, draft folder)."""
    if args.target_path:
        return "custom", args.target_path, args.draft_path
    # Imported here: it pulls in torch and transformers, which explicit paths
    # do not need.
    from minedraft_sglang.lab import tiny_models

    target, draft = PAIRS[args.pair]
    return args.pair, str(tiny_models.model_path(target)), str(tiny_models.model_path(draft))


def make_prompts(n: int, seed: int, prompts_file: Optional[str], prompt_set: Optional[str] = None) -> list[str]:
    """N prompts: the source list reshuffled (fixed seed) as often as needed,
    so every prompt is used once before any is used twice."""
    source = PROMPTS
    if prompt_set:
        from minedraft_sglang.lab import prompt_sets

        source = prompt_sets.load(prompt_set)
    elif prompts_file:
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

def server_args(spec: RunSpec, target: str, draft: str, k: int, max_running: int,
                trace: Path, extra: list[str]) -> list[str]:
    cap = ["--max-running-requests", str(max_running)]
    if spec.engine == "plain":
        return ["--model-path", target, *cap, *extra]
    if spec.engine == "standalone":
        return ["--model-path", target, "--speculative-algorithm", "STANDALONE",
                "--speculative-draft-model-path", draft, "--speculative-num-steps", str(k),
                "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", str(k + 1),
                *cap, *spec.flags, *extra]
    return minedraft_args(target, draft, spec.engine, k,
                          [*cap, "--minedraft-trace-file", str(trace), *spec.flags, *extra])


def stream_one(url: str, prompt: str, max_new_tokens: int) -> dict:
    """One streamed greedy /generate request: the final chunk (output_ids
    and meta_info) plus client-side ttft_s and latency_s."""
    payload = {"text": prompt, "stream": True,
               "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    t0 = time.monotonic()
    ttft, last = None, None
    with requests.post(url + "/generate", json=payload, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and chunk.get("output_ids"):
                ttft = time.monotonic() - t0
            last = chunk
    if last is None:
        raise RuntimeError(f"{url}/generate streamed nothing")
    return {**last, "ttft_s": ttft, "latency_s": time.monotonic() - t0}


def send_all(server: Server, prompts: list[str], max_new_tokens: int, concurrency: int,
             on_done: Callable[[], None] = lambda: None) -> tuple[list[dict], float]:
    """Every prompt with at most ``concurrency`` in flight; returns the
    replies (in prompt order) and the makespan in seconds."""
    def one(prompt: str) -> dict:
        reply = stream_one(server.url, prompt, max_new_tokens)
        on_done()
        return reply

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
        "ttft_ms": 1000 * mean(r["ttft_s"] for r in replies),
        "tpot_ms": 1000 * mean((r["latency_s"] - r["ttft_s"]) / max(1, r["meta_info"]["completion_tokens"] - 1)
                               for r in replies),
        "makespan_per_request_ms": 1000 * makespan / len(metas),
    }


def _span(interval) -> float:
    return interval[1] - interval[0]


def stage_times(steps: list[dict]) -> dict:
    """Mean draft, verify and whole-step time (ms), batch sizes, and the
    tokens committed per second of step time (the rate while decoding:
    prefill and scheduler gaps between steps left out) of ``steps``."""
    if not steps:
        return {"t_draft_step_ms": None, "t_verify_ms": None, "t_step_ms": None, "t_draft_median_ms": None,
                "t_verify_median_ms": None, "t_step_median_ms": None, "mean_verify_bs": None, "mean_draft_bs": None,
                "in_step_tok_s": None}
    return {
        # Medians: the per-token cost without the drafter's prompt prefill,
        # which lands in the first draft after a request joins.
        "t_draft_median_ms": 1000 * median(_span(s["draft"]) for s in steps),
        "t_verify_median_ms": 1000 * median(_span(s["verify"]) for s in steps),
        "t_step_median_ms": 1000 * median(s["step_seconds"] for s in steps),
        "in_step_tok_s": sum(sum(s["accept_lens"]) for s in steps) / sum(s["step_seconds"] for s in steps),
        "t_draft_step_ms": 1000 * mean(_span(s["draft"]) for s in steps),
        "t_verify_ms": 1000 * mean(_span(s["verify"]) for s in steps),
        "t_step_ms": 1000 * mean(max(s["draft"][1], s["verify"][1]) - min(s["draft"][0], s["verify"][0])
                                 for s in steps),
        "mean_verify_bs": mean(s["verify_bs"] for s in steps),
        "mean_draft_bs": mean(s["draft_bs"] for s in steps),
    }


def draft_prefill_seconds(steps: list[dict]) -> float:
    """Drafting time beyond the median draft of steps of the same mode and
    draft batch size: the drafter's prefill of newly joined prompts."""
    groups: dict[tuple, list[float]] = {}
    for s in steps:
        groups.setdefault((s["mode"], s["draft_bs"]), []).append(_span(s["draft"]))
    return sum(max(0.0, d - median(ds)) for ds in groups.values() for d in ds)


def trace_metrics(spec: RunSpec, steps: list[dict], n_requests: int) -> dict:
    if spec.engine in ("plain", "standalone"):
        return {"steps": None, "fallback_steps": None, **stage_times([]), "overlap": None,
                "draft_prefill_ms_per_request": None}
    prefill = {"draft_prefill_ms_per_request": 1000 * draft_prefill_seconds(steps) / n_requests}
    if spec.engine == "sequential":
        # Steps that verified a full batch: the start-up and the tail of a run
        # verify fewer requests and would blur the stage times at size b.
        full = [s for s in steps if s["verify_bs"] == spec.concurrency] or steps
        return {"steps": len(steps), "fallback_steps": 0, **stage_times(full), "overlap": 0.0, **prefill}
    psd = [s for s in steps if s["mode"] == "psd"]
    return {
        **prefill,
        "steps": len(psd),
        # Steps where one sub-batch was empty (start-up, the tail) ran the
        # whole batch sequentially; they are left out of the stage times.
        "fallback_steps": len(steps) - len(psd),
        **stage_times(psd),
        "overlap": mean(s["overlap"] for s in psd) if psd else None,
    }


def mismatches(replies: list[dict], reference: list[dict]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(replies, reference)) if a["output_ids"] != b["output_ids"]]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def served_dtype(server_args: str) -> str:
    """The --dtype the servers get (the launcher's float32 unless --server-args says otherwise)."""
    words = shlex.split(server_args)
    return next((words[i + 1] for i in range(len(words) - 1) if words[i] == "--dtype"), "float32")


def agreement(samples: list[dict], reference: list[dict]) -> dict:
    """How far each run's greedy tokens follow the reference's: the whole
    output in float32 (the contract); in bfloat16 a verify's wider matmuls
    round differently from a one-token decode, so a near tie can flip."""
    pairs = [(r["output_ids"], ref["output_ids"]) for x in samples for r, ref in zip(x["replies"], reference)]
    return {
        "identical_requests": sum(a == b for a, b in pairs),
        "requests": len(pairs),
        "mean_common_prefix": mean(common_prefix(a, b) for a, b in pairs),
    }


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(args, argv: list[str], pair: str, target: str, draft: str) -> dict:
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
        "repeats": args.repeats,
        "variants": args.variants,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "prompts_file": args.prompts_file,
        "prompt_set": args.prompt_set,
        "quick": args.quick,
        "max_alive": args.max_alive,
        "server_args": args.server_args,
        "command": shlex.join(["python", "-m", "minedraft_sglang.lab.bench", *argv]),
    }


# ------------------------------------------------------------------ servers

class ModeServer:
    """The server of one mode; its --max-running-requests is the largest
    concurrency among the mode's runs."""

    def __init__(self, mode: str, specs: list[RunSpec], args, target: str, draft: str, workdir: Path):
        self.mode = mode
        self.specs = specs
        self.max_running = max(s.concurrency for s in specs)
        self.trace = workdir / f"{mode}.trace.jsonl"
        extra = shlex.split(args.server_args)
        self.cmd = server_args(specs[0], target, draft, args.num_steps, self.max_running, self.trace, extra)
        self.workdir = workdir
        self.starts = 0
        self.server: Optional[Server] = None

    def start(self) -> None:
        log = self.workdir / f"{self.mode}.{self.starts}.log"
        self.starts += 1
        tqdm.write(f"[bench] starting {self.mode} server (--max-running-requests {self.max_running}, log {log})")
        self.started = time.monotonic()
        self.server = Server(self.cmd, log)

    def wait_ready(self, args, prompts: list[str]) -> None:
        self.server.wait_ready(args.startup_timeout)
        tqdm.write(f"[bench]   {self.mode} ready {time.monotonic() - self.started:.0f} s after its start")
        # First-use costs (allocator growth, the drafter thread's start) are
        # paid here, with every slot (both PSD sub-batches) filled.
        send_all(self.server, (prompts * self.max_running)[:self.max_running], min(8, args.max_new_tokens),
                 self.max_running)

    def stop(self) -> None:
        if self.server is not None:
            # After SIGTERM, SGLang's main process outlived Server.stop's 30 s
            # wait here (its children were gone within 6 s); nothing of a
            # benchmark server is worth keeping, so its process group is
            # killed at once, then Server.stop closes the log.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.proc.pid, signal.SIGKILL)
            self.server.proc.wait()
            self.server.stop()
            self.server = None


def stop_all(servers: list[ModeServer]) -> None:
    for s in servers:
        s.stop()


class Pool:
    """Serves ``visits`` in order with at most ``capacity`` servers alive.
    When a server must start, those with no visit left are stopped, then the
    least recently used ones while there is no room, and the next servers to
    be visited start together with it to fill the free places."""

    def __init__(self, visits: list["ModeServer"], capacity: int, args, prompts: list[str]):
        self.visits = visits
        self.alive: OrderedDict[str, ModeServer] = OrderedDict()
        self.capacity, self.args, self.prompts = capacity, args, prompts

    def get(self, index: int) -> Server:
        """The ready server of visit ``index``."""
        s = self.visits[index]
        if s.mode not in self.alive:
            upcoming = self.visits[index:]
            stop_all([self.alive.pop(m) for m in list(self.alive) if self.alive[m] not in upcoming])
            while len(self.alive) >= self.capacity:
                self.alive.popitem(last=False)[1].stop()
            group = []
            for t in upcoming:
                if t.mode not in self.alive and t not in group and len(group) < self.capacity - len(self.alive):
                    group.append(t)
            # Startups overlap, but every one is done before the next run.
            for t in group:
                t.start()
            for t in group:
                t.wait_ready(self.args, self.prompts)
                self.alive[t.mode] = t
        self.alive.move_to_end(s.mode)
        return s.server

    def close(self) -> None:
        stop_all(list(self.alive.values()))


def order(servers: list[ModeServer], repeats: int) -> list[tuple[int, ModeServer]]:
    """(round, server) visits: every server each round, serpentine."""
    visits = []
    for r in range(repeats):
        visits += [(r, s) for s in (servers if r % 2 == 0 else servers[::-1])]
    return visits


def run_all(args, plan: list[RunSpec], target: str, draft: str, prompts: list[str],
            workdir: Path) -> dict[str, list[dict]]:
    """Every run ``args.repeats`` times: run name -> one sample per repeat
    (replies, makespan, trace steps)."""
    by_mode = OrderedDict()
    for spec in plan:
        by_mode.setdefault(spec.mode, []).append(spec)
    servers = [ModeServer(mode, specs, args, target, draft, workdir) for mode, specs in by_mode.items()]
    samples: dict[str, list[dict]] = {spec.name: [] for spec in plan}
    visits = order(servers, args.repeats)
    pool = Pool([s for _, s in visits], args.max_alive, args, prompts)
    bar = tqdm(total=args.repeats * len(plan) * len(prompts), unit="req", desc="bench", mininterval=1)
    try:
        for index, (round_, s) in enumerate(visits):
            server = pool.get(index)
            for spec in s.specs:
                bar.set_description(f"{spec.name} #{round_ + 1}")
                flush_cache(server)
                start = len(read_trace(s.trace))
                replies, makespan = send_all(server, prompts, args.max_new_tokens, spec.concurrency,
                                             lambda: bar.update(1))
                samples[spec.name].append({"replies": replies, "makespan": makespan,
                                           "steps": read_trace(s.trace)[start:]})
                tput = sum(r["meta_info"]["completion_tokens"] for r in replies) / makespan
                tqdm.write(f"[bench]   {spec.name} round {round_ + 1}: {tput:.1f} tok/s")
    finally:
        bar.close()
        pool.close()
        stop_all(servers)
    return samples


def run_record(spec: RunSpec, samples: list[dict]) -> dict:
    """Means over repeats of every metric, and each repeat's throughput."""
    per = [{**request_metrics(x["replies"], x["makespan"]), **trace_metrics(spec, x["steps"], len(x["replies"]))}
           for x in samples]
    record = {}
    for key in per[0]:
        values = [p[key] for p in per if p[key] is not None]
        record[key] = mean(values) if values else None
    tputs = [p["throughput_tok_s"] for p in per]
    return {
        **{k: v for k, v in asdict(spec).items() if k != "flags"},
        "flags": list(spec.flags),
        "sub_batch_size": spec.sub_batch_size,
        **record,
        "throughput_repeats": tputs,
        "throughput_stdev": pstdev(tputs),
    }


# ------------------------------------------------------------------ report

COLUMNS = [
    # (header, key, format)
    ("run", "name", "{}"),
    ("conc", "concurrency", "{}"),
    ("tok/s", "throughput_tok_s", "{:.1f}"),
    ("x plain", "vs_plain", "{:.2f}"),
    ("x SA", "vs_standalone", "{:.2f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("TPOT ms", "tpot_ms", "{:.2f}"),
    ("lat/req ms", "makespan_per_request_ms", "{:.1f}"),
    ("accept", "accept_length", "{:.2f}"),
    ("t_d ms", "t_draft_step_ms", "{:.2f}"),
    ("t_v ms", "t_verify_ms", "{:.2f}"),
    ("t_step ms", "t_step_ms", "{:.2f}"),
    ("overlap", "overlap", "{:.2f}"),
    ("verify bs", "mean_verify_bs", "{:.1f}"),
    ("model tok/s", "predicted_tok_s", "{:.1f}"),
    ("err", "prediction_error", "{:+.0%}"),
]


def table(runs: list[dict]) -> str:
    rows = [[h for h, _, _ in COLUMNS]]
    for run in runs:
        rows.append([("-" if run.get(key) is None else fmt.format(run[key])) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def add_ratios(runs: list[dict]) -> None:
    """vs_plain, vs_standalone: throughput over that mode's at the same concurrency."""
    def at(mode: str, c: int) -> Optional[float]:
        return next((r["throughput_tok_s"] for r in runs if r["mode"] == mode and r["concurrency"] == c), None)

    for r in runs:
        r["vs_plain"] = _ratio(r["throughput_tok_s"], at("plain", r["concurrency"]))
        r["vs_standalone"] = _ratio(r["throughput_tok_s"], at("STANDALONE", r["concurrency"]))


def summary(by_name: dict[str, dict]) -> dict:
    tput = lambda name: by_name[name]["throughput_tok_s"] if name in by_name else None  # noqa: E731
    return {
        "psd_over_seq_same_sub_batch": _ratio(tput("psd@2B"), tput("seq@B")),
        "psd_over_seq_same_concurrency": _ratio(tput("psd@2B"), tput("seq@2B")),
        "psd_over_standalone_same_sub_batch": _ratio(tput("psd@2B"), tput("STANDALONE@B")),
        "psd_over_standalone_same_concurrency": _ratio(tput("psd@2B"), tput("STANDALONE@2B")),
        "psd_over_plain_same_concurrency": _ratio(tput("psd@2B"), tput("plain@2B")),
        "seq_over_plain_same_concurrency": _ratio(tput("seq@2B"), tput("plain@2B")),
        "standalone_over_plain_same_concurrency": _ratio(tput("STANDALONE@2B"), tput("plain@2B")),
        "psd_overlap": by_name["psd@2B"]["overlap"] if "psd@2B" in by_name else None,
    }


def predictions(runs: list[dict], inputs: dict, env: dict) -> list[dict]:
    """Cost-model throughput (the finite run and the steady state) and step
    time for every speculative run the model covers (SD-like runs, plain
    psd), next to the measurement. Prefill per wave: plain decoding's TTFT at
    the same concurrency; the drafter's, per request, from the sequential runs."""
    times, alpha, k = inputs["times"], inputs["alpha"], inputs["k"]
    ttft = {r["concurrency"]: r["ttft_ms"] / 1000 for r in runs if r["engine"] == "plain"}
    out = []
    for r in runs:
        b, c = r["sub_batch_size"], r["concurrency"]
        cases = []
        if r["engine"] in ("sequential", "standalone"):
            cases.append(("sd", False, (1.0, 1.0)))
        elif r["mode"] == "psd" and c >= 2:  # one request alone runs sequentially
            cases.append(("psd isolated", True, (1.0, 1.0)))
            if inputs["slowdown"]:
                cases.append(("psd contention", True, inputs["slowdown"]))
        for model, psd, slowdown in cases:
            step = cost_model.psd_step(times, b, k, *slowdown) if psd else cost_model.sd_step(times, b, k)
            seconds = cost_model.makespan(times, k, alpha, env["N"], env["max_new_tokens"], c, psd,
                                          ttft.get(c, 0.0), *slowdown, draft_prefill_s=inputs["draft_prefill_s"])
            tput = env["N"] * env["max_new_tokens"] / seconds
            # The model's step has no prompt prefill in it: the median step.
            measured_step = r["t_step_median_ms"] / 1000 if r.get("t_step_median_ms") else None
            out.append({
                "run": r["name"], "model": model,
                "predicted_tok_s": tput, "measured_tok_s": r["throughput_tok_s"],
                "error": cost_model.relative_error(tput, r["throughput_tok_s"]),
                "steady_state_tok_s": b * cost_model.accept_length(alpha, k) / step,
                "predicted_step_ms": 1000 * step,
                "measured_median_step_ms": r.get("t_step_median_ms"),
                "step_error": cost_model.relative_error(step, measured_step),
            })
    return out


def cost_model_report(report: dict, concurrency: int) -> dict:
    inputs = cost_model.from_bench(report)
    preds = predictions(report["runs"], inputs, report["env"])
    for r in report["runs"]:
        first = next((p for p in preds if p["run"] == r["name"]), None)
        r["predicted_tok_s"] = first and first["predicted_tok_s"]
        r["prediction_error"] = first and first["error"]
    times = inputs["times"]
    return {
        "k": inputs["k"],
        "alpha": inputs["alpha"],
        "t_draft_token_ms": {"intercept": 1000 * times.draft.intercept, "per_request": 1000 * times.draft.slope},
        "t_verify_ms": {"intercept": 1000 * times.verify.intercept, "per_token": 1000 * times.verify.slope},
        "slowdown": inputs["slowdown"],
        "draft_prefill_s_per_request": inputs["draft_prefill_s"],
        "ideal_psd_speedup": cost_model.ideal_speedup(times, report["env"]["B"], inputs["k"]),
        "predictions": preds,
        "plan_isolated": cost_model.plan(times, inputs["alpha"], concurrency),
    }


def print_report(args, runs: list[dict], s: dict, cm: dict, diffs: dict[str, list[int]]) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    B = args.batch_size
    print()
    print(table(runs))
    print()
    print(f"psd / seq throughput: {fmt(s['psd_over_seq_same_sub_batch'])}x at the same sub-batch size "
          f"(B={B}), {fmt(s['psd_over_seq_same_concurrency'])}x at the same concurrency ({2 * B})")
    print(f"psd / STANDALONE: {fmt(s['psd_over_standalone_same_sub_batch'])}x at the same sub-batch size, "
          f"{fmt(s['psd_over_standalone_same_concurrency'])}x at the same concurrency")
    print(f"at concurrency {2 * B} over plain: psd {fmt(s['psd_over_plain_same_concurrency'])}x, "
          f"seq {fmt(s['seq_over_plain_same_concurrency'])}x, "
          f"STANDALONE {fmt(s['standalone_over_plain_same_concurrency'])}x")
    if cm is not None:
        print_cost_model(cm, B)
    if s["outputs_identical"]:
        print(f"greedy outputs identical across all {len(runs)} runs x {args.repeats} repeats "
              f"({args.num_prompts} prompts x {args.max_new_tokens} tokens)")
    if not s["exactness_enforced"]:
        print("not float32: greedy outputs are compared, not required to match (batch-shape rounding); "
              "identical requests / mean common prefix with the reference plain run:")
        for run in runs:
            a = run["agreement"]
            print(f"  {run['name']:<16} {a['identical_requests']}/{a['requests']}  {a['mean_common_prefix']:.1f} tokens")
        return
    for name, d in diffs.items():
        if d:
            print(f"MISMATCH: {name} differs from the reference plain run on prompts {d}")


def print_cost_model(cm: dict, B: int) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"cost model: alpha {cm['alpha']:.3f}, drafter prefill {cm['draft_prefill_s_per_request']:.2f} s "
          f"per request; ideal psd speedup (k*t_d + t_v) / max(k*t_d, t_v) at b={B}: "
          f"{fmt(cm['ideal_psd_speedup'])}x")
    for p in cm["predictions"]:
        step_error = "" if p["step_error"] is None else f" ({p['step_error']:+.0%})"
        print(f"  {p['run']:<14} {p['model']:<15} run {p['predicted_tok_s']:.2f} tok/s vs "
              f"{p['measured_tok_s']:.2f} measured ({p['error']:+.0%}); step {p['predicted_step_ms']:.1f} ms vs "
              f"median {fmt(p['measured_median_step_ms'])}{step_error}; steady state {p['steady_state_tok_s']:.2f} tok/s")
    print("plan (two devices that share nothing), python -m minedraft_sglang.lab.cost_model --from OUT for more:")
    print(cost_model.format_plan(cm["plan_isolated"]))


def rescore(path: Path, out: Optional[str]) -> int:
    """Trace metrics and cost model of a written report recomputed from the
    Chrome trace next to it (the first repeat's steps), e.g. after the
    cost model changed; request-level figures are kept as measured."""
    report = json.loads(path.read_text())
    traces = plots.read_chrome_trace(path.parent / "trace.chrome.json")
    for r in report["runs"]:
        if r["name"] in traces:
            spec = RunSpec(r["name"], r["mode"], r["engine"], r["concurrency"], tuple(r["flags"]))
            r.update(trace_metrics(spec, traces[r["name"]], report["env"]["N"]))
    report["cost_model"] = cost_model_report(report, 2 * report["env"]["B"])
    report["rescored_from"] = str(path)
    print(table(report["runs"]))
    print()
    print_cost_model(report["cost_model"], report["env"]["B"])
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


def write_figures(plot_dir: Path, runs: list[dict], plan: list[RunSpec], samples: dict, steps: int) -> dict:
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {"throughput_png": plot_dir / "throughput_vs_concurrency.png",
             "timeline_png": plot_dir / "timeline.png",
             "chrome_trace": plot_dir / "trace.chrome.json"}
    plots.throughput_vs_concurrency(runs, paths["throughput_png"])
    traced = [spec for spec in plan if spec.engine in ("sequential", "psd")]
    full = {spec.name: samples[spec.name][0]["steps"] for spec in traced}
    # The timeline shows the B and 2B runs only; extra concurrencies would
    # make it unreadable (they are all in the Chrome trace).
    few = {spec.name: plots.window(full[spec.name], steps, "psd" if spec.engine == "psd" else None)
           for spec in traced if spec.name.endswith(("@B", "@2B"))}
    plots.timeline(few, paths["timeline_png"])
    plots.chrome_trace(full, paths["chrome_trace"])
    return {k: str(v) for k, v in paths.items()}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.rescore:
        return rescore(Path(args.rescore), args.out)
    pair, target, draft = model_paths(args)
    prompts = make_prompts(args.num_prompts, args.seed, args.prompts_file, args.prompt_set)
    plan = build_plan(args.batch_size, args.variants, args.concurrency, args.modes)
    env = environment(args, sys.argv[1:] if argv is None else argv, pair, target, draft)
    tqdm.write(f"[bench] {pair}: target {target}, draft {draft}; k={args.num_steps} B={args.batch_size} "
               f"N={args.num_prompts} max_new_tokens={args.max_new_tokens} repeats={args.repeats}; "
               f"runs: {', '.join(s.name for s in plan)}")

    with tempfile.TemporaryDirectory(prefix="minedraft-bench-") as tmp:
        workdir = Path(args.log_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        samples = run_all(args, plan, target, draft, prompts, workdir)
    env["loadavg_end"] = list(os.getloadavg())

    runs = [run_record(spec, samples[spec.name]) for spec in plan]
    add_ratios(runs)
    by_name = {r["name"]: r for r in runs}

    # Exactness: every repeat of every run gives the reference's greedy tokens.
    reference = samples[plan[0].name][0]["replies"]
    diffs = {spec.name: sorted({i for x in samples[spec.name] for i in mismatches(x["replies"], reference)})
             for spec in plan}
    ours_identical = not any(diffs[s.name] for s in plan if s.engine != "standalone")
    env["dtype"] = served_dtype(args.server_args)
    exact = env["dtype"] == "float32"
    for run in runs:
        run["agreement"] = agreement(samples[run["name"]], reference)
    report = {"env": env, "runs": runs}
    # The model is fitted to the sequential runs; --modes may leave none.
    fitted = any(spec.engine == "sequential" for spec in plan)
    report["cost_model"] = cost_model_report(report, 2 * args.batch_size) if fitted else None
    report["summary"] = {
        **summary(by_name),
        "outputs_identical": not any(diffs.values()),
        "mismatched_prompts": {name: d for name, d in diffs.items() if d},
        "exactness_enforced": exact,
    }
    if args.out or args.plot_dir:
        plot_dir = Path(args.plot_dir or Path(args.out).parent)
        report["figures"] = write_figures(plot_dir, runs, plan, samples, args.timeline_steps)
    print_report(args, runs, report["summary"], report["cost_model"], diffs)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}" + (f" and figures in {plot_dir}" if report.get("figures") else ""))
    # Only float32 promises token identity (see agreement()).
    return 0 if ours_identical or not exact else 1


if __name__ == "__main__":
    sys.exit(main())
