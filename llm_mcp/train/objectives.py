"""Training objectives: how rows become batches, and what loss a batch yields.

The training loop (`llm_mcp.train.run`) knows nothing about the loss: it asks the job's
objective to encode the rows, collate micro-batches, count the targets a step is normalised
by, and return the summed loss of a batch. `causal_lm` is here; `dpo` is in `llm_mcp.train.dpo`. Which
class a job uses is its objective's `trainer` (llm_mcp.core.objectives), resolved by `objective_for`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.objectives import get_objective
from llm_mcp.modeling.encode import IGNORE, EncodeStats, collate, encode_rows
from llm_mcp.modeling.positions import LabelPositions


class Objective(Protocol):
    """What the loop needs from a loss. Losses are sums; the loop divides by the global target count."""

    name: str
    needs_reference: bool  # True: `reference` must fill each example's "ref" before the first step

    def encode(self, tok, rows: list[dict[str, Any]], cfg: JobConfig) -> tuple[list[dict], EncodeStats]:
        """Tokenize rows into examples (dicts of token lists); rows with nothing to train on are dropped."""

    def length(self, example: dict) -> int:
        """An example's length in tokens (batches group similar lengths)."""

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """Pad a micro-batch into tensors."""

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many targets the batch's loss sums over (the normaliser), as a scalar tensor."""

    def wrap(self, model) -> torch.nn.Module:
        """The module `accelerate.prepare` wraps (DDP sees one forward per micro-batch)."""

    def loss_sum(self, wrapped: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's summed loss, differentiable."""

    def reference(self, wrapped: torch.nn.Module, examples: list[dict], pad_id: int, batch_size: int, device) -> None:
        """Before the first step: record what the loss compares against (DPO's reference log-probs)."""

    def pop_metrics(self, reduce) -> dict[str, float]:
        """Objective-specific metrics since the last call, summed over processes with `reduce`."""


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropy (fp32) over label positions, computing logits only there."""

    def __init__(self, model):
        super().__init__()
        self.positions = LabelPositions(model)
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        logits, targets, _ = self.positions(input_ids, attention_mask, labels)
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


class CausalLMObjective:
    """Supervised fine-tuning: next-token cross-entropy on the completion (or all) tokens."""

    name = "causal_lm"
    needs_reference = False

    @classmethod
    def from_config(cls, cfg: JobConfig) -> CausalLMObjective:
        return cls()

    def encode(self, tok, rows, cfg: JobConfig):
        return encode_rows(tok, rows, cfg.max_seq_len, cfg.train_on, cfg.train_reasoning)

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate(self, examples, pad_id):
        return collate(examples, pad_id)

    def targets(self, batch):
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def wrap(self, model):
        return CausalLMLoss(model)

    def loss_sum(self, wrapped, batch):
        return wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def reference(self, wrapped, examples, pad_id, batch_size, device) -> None:
        return None

    def pop_metrics(self, reduce) -> dict[str, float]:
        return {}


def objective_for(cfg: JobConfig) -> Objective:
    """The loss of the objective a job config names: the class its table entry's `trainer` points to
    (llm_mcp.core.objectives), built from the config."""
    module, _, name = get_objective(cfg.objective).trainer.partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_config(cfg)
