"""Tiny EAGLE and EAGLE-3 heads for the tiny target, trained in seconds; manual: docs/lab.md, "Tiny EAGLE heads"."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minedraft_sglang.drafters import eagle
from minedraft_sglang.lab import tiny_models

HEADS = {"eagle": 1, "eagle3": 3, "eagle3-default": 3}
AUX_LAYER_IDS = [0, 1, 2]  # "eagle3"'s eagle_config: outputs of the tiny target's layers 0-2 (it has 4)
# "eagle3-default" names no layers (no eagle_config, as some published EAGLE-3 heads): it reads
# SGLang's default ones, which collapse to 2 on the 4-layer tiny target (eagle.captured_layers; 3 need
# 7 layers or more), so its config says num_aux_hidden_states 2, as SGLang's own EAGLE-3 would need.
NUM_SEQS, PROMPT_LEN, SEQ_LEN = 128, 8, 24
TRAIN_STEPS = 10


def model_path(name: str) -> Path:
    """The head's folder, trained on first use."""
    target = tiny_models.model_path("target")
    recipe = b"".join(Path(m.__file__).read_bytes() for m in (sys.modules[__name__], eagle))
    fingerprint = hashlib.sha256(recipe + str(target).encode()).hexdigest()[:12]
    path = tiny_models.cache_dir() / f"{name}-{fingerprint}"
    if not (path / "model.safetensors").is_file():
        _train(name, target, path)
    return path


def head_config(name: str, target_config):
    """The config of head ``name`` for the tiny target."""
    if name != "eagle3-default":
        return _config(HEADS[name], target_config)
    default = eagle.captured_layers({}, target_config.num_hidden_layers)
    return _config(3, target_config, aux_layer_ids=None, num_aux=len(default))


def feature_layers(name: str, target_config) -> list[int]:
    """The target layers whose outputs head ``name`` reads (EAGLE-3; what
    the worker has the target return for it)."""
    return eagle.captured_layers(head_config(name, target_config).to_dict(), target_config.num_hidden_layers)


def _config(version: int, target_config, aux_layer_ids: list[int] | None = AUX_LAYER_IDS, num_aux: int | None = None):
    """An EAGLE (``version`` 1) or EAGLE-3 head's config for the target;
    EAGLE-3 names ``aux_layer_ids`` in its eagle_config (None: none, SGLang's
    default layers) and ``num_aux`` as num_aux_hidden_states (None: not)."""
    from transformers import LlamaConfig

    extra = {}
    if version == 3:
        extra = dict(draft_vocab_size=target_config.vocab_size, target_hidden_size=target_config.hidden_size)
        if aux_layer_ids is not None:
            extra["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layer_ids}
        if num_aux is not None:
            extra["num_aux_hidden_states"] = num_aux
    return LlamaConfig(
        **{
            k: getattr(target_config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "rms_norm_eps",
                "max_position_embeddings",
                "rope_theta",
            )
            if hasattr(target_config, k)
        },
        num_hidden_layers=1,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLMEagle" if version == 1 else "LlamaForCausalLMEagle3"],
        **extra,
    )


def variant(src: Path, dst: Path, *, named_layers: bool = True, pytorch_bin: bool = False) -> Path:
    """A copy of head folder ``src`` in another form SGLang loads, as
    published heads come: without eagle_config (``named_layers=False``: it
    then reads SGLang's default layers), and with its weights as
    ``pytorch_model.bin`` alone (``pytorch_bin``)."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if not named_layers:
        del config["eagle_config"]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if pytorch_bin:
        torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    else:
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    return dst


@torch.no_grad()
def target_text_and_features(
    target,
    version: int,
    seed: int = 0,
    num_seqs: int = NUM_SEQS,
    length: int = SEQ_LEN,
    layers: list[int] = AUX_LAYER_IDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of random prompts, and the target's features at
    every position: its last hidden state (EAGLE) or the outputs of its
    ``layers`` side by side (EAGLE-3)."""
    vocab = torch.tensor(tiny_models.text_token_ids(_tokenizer_vocab()))
    g = torch.Generator().manual_seed(seed)
    prompts = vocab[torch.randint(len(vocab), (num_seqs, PROMPT_LEN), generator=g)]
    seqs = target.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=length - PROMPT_LEN,
        min_new_tokens=length - PROMPT_LEN,
        do_sample=False,
        pad_token_id=tiny_models.PAD_ID,
    )
    hidden = target(seqs, output_hidden_states=True).hidden_states
    if version == 1:
        return seqs, hidden[-1]  # transformers applies the final norm to the last one
    return seqs, torch.cat([hidden[i + 1] for i in layers], dim=-1)


def _tokenizer_vocab() -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.model_path("target")).get_vocab()


def training_loss(head: eagle.EagleHead, seqs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the head's next-next-token predictions, from target
    features and (second pass, as when drafting several tokens) from its own."""
    tokens, feats, labels = seqs[:, 1:-1], features[:, :-2], seqs[:, 2:]
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    cos_sin = head.rotary_emb(feats, positions)
    out, head_in = head.step(tokens, feats, cos_sin, eagle.causal_attention)
    loss = F.cross_entropy(head.logits(head_in).flatten(0, 1), labels.flatten())
    # Own features: the pair at position t+1 is (token t+2, head output at t).
    own, head_in2 = head.step(
        seqs[:, 2:-1], out[:, :-1], head.rotary_emb(feats, positions[:, 1:]), eagle.causal_attention
    )
    loss = loss + F.cross_entropy(head.logits(head_in2).flatten(0, 1), seqs[:, 3:].flatten())
    if head.version == 1:
        # EAGLE also regresses the target's next feature.
        loss = loss + F.smooth_l1_loss(out, features[:, 1:-1])
    return loss


@torch.no_grad()
def _warm_start(head: eagle.EagleHead, target, layers: list[int]) -> None:
    """Start from "the next token repeats the target's current prediction":
    EAGLE passes the target's final feature through unchanged; EAGLE-3's
    layer starts as a copy of the target layer that follows the last of its
    ``layers``, applied to that one's output (the target's last layer for
    "eagle3"; "eagle3-default"'s stop a layer earlier, where a copy of the
    last layer trained to 1.11 accepted tokens per step on new text, a copy
    of the next one to 1.34). The tiny target's text repeats a lot, so training
    starts from useful drafts and only has to learn the rest in seconds."""
    hidden = head.layer.self_attn.config.hidden_size
    head.fc.weight.zero_()
    head.fc.weight[:, -hidden:] = torch.eye(hidden)
    if head.fc.bias is not None:
        head.fc.bias.zero_()
    if head.version == 1:
        head.layer.self_attn.o_proj.weight.zero_()
        head.layer.mlp.down_proj.weight.zero_()
        return
    last = target.model.layers[layers[-1] + 1]
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(head.layer.self_attn, name)
        proj.weight.zero_()
        proj.weight[:, hidden:] = getattr(last.self_attn, name).weight
    head.layer.self_attn.o_proj.load_state_dict(last.self_attn.o_proj.state_dict())
    head.layer.mlp.load_state_dict(last.mlp.state_dict())
    head.layer.post_attention_layernorm.load_state_dict(last.post_attention_layernorm.state_dict())
    head.hidden_norm.load_state_dict(last.input_layernorm.state_dict())
    head.norm.load_state_dict(target.model.norm.state_dict())
    head.lm_head.weight.copy_(target.lm_head.weight)


def _train(name: str, target_path: Path, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    version = HEADS[name]
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    config = head_config(name, target.config)
    layers = feature_layers(name, target.config)
    seqs, features = target_text_and_features(target, version, layers=layers)
    lm_head = None
    if version == 1:
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        lm_head.weight = nn.Parameter(target.lm_head.weight.detach().clone(), requires_grad=False)
    embed = nn.Embedding.from_pretrained(target.model.embed_tokens.weight.detach().clone(), freeze=True)
    head = eagle.EagleHead(config, version, embed, lm_head)
    _warm_start(head, target, layers)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        training_loss(head, seqs, features).backward()
        opt.step()
    tiny_models.save_atomically(lambda tmp: eagle.save_eagle_head(head, config, str(tmp)), path)


def main(names: list[str]) -> None:
    for name in names or list(HEADS):
        print(f"{name}\t{model_path(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
