"""The drafters' KV cache: one slot of ``max_len`` rows per request, on the
drafter's device, outside SGLang's memory pool.

Every drafter runs gpt-fast-style decoder layers over this cache; they differ
only in what they feed and how they decide which rows are still valid, which
each keeps in its slot objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from minedraft_sglang.drafters.base import Drafter

# Request slots allocated up front; the cache doubles when they run out.
INITIAL_SLOTS = 8


class SlotKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype, device, new_slot: Callable):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.new_slot = new_slot  # index -> the drafter's slot object (has .index)
        self.slots: dict[str, object] = {}
        self.free: list[int] = []
        self.k = self.v = None
        self.max_len = 0

    def allocate(self, max_requests: int, max_len: int) -> int:
        """Set the limits; memory grows with the number of requests that
        hold draft state at once (doubling, up to ``max_requests``). Returns
        the bytes at the full size."""
        self.max_requests = max_requests
        self.max_len = max_len
        self._resize(min(INITIAL_SLOTS, max_requests))
        per_slot = 2 * self.num_layers * max_len * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return per_slot * (max_requests + 1)

    def _resize(self, capacity: int) -> None:
        # Slots keep their index; the last index is a scratch slot that
        # absorbs the writes of padding tokens.
        shape = (self.num_layers, capacity + 1, self.max_len, self.num_kv_heads, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None:
            old = self.k.shape[1] - 1
            k[:, :old] = self.k[:, :old]
            v[:, :old] = self.v[:, :old]
            self.free.extend(range(old, capacity))
        else:
            self.free = list(range(capacity))
        self.k, self.v = k, v
        self.scratch = capacity

    def slot(self, rid: str):
        slot = self.slots.get(rid)
        if slot is None:
            if not self.free and self.scratch < self.max_requests:
                self._resize(min(2 * self.scratch, self.max_requests))
            # A full cache gets a slot that is never stored: it drafts
            # nothing useful and holds no state.
            index = self.free.pop() if self.free else self.scratch
            slot = self.new_slot(index)
            if index != self.scratch:
                self.slots[rid] = slot
        return slot

    def is_scratch(self, slot) -> bool:
        return slot.index == self.scratch

    def release(self, rid: str) -> None:
        slot = self.slots.pop(rid, None)
        if slot is not None:
            self.free.append(slot.index)

    def active_rids(self) -> set[str]:
        return set(self.slots)

    def free_slots(self) -> int:
        return len(self.free) + self.max_requests - self.scratch

    def attention(
        self,
        layer_id: int,
        attn,  # a transformers Llama/Qwen2 attention module: q/k/v/o_proj, head_dim, scaling
        x: torch.Tensor,  # [bs, T, D] attention input (already normed)
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,  # [bs, T]
        valid: torch.Tensor,  # [bs, T] or broadcastable: False rows write to scratch
        slot_index: torch.Tensor,  # [bs]
        start: torch.Tensor | None = None,  # [bs]: first valid row of each slot
        *,
        kv_len: int,  # rows to read: at least max(positions) + 1, known on the host
    ) -> torch.Tensor:
        """Self-attention of ``x`` over its slot's rows up to each query's
        position, after writing this forward's K/V rows; returns o_proj's
        output [bs, T, H]. ``kv_len`` comes from the caller's host-side
        bookkeeping: reading it off ``positions`` would cost a device sync
        in every layer of every forward."""
        bs, T, _ = x.shape
        q, k, v = project_qkv(attn, x, cos_sin)
        write_slot = torch.where(valid.expand(bs, T), slot_index[:, None], self.scratch)
        flat_write = (write_slot * self.max_len + positions.clamp(max=self.max_len - 1)).reshape(-1)
        k_rows = self.k[layer_id].view(-1, self.num_kv_heads, self.head_dim)
        v_rows = self.v[layer_id].view(-1, self.num_kv_heads, self.head_dim)
        k_rows[flat_write] = k.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
        v_rows[flat_write] = v.transpose(1, 2).reshape(-1, self.num_kv_heads, self.head_dim)
        kv_len = min(kv_len, self.max_len)
        key_pos = torch.arange(kv_len, device=x.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]
        if start is not None:
            mask &= key_pos[None, None, :] >= start[:, None, None]
        keys = self.k[layer_id, slot_index, :kv_len].transpose(1, 2)
        values = self.v[layer_id, slot_index, :kv_len].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], scale=attn.scaling, enable_gqa=True
        )
        return attn.o_proj(o.transpose(1, 2).reshape(bs, T, -1))


class CachedDrafter(Drafter):
    """A drafter whose per-request state lives in the slots of ``self.cache``."""

    cache: SlotKVCache

    def allocate(self, max_requests: int, max_len: int) -> int:
        return self.cache.allocate(max_requests, max_len)

    def release(self, rid: str) -> None:
        self.cache.release(rid)

    def active_rids(self) -> set[str]:
        return self.cache.active_rids()

    def free_slots(self) -> int:
        return self.cache.free_slots()


def project_qkv(attn, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [bs, heads, T, head_dim], rotary applied."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    bs, T, _ = x.shape
    shape = (bs, T, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    return q, k, v
