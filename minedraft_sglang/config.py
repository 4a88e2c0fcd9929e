"""MineDraft's own settings: the ``--minedraft-*`` flags.

SGLang's ``ServerArgs`` is a closed msgspec record, so our flags cannot live on
it. The launcher parses them (see ``plugin.py``) and hands them to the spawned
scheduler process through one environment variable holding JSON. ``sgl.Engine``
users, who have no command line, set that variable themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

ENV_VAR = "SGLANG_MINEDRAFT_CONFIG"
ALGORITHM_NAME = "MINEDRAFT"

MODES = ("auto", "psd", "sequential")
K_POLICIES = ("auto", "fixed")
# Draft checkpoint architecture -> the drafter that runs it ("auto" picks it).
DRAFTER_FOR_ARCHITECTURE = {
    "LlamaForCausalLM": "standalone",
    "Qwen2ForCausalLM": "standalone",
    "MistralForCausalLM": "standalone",
    "LlamaForCausalLMEagle": "eagle",
    "LlamaForCausalLMEagle3": "eagle3",
}
DRAFTERS = ("auto", *dict.fromkeys(DRAFTER_FOR_ARCHITECTURE.values()))
DRAFT_COMPILE = ("auto", "on", "off")
DRAFT_VOCAB_AUTO = "auto"
DRAFT_WEIGHTS = ("auto", "checkpoint", "int8")


class MineDraftConfigError(ValueError):
    """A bad MineDraft setting; the message is one line naming the flag."""


@dataclasses.dataclass(frozen=True)
class MineDraftConfig:
    mode: str = "auto"
    draft_device: str = "cpu"
    # CPU cores of the drafter's thread ("auto": the last allowed core); the
    # scheduler thread, which verifies, keeps the others.
    draft_cores: str = "auto"
    drafter: str = "auto"
    # "auto": drafts per request chosen every step in 0..--speculative-num-steps
    # from measured costs (0: plain decoding); "fixed": always that many.
    k: str = "auto"
    # Largest number of tokens one request may hold in the drafter's KV cache;
    # 0 means the target's context length, at most 4096.
    draft_max_len: int = 0
    # How the drafter's forward steps run: "on": CUDA graphs on a GPU,
    # torch.compile on CPU; "off": eager; "auto": graphs on a GPU, eager on
    # CPU (drafters.step_mode says why).
    draft_compile: str = "auto"
    # The token ids a standalone drafter chooses among: "auto", or the first
    # N ("0": all of them). drafters/draft_vocab.py says why and how. Off by
    # default: a server gained 1.06x from it with the drafter in bfloat16 (1
    # request), not yet measured beside the int8 weights (docs/benchmarks.md).
    draft_vocab: str = "0"
    # A standalone drafter's linear layers and LM head: "int8" (a scale per
    # output row, weight-only; drafters/int8.py says why), "checkpoint" (as
    # loaded), "auto": int8 on a CPU drafter, as loaded on a GPU (PyTorch's
    # int8 kernel is measured on CPU only).
    draft_weights: str = "auto"
    # A draft chain ends after its first token the drafter gave a probability
    # below this (0: every chain runs to k); needs k auto (verifies vary in
    # width). Off by default (docs/benchmarks.md, "Draft stop").
    draft_stop: float = 0.0
    # TETRIS: draft k + tetris_extra tokens per request, verify the k x (batch
    # size) most promising (request, position) pairs.
    tetris: bool = False
    tetris_extra: int = 2
    # Logs a timestamped draft/verify interval per step (used by the
    # concurrency test and the overlap timeline).
    trace_file: str | None = None

    def validate(self) -> MineDraftConfig:
        if self.mode not in MODES:
            raise MineDraftConfigError(f"--minedraft-mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.drafter not in DRAFTERS:
            raise MineDraftConfigError(f"--minedraft-drafter {self.drafter!r} is not one of {', '.join(DRAFTERS)}")
        if self.draft_compile not in DRAFT_COMPILE:
            raise MineDraftConfigError(
                f"--minedraft-draft-compile {self.draft_compile!r} is not one of {', '.join(DRAFT_COMPILE)}"
            )
        if self.k not in K_POLICIES:
            raise MineDraftConfigError(f"--minedraft-k {self.k!r} is not one of {', '.join(K_POLICIES)}")
        if self.k == "auto" and self.tetris:
            raise MineDraftConfigError(
                "--minedraft-k auto does not combine with --minedraft-tetris (TETRIS spends a fixed "
                "budget of k drafts per request); use --minedraft-k fixed"
            )
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise MineDraftConfigError(
                f"--minedraft-draft-weights {self.draft_weights!r} is not one of {', '.join(DRAFT_WEIGHTS)}"
            )
        if self.draft_weights == "int8" and self.draft_device != "cpu":
            raise MineDraftConfigError(
                f"--minedraft-draft-weights int8 needs --minedraft-draft-device cpu (got {self.draft_device!r}): "
                "its kernel is measured on CPU only; use checkpoint or auto"
            )
        validate_device(self.draft_device)
        validate_cores(self.draft_cores, self.draft_device)
        if self.tetris_extra < 0:
            raise MineDraftConfigError(f"--minedraft-tetris-extra must be >= 0, got {self.tetris_extra}")
        if self.draft_vocab != DRAFT_VOCAB_AUTO and not self.draft_vocab.isdigit():
            raise MineDraftConfigError(
                f"--minedraft-draft-vocab {self.draft_vocab!r} is not 'auto' or a number of token ids (0: all)"
            )
        if not 0 <= self.draft_stop < 1:
            raise MineDraftConfigError(f"--minedraft-draft-stop must be in [0, 1), got {self.draft_stop}")
        if self.draft_stop and self.k != "auto":
            raise MineDraftConfigError(
                "--minedraft-draft-stop ends chains early, so each verify has its own width, as under "
                "--minedraft-k auto; it needs --minedraft-k auto"
            )
        if self.draft_max_len < 0:
            raise MineDraftConfigError(f"--minedraft-draft-max-len must be >= 0, got {self.draft_max_len}")
        return self

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> MineDraftConfig:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return cls().validate()
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MineDraftConfigError(f"{ENV_VAR} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MineDraftConfigError(f"{ENV_VAR} has unknown keys {unknown}; known: {sorted(known)}")
        if "k" not in values and values.get("tetris"):
            values["k"] = "fixed"
        return cls(**values).validate()


def validate_device(device: str, server_args=None) -> None:
    """Fail early for a device this machine does not have, and, given the
    server arguments, for one the target's TP ranks hold."""
    from minedraft_sglang import devices

    try:
        if server_args is None:
            devices.place_drafter(device, None)
        else:
            devices.check_server_placement(device, server_args)
    except devices.DeviceError as e:
        raise MineDraftConfigError(str(e)) from None


# Attention backends whose TARGET_VERIFY takes each verify's width from the
# batch's spec input (docs/gpu.md, "Attention backends"): flashinfer
# (``generate_attn_arg_prefill``), triton (``num_tokens_per_req``) and
# intel_amx (``draft_token_num``). fa3 sizes its verify metadata from the
# startup --speculative-num-draft-tokens; the rest are unread.
VARIABLE_WIDTH_BACKENDS = ("flashinfer", "triton", "intel_amx")
BACKEND_HINT = "pass --attention-backend flashinfer (or triton), or --minedraft-k fixed"


def verify_backend(server_args) -> str | None:
    """The attention backend a TARGET_VERIFY runs on, None when none is named:
    the prefill half unless ``--speculative-attention-mode decode``
    (SGLang's ``HybridAttnBackend._select_backend``), each half falling back
    to ``--attention-backend``."""
    mode = getattr(server_args, "speculative_attention_mode", None) or "prefill"
    half = "decode_attention_backend" if mode == "decode" else "prefill_attention_backend"
    return getattr(server_args, half, None) or getattr(server_args, "attention_backend", None)


def fixed_width_default_backend(platform) -> str | None:
    """SGLang's own attention backend where none is named and it takes the
    startup width: fa3 on Hopper with CUDA >= 12.3, trtllm_mha on SM100
    (``get_default_attn_backend``, from the same facts of SGLang's
    ``platform``, ``runtime_context.get_platform()``: the caller passes it,
    so this file needs no SGLang); None where its default reads each verify's
    width (flashinfer, triton) or the target runs on the CPU."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        return None
    if platform.is_hopper_with_cuda_12_3:
        return "fa3"
    if platform.is_sm100:
        return "trtllm_mha"
    return None


def declare_verify_backend(server_args, k_policy: str, platform) -> str | None:
    """The stock command line under ``--minedraft-k auto`` with no backend
    named for the verify, on a GPU where SGLang's default would take the
    startup width: names flashinfer (triton without it) as
    ``--attention-backend`` on the unresolved ``server_args`` and returns it;
    None where nothing needs naming. A half the user named stays theirs."""
    if k_policy != "auto" or verify_backend(server_args) is not None or fixed_width_default_backend(platform) is None:
        return None
    server_args.attention_backend = "flashinfer" if platform.has_flashinfer else "triton"
    return server_args.attention_backend


def validate_verify_backend(server_args, k_policy: str, platform) -> None:
    """``--minedraft-k auto`` verifies windows narrower than the startup
    --speculative-num-draft-tokens (k chosen per step, drafts made at another
    k verified on their common prefix); refuse a verify backend
    (``verify_backend``) that cannot read them. Fixed k verifies that one
    width (and k = 0, a decode on the decode half, is taken only by auto)."""
    if k_policy != "auto":
        return
    backend = verify_backend(server_args)
    if backend is None:
        default = fixed_width_default_backend(platform)
        if default is not None:
            raise MineDraftConfigError(
                f"--minedraft-k auto: SGLang's default attention backend on this GPU is {default}, which reads "
                f"a verify's width from --speculative-num-draft-tokens, not from the step; {BACKEND_HINT}"
            )
        return
    if backend not in VARIABLE_WIDTH_BACKENDS:
        raise MineDraftConfigError(
            f"--minedraft-k auto with attention backend {backend} for the verify: it does not read the width "
            f"of each step (supported: {', '.join(VARIABLE_WIDTH_BACKENDS)}); {BACKEND_HINT}"
        )


def validate_cores(draft_cores: str, draft_device: str) -> None:
    """Fail early for cores this process may not use (the scheduler inherits
    the launcher's CPU set)."""
    from minedraft_sglang.cpu import affinity

    if draft_cores == affinity.AUTO:
        return
    if draft_device != "cpu":
        raise MineDraftConfigError(
            f"{affinity.FLAG} applies to a CPU drafter; --minedraft-draft-device is {draft_device!r}"
        )
    try:
        affinity.split_cores(os.sched_getaffinity(0), draft_cores)
    except affinity.CoreError as e:
        raise MineDraftConfigError(str(e)) from None


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "MineDraft (batch parallel speculative decoding)",
        "Used with --speculative-algorithm MINEDRAFT and --speculative-draft-model-path. "
        f"For sgl.Engine, set these as JSON in ${ENV_VAR} instead.",
    )
    group.add_argument(
        "--minedraft-mode",
        choices=MODES,
        default=MineDraftConfig.mode,
        help="psd: two sub-batches, drafting one while the target verifies the other "
        "(sequential when one is empty). auto: psd, and with fewer than two running "
        "requests draft ahead (PEARL) while the target verifies. sequential: draft "
        "then verify the whole batch (standard speculative decoding).",
    )
    group.add_argument(
        "--minedraft-draft-device",
        default=MineDraftConfig.draft_device,
        help="Device the drafter runs on: 'cpu' (its own core), 'cuda:N' (a GPU other than "
        "the target's: the two-device layout PSD is built for) or 'cuda' (the target's GPU, "
        "on its own CUDA stream).",
    )
    group.add_argument(
        "--minedraft-draft-cores",
        default=MineDraftConfig.draft_cores,
        help="CPU drafter only: the cores its thread runs on, e.g. '1' or '2-3' (auto: the "
        "last core the server may use). The scheduler thread, which runs the target, keeps "
        "the other cores, so draft and verify run in parallel. /server_info reports both sets.",
    )
    group.add_argument(
        "--minedraft-drafter",
        choices=DRAFTERS,
        default=MineDraftConfig.drafter,
        help="Drafter kind. auto: follow the draft model's architecture (a causal LM "
        "runs as a standalone drafter, LlamaForCausalLMEagle as eagle, "
        "LlamaForCausalLMEagle3 as eagle3; EAGLE heads read the target's hidden states).",
    )
    group.add_argument(
        "--minedraft-k",
        choices=K_POLICIES,
        default=None,
        help="auto: before every step choose the drafts per request in 0..k, k = "
        "--speculative-num-steps (default 4), from the measured draft and verify costs and "
        "acceptance; 0 is a plain decode step, taken where drafting does not pay. fixed: "
        "always k. Default: fixed when --speculative-num-steps or --minedraft-tetris is "
        "given, auto otherwise.",
    )
    group.add_argument(
        "--minedraft-draft-max-len",
        type=int,
        default=MineDraftConfig.draft_max_len,
        help="Tokens per request in the drafter's KV cache (0: the target's context "
        "length, at most 4096). Longer requests are verified without drafts.",
    )
    group.add_argument(
        "--minedraft-draft-vocab",
        default=MineDraftConfig.draft_vocab,
        help="Standalone drafter: N proposes only token ids below N, so each draft step reads N rows "
        "of the draft model's LM head instead of all (with Qwen2.5's 151,936-token vocabulary the "
        "head is over a quarter of a 0.5B model); a target token at or above N is never drafted. "
        "0 (default): the whole vocabulary. auto: the first 65,536 ids while under 5%% of the tokens the "
        "drafter sees lie beyond them, the whole vocabulary while more do (eager draft steps only; "
        "graphs and compiled steps draft among all). Output is exact either way.",
    )
    group.add_argument(
        "--minedraft-draft-weights",
        choices=DRAFT_WEIGHTS,
        default=MineDraftConfig.draft_weights,
        help="Standalone drafter: int8 stores its linear layers and LM head as int8 with a scale per "
        "output row (weight-only; activations, attention and the embedding keep the drafter's dtype), "
        "so each draft step streams half the bytes; checkpoint keeps the weights as loaded; auto "
        "(default): int8 on a CPU drafter, as loaded on a GPU. Drafts may differ a little, the output "
        "never: the target verifies every draft.",
    )
    group.add_argument(
        "--minedraft-draft-stop",
        type=float,
        default=MineDraftConfig.draft_stop,
        help="Standalone drafter, --minedraft-k auto: end a request's draft chain after the first token the "
        "drafter gives a probability below this (that token is still verified), so drafting stops where a "
        "rejection is likely and the chain runs on to k (--speculative-num-steps) where the drafter is sure. "
        "0 (default): every chain drafts k. Output is exact either way. Off by default: it did not beat "
        "the defaults in servers side by side (docs/benchmarks.md, 2026-12-06).",
    )
    group.add_argument(
        "--minedraft-draft-compile",
        choices=DRAFT_COMPILE,
        default=MineDraftConfig.draft_compile,
        help="How the drafter's forward steps run. on: replayed from CUDA graphs (one per batch-size "
        "bucket) on a GPU, torch.compile on CPU (minutes of compilation per new shape); off: eager "
        "PyTorch; auto: graphs on a GPU, eager on CPU.",
    )
    group.add_argument(
        "--minedraft-tetris",
        action="store_true",
        help="TETRIS: draft k + N tokens per request (k = --speculative-num-steps) and "
        "verify the k x sub-batch-size (request, position) pairs with the highest "
        "cumulative draft probability, a different number per request.",
    )
    group.add_argument(
        "--minedraft-tetris-extra",
        type=int,
        default=MineDraftConfig.tetris_extra,
        help="N, the extra draft tokens per request TETRIS chooses from.",
    )
    group.add_argument(
        "--minedraft-trace-file",
        default=None,
        help="Append one JSON line per engine step with draft/verify timestamps.",
    )


def _default_k(argv: list[str], tetris: bool) -> str:
    # A k the user chose stays what they chose.
    fixed = tetris or any(a == "--speculative-num-steps" or a.startswith("--speculative-num-steps=") for a in argv)
    return "fixed" if fixed else "auto"


def config_from_argv(argv: list[str]) -> MineDraftConfig:
    parser = argparse.ArgumentParser(add_help=False)
    add_cli_args(parser)
    args, _ = parser.parse_known_args(argv)
    return MineDraftConfig(
        mode=args.minedraft_mode,
        draft_device=args.minedraft_draft_device,
        draft_cores=args.minedraft_draft_cores,
        k=args.minedraft_k or _default_k(argv, args.minedraft_tetris),
        drafter=args.minedraft_drafter,
        draft_max_len=args.minedraft_draft_max_len,
        draft_compile=args.minedraft_draft_compile,
        draft_vocab=args.minedraft_draft_vocab,
        draft_weights=args.minedraft_draft_weights,
        draft_stop=args.minedraft_draft_stop,
        tetris=args.minedraft_tetris,
        tetris_extra=args.minedraft_tetris_extra,
        trace_file=args.minedraft_trace_file,
    ).validate()
