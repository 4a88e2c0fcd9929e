"""Per-step timing: the overlap ratio, the optional JSON-lines trace."""

from __future__ import annotations

import json
import os
import threading
from typing import Optional


def overlap_ratio(draft: tuple[float, float], verify: tuple[float, float], step: float) -> float:
    """(draft + verify - step) / min(draft, verify): 1.0 when the shorter
    stage is fully hidden behind the longer one, 0.0 when they run back to back."""
    d = draft[1] - draft[0]
    v = verify[1] - verify[0]
    shortest = min(d, v)
    if shortest <= 0:
        return 0.0
    return max(0.0, min(1.0, (d + v - step) / shortest))


class StepTracer:
    def __init__(self, path: Optional[str]):
        self.path = path
        self.count = 0
        self.mode_counts: dict[str, int] = {}
        self.overlap_sum = 0.0
        self._lock = threading.Lock()

    def summary(self) -> dict:
        psd = self.mode_counts.get("psd", 0)
        return {
            "steps": dict(self.mode_counts),
            "mean_overlap_ratio": self.overlap_sum / psd if psd else None,
        }

    def step(self, mode, draft, verify, verify_bs, draft_bs, draft_thread: str) -> dict:
        start = min(draft[0], verify[0])
        step = max(draft[1], verify[1]) - start
        record = {
            "step": self.count,
            "pid": os.getpid(),
            "mode": mode,
            "draft": list(draft),
            "verify": list(verify),
            "verify_bs": verify_bs,
            "draft_bs": draft_bs,
            "overlap": overlap_ratio(draft, verify, step),
            "draft_thread": draft_thread,
        }
        self.count += 1
        self.mode_counts[mode] = self.mode_counts.get(mode, 0) + 1
        if mode == "psd":
            self.overlap_sum += record["overlap"]
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record
