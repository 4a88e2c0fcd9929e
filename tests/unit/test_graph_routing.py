"""A MINEDRAFT target's graph runners (``graphs.py``), without a server: one
runner per width its decode steps take, each captured in the mode of its
width, and each forward sent to the runner of its mode and width. The CUDA
runners cannot run here; their routing, their capture-time choices and
their construction are checked with stand-ins for SGLang's runner that are
as strict as the real one. tests/server/test_graphs.py runs the CPU runners.
"""

from __future__ import annotations

import types

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

from minedraft_sglang import graphs
from minedraft_sglang.config import ENV_VAR, MineDraftConfig

K = 3  # --speculative-num-steps: verifies of 2..K + 1 tokens per request
DECODE, VERIFY = ForwardMode.DECODE, ForwardMode.TARGET_VERIFY
MASK = torch.ones(64, dtype=torch.bool)


def batch(mode, width=1, bs=1):
    """A forward batch as the runners read it: a verify carries its chain's
    spec input (``num_tokens_per_req`` is its width), a decode none."""
    spec_info = graphs.verify_graph_spec_info(width, MASK) if mode == VERIFY else None
    return types.SimpleNamespace(forward_mode=mode, spec_info=spec_info, batch_size=bs)


class StandInRunner:
    """SGLang's ``DecodeCudaGraphRunner`` as a router sees it. Its
    ``can_run_graph`` checks the verify width and the batch size, not the
    mode (``decode_cuda_graph_runner.py``, ``can_run_graph``); a batch of
    another mode or width replayed in its graph computes garbage, so here
    ``load_batch`` and ``execute`` refuse one."""

    def __init__(self, mode, width, max_bs=2):
        self.capture_forward_mode, self.captured_req_width, self.max_bs = mode, width, max_bs
        self.replays = 0

    def capture(self) -> None:
        """SGLang's constructor captures here, last."""

    def can_run_graph(self, forward_batch) -> bool:
        spec_info = forward_batch.spec_info
        if spec_info is not None and spec_info.num_tokens_per_req != self.captured_req_width:
            return False
        return forward_batch.batch_size <= self.max_bs

    def _refuse_another_shape(self, forward_batch) -> None:
        width = 1 if forward_batch.spec_info is None else forward_batch.spec_info.draft_token_num
        shape = (forward_batch.forward_mode, width)
        assert shape == (self.capture_forward_mode, self.captured_req_width), f"{shape} in a graph of another shape"

    def load_batch(self, forward_batch) -> None:
        self._refuse_another_shape(forward_batch)

    def execute(self, forward_batch, pp_proxy_tensors=None):
        self._refuse_another_shape(forward_batch)
        self.replays += 1
        return self.captured_req_width


def router(widths):
    return graphs.GraphRouter([StandInRunner(DECODE if w == 1 else VERIFY, w) for w in widths])


# ------------------------------------------------------------ which runner


def test_each_forward_replays_the_runner_of_its_mode_and_width():
    graphed = router(graphs.graph_widths("auto", K + 1))
    for fb in (batch(DECODE), *(batch(VERIFY, w, bs=2) for w in range(2, K + 2))):
        assert graphed.can_run_graph(fb)
        graphed.load_batch(fb)
        assert graphed.execute(fb) == (1 if fb.spec_info is None else fb.spec_info.draft_token_num)
    assert graphed.execute(batch(VERIFY, 2)) == 2
    assert graphed.replays() == {1: 1, 2: 2, 3: 1, 4: 1}
    # What else SGLang reads of its runner is the widest one's.
    assert graphed.captured_req_width == K + 1


def test_a_shape_no_runner_holds_runs_eagerly():
    # A fixed k captures the full width only: a decode (SGLang's runner alone
    # would replay its verify graph for it) and a narrower verify run eagerly.
    fixed = router(graphs.graph_widths("fixed", K + 1))
    assert fixed.can_run_graph(batch(VERIFY, K + 1))
    assert not fixed.can_run_graph(batch(DECODE))
    assert not fixed.can_run_graph(batch(VERIFY, 2))
    graphed = router(graphs.graph_widths("auto", K + 1))
    # Width 1 is a decode's; a verify of width 1 has no graph.
    assert not graphed.can_run_graph(batch(VERIFY, 1))
    assert not graphed.can_run_graph(batch(ForwardMode.IDLE))
    # Beyond the captured batch sizes: the runner's own answer.
    assert not graphed.can_run_graph(batch(DECODE, bs=3))
    assert graphed.replays() == {1: 0, 2: 0, 3: 0, 4: 0}


def test_the_widths_each_k_policy_verifies():
    assert graphs.graph_widths("auto", K + 1) == [1, 2, 3, 4]
    assert graphs.graph_widths("fixed", K + 1) == [4]


# ------------------------------------------------------------ the CUDA runner


@pytest.fixture
def cuda_runner(monkeypatch):
    """``graphs.cuda_graph_runner_cls()`` without its constructor, on top of
    SGLang's ``DecodeCudaGraphRunner`` whose capture and replay record what
    they were given."""
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    seen = []

    def capture(self):
        seen.append((self.capture_forward_mode, self.capture_hidden_mode, self.get_spec_info(8)))

    monkeypatch.setattr(DecodeCudaGraphRunner, "capture", capture)
    monkeypatch.setattr(DecodeCudaGraphRunner, "execute", lambda self, fb, pp=None: "replayed")

    def make(width):
        cls = graphs.cuda_graph_runner_cls()
        runner = cls.__new__(cls)
        # What SGLang's constructor sets before it captures: a speculative
        # target's mode, the hidden states its server returns.
        runner.captured_req_width, runner.capture_forward_mode = width, VERIFY
        runner.capture_hidden_mode = CaptureHiddenMode.NULL
        runner.buffers = types.SimpleNamespace(custom_mask=MASK)
        return runner, seen

    return make


def test_the_decode_runner_captures_sglangs_decode_with_the_hidden_states_it_asks_for(cuda_runner):
    runner, seen = cuda_runner(1)
    runner.capture()
    assert seen == [(DECODE, CaptureHiddenMode.FULL, None)]


@pytest.mark.parametrize("width", range(2, K + 2))
def test_a_verify_runner_captures_a_chain_verify_with_full_hidden_states(cuda_runner, width):
    from sglang.srt.model_executor.forward_batch_info import get_required_capture_hidden_mode

    runner, seen = cuda_runner(width)
    runner.capture()
    ((mode, _, info),) = seen
    assert mode == VERIFY
    assert (info.topk, info.tree_topk, info.draft_token_num, info.spec_steps) == (1, 1, width, width - 1)
    # The runner's width check at replay reads this.
    assert info.num_tokens_per_req == width
    assert info.custom_mask is MASK
    # SGLang's verify asks for FULL hidden states for any algorithm that is
    # not STANDALONE (eagle_prepare_for_verify); a graph captured with less
    # cannot replay it.
    assert get_required_capture_hidden_mode(CaptureHiddenMode.NULL, info) == CaptureHiddenMode.FULL


def test_a_runner_counts_its_replays(cuda_runner):
    runner, _ = cuda_runner(2)
    assert [runner.execute(batch(VERIFY, 2)) for _ in range(3)] == ["replayed"] * 3
    assert runner.replays == 3


def test_minedraft_targets_get_our_runner_classes(monkeypatch):
    from sglang.srt import runtime_context

    spec = types.SimpleNamespace(speculative_algorithm="MINEDRAFT")
    monkeypatch.setattr(runtime_context, "get_spec", lambda: spec)

    def runner_cls(device, sglangs=None):
        return graphs.graph_runner_cls_around(lambda _: sglangs, types.SimpleNamespace(device_type=device))

    assert runner_cls("cpu") is graphs.cpu_graph_runner_cls()
    assert runner_cls("cuda") is graphs.cuda_graph_runner_cls()
    assert runner_cls("npu") is None
    # A platform's own runner, and other algorithms, keep SGLang's answer.
    assert runner_cls("cuda", sglangs=StandInRunner) is StandInRunner
    spec.speculative_algorithm = "EAGLE"
    assert runner_cls("cuda") is None


# ------------------------------------------------------------ capture


class CapturedRunner(graphs._WidthRunner, StandInRunner):
    """A runner built as SGLang's are: keyword arguments for its width
    (``SRTPlatform.get_graph_runner_cls``), capture last."""

    def __init__(self, model_runner, *, speculative_num_steps, speculative_num_draft_tokens, **backend):
        assert speculative_num_steps == speculative_num_draft_tokens - 1
        super().__init__(VERIFY, speculative_num_draft_tokens)
        self.attn_backend = backend.get("attn_backend")
        self.custom_mask = MASK
        self.capture()

    def capture(self) -> None:
        super().capture()
        self.spec_info = self.get_spec_info(8)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_minedraft_target_captures_a_runner_per_width_of_its_k_policy(monkeypatch, device):
    from sglang.srt import utils
    from sglang.srt.model_executor.model_runner_components.cuda_graph_setup import GraphCapture

    free = iter([10.0, 9.0, 9.0, 9.0])  # GB, before and after the narrower runners, twice
    monkeypatch.setattr(utils, "get_available_gpu_memory", lambda *_: next(free))
    model_runner = types.SimpleNamespace(device=device, gpu_id=0, _get_attention_backend=object)
    widest = CapturedRunner(model_runner, speculative_num_steps=K, speculative_num_draft_tokens=K + 1)
    sglangs = GraphCapture(runner=widest, memory_phase="target_verify", memory_usage_gb=2.0, capture_time=1.0)

    monkeypatch.setenv(ENV_VAR, MineDraftConfig(k="auto").to_env())
    capture = graphs.capture_decode_graph_around(lambda model_runner: sglangs, model_runner=model_runner)
    runners = capture.runner.runners
    assert sorted(runners, key=lambda shape: shape[1]) == [(DECODE, 1), (VERIFY, 2), (VERIFY, 3), (VERIFY, 4)]
    assert runners[VERIFY, K + 1] is widest and runners[DECODE, 1].spec_info is None
    assert [runners[VERIFY, w].spec_info.draft_token_num for w in (2, 3)] == [2, 3]
    backends = [r.attn_backend for r in runners.values() if r is not widest]
    if device == "cuda":
        # A CUDA graph holds its attention backend's buffers: one each.
        assert len({id(b) for b in backends}) == 3 and None not in backends
    else:
        assert backends == [None] * 3
    assert capture.memory_usage_gb == 3.0 and capture.capture_time >= 1.0

    monkeypatch.setenv(ENV_VAR, MineDraftConfig(k="fixed").to_env())
    capture = graphs.capture_decode_graph_around(lambda model_runner: sglangs, model_runner=model_runner)
    assert capture.runner.runners == {(VERIFY, K + 1): widest} and capture.memory_usage_gb == 2.0


def test_other_runners_stay_sglangs():
    sglangs = types.SimpleNamespace(runner=StandInRunner(VERIFY, K + 1))
    assert graphs.capture_decode_graph_around(lambda model_runner: sglangs, model_runner=None) is sglangs
