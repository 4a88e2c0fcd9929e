"""What the benchmark runs: the runs (RunSpec) with their variants, the model
pair and the prompts. One idea: a run is data, so another drafter variant is
one more entry in VARIANTS. Manual: docs/lab.md.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Varied English sentences (lengths, punctuation, a question, digits); the
# tiny models' tokenizer was trained on this vocabulary.
PROMPTS = [
    "The farmer walked to the old barn in the morning and",
    "Once upon a time, in a quiet village by the river, there lived a",
    "Alice opened the letter slowly because she knew that",
    "The history of science is full of simple ideas that",
    "When the winter came, the birds flew south and the",
    "Write a short story about a clever fox who learns to read.",
    "The server answered every request quickly, but the memory",
    "My teacher always said that the best answer to a hard question is",
    "In 1969 the city built a new bridge across the lake, and",
    "Why do cats sleep so much during the day?",
    "The recipe needs bread, cheese, honey and a cup of warm milk.",
    "After the storm, the children ran into the garden to look for",
    "A good program is easy to read, easy to test and",
    "The old king looked out of the castle window and saw",
    "Tomorrow we will walk through the forest to the mountain lake.",
    "Music, language and nature: three things that make life",
]

PAIRS = {
    # Unrelated random target and draft: acceptance near 1, so this measures
    # the machinery's cost, not a speedup from good drafts.
    "tiny": ("target", "draft"),
    # The draft agrees with the target on every token: acceptance k + 1.
    "tiny-agree": ("bigram", "bigram-draft"),
    # 6-layer and 2-layer 2048-wide random Llamas in bfloat16: per-step cost
    # is weight streaming, as with real models, at a size built in a minute.
    "weight-bound": ("wb-target", "wb-draft"),
}

# Default sizes; --quick's are small enough for CI.
FULL = dict(num_prompts=32, max_new_tokens=64, batch_size=4)
QUICK = dict(num_prompts=8, max_new_tokens=16, batch_size=2)


@dataclass(frozen=True)
class RunSpec:
    """One measured run. ``mode`` names the server configuration (runs of
    one mode share a server); ``engine`` is plain, standalone or a
    --minedraft-mode; ``flags`` are extra server flags of the mode."""

    name: str
    mode: str
    engine: str
    concurrency: int
    flags: tuple[str, ...] = ()
    # False: run at this concurrency only, not at every --concurrency too.
    expand: bool = True

    @property
    def sub_batch_size(self) -> int:
        # PSD verifies one of its two halves per step (the bigger one).
        return (self.concurrency + 1) // 2 if self.engine == "psd" else self.concurrency


def base_runs(B: int) -> list[RunSpec]:
    """The runs every invocation has: plain, plain with tensor parallelism
    over the same cores (--tp, one rank per core), STANDALONE and sequential
    at B and 2B, psd at 2B (two sub-batches of B)."""
    return [
        RunSpec("plain@B", "plain", "plain", B),
        RunSpec("plain@2B", "plain", "plain", 2 * B),
        RunSpec("plain-tp@B", "plain-tp", "plain-tp", B),
        RunSpec("plain-tp@2B", "plain-tp", "plain-tp", 2 * B),
        RunSpec("STANDALONE@B", "STANDALONE", "standalone", B),
        RunSpec("STANDALONE@2B", "STANDALONE", "standalone", 2 * B),
        RunSpec("seq@B", "seq", "sequential", B),
        RunSpec("seq@2B", "seq", "sequential", 2 * B),
        RunSpec("psd@2B", "psd", "psd", 2 * B),
    ]


def _eagle_runs(head: str, B: int) -> list[RunSpec]:
    # The tiny heads are trained for the tiny target (tiny_eagle.py); no
    # EAGLE head for the real pair can be had offline.
    from minedraft_sglang.lab import tiny_eagle

    flags = ("--speculative-draft-model-path", str(tiny_eagle.model_path(head)))
    return [
        RunSpec(f"{head}-seq@B", f"{head}-seq", "sequential", B, flags),
        RunSpec(f"{head}@2B", head, "psd", 2 * B, flags),
    ]


# Optional runs (--variants NAME,...): name -> the runs it adds, given B.
VARIANTS: dict[str, Callable[[int], list[RunSpec]]] = {
    "tetris": lambda B: [RunSpec("tetris@2B", "tetris", "psd", 2 * B, ("--minedraft-tetris",))],
    # What a user gets without choosing k or a mode: draft-ahead below two
    # requests, psd above, k chosen every step in 0..k (0: plain decoding).
    "adaptive": lambda B: [
        RunSpec("adaptive@2B", "adaptive", "psd", 2 * B, ("--minedraft-mode", "auto", "--minedraft-k", "auto"))
    ],
    # The defaults with --minedraft-draft-vocab auto: beside adaptive, what
    # limiting the draft vocabulary gives.
    "vocab": lambda B: [
        RunSpec(
            "adaptive-vocab@2B",
            "adaptive-vocab",
            "psd",
            2 * B,
            ("--minedraft-mode", "auto", "--minedraft-k", "auto", "--minedraft-draft-vocab", "auto"),
        )
    ],
    # The defaults with --minedraft-draft-stop 0.8 and chains of up to 8:
    # drafting ends at the drafter's first unsure token and runs on where it
    # is sure (lab/draft_confidence.py rated it ~1.10x fixed k = 3 at one
    # request on this CPU's stage times).
    "stop": lambda B: [
        RunSpec(
            "adaptive-stop@2B",
            "adaptive-stop",
            "psd",
            2 * B,
            (
                *("--minedraft-mode", "auto", "--minedraft-k", "auto"),
                *("--speculative-num-steps", "8", "--minedraft-draft-stop", "0.8"),
            ),
        )
    ],
    # STANDALONE with chains of 6 (the fixed k the same study rated best):
    # beside the base -k, SGLang's own SD at a longer chain.
    "sa-k6": lambda B: [
        RunSpec(
            f"STANDALONE-k6@{n}",
            "STANDALONE-k6",
            "standalone",
            c,
            ("--speculative-num-steps", "6", "--speculative-num-draft-tokens", "7"),
        )
        for n, c in (("B", B), ("2B", 2 * B))
    ],
    # The planner where it can only choose k (sequential mode: plain or SD on
    # every core, no split): beside seq and adaptive, it tells what the
    # planner costs from what the split's exploration costs.
    "seq-auto": lambda B: [RunSpec("seq-auto@B", "seq-auto", "sequential", B, ("--minedraft-k", "auto"))],
    # Draft-ahead (auto mode, one sub-batch empty) at the fixed -k and B: with
    # seq (every core for each stage) and psd (split cores), the fixed
    # configurations the adaptive choice is measured against.
    "ahead": lambda B: [RunSpec("ahead@B", "ahead", "auto", B, ("--minedraft-k", "fixed"), expand=False)],
    # psd at fixed k = 1, 2, 4 beside the base run's -k: what the adaptive
    # choice is measured against.
    "ksweep": lambda B: [
        RunSpec(f"psd-k{k}@2B", f"psd-k{k}", "psd", 2 * B, ("--speculative-num-steps", str(k)), expand=False)
        for k in (1, 2, 4)
    ],
    "eagle": lambda B: _eagle_runs("eagle", B),
    "eagle3": lambda B: _eagle_runs("eagle3", B),
}


def build_plan(
    B: int, variants: list[str], concurrencies: list[int], *, modes: list[str] | None = None
) -> list[RunSpec]:
    """The base runs, the variants' runs, then every expandable mode at each
    of ``concurrencies`` it does not run at yet; only ``modes`` (and plain)
    if given. The first run is plain: the reference of the exactness check."""
    runs = base_runs(B) + [spec for v in variants for spec in VARIANTS[v](B)]
    protos = {r.mode: r for r in runs if r.expand}
    for c in concurrencies:
        for mode, proto in protos.items():
            if not any(r.mode == mode and r.concurrency == c for r in runs):
                runs.append(RunSpec(f"{mode}@{c}", mode, proto.engine, c, proto.flags))
    return [r for r in runs if not modes or r.mode in modes or r.mode == "plain"]


def model_paths(pair: str, target_path: str | None, draft_path: str | None) -> tuple[str, str, str]:
    """(pair name, target folder, draft folder): the explicit folders if
    given (pair "custom"), else the tiny pair's, built on first use."""
    if target_path:
        return "custom", target_path, draft_path
    # Imported here: it pulls in torch and transformers, which explicit paths
    # do not need.
    from minedraft_sglang.lab import tiny_models

    path = lambda name: (
        tiny_models.model_path(name) if name in tiny_models.MODELS else tiny_models.wide_model_path(name)
    )
    target, draft = PAIRS[pair]
    return pair, str(path(target)), str(path(draft))


def make_prompts(n: int, *, seed: int, prompts_file: str | None = None, prompt_set: str | None = None) -> list[str]:
    """N prompts from ``prompt_set``, ``prompts_file`` (jsonl) or PROMPTS:
    the source list reshuffled (fixed seed) as often as needed, so every
    prompt is used once before any is used twice."""
    rng = random.Random(seed)
    source = _prompt_source(prompts_file, prompt_set)
    prompts: list[str] = []
    while len(prompts) < n:
        round_ = list(source)
        rng.shuffle(round_)
        prompts += round_
    return prompts[:n]


def _prompt_source(prompts_file: str | None, prompt_set: str | None) -> list[str]:
    if prompt_set:
        from minedraft_sglang.lab import prompt_sets

        return prompt_sets.load(prompt_set)
    if not prompts_file:
        return PROMPTS
    lines = Path(prompts_file).read_text().splitlines()
    source = [json.loads(line)["prompt"] for line in lines if line.strip()]
    if not source:
        sys.exit(f"error: {prompts_file} holds no prompts")
    return source
