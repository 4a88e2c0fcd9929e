"""Per-call time of the real drafter (``StandaloneDrafter.draft``) by step mode,
dtype and batch size, outside SGLang; manual: docs/lab.md, "Draft speed"."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time

import torch

from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter

PROMPT_LEN = 160
# Calls before the measured ones: under graphs or torch.compile the first
# captures or compiles the one step shape every later call uses.
WARMUP_CALLS = 1
# Random-weight models by shape (--shape): what a drafter of that shape costs.
SHAPES = {
    "qwen2.5-0.5b": {
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def random_model(shape: str, dtype: torch.dtype, device: str):
    """A Qwen2 causal LM of ``shape`` with random weights, built on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(Qwen2Config(**SHAPES[shape])).to(dtype).eval()


def time_calls(drafter: StandaloneDrafter, *, batch: int, k: int, calls: int) -> list[float]:
    """Seconds of ``calls`` draft calls of ``batch`` requests, each call one
    step further along (as in serving: k drafts, one more real token)."""
    reqs = [DraftRequest(f"b{batch}-r{i}", list(range(100 + i, 100 + i + PROMPT_LEN)), [7]) for i in range(batch)]
    drafter.prefill(reqs)
    times = []
    for _ in range(calls):
        _synchronize(drafter.device)
        t0 = time.perf_counter()
        out = drafter.draft(reqs, k)
        _synchronize(drafter.device)
        times.append(time.perf_counter() - t0)
        # Accept the first draft, then a correction: the drafter keeps the
        # accepted draft's cache row and feeds the correction, as after a
        # partial acceptance in serving.
        first = out.tokens[:, 0].tolist()
        reqs = [DraftRequest(r.rid, r.prompt, [*r.output, t, 7]) for r, t in zip(reqs, first)]
    for r in reqs:
        drafter.release(r.rid)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--draft", help="draft model folder")
    model.add_argument("--shape", choices=SHAPES, help="a random-weight model of this shape instead")
    p.add_argument("--device", default="cpu", help="cpu (pinned to --core, one thread) or cuda[:N]")
    p.add_argument(
        "--modes",
        default="eager",
        help="step modes (kv_cache.StepRunner), comma-separated: eager, compile (CPU), graph (CUDA)",
    )
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--calls", type=int, default=12, help=f"measured calls per setting (after {WARMUP_CALLS} warm-up)")
    p.add_argument("--cores", default="1", help="the cores to pin to, one thread each (CPU), e.g. 1 or 0,1")
    p.add_argument(
        "--vocabs",
        default="0",
        help="--minedraft-draft-vocab values, comma-separated (0: the whole vocabulary, or auto)",
    )
    p.add_argument(
        "--weights",
        default="checkpoint",
        help="--minedraft-draft-weights values, comma-separated: checkpoint (as loaded), int8",
    )
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        cores = {int(c) for c in args.cores.split(",")}
        torch.set_num_threads(len(cores))
        os.sched_setaffinity(0, cores)
    report = {"loadavg_start": os.getloadavg(), "settings": vars(args), "median_ms": {}, "warmup_s": {}}
    batches = [int(b) for b in args.batches.split(",")]
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        weights = args.draft or random_model(args.shape, dtype, args.device)
        settings = itertools.product(args.modes.split(","), args.vocabs.split(","), args.weights.split(","))
        for mode, vocab, stored in settings:
            drafter = StandaloneDrafter(
                weights, args.device, dtype, step_mode=mode, vocab=vocab, int8_weights=stored == "int8"
            )
            drafter.allocate(max(batches), PROMPT_LEN + 4 * (args.k + 2) * (args.calls + WARMUP_CALLS))
            for batch in batches:
                times = time_calls(drafter, batch=batch, k=args.k, calls=args.calls + WARMUP_CALLS)
                name = f"{mode} {dtype_name} b={batch}" + (f" vocab={vocab}" if vocab != "0" else "")
                name += f" weights={stored}" if stored != "checkpoint" else ""
                report["median_ms"][name] = round(1000 * statistics.median(times[WARMUP_CALLS:]), 2)
                report["warmup_s"][name] = round(sum(times[:WARMUP_CALLS]), 2)
                print(
                    f"{name:24s}: {report['median_ms'][name]:8.2f} ms per call (k={args.k}), "
                    f"warm-up {report['warmup_s'][name]:.1f} s",
                    flush=True,
                )
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
