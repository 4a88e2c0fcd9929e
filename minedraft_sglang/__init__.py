"""minedraft-sglang: batch parallel speculative decoding (MineDraft / PSD) for SGLang.

Installed next to ``sglang``, the plugin (``minedraft_sglang.plugin``) adds
``--speculative-algorithm MINEDRAFT`` and the ``--minedraft-*`` flags to the
stock ``python -m sglang.launch_server``.
"""

__version__ = "0.1.0"
