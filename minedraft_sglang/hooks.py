"""The one place MineDraft changes SGLang's scheduler behaviour.

A PSD step verifies only one of the two sub-batches, so the worker returns
results for those rows alone (``result.minedraft_rows``). The scheduler's
decode-result processing is run on a view of the running batch holding just
those rows; the other half is untouched until its own turn.
"""

from __future__ import annotations


def process_batch_result_decode_around(original, processor, batch, result):
    rows = getattr(result, "minedraft_rows", None)
    if rows is None:
        return original(processor, batch, result)
    from minedraft_sglang.verify import sub_batch_view

    return original(processor, sub_batch_view(batch, rows), result)
