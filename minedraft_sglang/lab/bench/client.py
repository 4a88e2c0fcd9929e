"""The benchmark's load generator: threads posting streamed greedy /generate
requests, timed on the client's clock as sglang.bench_serving times them.
Not bench_serving itself: only /generate returns each request's output token
ids and its own spec_verify_ct / spec_accept_length, and exactness is the
contract. Manual: docs/lab.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests


def stream_one(url: str, prompt: str, max_new_tokens: int) -> dict:
    """One streamed greedy /generate request (ignore_eos: every reply is
    ``max_new_tokens`` long): the final chunk (output_ids and meta_info)
    plus client-side ttft_s and latency_s."""
    payload = {
        "text": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }
    t0 = time.monotonic()
    ttft, last = None, None
    with requests.post(url + "/generate", json=payload, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if ttft is None and chunk.get("output_ids"):
                ttft = time.monotonic() - t0
            last = chunk
    if last is None:
        raise RuntimeError(f"{url}/generate streamed nothing")
    return {**last, "ttft_s": ttft, "latency_s": time.monotonic() - t0}


def send_all(
    url: str, prompts: list[str], *, max_new_tokens: int, concurrency: int, on_done: Callable[[], None] = lambda: None
) -> tuple[list[dict], float]:
    """Every prompt with at most ``concurrency`` in flight, ``on_done`` called
    after each reply; returns the replies (in prompt order) and the makespan
    in seconds, from before the first request to after the last reply."""

    def one(prompt: str) -> dict:
        reply = stream_one(url, prompt, max_new_tokens)
        on_done()
        return reply

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(one, prompts))
    return replies, time.monotonic() - t0


def flush_cache(url: str) -> None:
    """Empties the server's prefix cache, so that each run starts alike
    whatever ran before it on this server."""
    # The server refuses while requests are still finishing.
    for _ in range(20):
        if requests.post(url + "/flush_cache", timeout=60).status_code == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/flush_cache kept failing")
