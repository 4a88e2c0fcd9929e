"""GPU check: our components on the GPU against plain references, and one PSD
step against one SD step on Llama-shaped random-weight models: a plain-torch
target, our real drafter (``drafters.standalone``, its steps replayed from
CUDA graphs) over a transformers model.

    python -m minedraft_sglang.lab.gpu_check [--out FILE.json] [--target 8b] [--draft 1b] ...
    python -m minedraft_sglang.lab.gpu_check --cpu-smoke      # the same code paths on CPU, tiny shapes
    launch/gpu_check.sh [same flags]

It imports only torch, transformers, flashinfer and the standard library (plus
our ``drafters``, ``sampling`` and ``metrics`` modules, which need no more), so
it runs on a GPU machine without SGLang. Exit status: 0 every check passed and every benchmark
ran, 1 otherwise, 2 no GPU (without --cpu-smoke). What it checks and measures:
docs/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minedraft_sglang.drafters import kv_cache
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.metrics import overlap_ratio
from minedraft_sglang.sampling.acceptance import greedy_accept, rejection_sample

PAGE_SIZE = 16
WARMUP = 3
# Max abs error allowed against the fp32 reference, per input dtype.
ATTN_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# Whole-model logits: error relative to the largest reference logit.
MODEL_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int


SHAPES = {
    "8b": Shape(128256, 4096, 32, 32, 8, 128, 14336),  # Llama 3.1 8B
    "1b": Shape(128256, 2048, 16, 32, 8, 64, 8192),  # Llama 3.2 1B
    "small": Shape(1024, 512, 2, 4, 2, 128, 1024),  # model-level checks
    "tiny": Shape(256, 64, 2, 4, 2, 16, 128),  # --cpu-smoke
    "tiny-draft": Shape(256, 32, 1, 2, 1, 16, 64),
}


def parse_shape(text: str) -> Shape:
    """``NAME`` or ``NAME:field=value,...``, e.g. ``8b:layers=8``."""
    name, _, overrides = text.partition(":")
    if name not in SHAPES:
        raise argparse.ArgumentTypeError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    fields = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key not in Shape.__dataclass_fields__ or not value.isdigit():
            raise argparse.ArgumentTypeError(
                f"bad shape override {item!r} (fields: {', '.join(Shape.__dataclass_fields__)})"
            )
        fields[key] = int(value)
    return dataclasses.replace(SHAPES[name], **fields)


# ---------------------------------------------------------------- attention
# q [bs, q_len, H, D]; k, v [bs, max_kv, Hkv, D] where request i holds
# kv_lens[i] keys and its q_len queries are its last q_len positions (the
# chain being verified, already written to the cache).


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """One request at a time, in fp32, with an explicit softmax."""
    q_len, heads, head_dim = q.shape[1:]
    group = heads // k.shape[2]
    out = torch.empty_like(q)
    for i, n in enumerate(kv_lens.tolist()):
        qi = q[i].float().transpose(0, 1)
        ki = k[i, :n].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[i, :n].float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) / math.sqrt(head_dim)
        future = torch.arange(n, device=q.device)[None, :] > torch.arange(n - q_len, n, device=q.device)[:, None]
        out[i] = (scores.masked_fill(future, float("-inf")).softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out


def chain_mask(kv_lens: torch.Tensor, q_len: int, max_kv: int) -> torch.Tensor:
    """[bs, q_len, max_kv]: query t sees keys up to kv_len - q_len + t."""
    last = kv_lens[:, None] - q_len + torch.arange(q_len, device=kv_lens.device)
    return torch.arange(max_kv, device=kv_lens.device) <= last[:, :, None]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    bs, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    # GQA without copying K/V: the query heads sharing a KV head become extra
    # query rows of that head (row g * q_len + t is head g, chain position t).
    qg = (
        q.view(bs, q_len, kv_heads, group, head_dim)
        .permute(0, 2, 3, 1, 4)
        .reshape(bs, kv_heads, group * q_len, head_dim)
    )
    mask = chain_mask(kv_lens, q_len, k.shape[1]).repeat(1, group, 1)[:, None]
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.view(bs, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4).reshape(bs, q_len, heads, head_dim)


def flashinfer_pages(kv_lens: list[int], page_ids: list[torch.Tensor], page_size: int):
    """FlashInfer's CSR page table (indptr, indices, last_page_len) for
    request i holding kv_lens[i] tokens in pages page_ids[i]; int32 on the
    host, where plan() reads them."""
    counts = [len(ids) for ids in page_ids]
    indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
    indices = torch.cat(page_ids).to(torch.int32)
    last = torch.tensor([n - page_size * (c - 1) for n, c in zip(kv_lens, counts)], dtype=torch.int32)
    return indptr, indices, last


def gather_pages(pool: torch.Tensor, page_ids: list[torch.Tensor]) -> torch.Tensor:
    """[bs, max_pages * page_size, Hkv, D] from a pool [pages, page_size, Hkv, D];
    short requests are padded with page 0, past their kv_len."""
    width = max(len(ids) for ids in page_ids)
    table = torch.stack([F.pad(ids, (0, width - len(ids))) for ids in page_ids])
    return pool[table.to(pool.device)].flatten(1, 2)


def contiguous_pages(kv_lens: list[int], max_len: int, page_size: int) -> list[torch.Tensor]:
    """Page ids of a [bs, max_len, ...] cache viewed as pages: row i owns
    pages i * max_len / page_size onward."""
    per_row = max_len // page_size
    return [torch.arange(i * per_row, i * per_row + -(-n // page_size)) for i, n in enumerate(kv_lens)]


class FlashInferVerify:
    """Target-verify attention through FlashInfer's paged prefill kernel.
    FlashInfer aligns the causal mask bottom-right, so with q_len queries and
    n keys query t sees keys up to n - q_len + t: the chain-verify rule."""

    def __init__(self, device: torch.device):
        import flashinfer

        self.workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")

    def plan(
        self,
        kv_lens: list[int],
        page_ids: list[torch.Tensor],
        q_len: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        indptr, indices, last = flashinfer_pages(kv_lens, page_ids, PAGE_SIZE)
        qo_indptr = torch.arange(len(kv_lens) + 1, dtype=torch.int32) * q_len
        self.wrapper.plan(
            qo_indptr, indptr, indices, last, heads, kv_heads, head_dim, PAGE_SIZE, causal=True, q_data_type=dtype
        )

    def run(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
        bs, q_len, heads, head_dim = q.shape
        return self.wrapper.run(q.reshape(-1, heads, head_dim), (k_pool, v_pool)).view(bs, q_len, heads, head_dim)

    def __call__(self, q, k, v, kv_lens):
        # As the model's attention: k, v are its [bs, max_len, ...] cache
        # rows, planned with contiguous_pages; kv_lens were given to plan().
        as_pages = lambda t: t.view(-1, PAGE_SIZE, *t.shape[2:])  # noqa: E731
        return self.run(q, as_pages(k), as_pages(v))


# ---------------------------------------------------------------- tiny Llama


@dataclass
class Layer:
    wqkv: torch.Tensor
    wo: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [bs, max_len, Hkv, D]
    v: list[torch.Tensor]

    def rows(self, sl: slice) -> KVCache:
        return KVCache([t[sl] for t in self.k], [t[sl] for t in self.v])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Llama:
    """A Llama decoder with random weights: the cost of a real model of that
    shape, none of its quality. ``forward`` runs any number of new tokens per
    request after a per-request prefix (prefill, decode and chain verify alike)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.dtype, self.device = shape, dtype, device
        gen = torch.Generator(device).manual_seed(seed)
        s = shape

        def w(fan_in: int, fan_out: int) -> torch.Tensor:
            return torch.randn(fan_in, fan_out, generator=gen, device=device, dtype=dtype).mul_(fan_in**-0.5)

        ones = lambda: torch.ones(s.dim, device=device, dtype=dtype)  # noqa: E731
        self.embed = torch.randn(s.vocab, s.dim, generator=gen, device=device, dtype=dtype)
        self.layers = [
            Layer(
                w(s.dim, (s.heads + 2 * s.kv_heads) * s.head_dim),
                w(s.heads * s.head_dim, s.dim),
                w(s.dim, 2 * s.ffn),
                w(s.ffn, s.dim),
                ones(),
                ones(),
            )
            for _ in range(s.layers)
        ]
        self.norm = ones()
        self.lm_head = w(s.dim, s.vocab)
        self.inv_freq = 500000.0 ** (-torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        s = self.shape
        new = lambda: torch.zeros(batch, max_len, s.kv_heads, s.head_dim, device=self.device, dtype=self.dtype)  # noqa: E731
        return KVCache([new() for _ in range(s.layers)], [new() for _ in range(s.layers)])

    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, cache: KVCache, attn: Callable) -> torch.Tensor:
        """tokens [bs, q_len] at positions start_pos[i] + t; returns logits [bs, q_len, vocab]."""
        s = self.shape
        bs, q_len = tokens.shape
        pos = start_pos[:, None] + torch.arange(q_len, device=self.device)
        kv_lens = start_pos + q_len
        angles = pos[..., None, None].float() * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        rows = torch.arange(bs, device=self.device)[:, None]
        x = self.embed[tokens]
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            h = rms_norm(x, layer.attn_norm)
            q, k, v = (h @ layer.wqkv).split(
                [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1
            )
            k_cache[rows, pos] = rope(k.view(bs, q_len, s.kv_heads, s.head_dim), cos, sin)
            v_cache[rows, pos] = v.view(bs, q_len, s.kv_heads, s.head_dim)
            q = rope(q.view(bs, q_len, s.heads, s.head_dim), cos, sin)
            x = x + attn(q, k_cache, v_cache, kv_lens).reshape(bs, q_len, -1) @ layer.wo
            gate, up = (rms_norm(x, layer.ffn_norm) @ layer.w13).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.w2
        return rms_norm(x, self.norm) @ self.lm_head


def draft_model(shape: Shape, dtype: torch.dtype, device: torch.device, init_std: float = 0.02):
    """A transformers Llama of ``shape`` with random weights, for the real
    drafter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.dim,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        initializer_range=init_std,
    )
    torch.manual_seed(2)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def real_drafter(model, device: torch.device, dtype: torch.dtype) -> StandaloneDrafter:
    """The drafter MINEDRAFT serves with, its steps as CUDA graphs on a GPU."""
    return StandaloneDrafter(model, str(device), dtype, step_mode="graph" if device.type == "cuda" else "eager")


def verify(
    model: Llama,
    cache: KVCache,
    attn: Callable,
    last_tokens: torch.Tensor,
    drafts: torch.Tensor,
    start_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One target forward over [last, drafts] and greedy acceptance."""
    logits = model.forward(torch.cat([last_tokens[:, None], drafts], dim=1), start_pos, cache, attn)
    num_drafts = torch.full_like(start_pos, drafts.shape[1])
    return greedy_accept(drafts, logits.argmax(-1), num_drafts)


# ---------------------------------------------------------------- unit checks
# Each check returns (error, tolerance, detail); it passes when error <= tolerance.


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def verify_case(
    bs: int,
    q_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    max_prefix: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
):
    """Random chain-verify inputs: prefixes of 1..max_prefix tokens, each
    request's pages scattered over a pool with spare pages, as an allocator
    leaves them. Returns q, k_pool, v_pool, page_ids, kv_lens."""
    kv_lens = (torch.randint(1, max_prefix + 1, (bs,), generator=gen) + q_len).tolist()
    counts = [-(-n // PAGE_SIZE) for n in kv_lens]
    perm = torch.randperm(sum(counts) + 3, generator=gen)
    page_ids = list(perm[: sum(counts)].split(counts))
    randn = lambda *size: torch.randn(*size, generator=gen).to(device, dtype)  # noqa: E731
    pool = (len(perm), PAGE_SIZE, kv_heads, head_dim)
    return randn(bs, q_len, heads, head_dim), randn(*pool), randn(*pool), page_ids, kv_lens


def check_attention(backend: str, dtype: torch.dtype, device: torch.device, k: int, gen: torch.Generator):
    q, k_pool, v_pool, page_ids, kv_lens = verify_case(8, k + 1, 32, 8, 128, 300, dtype, device, gen)
    lens = torch.tensor(kv_lens, device=device)
    k_dense, v_dense = gather_pages(k_pool, page_ids), gather_pages(v_pool, page_ids)
    if backend == "flashinfer":
        fi = FlashInferVerify(device)
        fi.plan(kv_lens, page_ids, k + 1, 32, 8, 128, dtype)
        out = fi.run(q, k_pool, v_pool)
    else:
        out = sdpa_attention(q, k_dense, v_dense, lens)
    ref = reference_attention(q, k_dense, v_dense, lens)
    err = (out.float() - ref.float()).abs().max().item()
    return err, ATTN_TOL[dtype], f"8 requests, prefixes {min(kv_lens) - k - 1}..{max(kv_lens) - k - 1}, chain {k + 1}"


def model_attention(backend: str, model: Llama, kv_lens: list[int], max_len: int, q_len: int) -> Callable:
    """The attention a Llama forward uses: SDPA, or FlashInfer planned for
    this batch (its cache rows as pages)."""
    if backend == "sdpa":
        return sdpa_attention
    s = model.shape
    fi = FlashInferVerify(model.device)
    fi.plan(kv_lens, contiguous_pages(kv_lens, max_len, PAGE_SIZE), q_len, s.heads, s.kv_heads, s.head_dim, model.dtype)
    return fi


def check_model_verify(backend: str, shape: Shape, dtype: torch.dtype, device: torch.device, k: int):
    """A verify forward with ``backend`` attention vs with the reference
    attention, over the same random prefix cache (random past each prefix too,
    which the masks must hide)."""
    model = Llama(shape, dtype, device)
    gen = torch.Generator().manual_seed(1)
    bs, max_len = 4, 128
    start = torch.randint(10, max_len - k - 1, (bs,), generator=gen)
    tokens = torch.randint(0, shape.vocab, (bs, k + 1), generator=gen).to(device)
    logits = []
    for attn in (model_attention(backend, model, (start + k + 1).tolist(), max_len, k + 1), reference_attention):
        cache = model.new_cache(bs, max_len)
        fill = torch.Generator().manual_seed(2)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape, generator=fill))
        logits.append(model.forward(tokens, start.to(device), cache, attn).float())
    err = ((logits[0] - logits[1]).abs().max() / logits[1].abs().max()).item()
    return err, MODEL_TOL[dtype], f"{shape.layers} layers, error relative to the largest logit"


def check_drafter(device: torch.device, k: int):
    """The real drafter (CUDA graphs on a GPU) against transformers' greedy
    decoding of the same model, through rounds of partial acceptance; fp32,
    weights drawn wide enough that near-ties, where rounding decides, are
    rare. The error is the fraction of drafts that differ."""
    shape = SHAPES["small" if device.type == "cuda" else "tiny"]
    model = draft_model(shape, torch.float32, device, init_std=0.2)
    drafter = real_drafter(model, device, torch.float32)
    drafter.allocate(max_requests=4, max_len=256)
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, shape.vocab, (n,), generator=gen).tolist() for n in (1, 9, 40, 100)]
    wrong = total = 0
    with torch.no_grad():
        for round_ in range(4):
            out = drafter.draft([DraftRequest(str(i), s[:1], s[1:]) for i, s in enumerate(seqs)], k).tokens.tolist()
            for s, drafted in zip(seqs, out):
                want = list(s)
                for _ in range(k):
                    want.append(int(model(torch.tensor([want], device=device)).logits[0, -1].argmax()))
                wrong += sum(a != b for a, b in zip(drafted, want[-k:]))
                total += k
                j = (round_ + len(s)) % (k + 1)  # keep j drafts, then a correction
                s.extend(want[-k:][:j] + [(want[-k:][j] + 1) % shape.vocab if j < k else 0])
    mode = drafter.steps.mode
    return wrong / total, 0.0, f"{total} drafts of 4 requests in 4 rounds, steps {mode}"


def check_greedy_accept(device: torch.device, gen: torch.Generator):
    bs, k, vocab = 256, 4, 8
    drafts = torch.randint(0, vocab, (bs, k), generator=gen)
    target = torch.randint(0, vocab, (bs, k + 1), generator=gen)
    agree = torch.rand(bs, k, generator=gen) < 0.7
    target[:, :k] = torch.where(agree, drafts, target[:, :k])
    num = torch.randint(0, k + 1, (bs,), generator=gen)
    on_cpu = greedy_accept(drafts, target, num)
    on_dev = greedy_accept(drafts.to(device), target.to(device), num.to(device))
    diff = sum((a != b.cpu()).sum().item() for a, b in zip(on_cpu, on_dev))
    return float(diff), 0.0, f"{bs} requests, k={k}: outputs differing between device and CPU"


def _accept_expectation(p: torch.Tensor, drafts: torch.Tensor) -> float:
    """E[accepted drafts] = sum_j prod_{i<=j} p_i(d_i) (point-mass drafts)."""
    return p[:-1].double().gather(1, drafts[:, None]).squeeze(1).cumprod(0).sum().item()


def check_rejection_sample(device: torch.device, gen: torch.Generator):
    """Same inputs on the device and the CPU: forced outcomes (p(d) = 1 accepts
    every draft, p(d_1) = 0 rejects the first) must come out exactly, and the
    mean accept length over many copies of one row must match its exact
    expectation on both. The error is in standard errors."""
    k, vocab, n = 4, 16, 20000
    # A target near the draft, so that later positions are reached too.
    logits = torch.randn(k + 1, vocab, generator=gen) * 2
    q = torch.softmax(logits[:k], -1)
    p = torch.softmax(logits + torch.randn(k + 1, vocab, generator=gen) * 0.7, -1)
    drafts = q.argmax(-1)  # greedy, as the drafter drafts
    p_reject = p.clone()
    p_reject[0, drafts[0]] = 0
    forced = [(torch.cat([F.one_hot(drafts, vocab).float(), p[-1:]]), k + 1), (p_reject, 1)]
    expected = _accept_expectation(p, drafts)
    worst = 0.0
    for dev in (torch.device("cpu"), device):

        def accept_lens(target: torch.Tensor, rows: int, dev: torch.device = dev) -> torch.Tensor:
            return (
                rejection_sample(
                    drafts.expand(rows, k).to(dev),
                    target.expand(rows, k + 1, vocab).to(dev),
                    torch.full((rows,), k, device=dev),
                    torch.Generator(dev).manual_seed(3),
                )[1]
                .double()
                .cpu()
            )

        if any((accept_lens(target, 64) != want).any() for target, want in forced):
            return math.inf, 6.0, f"a forced outcome came out wrong on {dev}"
        accepted = accept_lens(p, n) - 1
        stderr = accepted.std().item() / math.sqrt(n)
        worst = max(worst, abs(accepted.mean().item() - expected) / stderr)
    return worst, 6.0, f"{n} samples of one row on each device, exact mean {expected:.3f} accepted drafts"


def unit_checks(device: torch.device, k: int, backends: list[str], dtypes: list[torch.dtype]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    shape = SHAPES["small" if device.type == "cuda" else "tiny"]
    named = []
    for dtype, backend in itertools.product(dtypes, backends):
        tag = f"{backend}-{_dname(dtype)}"
        named += [
            (f"attention-{tag}", lambda b=backend, d=dtype: check_attention(b, d, device, k, gen)),
            (f"llama-verify-{tag}", lambda b=backend, d=dtype: check_model_verify(b, shape, d, device, k)),
        ]
    named += [
        ("drafter-greedy", lambda: check_drafter(device, k)),
        ("greedy-accept", lambda: check_greedy_accept(device, gen)),
        ("rejection-sample", lambda: check_rejection_sample(device, gen)),
    ]
    return [_guarded(name, check) for name, check in named]


def _guarded(name: str, check: Callable[[], tuple]) -> dict:
    """Run one check; one that raises fails with its error instead of ending the run."""
    t0 = time.perf_counter()
    try:
        err, tol, detail = check()
        result = {"ok": bool(err <= tol), "max_err": err, "tol": tol, "detail": detail}
    except Exception as e:  # noqa: BLE001 - every failure belongs in the report
        result = {"ok": False, "max_err": None, "tol": None, "detail": f"{type(e).__name__}: {e}"}
    return {"name": name, **result, "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------- benchmark


def synchronize(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def timed(fn: Callable[[], object], iters: int, devices: list[torch.device]) -> float:
    """Seconds per call of ``fn``, wall clock, after warm-up."""
    for _ in range(WARMUP):
        fn()
    synchronize(devices)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(devices)
    return (time.perf_counter() - t0) / iters


def cuda_graph(fn: Callable[[], object], device: torch.device, notes: list[str], name: str) -> Callable[[], object]:
    """``fn`` replayed as a CUDA graph (what SGLang does for decode and
    verify), or ``fn`` itself on CPU or where capture fails."""
    if device.type != "cuda":
        return fn
    try:
        # The drafters' capture (warm-up run first, then capture on the device).
        replay_graph, out, _ = kv_cache.cuda_graph(fn, device, None)
    except Exception as e:  # noqa: BLE001 - eager is still a valid measurement
        notes.append(f"{name}: eager, CUDA graph capture failed ({type(e).__name__}: {e})")
        synchronize([device])
        return fn

    def replay():
        replay_graph()
        return out

    return replay


@dataclass
class SubBatch:
    rows: slice
    start: torch.Tensor  # [bs] prefix lengths on the target's device
    last: torch.Tensor  # [bs] the token before the drafts


class Bench:
    """Target and drafter with caches for 2B requests: sub-batch A is rows
    [0, B), sub-batch B rows [B, 2B), SD at 2B uses all of them. The target's
    prefix KV is zeros (values do not change kernel times); the drafter's is
    computed from random prefixes (its prefill)."""

    def __init__(self, args, target_device: torch.device, attention: str, notes: list[str]):
        self.args, self.device, self.attention, self.notes = args, target_device, attention, notes
        b, k = args.batch, args.k
        gen = torch.Generator().manual_seed(0)
        self.max_len = -(-(args.ctx + k + 1) // PAGE_SIZE) * PAGE_SIZE
        start = torch.randint(args.ctx // 2, args.ctx + 1, (2 * b,), generator=gen)
        last = torch.randint(0, min(args.target.vocab, args.draft.vocab), (2 * b,), generator=gen)
        self.subs = {
            name: SubBatch(rows, start[rows].to(target_device), last[rows].to(target_device))
            for name, rows in (("A", slice(0, b)), ("B", slice(b, 2 * b)), ("AB", slice(0, 2 * b)))
        }
        self.target = Llama(args.target, args.dtype, target_device, seed=1)
        self.target_cache = self.target.new_cache(2 * b, self.max_len)
        self.drafts = {
            name: torch.randint(0, args.target.vocab, (self.subs[name].start.numel(), k), generator=gen).to(
                target_device
            )
            for name in ("A", "AB")
        }
        # Request i is row i of every sub-batch it is in, so 2B drafter slots
        # hold them all.
        prompts = torch.Generator().manual_seed(3)
        vocab = min(args.target.vocab, args.draft.vocab)
        self.draft_reqs = [
            DraftRequest(f"r{i}", torch.randint(0, vocab, (n,), generator=prompts).tolist(), [t])
            for i, (n, t) in enumerate(zip(start.tolist(), last.tolist()))
        ]
        self.drafters: dict[torch.device, StandaloneDrafter] = {}

    def drafter(self, device: torch.device) -> StandaloneDrafter:
        if device not in self.drafters:
            drafter = real_drafter(draft_model(self.args.draft, self.args.dtype, device), device, self.args.dtype)
            drafter.allocate(2 * self.args.batch, self.max_len)
            self.drafters[device] = drafter
        return self.drafters[device]

    def draft_stage(self, name: str, device: torch.device) -> Callable[[], torch.Tensor]:
        """Drafts for sub-batch ``name`` on ``device`` (left there: see
        psd_step). Every call drafts from the same tokens: the drafter feeds
        the last one again and decodes k - 1 more, a call after a rejection."""
        drafter, reqs = self.drafter(device), self.draft_reqs[self.subs[name].rows]
        drafter.prefill(reqs)
        k = self.args.k
        stage = lambda: drafter.draft(reqs, k).tokens  # noqa: E731
        stage()  # captures its CUDA graphs
        if device.type == "cuda" and drafter.steps.mode != "graph":
            self.notes.append(f"draft {name} on {device}: eager, CUDA graph capture failed (see the log)")
        return stage

    def verify_stage(self, name: str) -> Callable[[], object]:
        sub, k = self.subs[name], self.args.k
        attn = model_attention(self.attention, self.target, (sub.start + k + 1).tolist(), self.max_len, k + 1)
        cache, drafts = self.target_cache.rows(sub.rows), self.drafts[name]
        return cuda_graph(
            lambda: verify(self.target, cache, attn, sub.last, drafts, sub.start),
            self.device,
            self.notes,
            f"verify {name}",
        )


def psd_step(
    draft_fn: Callable[[], torch.Tensor], verify_fn: Callable[[], object], target: torch.device, streams: tuple | None
) -> None:
    """Draft one sub-batch while the target verifies the other; the step ends
    when both have. The verify is launched first: the drafter waits on its own
    stream (its drafts go to the host to update its cache), which must not hold
    up the verify's launch. Only the draft token ids cross to the target's GPU,
    on a stream of their own: a cross-device copy makes the destination's
    current stream wait for it, which on the verify stream would serialise the
    two. Without streams (CPU) the same work runs back to back."""
    if streams is None:
        draft_fn().to(target)
        verify_fn()
        return
    draft_stream, handoff_stream = streams
    main = torch.cuda.current_stream(target)
    draft_stream.wait_stream(main)
    verify_fn()
    with torch.cuda.stream(draft_stream):
        drafts = draft_fn()
        with torch.cuda.stream(handoff_stream):
            drafts.to(target, non_blocking=True)
    main.wait_stream(draft_stream)
    main.wait_stream(handoff_stream)


def _sd_step(draft_fn: Callable, verify_fn: Callable) -> Callable[[], None]:
    return lambda: (draft_fn(), verify_fn())


def run_benchmark(args, device: torch.device, attention: str, notes: list[str]) -> dict:
    bench = Bench(args, device, attention, notes)
    iters = args.iters
    verify_stages = {name: bench.verify_stage(name) for name in ("A", "AB")}
    t_sd = {
        name: timed(_sd_step(bench.draft_stage(name, device), verify_stages[name]), iters, [device])
        for name in ("A", "AB")
    }
    t_verify = timed(verify_stages["A"], iters, [device])
    draft_devices = [device]
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        draft_devices.append(torch.device("cuda", (device.index + 1) % torch.cuda.device_count()))
    variants = []
    for draft_device in draft_devices:
        both = [device] if draft_device == device else [device, draft_device]
        draft_b = bench.draft_stage("B", draft_device)
        # timed() runs these closures before the loop moves on.
        t_draft = timed(lambda: draft_b().to(device, non_blocking=True), iters, both)  # noqa: B023
        streams = (torch.cuda.Stream(draft_device), torch.cuda.Stream(device)) if device.type == "cuda" else None
        t_psd = timed(lambda: psd_step(draft_b, verify_stages["A"], device, streams), iters, both)  # noqa: B023
        if device.type == "cpu":
            name = "CPU, back to back (smoke)"
        elif draft_device == device:
            name = "one GPU, drafter on a second stream"
        else:
            name = f"two GPUs, drafter on {draft_device}"
        variants.append(
            {
                "name": name,
                "draft_device": str(draft_device),
                "t_draft": t_draft,
                "t_verify": t_verify,
                "t_psd": t_psd,
                "overlap": overlap_ratio((0.0, t_draft), (0.0, t_verify), t_psd),
                "ideal_psd_over_sd": (t_draft + t_verify) / max(t_draft, t_verify),
                "psd_over_sd": t_sd["A"] / t_psd,
                "psd_over_sd_2x_batch": t_sd["AB"] / (2 * t_psd),
            }
        )
    return {
        "attention": attention,
        "k": args.k,
        "batch": args.batch,
        "ctx": args.ctx,
        "target": dataclasses.asdict(args.target),
        "draft": dataclasses.asdict(args.draft),
        "dtype": _dname(args.dtype),
        "iters": iters,
        "t_sd": t_sd["A"],
        "t_sd_2x_batch": t_sd["AB"],
        "variants": variants,
    }


# ---------------------------------------------------------------- report


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    return env


def flashinfer_version() -> str:
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001 - reported; the flashinfer checks then fail with it
        return f"not importable ({type(e).__name__}: {e})"
    return getattr(flashinfer, "__version__", "unknown")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def table(report: dict) -> str:
    lines = [f"{'check':32} {'ok':4} {'max_err':>10} {'tol':>8} {'s':>6}  detail"]
    for c in report["checks"]:
        lines.append(
            f"{c['name']:32} {'yes' if c['ok'] else 'NO':4} {_fmt(c['max_err']):>10} "
            f"{_fmt(c['tol']):>8} {c['seconds']:6.1f}  {c['detail']}"
        )
    b = report.get("benchmark")
    if b:
        ms = lambda t: f"{t * 1e3:.2f}"  # noqa: E731
        lines += [
            "",
            f"benchmark: attention={b['attention']} B={b['batch']} k={b['k']} ctx={b['ctx']}  "
            f"SD step {ms(b['t_sd'])} ms, SD step at 2B {ms(b['t_sd_2x_batch'])} ms",
            f"{'variant':40} {'draft ms':>9} {'verify ms':>9} {'PSD ms':>8} {'overlap':>8} "
            f"{'PSD/SD':>7} {'@2B':>6} {'ideal':>6}",
        ]
        for v in b["variants"]:
            lines.append(
                f"{v['name']:40} {ms(v['t_draft']):>9} {ms(v['t_verify']):>9} {ms(v['t_psd']):>8} "
                f"{v['overlap']:8.2f} {v['psd_over_sd']:7.2f} {v['psd_over_sd_2x_batch']:6.2f} "
                f"{v['ideal_psd_over_sd']:6.2f}"
            )
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m minedraft_sglang.lab.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the same code paths on CPU with tiny shapes (SDPA, no streams), for CI",
    )
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument(
        "--target", type=parse_shape, help="target shape: 8b, 1b, small, tiny, or NAME:field=value,... (default 8b)"
    )
    p.add_argument("--draft", type=parse_shape, help="draft shape (default 1b)")
    p.add_argument("--batch", type=int, help="sub-batch size B (default 32)")
    p.add_argument("--k", type=int, default=4, help="draft tokens per request (default 4)")
    p.add_argument("--ctx", type=int, help="longest prefix; prefixes are drawn from [ctx/2, ctx] (default 1024)")
    p.add_argument("--iters", type=int, help="timed steps per measurement (default 20)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="benchmark dtype")
    p.add_argument("--skip-benchmark", action="store_true", help="unit checks only")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = {
        "target": SHAPES["tiny" if smoke else "8b"],
        "draft": SHAPES["tiny-draft" if smoke else "1b"],
        "batch": 2 if smoke else 32,
        "ctx": 48 if smoke else 1024,
        "iters": 2 if smoke else 20,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = torch.float32 if smoke else DTYPES[args.dtype]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False). Run it on a GPU "
            "machine, or pass --cpu-smoke to exercise the same code paths on CPU.",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    report = {"environment": environment(device), "notes": []}
    if args.cpu_smoke:
        backends, dtypes = ["sdpa"], [torch.float32]
    else:
        report["environment"]["flashinfer"] = flashinfer_version()
        backends, dtypes = ["flashinfer", "sdpa"], [torch.bfloat16, torch.float16]
    report["checks"] = unit_checks(device, args.k, backends, dtypes)
    ok = all(c["ok"] for c in report["checks"])
    fi_ok = "flashinfer" in backends and all(c["ok"] for c in report["checks"] if "flashinfer" in c["name"])
    if "flashinfer" in backends and not fi_ok:
        report["notes"].append("FlashInfer checks failed: the benchmark verifies with SDPA")
    if not args.skip_benchmark:
        try:
            report["benchmark"] = run_benchmark(args, device, "flashinfer" if fi_ok else "sdpa", report["notes"])
        except Exception as e:  # noqa: BLE001 - the checks above still belong in the report
            report["notes"].append(f"benchmark failed: {type(e).__name__}: {e}")
            ok = False
    report["ok"] = ok
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(table(report))
    print(f"{'all checks passed' if ok else 'FAILED'} in {report['elapsed_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
