"""Tiny Llama models built offline in seconds for tests and the quickstart; manual: docs/lab.md, "Tiny models"."""

import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 1024
MISMATCH_VOCAB_SIZE = 1088
MAX_POSITIONS = 2048
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Turns end with </s> so a trained model would stop after its answer; the
# trailing newline after the role marker is where generation starts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODELS = ("target", "draft", "bigram", "bigram-draft", "bigram-mixed-draft", "mismatch-vocab")

TARGET_SHAPE = dict(
    num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512
)
DRAFT_SHAPE = dict(
    num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256
)
BIGRAM_DRAFT_LAYERS = 1
WIDE_TARGET_SHAPE = dict(
    num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, intermediate_size=4096
)
# Random weights in bfloat16; no draft agrees with its target, so a run
# measures the machinery at a given size, not a speedup from good drafts.
WEIGHT_BOUND_SHAPE = dict(
    num_hidden_layers=6, hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, intermediate_size=5632
)
WIDE_MODELS = {
    "wide-target": dict(WIDE_TARGET_SHAPE, num_hidden_layers=8),
    "wide-draft": dict(WIDE_TARGET_SHAPE, num_hidden_layers=3),
    # Issue 14's weight-bound pair: every forward streams ~0.5 GB (target)
    # or ~0.2 GB (draft) of weights, so a step costs what its weights cost.
    "wb-target": WEIGHT_BOUND_SHAPE,
    "wb-draft": dict(WEIGHT_BOUND_SHAPE, num_hidden_layers=2),
}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "minedraft_sglang" / "tiny-models"
    return Path(os.environ.get("MINEDRAFT_CACHE_DIR", default))


def fingerprint() -> str:
    # The weights come from this file plus the libraries that train and save
    # them; hashing all of it means a stale cache can never be picked up.
    h = hashlib.sha256(Path(__file__).read_bytes())
    for v in (torch.__version__, transformers.__version__, tokenizers.__version__):
        h.update(v.encode())
    return h.hexdigest()[:12]


def _folder(name: str) -> Path:
    return cache_dir() / f"{name}-{fingerprint()}"


def model_path(name: str) -> Path:
    if name not in MODELS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {MODELS}")
    path = _folder(name)
    if not path.is_dir():
        build_all()
    return path


def wide_model_path(name: str) -> Path:
    """One of WIDE_MODELS, built on first use (seconds; the wb- pair, a minute)."""
    path = _folder(name)
    if not path.is_dir():
        tokenizer = _train_tokenizer()
        model = _random_llama(WIDE_MODELS[name], seed=5 + list(WIDE_MODELS).index(name))
        model.config.dtype = torch.bfloat16
        save_atomically(
            lambda tmp: (model.to(torch.bfloat16).save_pretrained(tmp), tokenizer.save_pretrained(tmp)), path
        )
    return path


def build_all() -> dict[str, Path]:
    paths = {name: _folder(name) for name in MODELS}
    missing = [name for name in MODELS if not paths[name].is_dir()]
    if missing:
        tokenizer = _train_tokenizer()
        built = _build_models(tokenizer)
        for name in missing:
            save_atomically(
                lambda tmp, m=built[name]: (m.save_pretrained(tmp), tokenizer.save_pretrained(tmp)), paths[name]
            )
    return paths


# ---------------------------------------------------------------- tokenizer

_WORDS = """
the a an this that every some no one two three four five many few all each
cat dog bird fish horse mouse rabbit fox wolf bear lion tiger owl frog snake
king queen child teacher doctor farmer sailor baker painter writer student
river mountain forest garden village city castle bridge tower road field lake
house window door table chair book letter story song picture lamp clock key
apple bread cheese water milk honey soup cake coffee tea rice orange lemon
morning evening night day week year summer winter spring autumn moment hour
red green blue yellow black white small large old young quiet loud bright dark
happy sad brave clever gentle strange warm cold quick slow heavy light simple
walked ran jumped looked found made gave took saw heard said asked told knew
wrote read sang built carried opened closed followed watched waited wanted
liked loved remembered forgot learned taught helped started finished moved
sits stands sleeps reads writes sings plays works thinks dreams speaks listens
and but or so because while after before when where if then
in on under over near behind beside between through across into from with
quickly slowly quietly happily suddenly finally often always never again
he she it they we you I his her their our my your its them us him
is was are were has had have will would can could should might must
what why how who which there here today tomorrow yesterday very too also
number system question answer problem reason example idea world life time
people family friend water money music language science history nature
computer program model token server request memory speed result test draft
""".split()

_NAMES = "Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah".split()


def _corpus(n_sentences: int = 4000) -> list[str]:
    # Seeded sentences over a fixed word list: enough distinct words for
    # ~750 merges, with capitals, digits, punctuation and line breaks so
    # every common byte pattern in prompts gets a merged token.
    rng = random.Random(0)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        if rng.random() < 0.15:
            words[rng.randrange(len(words))] += ","
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"])
        lines.append(text + ("\n" if rng.random() < 0.3 else ""))
    return lines


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, want {VOCAB_SIZE}: grow the corpus")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    if ids != [PAD_ID, BOS_ID, EOS_ID]:
        raise RuntimeError(f"special token ids {ids}, want {[PAD_ID, BOS_ID, EOS_ID]}")
    return tokenizer


# ---------------------------------------------------------------- models


def _config(shape: dict, vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype="float32",
        **shape,
    )


def _random_llama(shape: dict, seed: int, vocab_size: int = VOCAB_SIZE) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(shape, vocab_size)).float().eval()


@torch.no_grad()
def _sharpened(model: LlamaForCausalLM, scale: float = 30.0) -> LlamaForCausalLM:
    # A random Llama's top two logits are ~0.01-0.08 apart, close enough for
    # kernel rounding to flip a greedy token between two correct
    # implementations; a scaled lm_head widens the gaps ~30x.
    model.lm_head.weight.mul_(scale)
    return model


def text_token_ids(tokenizer_vocab: dict[str, int]) -> list[int]:
    # Only tokens that decode to printable text on their own may be emitted by
    # the bigram, so streamed output never holds back a partial UTF-8 byte.
    byte_decoder = decoders.ByteLevel()
    ids = []
    for piece, i in tokenizer_vocab.items():
        if piece in SPECIAL_TOKENS:
            continue
        text = byte_decoder.decode([piece])
        if text and "\ufffd" not in text and all(c.isprintable() or c == "\n" for c in text):
            ids.append(i)
    return sorted(ids)


@torch.no_grad()
def _final_hidden(model: LlamaForCausalLM) -> torch.Tensor:
    # One token per sequence: with o_proj zeroed the hidden state ignores both
    # context and position, so this is the model's whole next-token function.
    tokens = torch.arange(model.config.vocab_size)[:, None]
    return model.model(input_ids=tokens).last_hidden_state[:, 0]


@torch.no_grad()
def greedy_successors(model: LlamaForCausalLM) -> torch.Tensor:
    """succ[t] = greedy next token after token t, for a model that ignores context."""
    return model.lm_head(_final_hidden(model)).argmax(-1)


def cycle_stats(succ: torch.Tensor) -> dict:
    """Where greedy decoding goes under the map t -> succ[t], from every start token."""
    n = len(succ)
    landing = torch.arange(n)
    for _ in range(n):  # n steps put every walk on the cycle it ends in
        landing = succ[landing]
    on_cycle = torch.zeros(n, dtype=torch.bool)
    on_cycle[landing] = True
    nxt = succ.tolist()
    period = [0] * n
    lengths = []
    for t in landing.unique().tolist():
        if period[t]:
            continue
        cycle = [t]
        while nxt[cycle[-1]] != t:
            cycle.append(nxt[cycle[-1]])
        for c in cycle:
            period[c] = len(cycle)
        lengths.append(len(cycle))
    tail = torch.zeros(n, dtype=torch.long)
    for _ in range(n):
        tail = torch.where(on_cycle, 0, tail[succ] + 1)
    # Distinct tokens (start included) greedy decoding yields before repeating.
    run = tail + torch.tensor(period)[landing]
    return dict(
        tokens=n,
        distinct_successors=len(set(nxt)),
        cycle_lengths=sorted(lengths, reverse=True),
        tokens_on_cycles=int(on_cycle.sum()),
        max_tail=int(tail.max()),
        min_run=int(run.min()),
        median_run=int(run.median()),
    )


def _bigram_pair(tokenizer: PreTrainedTokenizerFast, seed: int) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    model = _random_llama(TARGET_SHAPE, seed)
    # The designed map is one cycle through every printable token, so greedy
    # text never settles into a short loop; other tokens feed into the cycle.
    text_ids = torch.tensor(text_token_ids(tokenizer.get_vocab()))
    gen = torch.Generator().manual_seed(seed)
    order = text_ids[torch.randperm(len(text_ids), generator=gen)]
    want = text_ids[torch.randint(len(text_ids), (VOCAB_SIZE,), generator=gen)]
    want[order] = order.roll(-1)
    with torch.no_grad():
        # Llama init zeroes the padding row; a zero hidden state has no
        # direction to aim the lm_head at, so give <pad> a real embedding.
        model.model.embed_tokens.weight[PAD_ID].normal_(0, model.config.initializer_range, generator=gen)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            # Later layers become exact identities, so dropping them (the
            # draft) leaves every hidden state bit for bit unchanged.
            if i >= BIGRAM_DRAFT_LAYERS:
                layer.mlp.down_proj.weight.zero_()
        # Point the lm_head row of each successor at its predecessors' final
        # hidden directions: the winning logit is |h| = sqrt(hidden) = 16 and
        # the rest are near-orthogonal noise of about +-1.
        hidden = _final_hidden(model)
        unit = hidden / hidden.norm(dim=-1, keepdim=True)
        model.lm_head.weight.copy_(torch.zeros_like(unit).index_add_(0, want, unit))

    draft = LlamaForCausalLM(_config({**TARGET_SHAPE, "num_hidden_layers": BIGRAM_DRAFT_LAYERS})).eval()
    kept = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < BIGRAM_DRAFT_LAYERS
    }
    draft.load_state_dict(kept, strict=True)

    with torch.no_grad():
        logits = model.lm_head(_final_hidden(model))
        draft_logits = draft.lm_head(_final_hidden(draft))
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    if not torch.equal(logits.argmax(-1), want) or not torch.equal(draft_logits.argmax(-1), want):
        raise RuntimeError("bigram/bigram-draft greedy map differs from the designed successor map")
    if margin < 4.0:
        raise RuntimeError(f"bigram top-1 margin {margin:.2f} is too thin to survive kernel rounding")
    return model, draft


def _mixed_draft(bigram: LlamaForCausalLM, draft: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """A copy of ``draft`` whose embedding of every third token is random:
    after such a token its hidden state points nowhere, so its top guess is
    noise (almost always wrong) with a small probability, while after the
    other tokens it agrees with ``bigram`` confidently."""
    mixed = LlamaForCausalLM(draft.config).eval()
    mixed.load_state_dict(draft.state_dict())
    gen = torch.Generator().manual_seed(seed)
    hard = torch.arange(VOCAB_SIZE)[torch.randperm(VOCAB_SIZE, generator=gen)[: VOCAB_SIZE // 3]]
    with torch.no_grad():
        emb = mixed.model.embed_tokens.weight
        emb[hard] = torch.randn(len(hard), emb.shape[1], generator=gen) * emb.std()
        probs = torch.softmax(mixed.lm_head(_final_hidden(mixed)), dim=-1)
        agree = probs.argmax(-1) == greedy_successors(bigram)
    easy = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    easy[hard] = False
    if not bool(agree[easy].all()) or float(agree[hard].float().mean()) > 0.05:
        raise RuntimeError("bigram-mixed-draft: easy tokens must agree with bigram and hard ones not")
    if float(probs.max(-1).values[hard].max()) > float(probs.max(-1).values[easy].min()):
        raise RuntimeError("bigram-mixed-draft: hard guesses must be less confident than easy ones")
    return mixed


def _build_models(tokenizer: PreTrainedTokenizerFast) -> dict[str, LlamaForCausalLM]:
    bigram, bigram_draft = _bigram_pair(tokenizer, seed=2)
    return {
        "bigram-mixed-draft": _mixed_draft(bigram, bigram_draft, seed=4),
        "target": _sharpened(_random_llama(TARGET_SHAPE, seed=0)),
        "draft": _random_llama(DRAFT_SHAPE, seed=1),
        "bigram": bigram,
        "bigram-draft": bigram_draft,
        "mismatch-vocab": _random_llama(DRAFT_SHAPE, seed=3, vocab_size=MISMATCH_VOCAB_SIZE),
    }


def save_atomically(write, path: Path) -> None:
    """``write(folder)`` fills a fresh folder that then becomes ``path``."""
    # Built beside its final name and renamed in one step: readers see a
    # complete folder or none, whatever other builders or interruptions do.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            # Losing the race to a concurrent builder is fine: the recipe is
            # deterministic, so its copy is byte for byte the same as ours.
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(names: list[str]) -> None:
    paths = build_all()
    if names:
        print("\n".join(str(paths[name]) for name in names))
    else:
        print("\n".join(f"{name}\t{path}" for name, path in paths.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
