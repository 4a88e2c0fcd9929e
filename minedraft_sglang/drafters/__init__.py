"""Drafters: one module per kind, all behind ``base.Drafter``."""

from __future__ import annotations

import os
import random

import torch

from minedraft_sglang import model_files
from minedraft_sglang.config import DRAFTER_FOR_ARCHITECTURE
from minedraft_sglang.drafters.base import Drafter


def create_drafter(
    *,
    device: str,
    model_path: str,
    target_path: str,
    target_dtype: torch.dtype,
    draft_compile: str = "auto",
    draft_vocab: str = "0",
    draft_weights: str = "checkpoint",
    draft_revision: str | None = None,
    target_revision: str | None = None,
) -> Drafter:
    """The drafter for the draft checkpoint's architecture (validated at
    startup by plugin.validate_server_args), on ``device``;
    ``draft_compile`` is ``--minedraft-draft-compile``, ``draft_vocab``
    ``--minedraft-draft-vocab`` and ``draft_weights``
    ``--minedraft-draft-weights`` (standalone drafters only). Either path may be a
    hub id (``model_files.local_dir``: the local Hugging Face cache's
    snapshot, as SGLang's loader resolves it)."""
    from transformers import AutoConfig

    model_path = model_files.local_dir(
        model_path, "--speculative-draft-model-path", revision=draft_revision, weights=True
    )
    dtype = drafter_dtype(device, target_dtype)
    mode = step_mode(device, draft_compile)
    arch = AutoConfig.from_pretrained(model_path).architectures[0]
    if DRAFTER_FOR_ARCHITECTURE[arch] == "standalone":
        from minedraft_sglang.drafters.standalone import StandaloneDrafter

        int8 = draft_weights == "int8" or (draft_weights == "auto" and torch.device(device).type == "cpu")
        drafter = StandaloneDrafter(model_path, device, dtype, step_mode=mode, vocab=draft_vocab, int8_weights=int8)
    else:
        from minedraft_sglang.drafters.eagle import EagleDrafter

        # An EAGLE head reads the target's embedding (and LM head) from its checkpoint.
        target_path = model_files.local_dir(target_path, "--model-path", revision=target_revision, weights=True)
        drafter = EagleDrafter(model_path, target_path, device, dtype, step_mode=mode)
    fault = os.environ.get(FAULT_ENV)
    return FaultInjectingDrafter(drafter, fault) if fault else drafter


def drafter_dtype(device: str, target_dtype: torch.dtype) -> torch.dtype:
    """The target's dtype, except float16 on CPU, which has no fast float16
    kernels: float32 there. (bfloat16 on CPU: the real 0.5B drafter's k=3 call
    took 373/478/615 ms at 1/4/8 requests against 432/794/937 ms in float32,
    lab/draft_speed, docs/benchmarks.md.) Drafts only propose; the dtype never
    changes what the target accepts as output."""
    if device == "cpu" and target_dtype == torch.float16:
        return torch.float32
    return target_dtype


def step_mode(device: str, draft_compile: str) -> str:
    """How a drafter's steps run (``kv_cache.StepRunner``) for
    ``--minedraft-draft-compile``. A GPU drafter replays CUDA graphs unless
    told "off": eagerly, a small drafter's step is launch-bound (~45 kernels
    per layer). A CPU drafter compiles only when told "on": torch.compile
    made the real 0.5B drafter's bfloat16 k=3 call slower, 594/659/720 ms at
    1/4/8 requests against 364/407/477 ms eager, and took 113-161 s to
    compile each new shape (lab/draft_speed, docs/benchmarks.md, 2026-11-26)."""
    if draft_compile == "off":
        return "eager"
    if torch.device(device).type == "cuda":
        return "graph"
    return "compile" if draft_compile == "on" else "eager"


# Test-only: comma-separated "KIND:P"; KIND draft_raise makes each draft call
# raise with probability P, prefill_raise each prefill call (after the inner
# drafter wrote its cache rows: the worst case for what must be released).
FAULT_ENV = "MINEDRAFT_FAULT_INJECT"
FAULT_KINDS = ("draft_raise", "prefill_raise")


def parse_faults(spec: str) -> dict[str, float]:
    """``{kind: probability}`` from a MINEDRAFT_FAULT_INJECT value; raises
    ValueError naming the variable on anything else."""
    faults = {}
    for part in spec.split(","):
        kind, _, prob = part.strip().partition(":")
        try:
            p = float(prob)
        except ValueError:
            p = -1.0
        if kind not in FAULT_KINDS or not 0 <= p <= 1:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected KIND:P[,KIND:P] with KIND in {FAULT_KINDS}, P in [0, 1]")
        faults[kind] = p
    return faults


class FaultInjectingDrafter(Drafter):
    """Wraps a drafter and fails some of its draft and prefill calls, for
    fault tests."""

    def __init__(self, inner: Drafter, spec: str):
        faults = parse_faults(spec)
        self.inner = inner
        self.device = inner.device
        self.needs_target_features = inner.needs_target_features
        self.weights = inner.weights
        self.prob = faults.get("draft_raise", 0.0)
        self.prefill_prob = faults.get("prefill_raise", 0.0)
        self.rng = random.Random(0)

    def draft(self, reqs, num_tokens, stop_below=0.0):
        if self.rng.random() < self.prob:
            raise RuntimeError(f"injected drafter fault ({FAULT_ENV})")
        return self.inner.draft(reqs, num_tokens, stop_below)

    def prefill(self, reqs):
        self.inner.prefill(reqs)
        if self.rng.random() < self.prefill_prob:
            raise RuntimeError(f"injected drafter prefill fault ({FAULT_ENV})")

    def allocate(self, max_requests, max_len, *, max_drafts=None):
        nbytes = self.inner.allocate(max_requests, max_len, max_drafts=max_drafts)
        self.step_graphs = self.inner.step_graphs
        return nbytes

    def observe(self, rid, start, features):
        self.inner.observe(rid, start, features)

    def release(self, rid):
        self.inner.release(rid)

    def active_rids(self):
        return self.inner.active_rids()

    def free_slots(self):
        return self.inner.free_slots()
