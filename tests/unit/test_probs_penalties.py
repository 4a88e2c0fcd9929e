"""The target's sampling distributions and exact chain penalties (minedraft_sglang.sampling)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from minedraft_sglang.sampling.penalties import chain_penalties
from minedraft_sglang.sampling.probs import target_probs


def test_target_probs_follow_sglang_sampling_rules():
    """Temperature, then top-k, top-p and min-p on the sorted distribution,
    renormalised: the distribution SGLang's sampler draws from."""
    logits = torch.tensor([[[2.0, 1.0, 0.5, 0.0, -1.0]] * 2] * 4)  # [bs=4, W=2, V=5]
    info = SimpleNamespace(
        temperatures=torch.tensor([1.0, 2.0, 1.0, 1.0]),
        top_ks=torch.tensor([1, 5, 2, 5]),
        top_ps=torch.tensor([1.0, 1.0, 1.0, 0.7]),
        min_ps=torch.tensor([0.0, 0.0, 0.0, 0.0]),
        # SGLang's host-side summaries of these requests.
        need_top_k_sampling=True,
        need_top_p_sampling=True,
        need_min_p_sampling=False,
        max_top_k=5,
    )
    probs = target_probs(logits, info)
    base = torch.softmax(logits[0, 0], -1)
    assert torch.allclose(probs[0, 0], torch.tensor([1.0, 0, 0, 0, 0]))  # greedy: one-hot
    assert torch.allclose(probs[1, 1], torch.softmax(logits[0, 0] / 2, -1))
    two = base[:2] / base[:2].sum()
    assert torch.allclose(probs[2, 0], torch.cat([two, torch.zeros(3)]))
    # top-p 0.7: base = [.61, .22, ...]: the mass before token 1 is .61 <= .7, before token 2 .83 > .7.
    assert torch.allclose(probs[3, 0], torch.cat([two, torch.zeros(3)]))
    assert probs.shape == logits.shape and torch.allclose(probs.sum(-1), torch.ones(4, 2))


def _penalized_req(output_ids, **params):
    from types import SimpleNamespace

    from sglang.srt.sampling.sampling_params import SamplingParams

    return SimpleNamespace(
        output_ids=output_ids,
        sampling_params=SamplingParams(**params),
        eos_token_ids={2},
        tokenizer=SimpleNamespace(eos_token_id=2, additional_stop_token_ids=None),
    )


def _plain_decoding_penalty(logits, out, params):
    """What plain decoding applies before sampling the token after ``out``
    (SGLang's penalizers: counts over the output so far)."""
    logits = logits.clone()
    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
    logits -= params.get("frequency_penalty", 0.0) * counts
    logits -= params.get("presence_penalty", 0.0) * (counts > 0).float()
    if len(out) < params.get("min_new_tokens", 0):
        logits[[2, *params.get("stop_token_ids", [])]] = float("-inf")
    rep = params.get("repetition_penalty", 1.0)
    return torch.where(counts > 0, torch.where(logits < 0, logits * rep, logits / rep), logits)


def test_chain_penalties_equal_plain_decoding_at_every_chain_position():
    g = torch.Generator().manual_seed(0)
    vocab, k = 12, 3
    cases = [
        ([5, 5, 7], dict(frequency_penalty=0.7)),
        ([1, 3], dict(presence_penalty=1.5, repetition_penalty=1.3)),
        ([4], dict(min_new_tokens=3, stop_token_ids=[9])),
        ([], dict(repetition_penalty=2.0, frequency_penalty=-0.4, min_new_tokens=1)),
        ([6, 6], dict()),  # no penalty in a batch with penalised neighbours
    ]
    reqs = [_penalized_req(list(out), **p) for out, p in cases]
    drafts = torch.tensor([[5, 8, 5], [3, 3, 11], [9, 2, 9], [0, 0, 1], [6, 6, 6]])
    logits = torch.randn(len(cases) * (k + 1), vocab, generator=g) * 3
    got = logits.clone()
    chain_penalties(reqs, drafts)(got)
    for i, (out, params) in enumerate(cases):
        for j in range(k + 1):
            prefix = out + drafts[i, :j].tolist()
            want = _plain_decoding_penalty(logits[i * (k + 1) + j], prefix, params)
            torch.testing.assert_close(got[i * (k + 1) + j], want, msg=f"request {i} position {j}")


def test_no_penalties_means_no_work():
    assert chain_penalties([_penalized_req([1, 2])], torch.tensor([[3, 4]])) is None
