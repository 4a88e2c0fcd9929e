"""MINEDRAFT's target verify under SGLang's graph runners (CUDA and CPU).

For a speculative target SGLang captures the decode graphs in TARGET_VERIFY
mode, bs requests x width tokens, with a capture-time spec input that its
``get_spec_info()`` builds only for its own algorithms; a plugin algorithm
gets None, and FlashInfer's capture fails on it. SGLang's CPU graph runner
captures decode only. The hooks here (registered in ``plugin.py``) fill both
gaps; ``docs/design.md``, "Verify under graphs".
"""

from __future__ import annotations

import functools
import types

import torch

from minedraft_sglang.config import ALGORITHM_NAME


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


def decode_graph_spec_info_around(original, runner, num_tokens):
    """The CUDA decode graph runner's capture-time spec input, for MINEDRAFT's target too."""
    model_runner = runner.model_runner
    if model_runner.is_draft_worker or not _is_minedraft(model_runner.spec_algorithm):
        return original(runner, num_tokens)
    return verify_graph_spec_info(runner.captured_req_width, runner.buffers.custom_mask)


def dummy_verify_input_around(original, spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker):
    """The dummy verify input of SGLang's warm-up forwards (FlashInfer's
    autotune run on sm90+ for quantised and MoE targets calls it before
    capture), for MINEDRAFT's target too: like ``get_spec_info`` at capture,
    SGLang builds one only for its own algorithms and gives a plugin None."""
    if is_draft_worker or not _is_minedraft(spec_algorithm):
        return original(spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker)
    return verify_graph_spec_info(num_tokens_per_req, custom_mask)


def decode_graph_can_run_around(original, runner, forward_batch):
    """A MINEDRAFT target's CUDA graphs hold TARGET_VERIFY forwards; a batch
    of another mode (a k = 0 step is a DECODE, ``verify.decode_forward_batch``)
    runs eagerly. SGLang's ``can_run_graph`` checks the batch size, not the
    mode: it would replay a verify graph for a decode."""
    model_runner = runner.model_runner
    if (
        not model_runner.is_draft_worker
        and _is_minedraft(model_runner.spec_algorithm)
        and forward_batch.forward_mode != runner.capture_forward_mode
    ):
        return False
    return original(runner, forward_batch)


def graph_runner_cls_around(original, platform):
    """On CPU, a MINEDRAFT target's graphs come from ``cpu_verify_graph_runner_cls()``."""
    from sglang.srt.runtime_context import get_spec

    runner_cls = original(platform)
    if (
        runner_cls is None
        and getattr(platform, "device_type", None) == "cpu"
        and _is_minedraft(get_spec().speculative_algorithm)
    ):
        return cpu_verify_graph_runner_cls()
    return runner_cls


def is_cpu_graph_around(original, mode):
    """A verify may replay a CPU graph too (only ``cpu_verify_graph_runner_cls``
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


@functools.cache
def cpu_verify_graph_runner_cls():
    """SGLang's CPU graph runner (torch.compile), capturing MINEDRAFT's target
    verify instead of a decode.

    SGLang 0.5.23's ``CPUGraphRunner`` captures decode only and refuses a
    speculative model runner in its constructor. The subclass passes that check
    with a view of the model runner that reports no speculation, then, before
    anything is captured, switches to TARGET_VERIFY with one row per verify
    token. Replay and padding are SGLang's.
    """
    from sglang.srt.model_executor.cpu_graph_runner import CPUGraphRunner
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    class _WithoutSpeculation:
        spec_algorithm = SpeculativeAlgorithm.NONE

        def __init__(self, model_runner):
            self.model_runner = model_runner

        def __getattr__(self, name):
            return getattr(self.model_runner, name)

    class CPUVerifyGraphRunner(CPUGraphRunner):
        # Verifies that ran in a graph, for /server_info: SGLang's verify
        # reports whether one could (can_run_cuda_graph), not whether it did.
        replays = 0

        def __init__(self, model_runner):
            super().__init__(_WithoutSpeculation(model_runner))

        def capture(self) -> None:
            # The constructor calls this last, with its inputs sized for one
            # token per request.
            self.model_runner = self.model_runner.model_runner
            self.capture_forward_mode = ForwardMode.TARGET_VERIFY
            self.captured_req_width = width = self.model_runner.decode_num_tokens_per_req()
            self.max_num_token = self.max_bs * width
            self.model_runner.attn_backend.init_cpu_graph_state(self.max_bs, self.max_num_token)
            with torch.device(self.device):
                self.input_ids = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.out_cache_loc = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.positions = torch.zeros((self.max_num_token,), dtype=torch.int64)
                self.mrope_positions = torch.zeros((3, self.max_num_token), dtype=torch.int64)
                self.custom_mask = torch.ones((int(self.seq_lens.sum()) + self.max_num_token) * width, dtype=torch.bool)
            super().capture()

        def get_spec_info(self, num_tokens: int):
            return verify_graph_spec_info(self.captured_req_width, self.custom_mask)

        def can_run_graph(self, forward_batch) -> bool:
            # Plain decode steps and narrower verifies (k chosen per step) run eagerly.
            return (
                forward_batch.forward_mode.is_target_verify()
                and forward_batch.spec_info.draft_token_num == self.captured_req_width
                and super().can_run_graph(forward_batch)
            )

        def execute(self, forward_batch, pp_proxy_tensors=None):
            self.replays += 1
            return super().execute(forward_batch, pp_proxy_tensors)

        def load_batch(self, forward_batch) -> None:
            """SGLang's verify stages a graph batch here on CUDA; on CPU,
            ``execute`` stages it."""

    return CPUVerifyGraphRunner


AROUND_HOOKS = {
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.get_spec_info": (
        decode_graph_spec_info_around
    ),
    "sglang.srt.speculative.spec_info.create_dummy_verify_input": dummy_verify_input_around,
    "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph": (
        decode_graph_can_run_around
    ),
    "sglang.srt.platforms.interface.SRTPlatform.get_graph_runner_cls": graph_runner_cls_around,
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.is_cpu_graph": is_cpu_graph_around,
    "sglang.srt.layers.attention.intel_amx_backend.IntelAMXAttnBackend.init_forward_metadata_capture_cpu_graph": (
        amx_capture_metadata_around
    ),
}
