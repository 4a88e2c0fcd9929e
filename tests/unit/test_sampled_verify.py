"""A sampled verify's distributions and memory (issue 34, finding N10).

``target_probs`` applies SGLang's rules (temperature, top-k, top-p, min-p)
doing only the work each batch needs: no full-vocabulary sort unless a
request has top-p < 1 without a top-k. The property test holds it to the
rules written over a full sort, for random logits and random mixes of
per-request settings. The memory test runs ``sample_chain`` under a
``TorchDispatchMode`` that records every aten op and every tensor it
allocates, live until the last tensor on its storage is collected: no sort
over the vocabulary, no int64 tensor over it (sort indices, one-hot drafts),
and at most two fp32 copies of the [bs, W, V] probabilities alive at once.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minedraft_sglang.sampling.probs import target_probs
from minedraft_sglang.verify import VerifyContext, sample_chain

TOP_K_ALL = 1 << 30  # SGLang's top-k of a request without one (sampling_params.TOP_K_ALL)


def _sampling_info(temperatures, top_ks, top_ps, min_ps, stale: bool = False) -> SimpleNamespace:
    """The fields of SGLang's SamplingBatchInfo that a sampled verify reads,
    host-side summaries by SGLang's rules (``from_schedule_batch``). A PSD
    sub-batch keeps its whole batch's summaries (``filter_batch`` leaves
    them), so ``stale`` ones may say more work is needed than is."""
    max_top_k = max(top_ks) if all(k < TOP_K_ALL for k in top_ks) else None
    return SimpleNamespace(
        logit_bias=None,
        temperatures=torch.tensor(temperatures, dtype=torch.float32).view(-1, 1),
        top_ks=torch.tensor(top_ks, dtype=torch.int32),
        top_ps=torch.tensor(top_ps, dtype=torch.float32),
        min_ps=torch.tensor(min_ps, dtype=torch.float32),
        need_top_k_sampling=stale or any(k != TOP_K_ALL for k in top_ks),
        need_top_p_sampling=stale or any(p != 1.0 for p in top_ps),
        need_min_p_sampling=stale or any(p > 0 for p in min_ps),
        max_top_k=max_top_k + 7 if stale and max_top_k is not None else max_top_k,
    )


def _reference_probs(logits: torch.Tensor, info) -> torch.Tensor:
    """SGLang's rules over a full sort (the rule ``target_probs`` had at
    8f417d1); a request with neither top-k nor top-p keeps its whole
    distribution, as SGLang's sampling kernels leave it."""
    bs, _, vocab = logits.shape
    probs = torch.softmax(logits.float() / info.temperatures.view(bs, 1, 1), dim=-1)
    top_k, top_p = info.top_ks.view(bs, 1, 1), info.top_ps.view(bs, 1, 1)
    ranked, order = probs.sort(dim=-1, descending=True)
    keep = (
        (torch.arange(vocab) < top_k)
        & ((ranked.cumsum(-1) - ranked) <= top_p)
        & (ranked >= info.min_ps.view(bs, 1, 1) * ranked[..., :1])
    ) | ((top_k >= vocab) & (top_p >= 1) & (ranked >= info.min_ps.view(bs, 1, 1) * ranked[..., :1]))
    ranked = ranked * keep
    return torch.zeros_like(probs).scatter_(-1, order, ranked / ranked.sum(-1, keepdim=True))


_request = st.tuples(
    st.floats(0.2, 3.0),  # temperature
    st.one_of(st.just(TOP_K_ALL), st.just(1), st.integers(1, 70)),  # top-k (1: greedy; above V: all)
    st.one_of(st.just(1.0), st.floats(0.01, 1.0)),  # top-p
    st.one_of(st.just(0.0), st.floats(0.0, 1.0)),  # min-p
)


def _logits(bs: int, width: int, vocab: int, spread: float, seed: int) -> torch.Tensor:
    """Random logits spread over [0, spread], at least spread / (2 vocab)
    apart: no two tokens of a row tie, so no rule's choice among equal
    probabilities can differ between a sort and a topk. With spread / T
    below 80 no probability is subnormal (fewer bits, ties again)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(bs * width)]).float()
    return ((ranks + 0.5 * torch.rand(ranks.shape, generator=g)) * spread / vocab).view(bs, width, vocab)


@settings(max_examples=400, deadline=None, database=None)
@given(
    requests=st.lists(_request, min_size=1, max_size=6),
    width=st.integers(1, 3),
    vocab=st.integers(2, 64),
    spread=st.sampled_from([0.5, 4.0, 16.0]),
    seed=st.integers(0, 2**31 - 1),
    stale=st.booleans(),
)
def test_target_probs_equal_the_rules_over_a_full_sort(requests, width, vocab, spread, seed, stale):
    temps, top_ks, top_ps, min_ps = map(list, zip(*requests))
    info = _sampling_info(temps, top_ks, top_ps, min_ps, stale)
    logits = _logits(len(requests), width, vocab, spread, seed)
    got, want = target_probs(logits.clone(), info), _reference_probs(logits, info)
    assert torch.equal(got > 0, want > 0), "a rule kept or dropped a different token"
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    greedy = info.top_ks == 1
    one_hot = torch.nn.functional.one_hot(logits[greedy].argmax(-1), vocab).float()
    assert torch.equal(got[greedy], one_hot), "a greedy request's distribution is not one-hot at the argmax"


class _Allocations(TorchDispatchMode):
    """Every aten op run under it, and the bytes of every storage those ops
    allocate, live until the last tensor on it is collected."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []  # (op, [(shape, dtype)] of its inputs, of its outputs)
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        self.live_bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops.append((func, *([(t.shape, t.dtype) for t in ts] for ts in (inputs, outputs))))
        outside = {t.untyped_storage().data_ptr() for t in inputs} - self.live.keys()
        for t in outputs:
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if storage.nbytes() == 0 or address in outside:  # a view of, or a write into, a tensor from before
                continue
            if address not in self.live:
                self.live[address] = [storage.nbytes(), 0]
                self.live_bytes += storage.nbytes()
                self.peak = max(self.peak, self.live_bytes)
            self.live[address][1] += 1
            weakref.finalize(t, self._release, address)
        return out

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[address]


BS, W, V = 8, 5, 4096
MIXES = {
    "temperature only": ([TOP_K_ALL] * BS, [1.0] * BS, [0.0] * BS),
    "min-p": ([TOP_K_ALL] * BS, [1.0] * BS, [0.1] * BS),
    # Requests without a top-k beside greedy and top-k ones: no max_top_k, the device says 20.
    "top-k, greedy and neither": ([20, 1, 5] + [TOP_K_ALL] * (BS - 3), [1.0] * BS, [0.0] * BS),
    # Qwen2.5's generation defaults on every request.
    "top-k with top-p": ([20] * BS, [0.8] * BS, [0.05] * BS),
}


def _sampled_verify(top_ks, top_ps, min_ps) -> _Allocations:
    g = torch.Generator().manual_seed(0)
    info = _sampling_info([0.7] * BS, top_ks, top_ps, min_ps)
    batch = SimpleNamespace(sampling_info=info, seq_lens=torch.full((BS,), 10))
    logits_output = SimpleNamespace(next_token_logits=torch.randn(BS * W, V, generator=g) * 3)
    drafts = torch.randint(0, V, (BS, W - 1), generator=g)
    context = VerifyContext(drafts, None, None, torch.Generator().manual_seed(1), None)
    with _Allocations() as allocations:
        sample_chain(SimpleNamespace(draft_token_num=W), batch, logits_output, context)
    return allocations


def test_sampled_verify_memory_without_top_p():
    """Peak memory of a sampled verify bounded with no full-vocabulary sort
    when no request has top-p < 1 without a top-k (issue 34)."""
    copy = BS * W * V * 4  # one fp32 [bs, W, V]
    for name, mix in MIXES.items():
        allocations = _sampled_verify(*mix)
        largest_top_k = max(k for k in mix[0] if k < V) if any(k < V for k in mix[0]) else 0
        for op, inputs, outputs in allocations.ops:
            assert not (op.name().startswith("aten::sort") and inputs[0][0][-1] == V), f"{name}: a sort over V"
            if op.name().startswith("aten::topk"):
                assert outputs[0][0][-1] <= largest_top_k, f"{name}: topk of {outputs[0][0][-1]}"
            big_int = [shape for shape, dtype in outputs if dtype == torch.int64 and shape and shape[-1] == V]
            assert not big_int, f"{name}: {op.name()} made an int64 tensor over the vocabulary {big_int}"
        # The scaled logits and the softmax while softmax runs; later
        # temporaries are [bs, V] (one row per request).
        print(f"{name}: peak {allocations.peak / copy:.3f} fp32 copies of [bs, W, V]")
        assert allocations.peak <= 2 * copy + BS * V * 4, f"{name}: peak {allocations.peak / copy:.2f} copies"
