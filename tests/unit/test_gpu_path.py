"""The GPU path's fixes of issue 21, items 4-7, checked on the CPU with
stand-ins for ``torch.cuda`` (no GPU here): graph capture on the drafter's
device, the drafter's cache allocated whole at startup on a GPU, the explicit
hand-off between a drafter's calls on different streams, and the dummy
verify input of SGLang's warm-up forwards. (Item 5's memory rule:
tests/unit/test_devices.py, ``test_cli``.)"""

from __future__ import annotations

import types

import pytest
import torch

from minedraft_sglang import graphs
from minedraft_sglang.drafters import kv_cache
from minedraft_sglang.drafters.base import DraftRequest
from minedraft_sglang.drafters.kv_cache import SlotKVCache, StreamHandoff
from minedraft_sglang.drafters.standalone import StandaloneDrafter
from minedraft_sglang.lab import tiny_models

# ------------------------------------------------------------ stand-in torch.cuda


class FakeStream:
    def __init__(self, device=None, name="side"):
        self.device = str(torch.device(device)) if device is not None else "cuda:0"
        self.name = name
        self.waited: list = []  # events this stream was told to wait for

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        self.waited.append(event)


class FakeEvent:
    def __init__(self):
        self.stream = None

    def record(self, stream) -> None:
        self.stream = stream


class FakeCuda:
    """What kv_cache.cuda_graph and StreamHandoff use of torch.cuda."""

    def __init__(self):
        self.current: dict[str, FakeStream] = {}
        self.captures: list[dict] = []

    def current_stream(self, device=None):
        key = str(torch.device(device)) if device is not None else "cuda:0"
        return self.current.setdefault(key, FakeStream(key, name="current"))

    Stream = FakeStream
    Event = FakeEvent

    class CUDAGraph:
        def replay(self) -> None:
            pass

        def pool(self):
            return "pool"

    def device(self, device):
        return _null()

    def stream(self, stream):
        return _null()

    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        self.captures.append(dict(stream=stream, mode=capture_error_mode))
        return _null()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    for name in ("current_stream", "Stream", "CUDAGraph", "device", "stream", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(cuda, name))
    return cuda


# ------------------------------------------------------------ item 4


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_graphs_are_captured_on_a_stream_of_the_drafters_device(fake_cuda, device):
    """torch.cuda.graph's default capture stream is one per process, made on
    the first current device (the target's cuda:0 in SGLang's scheduler): a
    drafter on cuda:1 must name a stream of its own device."""
    replay, out, pool = kv_cache.cuda_graph(lambda: (torch.zeros(1),), torch.device(device), None)
    (capture,) = fake_cuda.captures
    assert isinstance(capture["stream"], FakeStream) and capture["stream"].device == device
    assert capture["mode"] == "thread_local"


# ------------------------------------------------------------ item 5


def _cache(device):
    return SlotKVCache(2, 2, 1, 8, torch.float32, device, lambda index: types.SimpleNamespace(index=index))


def test_a_gpu_drafters_cache_is_allocated_whole_at_startup_and_never_grows(monkeypatch):
    sizes = []
    resize = SlotKVCache._resize

    def spy(self, capacity):
        sizes.append(capacity)
        # The stand-in "GPU" cache lives on the CPU.
        self.device = "cpu"
        resize(self, capacity)
        self.device = "cuda:0"

    monkeypatch.setattr(SlotKVCache, "_resize", spy)
    cache = _cache("cuda:0")
    nbytes = cache.allocate(20, 16)
    assert sizes == [20] and cache.k.shape[1] == 21
    assert nbytes == 2 * 2 * 16 * 1 * 8 * 4 * 21
    for i in range(20):
        cache.slot(f"r{i}")
    assert sizes == [20] and cache.version == 1  # no resize, captured graphs stay valid


def test_a_cpu_drafters_cache_grows_as_requests_arrive():
    cache = _cache("cpu")
    cache.allocate(20, 16)
    assert cache.k.shape[1] == kv_cache.INITIAL_SLOTS + 1
    for i in range(kv_cache.INITIAL_SLOTS + 1):
        cache.slot(f"r{i}")
    assert cache.k.shape[1] == 2 * kv_cache.INITIAL_SLOTS + 1


# ------------------------------------------------------------ item 6


def test_each_call_waits_for_the_previous_calls_work_on_its_own_stream():
    cuda = FakeCuda()
    handoff = StreamHandoff("cuda:1", cuda=cuda)
    scheduler, drafter = FakeStream("cuda:1", "scheduler"), FakeStream("cuda:1", "drafter")
    cuda.current["cuda:1"] = scheduler
    with handoff():  # a newcomer's draft on the scheduler's thread
        pass
    first = handoff.last
    assert first.stream is scheduler and scheduler.waited == []
    cuda.current["cuda:1"] = drafter
    with handoff():  # the background draft on the drafter's thread
        pass
    assert drafter.waited == [first] and handoff.last.stream is drafter


def test_a_failed_call_still_hands_off():
    cuda = FakeCuda()
    handoff = StreamHandoff("cuda:0", cuda=cuda)
    with pytest.raises(RuntimeError), handoff():
        raise RuntimeError("drafter fault")
    assert handoff.last is not None


def test_nothing_to_order_on_the_cpu():
    handoff = StreamHandoff("cpu", cuda=None)
    with handoff():
        pass
    assert handoff.last is None


def test_the_standalone_drafter_hands_off_every_draft_and_prefill():
    drafter = StandaloneDrafter(str(tiny_models.model_path("draft")), "cpu", torch.float32)
    drafter.allocate(4, 64)
    cuda = FakeCuda()
    # The drafter computes on the CPU; only its ordering is the GPU's.
    drafter.handoff = StreamHandoff("cuda:0", cuda=cuda)
    streams = [FakeStream("cuda:0", f"s{i}") for i in range(3)]
    req = DraftRequest("a", [5, 6, 7], [8])
    for stream, call in zip(streams, (lambda: drafter.prefill([req]), lambda: drafter.draft([req], 3))):
        cuda.current["cuda:0"] = stream
        call()
    assert streams[1].waited and streams[1].waited[0].stream is streams[0]


# ------------------------------------------------------------ item 7


class _Algo:
    def __init__(self, name):
        self.name = name


def test_warm_up_dummy_verify_input_for_minedraft_targets():
    calls = []

    def original(*args):
        calls.append(args)
        return None  # what SGLang 0.5.23 returns for a plugin algorithm

    mask = torch.ones(8, dtype=torch.bool)
    spec = graphs.dummy_verify_input_around(original, _Algo("MINEDRAFT"), mask, 4, False)
    assert calls == []
    assert spec.draft_token_num == 4 and spec.spec_steps == 3 and spec.topk == 1
    assert spec.custom_mask is mask and spec.capture_hidden_mode.name == "FULL"
    # SGLang's own algorithms, and draft workers, keep SGLang's answer.
    assert graphs.dummy_verify_input_around(original, _Algo("EAGLE"), mask, 4, False) is None
    assert graphs.dummy_verify_input_around(original, _Algo("MINEDRAFT"), mask, 4, True) is None
    assert len(calls) == 2
