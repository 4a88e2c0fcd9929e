"""What the worker asks of the target for its drafter (issue 34, N4 and N6), on every TP rank alike.

The target stands in with SGLang's own ``set_eagle3_layers_to_capture`` (``models/llama.py``), so the layers it
captures are the ones SGLang's target would return. The worker is built through ``MineDraftWorker.__init__`` on TP
ranks 0 and 1 (SGLang's spec, config and TP group faked, as in ``test_worker_loop.py``; rank 0's drafter a fake
that records the features it is handed) with a real draft checkpoint, and each rank runs ``_prefill``.

Why every rank: a prefill that returns hidden states runs eagerly while one that does not may replay SGLang's
prefill graph, so ranks that decide differently mix graph and eager collectives (custom all-reduce reads peer
buffers the others did not write). Only rank 0 has a drafter, so the decision must come from the draft's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.models.llama import LlamaForCausalLM
from test_worker_loop import FakeDrafter, FakeReq, FeatureDrafter, built, rule_right  # noqa: F401 - built: fixture
from transformers import AutoConfig

import minedraft_sglang.worker as worker_mod
from minedraft_sglang import tp_sync
from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.drafters import eagle
from minedraft_sglang.lab import tiny_eagle, tiny_models
from minedraft_sglang.worker import MineDraftWorker


def sglang_target(num_layers: int):
    """A target model as far as EAGLE-3 capture goes: SGLang's ``set_eagle3_layers_to_capture`` on a stand-in,
    which records what it was asked (``asked``)."""
    model = SimpleNamespace(
        pp_group=SimpleNamespace(is_last_rank=True),
        config=SimpleNamespace(num_hidden_layers=num_layers),
        model=SimpleNamespace(layers_to_capture=[]),
        asked=[],
    )

    def set_eagle3_layers_to_capture(layer_ids=None):
        model.asked.append(layer_ids)
        LlamaForCausalLM.set_eagle3_layers_to_capture(model, layer_ids)

    model.set_eagle3_layers_to_capture = set_eagle3_layers_to_capture
    return model


def returned_layers(model) -> list[int]:
    """The layers whose outputs the target returns, in order: SGLang captures the input of each layer in
    ``layers_to_capture`` (the previous layer's output), once, as its forward passes it (``LlamaModel.forward``)."""
    return [i - 1 for i in sorted(set(model.model.layers_to_capture))]


@pytest.mark.parametrize("num_layers", [4, 6, 7, 8, 32, 80])
@pytest.mark.parametrize("names", [None, "spread", "repeated"])
def test_captured_layers_are_the_ones_sglangs_target_returns(num_layers, names):
    ids = {None: None, "spread": [num_layers - 2, 0, num_layers // 2], "repeated": [1, 1, 0]}[names]
    config = {} if ids is None else {"eagle_config": {"eagle_aux_hidden_state_layer_ids": ids}}
    target = sglang_target(num_layers)
    target.set_eagle3_layers_to_capture(eagle.aux_layer_ids(config))
    assert eagle.captured_layers(config, num_layers) == returned_layers(target)


def test_a_head_that_names_no_layers_reads_sglangs_default():
    """yuhuili's EAGLE-3 heads have no eagle_config: SGLang then captures its default layers (the target is
    asked for None) and sizes fc for 3 outputs; Llama-3.1-8B has 32 layers."""
    assert eagle.target_capture({}, 32) is None
    assert eagle.num_aux_hidden_states({}) == 3
    target = sglang_target(32)
    target.set_eagle3_layers_to_capture(None)
    assert returned_layers(target) == eagle.captured_layers({}, 32) == [1, 15, 28]


@pytest.mark.parametrize(
    "config, refusal",
    [
        ({}, r"fc reads 3 target layer outputs, not those of SGLang's default layers \[0, 1\]"),
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 0, 1]}}, r"its eagle_config's layers \[0, 0, 1\]"),
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 3]}}, r"layers -1\.\.2 at most once"),
    ],
    ids=["default-too-few", "repeated", "last-layer"],
)
def test_a_target_that_cannot_return_what_the_head_reads_is_refused(config, refusal):
    """Where SGLang's own EAGLE-3 would fail at its first draft (fc fed fewer outputs than it reads)."""
    with pytest.raises(ValueError, match=refusal):
        eagle.target_capture(config, 4)


TARGET = tiny_models.model_path("target")
TARGET_LAYERS = AutoConfig.from_pretrained(TARGET).num_hidden_layers


@pytest.fixture
def make_rank(built, monkeypatch):  # noqa: F811 - the fixture imported above
    """``make_rank(draft_path, rank)``: a worker on TP rank ``rank`` of 2 whose target is ``sglang_target`` and
    whose ``forward_batch_generation`` records the capture mode it is asked for (``w.captures``); rank 0's
    drafter reads features unless the draft is a standalone model (``tiny_models``' "draft")."""

    def make(draft_path: Path, rank: int) -> MineDraftWorker:
        spec = SimpleNamespace(
            speculative_draft_model_path=str(draft_path), speculative_num_steps=3, speculative_num_draft_tokens=4
        )
        monkeypatch.setattr(worker_mod, "get_spec", lambda: spec)
        monkeypatch.setattr(MineDraftConfig, "from_env", classmethod(lambda cls: MineDraftConfig(k="fixed")))
        monkeypatch.setattr(
            worker_mod, "_tp_link", lambda: tp_sync.TpLink(rank=rank, cpu_group=None, device_group=None, src=0)
        )
        standalone = draft_path == tiny_models.model_path("draft")
        drafter = FakeDrafter(rule_right) if standalone else FeatureDrafter(rule_right)
        monkeypatch.setattr(worker_mod, "create_drafter", lambda **kwargs: drafter)
        captures = []

        def forward_batch_generation(batch, capture_hidden_mode=None):
            captures.append(capture_hidden_mode)
            hidden = torch.randn(sum(batch.extend_lens), 2 * 256)
            return SimpleNamespace(
                logits_output=SimpleNamespace(hidden_states=hidden),
                next_token_ids=torch.zeros(len(batch.reqs), dtype=torch.int64),
                can_run_cuda_graph=False,
            )

        runner = SimpleNamespace(
            device="cpu",
            gpu_id=rank,
            dtype=torch.float32,
            max_running_requests=16,
            model_config=SimpleNamespace(context_len=128, num_hidden_layers=TARGET_LAYERS),
            model=sglang_target(TARGET_LAYERS),
        )
        target_worker = SimpleNamespace(model_runner=runner, forward_batch_generation=forward_batch_generation)
        server_args = SimpleNamespace(tp_size=2, gpu_id_step=1, nnodes=1, model_path=str(TARGET), enable_metrics=False)
        w = MineDraftWorker(server_args, gpu_id=rank, nccl_port=0, target_worker=target_worker)
        built.append(w.loop)
        w.captures = captures
        return w

    return make


def prefill(w: MineDraftWorker) -> None:
    reqs = [FakeReq("a", [5, 6, 7], []), FakeReq("b", [8, 9], [])]
    batch = SimpleNamespace(reqs=reqs, extend_lens=[3, 2], prefix_lens=[0, 0], seq_lens=torch.tensor([3, 2]))
    w._prefill(batch, None)


DRAFTS = {
    # name: (the capture mode every rank's prefill asks for, what every rank asks the target to return)
    "draft": (None, []),
    "eagle": (CaptureHiddenMode.FULL, []),
    "eagle3": (CaptureHiddenMode.FULL, [tiny_eagle.AUX_LAYER_IDS]),
    "eagle3-default": (CaptureHiddenMode.FULL, [None]),
}


@pytest.mark.parametrize("name", list(DRAFTS))
def test_every_tp_rank_prefills_and_captures_what_the_draft_needs(make_rank, name):
    """Rank 1 has no drafter and still prefills as rank 0 does; an EAGLE-3 head's layers are set on both ranks,
    and the target returns exactly the outputs the head reads (its fc's width, the layers it was trained on)."""
    path = tiny_models.model_path(name) if name == "draft" else tiny_eagle.model_path(name)
    capture, asked = DRAFTS[name]
    ranks = [make_rank(path, rank) for rank in (0, 1)]
    assert ranks[1].drafter is None
    for w in ranks:
        prefill(w)
        assert w.captures == [capture]
        target = w.model_runner.model
        assert target.asked == asked
        if name.startswith("eagle3"):
            config = json.loads((path / "config.json").read_text())
            layers = returned_layers(target)
            assert layers == tiny_eagle.feature_layers(name, AutoConfig.from_pretrained(TARGET))
            assert len(layers) == eagle.num_aux_hidden_states(config)
    observed = getattr(ranks[0].drafter, "observed", [])
    assert [(rid, start, len(f)) for rid, start, f in observed] == (
        [] if capture is None else [("a", 0, 3), ("b", 0, 2)]
    )


def test_a_head_whose_layers_the_target_cannot_return_stops_every_rank(make_rank, tmp_path):
    """The tiny "eagle3" head without its eagle_config: fc reads 3 outputs, SGLang's default on the 4-layer tiny
    target gives 2."""
    path = tiny_eagle.variant(tiny_eagle.model_path("eagle3"), tmp_path / "unnamed", named_layers=False)
    for rank in (0, 1):
        with pytest.raises(ValueError, match="fc reads 3 target layer outputs, not those of SGLang's default"):
            make_rank(path, rank)
