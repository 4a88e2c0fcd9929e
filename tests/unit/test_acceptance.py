"""Chain-draft acceptance: exactness of rejection sampling, ragged lengths,
greedy acceptance.

The exactness harness runs a tiny bigram "target" T[prev] -> distribution and
bigram "drafter" Q[prev] -> distribution through whole speculative rounds
(draft K tokens from Q, verify them as point masses with a random ragged
length, continue from the last output token) and checks with a chi-square
test that the generated text is distributed as sampling from T directly:
point-mass acceptance is exact however the drafts were chosen. The same
harness must flag broken acceptance rules, which is what makes a pass
meaningful.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from minedraft_sglang.sampling import acceptance
from minedraft_sglang.sampling.acceptance import greedy_accept, rejection_sample

V, K = 6, 3
N = 40_000  # sampled sequences per harness run
PROMPT = 0  # last prompt token; the first generated token follows T[PROMPT]


def _tables(seed: int, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.softmax(1.5 * torch.randn((V, V), generator=gen, dtype=torch.float64), dim=-1)
    draft = torch.softmax(1.5 * torch.randn((V, V), generator=gen, dtype=torch.float64), dim=-1)
    if sparse:
        # The drafter never proposes token 5 (only the residual can emit it);
        # after even tokens the target forbids token 4 (such drafts have p = 0).
        draft[:, 5] = 0
        target[0::2, 4] = 0
        draft /= draft.sum(-1, keepdim=True)
        target /= target.sum(-1, keepdim=True)
    return target.float(), draft.float()


def _generate(sampler, target, draft, length: int, seed: int) -> torch.Tensor:
    """First ``length`` tokens of N sequences generated speculatively."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(N)
    buf = torch.full((N, length * (K + 1)), -1, dtype=torch.int64)
    filled = torch.zeros(N, dtype=torch.int64)
    ctx = torch.full((N,), PROMPT, dtype=torch.int64)
    for _ in range(length):  # every round emits at least one token
        prev, tokens = ctx, []
        for _ in range(K):
            prev = torch.multinomial(draft[prev], 1, generator=gen).squeeze(1)
            tokens.append(prev)
        draft_tokens = torch.stack(tokens, dim=1)
        target_probs = target[torch.cat([ctx[:, None], draft_tokens], dim=1)]
        num_drafts = torch.randint(0, K + 1, (N,), generator=gen)
        out, lens = sampler(draft_tokens, target_probs, num_drafts, gen)
        # Write the whole padded row; the next round overwrites the padding.
        buf.scatter_(1, filled[:, None] + torch.arange(K + 1), out)
        filled += lens
        ctx = out[rows, lens - 1]
    return buf[:, :length]


def _pvalue(cells: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of observed cell indices to ``probs``."""
    counts = torch.bincount(cells, minlength=probs.numel()).double()
    probs = probs.double().reshape(-1)
    support = probs > 0
    assert counts[~support].sum() == 0, "a token the target forbids was emitted"
    expected = probs[support] / probs[support].sum() * len(cells)
    assert expected.min() >= 5, "harness too small for a chi-square test"
    return float(chisquare(counts[support].numpy(), expected.numpy()).pvalue)


def _exactness_pvalues(sampler, sparse: bool) -> tuple[float, float]:
    """p-values for the first token ~ T[PROMPT] and for the first two tokens
    ~ T[PROMPT](x1) * T[x1](x2)."""
    target, draft = _tables(seed=1, sparse=sparse)
    seqs = _generate(sampler, target, draft, length=2, seed=2)
    joint = target[PROMPT][:, None] * target
    return _pvalue(seqs[:, 0], target[PROMPT]), _pvalue(seqs[:, 0] * V + seqs[:, 1], joint)


@pytest.mark.parametrize("sparse", [False, True])
def test_output_is_distributed_as_the_target(sparse):
    first, pair = _exactness_pvalues(rejection_sample, sparse)
    print(f"correct rule, sparse={sparse}: p(first)={first:.3g} p(pair)={pair:.3g}")
    assert first > 1e-4 and pair > 1e-4


def _always_accept(draft_tokens, target_probs, num_drafts, gen):
    # Claiming p(d) = 1 at every draft accepts them all.
    claimed = target_probs.clone()
    claimed[:, :K] = F.one_hot(draft_tokens, V).float()
    return rejection_sample(draft_tokens, claimed, num_drafts, gen)


def _off_by_one(draft_tokens, target_probs, num_drafts, gen):
    # Draft j+1 judged by the target's distribution one position later.
    shifted = torch.cat([target_probs[:, 1:], target_probs[:, -1:]], dim=1)
    return rejection_sample(draft_tokens, shifted, num_drafts, gen)


def _not_a_prefix(monkeypatch):
    # Drafts accepted after a rejection still counted.
    monkeypatch.setattr(acceptance, "_accepted_prefix", lambda accept: accept.sum(dim=1))
    return rejection_sample


def _residual_is_p(monkeypatch):
    monkeypatch.setattr(acceptance, "_residual_", lambda p, draft, rejected: p)
    return rejection_sample


@pytest.mark.parametrize("broken", ["always_accept", "off_by_one", "not_a_prefix", "residual_is_p"])
def test_harness_detects_broken_rules(broken, monkeypatch):
    sampler = {
        "always_accept": lambda: _always_accept,
        "off_by_one": lambda: _off_by_one,
        "not_a_prefix": lambda: _not_a_prefix(monkeypatch),
        "residual_is_p": lambda: _residual_is_p(monkeypatch),
    }[broken]()
    first, pair = _exactness_pvalues(sampler, sparse=False)
    print(f"broken rule {broken}: p(first)={first:.3g} p(pair)={pair:.3g}")
    assert first < 1e-6 and pair < 1e-6


def _random_batch(seed: int, bs: int = 64):
    gen = torch.Generator().manual_seed(seed)
    draft_probs = torch.softmax(torch.randn((bs, K, V), generator=gen), dim=-1)
    target_probs = torch.softmax(torch.randn((bs, K + 1, V), generator=gen), dim=-1)
    draft_tokens = torch.multinomial(draft_probs.reshape(-1, V), 1, generator=gen).reshape(bs, K)
    num_drafts = torch.randint(0, K + 1, (bs,), generator=gen)
    return draft_tokens, target_probs, num_drafts


def test_ragged_output_layout():
    draft_tokens, target_probs, num_drafts = _random_batch(3)
    out, lens = rejection_sample(draft_tokens, target_probs, num_drafts, torch.Generator().manual_seed(0))
    assert out.shape == (64, K + 1) and out.dtype == torch.int64 and lens.dtype == torch.int64
    assert bool(((lens >= 1) & (lens <= num_drafts + 1)).all())
    assert (lens < num_drafts + 1).any() and (lens == num_drafts + 1).any()
    pos = torch.arange(K + 1)
    accepted = pos < (lens - 1)[:, None]
    assert torch.equal(out[:, :K][accepted[:, :K]], draft_tokens[accepted[:, :K]])
    assert bool((out[pos >= lens[:, None]] == -1).all())
    last = out.gather(1, (lens - 1)[:, None])
    assert bool(((last >= 0) & (last < V)).all())


def test_slots_beyond_num_drafts_are_ignored():
    draft_tokens, target_probs, num_drafts = _random_batch(4)
    beyond = torch.arange(K)[None, :] >= num_drafts[:, None]
    junk_tokens = draft_tokens.masked_fill(beyond, -1)
    beyond_bonus = torch.arange(K + 1)[None, :] > num_drafts[:, None]
    junk_p = target_probs.masked_fill(beyond_bonus[:, :, None], float("nan"))
    a = rejection_sample(draft_tokens, target_probs, num_drafts, torch.Generator().manual_seed(5))
    b = rejection_sample(junk_tokens, junk_p, num_drafts, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_zero_drafts_samples_one_token_from_the_target():
    bs = 20_000
    p0 = torch.tensor([0.1, 0.0, 0.3, 0.2, 0.25, 0.15])
    target_probs = torch.softmax(torch.randn((bs, K + 1, V)), dim=-1)
    target_probs[:, 0] = p0
    draft_tokens = torch.ones((bs, K), dtype=torch.int64)
    out, lens = rejection_sample(
        draft_tokens, target_probs, torch.zeros(bs, dtype=torch.int64), torch.Generator().manual_seed(6)
    )
    assert bool((lens == 1).all()) and bool((out[:, 1:] == -1).all())
    assert _pvalue(out[:, 0], p0) > 1e-4
    # K = 0: no draft slots at all, the bonus alone.
    out, lens = rejection_sample(
        draft_tokens[:, :0],
        target_probs[:, :1],
        torch.zeros(bs, dtype=torch.int64),
        torch.Generator().manual_seed(6),
    )
    assert out.shape == (bs, 1) and bool((lens == 1).all()) and _pvalue(out[:, 0], p0) > 1e-4


def test_deterministic_given_a_generator():
    batch = _random_batch(7, bs=256)
    a = rejection_sample(*batch, torch.Generator().manual_seed(8))
    b = rejection_sample(*batch, torch.Generator().manual_seed(8))
    c = rejection_sample(*batch, torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_certain_drafts_and_empty_residual():
    bs = 1000
    ones = torch.ones(bs, dtype=torch.int64)
    gen = torch.Generator().manual_seed(10)
    d1 = torch.ones((bs, K), dtype=torch.int64)
    # p(d) = 0: always rejected, and the token comes from p without d.
    p = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0]).expand(bs, K + 1, V)
    out, lens = rejection_sample(d1, p, ones, gen)
    assert bool((lens == 1).all()) and set(out[:, 0].tolist()) == {2, 3}
    # p(d) = 1: every verified draft is accepted, then the bonus.
    p = F.one_hot(torch.tensor(1), V).float().expand(bs, K + 1, V)
    n = torch.arange(bs) % (K + 1)
    out, lens = rejection_sample(d1, p, n, gen)
    assert torch.equal(lens, n + 1) and bool((out[out != -1] == 1).all())
    # All of p's mass on d, yet p(d) < 1 (rounding, exaggerated): a rejection
    # finds an empty residual and takes the token from p, so d, nothing else.
    p = (0.5 * F.one_hot(torch.tensor(1), V).float()).expand(bs, K + 1, V)
    out, lens = rejection_sample(d1, p, ones, gen)
    assert (lens == 1).any() and bool((out[:, 0] == 1).all())


def test_greedy_accept_by_hand():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7], [9, 9, 9]])
    argmax = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 8], [1, 6, 7, 8], [5, 6, 7, 8], [9, 9, 9, 4]])
    num_drafts = torch.tensor([3, 3, 3, 1, 0])
    out, lens = greedy_accept(drafts, argmax, num_drafts)
    assert out.tolist() == [
        [5, 6, 7, 8],  # all accepted + bonus
        [5, 0, -1, -1],  # mismatch at 2nd draft: correction from the target
        [1, -1, -1, -1],  # first draft wrong
        [5, 6, -1, -1],  # only one draft verified: bonus is the argmax after it
        [9, -1, -1, -1],  # no drafts verified: the target's own next token
    ]
    assert lens.tolist() == [4, 2, 1, 2, 1]
