"""A small causal LM as drafter, on its own device with its own KV cache.

SGLang's built-in STANDALONE drafter shares the target's device, KV pool and
scheduler step. PSD needs the opposite: a drafter that runs on another device
(or another core) while the target verifies. So the draft model runs here in
plain PyTorch, gpt-fast style: the transformers modules provide the weights
and layers, this file provides a batched forward over a slot-per-request KV
cache (``kv_cache.py``: the step and catch-up forwards).

Cache bookkeeping is by token ids, not by step: each slot remembers which
tokens its KV rows were computed from. At the next draft call the rows that
still match the request's real tokens are kept (the accepted drafts) and the
rest are recomputed. Rejected drafts, retraction and PEARL-style draft-ahead
all reduce to that one rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from minedraft_sglang import model_files
from minedraft_sglang.drafters import int8
from minedraft_sglang.drafters.base import DraftOutput, DraftRequest
from minedraft_sglang.drafters.draft_vocab import DraftVocab
from minedraft_sglang.drafters.kv_cache import (
    CachedDrafter,
    CatchUp,
    SlotKVCache,
    StepRunner,
    StreamHandoff,
    pack,
)

logger = logging.getLogger(__name__)


class _Slot:
    __slots__ = ("index", "cached", "committed")

    def __init__(self, index: int):
        self.index = index
        # Token ids whose KV rows are in the cache, positions 0..len-1.
        self.cached: list[int] = []
        # Length of the real sequence at the last draft call: rows before it
        # were computed from real tokens and never go stale.
        self.committed = 0


class StandaloneDrafter(CachedDrafter):
    def __init__(
        self,
        model: str | nn.Module,
        device: str,
        dtype: torch.dtype,
        *,
        step_mode: str = "eager",
        vocab: str = "0",
        int8_weights: bool = False,
    ):
        """``model``: a checkpoint folder or a transformers causal LM;
        ``step_mode``: how steps run (``kv_cache.StepRunner``); ``vocab``:
        the token ids drafted among, as ``--minedraft-draft-vocab`` says
        ("0": all; ``draft_vocab.py``); ``int8_weights``: linear layers and
        LM head in int8 (``int8.py``)."""
        self.device = torch.device(device)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        # Inference only: no weight requires grad, whatever the caller's grad
        # mode (SGLang allocates the drafter, so captures its step graphs,
        # with it on; kv_cache.py).
        model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.model = model_files.resident(int8.quantize(model) if int8_weights else model)
        self.weights = "int8" if int8_weights else "checkpoint"
        config = self.model.config
        attn = self.model.model.layers[0].self_attn
        self.cache = SlotKVCache(
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads,
            attn.head_dim,
            dtype,
            self.device,
            _Slot,
        )
        self.steps = StepRunner(self._step, step_mode, self.cache)
        self.vocab = DraftVocab.from_flag(self.model.lm_head.weight.shape[0], vocab, self.steps.mode)
        self.catch_up = CatchUp()
        self.handoff = StreamHandoff(self.device)

    def _sync(self, slot: _Slot, req: DraftRequest) -> list[int]:
        """Keep the cached rows that match the real tokens; return the tokens
        to feed (at least the last one, whose logits give the first draft)."""
        n = len(req)
        keep = slot.committed
        limit = min(len(slot.cached), n - 1)
        while keep < limit and slot.cached[keep] == req.token(keep):
            keep += 1
        keep = min(keep, limit)
        del slot.cached[keep:]
        if self.vocab.adaptive:
            # Only auto reads the new tokens: no copy of each prompt otherwise.
            self.vocab.observe(req.tokens(slot.committed))
        slot.committed = n
        return req.tokens(keep)

    def prefill(self, reqs: Sequence[DraftRequest]) -> None:
        with self.handoff():
            self._prefill(reqs)

    @torch.inference_mode()
    def _prefill(self, reqs: Sequence[DraftRequest]) -> None:
        feeds = []
        for req in reqs:
            slot = self.cache.slot(req.rid)
            if self.cache.is_scratch(slot) or len(slot.cached) >= len(req):
                continue
            feed = self._sync(slot, req)
            if len(slot.cached) + len(feed) <= self.cache.max_len:
                feeds.append((slot, feed))
        self._catch_up(feeds)

    def _catch_up(self, feeds: list[tuple[_Slot, list[int]]]) -> None:
        """Append ``feeds``' tokens to their slots' cache rows."""

        def forward(pieces):
            width = max(end - begin for _, begin, end in pieces)
            feed = pack(
                [(len(feeds[i][0].cached), feeds[i][1][begin:end]) for i, begin, end in pieces], len(pieces), width
            )
            slot_index = torch.tensor([feeds[i][0].index for i, _, _ in pieces])
            to = lambda t: t.to(self.device)
            self._forward(to(feed.tokens), to(feed.positions), to(feed.valid), to(slot_index), kv=feed.kv)
            for i, begin, end in pieces:
                feeds[i][0].cached.extend(feeds[i][1][begin:end])

        self.catch_up.run([len(f) for _, f in feeds], forward)

    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int, stop_below: float = 0.0) -> DraftOutput:
        with self.handoff():
            return self._draft(reqs, num_tokens, stop_below)

    @torch.inference_mode()
    def _draft(self, reqs: Sequence[DraftRequest], num_tokens: int, stop_below: float) -> DraftOutput:
        bs = len(reqs)
        slots = [self.cache.slot(r.rid) for r in reqs]
        feeds = [self._sync(s, r) for s, r in zip(slots, reqs)]
        # Requests that outgrew the cache still get a (useless) proposal of
        # the right shape: the target rejects it, so output stays exact.
        live = [
            not self.cache.is_scratch(s) and len(s.cached) + len(f) + num_tokens <= self.cache.max_len
            for s, f in zip(slots, feeds)
        ]
        widest = self.steps.widths[-1]
        self._catch_up([(s, f[:-1]) for s, f, ok in zip(slots, feeds, live) if ok and len(f) > widest])
        feeds = [(f[-1:] if len(f) > widest else f) if ok else [] for f, ok in zip(feeds, live)]

        # The first step feeds what each request has new; its last token's
        # logits give the first draft. Padding rows write to scratch.
        rows, width = self.steps.shape(bs, max([1, *map(len, feeds)]))
        feed = pack([(len(s.cached), f) for s, f in zip(slots, feeds)], rows, width)
        slot_index = torch.full((rows,), self.cache.scratch)
        for i, (s, f) in enumerate(zip(slots, feeds)):
            if f:
                slot_index[i] = s.index
        to = lambda t: t.to(self.device)
        slot_index, later, zeros = to(slot_index), to(feed.later_positions(num_tokens)), to(torch.zeros_like(feed.last))
        alive_t = to(torch.tensor(feed.alive)[:, None])

        out_tokens = torch.zeros(rows, num_tokens, dtype=torch.long, device=self.device)
        out_probs = torch.zeros(rows, num_tokens, dtype=torch.float32, device=self.device)
        ids, probs = self.steps(
            (to(feed.tokens), to(feed.positions), to(feed.valid), slot_index, to(feed.last)), feed.kv_at(0)
        )
        out_tokens[:, 0], out_probs[:, 0] = ids, probs
        # With a stop: the live requests whose chain goes on. Reading it waits
        # for the step, so without one nothing is computed or read.
        going = alive_t[:, 0] & (probs >= stop_below) if stop_below else None
        width = num_tokens
        for step in range(1, num_tokens):
            if going is not None and not going.any():
                width = step
                break
            ids, probs = self.steps(
                (out_tokens[:, step - 1 : step], later[:, step - 1 : step], alive_t, slot_index, zeros),
                feed.kv_at(step),
            )
            out_tokens[:, step], out_probs[:, step] = ids, probs
            if going is not None:
                going &= probs >= stop_below

        out_tokens, out_probs = out_tokens[:bs, :width], out_probs[:bs, :width]
        drafted = out_tokens[:, : width - 1].tolist()
        for s, f, d in zip(slots, feeds, drafted):
            if f:
                s.cached.extend(f)
                s.cached.extend(d)
        return DraftOutput(tokens=out_tokens, probs=out_probs)

    def _widest_feed(self, max_drafts: int) -> int:
        # The cache keeps the rows of a call's drafts but the last: after a
        # verify that accepted every draft the first step feeds the last one
        # and the bonus token, after a rejection the correction alone,
        # whatever k. Longer feeds (a newcomer's prompt, a request after
        # plain steps) catch up first.
        return 2

    def _padding(self, rows: int, width: int) -> list[tuple[torch.Tensor, ...]]:
        zeros = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        slot_index = torch.full((rows,), self.cache.scratch, device=self.device)
        return [(zeros, zeros, zeros.bool(), slot_index, zeros[:, 0])]

    def _step(self, tokens, positions, valid, slot_index, last, *, kv) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: the greedy token after column ``last`` of each row, and
        its probability."""
        hidden = self._forward(tokens, positions, valid, slot_index, kv=kv)
        hidden = hidden[torch.arange(tokens.shape[0], device=tokens.device), last]
        # Only the positions that propose a token: with a 150k-token
        # vocabulary the LM head over a whole prompt would cost more than the
        # layers.
        logits = int8.head_rows(self.model.lm_head, self.model.model.norm(hidden), self.vocab.rows)
        probs, ids = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return ids, probs

    def _forward(
        self,
        tokens: torch.Tensor,  # [bs, T]
        positions: torch.Tensor,  # [bs, T]
        valid: torch.Tensor,  # [bs, T] or broadcastable: False rows write to scratch
        slot_index: torch.Tensor,  # [bs]
        *,
        kv,  # SlotKVCache.rows
    ) -> torch.Tensor:
        """Hidden states [bs, T, H] before the final norm; writes the KV rows."""
        model = self.model.model
        h = model.embed_tokens(tokens)
        cos_sin = model.rotary_emb(h, positions)
        rows = self.cache.rows(positions, valid, slot_index, kv=kv)
        for layer_id, layer in enumerate(model.layers):
            h = h + self.cache.attention(layer_id, layer.self_attn, layer.input_layernorm(h), cos_sin, rows)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h
