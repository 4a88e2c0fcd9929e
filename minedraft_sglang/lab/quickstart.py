"""The README's main job: a MINEDRAFT server on CPU with tiny models, one
request through it, the reply and the acceptance printed.

    python -m minedraft_sglang.lab.quickstart [--mode auto|psd|sequential]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.launcher import Server, minedraft_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="auto", choices=("auto", "psd", "sequential"))
    parser.add_argument("--prompt", default="The farmer walked to the old barn and")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    # The bigram pair: a draft that agrees with the target, so acceptance is real.
    target = str(tiny_models.model_path("bigram"))
    draft = str(tiny_models.model_path("bigram-draft"))
    log = Path(tempfile.gettempdir()) / "minedraft-quickstart-server.log"
    print(f"starting: sglang.launch_server --speculative-algorithm MINEDRAFT --minedraft-mode {args.mode} (log: {log})")
    with Server(minedraft_args(target, draft, args.mode), log) as server:
        out = server.generate(args.prompt, args.max_new_tokens)
    meta = out["meta_info"]
    print(f"prompt: {args.prompt!r}")
    print(f"reply:  {out['text']!r}")
    print(
        f"tokens: {meta['completion_tokens']}, verify steps: {meta['spec_verify_ct']}, "
        f"accept length: {meta['spec_accept_length']:.2f} (k=3, at most 4), "
        f"e2e latency: {meta['e2e_latency']:.2f}s"
    )


if __name__ == "__main__":
    main()
