"""Pure-Python pieces: configuration, sub-batch bookkeeping, overlap ratio."""

from __future__ import annotations

import random

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
    ],
)
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(MineDraftConfigError, match=flag):
        MineDraftConfig(**kwargs).validate()


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
