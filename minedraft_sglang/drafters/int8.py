"""A standalone drafter's weights in int8 (``--minedraft-draft-weights``).

A draft step at the batch sizes of decoding reads every weight once for a few
rows of activations, so its time is the time to stream the weights. Stored as
int8 with one scale per output row (weight-only: activations, norms,
attention and the embedding stay in the drafter's dtype), a linear layer
reads half the bytes of bfloat16, and PyTorch's CPU kernel for it
(``aten._weight_int8pack_mm``) streams them faster besides: on the 2-core
AMD EPYC VM (2026-12-06, 2 threads) the 0.5B drafter's 168 layer matrices
took 12.1 ms for one row of activations against 29.0 ms with ``F.linear`` in
bfloat16, its LM head 3.4 against 11.6 ms. The kernel loses its lead as rows
grow (8 rows: 29.1 against 39.9 ms; 16: 47.5 against 48.3; 64: 153.5 against
91.1; a drafter prefill of a 220-token prompt took 540 ms against 240), so
forwards of ``WIDE_ROWS`` rows or more (prefills, catch-ups, wide first
steps) use the loaded weights, kept beside the int8 copy: a linear layer's
memory grows by half.

The drafts change a little (a rounding of each weight to 1/254 of its row's
largest); the output does not: the target verifies every draft, and with
sampling the acceptance test uses the probabilities the drafter actually
drafted from.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Rows of activations (tokens x requests) from which a forward uses the loaded
# weights: the int8 kernel's time grows faster with rows than F.linear's.
WIDE_ROWS = 16


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 copy of its weight [out, in] and a scale
    per output row (symmetric: w ~ q * scale, q in [-127, 127]), used for
    inputs of fewer than ``WIDE_ROWS`` rows; wider ones use ``weight``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(linear.weight.dtype))
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``x`` [..., in] -> [..., out], or [..., rows]: only the first
        ``rows`` outputs (views of the weights, no copy)."""
        q, s, w, b = self.qweight, self.scales, self.weight, self.bias
        if rows is not None:
            q, s, w, b = q[:rows], s[:rows], w[:rows], None if b is None else b[:rows]
        if x.numel() >= WIDE_ROWS * x.shape[-1]:
            return F.linear(x, w, b)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, s).view(*x.shape[:-1], -1)
        return y if b is None else y + b


def quantize(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (layers and LM head) replaced by an
    ``Int8Linear``, in place (a head tied to the embedding stays tied)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


def head_rows(head: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """Logits of the first ``rows`` of ``head`` (an ``nn.Linear`` or an
    ``Int8Linear``) for hidden states ``x``."""
    if isinstance(head, Int8Linear):
        return head(x, rows)
    return F.linear(x, head.weight[:rows], None if head.bias is None else head.bias[:rows])
