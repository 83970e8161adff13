"""Which examples each optimizer step trains on: a pure function of (seed, step), so resume is exact."""

from __future__ import annotations

import torch

from llm_mcp.core.jobconfig import JobConfig


class BatchOrder:
    """Which examples each step trains on: a pure function of (seed, step), so resume is exact.

    Each epoch shuffles the examples; with group_by_length, examples are then sorted by length
    inside mega-chunks of 32 steps and those steps are shuffled, so a batch holds sequences of
    similar length and little compute goes to padding.
    """

    def __init__(self, lengths: list[int], cfg: JobConfig, world: int):
        self.lengths, self.cfg, self.world = lengths, cfg, world
        self.per_step = cfg.batch_size * cfg.gradient_accumulation * world
        self.steps_per_epoch = len(lengths) // self.per_step
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _steps_of(self, epoch: int) -> list[list[int]]:
        if self._epoch and self._epoch[0] == epoch:
            return self._epoch[1]
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        if self.cfg.group_by_length:
            mega = self.per_step * 32
            steps = []
            for start in range(0, len(perm), mega):
                chunk = sorted(perm[start : start + mega], key=lambda i: -self.lengths[i])
                steps += [chunk[k : k + self.per_step] for k in range(0, len(chunk) - self.per_step + 1, self.per_step)]
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        else:
            steps = [perm[k * self.per_step : (k + 1) * self.per_step] for k in range(self.steps_per_epoch)]
        self._epoch = (epoch, steps)
        return steps

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of each micro-batch this rank runs at `step`."""
        epoch, idx = divmod(step, self.steps_per_epoch)
        chunk = self._steps_of(epoch)[idx]
        bs, world = self.cfg.batch_size, self.world
        return [
            chunk[(m * world + rank) * bs : (m * world + rank + 1) * bs] for m in range(self.cfg.gradient_accumulation)
        ]
