"""Bad MINEDRAFT input fails at startup with one clear line, not a traceback:
every case is refused while the launcher parses its arguments, before any
model is loaded.

A few cases run the user's launch script (``launch/serve_cpu.sh``) end to
end, and so does every case that needs its own environment; the rest run in
one process the way the launcher starts (``startup_driver.py``: plugins,
then ``prepare_server_args``), since each launch spends ~20 s of CPU
importing SGLang before it can refuse anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minedraft_sglang.cpu.server import cpu_environ
from minedraft_sglang.lab import tiny_models

# The user's launch script, not the library call: what users run is what fails clearly.
SERVE_CPU_SH = Path(__file__).resolve().parents[2] / "launch" / "serve_cpu.sh"
DRIVER = Path(__file__).resolve().parent / "startup_driver.py"
# Run through the script even without an environment of their own.
THROUGH_SCRIPT = {"unknown mode", "vocab mismatch", "draft cores take all"}

# name: (extra args, extra env, text the one "error:" line must hold).
# "@name" in the args stands for a draft folder made by _draft_folders.
CASES = {
    "unknown mode": (["--minedraft-mode", "fast"], {}, "--minedraft-mode"),
    # "no CUDA device" here, "no such device" on a machine with fewer GPUs.
    "missing draft device": (["--minedraft-draft-device", "cuda:3"], {}, "--minedraft-draft-device 'cuda:3': "),
    # More rows than the target's 1024 (fewer, a padded target, is served:
    # tests/server/test_model_paths.py).
    "vocab mismatch": (["@mismatch-vocab"], {}, "has vocabulary size 1088, the target"),
    "missing draft path": (
        ["--speculative-draft-model-path", "/nonexistent/draft"],
        {},
        "'/nonexistent/draft': no such directory, and not a model in the Hugging Face cache",
    ),
    # A hub id is resolved from the local cache as SGLang resolves it
    # (tests/server/test_model_paths.py serves one); one that is not there:
    "hub id not in the cache": (
        ["--speculative-draft-model-path", "tiny-org/not-cached"],
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "@hub-cache"},
        "'tiny-org/not-cached': no such directory, and not a model in the Hugging Face cache (HF_HUB_OFFLINE=1",
    ),
    "draft tokenizer differs": (["@other-tokenizer"], {}, "its tokenizer differs from the target's"),
    "draft cores not allowed": (["--minedraft-draft-cores", "64"], {}, "--minedraft-draft-cores '64': cores 64"),
    "draft cores take all": (
        ["--minedraft-draft-cores", ",".join(map(str, sorted(os.sched_getaffinity(0))))],
        {},
        "takes every allowed core",
    ),
    "draft cores bad syntax": (["--minedraft-draft-cores", "one"], {}, "is not 'auto' or a core list"),
    "adaptive k with TETRIS": (
        ["--minedraft-tetris", "--minedraft-k", "auto"],
        {},
        "--minedraft-k auto does not combine",
    ),
    "tree drafts": (["--speculative-eagle-topk", "2"], {}, "--speculative-eagle-topk must be 1"),
    # fa3 sizes verify metadata from the startup width; auto k verifies narrower windows.
    # The verify runs on the prefill half (review 2026-12-07, N7).
    "auto k on fa3": (
        ["--minedraft-k", "auto", "--prefill-attention-backend", "fa3"],
        {},
        "--minedraft-k auto with attention backend fa3 for the verify: it does not read the width of each step",
    ),
    "negative draft max len": (["--minedraft-draft-max-len", "-1"], {}, "--minedraft-draft-max-len must be >= 0"),
    "draft vocab not a number": (["--minedraft-draft-vocab", "-1"], {}, "--minedraft-draft-vocab '-1' is not 'auto'"),
    "draft vocab with an EAGLE head": (
        ["@eagle3", "--minedraft-draft-vocab", "100"],
        {},
        "--minedraft-draft-vocab applies to a standalone draft model",
    ),
    "int8 weights with an EAGLE head": (
        ["@eagle3", "--minedraft-draft-weights", "int8"],
        {},
        "--minedraft-draft-weights int8 applies to a standalone draft model",
    ),
    "int8 weights on a GPU drafter": (
        ["--minedraft-draft-device", "cuda", "--minedraft-draft-weights", "int8"],
        {},
        "--minedraft-draft-weights int8 needs --minedraft-draft-device cpu",
    ),
    "draft stop with an EAGLE head": (
        ["@eagle3", "--minedraft-draft-stop", "0.8"],
        {},
        "--minedraft-draft-stop applies to a standalone draft model",
    ),
    "draft tokens != steps + 1": (
        ["--speculative-num-steps", "3", "--speculative-num-draft-tokens", "7"],
        {},
        "--speculative-num-draft-tokens must be --speculative-num-steps + 1 (4)",
    ),
    "config env not JSON": (
        [],
        {"SGLANG_MINEDRAFT_CONFIG": '{"mode": "psd",'},
        "SGLANG_MINEDRAFT_CONFIG is not valid JSON",
    ),
    "draft dir without config.json": (["@empty"], {}, "cannot read config.json"),
    "unsupported draft architecture": (["@gpt2"], {}, "architecture GPT2LMHeadModel is not supported"),
    "drafter kind vs checkpoint": (["--minedraft-drafter", "eagle3"], {}, "needs --minedraft-drafter standalone"),
    # No eagle_config: SGLang's default layers 2, n/2, n-3 of the 4-layer tiny target are 2 outputs, fc reads 3.
    "EAGLE-3 layers the target cannot return": (["@eagle3"], {}, "EAGLE-3 head: its fc reads 3 target layer outputs"),
    "pipeline parallel": (["--pp-size", "2"], {}, "--pp-size 2: MINEDRAFT does not run under pipeline parallelism"),
    "data-parallel attention": (
        ["--tp-size", "2", "--attn-dp-size", "2"],
        {},
        "MINEDRAFT does not run with data-parallel attention",
    ),
    "data-parallel attention, old flag": (
        ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"],
        {},
        "MINEDRAFT does not run with data-parallel attention",
    ),
}


def _draft_folders(tmp: Path) -> dict[str, str]:
    (tmp / "empty").mkdir()
    # The tiny draft relabelled: as an architecture no drafter runs (same
    # vocabulary, so only the architecture check can fail), and as an EAGLE-3
    # head (for the checks that read only the architecture).
    src = tiny_models.model_path("draft")
    config = json.loads((src / "config.json").read_text())
    for name, arch in (("gpt2", "GPT2LMHeadModel"), ("eagle3", "LlamaForCausalLMEagle3")):
        (tmp / name).mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (tmp / name / f.name).symlink_to(f)
        (tmp / name / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    # The tiny draft with two tokens' ids swapped in its tokenizer.
    other = tmp / "other-tokenizer"
    shutil.copytree(src, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    (tmp / "hub-cache").mkdir()
    return {
        "@mismatch-vocab": str(tiny_models.model_path("mismatch-vocab")),
        "@empty": str(tmp / "empty"),
        "@gpt2": str(tmp / "gpt2"),
        "@eagle3": str(tmp / "eagle3"),
        "@other-tokenizer": str(other),
        "@hub-cache": str(tmp / "hub-cache"),
    }


def _argv(extra: list[str], folders: dict[str, str]) -> list[str]:
    draft = str(tiny_models.model_path("draft"))
    if extra and extra[0] in folders:
        extra = ["--speculative-draft-model-path", folders[extra[0]], *extra[1:]]
    return [
        "--model-path",
        str(tiny_models.model_path("target")),
        "--speculative-algorithm",
        "MINEDRAFT",
        "--speculative-draft-model-path",
        draft,
        *extra,
        "--port",
        "1",
    ]


def _launch(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SERVE_CPU_SH), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def _in_one_process(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Each argv's outcome in the launcher's terms: its exit status and what it printed to stderr (a
    SystemExit's message is printed by the interpreter; an exception's type stands for its traceback)."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER)],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_environ(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outs) == len(argvs), proc.stdout[-3000:]
    results = []
    for argv, out in zip(argvs, outs):
        code, stderr = out["exit"], out["stderr"]
        if isinstance(code, str):
            stderr, code = stderr + code + "\n", 1
        if out["raised"]:
            stderr, code = stderr + f"Traceback (in-process): {out['raised']}\n", 1
        results.append(subprocess.CompletedProcess(argv, code or 0, "", stderr))
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folders = _draft_folders(tmp_path_factory.mktemp("drafts"))
    scripted = {name for name, (_, env, _) in CASES.items() if env or name in THROUGH_SCRIPT}
    rest = [name for name in CASES if name not in scripted]
    # Argument parsing imports SGLang (~10 s of CPU each): two at a time.
    with ThreadPoolExecutor(2) as ex:
        futures = {}
        for name in scripted:
            extra, env, _ = CASES[name]
            futures[name] = ex.submit(_launch, _argv(extra, folders), {k: folders.get(v, v) for k, v in env.items()})
        together = ex.submit(_in_one_process, [_argv(CASES[name][0], folders) for name in rest])
        return {**{name: f.result() for name, f in futures.items()}, **dict(zip(rest, together.result()))}


@pytest.mark.parametrize("name", list(CASES))
def test_startup_error_is_one_clear_line(results, name):
    proc = results[name]
    expected = CASES[name][2]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error_lines = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-3000:]
