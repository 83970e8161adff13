"""Training objectives: how rows become batches, and what loss a batch yields.

The training loop (`llm_mcp.train.run`) knows nothing about the loss: it asks the job's
objective to encode the rows, collate micro-batches, count the targets a step is normalised
by, and return the summed loss of a batch. A new objective (a preference loss, say) is a new
class registered in `OBJECTIVES`, plus its name in `JobConfig.objective`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.train.encode import IGNORE, EncodeStats, collate, encode_rows


class Objective(Protocol):
    """What the loop needs from a loss. Losses are sums; the loop divides by the global target count."""

    name: str

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


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropy over label positions, computing logits only there.

    Runs the decoder, gathers the positions whose next token is trained on, and applies the LM
    head and the (fp32) cross-entropy to those alone: prompt and padding positions never pay for
    the vocabulary projection. Falls back to full logits for models without the usual layout.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = getattr(causal_lm, "base_model", None), causal_lm.get_output_embeddings()
        self.split = decoder is not None and decoder is not causal_lm and head is not None
        self.decoder, self.head = (decoder, head) if self.split else (None, None)

    def forward(self, input_ids, attention_mask, labels):
        targets = labels[:, 1:]
        mask = targets != IGNORE
        if self.split:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            logits = self.head(hidden[mask])
            return torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")


class CausalLMObjective:
    """Supervised fine-tuning: next-token cross-entropy on the completion (or all) tokens."""

    name = "causal_lm"

    def encode(self, tok, rows, cfg: JobConfig):
        return encode_rows(tok, rows, cfg.max_seq_len, cfg.train_on)

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


OBJECTIVES: dict[str, type] = {"causal_lm": CausalLMObjective}


def objective_for(cfg: JobConfig) -> Objective:
    """The objective a job config names."""
    return OBJECTIVES[cfg.objective]()
