"""Stand-in for sgl_kernel's compiled ``common_ops`` extension (CPU mode only).

``sgl_kernel/load_utils.py`` ends with a plain ``import common_ops`` when its
CUDA library cannot load; with this directory on PYTHONPATH that import lands
here, ``import sgl_kernel`` succeeds, and importing this module registers the
pure-torch ops. ``sgl_kernel``'s own Python wrappers (``copy_all_layer_kv_cache_cpu``,
``verify_tree_greedy_cpu``, ...) then call them through ``torch.ops.sgl_kernel``.

``ops.py`` is loaded by file path rather than as ``minedraft_sglang.cpu.kernels.ops``:
this runs in the middle of SGLang's imports, where importing the plugin package
(which imports SGLang) could be circular, and it works without the package installed.
"""

import importlib.util
import sys
from pathlib import Path

_NAME = "_minedraft_cpu_kernel_ops"
_spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).resolve().parent.parent / "ops.py")
_ops = importlib.util.module_from_spec(_spec)
sys.modules[_NAME] = _ops
_spec.loader.exec_module(_ops)
_ops.register()
