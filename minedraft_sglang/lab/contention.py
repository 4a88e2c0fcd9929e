"""How much PSD's two stages slow each other on this machine, outside SGLang; manual: docs/lab.md, "Contention"."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time

import torch

PROMPT_LEN = 160


def _pin(core: int) -> None:
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {core})


def _stage(name: str, args):
    """A zero-argument callable running one stage once."""
    dtype = getattr(torch, args.dtype)
    if name == "draft":
        from minedraft_sglang.drafters.base import DraftRequest
        from minedraft_sglang.drafters.standalone import StandaloneDrafter

        drafter = StandaloneDrafter(args.draft, "cpu", dtype)
        drafter.allocate(args.batch, PROMPT_LEN + 64)
        reqs = [DraftRequest(f"r{i}", list(range(100 + i, 100 + i + PROMPT_LEN)), [7]) for i in range(args.batch)]
        drafter.draft(reqs, args.k)
        return lambda: drafter.draft(reqs, args.k)
    from transformers import AutoModelForCausalLM, DynamicCache

    # .to(): some checkpoints keep norms in float32, which a plain forward then mixes.
    model = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).to(dtype).eval()
    prompt = torch.arange(100, 100 + PROMPT_LEN).repeat(args.batch, 1)
    window = torch.full((args.batch, args.k + 1), 7)
    cache = DynamicCache()
    with torch.inference_mode():
        model(prompt, past_key_values=cache, use_cache=True)

    def verify():
        with torch.inference_mode():
            model(window, past_key_values=cache, use_cache=True)
        cache.crop(-(args.k + 1))

    return verify


def _loop(name: str, args, core: int, start, stop, out) -> None:
    """Pin, build the stage, wait for ``start``, run until ``stop``; put the
    durations (seconds) in ``out``."""
    times = []
    try:
        _pin(core)
        run = _stage(name, args)
        run()
        start.wait()
        while not stop.is_set():
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    finally:
        # Also on failure: the parent waits for one entry per stage.
        out.put((name, times))


def measure(args, together: str | None, stages: tuple[str, ...]) -> dict[str, float]:
    """Median seconds per call of each stage in ``stages``, run at once as
    threads or processes (``together``), or one stage alone."""
    cores = {"verify": args.cores[0], "draft": args.cores[1]}
    if together == "processes":
        ctx = mp.get_context("spawn")
        start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        workers = [ctx.Process(target=_loop, args=(s, args, cores[s], start, stop, out)) for s in stages]
    else:
        import queue

        start, stop, out = threading.Event(), threading.Event(), queue.Queue()
        workers = [threading.Thread(target=_loop, args=(s, args, cores[s], start, stop, out)) for s in stages]
    for w in workers:
        w.start()
    time.sleep(args.warmup)  # model loading
    start.set()
    time.sleep(args.seconds)
    stop.set()
    results = dict(out.get() for _ in workers)
    for w in workers:
        w.join()
    if not all(results.values()):
        raise RuntimeError(f"a stage failed (see its traceback above): {sorted(results)}")
    return {s: statistics.median(results[s][1:] or results[s]) for s in stages}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("-b", "--batch", type=int, default=1)
    p.add_argument("--seconds", type=float, default=15, help="measured seconds per setting")
    p.add_argument("--warmup", type=float, default=25, help="seconds to load the models before measuring")
    p.add_argument(
        "--cores", type=lambda s: [int(c) for c in s.split(",")], default=[0, 1], help="verify core, draft core"
    )
    args = p.parse_args(argv)
    alone = {**measure(args, None, ("verify",)), **measure(args, None, ("draft",))}
    report = {"loadavg_start": os.getloadavg(), "alone_s": alone, "settings": vars(args)}
    for together in ("threads", "processes"):
        both = measure(args, together, ("verify", "draft"))
        report[f"{together}_s"] = both
        report[f"{together}_slowdown"] = {s: both[s] / alone[s] for s in both}
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
