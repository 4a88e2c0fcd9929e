"""Which running request belongs to which of PSD's two sub-batches.

A pure bookkeeping class (no tensors, no SGLang) so its invariants are easy to
test: every running request is in exactly one sub-batch, the sub-batch to
verify alternates every step, and the two halves stay within one request of
each other.
"""

from __future__ import annotations

from collections.abc import Sequence


class SubBatches:
    def __init__(self) -> None:
        self.group: dict[str, int] = {}
        # The sub-batch the target verifies in the next step; the other one is
        # drafted at the same time.
        self.turn = 0

    def split(self, rids: Sequence[str]) -> tuple[list[int], list[int]]:
        """Assign ``rids`` (the running batch, in order) for this step and
        return (rows to verify, rows to draft). Call once per decode step."""
        present = set(rids)
        for rid in [r for r in self.group if r not in present]:
            del self.group[rid]
        verify, draft = self.turn, 1 - self.turn
        for rid in rids:
            if rid not in self.group:
                # Ties go to the drafted half: a newcomer is then drafted
                # in this step and verified in the next.
                sizes = self.sizes()
                self.group[rid] = verify if sizes[verify] < sizes[draft] else draft
        self._rebalance(rids)
        self.turn = draft
        rows = ([], [])
        for i, rid in enumerate(rids):
            rows[0 if self.group[rid] == verify else 1].append(i)
        return rows

    def sizes(self) -> list[int]:
        sizes = [0, 0]
        for g in self.group.values():
            sizes[g] += 1
        return sizes

    def _rebalance(self, rids: Sequence[str]) -> None:
        sizes = self.sizes()
        big = 0 if sizes[0] > sizes[1] else 1
        excess = (sizes[big] - sizes[1 - big]) // 2
        # Newest requests move: the oldest keep their rhythm.
        for rid in reversed(rids):
            if excess == 0:
                break
            if self.group[rid] == big:
                self.group[rid] = 1 - big
                excess -= 1
