"""The drafters' KV cache, and the two kinds of forward they run over it.

The cache holds one slot of ``max_len`` rows per request, on the drafter's
device, outside SGLang's memory pool. Every drafter runs gpt-fast-style
decoder layers over it; they differ only in what they feed and how they decide
which rows are still valid, which each keeps in its slot objects.

The forwards:

* a **step** feeds every request of a draft call at most
  ``StepRunner.widths[-1]`` new tokens (the call's first forward: what was
  accepted since the last call; then each decode step, one token). Every
  position and length comes from the drafter's host-side bookkeeping, so a
  step reads nothing back from the device; ``StepRunner`` runs it eagerly,
  compiled, or replayed from one CUDA graph per shape bucket. It runs without
  autograd whatever the caller's grad mode: SGLang allocates the drafter,
  and so captures its graphs, with grad mode on, and a capture that records
  autograd keeps every saved activation of every capture alive through the
  cache's in-place writes (issue 34).
* a **catch-up** writes the cache rows of longer feeds (a newcomer's prompt, a
  retracted request's) before the step, in forwards of at most
  ``CatchUp.max_tokens`` tokens that group feeds of similar length.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from minedraft_sglang.drafters.base import Drafter

logger = logging.getLogger(__name__)

# Request slots allocated up front; the cache doubles when they run out.
INITIAL_SLOTS = 8
# New tokens per request in a step, padded up to one of these under fixed
# shapes (graphs, compile), which take those a drafter's steps reach
# (``StepRunner.reach``); longer feeds catch up first.
STEP_WIDTHS = (1, 2, 4, 8)
# Requests per step under graphs, padded up to one of these (at most a third
# of a step is padding); a larger step runs eagerly.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Keys read per request under graphs: a power of two, at least this.
MIN_KV_BUCKET = 64
# Tokens (requests x padded width) per catch-up forward, before any
# out-of-memory halves it.
CATCH_UP_TOKENS = 2048

STEP_MODES = ("eager", "graph", "compile")


def kv_bucket(n: int) -> int:
    return max(MIN_KV_BUCKET, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class ReadGroup:
    """Requests of a forward that read the same number of keys."""

    rows: torch.Tensor | None  # [n] which rows of the forward (None: all)
    slots: torch.Tensor  # [n]
    # [n, 1, group * T, kv_len]: the keys each query sees; row g * T + t is
    # query head g of its KV head's group at new token t.
    mask: torch.Tensor
    kv_len: int


@dataclasses.dataclass
class Rows:
    """Where one forward's new K/V rows go and what each query reads, built
    once for all the forward's layers."""

    write: torch.Tensor  # [bs * kv_heads * T] rows of a layer's [slots * kv_heads * max_len, head_dim] view
    groups: list[ReadGroup]


@dataclasses.dataclass
class Feed:
    """Ragged token runs packed into one forward's padded inputs (on the host)."""

    tokens: torch.Tensor  # [rows, width]
    # [rows, width]: padding repeats a row's last position (in range, never read)
    positions: torch.Tensor
    valid: torch.Tensor  # [rows, width]
    last: torch.Tensor  # [rows]: column of each row's last token
    kv: list[int]  # [rows]: keys each row reads (its last position + 1)
    alive: list[bool]  # [rows]: rows with tokens; the rest are padding at position 0

    def later_positions(self, steps: int) -> torch.Tensor:
        """[rows, steps - 1]: the positions of the one-token steps that follow,
        one on each; padding rows stay at 0 (in range; their writes go to
        scratch)."""
        last_pos = torch.tensor(self.kv)[:, None] - 1
        return torch.where(torch.tensor(self.alive)[:, None], last_pos + torch.arange(1, steps), 0)

    def kv_at(self, step: int) -> list[int]:
        """Keys each row reads at the ``step``-th one-token step after this forward."""
        return [n + step if ok else 1 for n, ok in zip(self.kv, self.alive)]


def pack(runs: Sequence[tuple[int, Sequence[int]]], rows: int, width: int) -> Feed:
    """``runs[i]``: (position of its first token, tokens) of row i, at most
    ``width`` tokens; rows past ``len(runs)`` and runs without tokens are
    padding."""
    tokens = torch.zeros(rows, width, dtype=torch.long)
    positions = torch.zeros(rows, width, dtype=torch.long)
    valid = torch.zeros(rows, width, dtype=torch.bool)
    last = torch.zeros(rows, dtype=torch.long)
    kv, alive = [1] * rows, [False] * rows
    for i, (base, run) in enumerate(runs):
        n = len(run)
        if n == 0:
            continue
        tokens[i, :n] = torch.tensor(run)
        positions[i] = base + torch.arange(width).clamp(max=n - 1)
        valid[i, :n] = True
        last[i], kv[i], alive[i] = n - 1, base + n, True
    return Feed(tokens, positions, valid, last, kv, alive)


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype,
        device,
        new_slot: Callable,
    ):
        self.num_layers = num_layers
        self.group = num_heads // num_kv_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.new_slot = new_slot  # index -> the drafter's slot object (has .index)
        self.slots: dict[str, object] = {}
        self.free: list[int] = []
        self.k = self.v = None
        self.max_len = 0
        # Bumped when k and v move (captured graphs hold their addresses).
        self.version = 0

    def allocate(self, max_requests: int, max_len: int, *, grow: bool | None = None) -> int:
        """Set the limits and allocate. ``grow`` (default: on the CPU only):
        memory grows with the number of requests that hold draft state at
        once (doubling, up to ``max_requests``); otherwise the whole cache
        is allocated now, at startup, and never grows on the hot path: on a
        GPU a resize there could fail for memory the target took meanwhile,
        and it would drop the captured graphs (issue 21). Returns the bytes
        at the full size."""
        if grow is None:
            grow = torch.device(self.device).type != "cuda"
        self.max_requests = max_requests
        self.max_len = max_len
        self._resize(min(INITIAL_SLOTS, max_requests) if grow else max_requests)
        per_slot = 2 * self.num_layers * max_len * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        return per_slot * (max_requests + 1)

    def _resize(self, capacity: int) -> None:
        # Slots keep their index; the last index is a scratch slot that
        # absorbs the writes of padding tokens. Heads before positions: a
        # request's keys of one head are contiguous, so reading them is one
        # gather into the layout attention takes.
        shape = (self.num_layers, capacity + 1, self.num_kv_heads, self.max_len, self.head_dim)
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
        self.version += 1

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

    def rows(
        self,
        positions: torch.Tensor,  # [bs, T]; every entry < max_len
        valid: torch.Tensor,  # [bs, T] or broadcastable: False rows write to scratch
        slot_index: torch.Tensor,  # [bs]
        start: torch.Tensor | None = None,  # [bs]: first valid row of each slot
        *,
        kv: int | Sequence[int],
    ) -> Rows:
        """``kv``: the keys each request reads (at least its largest position
        + 1), from the caller's host-side bookkeeping: reading it off
        ``positions`` would cost a device sync. One number: every request
        reads that many (fixed shapes, so requests shorter than the longest
        read masked padding). One per request: requests read in groups of one
        power-of-two length bucket each, so a long request does not make every
        other read as far (on one CPU core, 8 requests of 200 keys and one of
        2000 took 0.9 ms per layer grouped against 12 ms all read to 2000)."""
        bs, T = positions.shape
        device = positions.device
        slot = torch.where(valid, slot_index[:, None], self.scratch)
        heads = torch.arange(self.num_kv_heads, device=device)
        write = (
            (slot[:, None, :] * self.num_kv_heads + heads[:, None]) * self.max_len + positions[:, None, :]
        ).reshape(-1)
        if isinstance(kv, int):
            return Rows(write, [self._group(None, slot_index, positions, start, kv)])
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(kv):
            buckets.setdefault(kv_bucket(n), []).append(i)
        if len(buckets) == 1:
            return Rows(write, [self._group(None, slot_index, positions, start, max(kv))])
        groups = []
        for members in buckets.values():
            rows = torch.tensor(members, device=device)
            groups.append(
                self._group(
                    rows,
                    slot_index[rows],
                    positions[rows],
                    None if start is None else start[rows],
                    max(kv[i] for i in members),
                )
            )
        return Rows(write, groups)

    def _group(self, rows, slots, positions, start, kv_len: int) -> ReadGroup:
        kv_len = min(kv_len, self.max_len)
        key = torch.arange(kv_len, device=positions.device)
        mask = key <= positions[:, :, None]
        if start is not None:
            mask &= key >= start[:, None, None]
        return ReadGroup(rows, slots, mask[:, None].repeat(1, 1, self.group, 1), kv_len)

    def attention(
        self,
        layer_id: int,
        attn,  # a transformers Llama/Qwen2 attention module: q/k/v/o_proj, head_dim, scaling
        x: torch.Tensor,  # [bs, T, D] attention input (already normed)
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        rows: Rows,
    ) -> torch.Tensor:
        """Self-attention of ``x`` over its slot's rows up to each query's
        position, after writing this forward's K/V rows; returns o_proj's
        output [bs, T, H]."""
        bs, T, _ = x.shape
        q, k, v = project_qkv(attn, x, cos_sin)
        self.k[layer_id].view(-1, self.head_dim).index_copy_(0, rows.write, k.reshape(-1, self.head_dim))
        self.v[layer_id].view(-1, self.head_dim).index_copy_(0, rows.write, v.reshape(-1, self.head_dim))
        # GQA as more query rows per KV head rather than SDPA's enable_gqa,
        # which with a mask took 5.4 ms per layer against 0.6 ms this way (8
        # requests, 300 keys, one CPU core) and which not every CUDA kernel
        # takes.
        q = q.reshape(bs, self.num_kv_heads, self.group * T, self.head_dim)
        if rows.groups[0].rows is None:
            o = self._read(layer_id, q, rows.groups[0], attn.scaling)
        else:
            o = torch.empty_like(q)
            for group in rows.groups:
                o.index_copy_(0, group.rows, self._read(layer_id, q.index_select(0, group.rows), group, attn.scaling))
        return attn.o_proj(o.view(bs, -1, T, self.head_dim).transpose(1, 2).reshape(bs, T, -1))

    def _read(self, layer_id: int, q: torch.Tensor, group: ReadGroup, scale: float) -> torch.Tensor:
        keys = self.k[layer_id, group.slots, :, : group.kv_len]
        values = self.v[layer_id, group.slots, :, : group.kv_len]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=group.mask, scale=scale)


class StreamHandoff:
    """Orders a drafter's calls when they come from threads with streams of
    their own (PSD's background drafts on the drafter's thread, a newcomer's
    draft on the scheduler's): each call's stream first waits for an event
    recorded at the end of the previous call, so no call starts on the
    drafter's cache and graph buffers while the last one's kernels are still
    queued (issue 21). A call returns with its work queued, not finished;
    the caller synchronises before it reads the result on the host. Nothing
    to order on the CPU. ``cuda``: the module the streams and events come
    from (tests pass a stand-in)."""

    def __init__(self, device, cuda=None):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.cuda = cuda if cuda is not None else torch.cuda
        self.last = None  # the event recorded at the end of the previous call

    @contextlib.contextmanager
    def __call__(self):
        if not self.enabled:
            yield
            return
        stream = self.cuda.current_stream(self.device)
        if self.last is not None:
            stream.wait_event(self.last)
        try:
            yield
        finally:
            event = self.cuda.Event()
            event.record(stream)
            self.last = event


class CachedDrafter(Drafter):
    """A drafter whose per-request state lives in the slots of ``self.cache``."""

    cache: SlotKVCache
    steps: StepRunner

    def allocate(self, max_requests: int, max_len: int, *, max_drafts: int | None = None) -> int:
        """Allocate the cache; under graphs, whole (captured graphs hold its
        addresses) and with the graph of every step shape it can take
        captured now (their count, shapes and seconds in ``step_graphs`` and
        one log line). ``max_drafts``: the most drafts a verify takes from
        one request (None: any number; every step width is captured)."""
        if max_drafts is not None:
            self.steps.reach(self._widest_feed(max_drafts))
        graphs = self.steps.mode == "graph"
        nbytes = self.cache.allocate(max_requests, max_len, grow=False if graphs else None)
        if graphs:
            began = time.perf_counter()
            captured = self.steps.capture_all(self._padding)
            self.step_graphs = {**captured, "seconds": round(time.perf_counter() - began, 1)}
            logger.info(
                "MineDraft drafter: %d step graphs captured in %.1f s: requests %s x widths %s x keys %s",
                captured["graphs"],
                self.step_graphs["seconds"],
                captured["requests"],
                captured["widths"],
                captured["keys"],
            )
        return nbytes

    def _widest_feed(self, max_drafts: int) -> int:
        """The most tokens a call's first step feeds one request in serving,
        after a verify that took at most ``max_drafts`` of its drafts (longer
        feeds, such as a newcomer's prompt, catch up first)."""
        raise NotImplementedError

    def _padding(self, rows: int, width: int) -> list[tuple[torch.Tensor, ...]]:
        """Every form of a step's inputs of ``rows`` x ``width`` tokens,
        every row padding."""
        raise NotImplementedError

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


class StepRunner:
    """Runs a drafter's step ``fn(*inputs, kv=...) -> tuple of tensors``,
    without autograd:

    * ``eager``: as called; ``kv`` is each request's key count, so requests
      read in length groups (``SlotKVCache.rows``);
    * ``graph`` (CUDA): the drafter pads its inputs to ``shape()`` and every
      request reads the bucketed longest; one CUDA graph per shape, all
      captured at startup (``capture_all``), then replayed. A step is then
      a few input copies and one launch instead of ~45 kernel launches per
      layer;
    * ``compile`` (CPU): the same fixed shapes through ``torch.compile``
      (one compilation per shape).

    ``fn`` must be idempotent: a capture runs it once eagerly (warm-up) on
    the real inputs before the replay runs it again. Under graphs the outputs
    are the graph's own buffers, valid until the next call. Under fixed
    shapes a step feeds each request at most ``widths[-1]`` tokens.
    """

    def __init__(self, fn: Callable, mode: str, cache: SlotKVCache):
        if mode not in STEP_MODES:
            raise ValueError(f"step mode {mode!r} is not one of {STEP_MODES}")
        self.fn, self.mode, self.cache = fn, mode, cache
        self.compiled = torch.compile(fn, dynamic=False) if mode == "compile" else None
        self.widths = STEP_WIDTHS
        self.graphs: dict[tuple, tuple] = {}
        self.graphs_version = None
        self.pool = None

    def reach(self, width: int) -> None:
        """The drafter's steps feed a request at most ``width`` tokens in
        serving (longer feeds catch up first): under fixed shapes take, and
        capture, only the widths up to its bucket. Eager steps take every
        width: there one forward of a feed costs less than a catch-up and a
        step, and no shape costs a capture."""
        if self.mode != "eager":
            self.widths = STEP_WIDTHS[: bisect.bisect_left(STEP_WIDTHS, width) + 1]

    def _fixed(self, bs: int) -> bool:
        return self.mode != "eager" and bs <= BATCH_BUCKETS[-1]

    def shape(self, bs: int, width: int) -> tuple[int, int]:
        """The (requests, tokens each) a step of ``bs`` requests feeding up
        to ``width`` tokens must be padded to."""
        if not self._fixed(bs):
            return bs, width
        return _bucket(BATCH_BUCKETS, bs), _bucket(self.widths, width)

    @torch.no_grad()
    def __call__(self, inputs: tuple[torch.Tensor, ...], kv: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """``inputs`` padded to ``shape()``; ``kv``: the keys each of their
        requests reads."""
        if not self._fixed(inputs[0].shape[0]):
            return self.fn(*inputs, kv=tuple(kv))
        kv_len = self._kv_len(max(kv))
        if self.mode == "compile":
            return self.compiled(*inputs, kv=kv_len)
        return self._replay(inputs, kv_len)

    @torch.no_grad()
    def capture_all(self, padding: Callable[[int, int], list[tuple[torch.Tensor, ...]]]) -> dict:
        """Capture, now, the graph of every shape a step can take within the
        cache's limits and ``widths``, so that the hot path never captures
        (each capture synchronises the drafter's device; issue 21).
        ``padding(rows, width)``: every form of the inputs of that shape,
        with all rows padding (they write to the scratch slot). Returns the
        graphs captured (none unless the mode is ``graph``, or if a capture
        failed) and the buckets of their shapes: requests, widths (each once
        per form of its inputs: EAGLE-3's width 1 takes two feature widths)
        and keys, whose product is the count."""
        largest = _bucket(BATCH_BUCKETS, min(self.cache.max_requests, BATCH_BUCKETS[-1]))
        shapes = {
            "requests": [b for b in BATCH_BUCKETS if b <= largest],
            "widths": [width for width in self.widths for _ in padding(1, width)],
            "keys": sorted({self._kv_len(n) for n in range(1, self.cache.max_len + 1)}),
        }
        for bs, width in itertools.product(shapes["requests"], self.widths):
            for inputs, kv_len in itertools.product(padding(bs, width), shapes["keys"]):
                if self.mode != "graph":  # a capture failed: eager from now on
                    return {"graphs": 0, **shapes}
                self._replay(inputs, kv_len)
        return {"graphs": len(self.graphs), **shapes}

    def _kv_len(self, n: int) -> int:
        """Keys a fixed-shape step reads when its longest request reads ``n``."""
        return min(kv_bucket(n), self.cache.max_len)

    def _replay(self, inputs, kv_len: int):
        if self.graphs_version != self.cache.version:
            self.graphs.clear()
            self.graphs_version = self.cache.version
        key = (*(tuple(x.shape) for x in inputs), kv_len)
        entry = self.graphs.get(key)
        if entry is None:
            static = tuple(x.clone() for x in inputs)
            try:
                replay, out, self.pool = cuda_graph(lambda: self.fn(*static, kv=kv_len), self.cache.device, self.pool)
            except Exception as e:  # noqa: BLE001 - eager still drafts correctly
                logger.warning(
                    "MineDraft drafter: CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e
                )
                self.mode = "eager"
                self.graphs.clear()
                return self.fn(*inputs, kv=kv_len)
            entry = self.graphs[key] = (replay, static, out)
        replay, static, out = entry
        for s, x in zip(static, inputs):
            s.copy_(x, non_blocking=True)
        replay()
        return out


def cuda_graph(fn: Callable[[], object], device: torch.device, pool) -> tuple[Callable[[], None], object, object]:
    """``fn`` captured as a CUDA graph in memory pool ``pool`` (None: a new
    one): (replay, fn's outputs, which every replay rewrites in place, the
    pool). ``fn`` runs once eagerly first, so that lazy initialisation does
    not happen during the capture."""
    with torch.cuda.device(device):  # the caller's current device may be the target's
        # One side stream of the drafter's device for warm-up and capture.
        # torch.cuda.graph's default capture stream is one per process,
        # created on whichever device was current first (the target's
        # cuda:0 in SGLang's scheduler), and cannot capture a drafter on
        # cuda:1 (issue 21).
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the target's thread keeps running (and allocating)
        # while the drafter's thread captures.
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            out = fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def replay():
        with torch.cuda.device(device):
            graph.replay()

    # One memory pool for all of a drafter's graphs: only one replays at a
    # time, and the drafter consumes a step's outputs before the next step.
    return replay, out, graph.pool()


def _bucket(buckets: Sequence[int], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


class CatchUp:
    """Feeds long token runs in forwards of at most ``max_tokens`` tokens
    (requests x the longest piece among them).

    Each request's run is cut into pieces of at most ``max_tokens``; a pass
    takes every request's next piece, sorted by length, so a forward holds
    pieces of similar length and pads little. An out-of-memory halves
    ``max_tokens`` (for good: the memory a drafter shares with a target does
    not come back) and redoes the unfinished pieces smaller, instead of
    failing the draft call and having the next call repeat it."""

    def __init__(self, max_tokens: int = CATCH_UP_TOKENS):
        self.max_tokens = max_tokens

    def run(self, lengths: Sequence[int], forward: Callable[[list[tuple[int, int, int]]], None]) -> None:
        """``forward(pieces)`` feeds ``(request, begin, end)`` pieces of the
        runs (``lengths`` tokens each) in one forward; a request's pieces
        come in order, each after the previous one succeeded."""
        done = [0] * len(lengths)
        while True:
            pending = sorted((min(n - d, self.max_tokens), i) for i, (n, d) in enumerate(zip(lengths, done)) if d < n)
            if not pending:
                return
            try:
                for call in self._calls(pending):
                    forward([(i, done[i], done[i] + m) for m, i in call])
                    for m, i in call:
                        done[i] += m
            except torch.OutOfMemoryError:
                if self.max_tokens == 1:
                    raise
                self.max_tokens //= 2
                logger.warning(
                    "MineDraft drafter: out of memory catching up; now %d tokens per forward", self.max_tokens
                )

    def _calls(self, pending: list[tuple[int, int]]):
        """Consecutive runs of ``pending`` (sorted by length) whose padded
        size stays within ``max_tokens``."""
        call: list[tuple[int, int]] = []
        for m, i in pending:
            if call and (len(call) + 1) * m > self.max_tokens:
                yield call
                call = []
            call.append((m, i))
        yield call
