"""Tensor parallelism: every TP rank verifies what TP rank 0 decided.

Under ``--tp N`` SGLang runs one scheduler process per TP rank; each builds a
``MineDraftWorker`` and calls it with the same running batch every step, and
the ranks' forwards meet in collectives, so every rank must verify the same
rows with the same draft tokens. Only rank 0 holds a drafter, and with it the
sub-batches, the pending drafts, the planner and the trace. Each decode step it
decides what is verified (the rows in order, their drafts, fallbacks
included, and TETRIS's counts) and sends that to the others (``share_decision``);
after a sampled verify, rank 0's acceptance replaces theirs
(``share_acceptance``). Greedy verifies need no exchange: the logits are
all-gathered, so SGLang's greedy walk gives every rank the same result.

The two exchanges use different halves of SGLang's TP group, deliberately:

* the decision goes over its CPU (gloo) group, as SGLang's scheduler sends each
  step's new requests: every rank needs it on the host (the rows pick the
  sub-batch view, the width shapes the verify input), the drafts come from the
  drafter's device, which is none of the TP GPUs, and the largest it can be is
  known on every rank from the batch, so one broadcast of a small int64 tensor
  of that size carries it;
* the sampled acceptance goes over the device group, as SGLang's own
  ``eagle_sample`` shares its sampled verify: it lies on each rank's target
  device with a shape every rank knows, and on GPU the broadcast stays on the
  stream (no host round trip).

At ``--tp 1`` there is no link and nothing is exchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class VerifyDecision:
    """What every TP rank verifies in one decode step."""

    rows: list[int]  # rows of the running batch, in the order they are verified
    # int64, on the CPU as received (rank 0's own may be on the drafter's device):
    drafts: torch.Tensor  # [len(rows), width]
    num_drafts: torch.Tensor | None  # [len(rows)]: TETRIS's drafts to verify; None: all


class TpLink:
    """This process's place in the target's TP group, and the two exchanges."""

    def __init__(self, *, rank: int, cpu_group, device_group, src: int):
        self.rank = rank  # in the TP group
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.src = src  # TP rank 0's global rank: the source of every broadcast

    @classmethod
    def from_group(cls, group) -> TpLink | None:
        """The link of a process in ``group`` (SGLang's TP GroupCoordinator);
        None without tensor parallelism."""
        if group.world_size == 1:
            return None
        return cls(
            rank=group.rank_in_group,
            cpu_group=group.cpu_group,
            device_group=group.device_group,
            src=group.ranks[0],
        )

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def share_decision(self, decision: VerifyDecision | None, *, batch_size: int, max_width: int) -> VerifyDecision:
        """Rank 0 passes its decision, the others None; every rank gets rank
        0's. ``batch_size`` (the running batch's, the same on every rank) and
        ``max_width`` (--speculative-num-steps) bound it, so one broadcast of
        ``(batch_size + 1) x (max_width + 2)`` int64 carries it: a header row
        (rows verified, draft width, whether TETRIS counts follow), then per
        verified row its index, its TETRIS count and its drafts."""
        buf = torch.full((batch_size + 1, max_width + 2), -1, dtype=torch.int64)
        if self.leads:
            n, width = decision.drafts.shape
            if n != len(decision.rows) or n > batch_size or width > max_width:
                raise ValueError(
                    f"decision of {len(decision.rows)} rows with drafts {tuple(decision.drafts.shape)} "
                    f"does not fit a batch of {batch_size} with at most {max_width} drafts each"
                )
            buf[0, :3] = torch.tensor([n, width, decision.num_drafts is not None])
            buf[1 : n + 1, 0] = torch.tensor(decision.rows, dtype=torch.int64)
            if decision.num_drafts is not None:
                buf[1 : n + 1, 1] = decision.num_drafts
            buf[1 : n + 1, 2 : 2 + width] = decision.drafts
        self._broadcast(buf, self.cpu_group)
        if self.leads:
            return decision
        n, width, has_counts = buf[0, :3].tolist()
        body = buf[1 : n + 1]
        return VerifyDecision(
            rows=body[:, 0].tolist(),
            drafts=body[:, 2 : 2 + width].clone(),
            num_drafts=body[:, 1].clone() if has_counts else None,
        )

    def share_acceptance(
        self, predict: torch.Tensor, accept_lens: torch.Tensor, accept_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rank 0's sampled acceptance on every rank (int32 each, shapes as
        ``verify.sample_chain`` returns them), in one broadcast: a rank that
        kept its own would commit other tokens than rank 0 (its random coins
        differ, and so may its probabilities in the last bits) and the ranks'
        batches would part."""
        sizes = [predict.numel(), accept_lens.numel(), accept_index.numel()]
        packed = torch.cat([predict.flatten(), accept_lens.flatten(), accept_index.flatten()])
        self._broadcast(packed, self.device_group)
        p, a, i = packed.split(sizes)
        return p.view(predict.shape), a.view(accept_lens.shape), i.view(accept_index.shape)

    def _broadcast(self, tensor: torch.Tensor, group) -> None:
        dist.broadcast(tensor, src=self.src, group=group)
