"""Pure-torch stand-ins for the few ``sgl_kernel`` CPU ops SGLang 0.5.23 calls.

Why this exists: with ``SGLANG_USE_CPU_ENGINE=1 --device cpu`` SGLang runs on a
machine without a GPU, but it still imports ``sgl_kernel`` and calls a handful
of ops from its ``torch.ops.sgl_kernel`` namespace (KV-cache copies, the
speculative-decoding bookkeeping kernels, for the ``intel_amx`` attention
backend decode/extend attention, and tensor-parallel collectives). The PyPI ``sglang-kernel`` wheel is a CUDA
build that cannot load without ``libcuda``, and no CPU wheel is published.

``ops.py`` implements those ops as plain PyTorch and registers them with
``torch.library``; ``shim/common_ops.py`` is the module ``sgl_kernel`` falls back
to importing when its CUDA library fails to load, so putting ``shim/`` on
``PYTHONPATH`` (``launch/cpu_env.sh`` does) lets the stock server run on CPU,
speculative decoding included. This is for tests and functional checks, not
speed.

``convert_weight_packed`` is deliberately absent: SGLang probes for it to decide
whether AMX kernels exist, and without it linear, norm, rope and activation
layers keep their plain-torch paths.
"""
