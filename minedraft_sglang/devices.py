"""Where the drafter runs, and how much memory it takes there.

Pure functions (torch is imported only to count GPUs), so startup validation,
the launch scripts and the tests share one set of rules:

* ``--minedraft-draft-device`` is ``cpu``, ``cuda`` (the target's own GPU) or
  ``cuda:N``. A drafter on another GPU is the two-device layout PSD was
  designed for; one on the target's GPU runs on its own CUDA stream and the
  target must leave it memory.
* Under ``--tp N`` the drafter lives with TP rank 0 (``tp_sync.py``): ``cuda``
  is rank 0's GPU, and the other ranks' GPUs are refused.
* The drafter's KV cache lives outside SGLang's memory pool, so on a shared
  GPU ``--mem-fraction-static`` has to shrink by its size (its weights SGLang
  counts itself: ``shared_gpu_reserve``).

``python -m minedraft_sglang.devices --draft-model-path DIR`` prints the
``--mem-fraction-static`` to give a target that shares its GPU with that
drafter (``launch/serve_gpu_single.sh`` uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FLAG = "--minedraft-draft-device"

# SGLang's own choice on an 80 GB GPU is about 0.87 (all but ~10 GiB of
# activation headroom); a little lower leaves room for the drafter's
# activations and CUDA context, which no estimate below counts.
DEFAULT_BASE_FRACTION = 0.85
# Below this the target's KV pool is too small to be worth serving.
MIN_TARGET_FRACTION = 0.2
# SGLang's request cap defaults to thousands; dense per-request draft KV for
# all of them would not fit, so the drafter holds at most this many requests
# (those beyond it are verified without drafts).
MAX_DRAFT_REQUESTS = 256
# Drafts need recent context, not the whole window; requests longer than this
# are verified without drafts unless --minedraft-draft-max-len says more.
DEFAULT_DRAFT_MAX_LEN = 4096

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class DeviceError(ValueError):
    """A bad drafter placement; the message is one line naming the flag."""


@dataclass(frozen=True)
class DraftDevice:
    kind: str  # "cpu" or "cuda"
    index: int | None  # None for "cpu" and for a bare "cuda" (the target's GPU)


@dataclass(frozen=True)
class Placement:
    device: str  # torch device string the drafter uses, e.g. "cuda:1"
    shares_target_gpu: bool  # same GPU as the target: own stream, and the target leaves it memory

    @property
    def two_device(self) -> bool:
        return not self.shares_target_gpu and self.device != "cpu"


def parse_draft_device(text: str) -> DraftDevice:
    m = _DEVICE_RE.match(text)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise DeviceError(f"{FLAG} {text!r} is not 'cpu', 'cuda' or 'cuda:N'")
    index = None if m.group(2) is None else int(m.group(2))
    return DraftDevice(m.group(1), index)


def place_drafter(
    text: str,
    target_gpu: int | None,
    device_count: int | None = None,
    *,
    tp_size: int = 1,
    gpu_id_step: int = 1,
    nnodes: int = 1,
) -> Placement:
    """``target_gpu`` is the target's CUDA index (under ``--tp`` TP rank 0's,
    the process that owns the drafter), None when the target runs on CPU;
    ``device_count`` defaults to this machine's. The other TP ranks' GPUs
    (``tp_gpus``) are refused: 'cuda' shares rank 0's, the one the user can ask
    for; another rank's GPU holds a process that sized its KV pool without the
    drafter, and every TP step waits for the slowest rank."""
    dev = parse_draft_device(text)
    if dev.kind == "cpu":
        return Placement("cpu", False)
    if device_count is None:
        device_count = cuda_device_count()
    if device_count == 0:
        raise DeviceError(f"{FLAG} {text!r}: this machine has no CUDA device")
    index = dev.index if dev.index is not None else (target_gpu or 0)
    if index >= device_count:
        plural = "s" if device_count != 1 else ""
        raise DeviceError(f"{FLAG} {text!r}: no such device (this machine has {device_count} CUDA device{plural})")
    if target_gpu is not None:
        gpus = tp_gpus(target_gpu, tp_size, gpu_id_step, nnodes)
        if index in gpus[1:]:
            free = [i for i in range(device_count) if i not in gpus]
            hint = f"cuda:{free[0]}" if free else "cpu"
            raise DeviceError(
                f"{FLAG} {text!r}: GPU {index} runs TP rank {gpus.index(index)} of the target (--tp {tp_size} "
                f"on GPUs {','.join(map(str, gpus))}); the drafter lives with TP rank 0: give it a device of "
                f"its own ({hint}) or share rank 0's GPU with 'cuda'"
            )
    return Placement(f"cuda:{index}", index == target_gpu)


def tp_gpus(rank0_gpu: int, tp_size: int, gpu_id_step: int = 1, nnodes: int = 1) -> list[int]:
    """The CUDA indices of the target's TP ranks on rank 0's node, rank 0's
    first, as SGLang's launcher assigns them (``gpu_id = base_gpu_id +
    (tp_rank % tp_size_per_node) * gpu_id_step``, ``entrypoints/engine.py``)."""
    per_node = max(tp_size // nnodes, 1)
    return [rank0_gpu + r * gpu_id_step for r in range(per_node)]


def check_server_placement(text: str, server_args, device_count: int | None = None) -> None:
    """Raises DeviceError for the placement TP rank 0's worker would refuse,
    from the server arguments, before any model loads (the worker's refusal
    surfaces inside a scheduler, with a traceback)."""
    device = target_device(server_args)
    place_drafter(
        text,
        server_args.base_gpu_id if device == "cuda" else None,
        device_count,
        tp_size=server_args.tp_size,
        gpu_id_step=server_args.gpu_id_step,
        nnodes=server_args.nnodes,
    )


def target_device(server_args) -> str:
    """The target's device type from the server arguments, before SGLang
    resolves an absent ``--device``: the CPU under SGLANG_USE_CPU_ENGINE=1,
    else the GPU."""
    if server_args.device is not None:
        return str(server_args.device)
    return "cpu" if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" else "cuda"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------- memory


def _text_config(hf_config: dict) -> dict:
    # Multimodal configs (Gemma 3, Llama 4, ...) nest the language model.
    return hf_config.get("text_config", hf_config)


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def dtype_bytes(hf_config: dict, default: int = 2) -> int:
    """Bytes per weight/KV element from the config's dtype (transformers 5
    writes ``dtype``, older versions ``torch_dtype``)."""
    cfg = _text_config(hf_config)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype")
    return _DTYPE_BYTES.get(str(name).removeprefix("torch."), default)


def kv_bytes_per_token(hf_config: dict, elem_bytes: int) -> int:
    """K and V of one token across all layers."""
    cfg = _text_config(hf_config)
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * kv_heads * _head_dim(cfg) * elem_bytes


def param_count(hf_config: dict) -> int:
    """Parameters of a Llama-style decoder (attention, SwiGLU MLP, RMSNorms,
    embeddings, LM head unless tied). Exact for Llama; biases (Qwen2's qkv)
    are left out, well under 0.1% of any real model."""
    cfg = _text_config(hf_config)
    hidden, heads, d = cfg["hidden_size"], cfg["num_attention_heads"], _head_dim(cfg)
    kv_heads = cfg.get("num_key_value_heads") or heads
    attn = hidden * heads * d * 2 + hidden * kv_heads * d * 2
    mlp = 3 * hidden * cfg["intermediate_size"]
    layer = attn + mlp + 2 * hidden
    embed = cfg["vocab_size"] * hidden
    lm_head = 0 if cfg.get("tie_word_embeddings", hf_config.get("tie_word_embeddings", False)) else embed
    return cfg["num_hidden_layers"] * layer + embed + lm_head + hidden


def drafter_slots(max_running_requests: int | None) -> int:
    """Requests the drafter's KV cache holds: SGLang's cap (None: not yet
    known, so the most), at most ``MAX_DRAFT_REQUESTS``."""
    return min(max_running_requests or MAX_DRAFT_REQUESTS, MAX_DRAFT_REQUESTS)


def drafter_max_len(draft_max_len: int, context_len: int | None, window: int) -> int:
    """Tokens per request in the drafter's KV cache: ``--minedraft-draft-max-len``,
    else the target's context (None: not known here, so the most) up to
    ``DEFAULT_DRAFT_MAX_LEN``, plus a verify ``window``."""
    return draft_max_len or min(context_len or DEFAULT_DRAFT_MAX_LEN, DEFAULT_DRAFT_MAX_LEN) + window


def drafter_kv_bytes(hf_config: dict, *, max_requests: int, max_len: int, elem_bytes: int) -> int:
    """The drafter's KV cache: ``max_requests`` slots of ``max_len`` tokens
    and one scratch slot (``drafters/kv_cache.py``; allocated whole at
    startup on a GPU)."""
    return kv_bytes_per_token(hf_config, elem_bytes) * max_len * (max_requests + 1)


def drafter_bytes(hf_config: dict, *, max_requests: int, max_len: int, elem_bytes: int) -> int:
    """Weights plus the drafter's KV cache: all it takes on its device."""
    kv = drafter_kv_bytes(hf_config, max_requests=max_requests, max_len=max_len, elem_bytes=elem_bytes)
    return param_count(hf_config) * elem_bytes + kv


def shared_gpu_reserve(hf_config: dict, *, max_requests: int, max_len: int, elem_bytes: int) -> int:
    """What ``--mem-fraction-static`` must leave a drafter on the target's
    GPU: its KV cache only. Its weights load while the worker is built, before
    SGLang sizes the target's KV pool (``Scheduler.__init__``: speculative
    worker, then ``init_memory_pools``, which sizes the pool from the memory
    free then), so SGLang counts them already; counting them here too took
    them off the target twice (issue 21). The cache is allocated after the
    pool, in ``alloc_memory_pool``, so SGLang cannot see it."""
    return drafter_kv_bytes(hf_config, max_requests=max_requests, max_len=max_len, elem_bytes=elem_bytes)


def target_mem_fraction(drafter_total: int, gpu_bytes: int, base_fraction: float = DEFAULT_BASE_FRACTION) -> float:
    """``--mem-fraction-static`` for a target sharing its GPU with a drafter
    that needs ``drafter_total`` bytes there."""
    fraction = base_fraction - drafter_total / gpu_bytes
    if fraction < MIN_TARGET_FRACTION:
        raise DeviceError(
            f"{FLAG}: the drafter needs {drafter_total / 2**30:.1f} GiB of the target GPU's "
            f"{gpu_bytes / 2**30:.1f} GiB, leaving the target {max(fraction, 0):.2f} of it; lower "
            "--minedraft-draft-max-len or --max-running-requests, or put the drafter on another GPU"
        )
    return round(fraction, 3)


def gpu_bytes(index: int) -> int:
    """GPU ``index``'s memory."""
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("no CUDA device to measure; pass --gpu-bytes")
    return torch.cuda.get_device_properties(index).total_memory


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m minedraft_sglang.devices",
        description="Print --mem-fraction-static for a target sharing its GPU with the drafter.",
    )
    p.add_argument("--draft-model-path", required=True)
    p.add_argument("--gpu", type=int, default=0, help="the shared GPU's index")
    p.add_argument("--gpu-bytes", type=int, help="its memory (default: measured)")
    # The worker's defaults: at most 256 requests hold draft state, each up to
    # 4096 tokens plus a verify window.
    p.add_argument("--max-requests", type=int, default=MAX_DRAFT_REQUESTS)
    p.add_argument("--max-len", type=int, default=DEFAULT_DRAFT_MAX_LEN + 16)
    p.add_argument("--base-fraction", type=float, default=DEFAULT_BASE_FRACTION)
    args = p.parse_args(argv)
    try:
        from minedraft_sglang import model_files
        from minedraft_sglang.config import MineDraftConfigError

        try:
            folder = model_files.local_dir(args.draft_model_path, "--draft-model-path")
        except MineDraftConfigError as e:
            raise OSError(str(e)) from None
        hf_config = json.loads((Path(folder) / "config.json").read_text())
        need = shared_gpu_reserve(
            hf_config, max_requests=args.max_requests, max_len=args.max_len, elem_bytes=dtype_bytes(hf_config)
        )
        gpu = args.gpu_bytes or gpu_bytes(args.gpu)
        print(target_mem_fraction(need, gpu, args.base_fraction))
    except (OSError, KeyError, json.JSONDecodeError, DeviceError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
