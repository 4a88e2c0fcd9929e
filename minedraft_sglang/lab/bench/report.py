"""The benchmark's report: the JSON document (env, runs, cost model, summary,
figures), the printed table and summary lines, the cost model's predictions
beside the measurements, and --rescore. Manual: docs/lab.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from minedraft_sglang.cpu.affinity import format_cores
from minedraft_sglang.lab import cost_model
from minedraft_sglang.lab.bench import plots
from minedraft_sglang.lab.bench.aggregate import (
    Sample,
    add_ratios,
    agreement,
    mismatches,
    run_record,
    summary,
    trace_metrics,
)
from minedraft_sglang.lab.bench.plan import RunSpec
from minedraft_sglang.metrics import StepMode


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(args: argparse.Namespace, *, argv: list[str], pair: str, target: str, draft: str) -> dict:
    """The report's "env": the machine, the software and the invocation
    (``args`` as cli.parse_args returns them, ``argv`` as given)."""
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        # Every server's CPU set; each run's threads are in its record.
        "cores": format_cores(args.cores),
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


def build(plan: list[RunSpec], samples: dict[str, list[Sample]], env: dict) -> dict:
    """The report of a measured ``plan``: env, one record per run (with its
    agreement with the reference), the cost model and the summary. The
    reference is the first run's first repeat (build_plan puts plain first);
    ``env["dtype"]`` says whether identity is enforced."""
    runs = [run_record(spec, samples[spec.name]) for spec in plan]
    add_ratios(runs)
    reference = samples[plan[0].name][0]["replies"]
    # Every repeat of every run must give the reference's greedy tokens.
    diffs = {
        spec.name: sorted({i for x in samples[spec.name] for i in mismatches(x["replies"], reference)}) for spec in plan
    }
    for run in runs:
        run["agreement"] = agreement(samples[run["name"]], reference)
    report = {"env": env, "runs": runs}
    report["cost_model"] = cost_model_report(report)
    report["summary"] = {
        **summary(runs),
        "outputs_identical": not any(diffs.values()),
        "mismatched_prompts": {name: d for name, d in diffs.items() if d},
        "exactness_enforced": env["dtype"] == "float32",
    }
    return report


def keeps_contract(report: dict) -> bool:
    """Whether every MINEDRAFT run's greedy tokens equal the reference's
    where that is promised (float32). STANDALONE's differences are reported
    only: SGLang's exactness is not this project's contract."""
    s = report["summary"]
    engines = {r["name"]: r["engine"] for r in report["runs"]}
    return not s["exactness_enforced"] or all(engines[name] == "standalone" for name in s["mismatched_prompts"])


# ------------------------------------------------------------------ cost model


def predictions(runs: list[dict], inputs: dict, env: dict) -> list[dict]:
    """Cost-model throughput (the finite run and the steady state) and step
    time for every speculative run the model covers (SD-like runs, plain
    psd), next to the measurement. Prefill per wave: plain decoding's TTFT at
    the same concurrency; the drafter's, per request, from the sequential runs."""
    ttft = {r["concurrency"]: r["ttft_ms"] / 1000 for r in runs if r["engine"] == "plain"}
    return [
        _prediction(r, inputs, env, model=model, psd=psd, slowdown=slowdown, ttft=ttft.get(r["concurrency"], 0.0))
        for r in runs
        for model, psd, slowdown in _cases(r, inputs)
    ]


def _cases(run: dict, inputs: dict) -> list[tuple[str, bool, tuple[float, float]]]:
    """(model name, psd, stage slowdowns) of each prediction for ``run``."""
    if run["engine"] in ("sequential", "standalone"):
        return [("sd", False, (1.0, 1.0))]
    # One request alone runs sequentially.
    if run["mode"] != "psd" or run["concurrency"] < 2:
        return []
    cases = [("psd isolated", True, (1.0, 1.0))]
    if inputs["slowdown"]:
        cases.append(("psd contention", True, inputs["slowdown"]))
    return cases


def _prediction(
    r: dict, inputs: dict, env: dict, *, model: str, psd: bool, slowdown: tuple[float, float], ttft: float
) -> dict:
    times, alpha, k = inputs["times"], inputs["alpha"], inputs["k"]
    b, c = r["sub_batch_size"], r["concurrency"]
    slowdowns = {"slowdown_draft": slowdown[0], "slowdown_verify": slowdown[1]}
    step = cost_model.psd_step(times, b, k, **slowdowns) if psd else cost_model.sd_step(times, b, k)
    seconds = cost_model.makespan(
        times,
        k=k,
        alpha=alpha,
        n_requests=env["N"],
        tokens=env["max_new_tokens"],
        in_flight=c,
        psd=psd,
        prefill_s=ttft,
        draft_prefill_s=inputs["draft_prefill_s"],
        **slowdowns,
    )
    tput = env["N"] * env["max_new_tokens"] / seconds
    # The model's step has no prompt prefill in it: the median step.
    measured_step = r["t_step_median_ms"] / 1000 if r.get("t_step_median_ms") else None
    return {
        "run": r["name"],
        "model": model,
        "predicted_tok_s": tput,
        "measured_tok_s": r["throughput_tok_s"],
        "error": cost_model.relative_error(tput, r["throughput_tok_s"]),
        "steady_state_tok_s": b * cost_model.accept_length(alpha, k) / step,
        "predicted_step_ms": 1000 * step,
        "measured_median_step_ms": r.get("t_step_median_ms"),
        "step_error": cost_model.relative_error(step, measured_step),
    }


def cost_model_report(report: dict) -> dict | None:
    """The cost model fitted to ``report``'s sequential runs, its prediction
    for every run it covers (the first one also set on the run as
    predicted_tok_s / prediction_error) and its plan at concurrency 2B; None
    without a sequential run to fit (--modes may leave none)."""
    if not any(r["engine"] == "sequential" for r in report["runs"]):
        return None
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
        "plan_isolated": cost_model.plan(times, alpha=inputs["alpha"], max_concurrency=2 * report["env"]["B"]),
    }


# ------------------------------------------------------------------ printed

COLUMNS = [
    # (header, key, format)
    ("run", "name", "{}"),
    ("conc", "concurrency", "{}"),
    ("cores", "cores", "{}"),
    ("threads", "threads", "{}"),
    ("cpu/wall", "cpu_per_wall", "{:.2f}"),
    ("steal", "steal_per_wall", "{:.2f}"),
    ("majflt", "major_faults", "{:.0f}"),
    ("tok/s", "throughput_tok_s", "{:.1f}"),
    ("x plain", "vs_plain", "{:.2f}"),
    ("x SA", "vs_standalone", "{:.2f}"),
    ("x best", "vs_best_baseline", "{:.2f}"),
    ("x best/round", "vs_best_baseline_median", "{:.2f}"),
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
    """One row per run, COLUMNS wide; "-" where a run has no value."""
    rows = [[h for h, _, _ in COLUMNS]]
    for run in runs:
        rows.append([("-" if run.get(key) is None else fmt.format(run[key])) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_report(report: dict) -> None:
    """The table, the psd ratios, the cost model and the exactness verdict."""
    runs, s, env = report["runs"], report["summary"], report["env"]
    B = env["B"]
    print()
    print(table(runs))
    print(f"cores of every server: {env['cores']}; x best: over the best of plain, plain --tp, STANDALONE")
    for run in runs:
        if run.get("choices"):
            top = ", ".join(f"{key} x{n}" for key, n in list(run["choices"].items())[:4])
            print(f"  {run['name']:<16} steps as (mode k verify+draft cores): {top}")
    print()
    print(
        f"psd / seq throughput: {_fmt(s['psd_over_seq_same_sub_batch'])}x at the same sub-batch size "
        f"(B={B}), {_fmt(s['psd_over_seq_same_concurrency'])}x at the same concurrency ({2 * B})"
    )
    print(
        f"psd / STANDALONE: {_fmt(s['psd_over_standalone_same_sub_batch'])}x at the same sub-batch size, "
        f"{_fmt(s['psd_over_standalone_same_concurrency'])}x at the same concurrency"
    )
    print(
        f"at concurrency {2 * B} over plain: psd {_fmt(s['psd_over_plain_same_concurrency'])}x, "
        f"seq {_fmt(s['seq_over_plain_same_concurrency'])}x, "
        f"STANDALONE {_fmt(s['standalone_over_plain_same_concurrency'])}x"
    )
    if report["cost_model"] is not None:
        print_cost_model(report["cost_model"], B)
    print_exactness(report)


def print_exactness(report: dict) -> None:
    runs, s, env = report["runs"], report["summary"], report["env"]
    if s["outputs_identical"]:
        print(
            f"greedy outputs identical across all {len(runs)} runs x {env['repeats']} repeats "
            f"({env['N']} prompts x {env['max_new_tokens']} tokens)"
        )
    if not s["exactness_enforced"]:
        print(
            "not float32: greedy outputs are compared, not required to match (batch-shape rounding); "
            "identical requests / mean common prefix with the reference plain run:"
        )
        for run in runs:
            a = run["agreement"]
            print(
                f"  {run['name']:<16} {a['identical_requests']}/{a['requests']}  {a['mean_common_prefix']:.1f} tokens"
            )
        return
    for name, d in s["mismatched_prompts"].items():
        print(f"MISMATCH: {name} differs from the reference plain run on prompts {d}")


def print_cost_model(cm: dict, B: int) -> None:
    print(
        f"cost model: alpha {cm['alpha']:.3f}, drafter prefill {cm['draft_prefill_s_per_request']:.2f} s "
        f"per request; ideal psd speedup (k*t_d + t_v) / max(k*t_d, t_v) at b={B}: "
        f"{_fmt(cm['ideal_psd_speedup'])}x"
    )
    for p in cm["predictions"]:
        step_error = "" if p["step_error"] is None else f" ({p['step_error']:+.0%})"
        print(
            f"  {p['run']:<14} {p['model']:<15} run {p['predicted_tok_s']:.2f} tok/s vs "
            f"{p['measured_tok_s']:.2f} measured ({p['error']:+.0%}); step {p['predicted_step_ms']:.1f} ms vs "
            f"median {_fmt(p['measured_median_step_ms'])}{step_error}; "
            f"steady state {p['steady_state_tok_s']:.2f} tok/s"
        )
    print("plan (two devices that share nothing), python -m minedraft_sglang.lab.cost_model --from OUT for more:")
    print(cost_model.format_plan(cm["plan_isolated"]))


# ------------------------------------------------------------------ files


def write_figures(
    plot_dir: Path, *, runs: list[dict], plan: list[RunSpec], samples: dict[str, list[Sample]], timeline_steps: int
) -> dict:
    """The throughput PNG, the timeline PNG (``timeline_steps`` steps of each
    MINEDRAFT run at B and 2B) and the Chrome trace (every step of the first
    repeat of every MINEDRAFT run) in ``plot_dir``; their paths by name."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "throughput_png": plot_dir / "throughput_vs_concurrency.png",
        "timeline_png": plot_dir / "timeline.png",
        "chrome_trace": plot_dir / "trace.chrome.json",
    }
    plots.throughput_vs_concurrency(runs, paths["throughput_png"])
    traced = [spec for spec in plan if spec.engine in ("sequential", "psd")]
    full = {spec.name: samples[spec.name][0]["steps"] for spec in traced}
    # The timeline shows the B and 2B runs only; extra concurrencies would
    # make it unreadable (they are all in the Chrome trace).
    few = {
        spec.name: plots.window(full[spec.name], timeline_steps, StepMode.PSD if spec.engine == "psd" else None)
        for spec in traced
        if spec.name.endswith(("@B", "@2B"))
    }
    plots.timeline(few, paths["timeline_png"])
    plots.chrome_trace(full, paths["chrome_trace"])
    return {k: str(v) for k, v in paths.items()}


def write_json(report: dict, out: str) -> None:
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def rescore(path: Path, out: str | None) -> int:
    """Trace metrics and cost model of a written report recomputed from the
    Chrome trace next to it (the first repeat's steps), e.g. after the
    cost model changed; request-level figures are kept as measured. Prints
    them, writes the new report to ``out`` if given; the exit status."""
    report = json.loads(path.read_text())
    traces = plots.read_chrome_trace(path.parent / "trace.chrome.json")
    for r in report["runs"]:
        if r["name"] in traces:
            spec = RunSpec(r["name"], r["mode"], r["engine"], r["concurrency"], tuple(r["flags"]))
            r.update(trace_metrics(spec, traces[r["name"]], report["env"]["N"]))
    report["cost_model"] = cost_model_report(report)
    report["rescored_from"] = str(path)
    print(table(report["runs"]))
    if report["cost_model"] is not None:
        print()
        print_cost_model(report["cost_model"], report["env"]["B"])
    if out:
        write_json(report, out)
        print(f"wrote {out}")
    return 0
