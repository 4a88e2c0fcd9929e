"""The tree's layering, checked on the source (every import, including those
inside functions):

- engine -> lab never: the plugin SGLang loads must not need the lab or its
  extra (``pip install minedraft-sglang`` alone serves);
- ``sampling/`` imports torch and the standard library only, so the math runs
  and is tested where SGLang is absent (a GPU machine, for one);
- ``drafters/`` needs no SGLang either (torch, transformers, safetensors), so
  the real drafters run in ``gpu_check`` and the GPU-marked tests there;
- nor does ``psd_loop.py``: the PSD loop reads without SGLang's types.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "minedraft_sglang"
LAB = PACKAGE / "lab"
SAMPLING = PACKAGE / "sampling"
DRAFTERS = PACKAGE / "drafters"
# What `pip install ".[lab]"` adds (pyproject.toml).
LAB_EXTRA = {"matplotlib", "requests", "gguf", "accelerate"}


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import; the layering check reads absolute ones")
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _engine_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if LAB not in p.parents]


def test_the_tree_has_the_three_parts():
    assert _engine_files() and list(LAB.glob("*.py")) and list(SAMPLING.glob("*.py"))


@pytest.mark.parametrize("path", _engine_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_engine_never_imports_the_lab(path):
    bad = sorted(
        name
        for name in _imports(path)
        if name == "minedraft_sglang.lab" or name.startswith("minedraft_sglang.lab.") or name.split(".")[0] in LAB_EXTRA
    )
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


@pytest.mark.parametrize("path", sorted(SAMPLING.glob("*.py")), ids=lambda p: p.name)
def test_sampling_math_imports_torch_and_stdlib_only(path):
    allowed = {"torch", "__future__"} | set(sys.stdlib_module_names)
    bad = sorted(
        name
        for name in _imports(path)
        if name.split(".")[0] not in allowed and not name.startswith("minedraft_sglang.sampling")
    )
    assert not bad, f"sampling/{path.name} imports {bad}"


def _sglang_free(path: Path, seen: set[Path]) -> list[str]:
    """SGLang imports of ``path`` and of the package modules it imports, transitively."""
    if path in seen:
        return []
    seen.add(path)
    bad = []
    for name in _imports(path):
        if name.split(".")[0] in ("sglang", "sgl_kernel"):
            bad.append(f"{path.relative_to(PACKAGE)}: {name}")
        elif name.startswith("minedraft_sglang."):
            parts = name.split(".")[1:]
            for cut in range(len(parts), 0, -1):
                module = PACKAGE.joinpath(*parts[:cut])
                for candidate in (module.with_suffix(".py"), module / "__init__.py"):
                    if candidate.is_file():
                        bad += _sglang_free(candidate, seen)
                        break
                else:
                    continue
                break
    return bad


@pytest.mark.parametrize("path", sorted(DRAFTERS.glob("*.py")), ids=lambda p: p.name)
def test_drafters_need_no_sglang(path):
    bad = _sglang_free(path, set())
    assert not bad, f"drafters/{path.name} reaches SGLang: {bad}"


def test_the_psd_loop_needs_no_sglang():
    """The loop reaches the target only through the calls it is given (``worker.py`` adapts SGLang's)."""
    bad = _sglang_free(PACKAGE / "psd_loop.py", set())
    assert not bad, f"psd_loop.py reaches SGLang: {bad}"
