"""Logits at label positions only: what every objective's forward (and an evaluation's log-probs) is built on."""

from __future__ import annotations

import torch

from llm_mcp.modeling.encode import IGNORE


class LabelPositions(torch.nn.Module):
    """Logits at the positions whose next token is a label, and those labels.

    Runs the decoder, gathers the positions whose next token is trained on, and applies the LM
    head there alone: prompt and padding positions never pay for the vocabulary projection.
    Falls back to full logits for models without the usual decoder + head layout.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = getattr(causal_lm, "base_model", None), causal_lm.get_output_embeddings()
        self.split = decoder is not None and decoder is not causal_lm and head is not None
        self.decoder, self.head = (decoder, head) if self.split else (None, None)

    def forward(self, input_ids, attention_mask, labels):
        """(logits [n, vocab], targets [n], mask [batch, len-1]) for the n label positions."""
        targets = labels[:, 1:]
        mask = targets != IGNORE
        if self.split:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            return self.head(hidden[mask]), targets[mask], mask
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return logits[mask], targets[mask], mask


class TokenLogps(torch.nn.Module):
    """log p(token) at every label position (flat, row-major), and the row each belongs to; the LM head runs at
    those positions only."""

    def __init__(self, model):
        super().__init__()
        self.positions = LabelPositions(model)
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        logits, targets, mask = self.positions(input_ids, attention_mask, labels)
        logps = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
        return logps, rows


class SequenceLogps(TokenLogps):
    """Per-sequence sum of log p(token) over label positions."""

    def forward(self, input_ids, attention_mask, labels):
        logps, rows = super().forward(input_ids, attention_mask, labels)
        return torch.zeros(input_ids.shape[0], device=logps.device).index_add(0, rows, logps)
