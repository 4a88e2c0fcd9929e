"""launch/gpu_smoke.sh (issue 21): its CPU part runs without SGLang, one line
per check; the chain mask its FlashInfer check hands the GPU is the one
SGLang's tree kernel builds (checked against our CPU twin of that kernel,
which writes the CUDA kernel's FULL_MASK layout)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from test_gpu_check import run_without_sglang

from minedraft_sglang.cpu.kernels import ops
from minedraft_sglang.lab import gpu_smoke

REPO = Path(__file__).resolve().parents[2]


def test_cpu_part_runs_without_sglang_one_line_per_check():
    result = run_without_sglang("gpu_smoke", ["--cpu-smoke"])
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert all(re.match(r"^(PASS|FAIL|SKIP) \S+ \(\d+\.\d+s\): ", line) for line in lines), lines
    assert lines[-1].startswith("PASS total") and "0 failed" in lines[-1]
    assert sum(line.startswith("PASS") for line in lines) >= 5


def test_the_script_is_one_command():
    script = REPO / "launch" / "gpu_smoke.sh"
    assert os.access(script, os.X_OK)
    assert "minedraft_sglang.lab.gpu_smoke" in script.read_text()


@pytest.mark.parametrize("width", [2, 3, 5])
def test_chain_mask_is_sglangs_full_mask_layout(width):
    ops.register()
    seq_lens = torch.tensor([1, 9, 4])
    bs, k = len(seq_lens), width - 1
    mask = torch.ones(int(seq_lens.sum()) * width + bs * width * width, dtype=torch.bool)
    retrieve = torch.full((3, bs, width), -1)
    torch.ops.sgl_kernel.build_tree_kernel_efficient_cpu(
        torch.arange(-1, (k if k > 1 else 0) - 1).repeat(bs, 1),
        torch.arange(k).repeat(bs, 1),
        seq_lens,
        mask,
        torch.zeros(bs * width, dtype=torch.long),
        retrieve[0],
        retrieve[1],
        retrieve[2],
        1,
        k,
        width,
        0,  # FULL_MASK, the GPU backends' layout
    )
    kv_lens = (seq_lens + width).tolist()
    assert torch.equal(gpu_smoke.sglang_chain_mask(kv_lens, width), mask)
