"""Per-call time of the real drafter (``StandaloneDrafter.draft``) by batch size
and dtype, one core, outside SGLang; manual: docs/lab.md, "Draft speed"."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter

PROMPT_LEN = 160


def time_calls(drafter: StandaloneDrafter, *, batch: int, k: int, calls: int) -> list[float]:
    """Seconds of ``calls`` draft calls of ``batch`` requests, each call one
    step further along (as in serving: k drafts, one more real token)."""
    reqs = [DraftRequest(f"b{batch}-r{i}", list(range(100 + i, 100 + i + PROMPT_LEN)), [7]) for i in range(batch)]
    drafter.prefill(reqs)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = drafter.draft(reqs, k)
        times.append(time.perf_counter() - t0)
        # Accept the first draft: the next call feeds two tokens, as after a
        # partial acceptance.
        first = out.tokens[:, 0].tolist()
        reqs = [DraftRequest(r.rid, r.prompt, [*r.output, t, 7]) for r, t in zip(reqs, first)]
    for r in reqs:
        drafter.release(r.rid)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draft", required=True, help="draft model folder")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--calls", type=int, default=12, help="measured calls per setting (after one warm-up call)")
    p.add_argument("--core", type=int, default=1, help="the core to pin to")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {args.core})
    report = {"loadavg_start": os.getloadavg(), "settings": vars(args), "median_ms": {}}
    for dtype in args.dtypes.split(","):
        drafter = StandaloneDrafter(args.draft, "cpu", getattr(torch, dtype))
        batches = [int(b) for b in args.batches.split(",")]
        drafter.allocate(max(batches), PROMPT_LEN + 4 * (args.k + 2) * (args.calls + 1))
        for batch in batches:
            times = time_calls(drafter, batch=batch, k=args.k, calls=args.calls + 1)[1:]
            report["median_ms"][f"{dtype} b={batch}"] = round(1000 * statistics.median(times), 1)
            print(f"{dtype:9s} b={batch}: {1000 * statistics.median(times):7.1f} ms per call (k={args.k})", flush=True)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
