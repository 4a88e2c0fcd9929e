"""CPU serving: the server command (``server.py``), the cores each stage
runs on (``affinity.py``), pure-torch ``sgl_kernel`` ops (``kernels/``) and
the hooks stock SGLang needs on CPU (``hooks.py``)."""
