"""The drafter interface: everything PSD needs from a drafter, nothing more.

A drafter owns its model, its device and its KV cache. The worker hands it the
token ids of the requests to draft for and gets back k draft tokens per request
with their draft probabilities; acceptance is decided on the target side. Only
token ids cross devices.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class DraftRequest:
    rid: str
    # The request's tokens so far: prompt, then output. The drafter proposes
    # what follows ``output[-1]``. Both are read-only views of SGLang's lists.
    prompt: Sequence[int]
    output: Sequence[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]

    def tokens(self, start: int) -> list[int]:
        n = len(self.prompt)
        if start >= n:
            return list(self.output[start - n :])
        return list(self.prompt[start:]) + list(self.output)


@dataclasses.dataclass
class DraftOutput:
    tokens: torch.Tensor  # [bs, k] int64, on the drafter's device
    probs: torch.Tensor  # [bs, k] float32: draft probability of each token


class Drafter(abc.ABC):
    device: torch.device
    # EAGLE-style drafters read the target's hidden states (observe); the
    # target then captures them in prefill and verify (EAGLE-3: the layers
    # the worker asks for, eagle.target_capture).
    needs_target_features = False
    # How the weights are held: "checkpoint" (as loaded) or "int8" (int8.py).
    weights = "checkpoint"
    # The step graphs ``allocate`` captured (count, shape buckets, seconds);
    # None when steps do not run from graphs.
    step_graphs: dict | None = None

    def observe(self, rid: str, start: int, features: torch.Tensor) -> None:
        """The target's features of positions ``start``.. of a request (a
        prefill chunk, or the accepted positions of a verify)."""

    def prefill(self, reqs: Sequence[DraftRequest]) -> None:
        """Optionally compute the cache rows of the requests' tokens so far
        (their prompts) ahead of their first draft: the loop calls it on the
        drafter's thread while the target prefills the same prompts (a
        drafter on its own device), or just before a request's first draft
        (a CPU drafter, which shares the target's cores). Drafters that need
        the target's features of those tokens (EAGLE) cannot, and do nothing."""

    @abc.abstractmethod
    def allocate(self, max_requests: int, max_len: int, *, max_drafts: int | None = None) -> int:
        """Size the KV cache for up to ``max_requests`` requests of
        ``max_len`` tokens on the drafter's device; returns the bytes it
        takes at that size. ``max_drafts``: the most drafts a verify takes
        from one request (``--speculative-num-steps``; None: any number),
        which bounds the step shapes to prepare. Called with grad mode on
        (SGLang's ``Scheduler.init_memory_pools``)."""

    @abc.abstractmethod
    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int, stop_below: float = 0.0) -> DraftOutput:
        """Propose ``num_tokens`` tokens for each request. With
        ``stop_below`` > 0 (standalone drafters) a request's chain ends
        after its first token of probability below it, and drafting stops
        once every chain has ended: the output is then narrower (at least
        one token), each row as wide as the widest chain."""

    @abc.abstractmethod
    def release(self, rid: str) -> None:
        """Drop a request's draft state (finished, aborted or retracted)."""

    @abc.abstractmethod
    def active_rids(self) -> set[str]:
        """Requests that currently hold draft state."""

    @abc.abstractmethod
    def free_slots(self) -> int:
        """Free request slots in the drafter's KV cache."""


def read_on_this_stream(tensors: Sequence[torch.Tensor]) -> None:
    """``tensors`` were made on another thread's CUDA stream (features from
    ``observe`` on the scheduler's, drafts on the drafter's) and are read,
    then freed, on this one: tell the caching allocator, or it could hand
    their memory back to the first stream while this one still reads it."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(torch.cuda.current_stream(t.device))
