"""SGLang plugin entry point (group ``sglang.srt.plugins``).

``register()`` runs in every SGLang process (launcher, scheduler, detokenizer),
so everything it does must be idempotent and cheap: it registers the
``MINEDRAFT`` speculative algorithm, the hooks that add ``--minedraft-*``
flags to the stock ``sglang.launch_server`` / ``sglang serve`` command line,
and the behaviour hooks, from the ``AROUND_HOOKS`` table of each file that
holds some.
"""

from __future__ import annotations

import logging
import os
import sys

from minedraft_sglang import devices, door, graphs, hooks, model_files, verify
from minedraft_sglang.config import (
    ALGORITHM_NAME,
    DRAFT_VOCAB_AUTO,
    DRAFTER_FOR_ARCHITECTURE,
    ENV_VAR,
    MineDraftConfig,
    MineDraftConfigError,
    add_cli_args,
    config_from_argv,
    declare_verify_backend,
    validate_device,
    validate_verify_backend,
)
from minedraft_sglang.cpu import hooks as cpu_hooks

logger = logging.getLogger(__name__)

_registered = False

# The verify window is k drafts plus the bonus token; k is
# --speculative-num-steps (SGLang's own flag), 4 when not given.
DEFAULT_NUM_STEPS = 4


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    SpeculativeAlgorithm.register(
        ALGORITHM_NAME,
        supports_overlap=False,
        validate_server_args=validate_server_args,
        spec_class=_spec_class(),
    )(_worker_factory)

    # One table per file, beside the hooks it names.
    for table in HOOK_TABLES:
        for target, hook in table.items():
            HookRegistry.register(target, hook, HookType.AROUND)


def _worker_factory(server_args):
    from minedraft_sglang.worker import MineDraftWorker

    return MineDraftWorker


def _spec_class():
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class MineDraftAlgo(CustomSpecAlgo):
        """The algorithm record the scheduler queries.

        SGLang 0.5.23's ``CustomSpecAlgo`` lacks four methods the scheduler calls
        on every algorithm; they are defined here with the behaviour of a
        drafter that carries no target hidden states and never runs under the
        overlap scheduler.
        """

        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def get_platform_worker_cls(self):
            return None

        def create_future_map(
            self,
            device,
            req_to_token_pool,
            needs_cpu_seq_lens: bool = True,
            needs_confidence_relay: bool = False,
        ):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def handle_server_args(self, server_args) -> None:
            handle_server_args(server_args)
            leave_room_for_the_drafter(server_args)

    return MineDraftAlgo


def handle_server_args(sa) -> None:
    """Defaults MINEDRAFT needs; ``sa`` is SGLang's recording stand-in."""
    # Our worker drives drafting itself (on its own device and thread); the
    # overlap scheduler's one-iteration lag would hide the sub-batch results
    # from the next step's drafting.
    sa.disable_overlap_schedule = True
    sa.enable_mixed_chunk = False
    if sa.speculative_eagle_topk not in (None, 1):
        raise MineDraftConfigError("--speculative-eagle-topk must be 1 with MINEDRAFT (chain drafts)")
    sa.speculative_eagle_topk = 1
    if sa.speculative_num_steps is None:
        sa.speculative_num_steps = DEFAULT_NUM_STEPS
    if sa.speculative_num_steps < 1:
        raise MineDraftConfigError("--speculative-num-steps must be >= 1 with MINEDRAFT")
    window = sa.speculative_num_steps + 1
    if sa.speculative_num_draft_tokens not in (None, window):
        raise MineDraftConfigError(
            f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 "
            f"({window}) with MINEDRAFT, got {sa.speculative_num_draft_tokens}"
        )
    config = MineDraftConfig.from_env()
    if config.tetris:
        # SGLang sizes the verify window and KV reserve for every draft slot;
        # the worker recovers k as num_steps - tetris_extra.
        sa.speculative_num_steps += config.tetris_extra
        window = sa.speculative_num_steps + 1
    sa.speculative_num_draft_tokens = window


def leave_room_for_the_drafter(sa) -> None:
    """A drafter on the target's GPU: lower SGLang's resolved
    ``--mem-fraction-static`` by the drafter's KV cache, which lives outside
    SGLang's pool and is allocated after SGLang sized it from that fraction
    (``devices.shared_gpu_reserve``); otherwise the cache takes the headroom
    SGLang kept for the target's activations and graphs, and the server runs
    out of memory at startup or at its first long prefill. A fraction the
    user gave stays theirs (``python -m minedraft_sglang.devices`` prints
    one that leaves the room). ``sa``: SGLang's resolving stand-in, which
    runs this after its own memory settings."""
    config = MineDraftConfig.from_env()
    if not devices.target_device(sa).startswith("cuda"):
        return
    placement = devices.place_drafter(
        config.draft_device, sa.base_gpu_id, tp_size=sa.tp_size, gpu_id_step=sa.gpu_id_step, nnodes=sa.nnodes
    )
    if not placement.shares_target_gpu:
        return
    draft_config = model_files.draft_config(
        sa.speculative_draft_model_path, getattr(sa, "speculative_draft_model_revision", None)
    )
    reserve = devices.shared_gpu_reserve(
        draft_config,
        max_requests=devices.drafter_slots(sa.max_running_requests),
        max_len=devices.drafter_max_len(
            config.draft_max_len, sa.context_length or _target_context_len(sa), sa.speculative_num_draft_tokens
        ),
        elem_bytes=devices.dtype_bytes(draft_config),
    )
    gpu = devices.gpu_bytes(sa.base_gpu_id)
    given = (getattr(sa, "_raw_input", None) or {}).get("mem_fraction_static")
    if given is not None:
        logger.info(
            "MineDraft: the drafter's KV cache takes %.1f GiB of GPU %d outside SGLang's pool; "
            "--mem-fraction-static %s is yours to leave it room",
            reserve / 2**30,
            sa.base_gpu_id,
            given,
        )
        return
    resolved = sa.mem_fraction_static
    try:
        sa.mem_fraction_static = devices.target_mem_fraction(reserve, gpu, base_fraction=resolved)
    except devices.DeviceError as e:
        raise MineDraftConfigError(str(e)) from None
    logger.info(
        "MineDraft: the drafter shares GPU %d; --mem-fraction-static %.3f -> %.3f, leaving its KV cache "
        "(%.1f GiB, outside SGLang's pool) room",
        sa.base_gpu_id,
        resolved,
        sa.mem_fraction_static,
        reserve / 2**30,
    )


def _target_context_len(sa) -> int | None:
    """The target checkpoint's context length, None where it cannot be read
    here (the drafter's cache then takes the longest it may)."""
    try:
        folder = model_files.local_dir(sa.model_path, "--model-path", revision=getattr(sa, "revision", None))
        return model_files.read_config(folder, sa.model_path, "--model-path").get("max_position_embeddings")
    except MineDraftConfigError:
        return None


def validate_server_args(sa) -> None:
    """Startup checks that need the model paths; each failure is one line."""
    config = MineDraftConfig.from_env()
    _check_parallelism(sa)
    validate_device(config.draft_device, sa)
    validate_verify_backend(sa, config.k, _platform())
    draft = sa.speculative_draft_model_path
    if not draft:
        raise MineDraftConfigError("--speculative-draft-model-path is required with --speculative-algorithm MINEDRAFT")
    # A folder or a hub id, resolved as SGLang's loader resolves it (model_files.py).
    draft_dir = model_files.local_dir(
        draft, "--speculative-draft-model-path", revision=getattr(sa, "speculative_draft_model_revision", None)
    )
    draft_config = model_files.read_config(draft_dir, draft, "--speculative-draft-model-path")
    _check_drafter_kind(draft, draft_config, config.drafter)
    standalone = DRAFTER_FOR_ARCHITECTURE[draft_config["architectures"][0]] == "standalone"
    if config.draft_vocab not in (DRAFT_VOCAB_AUTO, "0") and not standalone:
        raise MineDraftConfigError(
            "--minedraft-draft-vocab applies to a standalone draft model; an EAGLE head drafts with "
            "its own LM head (an EAGLE-3 head with its own draft vocabulary)"
        )
    if config.draft_weights == "int8" and not standalone:
        raise MineDraftConfigError(
            "--minedraft-draft-weights int8 applies to a standalone draft model; an EAGLE head is one layer "
            "and drafts with the target's or its own LM head as loaded"
        )
    if config.draft_stop and not standalone:
        raise MineDraftConfigError("--minedraft-draft-stop applies to a standalone draft model, not an EAGLE head")
    target = sa.model_path
    if os.path.isfile(target) or "://" in target:
        return  # a GGUF file or an object-store URL: SGLang resolves those itself
    try:
        target_dir = model_files.local_dir(target, "--model-path", revision=getattr(sa, "revision", None))
    except MineDraftConfigError:
        return  # not resolvable here; SGLang's own loading reports it
    target_config = model_files.read_config(target_dir, target, "--model-path")
    model_files.check_vocabularies(
        draft_dir, draft, target_dir, target, draft_config=draft_config, target_config=target_config
    )
    _check_eagle3_layers(draft, draft_config, target_config)


def _check_eagle3_layers(path: str, draft_config: dict, target_config: dict) -> None:
    """An EAGLE-3 head whose ``fc`` reads more target layer outputs than the
    target returns (SGLang's default layers on a small target, a repeated or
    the last layer), refused here in one line rather than in every scheduler."""
    layers = target_config.get("text_config", target_config).get("num_hidden_layers")
    if draft_config["architectures"][0] != "LlamaForCausalLMEagle3" or layers is None:
        return
    from minedraft_sglang.drafters import eagle

    try:
        eagle.target_capture(draft_config, layers)
    except ValueError as e:
        raise MineDraftConfigError(f"--speculative-draft-model-path {path!r}: {e}") from None


def _check_parallelism(sa) -> None:
    """Layouts the worker does not support, refused before any model loads
    (otherwise they fail later, inside a scheduler, with a traceback)."""
    if sa.pp_size > 1:
        raise MineDraftConfigError(
            f"--pp-size {sa.pp_size}: MINEDRAFT does not run under pipeline parallelism (its drafter "
            "serves one scheduler's whole batch)"
        )
    # --enable-dp-attention is the deprecated spelling; it becomes
    # attn_dp_size only when SGLang resolves the arguments, after this check.
    if sa.attn_dp_size > 1 or getattr(sa, "enable_dp_attention", False):
        raise MineDraftConfigError(
            "--attn-dp-size / --enable-dp-attention: MINEDRAFT does not run with data-parallel attention "
            "(its sub-batches are one scheduler's batch)"
        )


def _check_drafter_kind(path: str, config: dict, drafter: str) -> None:
    arch = (config.get("architectures") or ["(none)"])[0]
    kind = DRAFTER_FOR_ARCHITECTURE.get(arch)
    if kind is None:
        raise MineDraftConfigError(
            f"--speculative-draft-model-path {path!r}: architecture {arch} is not supported "
            f"(supported: {', '.join(DRAFTER_FOR_ARCHITECTURE)})"
        )
    if drafter not in ("auto", kind):
        raise MineDraftConfigError(
            f"--minedraft-drafter {drafter} cannot run {path!r}: its architecture {arch} "
            f"needs --minedraft-drafter {kind} (or auto)"
        )


def _platform():
    """SGLang's facts of this machine (its GPU, CUDA, FlashInfer)."""
    from sglang.srt.runtime_context import get_platform

    return get_platform()


def _add_cli_args_around(original, parser):
    original(parser)
    add_cli_args(parser)


def _prepare_server_args_around(original, argv):
    try:
        config = config_from_argv(argv)
        if any(a.startswith("--minedraft-") for a in argv) or ENV_VAR not in os.environ:
            # Spawned scheduler processes inherit the environment.
            os.environ[ENV_VAR] = config.to_env()
        server_args = original(argv)
        if (server_args.speculative_algorithm or "").upper() == ALGORITHM_NAME:
            named = declare_verify_backend(server_args, config.k, _platform())
            if named is not None:
                logger.info(
                    "MineDraft: --minedraft-k auto verifies a width per step, which SGLang's default attention "
                    "backend on this GPU does not read; using --attention-backend %s",
                    named,
                )
            # SGLang runs these checks again while resolving the arguments,
            # where a failure surfaces as a traceback; here it is one line.
            validate_server_args(server_args)
            handle_server_args(_Fields(server_args))
        return server_args
    except MineDraftConfigError as e:
        sys.exit(f"error: {e}")


# The --minedraft-* flags on the stock command line.
AROUND_HOOKS = {
    "sglang.srt.server_args.ServerArgs.add_cli_args": _add_cli_args_around,
    "sglang.srt.server_args.prepare_server_args": _prepare_server_args_around,
}
# One table per file, beside the hooks it names.
HOOK_TABLES = (
    AROUND_HOOKS,
    door.AROUND_HOOKS,
    verify.AROUND_HOOKS,
    hooks.AROUND_HOOKS,
    graphs.AROUND_HOOKS,
    cpu_hooks.AROUND_HOOKS,
)


class _Fields:
    """A writable copy of the fields ``handle_server_args`` touches."""

    def __init__(self, server_args):
        for name in (
            "speculative_eagle_topk",
            "speculative_num_steps",
            "speculative_num_draft_tokens",
        ):
            setattr(self, name, getattr(server_args, name))
