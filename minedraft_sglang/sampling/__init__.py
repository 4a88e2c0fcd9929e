"""The tensor math of verification, free of SGLang: it imports torch only
(``tests/unit/test_layering.py`` enforces that), so it runs and is tested on a
machine without SGLang, a GPU included.

- ``acceptance``: greedy acceptance and rejection sampling of chain drafts.
- ``tetris``: TETRIS, which draft positions a batch-wide budget verifies.
- ``probs``: the distributions the target samples from (temperature, top-k/p, min-p).
- ``penalties``: exact frequency/presence/repetition penalties and
  min_new_tokens at every position of a chain.
"""
