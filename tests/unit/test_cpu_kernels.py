"""The pure-torch sgl_kernel CPU ops, each against a plain PyTorch reference.

Ops are called through torch.ops.sgl_kernel, as SGLang calls them, so the
registered schemas (argument order, optional and mutable tensors) are under
test too. Attention is checked against F.scaled_dot_product_attention.
"""

import enum
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minedraft_sglang.cpu.kernels import ops

ops.register()
K = torch.ops.sgl_kernel
SHIM_DIR = Path(ops.__file__).resolve().parent / "shim"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randint(low, high, gen_):
    return int(torch.randint(low, high, (1,), generator=gen_))


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def test_register_is_idempotent_and_leaves_amx_probe_alone():
    ops.register()
    ops.register()
    for name in ops.OP_NAMES:
        assert hasattr(K, name), name
    # SGLang switches to its AMX kernels when this op exists.
    assert not hasattr(K, "convert_weight_packed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="sgl_kernel loads its CUDA library, not the shim")
def test_shim_lets_sgl_kernel_import_and_call_the_ops():
    script = """
import torch, sgl_kernel
from sgl_kernel import (copy_all_layer_kv_cache_cpu, fill_bonus_tokens_cpu,
    verify_tree_greedy_cpu, build_draft_decode_metadata_cpu)
tokens = torch.tensor([[5, 6, 7], [8, 9, 10]], dtype=torch.int32)
bonus = torch.zeros(2, dtype=torch.int32)
fill_bonus_tokens_cpu(tokens, torch.tensor([2, 3], dtype=torch.int32), bonus, 3)
assert bonus.tolist() == [6, 10], bonus
assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
"""
    env = dict(os.environ, PYTHONPATH=str(SHIM_DIR), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# KV cache and req_to_token bookkeeping
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_copy_all_layer_kv_cache(seed):
    g = gen(seed)
    rows = 40
    buffers = [
        torch.randn(rows, 2, 8, generator=g).half(),
        torch.randn(rows, 3, 5, generator=g),
        torch.randn(rows, 1, 16, generator=g).bfloat16(),
    ]
    expected = [b.clone() for b in buffers]
    n = randint(1, 15, g)
    # Overlapping source and target sets: the op must read all sources first.
    tgt = torch.randperm(rows, generator=g)[:n]
    src = torch.randint(0, rows, (n,), generator=g)
    for e, b in zip(expected, buffers):
        e[tgt] = b[src]
    data_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    K.copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt, src)
    for e, b in zip(expected, buffers):
        assert torch.equal(e, b)


def random_requests(g, num_reqs=6, pool_len=24):
    """req_to_token of distinct slots, a batch of distinct rows, and ranges in them."""
    bs = randint(1, num_reqs + 1, g)
    req_to_token = torch.randperm(1000, generator=g)[: num_reqs * pool_len].int().view(num_reqs, pool_len)
    rows = torch.randperm(num_reqs, generator=g)[:bs]
    start = torch.randint(0, pool_len // 2, (bs,), generator=g)
    end = start + torch.randint(0, pool_len // 2, (bs,), generator=g)
    return req_to_token, rows, start, end


@pytest.mark.parametrize("seed", range(4))
def test_assign_req_to_token_pool(seed):
    g = gen(seed)
    req_to_token, rows, start, end = random_requests(g)
    total = int((end - start).sum())
    out_cache_loc = torch.randint(0, 10_000, (total,), generator=g)
    expected = req_to_token.clone()
    packed = 0
    for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist()):
        expected[r, s:e] = out_cache_loc[packed : packed + e - s].int()
        packed += e - s
    K.assign_req_to_token_pool_cpu(rows, req_to_token, start.int(), end.int(), out_cache_loc, req_to_token.shape[1])
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("seed", range(4))
def test_assign_extend_cache_locs(seed):
    g = gen(seed)
    req_to_token, rows, start, end = random_requests(g)
    expected = torch.cat([req_to_token[r, s:e] for r, s, e in zip(rows, start, end)]).long()
    out = torch.full_like(expected, -1)
    K.assign_extend_cache_locs_cpu(rows, req_to_token, start, end, out, req_to_token.shape[1])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("seed", range(4))
def test_assign_draft_cache_locs_contiguous(seed):
    g = gen(seed)
    topk, num_steps = randint(1, 4, g), randint(1, 4, g)
    req_to_token, rows, seq_lens, _ = random_requests(g)
    n = topk * num_steps
    expected = torch.cat([req_to_token[r, s : s + n] for r, s in zip(rows, seq_lens)]).long()
    out = torch.full_like(expected, -1)
    K.assign_draft_cache_locs_contiguous_cpu(rows, req_to_token, seq_lens, out, req_to_token.shape[1], topk, num_steps)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("seed", range(4))
def test_build_draft_decode_metadata(seed):
    g = gen(seed)
    topk, num_steps = randint(1, 4, g), randint(1, 4, g)
    req_to_token, rows, seq_lens, _ = random_requests(g)
    pool_len = req_to_token.shape[1]
    out = K.build_draft_decode_metadata_cpu(req_to_token, rows, seq_lens, topk, num_steps, pool_len)
    assert out.shape == (len(rows) * topk, pool_len) and out.dtype == req_to_token.dtype
    for i, (r, s) in enumerate(zip(rows.tolist(), seq_lens.tolist())):
        for branch in range(topk):
            draft = req_to_token[r, s + branch * num_steps : s + (branch + 1) * num_steps]
            expected = torch.cat([req_to_token[r, :s], draft])
            assert torch.equal(out[i * topk + branch, : s + num_steps], expected)


# ---------------------------------------------------------------------------
# Speculative verification
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_fill_bonus_tokens(seed):
    g = gen(seed)
    bs, stride = randint(1, 6, g), randint(1, 6, g)
    accept_tokens = torch.randint(0, 1000, (bs, stride), generator=g, dtype=torch.int32)
    accept_lens = torch.randint(1, stride + 1, (bs,), generator=g, dtype=torch.int32)
    bonus = torch.zeros(bs, dtype=torch.int32)
    K.fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus, stride)
    assert bonus.tolist() == [accept_tokens[i, accept_lens[i] - 1].item() for i in range(bs)]


@pytest.mark.parametrize("seed", range(3))
def test_fill_accept_out_cache_loc(seed):
    g = gen(seed)
    bs, steps, draft = randint(1, 5, g), 4, 6
    accept_index = torch.full((bs, steps), -1, dtype=torch.int32)
    for b in range(bs):
        n = randint(1, steps + 1, g)
        accept_index[b, :n] = b * draft + torch.randperm(draft, generator=g)[:n].sort().values
    out_cache_loc = torch.randperm(500, generator=g)[: bs * draft]
    dst = torch.full((bs * steps,), -7, dtype=torch.int64)
    K.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, dst)
    accepted = [out_cache_loc[i].item() for i in accept_index.flatten().tolist() if i > -1]
    assert dst[: len(accepted)].tolist() == accepted
    assert (dst[len(accepted) :] == -7).all()


def random_draft_tree(g, topk, num_steps, draft_token_num):
    """(parent_list, selected_index) for one request, shaped like EAGLE's draft loop output.

    Candidates are numbered by position in the concatenated per-step score
    lists; a child's cumulative score is below its parent's, so the
    draft_token_num - 1 best candidates always include their ancestors.
    """
    scores = torch.rand(topk, generator=g) * 0.5 + 0.5
    flat_scores = [scores]
    parent_chunks = [torch.arange(-1, topk)]
    for step in range(1, num_steps):
        children = (scores[:, None] * (torch.rand(topk, topk, generator=g) * 0.9 + 0.05)).flatten()
        flat_scores.append(children)
        scores, chosen = children.topk(topk)
        parent_chunks.append(chosen + topk + (step - 1) * topk * topk)
    selected = torch.cat(flat_scores).topk(draft_token_num - 1).indices.sort().values
    # The last step's picks are never expanded, so they are nobody's parent.
    parent_list = torch.cat(parent_chunks[:-1]) if num_steps > 1 else torch.empty(0, dtype=torch.long)
    return parent_list, selected


def reference_tree(parent_list, selected, topk, seq_len):
    """Parent node per node, then links, positions and the ancestor mask."""
    selected = selected.tolist()
    n = len(selected) + 1
    parent = [None]
    for candidate in selected:
        parent_candidate = None if candidate < topk else parent_list[candidate // topk].item()
        parent.append(0 if parent_candidate is None else selected.index(parent_candidate) + 1)
    first_child, next_sibling = [-1] * n, [-1] * n
    for p in range(n):
        kids = [i for i in range(1, n) if parent[i] == p]
        if kids:
            first_child[p] = kids[0]
            for a, b in zip(kids, kids[1:]):
                next_sibling[a] = b
    mask = torch.eye(n, dtype=torch.bool)
    mask[:, 0] = True
    depth = [0] * n
    for i in range(1, n):
        j = parent[i]
        depth[i] = 1
        while j != 0:
            mask[i, j] = True
            depth[i] += 1
            j = parent[j]
    return first_child, next_sibling, [seq_len + d for d in depth], mask


class MaskMode(enum.IntEnum):  # SGLang passes its TreeMaskMode IntEnum
    FULL_MASK = 0
    QLEN_ONLY = 1


def run_build_tree(parent_list, selected, seq_lens, topk, num_steps, n, mode):
    bs = len(seq_lens)
    if mode == MaskMode.FULL_MASK:
        tree_mask = torch.ones(int(seq_lens.sum()) * n + bs * n * n, dtype=torch.bool)
    else:
        tree_mask = torch.ones(bs * n * n, dtype=torch.bool)
    positions = torch.zeros(bs * n, dtype=torch.long)
    retrieve = torch.full((3, bs, n), -1, dtype=torch.long)
    K.build_tree_kernel_efficient_cpu(
        parent_list,
        selected,
        seq_lens,
        tree_mask,
        positions,
        retrieve[0],
        retrieve[1],
        retrieve[2],
        topk,
        num_steps,
        n,
        mode,
    )
    return tree_mask, positions, retrieve


@pytest.mark.parametrize("mode", list(MaskMode))
@pytest.mark.parametrize("topk,num_steps,n", [(1, 3, 4), (2, 3, 4), (2, 2, 4), (4, 3, 8), (3, 4, 10), (4, 1, 5)])
def test_build_tree_kernel_efficient(topk, num_steps, n, mode):
    g = gen(topk * 100 + num_steps * 10 + n)
    bs = 3
    trees = [random_draft_tree(g, topk, num_steps, n) for _ in range(bs)]
    parent_list = torch.stack([t[0] for t in trees])
    selected = torch.stack([t[1] for t in trees])
    seq_lens = torch.randint(1, 20, (bs,), generator=g)
    tree_mask, positions, retrieve = run_build_tree(parent_list, selected, seq_lens, topk, num_steps, n, mode)
    offset = 0
    for b in range(bs):
        first_child, next_sibling, pos, mask = reference_tree(parent_list[b], selected[b], topk, int(seq_lens[b]))
        assert retrieve[0, b].tolist() == list(range(b * n, (b + 1) * n))
        assert retrieve[1, b].tolist() == first_child
        assert retrieve[2, b].tolist() == next_sibling
        assert positions[b * n : (b + 1) * n].tolist() == pos
        if topk == 1:  # a chain: the mask is plain causal
            assert torch.equal(mask, torch.ones(n, n).tril().bool())
        if mode == MaskMode.QLEN_ONLY:
            assert torch.equal(tree_mask[b * n * n : (b + 1) * n * n].view(n, n), mask)
        else:
            width = int(seq_lens[b]) + n
            rows = tree_mask[offset : offset + n * width].view(n, width)
            assert rows[:, : int(seq_lens[b])].all()
            assert torch.equal(rows[:, int(seq_lens[b]) :], mask)
            offset += n * width


def reference_verify(candidates, first_child, next_sibling, target, num_steps):
    """Accepted node path per request: at each level the first child (in sibling order) the target agrees with."""
    bs, n = candidates.shape
    paths = []
    for b in range(bs):
        path, node = [0], 0
        while len(path) < num_steps:
            kids, kid = [], first_child[b, node].item()
            while kid != -1:
                kids.append(kid)
                kid = next_sibling[b, kid].item()
            match = [k for k in kids if candidates[b, k] == target[b, node]]
            if not match:
                break
            node = match[0]
            path.append(node)
        paths.append(path)
    return paths


def run_verify(candidates, retrieve, target, num_steps):
    bs, n = candidates.shape
    predicts = torch.full((bs * n,), -1, dtype=torch.int32)
    accept_index = torch.full((bs, num_steps), -1, dtype=torch.int32)
    accept_num = torch.full((bs,), -1, dtype=torch.int32)
    K.verify_tree_greedy_cpu(
        predicts, accept_index, accept_num, candidates, retrieve[0], retrieve[1], retrieve[2], target
    )
    return predicts, accept_index, accept_num


def test_verify_tree_greedy_hand_case():
    # Root 0 has children 1 and 2 (siblings); node 3 is below node 2.
    candidates = torch.tensor([[9, 4, 5, 6]])
    retrieve = torch.tensor([[[0, 1, 2, 3]], [[1, -1, 3, -1]], [[-1, 2, -1, -1]]])
    target = torch.tensor([[5, 7, 6, 8]])  # root predicts 5 -> node 2; node 2 predicts 6 -> node 3
    predicts, accept_index, accept_num = run_verify(candidates, retrieve, target, 4)
    assert accept_num.tolist() == [2]
    assert accept_index.tolist() == [[0, 2, 3, -1]]
    assert predicts.tolist() == [5, -1, 6, 8]


@pytest.mark.parametrize("topk,num_steps,n", [(1, 3, 4), (2, 3, 4), (4, 3, 8), (3, 4, 10)])
def test_verify_tree_greedy_random(topk, num_steps, n):
    g = gen(7 * topk + n)
    bs = 5
    trees = [random_draft_tree(g, topk, num_steps, n) for _ in range(bs)]
    parent_list = torch.stack([t[0] for t in trees])
    selected = torch.stack([t[1] for t in trees])
    seq_lens = torch.randint(1, 20, (bs,), generator=g)
    _, _, retrieve = run_build_tree(parent_list, selected, seq_lens, topk, num_steps, n, MaskMode.QLEN_ONLY)
    # Two-token vocab: matches, misses and sibling hops all happen.
    candidates = torch.randint(0, 2, (bs, n), generator=g)
    target = torch.randint(0, 2, (bs, n), generator=g)
    steps = num_steps + 1
    predicts, accept_index, accept_num = run_verify(candidates, retrieve, target, steps)
    paths = reference_verify(candidates, retrieve[1], retrieve[2], target, steps)
    assert sum(len(p) for p in paths) > bs  # something was accepted
    expected_predicts = torch.full((bs * n,), -1, dtype=torch.int32)
    for b, path in enumerate(paths):
        assert accept_num[b] == len(path) - 1
        assert accept_index[b].tolist() == [b * n + i for i in path] + [-1] * (steps - len(path))
        for node in path:
            expected_predicts[b * n + node] = target[b, node]
    assert torch.equal(predicts, expected_predicts)


def chain_build_args(bs=2, k=3, mode=MaskMode.QLEN_ONLY):
    """Valid build_tree_kernel_efficient arguments for chains of k drafts,
    as MINEDRAFT's verify passes them (verify.chain_topology)."""
    n = k + 1
    width = k if k > 1 else 0
    args = dict(
        parent_list=torch.arange(-1, width - 1).repeat(bs, 1),
        selected_index=torch.arange(k).repeat(bs, 1),
        verified_seq_len=torch.full((bs,), 5),
        tree_mask=torch.ones(bs * n * n if mode == MaskMode.QLEN_ONLY else bs * 5 * n + bs * n * n, dtype=torch.bool),
        positions=torch.zeros(bs * n, dtype=torch.long),
        retrive_index=torch.full((bs, n), -1),
        retrive_next_token=torch.full((bs, n), -1),
        retrive_next_sibling=torch.full((bs, n), -1),
        topk=1,
        depth=k,
        draft_token_num=n,
        tree_mask_mode=mode,
    )
    return args


# What sgl-kernel's JIT tree kernel (sglang/kernels/jit/csrc/speculative/tree.cuh)
# refuses on the host, one change at a time from valid chain arguments.
BUILD_TREE_REFUSALS = {
    # A k = 0 verify (a plain decode step through the verify path), issue 21.
    "depth 0": (dict(k=0), {}, "topk (1) and depth (0) must be > 0"),
    "topk 0": ({}, dict(topk=0), "topk (0) and depth (3) must be > 0"),
    "too many tokens": (dict(k=1024), {}, "draft_token_num (1025) must be in 1..1024"),
    "mask mode": ({}, dict(tree_mask_mode=3), "unknown tree_mask_mode 3"),
    "parent width": ({}, dict(parent_list=torch.zeros(2, 2, dtype=torch.long)), "parent_list width 2 must be"),
    "int32 seq lens": ({}, dict(verified_seq_len=torch.full((2,), 5, dtype=torch.int32)), "verified_seq_len must be"),
    "2-D positions": ({}, dict(positions=torch.zeros(2, 4, dtype=torch.long)), "positions must have 1 dimensions"),
    "selected width": ({}, dict(selected_index=torch.zeros(2, 2, dtype=torch.long)), "selected_index has size 2"),
    "strided retrieve": (
        {},
        dict(retrive_index=torch.full((4, 2), -1).t()),
        "retrive_index is not contiguous",
    ),
    "mask too small": ({}, dict(tree_mask=torch.ones(31, dtype=torch.bool)), "tree_mask has 31 bytes"),
    "bit-packing past 32": (dict(k=32), dict(tree_mask_mode=2), "bit-packed masks hold at most 32 tokens"),
}


@pytest.mark.parametrize("case", list(BUILD_TREE_REFUSALS))
def test_build_tree_refuses_what_the_gpu_kernel_refuses(case):
    shape, override, message = BUILD_TREE_REFUSALS[case]
    args = {**chain_build_args(**shape), **override}
    with pytest.raises(RuntimeError, match=re.escape(message)):
        K.build_tree_kernel_efficient_cpu(*args.values())


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MaskMode))
def test_build_tree_takes_every_chain_minedraft_verifies(k, mode):
    K.build_tree_kernel_efficient_cpu(*chain_build_args(k=k, mode=mode).values())


def verify_args(bs=2, n=4, steps=4):
    return dict(
        predicts=torch.zeros(bs * n, dtype=torch.int32),
        accept_index=torch.zeros(bs, steps, dtype=torch.int32),
        accept_token_num=torch.zeros(bs, dtype=torch.int32),
        candidates=torch.zeros(bs, n, dtype=torch.long),
        retrive_index=torch.zeros(bs, n, dtype=torch.long),
        retrive_next_token=torch.full((bs, n), -1),
        retrive_next_sibling=torch.full((bs, n), -1),
        target_predict=torch.zeros(bs, n, dtype=torch.long),
    )


VERIFY_REFUSALS = {
    "no accept slot": (dict(steps=0), {}, "no draft token or no accept slot"),
    "no draft token": (dict(n=0, steps=1), {}, "no draft token or no accept slot"),
    "int64 accept index": ({}, dict(accept_index=torch.zeros(2, 4, dtype=torch.long)), "accept_index must be"),
    "int32 candidates": ({}, dict(candidates=torch.zeros(2, 4, dtype=torch.int32)), "candidates must be"),
    "int64 predicts": ({}, dict(predicts=torch.zeros(8, dtype=torch.long)), "predicts must be"),
    "predicts size": ({}, dict(predicts=torch.zeros(7, dtype=torch.int32)), "predicts has size 7"),
    "flat target": ({}, dict(target_predict=torch.zeros(8, dtype=torch.long)), "target_predict must have 2"),
    "batch mismatch": ({}, dict(accept_token_num=torch.zeros(3, dtype=torch.int32)), "accept_token_num has size 3"),
}


@pytest.mark.parametrize("case", list(VERIFY_REFUSALS))
def test_verify_tree_greedy_refuses_what_the_gpu_kernel_refuses(case):
    shape, override, message = VERIFY_REFUSALS[case]
    args = {**verify_args(**shape), **override}
    with pytest.raises(RuntimeError, match=re.escape(message)):
        K.verify_tree_greedy_cpu(*args.values())


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def sdpa(q, k, v, sm_scale, mask=None):
    """q [Lq, H, D], k/v [Lk, Hkv, *] -> [Lq, H, Dv] with torch's SDPA (GQA by enable_gqa)."""
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],
        k.float().transpose(0, 1)[None],
        v.float().transpose(0, 1)[None],
        attn_mask=mask,
        scale=sm_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def explicit_attention(q, k, v, sm_scale, mask, logit_cap, sinks):
    """Textbook attention, for what SDPA cannot express (logit cap, sinks)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.exp()
    denominator = weights.sum(-1, keepdim=True)
    if sinks is not None:
        denominator = denominator + sinks.float().exp()[:, None, None]
    return torch.einsum("hqk,khd->qhd", weights / denominator, v)


class KVPool:
    """A random KV pool and, per request, distinct slots in it."""

    def __init__(self, g, seq_lens, heads_kv, head_dim, v_dim, dtype, pool_len=64):
        self.k = torch.randn(512, heads_kv, head_dim, generator=g).to(dtype)
        self.v = torch.randn(512, heads_kv, v_dim, generator=g).to(dtype)
        bs = len(seq_lens)
        self.rows = torch.randperm(bs + 2, generator=g)[:bs]
        self.req_to_token = torch.zeros(bs + 2, pool_len, dtype=torch.int32)
        slots = torch.randperm(512, generator=g)
        used = 0
        for r, s in zip(self.rows.tolist(), seq_lens):
            self.req_to_token[r, :s] = slots[used : used + s].int()
            used += s

    def slots(self, i, end, start=0):
        return self.req_to_token[self.rows[i], start:end].long()


def decode(
    q,
    k_cache,
    v_cache,
    out,
    pool,
    seq_lens,
    *,
    loc,
    sm_scale,
    key=None,
    value=None,
    k_scale=1.0,
    v_scale=1.0,
    attn_logits=None,
    logit_cap=0.0,
    window=0,
    sinks=None,
):
    """decode_attention_cpu in SGLang's positional order, for a self-attention batch of ``pool``."""
    K.decode_attention_cpu(
        q, k_cache, v_cache, k_scale, v_scale, out, key, value, loc,
        torch.empty(0) if attn_logits is None else attn_logits,
        pool.req_to_token, pool.rows, seq_lens, sm_scale, logit_cap, False, window, None, sinks,
    )  # fmt: skip


def tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


DECODE_CASES = [
    # (bs, heads, heads_kv, head_dim, v_dim, dtype)
    (1, 4, 4, 16, 16, torch.float32),
    (3, 4, 2, 32, 32, torch.float32),
    (4, 8, 1, 16, 8, torch.float32),
    (2, 4, 2, 32, 32, torch.bfloat16),
]


@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("write_kv", [True, False])
def test_decode_attention_matches_sdpa(case, write_kv):
    bs, heads, heads_kv, head_dim, v_dim, dtype = case
    g = gen(bs * 31 + heads_kv)
    seq_lens = torch.randint(1, 40, (bs,), generator=g)
    pool = KVPool(g, seq_lens.tolist(), heads_kv, head_dim, v_dim, dtype)
    q = torch.randn(bs, heads, head_dim, generator=g).to(dtype)
    loc = torch.stack([pool.slots(i, s)[-1] for i, s in enumerate(seq_lens.tolist())])
    key = torch.randn(bs, heads_kv, head_dim, generator=g).to(dtype)
    value = torch.randn(bs, heads_kv, v_dim, generator=g).to(dtype)
    expected_k, expected_v = pool.k.clone(), pool.v.clone()
    if write_kv:
        expected_k[loc], expected_v[loc] = key, value
    sm_scale = 0.3 + float(torch.rand(1, generator=g))
    out = torch.empty(bs, heads, v_dim, dtype=dtype)
    decode(
        q,
        pool.k,
        pool.v,
        out,
        pool,
        seq_lens,
        loc=loc,
        sm_scale=sm_scale,
        key=key if write_kv else None,
        value=value if write_kv else None,
        attn_logits=torch.empty(bs, heads, 8, v_dim + 1),
    )
    assert torch.equal(pool.k, expected_k) and torch.equal(pool.v, expected_v)
    for i, s in enumerate(seq_lens.tolist()):
        slots = pool.slots(i, s)
        ref = sdpa(q[i : i + 1], expected_k[slots], expected_v[slots], sm_scale)
        torch.testing.assert_close(out[i : i + 1].float(), ref, **tolerance(dtype))


def test_decode_attention_sliding_window_logit_cap_and_sinks():
    g = gen(11)
    bs, heads, heads_kv, head_dim = 3, 4, 2, 16
    seq_lens = torch.tensor([30, 5, 17])
    pool = KVPool(g, seq_lens.tolist(), heads_kv, head_dim, head_dim, torch.float32)
    q = torch.randn(bs, heads, head_dim, generator=g)
    loc = torch.stack([pool.slots(i, s)[-1] for i, s in enumerate(seq_lens.tolist())])
    window, cap, sm_scale = 8, 2.0, 0.7
    sinks = torch.randn(heads, generator=g)
    out = torch.empty(bs, heads, head_dim)
    decode(
        q, pool.k, pool.v, out, pool, seq_lens, loc=loc, sm_scale=sm_scale, logit_cap=cap, window=window, sinks=sinks
    )
    for i, s in enumerate(seq_lens.tolist()):
        slots = pool.slots(i, s)
        visible = (torch.arange(s) > s - 1 - window)[None, :]
        ref = explicit_attention(q[i : i + 1], pool.k[slots], pool.v[slots], sm_scale, visible, cap, sinks)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    # Without cap and sinks the window alone must agree with SDPA as well.
    decode(q, pool.k, pool.v, out, pool, seq_lens, loc=loc, sm_scale=sm_scale, window=window)
    for i, s in enumerate(seq_lens.tolist()):
        slots = pool.slots(i, s)
        visible = (torch.arange(s) > s - 1 - window)[None, :]
        ref = sdpa(q[i : i + 1], pool.k[slots], pool.v[slots], sm_scale, visible)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_reads_fp8_cache_with_scale():
    g = gen(5)
    seq_lens = torch.tensor([12, 7])
    pool = KVPool(g, seq_lens.tolist(), 2, 16, 16, torch.float32)
    k_scale, v_scale = 0.5, 2.0
    k8 = (pool.k / k_scale).to(torch.float8_e4m3fn)
    v8 = (pool.v / v_scale).to(torch.float8_e4m3fn)
    q = torch.randn(2, 4, 16, generator=g)
    out = torch.empty(2, 4, 16)
    loc = torch.zeros(2, dtype=torch.long)
    decode(q, k8, v8, out, pool, seq_lens, loc=loc, sm_scale=0.25, k_scale=k_scale, v_scale=v_scale)
    for i, s in enumerate(seq_lens.tolist()):
        slots = pool.slots(i, s)
        ref = sdpa(q[i : i + 1], k8[slots].float() * k_scale, v8[slots].float() * v_scale, 0.25)
        torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def extend_batch(g, bs, heads, heads_kv, head_dim, v_dim, dtype, extend_lens=None):
    prefix = torch.randint(0, 25, (bs,), generator=g)
    extend = torch.randint(1, 9, (bs,), generator=g) if extend_lens is None else extend_lens
    seq_lens = prefix + extend
    pool = KVPool(g, seq_lens.tolist(), heads_kv, head_dim, v_dim, dtype)
    total = int(extend.sum())
    q = torch.randn(total, heads, head_dim, generator=g).to(dtype)
    k_new = torch.randn(total, heads_kv, head_dim, generator=g).to(dtype)
    v_new = torch.randn(total, heads_kv, v_dim, generator=g).to(dtype)
    starts = torch.cumsum(extend, 0) - extend
    return pool, prefix, extend, seq_lens, starts, q, k_new, v_new


def run_extend(
    pool,
    q,
    k_new,
    v_new,
    seq_lens,
    extend,
    starts,
    sm_scale,
    *,
    window=0,
    sinks=None,
    tree_mask=None,
    is_causal=True,
    cap=0.0,
):
    out = torch.empty(q.shape[0], q.shape[1], pool.v.shape[-1], dtype=q.dtype)
    K.extend_attention_cpu(
        q,
        k_new,
        v_new,
        out,
        pool.k,
        pool.v,
        1.0,
        1.0,
        pool.req_to_token,
        pool.rows,
        seq_lens,
        extend.int(),
        starts.int(),
        int(extend.max()),
        sm_scale,
        cap,
        False,
        window,
        None,
        sinks,
        tree_mask,
        is_causal,
    )
    return out


def causal_mask(prefix, extend):
    query_pos = torch.arange(prefix, prefix + extend)[:, None]
    return torch.arange(prefix + extend)[None, :] <= query_pos


EXTEND_CASES = [
    # (bs, heads, heads_kv, head_dim, v_dim, dtype)
    (1, 2, 2, 16, 16, torch.float32),
    (3, 4, 2, 32, 32, torch.float32),
    (4, 8, 2, 16, 24, torch.float32),
    (3, 4, 1, 32, 32, torch.bfloat16),
]


@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_attention_causal_matches_sdpa(case):
    bs, heads, heads_kv, head_dim, v_dim, dtype = case
    g = gen(bs * 13 + head_dim)
    pool, prefix, extend, seq_lens, starts, q, k_new, v_new = extend_batch(
        g, bs, heads, heads_kv, head_dim, v_dim, dtype
    )
    sm_scale = 0.2 + float(torch.rand(1, generator=g))
    # The new tokens' cache rows hold stale data: the op must take k_new/v_new.
    out = run_extend(pool, q, k_new, v_new, seq_lens, extend, starts, sm_scale)
    for i in range(bs):
        p, e, s0 = int(prefix[i]), int(extend[i]), int(starts[i])
        slots = pool.slots(i, p)
        keys = torch.cat([pool.k[slots], k_new[s0 : s0 + e]])
        values = torch.cat([pool.v[slots], v_new[s0 : s0 + e]])
        ref = sdpa(q[s0 : s0 + e], keys, values, sm_scale, causal_mask(p, e))
        torch.testing.assert_close(out[s0 : s0 + e].float(), ref, **tolerance(dtype))


def test_extend_attention_reads_new_keys_from_cache_when_not_given():
    g = gen(3)
    pool, prefix, extend, seq_lens, starts, q, k_new, v_new = extend_batch(g, 3, 4, 2, 16, 16, torch.float32)
    for i in range(3):
        new_slots = pool.slots(i, int(seq_lens[i]), int(prefix[i]))
        pool.k[new_slots] = k_new[int(starts[i]) : int(starts[i]) + int(extend[i])]
        pool.v[new_slots] = v_new[int(starts[i]) : int(starts[i]) + int(extend[i])]
    from_args = run_extend(pool, q, k_new, v_new, seq_lens, extend, starts, 0.5)
    from_cache = run_extend(pool, q, None, None, seq_lens, extend, starts, 0.5)
    torch.testing.assert_close(from_cache, from_args, atol=1e-6, rtol=1e-6)


def test_extend_attention_non_causal_window_cap_and_sinks():
    g = gen(4)
    bs, heads = 3, 4
    pool, prefix, extend, seq_lens, starts, q, k_new, v_new = extend_batch(g, bs, heads, 2, 16, 16, torch.float32)
    sinks = torch.randn(heads, generator=g)
    full = run_extend(pool, q, k_new, v_new, seq_lens, extend, starts, 0.4, is_causal=False)
    windowed = run_extend(pool, q, k_new, v_new, seq_lens, extend, starts, 0.4, window=5, sinks=sinks, cap=1.5)
    for i in range(bs):
        p, e, s0 = int(prefix[i]), int(extend[i]), int(starts[i])
        slots = pool.slots(i, p)
        keys = torch.cat([pool.k[slots], k_new[s0 : s0 + e]])
        values = torch.cat([pool.v[slots], v_new[s0 : s0 + e]])
        ref_full = sdpa(q[s0 : s0 + e], keys, values, 0.4)
        torch.testing.assert_close(full[s0 : s0 + e], ref_full, atol=1e-5, rtol=1e-5)
        query_pos = torch.arange(p, p + e)[:, None]
        visible = causal_mask(p, e) & (torch.arange(p + e)[None, :] > query_pos - 5)
        ref_windowed = explicit_attention(q[s0 : s0 + e], keys, values, 0.4, visible, 1.5, sinks)
        torch.testing.assert_close(windowed[s0 : s0 + e], ref_windowed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk,num_steps,n", [(2, 3, 4), (4, 3, 8), (3, 4, 10)])
def test_extend_attention_tree_mask_matches_sdpa(topk, num_steps, n):
    """Speculative verify: each request's n draft tokens see the prefix and their tree ancestors."""
    g = gen(topk + n)
    bs = 3
    pool, prefix, extend, seq_lens, starts, q, k_new, v_new = extend_batch(
        g, bs, 4, 2, 16, 16, torch.float32, extend_lens=torch.full((bs,), n)
    )
    masks = []
    for i in range(bs):
        parent_list, selected = random_draft_tree(g, topk, num_steps, n)
        masks.append(reference_tree(parent_list, selected, topk, int(prefix[i]))[3])
    assert any(not torch.equal(m, torch.ones(n, n).tril().bool()) for m in masks)  # real branching
    out = run_extend(pool, q, k_new, v_new, seq_lens, extend, starts, 0.25, tree_mask=torch.stack(masks).flatten())
    for i in range(bs):
        p, s0 = int(prefix[i]), int(starts[i])
        slots = pool.slots(i, p)
        keys = torch.cat([pool.k[slots], k_new[s0 : s0 + n]])
        values = torch.cat([pool.v[slots], v_new[s0 : s0 + n]])
        visible = torch.cat([torch.ones(n, p, dtype=torch.bool), masks[i]], dim=1)
        ref = sdpa(q[s0 : s0 + n], keys, values, 0.25, visible)
        torch.testing.assert_close(out[s0 : s0 + n], ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Collectives (tensor parallelism)
# ---------------------------------------------------------------------------

SUM = int(torch.distributed.ReduceOp.SUM)

# Each rank: its share, then the collectives, checked against sums and
# concatenations of every rank's share computed locally.
TWO_RANKS = """
import sys, torch, torch.distributed as dist
from minedraft_sglang.cpu.kernels import ops
ops.register()
K = torch.ops.sgl_kernel
rank, port = int(sys.argv[1]), sys.argv[2]
K.initialize(2, rank)  # SGLang calls it before torch.distributed is up
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
shares = [torch.randn(3, 5, generator=torch.Generator().manual_seed(r)) for r in range(2)]
data = shares[rank].clone()
K.shm_allreduce(data, %(sum)d)
torch.testing.assert_close(data, shares[0] + shares[1], rtol=0, atol=1e-6)
for dim in (0, 1, -1):
    assert torch.equal(K.shm_allgather(shares[rank], dim), torch.cat(shares, dim)), dim
K.initialize(3, rank)
try:
    K.shm_allreduce(data, %(sum)d)
except RuntimeError as e:
    assert "does not match" in str(e), e
else:
    raise AssertionError("a ring of 3 over a group of 2 went unnoticed")
# Left to interpreter exit, gloo's teardown races the other rank's and aborts
# ("terminate called without an active exception", 1 run in 20).
dist.barrier()
dist.destroy_process_group()
print("ok")
"""


def test_collectives_over_two_gloo_ranks_match_sum_and_concatenation():
    from minedraft_sglang.lab.launcher import free_port

    script = TWO_RANKS % {"sum": SUM}
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen([sys.executable, "-c", script, str(rank), port], env=env, stdout=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0] and outputs == ["ok\n", "ok\n"], outputs


def test_collectives_without_torch_distributed_are_local():
    assert not torch.distributed.is_initialized()
    data = torch.randn(4, 3, generator=gen(0))
    expected = data.clone()
    K.shm_allreduce(data, SUM)
    assert torch.equal(data, expected)
    gathered = K.shm_allgather(data, 1)
    assert torch.equal(gathered, data) and gathered.data_ptr() != data.data_ptr()
    with pytest.raises(NotImplementedError, match="only SUM"):
        K.shm_allreduce(data, int(torch.distributed.ReduceOp.MAX))
