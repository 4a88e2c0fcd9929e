"""Test fixtures for model paths as users give them (issue 21): a local folder
published into a Hugging Face cache under a hub id, and a copy of a model with
its vocabulary padded, as Qwen2.5-7B/14B/32B pad theirs (152064 rows for a
151665-token tokenizer; 0.5B has 151936).

No hub is reachable here; ``huggingface_hub`` resolves a hub id from a cache
laid out as the hub writes it (``HF_HUB_CACHE``, with ``HF_HUB_OFFLINE=1``):

    models--ORG--NAME/refs/main          the commit hash
    models--ORG--NAME/snapshots/HASH/F   a relative symlink to ../../blobs/SHA256
    models--ORG--NAME/blobs/SHA256       the file's bytes
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def publish(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> Path:
    """Lay ``folder``'s files out in the Hugging Face cache ``cache`` as hub
    model ``repo_id`` at ``revision``; returns the snapshot folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    commit = hashlib.sha1(repo_id.encode() + b"".join(p.name.encode() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snapshot / f.name
        if not link.is_symlink():
            link.symlink_to(os.path.join("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def padded_vocab(src: Path, dst: Path, vocab_size: int) -> Path:
    """A copy of the model in ``src`` whose embedding and LM head have
    ``vocab_size`` rows, the new rows the mean of the old: a padding row's
    logit is the mean logit, never the largest, so greedy output is the
    original model's. The tokenizer is copied unchanged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    old = model.config.vocab_size
    if vocab_size <= old:
        raise ValueError(f"padding to {vocab_size} rows: {src} already has {old}")
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = weight[:old].mean(dim=0)
    model.config.vocab_size = vocab_size
    dst = Path(dst)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst
