"""Model folders: a Hugging Face hub id resolved the way SGLang resolves it,
the rule for which draft vocabulary can serve which target, and weights
loaded from them held in memory of the process's own.

SGLang takes ``--model-path`` and ``--speculative-draft-model-path`` as a local
folder or a hub id; its loader turns a hub id into the snapshot folder of the
local Hugging Face cache with ``huggingface_hub.snapshot_download``
(``local_files_only`` when ``HF_HUB_OFFLINE=1``, else downloading what is
missing; ``model_loader/weight_utils.py``). MINEDRAFT's drafter reads the same
files (config, weights, for EAGLE the target's embedding), so it resolves the
same way: a folder is taken as it is, a hub id becomes its snapshot folder.

Vocabulary: a draft serves a target when its token ids mean what the target's
mean. SGLang 0.5.23's STANDALONE asks for equal vocabulary sizes and equal
tokenizer maps (``standalone_worker_v2._validate_vocab_compatibility``); that
refuses the canonical Qwen2.5 pairs, whose 7B/14B/32B targets pad the
embedding to 152064 rows while 0.5B has 151936 (both tokenizers: 151665
tokens). What cannot be right is narrower: a draft that can propose an id the
target has no row for (``draft_vocab > target_vocab``), or two tokenizers that
give one token different ids. Everything else is served; drafts are verified
by the target, so a draft can cost acceptance, never exactness.

No SGLang import here: the launcher's startup checks and the drafters both
use it.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os

from minedraft_sglang.config import MineDraftConfigError

# What the startup checks read of a hub model: config and tokenizer, never
# the weights (SGLang's loader downloads those, into the same cache).
CONFIG_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]
# What a drafter reads besides: the weights, in one format, the first of
# these a model has (SGLang's order, ``DefaultModelLoader._prepare_weights``;
# EAGLE heads ship ``pytorch_model.bin`` too). Fetching every format a hub
# repo holds would double the download (``_hub_weight_patterns``).
WEIGHT_FORMATS = ("*.safetensors", "*.bin", "*.pt")
# Trainer state saved beside weights (SGLang skips it too,
# ``weight_utils.filter_files_not_needed_for_inference``).
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
# Files that make a folder hold a tokenizer (transformers' names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def local_dir(path: str, flag: str, *, revision: str | None = None, weights: bool = False) -> str:
    """``path`` itself when it is a folder, else the snapshot folder of hub id
    ``path`` in the local Hugging Face cache (fetched first unless
    ``HF_HUB_OFFLINE=1``), as SGLang's loader resolves it. ``weights``: the
    snapshot must hold the weights too (the drafter loads them), not just
    config and tokenizer. Raises MineDraftConfigError, one line naming
    ``flag``."""
    if os.path.isdir(path):
        return path
    import huggingface_hub
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            path,
            revision=revision,
            allow_patterns=[*CONFIG_PATTERNS, *_hub_weight_patterns(path, revision)] if weights else CONFIG_PATTERNS,
            local_files_only=huggingface_hub.constants.HF_HUB_OFFLINE,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes the flag's one line
        offline = (
            " (HF_HUB_OFFLINE=1: only the local cache is read)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        )
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MineDraftConfigError(
            f"{flag} {path!r}: no such directory, and not a model in the Hugging Face cache{offline}: {reason}"
        ) from None


def _hub_weight_patterns(repo_id: str, revision: str | None) -> list[str]:
    """The weight format to fetch from hub repo ``repo_id``: the first of
    WEIGHT_FORMATS it holds, as SGLang's ``download_weights_from_hf`` picks
    it from the repo's listing. Offline, or when the listing fails, every
    format: the local cache has what it has (``snapshot_download`` reads it
    as it is, or reports what is wrong)."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return list(WEIGHT_FORMATS)
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - snapshot_download's own error (or cached copy) follows
        return list(WEIGHT_FORMATS)
    return next(([f] for f in WEIGHT_FORMATS if fnmatch.filter(files, f)), list(WEIGHT_FORMATS))


def weight_files(folder: str) -> list[str]:
    """The weight files a loader reads in ``folder``: those of the first
    format in WEIGHT_FORMATS it holds, sorted, trainer state left out."""
    for pattern in WEIGHT_FORMATS:
        files = [f for f in glob.glob(os.path.join(folder, pattern)) if os.path.basename(f) not in NOT_WEIGHTS]
        if files:
            return sorted(files)
    return []


def resident(module):
    """``module`` (a torch ``nn.Module``) with every CPU parameter and buffer
    copied into memory of its own. transformers and safetensors map a
    checkpoint's file rather than read it, so weights loaded on the CPU stay
    page cache of that file: clean pages, which the kernel takes back under
    memory pressure and reads from disk again at the next use. A drafter idle
    through a run of plain steps, on a machine whose memory other servers
    share, then paid the disk in every draft for minutes (2026-12-06,
    docs/benchmarks.md). Tensors that share memory (tied weights) still share
    their copy. GPU tensors are left alone: moving them there copied them."""
    import torch

    copies: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu":
                key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
                t.data = copies.setdefault(key, t.data.clone())
    return module


def read_config(folder: str, path: str, flag: str) -> dict:
    """``folder``'s config.json; ``path`` is what the user gave (for the message)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MineDraftConfigError(f"{flag} {path!r}: cannot read config.json ({e})") from None


def vocab_size(config: dict, path: str, flag: str) -> int:
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not vocab:
        raise MineDraftConfigError(f"{flag} {path!r}: config.json has no vocab_size")
    return int(vocab)


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def tokenizer_vocab(folder: str) -> dict[str, int]:
    """Token -> id, added tokens included (what SGLang's STANDALONE compares:
    ``tokenizer.get_vocab()``)."""
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tokenizer_json).get_vocab(with_added_tokens=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def check_vocabularies(draft_dir: str, draft: str, target_dir: str, target: str, *, draft_config, target_config):
    """Refuse a draft whose proposals cannot be the target's tokens: more
    vocabulary rows than the target (it can propose ids the target has no
    embedding for), or a tokenizer that gives tokens other ids. A smaller
    vocabulary (a padded target) is fine, and so is a draft folder without a
    tokenizer (SGLang serves with the target's; EAGLE heads ship none)."""
    draft_flag, target_flag = "--speculative-draft-model-path", "--model-path"
    draft_vocab = vocab_size(draft_config, draft, draft_flag)
    target_vocab = vocab_size(target_config, target, target_flag)
    if draft_vocab > target_vocab:
        raise MineDraftConfigError(
            f"{draft_flag} {draft!r} has vocabulary size {draft_vocab}, the target {target!r} has "
            f"{target_vocab}: the draft could propose token ids the target does not have "
            "(a draft needs the target's tokenizer and at most its vocabulary size)"
        )
    if not (has_tokenizer(draft_dir) and has_tokenizer(target_dir)):
        return
    if _same_tokenizer_files(draft_dir, target_dir):
        return
    try:
        draft_tokens, target_tokens = tokenizer_vocab(draft_dir), tokenizer_vocab(target_dir)
    except Exception as e:  # noqa: BLE001 - a tokenizer SGLang cannot read either fails later, clearly
        raise MineDraftConfigError(f"{draft_flag} {draft!r}: cannot read its tokenizer ({e})") from None
    if draft_tokens != target_tokens:
        differ = sorted(
            t for t in draft_tokens.keys() | target_tokens.keys() if draft_tokens.get(t) != target_tokens.get(t)
        )
        example = differ[0]
        raise MineDraftConfigError(
            f"{draft_flag} {draft!r}: its tokenizer differs from the target's ({len(differ)} tokens differ, e.g. "
            f"{example!r}: id {draft_tokens.get(example)} in the draft, {target_tokens.get(example)} in the target); "
            "drafts must use the target's tokenizer"
        )


def _same_tokenizer_files(a: str, b: str) -> bool:
    """Byte-identical tokenizer.json in both folders (the common case, read in
    milliseconds where loading a 150k-token tokenizer takes a second)."""
    fa, fb = os.path.join(a, "tokenizer.json"), os.path.join(b, "tokenizer.json")
    if not (os.path.isfile(fa) and os.path.isfile(fb)):
        return False
    if os.path.getsize(fa) != os.path.getsize(fb):
        return False
    with open(fa, "rb") as x, open(fb, "rb") as y:
        return x.read() == y.read()


def draft_config(path: str, revision: str | None = None) -> dict:
    """The draft checkpoint's config.json (``path`` a folder or a hub id,
    ``--speculative-draft-model-path``; the config alone, no weights)."""
    flag = "--speculative-draft-model-path"
    return read_config(local_dir(path, flag, revision=revision), path, flag)
