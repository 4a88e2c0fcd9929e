"""Pure-Python pieces: configuration, sub-batch bookkeeping, overlap ratio."""

from __future__ import annotations

import random

import torch

import pytest

from minedraft_sglang.config import MineDraftConfig, MineDraftConfigError, config_from_argv
from minedraft_sglang.metrics import overlap_ratio
from minedraft_sglang.sub_batches import SubBatches


def test_config_round_trips_through_env(monkeypatch):
    cfg = config_from_argv(["--model-path", "x", "--minedraft-mode", "sequential", "--minedraft-draft-device", "cpu"])
    monkeypatch.setenv("SGLANG_MINEDRAFT_CONFIG", cfg.to_env())
    assert MineDraftConfig.from_env() == cfg
    assert cfg.mode == "sequential"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"mode": "fast"}, "--minedraft-mode"),
        ({"draft_device": "gpu1"}, "--minedraft-draft-device"),
        ({"draft_device": "cuda:7"}, "--minedraft-draft-device"),
        ({"drafter": "magic"}, "--minedraft-drafter"),
        ({"draft_max_len": -1}, "--minedraft-draft-max-len"),
        ({"draft_cores": "1-"}, "--minedraft-draft-cores"),
        ({"draft_cores": "999"}, "--minedraft-draft-cores"),
    ],
)
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(MineDraftConfigError, match=flag):
        MineDraftConfig(**kwargs).validate()


def test_k_is_auto_unless_the_user_chose_one():
    base = ["--model-path", "x"]
    assert config_from_argv(base).k == "auto"
    assert config_from_argv([*base, "--speculative-num-steps", "3"]).k == "fixed"
    assert config_from_argv([*base, "--speculative-num-steps=3"]).k == "fixed"
    assert config_from_argv([*base, "--minedraft-tetris"]).k == "fixed"
    assert config_from_argv([*base, "--speculative-num-steps", "3", "--minedraft-k", "auto"]).k == "auto"
    with pytest.raises(MineDraftConfigError, match="--minedraft-k auto does not combine"):
        config_from_argv([*base, "--minedraft-tetris", "--minedraft-k", "auto"])


def test_env_with_unknown_key_is_refused(monkeypatch):
    monkeypatch.setenv("SGLANG_MINEDRAFT_CONFIG", '{"mode": "psd", "speculate_harder": true}')
    with pytest.raises(MineDraftConfigError, match="unknown keys"):
        MineDraftConfig.from_env()


def _check_invariants(sb: SubBatches, rids, verify, draft):
    assert sorted(verify + draft) == list(range(len(rids)))
    assert set(sb.group) == set(rids)
    sizes = sb.sizes()
    assert abs(sizes[0] - sizes[1]) <= 1, sizes


def test_sub_batches_alternate_and_stay_balanced_under_churn():
    rng = random.Random(0)
    sb = SubBatches()
    running: list[str] = []
    next_id = 0
    last_verified: set[str] = set()
    for _ in range(500):
        for rid in list(running):
            if rng.random() < 0.15:
                running.remove(rid)
        for _ in range(rng.choice([0, 0, 1, 2, 5])):
            running.append(f"r{next_id}")
            next_id += 1
        if not running:
            continue
        prev_group = dict(sb.group)
        verify, draft = sb.split(running)
        _check_invariants(sb, running, verify, draft)
        verified = {running[i] for i in verify}
        # A request that stayed in its half is verified every other step.
        for rid in verified:
            if rid in prev_group and sb.group[rid] == prev_group[rid] and rid in last_verified:
                pytest.fail(f"{rid} verified twice in a row without moving")
        last_verified = verified


def test_newcomers_are_drafted_before_their_first_verification():
    sb = SubBatches()
    verify, draft = sb.split(["a", "b"])
    assert (len(verify), len(draft)) == (1, 1)
    verify, draft = sb.split(["a", "b", "c"])
    # "c" arrives; the two halves are even, so it joins the drafted half.
    assert 2 in draft


def test_overlap_ratio():
    assert overlap_ratio((0, 1), (0, 2), 2) == pytest.approx(1.0)
    assert overlap_ratio((0, 1), (1, 3), 3) == pytest.approx(0.0)
    assert overlap_ratio((0, 1), (0.5, 2.5), 2.5) == pytest.approx(0.5)


def test_target_probs_follow_sglang_sampling_rules():
    """Temperature, then top-k, top-p and min-p on the sorted distribution,
    renormalised: the distribution SGLang's sampler draws from."""
    from types import SimpleNamespace

    import torch

    from minedraft_sglang.verify import target_probs

    logits = torch.tensor([[[2.0, 1.0, 0.5, 0.0, -1.0]] * 2] * 4)  # [bs=4, W=2, V=5]
    info = SimpleNamespace(
        temperatures=torch.tensor([1.0, 2.0, 1.0, 1.0]),
        top_ks=torch.tensor([1, 5, 2, 5]),
        top_ps=torch.tensor([1.0, 1.0, 1.0, 0.7]),
        min_ps=torch.tensor([0.0, 0.0, 0.0, 0.0]),
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
    from minedraft_sglang.verify import chain_penalties

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
    from minedraft_sglang.verify import chain_penalties

    assert chain_penalties([_penalized_req([1, 2])], torch.tensor([[3, 4]])) is None
