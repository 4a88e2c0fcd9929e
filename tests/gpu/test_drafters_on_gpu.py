"""The drafters on a CUDA GPU: per-call time eager vs CUDA graphs, graph capture
on the drafter's own thread and stream while another thread works, and
features read across streams. Skipped without a GPU. Imports torch,
transformers and our drafters only, so they run where SGLang is not installed:

    pytest --noconftest -m gpu tests/gpu tests/unit/test_drafter.py tests/unit/test_eagle.py

(``--noconftest``: tests/conftest.py starts SGLang servers and needs the lab
extra.) The drafters' exactness on the GPU, eager and under graphs, is in
tests/unit/test_drafter.py and test_eagle.py (their ``cuda-*`` cases)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from minedraft_sglang.drafters import eagle
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.lab import draft_speed, tiny_eagle, tiny_models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
K = 4


def test_per_call_time_eager_vs_graph_on_a_qwen_0_5b_shaped_model(capsys):
    """Printed, not asserted: the figures depend on the GPU."""
    draft_speed.main(
        [
            "--shape",
            "qwen2.5-0.5b",
            "--device",
            "cuda",
            "--modes",
            "eager,graph",
            "--dtypes",
            "bfloat16",
            "--batches",
            "1,8,32",
            "--calls",
            "10",
        ]
    )
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{torch.cuda.get_device_name()}\n{out}")
    report = json.loads(out[out.index("{") :])
    assert set(report["median_ms"]) == {f"{m} bfloat16 b={b}" for m in ("eager", "graph") for b in (1, 8, 32)}
    assert all(ms > 0 for ms in report["median_ms"].values())


@torch.no_grad()
def _greedy(model, tokens: list[int], n: int) -> list[int]:
    tokens = list(tokens)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens], device=model.device)).logits[0, -1].argmax()))
    return tokens[-n:]


def test_graphs_captured_on_the_drafter_thread_while_another_thread_works():
    """The drafter's thread, on its own stream and with grad mode on (a new
    thread's default, as SGLang's scheduler's), captures every step graph
    (``allocate``) and drafts while another thread keeps launching,
    allocating and synchronising (which a process-wide capture would forbid
    it); drafting captures nothing more, and nothing records autograd
    (issue 34)."""
    path = str(tiny_models.model_path("target"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    drafter = StandaloneDrafter(path, "cuda", torch.float32, step_mode="graph")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (3, 17, 40, 60, 5)]
    results, done = {}, threading.Event()

    def drafter_thread():
        try:
            torch.cuda.set_stream(torch.cuda.Stream())
            drafter.allocate(max_requests=8, max_len=128, max_drafts=K)
            results["captured"] = set(drafter.steps.graphs)
            for bs in (1, 2, 5):
                reqs = [DraftRequest(f"{bs}-{i}", p, []) for i, p in enumerate(prompts[:bs])]
                results[bs] = drafter.draft(reqs, K).tokens.tolist()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            results["error"] = e
        finally:
            done.set()

    thread = threading.Thread(target=drafter_thread)
    thread.start()
    x = torch.randn(512, 512, device="cuda")
    while not done.is_set():
        x = torch.randn(512, 512, device="cuda") @ x  # a fresh allocation each time
        torch.cuda.synchronize()
    thread.join()
    assert "error" not in results, results.get("error")
    assert drafter.steps.mode == "graph" and set(drafter.steps.graphs) == results["captured"]
    assert not any(p.requires_grad for p in drafter.model.parameters())
    outputs = [o for _, _, out in drafter.steps.graphs.values() for o in out]
    assert all(t.grad_fn is None and not t.requires_grad for t in (drafter.cache.k, drafter.cache.v, *outputs))
    for bs in (1, 2, 5):
        for p, drafted in zip(prompts, results[bs]):
            assert drafted == _greedy(hf, p, K), (bs, p)


def test_the_drafter_thread_drafts_on_a_stream_of_the_highest_priority():
    """On a GPU shared with the target, the drafter's kernels go first."""
    from minedraft_sglang.psd_loop import _init_drafter_thread

    seen = {}

    def drafter_thread():
        _init_drafter_thread("cuda:0")
        seen["stream"] = torch.cuda.current_stream()

    thread = threading.Thread(target=drafter_thread)
    thread.start()
    thread.join()
    _, highest = torch.cuda.Stream.priority_range()
    assert seen["stream"] != torch.cuda.default_stream(0)
    assert seen["stream"].priority == highest < torch.cuda.default_stream(0).priority


def test_features_observed_on_one_stream_are_recorded_on_the_stream_that_reads_them(monkeypatch):
    """``observe`` copies features on the scheduler's stream; the drafter reads
    and frees them on its own, so the caching allocator must know that stream
    used them, or it could reuse their memory while the drafter still reads."""
    recorded = []
    record = torch.Tensor.record_stream

    def spy(tensor, stream):
        recorded.append((tensor.data_ptr(), stream.cuda_stream))
        return record(tensor, stream)

    monkeypatch.setattr(torch.Tensor, "record_stream", spy)
    target = AutoModelForCausalLM.from_pretrained(tiny_models.model_path("target"), dtype=torch.float32).eval()
    drafter = eagle.EagleDrafter(
        str(tiny_eagle.model_path("eagle")), str(tiny_models.model_path("target")), "cuda", torch.float32
    )
    drafter.allocate(max_requests=2, max_len=128)
    seqs, features = tiny_eagle.target_text_and_features(target, 1, seed=5, num_seqs=1, length=24)
    toks, feats = seqs[0].tolist(), features[0].cuda()
    drafter.observe("a", 0, feats[:6])
    drafter.observe("a", 6, feats[6:11])
    observed = [t.data_ptr() for t in drafter.cache.slot("a").features]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        drafter.draft([DraftRequest("a", toks[:1], toks[1:12])], K)
    torch.cuda.synchronize()
    assert {(p, side.cuda_stream) for p in observed} <= set(recorded)
