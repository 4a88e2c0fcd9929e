"""When does splitting the cores pay? The planner's rates (``adaptive_k``) on hypothetical machines.

    python -m minedraft_sglang.lab.core_split --t-verify-ms A,B --t-draft-ms C,D --alpha X [--k 3]

Given one-core stage costs (verify: A ms + B ms per verified token; one draft forward: C ms + D ms per
request), the acceptance alpha, and how much a second core speeds a stage up (``--speedups``), prints for
each draft/target cost ratio (``--draft-ratios``: the draft forward's cost over the verify's, both for
one token) and batch size the best option that runs each stage alone on both cores (plain or sequential
SD) and the best one that overlaps them on one core each (PSD or draft-ahead), and the ratio of their
rates. A ratio above 1 is where PSD's split pays on such a machine. Docs: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from minedraft_sglang.adaptive_k import OVERLAP, KPlanner, Option, options
from minedraft_sglang.metrics import StepMode


def planner(t_verify: tuple[float, float], t_draft: tuple[float, float], speedup: float, alpha: float, k: int):
    """A two-core planner that has measured these costs: one core's as given, two cores' ``speedup``
    times faster; ``t_verify`` = (s, s per token), ``t_draft`` = (s, s per request)."""
    p = KPlanner(k, total_cores=2, draft_core_counts=[1])
    for cores, scale in ((1, 1.0), (2, 1.0 / speedup)):
        for n in (1, 64):
            p.observe_verify(cores, n, scale * (t_verify[0] + t_verify[1] * n), 1)
        for b in (1, 16):
            p.observe_draft(cores, b, 1, scale * (t_draft[0] + t_draft[1] * b))
    p.accepted, p.offered = alpha, 1.0
    return p


def best(p: KPlanner, batch: int) -> tuple[tuple[Option, float], tuple[Option, float]]:
    """(best option alone, its rate), (best overlapping option, its rate) for ``batch`` requests."""
    halves = ((batch + 1) // 2, batch // 2)
    modes = {StepMode.PLAIN, StepMode.SEQUENTIAL, StepMode.DRAFT_AHEAD, *([StepMode.PSD] if batch > 1 else [])}
    rates = {o: p.rate(o, *halves) for o in options(p.k_max, modes, p.draft_core_counts)}
    alone = max((o for o in rates if o.mode not in OVERLAP), key=rates.get)
    overlap = max((o for o in rates if o.mode in OVERLAP), key=rates.get)
    return (alone, rates[alone]), (overlap, rates[overlap])


def _pair(text: str) -> tuple[float, float]:
    a, b = (float(x) / 1000 for x in text.split(","))
    return a, b


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minedraft_sglang.lab.core_split", description=__doc__)
    ap.add_argument("--t-verify-ms", type=_pair, required=True, help="one core: ms per verify, ms per token")
    ap.add_argument("--t-draft-ms", type=_pair, required=True, help="one core: ms per draft forward, ms per request")
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--speedups", type=_floats, default=[1.0, 1.3, 1.7, 2.0], help="two cores over one, per stage")
    ap.add_argument("--draft-ratios", type=_floats, help="draft forward / verify cost (default: the measured one)")
    ap.add_argument("--batches", type=_floats, default=[1, 2, 4, 8])
    args = ap.parse_args(argv)
    measured = (args.t_draft_ms[0] + args.t_draft_ms[1]) / (args.t_verify_ms[0] + args.t_verify_ms[1])
    print(f"measured draft/verify cost ratio {measured:.2f}; alpha {args.alpha}; k <= {args.k}")
    print("speedup  ratio  batch  best alone            best overlapping      overlap/alone")
    for speedup in args.speedups:
        for ratio in args.draft_ratios or [measured]:
            scale = ratio / measured
            draft = (args.t_draft_ms[0] * scale, args.t_draft_ms[1] * scale)
            p = planner(args.t_verify_ms, draft, speedup, args.alpha, args.k)
            for batch in map(int, args.batches):
                (alone, r_alone), (overlap, r_overlap) = best(p, batch)
                print(
                    f"{speedup:7.2f}  {ratio:5.2f}  {batch:5d}  {alone.mode.value:>10} k{alone.k} {r_alone:6.2f}/s  "
                    f"{overlap.mode.value:>11} k{overlap.k} {r_overlap:6.2f}/s  {r_overlap / r_alone:6.2f}x"
                )


if __name__ == "__main__":
    main()
