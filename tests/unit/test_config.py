"""The --minedraft-* configuration: parsing, validation, the environment hand-off."""

from __future__ import annotations

import pytest

from minedraft_sglang.config import MineDraftConfig, MineDraftConfigError, config_from_argv, validate_verify_backend


def test_config_round_trips_through_env(monkeypatch):
    cfg = config_from_argv(["--model-path", "x", "--minedraft-mode", "sequential", "--minedraft-draft-device", "cpu"])
    monkeypatch.setenv("SGLANG_MINEDRAFT_CONFIG", cfg.to_env())
    assert MineDraftConfig.from_env() == cfg
    assert cfg.mode == "sequential"


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"mode": "fast"}, "--minedraft-mode"),
        ({"draft_device": "gpu1"}, "--minedraft-draft-device"),
        ({"draft_device": "cuda:7"}, "--minedraft-draft-device"),
        ({"drafter": "magic"}, "--minedraft-drafter"),
        ({"draft_max_len": -1}, "--minedraft-draft-max-len"),
        ({"draft_vocab": "-1"}, "--minedraft-draft-vocab"),
        ({"draft_vocab": "some"}, "--minedraft-draft-vocab"),
        ({"draft_compile": "always"}, "--minedraft-draft-compile"),
        ({"draft_weights": "int4"}, "--minedraft-draft-weights"),
        ({"draft_weights": "int8", "draft_device": "cuda"}, "--minedraft-draft-weights int8 needs"),
        ({"draft_stop": 1.0}, "--minedraft-draft-stop"),
        ({"draft_stop": -0.1}, "--minedraft-draft-stop"),
        ({"draft_stop": 0.5, "k": "fixed"}, "--minedraft-draft-stop"),
        ({"draft_cores": "1-"}, "--minedraft-draft-cores"),
        ({"draft_cores": "999"}, "--minedraft-draft-cores"),
    ],
)
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(MineDraftConfigError, match=flag):
        MineDraftConfig(**kwargs).validate()


def test_draft_compile_flag_reaches_the_config():
    assert config_from_argv(["--model-path", "x"]).draft_compile == "auto"
    assert config_from_argv(["--model-path", "x", "--minedraft-draft-compile", "off"]).draft_compile == "off"


def test_draft_vocab_flag_reaches_the_config():
    assert config_from_argv(["--model-path", "x"]).draft_vocab == "0"
    assert config_from_argv(["--model-path", "x", "--minedraft-draft-vocab", "auto"]).draft_vocab == "auto"
    assert config_from_argv(["--model-path", "x", "--minedraft-draft-vocab", "32768"]).draft_vocab == "32768"


def test_draft_weights_flag_reaches_the_config():
    assert config_from_argv(["--model-path", "x"]).draft_weights == "auto"
    argv = ["--model-path", "x", "--minedraft-draft-weights", "checkpoint"]
    assert config_from_argv(argv).draft_weights == "checkpoint"


def test_draft_stop_flag_reaches_the_config():
    assert config_from_argv(["--model-path", "x"]).draft_stop == 0.0
    assert config_from_argv(["--model-path", "x", "--minedraft-draft-stop", "0.8"]).draft_stop == 0.8


def test_k_is_auto_unless_the_user_chose_one():
    base = ["--model-path", "x"]
    assert config_from_argv(base).k == "auto"
    assert config_from_argv([*base, "--speculative-num-steps", "3"]).k == "fixed"
    assert config_from_argv([*base, "--speculative-num-steps=3"]).k == "fixed"
    assert config_from_argv([*base, "--minedraft-tetris"]).k == "fixed"
    assert config_from_argv([*base, "--speculative-num-steps", "3", "--minedraft-k", "auto"]).k == "auto"
    with pytest.raises(MineDraftConfigError, match="--minedraft-k auto does not combine"):
        config_from_argv([*base, "--minedraft-tetris", "--minedraft-k", "auto"])


def test_env_with_unknown_key_is_refused(monkeypatch):
    monkeypatch.setenv("SGLANG_MINEDRAFT_CONFIG", '{"mode": "psd", "speculate_harder": true}')
    with pytest.raises(MineDraftConfigError, match="unknown keys"):
        MineDraftConfig.from_env()


def test_validate_device_with_server_args_refuses_another_tp_ranks_gpu(monkeypatch):
    """What plugin.validate_server_args runs at startup: a drafter on TP rank 1's GPU is one line, not a
    traceback from inside a scheduler."""
    from types import SimpleNamespace

    from minedraft_sglang import devices
    from minedraft_sglang.config import validate_device

    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)
    sa = SimpleNamespace(device="cuda", base_gpu_id=0, tp_size=2, gpu_id_step=1, nnodes=1)
    with pytest.raises(MineDraftConfigError, match="GPU 1 runs TP rank 1"):
        validate_device("cuda:1", sa)
    validate_device("cuda:2", sa)
    validate_device("cuda:1")  # without server arguments only the machine's devices are known


# --minedraft-k auto verifies narrower windows than the startup width (issue 21, item 3; docs/gpu.md).
def _args(attention=None, decode=None, prefill=None, mode="prefill"):
    import types

    return types.SimpleNamespace(
        attention_backend=attention,
        decode_attention_backend=decode,
        prefill_attention_backend=prefill,
        speculative_attention_mode=mode,
    )


def _gpu(sm: int):
    """SGLang's platform facts of a CUDA 12.4 machine with an sm``sm`` GPU,
    for every reader (``get_default_attn_backend`` reads the same ones)."""
    from sglang.srt.runtime_context import override_platform

    return override_platform(
        is_cuda=True, is_hopper_with_cuda_12_3=sm == 90, is_sm100=sm == 100, has_flashinfer=True, device_sm=sm
    )


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)


@pytest.mark.parametrize("backend", ["flashinfer", "triton", "intel_amx"])
def test_auto_k_runs_on_backends_that_read_each_verifys_width(backend, on_gpu):
    with _gpu(90) as platform:
        validate_verify_backend(_args(attention=backend), "auto", platform)
        validate_verify_backend(_args(attention="torch_native", prefill=backend), "auto", platform)
        validate_verify_backend(_args(attention="torch_native", decode=backend, mode="decode"), "auto", platform)


@pytest.mark.parametrize("backend", ["fa3", "fa4", "trtllm_mha", "torch_native"])
def test_auto_k_is_refused_on_backends_that_take_the_startup_width(backend, on_gpu):
    with _gpu(90) as platform:
        with pytest.raises(MineDraftConfigError, match=f"--minedraft-k auto with attention backend {backend} for"):
            validate_verify_backend(_args(attention=backend), "auto", platform)
        validate_verify_backend(_args(attention=backend), "fixed", platform)  # one width: the startup one


@pytest.mark.parametrize(
    "args",
    [
        _args(decode="flashinfer"),  # the verify runs on the prefill half: SGLang's default, fa3 here
        _args(attention="flashinfer", prefill="fa3"),
        _args(attention="fa3", decode="flashinfer"),
        _args(prefill="flashinfer", decode="fa3", mode="decode"),
    ],
)
def test_the_backend_checked_is_the_one_the_verify_runs_on(args, on_gpu):
    """TARGET_VERIFY runs on the prefill backend unless
    --speculative-attention-mode decode (review 2026-12-07, N7)."""
    with _gpu(90) as platform, pytest.raises(MineDraftConfigError, match="fa3"):
        validate_verify_backend(args, "auto", platform)


@pytest.mark.parametrize("sm, default", [(90, "fa3"), (100, "trtllm_mha"), (80, None)])
def test_auto_k_with_sglangs_default_backend(sm, default, on_gpu):
    """Where nothing names the verify's backend (sgl.Engine, whose arguments
    the launcher never sees) SGLang's default decides."""
    with _gpu(sm) as platform:
        if default is None:  # flashinfer
            validate_verify_backend(_args(), "auto", platform)
            return
        with pytest.raises(MineDraftConfigError, match=f"default attention backend on this GPU is {default}"):
            validate_verify_backend(_args(), "auto", platform)


def _stock_command(*extra: str) -> list[str]:
    from minedraft_sglang.lab import tiny_models

    target, draft = (str(tiny_models.model_path(name)) for name in ("target", "draft"))
    return [
        "--model-path",
        target,
        "--speculative-algorithm",
        "MINEDRAFT",
        "--speculative-draft-model-path",
        draft,
        "--minedraft-draft-device",
        "cuda:1",
        *extra,
    ]


@pytest.mark.parametrize("sm", [90, 100])
def test_the_stock_command_on_a_hopper_or_blackwell_gpu_names_a_backend_for_auto_k(sm, on_gpu, monkeypatch):
    """The README's command with no backend flag (auto k) starts on an H100:
    the launcher names flashinfer where SGLang's default would be refused
    (review 2026-12-07, N1); a backend the user named stays theirs."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from minedraft_sglang import devices, plugin

    load_plugins()  # the --minedraft-* flags on SGLang's parser, as in `sglang.launch_server`
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 2)
    monkeypatch.delenv("SGLANG_MINEDRAFT_CONFIG", raising=False)
    with _gpu(sm):
        server_args = plugin._prepare_server_args_around(prepare_server_args, _stock_command())
        assert server_args.attention_backend == "flashinfer"
        fixed = plugin._prepare_server_args_around(prepare_server_args, _stock_command("--speculative-num-steps", "3"))
        assert fixed.attention_backend is None  # fixed k verifies at the startup width: SGLang's default serves
        named = plugin._prepare_server_args_around(prepare_server_args, _stock_command("--attention-backend", "triton"))
        assert named.attention_backend == "triton"
        with pytest.raises(SystemExit, match="attention backend fa3 for the verify"):
            plugin._prepare_server_args_around(prepare_server_args, _stock_command("--attention-backend", "fa3"))
    with _gpu(80):
        server_args = plugin._prepare_server_args_around(prepare_server_args, _stock_command())
        assert server_args.attention_backend is None  # SGLang's default there is flashinfer
