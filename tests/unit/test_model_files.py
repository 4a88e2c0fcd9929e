"""Draft and target paths as SGLang takes them (issue 21, item 1): hub ids
resolved from the local Hugging Face cache, and padded target vocabularies.
The servers that serve them: tests/server/test_model_paths.py; the refusals
as users see them: tests/server/test_startup_errors.py."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch

from minedraft_sglang import model_files
from minedraft_sglang.config import MineDraftConfigError
from minedraft_sglang.drafters import create_drafter, eagle
from minedraft_sglang.lab import hub_cache, tiny_eagle, tiny_models

DRAFT = "--speculative-draft-model-path"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, read offline (as the servers here run)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_folder_is_taken_as_it_is(offline_cache):
    draft = str(tiny_models.model_path("draft"))
    assert model_files.local_dir(draft, DRAFT) == draft


def test_a_hub_id_resolves_to_its_snapshot_in_the_cache(offline_cache):
    snapshot = hub_cache.publish(offline_cache, "tiny-org/tiny-draft", tiny_models.model_path("draft"))
    for weights in (False, True):
        folder = model_files.local_dir("tiny-org/tiny-draft", DRAFT, weights=weights)
        assert folder == str(snapshot)
    config = model_files.read_config(folder, "tiny-org/tiny-draft", DRAFT)
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_a_revision_resolves_to_its_own_snapshot(offline_cache, tmp_path):
    src = tmp_path / "v2"
    shutil.copytree(tiny_models.model_path("draft"), src)
    (src / "extra.txt").write_text("v2")
    main = hub_cache.publish(offline_cache, "tiny-org/tiny-draft", tiny_models.model_path("draft"))
    v2 = hub_cache.publish(offline_cache, "tiny-org/tiny-draft", src, revision="v2")
    assert main != v2
    assert model_files.local_dir("tiny-org/tiny-draft", DRAFT, revision="v2") == str(v2)
    assert model_files.local_dir("tiny-org/tiny-draft", DRAFT) == str(main)


@pytest.mark.parametrize("path", ["tiny-org/not-cached", "/nonexistent/draft"])
def test_a_path_that_is_neither_is_one_line_naming_the_flag(offline_cache, path):
    with pytest.raises(MineDraftConfigError) as e:
        model_files.local_dir(path, DRAFT)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{DRAFT} {path!r}: no such directory, and not a model in the Hugging Face cache")


def _check(draft, target):
    model_files.check_vocabularies(
        str(draft),
        str(draft),
        str(target),
        str(target),
        draft_config=model_files.read_config(str(draft), str(draft), DRAFT),
        target_config=model_files.read_config(str(target), str(target), "--model-path"),
    )


def test_a_padded_target_vocabulary_is_accepted(tmp_path):
    # The Qwen2.5 0.5B -> 7B case: same tokenizer, the target's embedding padded.
    target = hub_cache.padded_vocab(tiny_models.model_path("target"), tmp_path / "padded", 1152)
    assert json.loads((target / "config.json").read_text())["vocab_size"] == 1152
    _check(tiny_models.model_path("draft"), target)


def test_a_draft_with_more_rows_than_the_target_is_refused():
    with pytest.raises(MineDraftConfigError, match="has vocabulary size 1088, the target .* has 1024: the draft could"):
        _check(tiny_models.model_path("mismatch-vocab"), tiny_models.model_path("target"))


def test_a_draft_with_another_tokenizer_is_refused(tmp_path):
    draft = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_models.model_path("draft"), draft)
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MineDraftConfigError, match="its tokenizer differs from the target's .2 tokens differ"):
        _check(draft, tiny_models.model_path("target"))


def test_a_draft_without_a_tokenizer_is_served_with_the_targets(tmp_path):
    # EAGLE heads ship none; SGLang serves with the target's tokenizer.
    draft = tmp_path / "no-tokenizer"
    draft.mkdir()
    for f in tiny_models.model_path("draft").iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (draft / f.name).symlink_to(f)
    assert not model_files.has_tokenizer(str(draft))
    _check(draft, tiny_models.model_path("target"))


@pytest.mark.parametrize(
    "listing, fetched",
    [
        (["config.json", "model.safetensors", "pytorch_model.bin"], ["*.safetensors"]),
        (["config.json", "pytorch_model.bin", "training_args.bin"], ["*.bin"]),
        (["config.json", "consolidated.pt"], ["*.pt"]),
        (None, list(model_files.WEIGHT_FORMATS)),
    ],
    ids=["both", "bin", "pt", "listing-failed"],
)
def test_a_hub_download_fetches_the_first_weight_format_the_repo_holds(monkeypatch, tmp_path, listing, fetched):
    """SGLang's order (safetensors, bin, pt), one format: both would double the download. When the listing
    fails, every format (the cache, or snapshot_download's own error, decides)."""
    asked = []

    def list_repo_files(repo_id, revision=None):
        if listing is None:
            raise OSError("hub unreachable")
        return listing

    def snapshot_download(repo_id, **kwargs):
        asked.append(kwargs["allow_patterns"])
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert model_files.local_dir("tiny-org/head", DRAFT, weights=True) == str(tmp_path)
    model_files.local_dir("tiny-org/head", DRAFT)
    assert asked == [[*model_files.CONFIG_PATTERNS, *fetched], model_files.CONFIG_PATTERNS]


def test_a_hub_eagle_head_shipped_as_pytorch_model_bin_loads_from_the_cache(offline_cache, tmp_path):
    """The drafter reads the weights SGLang's loader would: ``pytorch_model.bin`` where no safetensors are,
    trainer state beside it left out (it is no tensor file: reading it would fail)."""
    folder = tiny_eagle.variant(tiny_eagle.model_path("eagle3"), tmp_path / "eagle3-bin", pytorch_bin=True)
    (folder / "training_args.bin").write_bytes(b"a pickled TrainingArguments")
    hub_cache.publish(offline_cache, "tiny-org/eagle3-bin", folder)
    drafter = create_drafter(
        device="cpu",
        model_path="tiny-org/eagle3-bin",
        target_path=str(tiny_models.model_path("target")),
        target_dtype=torch.float32,
        draft_compile="off",
    )
    reference = eagle.load_eagle_head(str(tiny_eagle.model_path("eagle3")), str(tiny_models.model_path("target")))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(drafter.head.state_dict()[name], tensor), name
