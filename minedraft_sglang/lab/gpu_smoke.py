"""Issue 21's GPU smoke checks: what one lent GPU can check of the serving
path without SGLang (torch, transformers and flashinfer only), one line per
check, in a few minutes (``launch/gpu_smoke.sh``; ``docs/gpu.md``).

    python -m minedraft_sglang.lab.gpu_smoke              # on a GPU
    python -m minedraft_sglang.lab.gpu_smoke --cpu-smoke  # the checks that run on CPU (CI)

Each line is ``PASS|FAIL|SKIP name (seconds): detail``; the last line sums
them up. Exit status: 0 when nothing failed, 1 otherwise, 2 no GPU (without
--cpu-smoke). The checks:

* ``drafter-graphs-on-<dev>``: the real drafter on the last visible GPU,
  steps replayed from CUDA graphs captured at allocate on a stream of that device while
  the thread's current device is cuda:0 (the scheduler's), gives the drafts
  its eager twin gives, and never fell back to eager (item 4). Built,
  allocated and drafting with grad mode on, as in SGLang's scheduler: no
  weight requires grad, no autograd graph is left (issue 34, N2).
* ``drafter-memory-qwen2.5-0.5b``: the drafter at Qwen2.5-0.5B's shape
  (random weights, bfloat16) and the server's default cache (256 slots x
  4101 tokens, k = 4), captured with grad mode on: the device's memory after
  ``allocate`` (current and peak), the graphs and their seconds (issue 34:
  a capture that recorded autograd ran out of memory there).
* ``drafter-cache-preallocated``: the drafter's cache is whole after
  ``allocate`` and does not grow (nor drop its graphs) as requests arrive
  (item 5).
* ``drafter-handoff-two-streams``: draft calls alternating between two
  threads with a stream each (PSD's drafter thread, the scheduler's
  newcomer drafts) give the drafts of a single-stream run (item 6).
* ``drafter-stream-priority``: a draft call's time while another thread
  keeps the GPU busy, with the drafter's stream at the default priority and
  at the highest, which the drafter's thread gets (issue 21's "also").
* ``flashinfer-chain-mask-w<k>``: FlashInfer's paged prefill with the custom
  mask SGLang builds for a chain verify (FULL_MASK layout: each query row
  sees the prefix and the chain up to itself) against the fp32 reference,
  at every width 1..k+1 in one process, as MINEDRAFT's auto k plans them
  (item 3, and issue 21's note on gpu_check's ``causal=True``).
* ``gpu-check-*``: gpu_check's unit checks (attention, drafter against
  transformers, acceptance), without its benchmark.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable

import torch

from minedraft_sglang import devices
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.lab import draft_speed
from minedraft_sglang.lab import gpu_check as gc

K = 4
# The server's drafter cache by default: 256 slots of 4096 + k + 1 tokens.
SERVER_SLOTS, SERVER_MAX_LEN = devices.MAX_DRAFT_REQUESTS, devices.drafter_max_len(0, None, K + 1)


def _line(status: str, name: str, seconds: float, detail: str) -> str:
    return f"{status} {name} ({seconds:.1f}s): {detail}"


def run_check(name: str, check: Callable[[], str]) -> tuple[str, str]:
    """``check`` returns a detail (passed), raises ``Skip`` or fails with any
    other exception; one line either way."""
    t0 = time.perf_counter()
    try:
        detail, status = check(), "PASS"
    except Skip as e:
        detail, status = str(e), "SKIP"
    except Exception as e:  # noqa: BLE001 - every failure is one line of the report
        detail, status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "FAIL"
    line = _line(status, name, time.perf_counter() - t0, detail)
    print(line, flush=True)
    return status, line


class Skip(Exception):
    pass


# ---------------------------------------------------------------- drafter checks


def _requests(vocab: int, gen: torch.Generator, n: int = 6) -> list[DraftRequest]:
    lengths = [1, 7, 30, 64, 100, 150][:n]
    return [
        DraftRequest(str(i), torch.randint(0, vocab, (m,), generator=gen).tolist(), [1]) for i, m in enumerate(lengths)
    ]


def _drafter(device: torch.device, mode: str, shape: gc.Shape, max_requests: int = 8):
    from minedraft_sglang.drafters.standalone import StandaloneDrafter

    model = gc.draft_model(shape, torch.float32, device, init_std=0.2)
    drafter = StandaloneDrafter(model, str(device), torch.float32, step_mode=mode)
    with torch.enable_grad():  # as SGLang's scheduler allocates it (Scheduler.init_memory_pools)
        drafter.allocate(max_requests, 256, max_drafts=K)
    return drafter


def _autograd_left(drafter) -> list[str]:
    """What of ``drafter`` takes part in autograd: weights that require grad,
    and cache tensors or step-graph outputs that carry a graph (issue 34:
    their saved activations are never freed)."""
    weights = [name for name, p in drafter.model.named_parameters() if p.requires_grad]
    outputs = [("a step graph's output", o) for _, _, out in drafter.steps.graphs.values() for o in out]
    tensors = [("cache.k", drafter.cache.k), ("cache.v", drafter.cache.v), *outputs]
    return weights + sorted({name for name, t in tensors if t.requires_grad or t.grad_fn is not None})


def _rounds(drafter, reqs: list[DraftRequest], rounds: int = 3) -> list[list[int]]:
    """Draft ``rounds`` times, each time accepting the first draft (so the
    cache keeps and rewrites rows); returns every call's drafts."""
    out = []
    reqs = list(reqs)
    for _ in range(rounds):
        drafts = drafter.draft(reqs, K).tokens.tolist()
        out.append(drafts)
        reqs = [DraftRequest(r.rid, r.prompt, [*r.output, d[0]]) for r, d in zip(reqs, drafts)]
    return out


def check_drafter_graphs(device: torch.device, shape: gc.Shape) -> str:
    if device.type != "cuda":
        raise Skip("needs a GPU (CUDA graphs)")
    gen = torch.Generator().manual_seed(1)
    reqs = _requests(shape.vocab, gen)
    # Grad mode stays on, as on SGLang's scheduler and drafter threads.
    want = _rounds(_drafter(device, "eager", shape), reqs)
    torch.cuda.set_device(0)  # the scheduler's device is current, as in serving
    drafter = _drafter(device, "graph", shape)
    captured = set(drafter.steps.graphs)
    got = _rounds(drafter, reqs)
    if drafter.steps.mode != "graph":
        raise AssertionError("graph capture failed: the drafter fell back to eager")
    if got != want:
        raise AssertionError("graph-replayed drafts differ from eager ones")
    if set(drafter.steps.graphs) != captured:
        raise AssertionError(f"{len(set(drafter.steps.graphs) - captured)} graphs captured on the hot path")
    if left := _autograd_left(drafter):
        raise AssertionError(f"autograd after capture and drafts: {', '.join(left[:3])}")
    graphs = drafter.step_graphs
    return (
        f"{sum(len(d) * K for d in got)} drafts equal to eager; {graphs['graphs']} graphs on {device} "
        f"(widths {graphs['widths']}), all captured at allocate ({graphs['seconds']:.1f} s), no autograd"
    )


def check_drafter_memory(device: torch.device) -> str:
    if device.type != "cuda":
        raise Skip("needs a GPU (CUDA graphs)")
    from minedraft_sglang.drafters.standalone import StandaloneDrafter

    gib = 2**30
    torch.cuda.set_device(0)  # the scheduler's device is current, as in serving
    before = torch.cuda.memory_allocated(device)
    model = draft_speed.random_model("qwen2.5-0.5b", torch.bfloat16, str(device))
    drafter = StandaloneDrafter(model, str(device), torch.bfloat16, step_mode="graph")
    weights = torch.cuda.memory_allocated(device) - before
    torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad():  # as SGLang's scheduler allocates it (Scheduler.init_memory_pools)
        cache = drafter.allocate(SERVER_SLOTS, SERVER_MAX_LEN, max_drafts=K)
    allocated = torch.cuda.memory_allocated(device) - before
    peak = torch.cuda.max_memory_allocated(device) - before
    graphs = drafter.step_graphs
    print(
        f"INFO drafter-memory: {SERVER_SLOTS} slots x {SERVER_MAX_LEN} tokens, k={K}: after allocate "
        f"{allocated / gib:.2f} GiB allocated, {peak / gib:.2f} GiB peak (weights {weights / gib:.2f} GiB, "
        f"cache {cache / gib:.2f} GiB); {graphs['graphs']} step graphs in {graphs['seconds']:.1f} s: "
        f"requests {graphs['requests']} x widths {graphs['widths']} x keys {graphs['keys']}",
        flush=True,
    )
    if drafter.steps.mode != "graph":
        raise AssertionError("graph capture failed: the drafter fell back to eager")
    if left := _autograd_left(drafter):
        raise AssertionError(f"autograd after capture: {', '.join(left[:3])}")
    del drafter, model
    torch.cuda.empty_cache()
    return (
        f"{graphs['graphs']} graphs in {graphs['seconds']:.1f} s; {allocated / gib:.2f} GiB after allocate, "
        f"{(allocated - weights - cache) / gib:.2f} GiB beyond weights and cache, peak {peak / gib:.2f} GiB"
    )


def check_cache_preallocated(device: torch.device, shape: gc.Shape) -> str:
    drafter = _drafter(device, "eager", shape, max_requests=32)
    cache = drafter.cache
    whole = cache.k.shape[1] == 33
    if device.type == "cuda" and not whole:
        raise AssertionError(f"{cache.k.shape[1] - 1} slots after allocate(32, ...), expected 32")
    version = cache.version
    for i in range(4):
        drafter.draft([DraftRequest(f"{i}-{j}", [5, 6, 7], [1]) for j in range(8)], 2)
    if device.type == "cuda" and cache.version != version:
        raise AssertionError("the cache grew on the hot path")
    grown = "whole at startup, never grew" if whole and cache.version == version else "grows (CPU)"
    return f"32 requests: {grown}"


def check_handoff(device: torch.device, shape: gc.Shape) -> str:
    gen = torch.Generator().manual_seed(3)
    reqs = _requests(shape.vocab, gen)
    mode = "graph" if device.type == "cuda" else "eager"
    want = _rounds(_drafter(device, mode, shape), reqs, rounds=6)
    drafter = _drafter(device, mode, shape)
    got, current = [], list(reqs)
    errors: list[BaseException] = []

    def call_on(stream):
        def run():
            try:
                if stream is not None:
                    torch.cuda.set_device(device)
                    torch.cuda.set_stream(stream)
                got.append(drafter.draft(current, K).tokens)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        return run

    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)] if device.type == "cuda" else [None, None]
    for i in range(6):
        thread = threading.Thread(target=call_on(streams[i % 2]))
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        tokens = got[-1].tolist()  # reads them (a host sync), as the worker does before the verify
        current = [DraftRequest(r.rid, r.prompt, [*r.output, d[0]]) for r, d in zip(current, tokens)]
    result = [g.tolist() for g in got]
    if result != want:
        raise AssertionError("drafts alternating between two streams differ from a single-stream run")
    return f"6 calls alternating between 2 threads/streams ({mode}) equal to one stream"


def check_stream_priority(device: torch.device, shape: gc.Shape, calls: int = 12) -> str:
    """A draft call's time while another thread keeps the same GPU busy with
    large matmuls (the target's verify, standing in), with the drafter's
    stream at the default priority and at the highest (what the drafter's
    thread gets: ``psd_loop._init_drafter_thread``). A measurement, not a
    bound: it passes unless something fails."""
    if device.type != "cuda":
        raise Skip("needs a GPU (stream priorities)")
    gen = torch.Generator().manual_seed(4)
    reqs = _requests(shape.vocab, gen)
    drafter = _drafter(device, "graph", shape)
    stop = threading.Event()

    def target():
        torch.cuda.set_device(device)
        with torch.cuda.stream(torch.cuda.Stream(device)):
            w = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            x = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            while not stop.is_set():
                for _ in range(4):
                    x = (w @ x).clamp_(-1, 1)
                torch.cuda.current_stream().synchronize()

    def median_ms(priority: int) -> float:
        times = []
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device, priority=priority)):
            for _ in range(calls):
                t0 = time.perf_counter()
                drafter.draft(reqs, K).tokens.tolist()  # reads them: the call's whole time
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    alone = median_ms(0)
    load = threading.Thread(target=target)
    load.start()
    try:
        _, highest = torch.cuda.Stream.priority_range()
        default, high = median_ms(0), median_ms(highest)
    finally:
        stop.set()
        load.join()
    return (
        f"draft of {len(reqs)} requests, k={K}, median of {calls}: alone {alone:.2f} ms; beside matmuls "
        f"at priority 0 {default:.2f} ms, at {highest} {high:.2f} ms ({default / high:.2f}x)"
    )


# ---------------------------------------------------------------- FlashInfer with SGLang's chain mask


def sglang_chain_mask(kv_lens: list[int], q_len: int) -> torch.Tensor:
    """SGLang's FULL_MASK tree mask for chains (``build_tree_kernel_efficient``
    with topk 1): per request, q_len rows of (prefix + q_len) columns, each row
    all True over the prefix, then the chain's lower triangle; flattened and
    concatenated over requests, FlashInfer's ``custom_mask`` layout."""
    rows = []
    for n in kv_lens:
        prefix = n - q_len
        block = torch.ones(q_len, n, dtype=torch.bool)
        block[:, prefix:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        rows.append(block.flatten())
    return torch.cat(rows)


def check_flashinfer_chain_mask(device: torch.device, width: int, dtype=torch.bfloat16) -> str:
    if device.type != "cuda":
        raise Skip("needs a GPU (FlashInfer)")
    import flashinfer

    heads, kv_heads, head_dim, page = 32, 8, 128, gc.PAGE_SIZE
    gen = torch.Generator().manual_seed(width)
    prefixes = [1, 17, 64, 130, 300, 5, 40, 222]
    kv_lens = [p + width for p in prefixes]
    pages = [-(-n // page) for n in kv_lens]
    perm = torch.randperm(sum(pages) + 8, generator=gen)  # pages scattered over a pool
    page_ids, start = [], 0
    for c in pages:
        page_ids.append(perm[start : start + c])
        start += c
    pool = len(perm)
    k_pool = torch.randn(pool, page, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_pool = torch.randn(pool, page, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(len(kv_lens), width, heads, head_dim, generator=gen).to(device, dtype)
    indptr, indices, last = gc.flashinfer_pages(kv_lens, page_ids, page)
    qo_indptr = torch.arange(len(kv_lens) + 1, dtype=torch.int32) * width
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(128 * 2**20, dtype=torch.uint8, device=device), "NHD"
    )
    wrapper.plan(
        qo_indptr,
        indptr,
        indices,
        last,
        heads,
        kv_heads,
        head_dim,
        page,
        custom_mask=sglang_chain_mask(kv_lens, width).to(device),
        q_data_type=dtype,
    )
    out = wrapper.run(q.reshape(-1, heads, head_dim), (k_pool, v_pool)).view_as(q)
    k = gc.gather_pages(k_pool, page_ids)
    v = gc.gather_pages(v_pool, page_ids)
    ref = gc.reference_attention(q, k, v, torch.tensor(kv_lens, device=device))
    err = (out.float() - ref.float()).abs().max().item()
    tol = 3e-2
    if not err <= tol:
        raise AssertionError(f"max abs error {err:.3g} > {tol}")
    return f"{len(kv_lens)} requests, width {width}, max abs error {err:.2g} <= {tol}"


# ---------------------------------------------------------------- gpu_check's unit checks


def gpu_check_units(device: torch.device) -> list[tuple[str, Callable[[], str]]]:
    def wrap(check):
        def run():
            err, tol, detail = check()
            if not err <= tol:
                raise AssertionError(f"error {err:.3g} > {tol}: {detail}")
            return f"error {err:.3g} <= {tol}: {detail}"

        return run

    gen = torch.Generator().manual_seed(0)
    small = gc.SHAPES["tiny"] if device.type == "cpu" else gc.SHAPES["small"]
    checks = [
        ("gpu-check-drafter-greedy", wrap(lambda: gc.check_drafter(device, K))),
        ("gpu-check-greedy-accept", wrap(lambda: gc.check_greedy_accept(device, gen))),
        ("gpu-check-rejection-sample", wrap(lambda: gc.check_rejection_sample(device, gen))),
    ]
    if device.type == "cuda":
        dtype = torch.bfloat16
        checks += [
            ("gpu-check-attention-flashinfer", wrap(lambda: gc.check_attention("flashinfer", dtype, device, K, gen))),
            (
                "gpu-check-llama-verify-flashinfer",
                wrap(lambda: gc.check_model_verify("flashinfer", small, dtype, device, K)),
            ),
        ]
    return checks


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minedraft_sglang.lab.gpu_smoke", description=__doc__.split("\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run the checks that need no GPU, on the CPU")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("FAIL cuda (0.0s): no CUDA device visible; pass --cpu-smoke to run the CPU part", flush=True)
        return 2
    if args.cpu_smoke:
        device = torch.device("cpu")
        shape = gc.SHAPES["tiny"]
    else:
        device = torch.device("cuda", torch.cuda.device_count() - 1)  # the drafter's GPU: the last
        shape = gc.SHAPES["small"]
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"INFO devices: {names}; torch {torch.__version__}; flashinfer {gc.flashinfer_version()}", flush=True)
    checks: list[tuple[str, Callable[[], str]]] = [
        (f"drafter-graphs-on-{device}", lambda: check_drafter_graphs(device, shape)),
        ("drafter-memory-qwen2.5-0.5b", lambda: check_drafter_memory(device)),
        ("drafter-cache-preallocated", lambda: check_cache_preallocated(device, shape)),
        ("drafter-handoff-two-streams", lambda: check_handoff(device, shape)),
        ("drafter-stream-priority", lambda: check_stream_priority(device, shape)),
        *[(f"flashinfer-chain-mask-w{w}", lambda w=w: check_flashinfer_chain_mask(device, w)) for w in range(1, K + 2)],
        *gpu_check_units(device),
    ]
    t0 = time.perf_counter()
    statuses = [run_check(name, check)[0] for name, check in checks]
    counts = {s: statuses.count(s) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"{'FAIL' if counts['FAIL'] else 'PASS'} total ({time.perf_counter() - t0:.1f}s): "
        f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped",
        flush=True,
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
