"""Cost model and planner for SD vs PSD (pure functions, no SGLang); manual: docs/lab.md, "Cost model"."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from minedraft_sglang.adaptive_k import accept_length


def alpha_from_accept_length(length: float, k: int) -> float:
    """The alpha whose accept_length(alpha, k) is ``length`` (bisection:
    accept_length grows monotonically in alpha)."""
    if not 1 <= length <= k + 1:
        raise ValueError(f"accept length must be in [1, k + 1 = {k + 1}], got {length}")
    # The curve is flat near alpha = 1, where bisection would stop short.
    if length == k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if accept_length(mid, k) < length:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class Linear:
    """y = intercept + slope * x."""

    intercept: float
    slope: float = 0.0

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    @staticmethod
    def fit(points: Sequence[tuple[float, float]]) -> Linear:
        """Least squares through (x, y) points; a constant when the x values
        do not vary. A negative slope (noise) is clamped to 0 so that bigger
        batches never get cheaper, and a negative intercept to 0 (a line
        through the origin) so that small batches never cost less than
        nothing."""
        if not points:
            raise ValueError("no points to fit")
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x, _ in points)
        if sxx == 0:
            return Linear(my)
        slope = sum((x - mx) * (y - my) for x, y in points) / sxx
        if slope < 0:
            return Linear(my)
        if my - slope * mx < 0:
            return Linear(0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points))
        return Linear(my - slope * mx, slope)


@dataclass(frozen=True)
class Measurement:
    """One sequential-SD operating point: b requests per step, k drafts each,
    seconds per draft step (one token) and per verify."""

    b: float
    k: int
    t_draft_token: float
    t_verify: float


@dataclass(frozen=True)
class StageTimes:
    draft: Linear  # seconds per draft step vs b
    verify: Linear  # seconds per verify vs verified tokens b*(k+1)

    def t_d(self, b: float) -> float:
        return self.draft(b)

    def t_v(self, b: float, k: int) -> float:
        return self.verify(b * (k + 1))

    @staticmethod
    def fit(points: Iterable[Measurement]) -> StageTimes:
        points = list(points)
        return StageTimes(
            draft=Linear.fit([(p.b, p.t_draft_token) for p in points]),
            verify=Linear.fit([(p.b * (p.k + 1), p.t_verify) for p in points]),
        )


def sd_step(times: StageTimes, b: float, k: int) -> float:
    return k * times.t_d(b) + times.t_v(b, k)


def psd_step(
    times: StageTimes, b: float, k: int, *, slowdown_draft: float = 1.0, slowdown_verify: float = 1.0
) -> float:
    return max(slowdown_draft * k * times.t_d(b), slowdown_verify * times.t_v(b, k))


def sd_throughput(times: StageTimes, b: float, k: int, alpha: float) -> float:
    """Output tokens/s of SD with b requests in flight."""
    return b * accept_length(alpha, k) / sd_step(times, b, k)


def psd_throughput(
    times: StageTimes, b: float, k: int, alpha: float, *, slowdown_draft: float = 1.0, slowdown_verify: float = 1.0
) -> float:
    """Output tokens/s of PSD with sub-batch b (2b in flight)."""
    return (
        b
        * accept_length(alpha, k)
        / psd_step(times, b, k, slowdown_draft=slowdown_draft, slowdown_verify=slowdown_verify)
    )


def makespan(
    times: StageTimes,
    *,
    k: int,
    alpha: float,
    n_requests: int,
    tokens: int,
    in_flight: int,
    psd: bool = False,
    prefill_s: float = 0.0,
    slowdown_draft: float = 1.0,
    slowdown_verify: float = 1.0,
    draft_prefill_s: float = 0.0,
) -> float:
    """Seconds for ``n_requests`` requests of ``tokens`` output tokens each,
    at most ``in_flight`` at once (see the module docstring)."""
    rounds = (tokens - 1) / accept_length(alpha, k)
    total, left = 0.0, n_requests
    while left > 0:
        wave = min(in_flight, left)
        left -= wave
        if psd and wave >= 2:
            per_round = 2 * psd_step(
                times, -(-wave // 2), k, slowdown_draft=slowdown_draft, slowdown_verify=slowdown_verify
            )
        else:
            per_round = sd_step(times, wave, k)
        total += prefill_s + wave * draft_prefill_s + rounds * per_round
    return total


def ideal_speedup(times: StageTimes, b: float, k: int) -> float:
    """PSD over SD at the same (sub-)batch size, no contention:
    (k*t_d + t_v) / max(k*t_d, t_v), between 1 and 2."""
    return sd_step(times, b, k) / psd_step(times, b, k)


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def plan(
    times: StageTimes,
    *,
    alpha: float,
    max_concurrency: int,
    k_max: int = 8,
    tpot_limit: float | None = None,
    slowdown_draft: float = 1.0,
    slowdown_verify: float = 1.0,
) -> dict:
    """Best (k, batch) for SD and best (k, sub-batch) for PSD by throughput,
    with at most ``max_concurrency`` requests in flight and, if given, TPOT
    (seconds) at most ``tpot_limit``. A mode with no feasible point is None."""

    def best(kind: str) -> dict | None:
        choice = None
        sizes = range(1, (max_concurrency if kind == "sd" else max_concurrency // 2) + 1)
        for k in range(1, k_max + 1):
            length = accept_length(alpha, k)
            for b in sizes:
                if kind == "sd":
                    step, tpot = sd_step(times, b, k), sd_step(times, b, k) / length
                else:
                    step = psd_step(times, b, k, slowdown_draft=slowdown_draft, slowdown_verify=slowdown_verify)
                    tpot = 2 * step / length
                if tpot_limit is not None and tpot > tpot_limit:
                    continue
                tput = b * length / step
                if choice is None or tput > choice["throughput"]:
                    choice = {
                        "k": k,
                        "batch": b,
                        "in_flight": b if kind == "sd" else 2 * b,
                        "throughput": tput,
                        "tpot_s": tpot,
                        "step_s": step,
                        "accept_length": length,
                    }
        return choice

    sd, psd = best("sd"), best("psd")
    return {
        "sd": sd,
        "psd": psd,
        "psd_over_sd": psd["throughput"] / sd["throughput"] if sd and psd else None,
    }


# ------------------------------------------------------------------ bench.json


def _stage_keys(runs: list[dict]) -> tuple[str, str]:
    """Median stage times where the report has them (the drafter's prompt
    prefill then is a separate input), else the means of older reports."""
    if all(r.get("t_draft_median_ms") for r in runs if r.get("t_draft_step_ms")):
        return "t_draft_median_ms", "t_verify_median_ms"
    return "t_draft_step_ms", "t_verify_ms"


def from_bench(report: dict) -> dict:
    """Cost-model inputs from a benchmark report (lab.bench --out): the sequential runs' stage
    times, drafter prefill and acceptance, and the psd run's slowdowns."""
    k = report["env"]["k"]
    runs = report["runs"]
    seq = [r for r in runs if r["engine"] == "sequential" and r.get("t_draft_step_ms")]
    if not seq:
        raise ValueError("the report has no sequential MINEDRAFT run with stage times")
    draft_key, verify_key = _stage_keys(runs)
    points = [
        Measurement(b=r["mean_verify_bs"], k=k, t_draft_token=r[draft_key] / 1000 / k, t_verify=r[verify_key] / 1000)
        for r in seq
    ]
    lengths = [r["accept_length"] for r in seq if r.get("accept_length")]
    alpha = alpha_from_accept_length(min(k + 1.0, max(1.0, sum(lengths) / len(lengths))), k)
    prefill = [r["draft_prefill_ms_per_request"] / 1000 for r in seq if r.get("draft_prefill_ms_per_request")]
    return {
        "k": k,
        "points": points,
        "times": StageTimes.fit(points),
        "alpha": alpha,
        "draft_prefill_s": sum(prefill) / len(prefill) if draft_key == "t_draft_median_ms" and prefill else 0.0,
        "slowdown": measured_slowdown(runs),
    }


def measured_slowdown(runs: list[dict]) -> tuple[float, float] | None:
    """(s_d, s_v): the psd run's stage times over those of the sequential run
    whose batch is the psd sub-batch size; None without such a pair."""
    draft_key, verify_key = _stage_keys(runs)
    seq = {r["concurrency"]: r for r in runs if r["engine"] == "sequential" and r.get(draft_key)}
    for r in runs:
        # Reports written before run modes existed name the engine only.
        if r.get("mode", r["engine"]) == "psd" and r.get(draft_key) and r["sub_batch_size"] in seq:
            base = seq[r["sub_batch_size"]]
            return r[draft_key] / base[draft_key], r[verify_key] / base[verify_key]
    return None


def format_plan(p: dict) -> str:
    def line(name: str, c: dict | None, unit: str) -> str:
        if c is None:
            return f"  {name}: no (k, batch) meets the limits"
        return (
            f"  {name}: k={c['k']} {unit}={c['batch']} ({c['in_flight']} in flight): "
            f"{c['throughput']:.2f} tok/s, TPOT {1000 * c['tpot_s']:.1f} ms, accept {c['accept_length']:.2f}"
        )

    ratio = "-" if p["psd_over_sd"] is None else f"{p['psd_over_sd']:.2f}x"
    return "\n".join([line("SD ", p["sd"], "batch"), line("PSD", p["psd"], "sub-batch"), f"  PSD / SD: {ratio}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="SD vs PSD plan from the benchmark's JSON report (python -m minedraft_sglang.lab.bench --out)"
    )
    ap.add_argument("--from", dest="report", required=True, help="JSON written by minedraft_sglang.lab.bench --out")
    ap.add_argument("--max-concurrency", type=int, help="requests in flight at most (default: the report's 2B)")
    ap.add_argument("--k-max", type=int, default=8, help="largest k to consider (default 8)")
    ap.add_argument("--tpot-limit-ms", type=float, help="per-request time per output token limit")
    args = ap.parse_args(argv)
    report = json.loads(open(args.report).read())
    inputs = from_bench(report)
    times, alpha, k = inputs["times"], inputs["alpha"], inputs["k"]
    concurrency = args.max_concurrency or 2 * report["env"]["B"]
    tpot_limit = args.tpot_limit_ms / 1000 if args.tpot_limit_ms else None
    print(f"inputs from {args.report} (k={k}):")
    for m in inputs["points"]:
        print(f"  b={m.b:.1f}: t_d {1000 * m.t_draft_token:.2f} ms/token, t_v {1000 * m.t_verify:.2f} ms")
    print(
        f"  fit: t_d(b) = {1000 * times.draft.intercept:.2f} + {1000 * times.draft.slope:.3f}*b ms, "
        f"t_v(b,k) = {1000 * times.verify.intercept:.2f} + {1000 * times.verify.slope:.3f}*b*(k+1) ms"
    )
    print(
        f"  alpha {alpha:.3f} (accept length {accept_length(alpha, k):.2f} at k={k}); "
        f"drafter prefill {1000 * inputs['draft_prefill_s']:.0f} ms per request"
    )
    limits = f"at most {concurrency} in flight" + (f", TPOT <= {args.tpot_limit_ms} ms" if tpot_limit else "")
    print(f"plan, two devices that do not slow each other down ({limits}):")
    print(format_plan(plan(times, alpha=alpha, max_concurrency=concurrency, k_max=args.k_max, tpot_limit=tpot_limit)))
    if inputs["slowdown"]:
        s_d, s_v = inputs["slowdown"]
        print(f"plan with the slowdown measured when both stages ran at once (draft x{s_d:.2f}, verify x{s_v:.2f}):")
        print(
            format_plan(
                plan(
                    times,
                    alpha=alpha,
                    max_concurrency=concurrency,
                    k_max=args.k_max,
                    tpot_limit=tpot_limit,
                    slowdown_draft=s_d,
                    slowdown_verify=s_v,
                )
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
