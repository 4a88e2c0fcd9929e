"""Step records and the overlap ratio."""

from __future__ import annotations

import pytest

from minedraft_sglang.metrics import overlap_ratio


def test_overlap_ratio():
    assert overlap_ratio((0, 1), (0, 2), 2) == pytest.approx(1.0)
    assert overlap_ratio((0, 1), (1, 3), 3) == pytest.approx(0.0)
    assert overlap_ratio((0, 1), (0.5, 2.5), 2.5) == pytest.approx(0.5)
