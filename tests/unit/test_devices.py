"""Drafter placement and memory accounting (pure functions, no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minedraft_sglang import devices
from minedraft_sglang.devices import DeviceError, Placement


@pytest.mark.parametrize(
    "text,kind,index",
    [("cpu", "cpu", None), ("cuda", "cuda", None), ("cuda:0", "cuda", 0), ("cuda:12", "cuda", 12)],
)
def test_parse_valid(text, kind, index):
    assert devices.parse_draft_device(text) == devices.DraftDevice(kind, index)


@pytest.mark.parametrize("text", ["gpu1", "cuda:", "cuda:-1", "cpu:0", "CUDA:1", " cuda:1", "cuda:1 ", "mps", ""])
def test_parse_invalid_names_the_flag(text):
    with pytest.raises(DeviceError) as e:
        devices.parse_draft_device(text)
    msg = str(e.value)
    assert msg.startswith("--minedraft-draft-device") and repr(text) in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text,target_gpu,count,expected",
    [
        ("cpu", 0, 2, Placement("cpu", False)),
        ("cpu", None, 0, Placement("cpu", False)),
        ("cuda:1", 0, 2, Placement("cuda:1", False)),
        ("cuda:0", 0, 1, Placement("cuda:0", True)),
        ("cuda", 0, 2, Placement("cuda:0", True)),
        ("cuda", 3, 4, Placement("cuda:3", True)),  # bare 'cuda' follows the target
        ("cuda:0", 3, 4, Placement("cuda:0", False)),
        ("cuda:0", None, 1, Placement("cuda:0", False)),  # target on CPU
    ],
)
def test_place_drafter(text, target_gpu, count, expected):
    placement = devices.place_drafter(text, target_gpu, count)
    assert placement == expected
    assert placement.two_device == (expected.device != "cpu" and not expected.shares_target_gpu)


@pytest.mark.parametrize(
    "text,count,needle",
    [
        ("cuda:1", 1, "no such device (this machine has 1 CUDA device)"),
        ("cuda:2", 2, "no such device (this machine has 2 CUDA devices)"),
        ("cuda:0", 0, "this machine has no CUDA device"),
        ("cuda", 0, "this machine has no CUDA device"),
    ],
)
def test_place_drafter_missing_device(text, count, needle):
    with pytest.raises(DeviceError) as e:
        devices.place_drafter(text, 0, count)
    msg = str(e.value)
    assert msg.startswith(f"--minedraft-draft-device {text!r}") and needle in msg and "\n" not in msg


@pytest.mark.parametrize(
    "text,target_gpu,tp,step,nnodes,expected",
    [
        ("cuda:4", 0, 4, 1, 1, Placement("cuda:4", False)),  # the paper's 4+1: a GPU of its own
        ("cuda", 0, 4, 1, 1, Placement("cuda:0", True)),  # rank 0's GPU, asked for
        ("cuda:0", 0, 4, 1, 1, Placement("cuda:0", True)),
        ("cuda", 4, 4, 1, 1, Placement("cuda:4", True)),  # --base-gpu-id 4: GPUs 4-7
        ("cuda:0", 4, 4, 1, 1, Placement("cuda:0", False)),
        ("cuda:1", 0, 2, 2, 1, Placement("cuda:1", False)),  # --gpu-id-step 2: GPUs 0, 2
        ("cuda:4", 0, 8, 1, 2, Placement("cuda:4", False)),  # two nodes: ranks 0-3 on rank 0's, GPUs 0-3
        ("cuda:1", None, 2, 1, 1, Placement("cuda:1", False)),  # target on CPU
        ("cpu", 0, 4, 1, 1, Placement("cpu", False)),
    ],
)
def test_place_drafter_beside_a_tensor_parallel_target(text, target_gpu, tp, step, nnodes, expected):
    placement = devices.place_drafter(text, target_gpu, 8, tp_size=tp, gpu_id_step=step, nnodes=nnodes)
    assert placement == expected


@pytest.mark.parametrize(
    "text,target_gpu,tp,step,nnodes,count,needle",
    [
        ("cuda:1", 0, 4, 1, 1, 8, "GPU 1 runs TP rank 1 of the target (--tp 4 on GPUs 0,1,2,3)"),
        ("cuda:3", 0, 4, 1, 1, 8, "GPU 3 runs TP rank 3 of the target (--tp 4 on GPUs 0,1,2,3); "),
        ("cuda:6", 4, 4, 1, 1, 8, "GPU 6 runs TP rank 2 of the target (--tp 4 on GPUs 4,5,6,7); "),
        ("cuda:2", 0, 2, 2, 1, 8, "GPU 2 runs TP rank 1 of the target (--tp 2 on GPUs 0,2)"),
        ("cuda:3", 0, 8, 1, 2, 8, "GPU 3 runs TP rank 3 of the target (--tp 8 on GPUs 0,1,2,3)"),
    ],
)
def test_place_drafter_refuses_another_tp_ranks_gpu(text, target_gpu, tp, step, nnodes, count, needle):
    with pytest.raises(DeviceError) as e:
        devices.place_drafter(text, target_gpu, count, tp_size=tp, gpu_id_step=step, nnodes=nnodes)
    msg = str(e.value)
    assert msg.startswith(f"--minedraft-draft-device {text!r}: ") and needle in msg and "\n" not in msg
    # It names a way out: a GPU none of the ranks uses, or rank 0's.
    free = next(i for i in range(count) if i not in devices.tp_gpus(target_gpu, tp, step, nnodes))
    assert f"(cuda:{free})" in msg and "'cuda'" in msg


def test_place_drafter_refusal_without_a_free_gpu_suggests_the_cpu():
    with pytest.raises(DeviceError, match=r"a device of its own \(cpu\)"):
        devices.place_drafter("cuda:1", 0, 2, tp_size=2)


def _server_args(**kw):
    return SimpleNamespace(**{"device": None, "base_gpu_id": 0, "tp_size": 2, "gpu_id_step": 1, "nnodes": 1, **kw})


def test_check_server_placement(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    with pytest.raises(DeviceError, match="GPU 1 runs TP rank 1"):
        devices.check_server_placement("cuda:1", _server_args(), device_count=4)
    with pytest.raises(DeviceError, match="GPU 3 runs TP rank 1"):
        devices.check_server_placement("cuda:3", _server_args(device="cuda", base_gpu_id=2), device_count=4)
    devices.check_server_placement("cuda:2", _server_args(), device_count=4)
    devices.check_server_placement("cuda", _server_args(), device_count=4)
    # A target on the CPU holds no GPU.
    devices.check_server_placement("cuda:1", _server_args(device="cpu"), device_count=4)
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    devices.check_server_placement("cuda:1", _server_args(), device_count=4)


LLAMA_1B = {  # Llama 3.2 1B's published shape
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def test_kv_bytes_per_token():
    assert devices.kv_bytes_per_token(LLAMA_1B, 2) == 2 * 16 * 8 * 64 * 2
    # No head_dim or kv heads given: hidden / heads, and plain multi-head attention.
    mha = {"hidden_size": 512, "num_attention_heads": 8, "num_hidden_layers": 3}
    assert devices.kv_bytes_per_token(mha, 4) == 2 * 3 * 8 * 64 * 4
    assert devices.kv_bytes_per_token({"text_config": mha}, 4) == 2 * 3 * 8 * 64 * 4


def test_dtype_bytes():
    assert devices.dtype_bytes(LLAMA_1B) == 2
    assert devices.dtype_bytes({"dtype": "float32"}) == 4
    assert devices.dtype_bytes({"text_config": {"torch_dtype": "torch.float32"}}) == 4
    assert devices.dtype_bytes({}) == 2


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_transformers(tied):
    transformers = pytest.importorskip("transformers")
    cfg = dict(LLAMA_1B, num_hidden_layers=2, vocab_size=1000, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    expected = sum(p.numel() for p in model.parameters())
    assert devices.param_count(cfg) == expected


def test_param_count_llama_3_2_1b():
    # Published size: 1.24B parameters.
    assert 1.23e9 < devices.param_count(LLAMA_1B) < 1.25e9


def test_drafter_bytes_and_mem_fraction():
    need = devices.drafter_bytes(LLAMA_1B, max_requests=7, max_len=100, elem_bytes=2)
    assert need == devices.param_count(LLAMA_1B) * 2 + 32768 * 100 * 8
    gpu = 80 * 2**30
    fraction = devices.target_mem_fraction(need, gpu, base_fraction=0.85)
    assert fraction == round(0.85 - need / gpu, 3)
    with pytest.raises(DeviceError) as e:
        devices.target_mem_fraction(70 * 2**30, gpu, base_fraction=0.85)
    assert "70.0 GiB of the target GPU's 80.0 GiB" in str(e.value)


def test_cli(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_1B))
    gpu = 80 * 2**30
    cmd = [
        sys.executable,
        "-m",
        "minedraft_sglang.devices",
        "--draft-model-path",
        str(tmp_path),
        "--gpu-bytes",
        str(gpu),
        "--max-requests",
        "16",
        "--max-len",
        "1000",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # The KV cache only: SGLang counts the drafter's weights itself (they load
    # before it sizes its pool); counting them here too took them twice.
    need = devices.drafter_kv_bytes(LLAMA_1B, max_requests=16, max_len=1000, elem_bytes=2)
    assert need == devices.shared_gpu_reserve(LLAMA_1B, max_requests=16, max_len=1000, elem_bytes=2)
    assert float(out) == devices.target_mem_fraction(need, gpu)
    weights = devices.param_count(LLAMA_1B) * 2
    assert float(out) > devices.target_mem_fraction(need + weights, gpu)
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "missing")] + cmd[5:], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:")


# ---------------------------------------------------------------- launch scripts

REPO = Path(__file__).resolve().parents[2]


def _launch(script, tmp_path, env, *args):
    """Run a launch script with a stand-in interpreter that prints the
    sglang.launch_server command line and runs anything else for real."""
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\nif [ "$2" = sglang.launch_server ]; then shift 2; printf "%s\\n" "$@"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "MINEDRAFT_CACHE_DIR": "/models", **env}
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], capture_output=True, text=True, env=env)


def _flags(stdout):
    lines = stdout.split("\n")
    return {a: b for a, b in zip(lines, lines[1:]) if a.startswith("--")}


def test_serve_gpu_two(tmp_path):
    result = _launch("serve_gpu_two.sh", tmp_path, {}, "--port", "31000")
    assert result.returncode == 0, result.stderr
    flags = _flags(result.stdout)
    assert flags["--model-path"] == "/models/qwen2.5-coder-1.5b"
    assert flags["--speculative-draft-model-path"] == "/models/qwen2.5-coder-0.5b"
    assert flags["--speculative-algorithm"] == "MINEDRAFT"
    assert flags["--minedraft-draft-device"] == "cuda:1"
    assert flags["--attention-backend"] == "flashinfer"
    assert 0 < float(flags["--mem-fraction-static"]) < 1
    assert result.stdout.split("\n")[-3:-1] == ["--port", "31000"]  # caller's flags last: they win


def test_serve_gpu_single(tmp_path):
    result = _launch("serve_gpu_single.sh", tmp_path, {"MEM_FRACTION": "0.6", "TARGET": "/t", "DRAFT": "/d", "K": "3"})
    assert result.returncode == 0, result.stderr
    flags = _flags(result.stdout)
    assert (flags["--model-path"], flags["--speculative-draft-model-path"]) == ("/t", "/d")
    assert flags["--speculative-num-steps"] == "3"
    assert flags["--minedraft-draft-device"] == "cuda:0"
    assert flags["--mem-fraction-static"] == "0.6"


def test_serve_gpu_single_computes_mem_fraction(tmp_path):
    (tmp_path / "draft").mkdir()
    (tmp_path / "draft" / "config.json").write_text(json.dumps(LLAMA_1B))
    result = _launch("serve_gpu_single.sh", tmp_path, {"DRAFT": str(tmp_path / "draft"), "DRAFT_MAX_LEN": "512"})
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
        expected = devices.target_mem_fraction(
            devices.drafter_bytes(LLAMA_1B, max_requests=256, max_len=512, elem_bytes=2), gpu
        )
        assert float(_flags(result.stdout)["--mem-fraction-static"]) == expected
        assert _flags(result.stdout)["--minedraft-draft-max-len"] == "512"
    else:
        # The estimate needs the GPU's size; without one the script stops before SGLang.
        assert result.returncode != 0 and "no CUDA device to measure" in result.stderr
        assert "--model-path" not in result.stdout


def test_place_drafter_counts_this_machines_gpus():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        assert devices.place_drafter(f"cuda:{count - 1}", 0) == Placement(f"cuda:{count - 1}", count == 1)
    with pytest.raises(DeviceError, match="no such device" if count else "no CUDA device"):
        devices.place_drafter(f"cuda:{count}", 0)


def test_serve_gpu_tp(tmp_path):
    result = _launch("serve_gpu_tp.sh", tmp_path, {"TP": "4"}, "--port", "31000")
    assert result.returncode == 0, result.stderr
    flags = _flags(result.stdout)
    assert flags["--speculative-algorithm"] == "MINEDRAFT"
    assert (flags["--tp"], flags["--minedraft-draft-device"]) == ("4", "cuda:4")
    # The layout the worker's placement check takes: the drafter on a GPU of its own.
    assert devices.place_drafter(flags["--minedraft-draft-device"], 0, 5, tp_size=4).two_device
    assert result.stdout.split("\n")[-3:-1] == ["--port", "31000"]


def test_serve_gpu_tp_counts_this_machines_gpus(tmp_path):
    result = _launch("serve_gpu_tp.sh", tmp_path, {})
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= 2:
        flags = _flags(result.stdout)
        assert (flags["--tp"], flags["--minedraft-draft-device"]) == (str(count - 1), f"cuda:{count - 1}")
    else:
        assert result.returncode != 0 and "needs at least 2" in result.stderr
        assert "--model-path" not in result.stdout


# ------------------------------------------------- a drafter on the target's GPU (review 2026-12-07, N3)

QWEN25_05B = {  # Qwen2.5-0.5B's config.json, the fields the memory plan reads
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "max_position_embeddings": 32768,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
GiB = 2**30


def _resolving(tmp_path, monkeypatch, draft_device: str, *extra: str, gpus: int = 2, gpu_bytes: int = 80 * GiB):
    """The stock command's ServerArgs record as SGLang's resolution hands it
    to MINEDRAFT's handle_server_args: its memory settings resolved (SGLang's
    default fraction, 0.83 for a 7B target on an 80 GiB GPU), the drafter's
    writes recorded through SGLang's own stand-in."""
    from sglang.srt.arg_groups.overrides import declare_resolution, record_foreign_defaults, resolution_result
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from minedraft_sglang import plugin

    for name, cfg in (("draft", QWEN25_05B), ("target", {**QWEN25_05B, "num_hidden_layers": 28})):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: gpus)
    monkeypatch.setattr(devices, "gpu_bytes", lambda index: gpu_bytes)
    monkeypatch.setenv("SGLANG_MINEDRAFT_CONFIG", json.dumps({"draft_device": draft_device}))
    load_plugins()
    argv = [
        "--model-path",
        str(tmp_path / "target"),
        "--speculative-algorithm",
        "MINEDRAFT",
        "--speculative-draft-model-path",
        str(tmp_path / "draft"),
        "--speculative-num-draft-tokens",
        "5",
        "--device",
        "cuda",
        *extra,
    ]
    server_args = prepare_server_args(argv)
    server_args._raw_input = {name: getattr(server_args, name) for name in ("mem_fraction_static", "device")}
    if server_args.mem_fraction_static is None:
        declare_resolution(server_args, "_handle_gpu_memory_settings", mem_fraction_static=0.83)
    record_foreign_defaults(server_args, "test", plugin.leave_room_for_the_drafter)
    return resolution_result(server_args, "mem_fraction_static")


def test_a_drafter_on_the_target_gpu_lowers_sglangs_default_fraction_by_its_kv_cache(tmp_path, monkeypatch):
    # 256 requests x (4096 + 5) tokens x 24 layers x K and V x 2 heads x 64 x 2 bytes = 12.06 GiB.
    cache = 256 * 4101 * 24 * 2 * 2 * 64 * 2
    assert devices.drafter_kv_bytes(QWEN25_05B, max_requests=256, max_len=4101, elem_bytes=2) == cache * 257 // 256
    assert _resolving(tmp_path, monkeypatch, "cuda") == round(0.83 - cache * 257 / 256 / (80 * GiB), 3) == 0.679


def test_a_drafter_on_its_own_gpu_or_a_fraction_the_user_gave_leaves_the_fraction_alone(tmp_path, monkeypatch):
    assert _resolving(tmp_path / "a", monkeypatch, "cuda:1") == 0.83
    assert _resolving(tmp_path / "b", monkeypatch, "cuda", "--mem-fraction-static", "0.7") == 0.7


def test_a_drafter_that_leaves_the_target_too_little_of_a_shared_gpu_is_refused(tmp_path, monkeypatch):
    from minedraft_sglang.config import MineDraftConfigError

    with pytest.raises(MineDraftConfigError, match="lower --minedraft-draft-max-len"):
        _resolving(tmp_path, monkeypatch, "cuda", gpus=1, gpu_bytes=16 * GiB)
