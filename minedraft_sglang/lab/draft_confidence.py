"""Would stopping a draft chain at the drafter's first unsure token pay, and
by how much, on the real pair? Offline, outside SGLang; manual: docs/lab.md,
"Draft confidence".

For each prompt the target decodes greedily; the drafter then reads prompt
and output in one forward (teacher forcing) and gives, at every output
position, its greedy token and that token's probability. While a chain's
drafts are right, the drafter's chain proposals are exactly these, so the
accepted length of any chain policy follows from the table. (After a wrong
draft the rest of the chain is rejected whatever it holds; a policy that
decides how far to draft from later probabilities reads the teacher-forced
ones there, a stand-in.)

Policies replayed over every output, one verify step after another:
    fixed k      draft k tokens
    stop(p, K)   draft up to K tokens, ending the chain after the first whose
                 probability is below p (that token is still verified)
Each step costs n*t_d + t_v(n + 1) for n drafted tokens: the drafter's and
the target's per-step times on the hardware to plan for (measured ones,
e.g. a bench trace's medians), so the figure is the tokens per second each
policy would reach there, relative to fixed k.
"""

from __future__ import annotations

import argparse
import json

import torch

from minedraft_sglang.lab import real_models
from minedraft_sglang.lab.bench.plan import make_prompts

# The verify whose time --t-verify gives: k + 1 tokens at k = 3.
VERIFY_TOKENS = 4


@torch.inference_mode()
def chain_table(target, draft, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[bool], list[float]]:
    """Per output position: is the drafter's greedy token the target's, and
    the drafter's probability of its token."""
    prompt = torch.tensor([prompt_ids])
    out = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    logits = draft(out[:, :-1]).logits[0, len(prompt_ids) - 1 :].float()
    probs, ids = torch.softmax(logits, dim=-1).max(dim=-1)
    return (ids == out[0, len(prompt_ids) :]).tolist(), probs.tolist()


def replay(right: list[bool], probs: list[float], max_k: int, stop_below: float) -> tuple[int, int, int]:
    """(steps, drafted tokens, committed tokens) of one output under
    ``stop(stop_below, max_k)`` (``stop_below`` 0: fixed ``max_k``)."""
    steps = drafted = committed = 0
    i, n = 0, len(right)
    while i < n:
        chain = 0
        while chain < max_k and i + chain < n:
            chain += 1
            if probs[i + chain - 1] < stop_below:
                break
        accepted = 0
        while accepted < chain and right[i + accepted]:
            accepted += 1
        # The accepted drafts and the target's own next token (none past the end).
        steps, drafted, committed = steps + 1, drafted + chain, committed + min(accepted + 1, n - i)
        i += accepted + 1
    return steps, drafted, committed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-set", default="humaneval")
    ap.add_argument("-n", type=int, default=8, help="prompts: the bench's first n (its --seed 0)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--t-draft", type=float, required=True, help="seconds of one draft forward")
    ap.add_argument("--t-verify", type=float, required=True, help="seconds of a verify of k + 1 = 4 tokens")
    ap.add_argument("--t-verify-token", type=float, default=0.01, help="seconds per verified token beyond 4")
    ap.add_argument("--base-k", type=int, default=3, help="the fixed k the others are compared with")
    ap.add_argument("--out", help="write the table and the replays as JSON")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft_path, target_path = real_models.ensure(real_models.DRAFT), real_models.ensure(real_models.TARGET)
    tok = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, torch_dtype=torch.bfloat16).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, torch_dtype=torch.bfloat16).eval()
    tables = [
        chain_table(target, draft, tok(p)["input_ids"], args.max_new_tokens)
        for p in make_prompts(args.n, seed=0, prompt_set=args.prompt_set)
    ]

    def rate(max_k: int, stop_below: float) -> dict:
        steps, drafted, committed = map(sum, zip(*(replay(r, p, max_k, stop_below) for r, p in tables)))
        extra_tokens = drafted + steps * (1 - VERIFY_TOKENS)  # verified beyond VERIFY_TOKENS a step
        cost = drafted * args.t_draft + steps * args.t_verify + extra_tokens * args.t_verify_token
        return {"accept": committed / steps, "drafted": drafted / steps, "tok_s": committed / cost}

    policies = {f"fixed k={k}": rate(k, 0.0) for k in range(1, 9)}
    policies |= {f"stop p<{p} K={K}": rate(K, p) for p in (0.3, 0.5, 0.7, 0.8, 0.9) for K in (3, 4, 6, 8)}
    base = policies[f"fixed k={args.base_k}"]["tok_s"]
    right = [x for r, _ in tables for x in r]
    print(f"{len(tables)} outputs, {len(right)} positions, drafter right at {sum(right) / len(right):.3f} of them")
    print(f"{'policy':20s} {'accept':>7s} {'drafted':>8s} {'tok/s':>7s} {'x k=' + str(args.base_k):>7s}")
    for name, r in policies.items():
        print(f"{name:20s} {r['accept']:7.2f} {r['drafted']:8.2f} {r['tok_s']:7.2f} {r['tok_s'] / base:7.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "tables": tables, "policies": policies}, f)


if __name__ == "__main__":
    main()
