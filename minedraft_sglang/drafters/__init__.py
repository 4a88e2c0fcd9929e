"""Drafters: one module per kind, all behind ``base.Drafter``."""

from __future__ import annotations

import torch

from minedraft_sglang.config import MineDraftConfig
from minedraft_sglang.drafters.base import Drafter


def create_drafter(config: MineDraftConfig, model_path: str, target_dtype: torch.dtype) -> Drafter:
    from minedraft_sglang.drafters.standalone import StandaloneDrafter

    # Half precision is for accelerators; on CPU the drafter computes in fp32.
    dtype = torch.float32 if config.draft_device == "cpu" else target_dtype
    return StandaloneDrafter(model_path, config.draft_device, dtype)
