"""A small causal LM as drafter, on its own device with its own KV cache.

SGLang's built-in STANDALONE drafter shares the target's device, KV pool and
scheduler step. PSD needs the opposite: a drafter that runs on another device
(or another core) while the target verifies. So the draft model runs here in
plain PyTorch, gpt-fast style: the transformers modules provide the weights
and layers, this file provides a batched forward over a slot-per-request KV
cache.

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

from minedraft_sglang.drafters.base import DraftOutput, DraftRequest
from minedraft_sglang.drafters.kv_cache import CachedDrafter, SlotKVCache

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
    def __init__(self, model_path: str, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        config = self.model.config
        self.cache = SlotKVCache(
            config.num_hidden_layers,
            config.num_key_value_heads,
            self.model.model.layers[0].self_attn.head_dim,
            dtype,
            self.device,
            _Slot,
        )

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
        slot.committed = n
        return req.tokens(keep)

    @torch.inference_mode()
    def prefill(self, reqs: Sequence[DraftRequest]) -> None:
        # One forward per request: prompts differ in length, and padding
        # them all to the longest would multiply the work.
        for req in reqs:
            slot = self.cache.slot(req.rid)
            if self.cache.is_scratch(slot) or len(slot.cached) >= len(req):
                continue
            feed = self._sync(slot, req)
            if len(slot.cached) + len(feed) > self.cache.max_len:
                continue
            tokens = torch.tensor([feed], device=self.device)
            positions = len(slot.cached) + torch.arange(len(feed), device=self.device)[None]
            valid = torch.ones_like(tokens, dtype=torch.bool)
            kv_len = len(slot.cached) + len(feed)
            self._forward(tokens, positions, valid, torch.tensor([slot.index], device=self.device), kv_len=kv_len)
            slot.cached.extend(feed)

    @torch.inference_mode()
    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int) -> DraftOutput:
        bs = len(reqs)
        slots = [self.cache.slot(r.rid) for r in reqs]
        feeds = [self._sync(s, r) for s, r in zip(slots, reqs)]
        # Requests that outgrew the cache still get a (useless) proposal of
        # the right shape: the target rejects it, so output stays exact.
        overflow = [
            self.cache.is_scratch(s) or len(s.cached) + len(f) + num_tokens > self.cache.max_len
            for s, f in zip(slots, feeds)
        ]
        width = max(len(f) for f in feeds)
        tokens = torch.zeros(bs, width, dtype=torch.long)
        positions = torch.zeros(bs, width, dtype=torch.long)
        valid = torch.zeros(bs, width, dtype=torch.bool)
        for i, (s, f) in enumerate(zip(slots, feeds)):
            if overflow[i]:
                continue
            tokens[i, : len(f)] = torch.tensor(f)
            positions[i] = len(s.cached) + torch.arange(width)
            valid[i, : len(f)] = True
        last = torch.tensor([max(len(f) - 1, 0) for f in feeds])
        slot_index = torch.tensor([s.index for s in slots])

        out_tokens = torch.zeros(bs, num_tokens, dtype=torch.long, device=self.device)
        out_probs = torch.zeros(bs, num_tokens, dtype=torch.float32, device=self.device)
        slot_index = slot_index.to(self.device)
        # Lengths are tracked on the host (positions are still CPU tensors
        # here), so no forward reads them back from the device.
        kv_len = int(positions.max()) + 1
        last_position = positions.gather(1, last[:, None])
        kv_len_next = int(last_position.max()) + 2
        hidden = self._forward(
            tokens.to(self.device), positions.to(self.device), valid.to(self.device), slot_index, kv_len=kv_len
        )
        logits = self._logits(hidden[torch.arange(bs, device=self.device), last.to(self.device)])
        positions = last_position.to(self.device)
        live = ~torch.tensor(overflow, device=self.device)[:, None]
        for step in range(num_tokens):
            probs = torch.softmax(logits.float(), dim=-1)
            out_probs[:, step], out_tokens[:, step] = probs.max(dim=-1)
            if step + 1 == num_tokens:
                break
            positions = positions + 1
            hidden = self._forward(
                out_tokens[:, step : step + 1], positions, live, slot_index, kv_len=kv_len_next + step
            )
            logits = self._logits(hidden[:, 0])

        drafted = out_tokens[:, : num_tokens - 1].tolist()
        for i, (s, f) in enumerate(zip(slots, feeds)):
            if not overflow[i]:
                s.cached.extend(f)
                s.cached.extend(drafted[i])
        return DraftOutput(tokens=out_tokens, probs=out_probs)

    def _forward(
        self,
        tokens: torch.Tensor,  # [bs, T]
        positions: torch.Tensor,  # [bs, T]
        valid: torch.Tensor,  # [bs, T] or broadcastable: False rows write to scratch
        slot_index: torch.Tensor,  # [bs]
        *,
        kv_len: int,  # max(positions) + 1
    ) -> torch.Tensor:
        """Hidden states [bs, T, H] before the final norm; writes the KV rows."""
        model = self.model.model
        h = model.embed_tokens(tokens)
        cos_sin = model.rotary_emb(h, positions)
        for layer_id, layer in enumerate(model.layers):
            h = h + self.cache.attention(
                layer_id,
                layer.self_attn,
                layer.input_layernorm(h),
                cos_sin,
                positions,
                valid,
                slot_index,
                kv_len=kv_len,
            )
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Only the positions that propose a token: with a 150k-token vocabulary
        # the LM head over a whole prompt would cost more than the layers.
        return self.model.lm_head(self.model.model.norm(hidden))
