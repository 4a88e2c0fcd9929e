"""Side-by-side benchmark: plain decoding, SGLang's STANDALONE speculative
decoding, MINEDRAFT sequential (classic SD) and MINEDRAFT psd, on the same
models, prompts and concurrency, in one invocation.

The command line (``python -m minedraft_sglang.lab.bench``, launch/bench_cpu.sh)
and main(), which ties plan, measurement and report together. Manual: docs/lab.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from minedraft_sglang.cpu.affinity import format_cores, parse_cores
from minedraft_sglang.lab.bench import report
from minedraft_sglang.lab.bench.measure import run_all
from minedraft_sglang.lab.bench.plan import FULL, PAIRS, QUICK, VARIANTS, build_plan, make_prompts, model_paths
from minedraft_sglang.lab.bench.servers import ServerSettings, served_dtype


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minedraft_sglang.lab.bench",
        description=__doc__.split("\n\n")[0],
        epilog="See docs/lab.md for what each metric is.",
    )
    p.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="tiny",
        help="tiny models to use (default tiny: unrelated target/draft)",
    )
    p.add_argument("--target-path", help="target model folder (overrides --pair)")
    p.add_argument("--draft-path", help="draft model folder (overrides --pair)")
    p.add_argument("--num-prompts", "-n", type=int, help=f"N requests per run (default {FULL['num_prompts']})")
    p.add_argument("--max-new-tokens", type=int, help=f"tokens per request (default {FULL['max_new_tokens']})")
    p.add_argument(
        "--batch-size", "-b", type=int, help=f"B: SD's batch and PSD's sub-batch size (default {FULL['batch_size']})"
    )
    p.add_argument("--num-steps", "-k", type=int, default=3, help="k draft tokens per verify (default 3)")
    p.add_argument("--repeats", "-r", type=int, default=1, help="rounds over all runs (default 1)")
    p.add_argument("--variants", type=_names, default=[], help=f"optional runs, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument(
        "--concurrency",
        type=_int_list,
        default=[],
        help="extra concurrencies (requests in flight) to run every mode at, e.g. 1,2,8",
    )
    p.add_argument(
        "--modes",
        type=_names,
        default=[],
        help="run only these modes (plain, STANDALONE, seq, psd, or a variant's such as adaptive) "
        "and plain, the exactness reference; default: all",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt order seed")
    p.add_argument("--prompts-file", help='jsonl, one {"prompt": ...} a line (default: built-in sentences)')
    p.add_argument("--prompt-set", help="a named set from minedraft_sglang.lab.prompt_sets (humaneval, mtbench, ...)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes unless given: N={QUICK['num_prompts']}, "
        f"max_new_tokens={QUICK['max_new_tokens']}, B={QUICK['batch_size']}",
    )
    p.add_argument(
        "--server-args",
        default="",
        help='extra sglang arguments for every server, one string: --server-args="--flag value"',
    )
    p.add_argument(
        "--cores",
        type=parse_cores,
        help="the CPU cores every server runs on, e.g. 0-1 (default: all this process may use); baselines "
        "use all of them (one thread per core, or one --tp rank per core), as MINEDRAFT does",
    )
    p.add_argument("--log-dir", help="keep server logs and traces here (default: a temporary folder)")
    p.add_argument(
        "--max-alive",
        type=int,
        choices=(1, 2, 3),
        help="servers alive at once, started together (default 1, with --quick 3: faster, for CI)",
    )
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds per server start")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--plot-dir", help="write the PNGs and the Chrome trace here (default: --out's folder)")
    p.add_argument("--timeline-steps", type=int, default=6, help="steps per run in the timeline PNG (default 6)")
    p.add_argument(
        "--rescore",
        metavar="REPORT",
        help="run nothing: recompute REPORT's trace metrics and cost model from the trace.chrome.json "
        "next to it (after a cost-model change), print them, write them to --out if given",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with the sizes --quick or the full run implies where
    not given; exits (status 2) on a contradiction."""
    p = _parser()
    args = p.parse_args(argv)
    if args.cores is None:
        args.cores = frozenset(os.sched_getaffinity(0))
    sizes = {**QUICK, "max_alive": 3} if args.quick else {**FULL, "max_alive": 1}
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    error = _contradiction(args)
    if error:
        p.error(error)
    return args


def _contradiction(args: argparse.Namespace) -> str | None:
    if args.prompts_file and args.prompt_set:
        return "--prompts-file and --prompt-set exclude each other"
    if (args.target_path is None) != (args.draft_path is None):
        return "--target-path and --draft-path go together"
    if min(args.num_prompts, args.max_new_tokens, args.batch_size, args.num_steps, args.repeats, *args.concurrency) < 1:
        return "sizes must be >= 1"
    if not args.cores <= os.sched_getaffinity(0):
        return f"--cores {format_cores(args.cores)}: not all among this process's cores"
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        return f"unknown variants {unknown}; known: {', '.join(VARIANTS)}"
    if {"eagle", "eagle3"} & set(args.variants) and (args.target_path or args.pair != "tiny"):
        return "the eagle/eagle3 variants use heads trained for the tiny target: --pair tiny only"
    return None


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark (or --rescore); the exit status is 1 when a
    MINEDRAFT run broke the exactness contract (report.keeps_contract)."""
    args = parse_args(argv)
    if args.rescore:
        return report.rescore(Path(args.rescore), args.out)
    pair, target, draft = model_paths(args.pair, args.target_path, args.draft_path)
    prompts = make_prompts(args.num_prompts, seed=args.seed, prompts_file=args.prompts_file, prompt_set=args.prompt_set)
    plan = build_plan(args.batch_size, args.variants, args.concurrency, modes=args.modes)
    env = report.environment(args, argv=sys.argv[1:] if argv is None else argv, pair=pair, target=target, draft=draft)
    tqdm.write(
        f"[bench] {pair}: target {target}, draft {draft}; k={args.num_steps} B={args.batch_size} "
        f"N={args.num_prompts} max_new_tokens={args.max_new_tokens} repeats={args.repeats}; "
        f"runs: {', '.join(s.name for s in plan)}"
    )

    with tempfile.TemporaryDirectory(prefix="minedraft-bench-") as tmp:
        workdir = Path(args.log_dir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        settings = ServerSettings(
            target=target,
            draft=draft,
            k=args.num_steps,
            extra=tuple(shlex.split(args.server_args)),
            workdir=workdir,
            startup_timeout=args.startup_timeout,
            warmup_prompts=tuple(prompts),
            warmup_tokens=args.max_new_tokens,
            cores=args.cores,
        )
        samples = run_all(
            plan,
            settings=settings,
            max_alive=args.max_alive,
            repeats=args.repeats,
            prompts=prompts,
            max_new_tokens=args.max_new_tokens,
        )
    env["loadavg_end"] = list(os.getloadavg())
    env["dtype"] = served_dtype(args.server_args)
    result = report.build(plan, samples, env)
    if args.out or args.plot_dir:
        plot_dir = Path(args.plot_dir or Path(args.out).parent)
        result["figures"] = report.write_figures(
            plot_dir, runs=result["runs"], plan=plan, samples=samples, timeline_steps=args.timeline_steps
        )
    report.print_report(result)
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}" + (f" and figures in {plot_dir}" if result.get("figures") else ""))
    return 0 if report.keeps_contract(result) else 1
