"""Hooks that let stock SGLang run on CPU with tensor parallelism and
torch.compile (registered by ``plugin.py`` from ``AROUND_HOOKS``;
``docs/design.md``, "Tensor parallelism and graphs on CPU").
"""

from __future__ import annotations

import inspect

import torch


def init_model_parallel_group_around(original, *args, **kwargs):
    """No CUDA communicators on a gloo (CPU) group.

    SGLang 0.5.23 builds a PyNcclCommunicator for every group unless the
    platform is NPU or XPU, which fails in every CPU TP rank ("Expected a cuda
    device"), and tries its CUDA custom all-reduce (a warning); gloo does the
    CPU collectives without either.
    """
    bound = inspect.signature(original).bind(*args, **kwargs)
    if bound.arguments["backend"] == "gloo":
        bound.arguments["use_pynccl"] = False
        bound.arguments["use_custom_allreduce"] = False
    return original(*bound.args, **bound.kwargs)


def register_cpu_compile_fake_around(original, op_name):
    """Skip the torch.compile fake of an sgl_kernel op that does not exist.

    The CPU graph runner registers fakes for every sgl-kernel CPU op, and
    registering one for a missing op raises; our pure-torch op set
    (``cpu/kernels/``) leaves the AMX compute kernels out on purpose, so SGLang
    never calls them and they need no fake.
    """
    if hasattr(torch.ops.sgl_kernel, op_name):
        return original(op_name)
    return lambda fake: fake


AROUND_HOOKS = {
    "sglang.srt.distributed.parallel_state.init_model_parallel_group": init_model_parallel_group_around,
    "sglang.srt.model_executor.cpu_graph_runner.register_cpu_compile_fake": register_cpu_compile_fake_around,
}
