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
from typing import Sequence

import torch
import torch.nn.functional as F

from minedraft_sglang.drafters.base import DraftOutput, Drafter, DraftRequest

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

# Request slots allocated up front; the cache doubles when they run out.
INITIAL_SLOTS = 8


class _Slot:
    __slots__ = ("index", "cached", "committed")

    def __init__(self, index: int):
        self.index = index
        # Token ids whose KV rows are in the cache, positions 0..len-1.
        self.cached: list[int] = []
        # Length of the real sequence at the last draft call: rows before it
        # were computed from real tokens and never go stale.
        self.committed = 0


class StandaloneDrafter(Drafter):
    def __init__(self, model_path: str, device: str, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        arch = (config.architectures or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"draft model architecture {arch} is not supported by the standalone "
                f"drafter (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
            .to(self.device)
            .eval()
        )
        self.config = self.model.config
        self.vocab_size = self.config.vocab_size
        attn = self.model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.slots: dict[str, _Slot] = {}
        self.free: list[int] = []
        self.k_cache = self.v_cache = None
        self.max_len = 0

    def allocate(self, max_requests: int, max_len: int) -> int:
        """Set the limits; memory grows with the number of requests that
        hold draft state at once (doubling, up to ``max_requests``)."""
        self.max_requests = max_requests
        self.max_len = max_len
        self._resize(min(INITIAL_SLOTS, max_requests))
        num_layers = len(self.model.model.layers)
        per_slot = 2 * num_layers * max_len * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return per_slot * (max_requests + 1)

    def _resize(self, capacity: int) -> None:
        # Slots keep their index; the last index is a scratch slot that
        # absorbs the writes of padding tokens.
        num_layers = len(self.model.model.layers)
        shape = (num_layers, capacity + 1, self.max_len, self.num_kv_heads, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k_cache is not None:
            old = self.k_cache.shape[1] - 1
            k[:, :old] = self.k_cache[:, :old]
            v[:, :old] = self.v_cache[:, :old]
            self.free.extend(range(old, capacity))
        else:
            self.free = list(range(capacity))
        self.k_cache, self.v_cache = k, v
        self.scratch = capacity

    def kv_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def release(self, rid: str) -> None:
        slot = self.slots.pop(rid, None)
        if slot is not None:
            self.free.append(slot.index)

    def active_rids(self) -> set[str]:
        return set(self.slots)

    def free_slots(self) -> int:
        return len(self.free) + self.max_requests - self.scratch

    def _slot(self, rid: str) -> _Slot:
        slot = self.slots.get(rid)
        if slot is None:
            if not self.free and self.scratch < self.max_requests:
                self._resize(min(2 * self.scratch, self.max_requests))
            # A full cache gets a slot that is never stored: it drafts
            # nothing useful and holds no state.
            index = self.free.pop() if self.free else self.scratch
            slot = _Slot(index)
            if index != self.scratch:
                self.slots[rid] = slot
        return slot

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
    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int) -> DraftOutput:
        bs = len(reqs)
        slots = [self._slot(r.rid) for r in reqs]
        feeds = [self._sync(s, r) for s, r in zip(slots, reqs)]
        # Requests that outgrew the cache still get a (useless) proposal of
        # the right shape: the target rejects it, so output stays exact.
        overflow = [
            s.index == self.scratch or len(s.cached) + len(f) + num_tokens > self.max_len
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
        hidden = self._forward(
            tokens.to(self.device), positions.to(self.device), valid.to(self.device), slot_index
        )
        logits = self._logits(hidden[torch.arange(bs, device=self.device), last.to(self.device)])
        positions = positions.to(self.device).gather(1, last.to(self.device)[:, None])
        live = ~torch.tensor(overflow, device=self.device)[:, None]
        for step in range(num_tokens):
            probs = torch.softmax(logits.float(), dim=-1)
            out_probs[:, step], out_tokens[:, step] = probs.max(dim=-1)
            if step + 1 == num_tokens:
                break
            positions = positions + 1
            logits = self._logits(self._forward(out_tokens[:, step : step + 1], positions, live, slot_index)[:, 0])

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
    ) -> torch.Tensor:
        """Hidden states [bs, T, H] before the final norm; writes the KV rows."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        model = self.model.model
        bs, T = tokens.shape
        valid = valid.expand(bs, T)
        write_slot = torch.where(valid, slot_index[:, None], self.scratch)
        write_pos = positions.clamp(max=self.max_len - 1)
        flat_write = (write_slot * self.max_len + write_pos).reshape(-1)
        kv_len = min(int(positions.max()) + 1, self.max_len)
        # Query t of a row sees its own slot's rows up to its own position.
        key_pos = torch.arange(kv_len, device=self.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]

        h = model.embed_tokens(tokens)
        cos, sin = model.rotary_emb(h, positions)
        for layer_id, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(bs, T, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(bs, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(bs, T, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_cache = self.k_cache[layer_id].view(-1, self.num_kv_heads, self.head_dim)
            v_cache = self.v_cache[layer_id].view(-1, self.num_kv_heads, self.head_dim)
            k_cache[flat_write] = k.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
            v_cache[flat_write] = v.reshape(-1, self.num_kv_heads, self.head_dim)
            keys = self.k_cache[layer_id, slot_index, :kv_len].transpose(1, 2)
            values = self.v_cache[layer_id, slot_index, :kv_len].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True
            )
            h = h + attn.o_proj(o.transpose(1, 2).reshape(bs, T, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Only the positions that propose a token: with a 150k-token vocabulary
        # the LM head over a whole prompt would cost more than the layers.
        return self.model.lm_head(self.model.model.norm(hidden))
