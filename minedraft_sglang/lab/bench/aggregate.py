"""The benchmark's numbers: from the replies and traced steps of each run's
repeats to one record per run (means over repeats), the ratios between runs,
and how far each run's greedy tokens follow the reference's. Pure functions.
Manual (what each metric is): docs/lab.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from statistics import mean, median, pstdev
from typing import TypedDict

from minedraft_sglang.lab.bench.plan import RunSpec
from minedraft_sglang.metrics import Interval, StepMode, StepRecord


class Sample(TypedDict):
    """One repeat of one run (measure.run_all writes them)."""

    # client.stream_one's replies, in prompt order.
    replies: list[dict]
    makespan: float
    # The steps the run's MINEDRAFT worker traced (none for plain, STANDALONE).
    steps: list[StepRecord]
    # The server's CPU seconds per second of the run, and its threads that
    # worked at least a fifth of the run (measure.run_once).
    cpu_per_wall: float
    busy_threads: int
    # CPU seconds per second the hypervisor took for other guests, on every
    # core (measure.run_once).
    steal_per_wall: float
    # Major page faults of the server's processes during the run.
    major_faults: int
    # The server's cores and how its threads use them (servers.threads).
    cores: str
    threads: str


def request_metrics(replies: list[dict], makespan: float) -> dict:
    """Throughput, TTFT, TPOT, latency per request and accept length of one
    repeat, from the client's timings and the servers' meta_info."""
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
        "tpot_ms": 1000
        * mean((r["latency_s"] - r["ttft_s"]) / max(1, r["meta_info"]["completion_tokens"] - 1) for r in replies),
        "makespan_per_request_ms": 1000 * makespan / len(metas),
    }


def _span(interval: Interval) -> float:
    return interval[1] - interval[0]


_STAGE_TIMES: dict[str, Callable[[list[StepRecord]], float]] = {
    # Medians: the per-token cost without the drafter's prompt prefill,
    # which lands in the first draft after a request joins.
    "t_draft_median_ms": lambda steps: 1000 * median(_span(s.draft) for s in steps),
    "t_verify_median_ms": lambda steps: 1000 * median(_span(s.verify) for s in steps),
    "t_step_median_ms": lambda steps: 1000 * median(s.step_seconds for s in steps),
    "in_step_tok_s": lambda steps: sum(sum(s.accept_lens) for s in steps) / sum(s.step_seconds for s in steps),
    "t_draft_step_ms": lambda steps: 1000 * mean(_span(s.draft) for s in steps),
    "t_verify_ms": lambda steps: 1000 * mean(_span(s.verify) for s in steps),
    "t_step_ms": lambda steps: 1000 * mean(s.step_seconds for s in steps),
    "mean_verify_bs": lambda steps: mean(s.verify_bs for s in steps),
    "mean_draft_bs": lambda steps: mean(s.draft_bs for s in steps),
}


def stage_times(steps: list[StepRecord]) -> dict:
    """Mean and median draft, verify and whole-step time (ms), batch sizes,
    and the tokens committed per second of step time (the rate while
    decoding: prefill and scheduler gaps between steps left out) of
    ``steps``; every value None without steps."""
    return {key: (f(steps) if steps else None) for key, f in _STAGE_TIMES.items()}


def draft_prefill_seconds(steps: list[StepRecord]) -> float:
    """Drafting time beyond the median draft of steps of the same mode and
    draft batch size: the drafter's prefill of newly joined prompts."""
    groups: dict[tuple, list[float]] = {}
    for s in steps:
        groups.setdefault((s.mode, s.draft_bs), []).append(_span(s.draft))
    return sum(max(0.0, d - median(ds)) for ds in groups.values() for d in ds)


def trace_metrics(spec: RunSpec, steps: list[StepRecord], n_requests: int) -> dict:
    """Step counts, stage times, overlap and drafter prefill per request of
    one repeat of ``spec``; all None for runs without a MINEDRAFT worker."""
    if spec.engine in ("plain", "plain-tp", "standalone"):
        return {
            "choices": None,
            "steps": None,
            "fallback_steps": None,
            **stage_times([]),
            "overlap": None,
            "draft_prefill_ms_per_request": None,
        }
    if spec.engine == "sequential":
        counted, overlap = steps, 0.0
        # Steps that verified a full batch: the start-up and the tail of a run
        # verify fewer requests and would blur the stage times at size b.
        timed = [s for s in steps if s.verify_bs == spec.concurrency] or steps
    else:
        # Steps where one sub-batch was empty (start-up, the tail) ran the
        # whole batch sequentially: fallback steps, left out of the figures.
        counted = timed = [s for s in steps if s.mode is StepMode.PSD]
        overlap = mean(s.overlap for s in counted) if counted else None
    return {
        "choices": choices(steps),
        "steps": len(counted),
        "fallback_steps": len(steps) - len(counted),
        **stage_times(timed),
        "overlap": overlap,
        "draft_prefill_ms_per_request": 1000 * draft_prefill_seconds(steps) / n_requests,
    }


def run_record(spec: RunSpec, samples: list[Sample]) -> dict:
    """``spec``'s fields, the means over repeats of every metric (of the
    repeats that have it), and each repeat's throughput."""
    per = [
        {
            **request_metrics(x["replies"], x["makespan"]),
            **trace_metrics(spec, x["steps"], len(x["replies"])),
            "cpu_per_wall": x.get("cpu_per_wall"),
            "busy_threads": x.get("busy_threads"),
            "steal_per_wall": x.get("steal_per_wall"),
            "major_faults": x.get("major_faults"),
        }
        for x in samples
    ]
    record = {}
    for key in per[0]:
        values = [p[key] for p in per if p[key] is not None]
        record[key] = (mean(values) if key != "choices" else _merge(values)) if values else None
    tputs = [p["throughput_tok_s"] for p in per]
    return {
        **{k: v for k, v in asdict(spec).items() if k != "flags"},
        "flags": list(spec.flags),
        "sub_batch_size": spec.sub_batch_size,
        "cores": samples[0].get("cores"),
        "threads": samples[0].get("threads"),
        **record,
        "throughput_repeats": tputs,
        "steal_repeats": [p["steal_per_wall"] for p in per],
        "major_faults_repeats": [p["major_faults"] for p in per],
        "throughput_stdev": pstdev(tputs),
    }


def _merge(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for key, n in c.items():
            out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def choices(steps: list[StepRecord]) -> dict[str, int]:
    """How many steps ran in each configuration: mode, drafts per request
    and the cores of verify + draft ("draft_ahead k3 1+1"), most taken first."""
    return _merge([{f"{s.mode} k{s.k} {s.verify_cores}+{s.draft_cores}": 1} for s in steps])


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(runs: list[dict]) -> None:
    """vs_plain, vs_standalone: throughput over that mode's at the same
    concurrency; vs_best_baseline: over the best of plain, plain --tp and
    STANDALONE (at every k run: the base -k, and STANDALONE-k6's) there,
    all on the same cores. Those are ratios of means over the rounds;
    vs_best_baseline_rounds pairs each round's throughput with the best
    baseline's of the same round (the machine drifts between rounds more
    than between neighbouring visits), and vs_best_baseline_median is their
    median."""

    def at(mode: str, c: int) -> float | None:
        return next((r["throughput_tok_s"] for r in runs if r["mode"] == mode and r["concurrency"] == c), None)

    for r in runs:
        c = r["concurrency"]
        r["vs_plain"] = ratio(r["throughput_tok_s"], at("plain", c))
        r["vs_standalone"] = ratio(r["throughput_tok_s"], at("STANDALONE", c))
        baselines = [b for b in runs if b["concurrency"] == c and b["throughput_tok_s"] and _is_baseline(b["mode"])]
        r["vs_best_baseline"] = ratio(
            r["throughput_tok_s"], max((b["throughput_tok_s"] for b in baselines), default=None)
        )
        rounds = (
            [a / max(b["throughput_repeats"][i] for b in baselines) for i, a in enumerate(r["throughput_repeats"])]
            if baselines
            else []
        )
        r["vs_best_baseline_rounds"] = rounds
        r["vs_best_baseline_median"] = median(rounds) if rounds else None


def _is_baseline(mode: str) -> bool:
    return mode in ("plain", "plain-tp") or mode.startswith("STANDALONE")


def summary(runs: list[dict]) -> dict:
    """psd's throughput over the others' at the same sub-batch size (B) and
    the same concurrency (2B), and psd's overlap; None where a run is absent."""
    by_name = {r["name"]: r for r in runs}
    tput = lambda name: by_name[name]["throughput_tok_s"] if name in by_name else None
    return {
        "psd_over_seq_same_sub_batch": ratio(tput("psd@2B"), tput("seq@B")),
        "psd_over_seq_same_concurrency": ratio(tput("psd@2B"), tput("seq@2B")),
        "psd_over_standalone_same_sub_batch": ratio(tput("psd@2B"), tput("STANDALONE@B")),
        "psd_over_standalone_same_concurrency": ratio(tput("psd@2B"), tput("STANDALONE@2B")),
        "psd_over_plain_same_concurrency": ratio(tput("psd@2B"), tput("plain@2B")),
        "seq_over_plain_same_concurrency": ratio(tput("seq@2B"), tput("plain@2B")),
        "standalone_over_plain_same_concurrency": ratio(tput("STANDALONE@2B"), tput("plain@2B")),
        "psd_overlap": by_name["psd@2B"]["overlap"] if "psd@2B" in by_name else None,
    }


def mismatches(replies: list[dict], reference: list[dict]) -> list[int]:
    """Indices of the prompts whose greedy tokens differ from the reference's."""
    return [i for i, (a, b) in enumerate(zip(replies, reference)) if a["output_ids"] != b["output_ids"]]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(samples: list[Sample], reference: list[dict]) -> dict:
    """How far each run's greedy tokens follow the reference's: the whole
    output in float32 (the contract); in bfloat16 a verify's wider matmuls
    round differently from a one-token decode, so a near tie can flip."""
    pairs = [(r["output_ids"], ref["output_ids"]) for x in samples for r, ref in zip(x["replies"], reference)]
    return {
        "identical_requests": sum(a == b for a, b in pairs),
        "requests": len(pairs),
        "mean_common_prefix": mean(common_prefix(a, b) for a, b in pairs),
    }
