"""EAGLE and EAGLE-3 heads as drafters, on their own device.

The checkpoints are the ones SGLang's EAGLE workers load
(``LlamaForCausalLMEagle``, ``LlamaForCausalLMEagle3``); the computation
matches SGLang's ``llama_eagle.py`` / ``llama_eagle3.py``:

  EAGLE    x = fc([embed(token), feature]); one decoder layer whose attention
           reads x directly (no input norm); no final norm; the target's LM
           head. The feature is the target's last hidden state (after its
           final norm).
  EAGLE-3  feature = fc(target's low/mid/high layer outputs) when it comes
           from the target; attention reads [input_norm(embed), hidden_norm(
           feature)] (2H wide); final norm; its own LM head over a draft
           vocabulary mapped to target ids by ``d2t``.

Both take the target's embedding (EAGLE also its LM head), as SGLang does.

Position t of the head's cache holds the pair (token t+1, feature of t), like
SGLang's draft extend. Features of the target arrive per request through
``observe`` (prefill chunks, then the accepted positions of each verify) and
turn into cache rows at the next draft call; rows fed with the head's own
features (while drafting, or for draft-ahead guesses) are overwritten later.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minedraft_sglang import model_files
from minedraft_sglang.drafters.base import DraftOutput, DraftRequest, read_on_this_stream
from minedraft_sglang.drafters.kv_cache import (
    CachedDrafter,
    CatchUp,
    SlotKVCache,
    StepRunner,
    StreamHandoff,
    pack,
    project_qkv,
)

EAGLE_ARCHITECTURES = {"LlamaForCausalLMEagle": 1, "LlamaForCausalLMEagle3": 3}


def aux_layer_ids(draft_config: dict) -> list[int] | None:
    """The target layers whose outputs feed an EAGLE-3 head, as its config
    names them for SGLang (``eagle_config.eagle_aux_hidden_state_layer_ids``),
    or None: SGLang's default for the target (``captured_layers``). SGLang
    reads nothing else (``spec_aux_hidden_state.py``, the fallback to None)."""
    return (draft_config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or None


def num_aux_hidden_states(draft_config: dict) -> int:
    """How many target layer outputs an EAGLE-3 head's ``fc`` reads side by
    side, SGLang's rule (``llama_eagle3.py``): ``num_aux_hidden_states``,
    else as many as the config names, else 3."""
    count = draft_config.get("num_aux_hidden_states")
    if count is None:
        ids = aux_layer_ids(draft_config)
        count = len(ids) if ids else 3
    return count


def captured_layers(draft_config: dict, target_layers: int) -> list[int]:
    """The target layers (of ``target_layers``) whose outputs SGLang's target
    returns for an EAGLE-3 head, in the order it returns them: each named
    layer once, ascending. Without names, SGLang's default
    (``set_eagle3_layers_to_capture(None)``, ``models/llama.py`` and alike in
    every model) captures the inputs of layers 2, n // 2 and n - 3, that is
    the outputs of 1, n // 2 - 1 and n - 4 (a named layer's output is the
    next layer's input: SGLang adds 1 to names, not to its default). On a
    target under 7 layers those collapse to fewer than 3."""
    ids = aux_layer_ids(draft_config)
    if ids is None:
        ids = [1, target_layers // 2 - 1, target_layers - 4]
    return sorted(set(ids))


def target_capture(draft_config: dict, target_layers: int) -> list[int] | None:
    """What the target is asked for (``set_eagle3_layers_to_capture``) so
    that it returns what the head reads: the named layers, or None for
    SGLang's own default. ValueError when the target would return another
    number of outputs than the head's ``fc`` reads (SGLang's EAGLE-3 then
    fails at its first draft): a default on a small target, a repeated
    layer, or the last layer, whose output no layer captures (-1 is the
    embedding)."""
    named = aux_layer_ids(draft_config)
    layers = captured_layers(draft_config, target_layers)
    expected = num_aux_hidden_states(draft_config)
    if len(layers) != expected or not -1 <= layers[0] <= layers[-1] <= target_layers - 2:
        source = f"its eagle_config's layers {named}" if named else f"SGLang's default layers {layers} for it"
        raise ValueError(
            f"EAGLE-3 head: its fc reads {expected} target layer outputs, not those of {source} "
            f"(a {target_layers}-layer target returns each of layers -1..{target_layers - 2} at most once)"
        )
    return named


class EagleHead(nn.Module):
    def __init__(self, config, version: int, embed: nn.Embedding, lm_head: nn.Linear | None):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"EAGLE heads with {config.num_hidden_layers} layers are not supported (1 expected)")
        self.version = version
        hidden = config.hidden_size
        self.embed = embed
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        if version == 1:
            del self.layer.input_layernorm  # as in SGLang: attention reads fc's output
            self.fc = nn.Linear(2 * hidden, hidden, bias=True)
            self.lm_head = lm_head
            self.d2t = None
            return
        attn = self.layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            proj = getattr(attn, name)
            setattr(attn, name, nn.Linear(2 * hidden, proj.out_features, bias=proj.bias is not None))
        self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.fc = nn.Linear(
            num_aux_hidden_states(config.to_dict()) * target_hidden, hidden, bias=getattr(config, "bias", False)
        )
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.lm_head = lm_head if lm_head is not None else nn.Linear(hidden, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))

    def step(self, tokens, feature, cos_sin, attend: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the head over [bs, T] (token, feature) pairs; returns
        (the feature for the next position, the LM head's input)."""
        layer = self.layer
        embeds = self.embed(tokens)
        if self.version == 1:
            x = self.fc(torch.cat([embeds, feature], dim=-1))
            h = x + attend(layer.self_attn, x, cos_sin)
            out = h + layer.mlp(layer.post_attention_layernorm(h))
            return out, out
        if feature.shape[-1] != embeds.shape[-1]:
            feature = self.fc(feature)  # the target's fused layer outputs
        x = torch.cat([layer.input_layernorm(embeds), self.hidden_norm(feature)], dim=-1)
        h = feature + attend(layer.self_attn, x, cos_sin)
        out = h + layer.mlp(layer.post_attention_layernorm(h))
        return out, self.norm(out)

    def logits(self, head_input: torch.Tensor) -> torch.Tensor:
        return self.lm_head(head_input)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]


def causal_attention(attn, x, cos_sin):
    """Attention over the sequence itself (training, reference checks)."""
    q, k, v = project_qkv(attn, x, cos_sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
    return attn.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def _checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    """The head's weights, from the format SGLang's loader would read
    (``model_files.weight_files``): safetensors, else PyTorch pickles, read
    as tensors only (``weights_only``: no code runs from the file)."""
    from safetensors.torch import load_file

    files = model_files.weight_files(path)
    if not files:
        raise ValueError(f"{path}: no weights ({', '.join(model_files.WEIGHT_FORMATS)})")
    weights = {}
    for f in files:
        weights.update(
            load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True)
        )
    return weights


def target_embed_and_head(target_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's input embedding and LM head weights, read from its
    checkpoint (the drafter's device is not the target's)."""
    from safetensors import safe_open

    with open(os.path.join(target_path, "config.json")) as f:
        tied = json.load(f).get("tie_word_embeddings", False)
    found = {}
    for file in sorted(glob.glob(os.path.join(target_path, "*.safetensors"))):
        with safe_open(file, "pt") as st:
            for name in ("model.embed_tokens.weight", "lm_head.weight"):
                if name in st.keys():
                    found[name] = st.get_tensor(name)
    embed = found.get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{target_path}: no model.embed_tokens.weight in its safetensors")
    return embed, embed if tied else found["lm_head.weight"]


def load_eagle_head(model_path: str, target_path: str) -> EagleHead:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    version = EAGLE_ARCHITECTURES[config.architectures[0]]
    embed_w, head_w = target_embed_and_head(target_path)
    embed = nn.Embedding.from_pretrained(embed_w, freeze=True)
    weights = {_canonical_name(name): w for name, w in _checkpoint_weights(model_path).items() if name != "t2d"}
    own_head = "lm_head.weight" in weights
    lm_head = None
    if version == 1 or not own_head:
        lm_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False)
        lm_head.weight = nn.Parameter(head_w, requires_grad=False)
    head = EagleHead(config, version, embed, lm_head)
    weights.pop("embed_tokens.weight", None)  # SGLang uses the target's
    if version == 1:
        weights.pop("lm_head.weight", None)
    missing, unexpected = head.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not m.startswith(("embed.", "rotary_emb."))]
    if version == 1 or not own_head:
        missing = [m for m in missing if not m.startswith("lm_head.")]
    if version == 3 and "d2t" not in weights:
        missing = [m for m in missing if m != "d2t"]
    if missing or unexpected:
        raise ValueError(f"{model_path}: EAGLE weights do not match (missing {missing}, unexpected {unexpected})")
    return head.eval()


# Checkpoint names (SGLang's loader and the EAGLE repos) -> this module's.
_RENAMES = (
    ("midlayer.hidden_norm.", "hidden_norm."),
    ("midlayer.", "layer."),
    ("layers.0.hidden_norm.", "hidden_norm."),
    ("layers.0.", "layer."),
)


def _canonical_name(name: str) -> str:
    name = name.removeprefix("model.")
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def save_eagle_head(head: EagleHead, config, path: str) -> None:
    """Write ``head`` as an SGLang-loadable EAGLE checkpoint (without the
    target's embedding and, for EAGLE, LM head)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    shared = ("embed.", "rotary_emb.") + (("lm_head.",) if head.version == 1 else ())
    state = {}
    for name, tensor in head.state_dict().items():
        if name.startswith(shared):
            continue
        layer_prefix = "midlayer." if head.version == 3 else "layers.0."
        if name.startswith("layer."):
            name = layer_prefix + name[len("layer.") :]
        elif name.startswith("hidden_norm."):
            name = layer_prefix + name  # SGLang keeps it inside the layer
        state[name] = tensor.contiguous()
    save_file(state, os.path.join(path, "model.safetensors"))
    config.save_pretrained(path)


class _Slot:
    __slots__ = ("index", "start", "cached", "features", "known")

    def __init__(self, index: int):
        self.index = index
        self.start = 0  # first position with a cache row (prefix-cache hits start later)
        # Rows [start, cached) hold target-feature pairs. The last known
        # position is fed again at every draft call (its output starts the
        # proposals), so ``features`` keeps it: features of [cached, known).
        self.cached = 0
        self.features: list[torch.Tensor] = []
        self.known = 0

    def reset(self, start: int) -> None:
        self.start = self.cached = self.known = start
        self.features = []


class EagleDrafter(CachedDrafter):
    needs_target_features = True

    def __init__(self, model_path: str, target_path: str, device: str, dtype: torch.dtype, *, step_mode: str = "eager"):
        self.device = torch.device(device)
        # Inference only; SGLang allocates the drafter (so captures its step
        # graphs) with grad mode on (kv_cache.py).
        head = load_eagle_head(model_path, target_path).to(self.device, dtype).requires_grad_(False)
        self.head = model_files.resident(head)
        self.dtype = dtype
        config = self.head.layer.self_attn.config
        self.cache = SlotKVCache(
            1,
            config.num_attention_heads,
            config.num_key_value_heads,
            self.head.layer.self_attn.head_dim,
            dtype,
            self.device,
            _Slot,
        )
        self.steps = StepRunner(self._step, step_mode, self.cache)
        self.catch_up = CatchUp()
        self.handoff = StreamHandoff(self.device)

    def observe(self, rid: str, start: int, features: torch.Tensor) -> None:
        slot = self.cache.slot(rid)
        if self.cache.is_scratch(slot) or start + len(features) > self.cache.max_len:
            return
        if slot.known != start:
            # A new (or re-prefilled) request; ``start`` > 0 when SGLang's
            # prefix cache skipped the prompt's beginning, whose features the
            # head then never sees.
            slot.reset(start)
        slot.features.append(own_copy(features, self.device, self.dtype))
        slot.known += len(features)

    def draft(self, reqs: Sequence[DraftRequest], num_tokens: int, stop_below: float = 0.0) -> DraftOutput:
        """Feed each request's new target features, then run the head
        autoregressively: first over the request's tokens that have no target
        feature yet (draft-ahead guesses), then ``num_tokens`` proposals.
        Ordered after the previous call's kernels (``StreamHandoff``). Every
        chain runs to ``num_tokens`` (the server refuses a stop with an
        EAGLE head)."""
        if stop_below:
            raise ValueError("an EAGLE head drafts every chain to num_tokens (no stop_below)")
        with self.handoff():
            return self._draft(reqs, num_tokens)

    @torch.inference_mode()
    def _draft(self, reqs: Sequence[DraftRequest], num_tokens: int) -> DraftOutput:
        bs = len(reqs)
        slots = [self.cache.slot(r.rid) for r in reqs]
        live = [
            not self.cache.is_scratch(s) and s.known > s.start and len(r) + num_tokens <= self.cache.max_len
            for s, r in zip(slots, reqs)
        ]
        # The (token t + 1, feature t) pairs of [cached, known) per request.
        feeds = []
        for s, r, ok in zip(slots, reqs, live):
            if not ok:
                feeds.append(None)
                continue
            read_on_this_stream(s.features)
            feats = torch.cat(s.features) if len(s.features) > 1 else s.features[0]
            feeds.append((r.tokens(s.cached + 1)[: s.known - s.cached], feats))
            # The last known pair is fed again next call.
            s.features = [feats[-1:].clone()]
        widest = self.steps.widths[-1]
        long = [i for i, f in enumerate(feeds) if f is not None and len(f[0]) > widest]
        self._catch_up([(slots[i], feeds[i][0][:-1], feeds[i][1][:-1]) for i in long])
        for i in long:
            feeds[i] = (feeds[i][0][-1:], feeds[i][1][-1:])

        rows, width = self.steps.shape(bs, max([1, *(len(f[0]) for f in feeds if f is not None)]))
        feed = pack([(s.cached, f[0]) if f else (0, []) for s, f in zip(slots, feeds)], rows, width)
        # Requests without features read scratch from position 0: a read
        # that masks every key would give NaN.
        slot_index = torch.full((rows,), self.cache.scratch)
        start = torch.zeros(rows, dtype=torch.long)
        features = torch.zeros(rows, width, self._feature_width(), dtype=self.dtype, device=self.device)
        for i, (s, f) in enumerate(zip(slots, feeds)):
            if f is None:
                continue
            features[i, : len(f[1])] = f[1]
            slot_index[i], start[i] = s.index, s.start
            s.cached = s.known - 1

        # Tokens past the last target feature: known (draft-ahead) or proposed.
        forced = [r.tokens(s.known + 1) if ok else [] for s, r, ok in zip(slots, reqs, live)]
        steps = max(len(f) for f in forced) + num_tokens
        forced_tokens = torch.zeros(rows, steps, dtype=torch.long)
        is_forced = torch.zeros(rows, steps, dtype=torch.bool)
        for i, f in enumerate(forced):
            forced_tokens[i, : len(f)] = torch.tensor(f, dtype=torch.long)
            is_forced[i, : len(f)] = True
        to = lambda t: t.to(self.device)
        slot_index, start, zeros = to(slot_index), to(start), to(torch.zeros_like(feed.last))
        later, alive_t = to(feed.later_positions(steps)), to(torch.tensor(feed.alive)[:, None])
        forced_tokens, is_forced = to(forced_tokens), to(is_forced)

        out_tokens = torch.zeros(rows, steps, dtype=torch.long, device=self.device)
        out_probs = torch.zeros(rows, steps, dtype=torch.float32, device=self.device)
        feature, ids, probs = self.steps(
            (to(feed.tokens), features, to(feed.positions), to(feed.valid), slot_index, start, to(feed.last)),
            feed.kv_at(0),
        )
        out_tokens[:, 0], out_probs[:, 0] = ids, probs
        for step in range(1, steps):
            token = torch.where(is_forced[:, step - 1], forced_tokens[:, step - 1], out_tokens[:, step - 1])
            feature, ids, probs = self.steps(
                (token[:, None], feature, later[:, step - 1 : step], alive_t, slot_index, start, zeros),
                feed.kv_at(step),
            )
            out_tokens[:, step], out_probs[:, step] = ids, probs
        take = torch.tensor([len(f) for f in forced], device=self.device)[:, None] + torch.arange(
            num_tokens, device=self.device
        )
        return DraftOutput(tokens=out_tokens[:bs].gather(1, take), probs=out_probs[:bs].gather(1, take) * alive_t[:bs])

    def _feature_width(self) -> int:
        """Width of the target's features: its hidden size (EAGLE) or its
        aux layers' outputs side by side (EAGLE-3)."""
        return self.head.fc.in_features if self.head.version == 3 else self.head.fc.in_features // 2

    def _catch_up(self, feeds: list[tuple[_Slot, list[int], torch.Tensor]]) -> None:
        """Write the cache rows of ``feeds``' (token, feature) pairs after
        their slots' cached rows."""

        def forward(pieces):
            width = max(end - begin for _, begin, end in pieces)
            feed = pack([(feeds[i][0].cached, feeds[i][1][begin:end]) for i, begin, end in pieces], len(pieces), width)
            features = torch.zeros(len(pieces), width, self._feature_width(), dtype=self.dtype, device=self.device)
            for row, (i, begin, end) in enumerate(pieces):
                features[row, : end - begin] = feeds[i][2][begin:end]
            slot_index = torch.tensor([feeds[i][0].index for i, _, _ in pieces])
            start = torch.tensor([feeds[i][0].start for i, _, _ in pieces])
            to = lambda t: t.to(self.device)
            self._forward(
                to(feed.tokens), features, to(feed.positions), to(feed.valid), to(slot_index), to(start), kv=feed.kv
            )
            for i, begin, end in pieces:
                feeds[i][0].cached += end - begin

        self.catch_up.run([len(toks) for _, toks, _ in feeds], forward)

    def _widest_feed(self, max_drafts: int) -> int:
        # A call feeds again the last pair it fed (its output starts the
        # proposals), then a pair per feature observed since: the verify's
        # last committed token's and each accepted draft's.
        return max_drafts + 2

    def _padding(self, rows: int, width: int) -> list[tuple[torch.Tensor, ...]]:
        # A call's first step reads the target's features; the one-token
        # steps after it the head's own (EAGLE-3: another width).
        feature_widths = {self._feature_width(), *([self.head.fc.out_features] if width == 1 else [])}
        zeros = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        slot_index = torch.full((rows,), self.cache.scratch, device=self.device)
        features = [torch.zeros(rows, width, f, dtype=self.dtype, device=self.device) for f in sorted(feature_widths)]
        return [(zeros, f, zeros, zeros.bool(), slot_index, zeros[:, 0], zeros[:, 0]) for f in features]

    def _step(self, tokens, features, positions, valid, slot_index, start, last, *, kv):
        """One step: the head's feature after column ``last`` of each row,
        its greedy proposal there (in target ids) and that proposal's
        probability."""
        out_feature, head_input = self._forward(tokens, features, positions, valid, slot_index, start, kv=kv)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        probs, ids = torch.softmax(self.head.logits(head_input[rows, last]).float(), dim=-1).max(dim=-1)
        return out_feature[rows, last][:, None], self.head.to_target_ids(ids), probs

    def _forward(self, tokens, features, positions, valid, slot_index, start, *, kv):
        cos_sin = self.head.rotary_emb(features, positions)
        rows = self.cache.rows(positions, valid, slot_index, start, kv=kv)

        def attend(attn, x, cs):
            return self.cache.attention(0, attn, x, cs, rows)

        return self.head.step(tokens, features, cos_sin, attend)


def own_copy(features: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``features`` copied onto the drafter's device: never a view of the
    caller's buffer, which SGLang rewrites at its next forward (a graph
    replay writes its static hidden-state buffer in place). A copy to the
    CPU is blocking, so it is complete when the drafter's thread reads it."""
    out = torch.empty(features.shape, dtype=dtype, device=device)
    return out.copy_(features, non_blocking=device.type == "cuda")
