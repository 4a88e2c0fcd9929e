"""The GPU check script: its references and tiny Llama on CPU, its --cpu-smoke
run, its import promise; the real checks on a GPU (marked ``gpu``)."""

import argparse
import ast
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minedraft_sglang.drafters import kv_cache
from minedraft_sglang.lab import gpu_check as gc

PACKAGE = Path(gc.__file__).parents[1]  # minedraft_sglang/
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(bs, q_len, heads, kv_heads, seed=0, max_prefix=40):
    gen = torch.Generator().manual_seed(seed)
    q, k_pool, v_pool, page_ids, kv_lens = gc.verify_case(
        bs, q_len, heads, kv_heads, 16, max_prefix, torch.float32, torch.device("cpu"), gen
    )
    return q, gc.gather_pages(k_pool, page_ids), gc.gather_pages(v_pool, page_ids), torch.tensor(kv_lens)


def _sdpa_explicit(q, k, v, kv_lens):
    """One request at a time through torch SDPA with an explicit boolean mask:
    the q_len queries are the last q_len of the request's n positions."""
    group = q.shape[2] // k.shape[2]
    out = []
    for i, n in enumerate(kv_lens.tolist()):
        q_len = q.shape[1]
        mask = torch.ones(q_len, n, dtype=torch.bool).tril(diagonal=n - q_len)
        ki = k[i, :n].repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[i, :n].repeat_interleave(group, dim=1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[i].transpose(0, 1), ki, vi, attn_mask=mask).transpose(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("bs,q_len,heads,kv_heads", [(5, 5, 8, 2), (3, 1, 4, 4), (4, 7, 6, 1)])
def test_reference_attention_matches_sdpa_with_explicit_masks(bs, q_len, heads, kv_heads):
    q, k, v, kv_lens = _case(bs, q_len, heads, kv_heads)
    assert len(set(kv_lens.tolist())) > 1  # ragged prefixes
    ref = gc.reference_attention(q, k, v, kv_lens)
    torch.testing.assert_close(ref, _sdpa_explicit(q, k, v, kv_lens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gc.sdpa_attention(q, k, v, kv_lens), ref, atol=1e-5, rtol=1e-5)


def test_attention_ignores_keys_past_each_request():
    q, k, v, kv_lens = _case(4, 3, 4, 2, seed=1)
    past = torch.arange(k.shape[1])[None, :] >= kv_lens[:, None]
    k2, v2 = k.clone(), v.clone()
    k2[past], v2[past] = 1e3, -1e3
    for attn in (gc.reference_attention, gc.sdpa_attention):
        torch.testing.assert_close(attn(q, k2, v2, kv_lens), attn(q, k, v, kv_lens))


def test_chain_is_causal():
    # Changing the last chain token's key/value changes only the last query's output.
    q, k, v, kv_lens = _case(3, 4, 4, 2, seed=2)
    k2 = k.clone()
    k2[torch.arange(3), kv_lens - 1] += 5
    for attn in (gc.reference_attention, gc.sdpa_attention):
        a, b = attn(q, k, v, kv_lens), attn(q, k2, v, kv_lens)
        torch.testing.assert_close(a[:, :-1], b[:, :-1])
        assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3


def _walk_flashinfer_pages(pool, indptr, indices, last, page_size, i):
    """Request i's token rows as FlashInfer reads its CSR page table: every
    page full except the last, which holds last[i] tokens."""
    pages = indices[indptr[i] : indptr[i + 1]].tolist()
    rows = [pool[p, : (last[i] if j == len(pages) - 1 else page_size)] for j, p in enumerate(pages)]
    return torch.cat(rows)


def test_flashinfer_page_table_matches_gathered_pages():
    gen = torch.Generator().manual_seed(3)
    q, k_pool, _, page_ids, kv_lens = gc.verify_case(6, 5, 4, 2, 8, 70, torch.float32, torch.device("cpu"), gen)
    indptr, indices, last = gc.flashinfer_pages(kv_lens, page_ids, gc.PAGE_SIZE)
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    assert ((last >= 1) & (last <= gc.PAGE_SIZE)).all()
    dense = gc.gather_pages(k_pool, page_ids)
    for i, n in enumerate(kv_lens):
        torch.testing.assert_close(_walk_flashinfer_pages(k_pool, indptr, indices, last, gc.PAGE_SIZE, i), dense[i, :n])


def test_contiguous_pages_view_a_cache_row():
    max_len, kv_lens = 64, [1, 16, 17, 64]
    cache = torch.randn(len(kv_lens), max_len, 2, 8)
    pool = cache.view(-1, gc.PAGE_SIZE, 2, 8)
    indptr, indices, last = gc.flashinfer_pages(
        kv_lens, gc.contiguous_pages(kv_lens, max_len, gc.PAGE_SIZE), gc.PAGE_SIZE
    )
    for i, n in enumerate(kv_lens):
        torch.testing.assert_close(_walk_flashinfer_pages(pool, indptr, indices, last, gc.PAGE_SIZE, i), cache[i, :n])


TINY = gc.SHAPES["tiny"]


class _FlashInferOnCPU:
    """Stands in for FlashInfer's BatchPrefillWithPagedKVCacheWrapper on CPU:
    every call must bind to the real signature, and run() computes what the
    documented layout means (CSR pages, bottom-right causal) with the
    reference attention."""

    real = None

    def __init__(self, *args, **kwargs):
        inspect.signature(self.real.__init__).bind(self, *args, **kwargs)
        assert kwargs.get("kv_layout", args[1] if len(args) > 1 else "NHD") == "NHD"

    def plan(self, *args, **kwargs):
        bound = inspect.signature(self.real.plan).bind(self, *args, **kwargs).arguments
        assert bound["causal"] is True
        self.plan_args = bound

    def run(self, q, paged_kv_cache, *args, **kwargs):
        inspect.signature(self.real.run).bind(self, q, paged_kv_cache, *args, **kwargs)
        a, (k_pool, v_pool) = self.plan_args, paged_kv_cache
        qo = a["qo_indptr"].tolist()
        out = torch.empty_like(q)
        for i in range(len(qo) - 1):
            walk = lambda pool, i=i: _walk_flashinfer_pages(
                pool, a["paged_kv_indptr"], a["paged_kv_indices"], a["paged_kv_last_page_len"], a["page_size"], i
            )
            k, v = walk(k_pool), walk(v_pool)
            out[qo[i] : qo[i + 1]] = gc.reference_attention(
                q[None, qo[i] : qo[i + 1]], k[None], v[None], torch.tensor([len(k)])
            )[0]
        return out


def test_flashinfer_verify_calls_match_flashinfer_api(monkeypatch):
    """FlashInferVerify's plan/run arguments and its view of a model's cache
    rows as pages, checked on CPU against a stand-in for FlashInfer: a Llama
    verify forward with it equals one with SDPA."""
    flashinfer = pytest.importorskip("flashinfer")
    monkeypatch.setattr(_FlashInferOnCPU, "real", flashinfer.BatchPrefillWithPagedKVCacheWrapper)
    monkeypatch.setattr(flashinfer, "BatchPrefillWithPagedKVCacheWrapper", _FlashInferOnCPU)
    model = gc.Llama(TINY, torch.float32, torch.device("cpu"))
    bs, k, max_len = 3, 4, 64
    start = torch.tensor([3, 30, 59])
    tokens = torch.randint(0, TINY.vocab, (bs, k + 1), generator=torch.Generator().manual_seed(6))
    attn = gc.model_attention("flashinfer", model, (start + k + 1).tolist(), max_len, k + 1)
    assert isinstance(attn.wrapper, _FlashInferOnCPU)
    logits = []
    for a in (attn, gc.sdpa_attention):
        cache = model.new_cache(bs, max_len)
        fill = torch.Generator().manual_seed(7)
        for t in cache.k + cache.v:
            t.copy_(torch.randn(t.shape, generator=fill))
        logits.append(model.forward(tokens, start, cache, a))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn", [gc.sdpa_attention, gc.reference_attention], ids=["sdpa", "reference"])
def test_llama_incremental_matches_full_forward(attn):
    """Prefill, then a chain verify at ragged positions over a cache holding
    garbage past each prefix, then single-token decodes: every logit equals
    the full forward's at that position."""
    model = gc.Llama(TINY, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    bs, n, max_len, chain = 3, 24, 32, 4
    tokens = torch.randint(0, TINY.vocab, (bs, n), generator=gen)
    full = model.forward(tokens, torch.zeros(bs, dtype=torch.long), model.new_cache(bs, max_len), attn)

    cache = model.new_cache(bs, max_len)
    model.forward(tokens[:, :16], torch.zeros(bs, dtype=torch.long), cache, attn)
    start = torch.tensor([5, 11, 16])
    for t in cache.k + cache.v:
        for i, s in enumerate(start.tolist()):
            t[i, s:] = torch.randn(t[i, s:].shape, generator=gen) * 10
    rows = torch.arange(bs)[:, None]
    pos = start[:, None] + torch.arange(chain)
    out = model.forward(tokens[rows, pos], start, cache, attn)
    torch.testing.assert_close(out, full[rows, pos], atol=1e-4, rtol=1e-4)
    for step in range(3):
        p = start + chain + step
        out = model.forward(tokens[torch.arange(bs), p][:, None], p, cache, attn)
        torch.testing.assert_close(out[:, 0], full[torch.arange(bs), p], atol=1e-4, rtol=1e-4)


def test_self_drafts_are_fully_accepted():
    # The target drafting for itself proposes its own greedy tokens; its verify accepts all k.
    model = gc.Llama(TINY, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    bs, k, max_len = 3, 4, 48
    start = torch.tensor([7, 20, 33])
    last = torch.randint(0, TINY.vocab, (bs,), generator=gen)
    draft_cache, target_cache = model.new_cache(bs, max_len), model.new_cache(bs, max_len)
    for a, b in zip(draft_cache.k + draft_cache.v, target_cache.k + target_cache.v):
        b.copy_(a.copy_(torch.randn(a.shape, generator=gen)))
    tokens, drafts = last[:, None], []
    for j in range(k):
        tokens = model.forward(tokens, start + j, draft_cache, gc.sdpa_attention)[:, -1].argmax(-1, keepdim=True)
        drafts.append(tokens)
    drafts = torch.cat(drafts, dim=1)
    out, accept_lens = gc.verify(model, target_cache, gc.sdpa_attention, last, drafts, start)
    assert accept_lens.tolist() == [k + 1] * bs
    assert (out[:, :k] == drafts).all()
    # Another model's drafts are not (random models rarely agree on k tokens).
    other = gc.Llama(TINY, torch.float32, torch.device("cpu"), seed=9)
    _, accept_lens = gc.verify(other, target_cache, gc.sdpa_attention, last, drafts, start)
    assert accept_lens.float().mean() < k + 1


def test_checks_fail_on_broken_components(monkeypatch):
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)

    def no_causal(q, k, v, kv_lens):
        return gc.reference_attention(q, k, v, kv_lens + 1)  # one key too many: the next position's

    monkeypatch.setattr(gc, "sdpa_attention", no_causal)
    err, tol, _ = gc.check_attention("sdpa", torch.float32, cpu, 4, gen)
    assert err > tol

    def accept_all(drafts, p, num, generator=None):
        return gc.greedy_accept(drafts, torch.cat([drafts, drafts[:, :1]], 1), num)

    monkeypatch.setattr(gc, "rejection_sample", accept_all)
    err, tol, _ = gc.check_rejection_sample(cpu, gen)
    assert err > tol

    group = kv_cache.SlotKVCache._group

    def without_own_key(self, rows, slots, positions, start, kv_len):
        return group(self, rows, slots, positions - 1, start, kv_len)

    monkeypatch.setattr(kv_cache.SlotKVCache, "_group", without_own_key)
    err, tol, _ = gc.check_drafter(cpu, 4)
    assert err > tol


def test_guarded_check_reports_exceptions():
    def boom():
        raise RuntimeError("kernel missing")

    result = gc._guarded("x", boom)
    assert result["ok"] is False and result["detail"] == "RuntimeError: kernel missing"
    assert gc._guarded("y", lambda: (1.0, 0.5, ""))["ok"] is False
    assert gc._guarded("z", lambda: (0.5, 0.5, ""))["ok"] is True


def test_parse_shape():
    assert gc.parse_shape("8b") == gc.SHAPES["8b"]
    assert gc.parse_shape("1b:layers=2,ffn=64").layers == 2
    assert gc.parse_shape("1b:layers=2,ffn=64").ffn == 64
    for bad in ("70b", "8b:depth=3", "8b:layers=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            gc.parse_shape(bad)


ALLOWED = {"torch", "triton", "flashinfer", "transformers", "minedraft_sglang"} | set(sys.stdlib_module_names)


def _imports(path: Path, import_time_only: bool) -> set[str]:
    """Modules a file imports; with import_time_only, not those inside
    functions (they only load when called)."""
    found = set()
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if import_time_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_imports_only_torch_triton_flashinfer_transformers_and_stdlib():
    """gpu_check (every import, even inside functions) and the modules of ours
    it loads (what runs at import) name nothing outside the allowed set."""
    todo, seen = [("minedraft_sglang.lab.gpu_check", False)], set()
    while todo:
        module, import_time_only = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        todo.extend((".".join(parts[:i]), True) for i in range(1, len(parts)))
        path = PACKAGE.joinpath(*parts[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for name in _imports(path, import_time_only):
            assert name.split(".")[0] in ALLOWED, f"{path.name} imports {name}"
            if name.startswith("minedraft_sglang."):
                todo.append((name, True))
    assert {
        "minedraft_sglang",
        "minedraft_sglang.lab",
        "minedraft_sglang.sampling.acceptance",
        "minedraft_sglang.metrics",
        "minedraft_sglang.drafters.standalone",
    } <= seen


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {'sglang', 'sgl_kernel'}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from minedraft_sglang.lab import MODULE
sys.exit(MODULE.main(sys.argv[1:]))
"""


def run_without_sglang(module: str, args, env=None) -> subprocess.CompletedProcess:
    """``python -m minedraft_sglang.lab.<module> args`` in a process where importing sglang or sgl_kernel
    fails, as on the GPU machine (shared with test_gpu_smoke.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    script = BLOCKER.replace("MODULE", module)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)


def _run(args, env=None):
    return run_without_sglang("gpu_check", args, env)


def test_cpu_smoke_runs_without_sglang(tmp_path):
    out = tmp_path / "report.json"
    result = _run(["--cpu-smoke", "--out", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["environment"]["device"] == "cpu"
    names = {c["name"] for c in report["checks"]}
    assert names == {
        "attention-sdpa-float32",
        "llama-verify-sdpa-float32",
        "drafter-greedy",
        "greedy-accept",
        "rejection-sample",
    }
    assert all(c["ok"] and c["max_err"] <= c["tol"] for c in report["checks"])
    bench = report["benchmark"]
    assert bench["attention"] == "sdpa" and len(bench["variants"]) == 1
    v = bench["variants"][0]
    assert all(v[key] > 0 and math.isfinite(v[key]) for key in ("t_draft", "t_verify", "t_psd"))
    assert 0 <= v["overlap"] <= 1
    assert v["psd_over_sd"] == pytest.approx(bench["t_sd"] / v["t_psd"])


def test_without_gpu_exits_2():
    result = _run([], env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr and "--cpu-smoke" in result.stderr


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_gpu
def test_gpu_unit_checks_pass():
    checks = gc.unit_checks(torch.device("cuda"), 4, ["flashinfer", "sdpa"], [torch.bfloat16, torch.float16])
    failed = [c for c in checks if not c["ok"]]
    assert not failed, failed
    assert {c["name"] for c in checks} >= {
        "attention-flashinfer-bfloat16",
        "attention-flashinfer-float16",
        "llama-verify-flashinfer-bfloat16",
    }


@pytest.mark.gpu
@needs_gpu
def test_gpu_check_script_small_models(tmp_path):
    out = tmp_path / "report.json"
    result = _run(
        [
            "--target",
            "1b:layers=2",
            "--draft",
            "1b:layers=1",
            "--batch",
            "4",
            "--ctx",
            "256",
            "--iters",
            "3",
            "--out",
            str(out),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    bench = report["benchmark"]
    assert bench["attention"] == "flashinfer"
    assert len(bench["variants"]) == min(torch.cuda.device_count(), 2)
    for v in bench["variants"]:
        assert 0 <= v["overlap"] <= 1 and v["t_psd"] > 0
        # A PSD step does at least the verify's work and at most draft + verify plus slack.
        assert v["t_verify"] * 0.8 <= v["t_psd"] <= (v["t_draft"] + v["t_verify"]) * 1.5
