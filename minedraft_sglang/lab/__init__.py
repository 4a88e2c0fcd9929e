"""The lab: everything around the engine that measures, builds or demonstrates
it, never imported by it (``tests/unit/test_layering.py`` enforces that).

Its dependencies are the ``lab`` extra: ``pip install "minedraft-sglang[lab]"``.
Manuals: ``docs/lab.md``.
"""
