"""Group Relative Policy Optimization (Shao et al. 2024) as a training objective, checked against TRL 1.16.

Each step, every prompt of the step's micro-batches gets num_generations completions sampled from the
current policy (llm_mcp.train.rollout), scored by the job's graders. Within a prompt's group of G:

    A_i   = (r_i - mean(r)) / (std(r) + 1e-4)        (scale_rewards='none': r_i - mean(r); std unbiased)
    ratio = exp(log pi(t) - log pi_old(t))            per completion token t; pi_old = the sampling policy
    l(t)  = -min(ratio * A_i, clip(ratio, 1-eps, 1+eps) * A_i) + kl_coef * KL(t)
    KL(t) = [exp(ref(t) - log pi(t)) - (ref(t) - log pi(t)) - 1] * ratio    (k3; ref = the starting model)

One optimisation pass per generation batch (TRL's num_iterations=1), so pi_old is pi detached and the ratio
is 1 in value, as in TRL; the KL term times the ratio gives the unbiased reverse-KL gradient (TRL's
use_bias_correction_kl, on by default, DeepSeek-V3.2). The losses are summed and the loop divides by
`targets`: completion tokens ('dapo', TRL's default), or completions ('grpo': each completion's token
mean; 'dr_grpo': its token sum over max_new_tokens). The reference of the KL term is the trainable weights
as the job started (kept as a copy of the adapter only, swapped in for one forward), so no second model is
loaded; kl_coef 0 (the default) skips it.
"""

from __future__ import annotations

import torch

from llm_mcp.core.graders import GraderSpec
from llm_mcp.core.jobconfig import GRPOSettings, JobConfig
from llm_mcp.modeling.encode import IGNORE, EncodeStats, prompt_ids
from llm_mcp.modeling.positions import TokenLogps
from llm_mcp.train.rollout import rollout

METRICS = ("reward", "completions", "groups", "zero_spread", "group_std", "tokens", "loss_tokens", "clipped", "kl")


def token_losses(logps, advantages, epsilon: float, kl_coef: float, ref_logps=None):
    """(per-token loss, per-token KL or None, per-token clipped flag) for one optimisation pass (pi_old = pi)."""
    ratio = torch.exp(logps - logps.detach())
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    kl = None
    if kl_coef:
        delta = ref_logps.to(logps.dtype) - logps
        kl = (torch.exp(delta) - delta - 1) * ratio  # x ratio (1 in value): the unbiased reverse-KL gradient
        loss = loss + kl_coef * kl
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, kl, clipped


class GRPOObjective:
    """GRPO: rollouts each step, then the clipped policy-gradient loss, summed; the loop divides by `targets`."""

    name = "grpo"
    needs_reference = False  # the KL reference is the starting adapter, kept by remember_start

    def __init__(self, settings: GRPOSettings, seed: int = 0):
        self.settings, self.seed = settings, seed
        self.graders = [GraderSpec.model_validate(g.model_dump()) for g in settings.graders]
        self.start: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None  # kl_coef > 0: (weight, as it started)
        self._sums = torch.zeros(len(METRICS) + len(self.graders), dtype=torch.float64)
        self.timing = [0.0, 0.0, 1.0]  # rollout seconds, completion tokens sampled (since last pop), this process

    @classmethod
    def from_config(cls, cfg: JobConfig) -> GRPOObjective:
        assert cfg.grpo is not None, "a GRPO job's config has its grpo section"
        return cls(cfg.grpo, cfg.seed)

    def encode(self, tok, rows, cfg: JobConfig):
        """Examples {prompt: ids, row}; a prompt longer than max_seq_len - max_new_tokens keeps its end."""
        stats, out = EncodeStats(), []
        room = max(1, cfg.max_seq_len - self.settings.max_new_tokens)
        for row in rows:
            ids = prompt_ids(tok, row["prompt"])
            if len(ids) > room:
                stats.truncated += 1
                ids = ids[-room:]
            stats.examples += 1
            stats.tokens += len(ids)
            stats.by_format["prompt"] = stats.by_format.get("prompt", 0) + 1
            out.append({"prompt": list(ids), "row": row})
        return out, stats

    def length(self, example: dict) -> int:
        return len(example["prompt"])

    def collate(self, examples, pad_id):
        raise RuntimeError("GRPO batches come from rollout(), which samples the completions")

    def rollout(self, run, s, groups: list[list[dict]], step: int) -> list[dict[str, torch.Tensor]]:
        """Sample and score this step's completions with the policy as it is now: the step's batches."""
        return rollout(self, run, s, groups, step)

    def remember_start(self, trainable: list[torch.nn.Parameter]) -> None:
        """Keep the trainable weights as the job starts (before a resume loads its checkpoint): the KL reference."""
        if self.settings.kl_coef:
            self.start = [(p, p.detach().clone()) for p in trainable]

    def targets(self, batch):
        if self.settings.loss_type == "dapo":
            return (batch["labels"][:, 1:] != IGNORE).sum()
        return torch.tensor(batch["input_ids"].shape[0])

    def wrap(self, model):
        return TokenLogps(model)

    def loss_sum(self, wrapped, batch):
        s = self.settings
        logps, rows = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"])
        advantages = batch["advantages"].to(logps.dtype)[rows]
        loss, kl, clipped = token_losses(logps, advantages, s.epsilon, s.kl_coef, batch.get("ref_logps"))
        with torch.no_grad():
            self._sums[METRICS.index("loss_tokens")] += len(logps)
            self._sums[METRICS.index("clipped")] += float(clipped.sum())
            if kl is not None:
                self._sums[METRICS.index("kl")] += float(kl.sum())
        if s.loss_type == "dapo":
            return loss.sum()
        per_row = torch.zeros(batch["input_ids"].shape[0], device=loss.device, dtype=loss.dtype).index_add(
            0, rows, loss
        )
        if s.loss_type == "dr_grpo":
            return per_row.sum() / s.max_new_tokens
        counts = torch.zeros_like(per_row).index_add(0, rows, torch.ones_like(loss))
        return (per_row / counts.clamp(min=1)).sum()

    def add_scores(self, rewards: torch.Tensor, scores: list[dict[str, float]], std: torch.Tensor, tokens: int) -> None:
        """Count one micro-batch's rewards into the metrics (`std`: each completion's group std)."""
        g = self.settings.num_generations
        group_std = std.view(-1, g)[:, 0]
        sums = [
            float(rewards.sum()),
            len(rewards),
            len(group_std),
            float((group_std < 1e-6).sum()),
            float(group_std.sum()),
            tokens,
            0.0,
            0.0,
            0.0,
        ]
        sums += [sum(s[spec.label] for s in scores) for spec in self.graders]
        self._sums += torch.tensor(sums, dtype=torch.float64)

    def pop_metrics(self, reduce) -> dict[str, float]:
        """Rewards (overall and per grader), their spread, completion length, clip fraction, KL, rollout speed."""
        timing = reduce(torch.tensor(self.timing, dtype=torch.float64))
        sums = reduce(self._sums.clone())
        self._sums.zero_()
        self.timing = [0.0, 0.0, 1.0]
        m = dict(zip(METRICS, sums[: len(METRICS)].tolist()))
        n, tokens = max(m["completions"], 1), max(m["loss_tokens"], 1)
        mean = m["reward"] / n
        out = {
            "reward": round(mean, 6),
            "reward_std": round(m["group_std"] / max(m["groups"], 1), 6),
            "zero_spread": round(m["zero_spread"] / max(m["groups"], 1), 4),
            "completion_length": round(m["tokens"] / n, 2),
            "clip_fraction": round(m["clipped"] / tokens, 6),
            "rollout_s": round(float(timing[0] / timing[2]), 4),  # per process
            "rollout_tokens_per_s": round(float(timing[1] * timing[2] / max(float(timing[0]), 1e-9)), 1),  # all
        }
        if self.settings.kl_coef:
            out["kl"] = round(m["kl"] / tokens, 6)
        for spec, total in zip(self.graders, sums[len(METRICS) :].tolist()):
            out[f"reward/{spec.label}"] = round(total / n, 6)
        return out
