"""MINEDRAFT's target forwards under SGLang's graph runners (CUDA and CPU).

A decode step of a MINEDRAFT target is a DECODE forward (k = 0, a plain step:
``verify.decode_forward_batch``) or a TARGET_VERIFY of k + 1 tokens per
request. SGLang captures one runner, in TARGET_VERIFY mode at the startup
width, replays it only at that width, and builds its capture-time spec input
only for its own algorithms (a plugin gets None, and FlashInfer's capture
fails on it); its CPU runner captures decode only. The hooks here (registered
in ``plugin.py``) give a MINEDRAFT target one runner of ours per width its
steps can take, each captured in the mode of its width, and send every
forward to the runner of its mode and width; ``docs/design.md``, "Verify
under graphs".
"""

from __future__ import annotations

import functools
import logging
import time
import types

import torch

from minedraft_sglang.config import ALGORITHM_NAME, MineDraftConfig

logger = logging.getLogger(__name__)


def verify_graph_spec_info(width: int, custom_mask):
    """The capture-time input of a MINEDRAFT verify: a chain (topk 1) of
    ``width`` tokens, the bonus token and width - 1 drafts.

    Hidden states FULL: SGLang's verify asks for them for every algorithm but
    STANDALONE (``eagle_prepare_for_verify``), and a graph captured with less
    is refused at replay.
    """
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.speculative.eagle_info import EagleVerifyInput

    return EagleVerifyInput(
        draft_token=None,
        custom_mask=custom_mask,
        positions=None,
        retrieve_index=None,
        retrieve_next_token=None,
        retrieve_next_sibling=None,
        retrieve_cum_len=None,
        spec_steps=width - 1,
        topk=1,
        draft_token_num=width,
        capture_hidden_mode=CaptureHiddenMode.FULL,
        seq_lens_sum=None,
        seq_lens_cpu=None,
    )


def _is_minedraft(spec_algorithm) -> bool:
    return str(getattr(spec_algorithm, "name", spec_algorithm) or "").upper() == ALGORITHM_NAME


def graph_widths(k_policy: str, num_draft_tokens: int) -> list[int]:
    """The tokens per request of the forwards a MINEDRAFT target's decode
    steps run, ascending; 1 is a k = 0 step's DECODE, w > 1 a verify of w - 1
    drafts.

    ``--minedraft-k auto`` chooses k in 0..k_max per step (k_max + 1 =
    ``num_draft_tokens``), and a verify may be narrower than its step's k:
    drafts made at different k give their common prefix
    (``psd_loop.PendingDrafts.take``), ``--minedraft-draft-stop`` ends chains
    early. So every width 1..k_max + 1. A fixed k (TETRIS too: it cuts chains
    in the acceptance walk, not in the forward) drafts k every step and
    verifies at k_max + 1 only.
    """
    return list(range(1, num_draft_tokens + 1)) if k_policy == "auto" else [num_draft_tokens]


class GraphRouter:
    """A MINEDRAFT target's graph runner where SGLang holds one
    (``ModelRunner.decode_cuda_graph_runner``): a runner per (mode, width),
    and each forward goes to the one captured in its mode at its width. A
    batch no runner holds runs eagerly: SGLang's ``can_run_graph`` checks
    sizes and the verify width, not the mode, so one runner for all would
    replay a verify graph for a decode.

    SGLang asks its runner ``can_run_graph`` (the model runner's forward and
    ``eagle_prepare_for_verify``), then ``load_batch`` and ``execute`` for
    the same batch; whatever else it reads of it (``capture_bs``, ``max_bs``)
    is the widest runner's, the one SGLang's capture built.
    """

    def __init__(self, runners):
        self.runners = {(r.capture_forward_mode, r.captured_req_width): r for r in runners}
        self.widest = max(runners, key=lambda r: r.captured_req_width)

    def runner_for(self, forward_batch):
        """The runner captured in the batch's mode at its width (a DECODE's
        is 1), None where none was."""
        spec_info = forward_batch.spec_info
        width = 1 if spec_info is None else spec_info.num_tokens_per_req
        return self.runners.get((forward_batch.forward_mode, width))

    def can_run_graph(self, forward_batch) -> bool:
        runner = self.runner_for(forward_batch)
        return runner is not None and runner.can_run_graph(forward_batch)

    def load_batch(self, forward_batch, *args, **kwargs):
        return self.runner_for(forward_batch).load_batch(forward_batch, *args, **kwargs)

    def execute(self, forward_batch, *args, **kwargs):
        return self.runner_for(forward_batch).execute(forward_batch, *args, **kwargs)

    def replays(self) -> dict[int, int]:
        """Forwards that ran in a graph, by width (1: k = 0 steps), for
        /server_info: SGLang reports whether a forward could
        (``can_run_cuda_graph``), not whether it did."""
        return {
            r.captured_req_width: r.replays for r in sorted(self.runners.values(), key=lambda r: r.captured_req_width)
        }

    def __getattr__(self, name):
        return getattr(self.widest, name)


class _WidthRunner:
    """What a MINEDRAFT target's graph runner adds to its platform's
    (``DecodeCudaGraphRunner``, ``CPUGraphRunner``): the mode of its width,
    captured with the spec input MINEDRAFT's verify reads, and a count of its
    replays. SGLang's constructor captures last, reading
    ``capture_forward_mode`` and ``get_spec_info`` there."""

    replays = 0

    def capture(self) -> None:
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

        if self.captured_req_width == 1:
            # A k = 0 step: SGLang's decode, with the hidden states it asks
            # for (verify.decode_forward_batch); a graph captured with less
            # is refused at replay.
            self.capture_forward_mode = ForwardMode.DECODE
            self.capture_hidden_mode = CaptureHiddenMode.FULL
        else:
            self.capture_forward_mode = ForwardMode.TARGET_VERIFY
        super().capture()

    def get_spec_info(self, num_tokens: int):
        if self.capture_forward_mode.is_decode():
            return None
        return verify_graph_spec_info(self.captured_req_width, self.custom_mask)

    def execute(self, forward_batch, pp_proxy_tensors=None):
        self.replays += 1
        return super().execute(forward_batch, pp_proxy_tensors)


@functools.cache
def cuda_graph_runner_cls():
    """SGLang's decode CUDA graph runner, in the mode of its width
    (``_WidthRunner``). Its width follows SGLang's contract for a runner per
    step count (``SRTPlatform.get_graph_runner_cls``): the keyword arguments
    ``speculative_num_steps`` and ``speculative_num_draft_tokens``."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    class CudaGraphRunner(_WidthRunner, DecodeCudaGraphRunner):
        @property
        def custom_mask(self):
            return self.buffers.custom_mask

    return CudaGraphRunner


@functools.cache
def cpu_graph_runner_cls():
    """SGLang's CPU graph runner (torch.compile), capturing MINEDRAFT's target
    forward of its width instead of a decode.

    SGLang 0.5.23's ``CPUGraphRunner`` captures decode only and refuses a
    speculative model runner in its constructor. The subclass passes that check
    with a view of the model runner that reports no speculation, then, before
    anything is captured, sizes its inputs for its width (keyword arguments as
    for the CUDA runner; default: the startup verify width). Replay and
    padding are SGLang's, on the model runner's attention backend, which plans
    every replay afresh.
    """
    from sglang.srt.model_executor.cpu_graph_runner import CPUGraphRunner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    class _WithoutSpeculation:
        spec_algorithm = SpeculativeAlgorithm.NONE

        def __init__(self, model_runner):
            self.model_runner = model_runner

        def __getattr__(self, name):
            return getattr(self.model_runner, name)

    class CPUMineDraftGraphRunner(_WidthRunner, CPUGraphRunner):
        def __init__(self, model_runner, *, speculative_num_steps=None, speculative_num_draft_tokens=None):
            self.width = speculative_num_draft_tokens or model_runner.decode_num_tokens_per_req()
            super().__init__(_WithoutSpeculation(model_runner))

        def capture(self) -> None:
            # The constructor calls this last, with its inputs sized for one
            # token per request.
            self.model_runner = self.model_runner.model_runner
            self.captured_req_width = width = self.width
            self.max_num_token = self.max_bs * width
            self.model_runner.attn_backend.init_cpu_graph_state(self.max_bs, self.max_num_token)
            with torch.device(self.device):
                self.input_ids = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.out_cache_loc = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.positions = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.mrope_positions = torch.zeros((3, self.max_num_token), dtype=torch.int64)
                self.custom_mask = torch.ones((int(self.seq_lens.sum()) + self.max_num_token) * width, dtype=torch.bool)
            super().capture()

        def load_batch(self, forward_batch) -> None:
            """SGLang's verify stages a graph batch here on CUDA; on CPU,
            ``execute`` stages it."""

    return CPUMineDraftGraphRunner


def graph_runner_cls_around(original, platform):
    """A MINEDRAFT target's graph runners are ours: ``cpu_graph_runner_cls()``
    on CPU, ``cuda_graph_runner_cls()`` where SGLang would build its
    ``DecodeCudaGraphRunner`` (NPU and XPU keep their own)."""
    from sglang.srt.runtime_context import get_spec

    runner_cls = original(platform)
    if runner_cls is not None or not _is_minedraft(get_spec().speculative_algorithm):
        return runner_cls
    device = getattr(platform, "device_type", None)
    if device == "cpu":
        return cpu_graph_runner_cls()
    return None if device in ("npu", "xpu") else cuda_graph_runner_cls()


def width_runner(model_runner, runner_cls, width: int):
    """A ``runner_cls`` runner of ``width`` tokens per request. A CUDA graph
    holds its attention backend's buffers and per-batch-size plans, so each
    runner gets a backend of its own, as SGLang's adaptive speculative
    decoding builds one per step count (``eagle_worker_v2.py``,
    ``build_adaptive_runtime_state``; FlashInfer's workspace stays the
    process's one: forwards run one at a time, each planned before it runs).
    A CPU runner plans on the model runner's at every replay."""
    backend = {} if model_runner.device == "cpu" else {"attn_backend": model_runner._get_attention_backend()}
    return runner_cls(model_runner, speculative_num_steps=width - 1, speculative_num_draft_tokens=width, **backend)


def capture_decode_graph_around(original, *, model_runner):
    """A MINEDRAFT target captures a runner per width its decode steps take
    (``graph_widths``): SGLang's capture the widest, this the others, behind
    a ``GraphRouter``. Their memory and time count as the capture's, in the
    log and in ``/server_info``. CUDA graphs of every runner share SGLang's
    process-wide graph memory pool (``get_or_create_global_graph_memory_pool``)."""
    import msgspec
    from sglang.srt.utils import get_available_gpu_memory

    capture = original(model_runner=model_runner)
    widest = capture.runner
    if not isinstance(widest, _WidthRunner):
        return capture
    tic = time.perf_counter()
    before_mem = get_available_gpu_memory(model_runner.device, model_runner.gpu_id)
    widths = graph_widths(MineDraftConfig.from_env().k, widest.captured_req_width)
    runners = [width_runner(model_runner, type(widest), w) for w in widths if w != widest.captured_req_width]
    memory_gb = before_mem - get_available_gpu_memory(model_runner.device, model_runner.gpu_id)
    seconds = time.perf_counter() - tic
    if runners:
        logger.info(
            "MineDraft: graphs at widths %s beside width %d (1: decode), elapsed=%.2f s, mem usage=%.2f GB",
            [r.captured_req_width for r in runners],
            widest.captured_req_width,
            seconds,
            memory_gb,
        )
    return msgspec.structs.replace(
        capture,
        runner=GraphRouter([*runners, widest]),
        memory_usage_gb=capture.memory_usage_gb + memory_gb,
        capture_time=capture.capture_time + seconds,
    )


def dummy_verify_input_around(original, spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker):
    """The dummy verify input of SGLang's warm-up forwards (FlashInfer's
    autotune run on sm90+ for quantised and MoE targets calls it before
    capture), for MINEDRAFT's target too: like ``get_spec_info`` at capture,
    SGLang builds one only for its own algorithms and gives a plugin None."""
    if is_draft_worker or not _is_minedraft(spec_algorithm):
        return original(spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker)
    return verify_graph_spec_info(num_tokens_per_req, custom_mask)


def is_cpu_graph_around(original, mode):
    """A verify may replay a CPU graph too (only ``cpu_graph_runner_cls``
    captures one; SGLang's own CPU runner refuses speculative targets)."""
    return original(mode) or mode.is_target_verify()


def amx_capture_metadata_around(
    original, backend, bs, num_tokens, req_pool_indices, seq_lens, out_cache_loc, encoder_lens, forward_mode, spec_info
):
    """The intel_amx backend's capture-time metadata, for a verify too.

    SGLang sets up decode metadata only; a verify reads the extend layout
    (each request extends by the verify width), which ``init_forward_metadata``
    builds at replay the same way.
    """
    original(backend, bs, num_tokens, req_pool_indices, seq_lens, out_cache_loc, encoder_lens, forward_mode, spec_info)
    if forward_mode.is_target_verify():
        batch = types.SimpleNamespace(batch_size=bs, seq_lens=seq_lens, forward_mode=forward_mode, spec_info=spec_info)
        attn_logits, _ = backend.forward_metadata
        backend.forward_metadata = (attn_logits, backend.num_draft_tokens)
        backend.extend_metadata = backend._build_extend_metadata(batch)


AROUND_HOOKS = {
    "sglang.srt.platforms.interface.SRTPlatform.get_graph_runner_cls": graph_runner_cls_around,
    "sglang.srt.model_executor.model_runner_components.cuda_graph_setup.capture_decode_graph": (
        capture_decode_graph_around
    ),
    "sglang.srt.speculative.spec_info.create_dummy_verify_input": dummy_verify_input_around,
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_cpu_graph": is_cpu_graph_around,
    "sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.init_forward_metadata_capture_cpu_graph": (
        amx_capture_metadata_around
    ),
}
