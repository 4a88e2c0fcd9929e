import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minedraft_sglang.lab import tiny_models
from minedraft_sglang.lab.tiny_models import MODELS, cycle_stats, greedy_successors

PROMPTS = ["The cat sat on the", "Alice wrote 42 letters.\nThen", "  spaces  and, commas?", "x"]


@pytest.fixture(scope="module")
def paths():
    return tiny_models.build_all()


@pytest.fixture(scope="module")
def tokenizer(paths):
    return AutoTokenizer.from_pretrained(paths["target"])


@pytest.fixture(scope="module")
def models(paths):
    return {name: AutoModelForCausalLM.from_pretrained(paths[name]).eval() for name in MODELS}


def test_folders_are_complete_and_consistent(paths, tokenizer):
    fp = tiny_models.fingerprint()
    for name, path in paths.items():
        assert path == tiny_models.cache_dir() / f"{name}-{fp}"
        files = {p.name for p in path.iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        } <= files, name
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert config["dtype"] == "float32"
        assert config["bos_token_id"] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<s>")
        assert config["eos_token_id"] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("</s>")
        assert config["max_position_embeddings"] == 2048
        generation = json.loads((path / "generation_config.json").read_text())
        assert generation["eos_token_id"] == config["eos_token_id"]


def test_models_load_with_transformers(models, tokenizer):
    target, draft = models["target"].config, models["draft"].config
    assert (target.num_hidden_layers, target.hidden_size) == (4, 256)
    assert target.num_key_value_heads < target.num_attention_heads  # GQA
    assert draft.num_hidden_layers < target.num_hidden_layers and draft.hidden_size < target.hidden_size
    assert models["bigram-draft"].config.num_hidden_layers < models["bigram"].config.num_hidden_layers
    for name, model in models.items():
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters()), name
        if name != "mismatch-vocab":
            assert model.config.vocab_size == len(tokenizer) == tiny_models.VOCAB_SIZE, name


def test_tokenizer_round_trips_text(tokenizer):
    for text in [
        "Hello world!",
        "  two  spaces, tabs\tand\nnew lines\n",
        "The 1999 queen sang.",
        "unicode: é ü 漢字 🙂",
        " leading space",
    ]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not set(ids) & set(tokenizer.all_special_ids)
    # Trained merges: common words are single tokens, not bytes.
    assert len(tokenizer.encode(" the teacher")) == 2


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|assistant|>")) == 1
    assert tokenizer.decode(ids) == text


def test_bigram_draft_matches_bigram_on_every_token(models):
    tokens = torch.arange(tiny_models.VOCAB_SIZE)[:, None]
    with torch.no_grad():
        logits = models["bigram"](tokens).logits[:, 0]
        draft_logits = models["bigram-draft"](tokens).logits[:, 0]
    # The extra target layers are exact identities, so not even rounding differs.
    assert torch.equal(logits, draft_logits)
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 4.0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bigram_generate_is_context_free_and_matches_draft(models, tokenizer, prompt):
    x = tokenizer(prompt, return_tensors="pt").input_ids
    outs = [
        models[name]
        .generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False)[0, x.shape[1] :]
        .tolist()
        for name in ("bigram", "bigram-draft")
    ]
    assert outs[0] == outs[1]
    # Over a real context the model still follows the one-token map.
    succ = greedy_successors(models["bigram"]).tolist()
    expected, t = [], x[0, -1].item()
    for _ in range(20):
        t = succ[t]
        expected.append(t)
    assert outs[0] == expected
    assert len(set(outs[0])) == 20


def test_bigram_map_is_one_long_cycle(models, tokenizer):
    succ = greedy_successors(models["bigram"])
    stats = cycle_stats(succ)
    assert len(stats["cycle_lengths"]) == 1
    assert stats["cycle_lengths"][0] == stats["tokens_on_cycles"] == stats["distinct_successors"]
    assert stats["tokens_on_cycles"] > 0.8 * tiny_models.VOCAB_SIZE
    assert stats["max_tail"] <= 1
    assert stats["min_run"] >= stats["tokens_on_cycles"]
    # Greedy decoding never stops early or emits unprintable pieces.
    assert not set(succ.tolist()) & set(tokenizer.all_special_ids)
    assert "\ufffd" not in tokenizer.decode(succ.unique())


def test_cycle_stats_on_a_known_map():
    # 0->1->2->0 cycle, 3->4->4 self-loop, 5->3 tail of two.
    stats = cycle_stats(torch.tensor([1, 2, 0, 4, 4, 3]))
    assert stats["cycle_lengths"] == [3, 1]
    assert stats["tokens_on_cycles"] == 4
    assert stats["max_tail"] == 2
    assert stats["min_run"] == 1  # token 4 repeats at once
    assert stats["distinct_successors"] == 5


def test_target_and_draft_disagree(models, tokenizer):
    x = tokenizer(" ".join(PROMPTS) * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        target = models["target"](x).logits.argmax(-1)
        draft = models["draft"](x).logits.argmax(-1)
    assert (target == draft).float().mean() < 0.2


def test_mismatch_vocab_differs(models):
    assert models["mismatch-vocab"].config.vocab_size != models["target"].config.vocab_size
    assert models["mismatch-vocab"].lm_head.weight.shape[0] == tiny_models.MISMATCH_VOCAB_SIZE


def test_second_call_reuses_cache(paths):
    before = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()}
    assert tiny_models.build_all() == paths
    assert all(tiny_models.model_path(name) == paths[name] for name in MODELS)
    after = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()}
    assert after == before


def test_unknown_model_name():
    with pytest.raises(KeyError):
        tiny_models.model_path("no-such-model")


def test_fresh_build_is_deterministic(tmp_path, monkeypatch, paths):
    monkeypatch.setenv("MINEDRAFT_CACHE_DIR", str(tmp_path))
    fresh = tiny_models.build_all()
    # Complete folders only: no temp dirs left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in fresh.values())
    for name, path in paths.items():
        for f in path.iterdir():
            assert (fresh[name] / f.name).read_bytes() == f.read_bytes(), f


def test_losing_a_build_race_keeps_the_winner(tmp_path, models, tokenizer):
    winner = tmp_path / "bigram-x"
    winner.mkdir()
    (winner / "marker").touch()
    tiny_models.save_atomically(models["bigram"].save_pretrained, winner)
    assert [p.name for p in tmp_path.iterdir()] == ["bigram-x"]
    assert [p.name for p in winner.iterdir()] == ["marker"]


def test_interrupted_build_leaves_nothing(tmp_path):
    def interrupted(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_models.save_atomically(interrupted, tmp_path / "target-x")
    assert list(tmp_path.iterdir()) == []


def test_command_line_prints_paths(paths, capsys):
    tiny_models.main(["bigram", "target"])
    assert capsys.readouterr().out.split() == [str(paths["bigram"]), str(paths["target"])]
