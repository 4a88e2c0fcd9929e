"""A standalone drafter's int8 weights (``drafters/int8.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from minedraft_sglang.drafters import int8
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.lab import tiny_models

K = 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_linear_computes_its_rounded_weights_product(dtype):
    """Below WIDE_ROWS rows of input, each weight rounds to a multiple of its
    row's largest / 127 and the product is the rounded weights' (bias
    included); the first ``rows`` outputs are the full product's first rows.
    Wider inputs (a prefill) get the loaded weights' product."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(dtype)
    q = int8.Int8Linear(linear)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().amax(dim=1).eq(127).all()
    w = linear.weight.float()
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.qweight.float() * step - w).abs() <= 0.5001 * step).all()
    x = torch.randn(3, 5, 96).to(dtype)
    want = nn.functional.linear(x.float(), q.qweight.float() * q.scales.float()[:, None], linear.bias.float())
    got = q(x)
    assert got.shape == (3, 5, 40) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(q(x, rows=7), got[..., :7])
    wide = torch.randn(2, int8.WIDE_ROWS // 2, 96).to(dtype)
    assert torch.equal(q(wide), linear(wide))
    torch.testing.assert_close(q(wide, rows=7), linear(wide)[..., :7])


def test_quantize_replaces_every_linear_and_keeps_a_tied_embedding():
    """Qwen2.5 0.5B ties its LM head to its embedding: the head gets an int8
    copy and stays tied."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "lm_head" in linears and len(linears) == 2 * 7 + 1
    int8.quantize(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert all(isinstance(model.get_submodule(name), int8.Int8Linear) for name in linears)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.qweight.shape == embedding.shape


def _dequantized(hf):
    """A copy of ``hf`` with each linear weight replaced by its int8 rounding,
    in float (a tied embedding keeps its weights, as in the drafter)."""
    hf = copy.deepcopy(hf)
    for module in list(hf.modules()):
        if isinstance(module, nn.Linear):
            q = int8.Int8Linear(module)
            module.weight = nn.Parameter(q.qweight.float() * q.scales.float()[:, None])
    return hf


@torch.no_grad()
def test_an_int8_drafter_drafts_the_greedy_tokens_of_its_rounded_weights(monkeypatch):
    """The drafter with int8 weights in every forward (WIDE_ROWS out of
    reach) proposes what transformers' greedy decoding of the same rounded
    weights gives, through a partial acceptance (cache rows kept and
    recomputed as with the checkpoint's weights)."""
    monkeypatch.setattr(int8, "WIDE_ROWS", 10**9)
    path = str(tiny_models.model_path("target"))
    hf = _dequantized(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    drafter = StandaloneDrafter(path, "cpu", torch.float32, int8_weights=True)
    assert drafter.weights == "int8"
    drafter.allocate(max_requests=4, max_len=128)
    g = torch.Generator().manual_seed(2)
    seqs = {f"r{i}": torch.randint(3, 1000, (n,), generator=g).tolist() for i, n in enumerate((4, 11, 25))}

    def greedy(tokens, n):
        tokens = list(tokens)
        for _ in range(n):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
        return tokens[-n:]

    for _ in range(2):
        out = drafter.draft([DraftRequest(rid, s, []) for rid, s in seqs.items()], K)
        assert out.tokens.tolist() == [greedy(s, K) for s in seqs.values()]
        # Accept the first two drafts, then a token of the "target's" own.
        seqs = {rid: [*s, *d[:2], 5] for (rid, s), d in zip(seqs.items(), out.tokens.tolist())}
