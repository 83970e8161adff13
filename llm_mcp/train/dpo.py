"""Direct Preference Optimization (Rafailov et al. 2023) as a training objective.

Each preference row {prompt, chosen, rejected} becomes two sequences sharing the prompt; a
micro-batch of B pairs is one forward over 2B sequences (chosen first, then rejected). The
policy's summed log-probability of each answer's tokens is compared with the reference's:

    d    = beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))]
    loss = -(1 - eps) * log sigmoid(d) - eps * log sigmoid(-d)      (eps = label_smoothing, cDPO)

The reference is the model as the job starts, before any step: the base model (a new LoRA,
DoRA or sparse adapter starts as the identity) or, with init_from, the SFT model. Its
log-probs are computed once, at start, for every pair (TRL's precompute_ref_log_probs): no
second copy of the model is kept. Checkpoints carry them, so a resume reuses them exactly. Reward
accuracy is the fraction of pairs whose implicit reward beta * (log pi - log ref) ranks chosen above rejected.
"""

from __future__ import annotations

import torch

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.modeling.encode import collate, encode_pairs, pair_sequences
from llm_mcp.modeling.positions import SequenceLogps


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """(per-pair losses, chosen rewards, rejected rewards) from [chosen..., rejected...] log-probs."""
    pc, pr = policy.chunk(2)
    rc, rr = reference.to(policy.dtype).chunk(2)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    d = chosen - rejected
    losses = -(1 - label_smoothing) * torch.nn.functional.logsigmoid(
        d
    ) - label_smoothing * torch.nn.functional.logsigmoid(-d)
    return losses, chosen.detach(), rejected.detach()


class DPOObjective:
    """Preference tuning: the DPO loss of each pair, summed; the loop divides by the number of pairs."""

    name = "dpo"
    needs_reference = True  # the loop fills each example's "ref" before the first step (llm_mcp.train.run)

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        self.beta, self.label_smoothing = beta, label_smoothing
        self._sums = torch.zeros(5, dtype=torch.float64)  # correct, margin, chosen, rejected, pairs

    @classmethod
    def from_config(cls, cfg: JobConfig) -> DPOObjective:
        assert cfg.dpo is not None, "a DPO job's config has its dpo section"
        return cls(cfg.dpo.beta, cfg.dpo.label_smoothing)

    def encode(self, tok, rows, cfg: JobConfig):
        return encode_pairs(tok, rows, cfg.max_seq_len)

    def length(self, example: dict) -> int:
        return len(example["prompt"]) + max(len(example["chosen"]), len(example["rejected"]))

    def collate(self, examples, pad_id):
        seqs = [s for e in examples for s in pair_sequences(e)]
        batch = collate(seqs[0::2] + seqs[1::2], pad_id)  # chosen rows first, then rejected
        if all("ref" in e for e in examples):
            batch["ref_logps"] = torch.tensor(
                [e["ref"][0] for e in examples] + [e["ref"][1] for e in examples], dtype=torch.float64
            )
        return batch

    def targets(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def wrap(self, model):
        return SequenceLogps(model)

    def loss_sum(self, wrapped, batch):
        if "ref_logps" not in batch:
            raise RuntimeError("DPO batch without reference log-probs: call reference() first")
        policy = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])
        losses, chosen, rejected = dpo_losses(policy, batch["ref_logps"], self.beta, self.label_smoothing)
        self._sums += (
            torch.stack(
                [
                    (chosen > rejected).sum(),
                    (chosen - rejected).sum(),
                    chosen.sum(),
                    rejected.sum(),
                    torch.tensor(len(chosen)),
                ]
            )
            .double()
            .cpu()
        )
        return losses.sum()

    @torch.no_grad()
    def reference(self, wrapped, examples: list[dict], pad_id: int, batch_size: int, device) -> None:
        """Store each example's reference log-probs (chosen, rejected) under "ref", from the model as it is now."""
        todo = sorted((i for i, e in enumerate(examples) if "ref" not in e), key=lambda i: self.length(examples[i]))
        was_training = wrapped.training
        wrapped.eval()
        for start in range(0, len(todo), batch_size):
            chunk = [examples[i] for i in todo[start : start + batch_size]]
            batch = {k: v.to(device) for k, v in self.collate(chunk, pad_id).items()}
            logps = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"]).double().cpu()
            for j, e in enumerate(chunk):
                e["ref"] = (logps[j].item(), logps[len(chunk) + j].item())
        wrapped.train(was_training)

    def pop_metrics(self, reduce) -> dict[str, float]:
        """Reward accuracy, margin and mean rewards since the last call, summed over processes by `reduce`."""
        sums = reduce(self._sums.clone())
        self._sums.zero_()
        n = float(sums[4])
        if not n:
            return {}
        return {
            "reward_accuracy": round(float(sums[0]) / n, 6),
            "reward_margin": round(float(sums[1]) / n, 6),
            "chosen_reward": round(float(sums[2]) / n, 6),
            "rejected_reward": round(float(sums[3]) / n, 6),
        }
