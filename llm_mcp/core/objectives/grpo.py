"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) on prompt rows, rewarded by graders.

For each prompt the job samples num_generations completions from the current policy, scores them with the
request's graders (llm_mcp.core.graders), normalises the rewards within the prompt's group, and takes the
clipped policy-gradient step; the loss is in llm_mcp.train.grpo. Defaults are TRL 1.16's GRPOConfig
(8 generations, loss_type 'dapo', clip 0.2, KL coefficient 0: no reference forward), except max_new_tokens
(256, TRL 512). The learning rate defaults to the model's LoRA rate: Thinking Machines' "LoRA Without
Regret" (2025) found RL's best LoRA rate about the same as SFT's.
"""

from __future__ import annotations

from typing import Any

from llm_mcp.core.graders import GRADERS, GraderSpec, check_graders, describe
from llm_mcp.core.jobconfig import GRPOSettings, JobConfig
from llm_mcp.core.objectives.base import Objective
from llm_mcp.core.request import field_default
from llm_mcp.core.rollouts import MAX_PENDING

# request field -> GRPOSettings field, where they differ
RENAMED = {"clip_epsilon": "epsilon"}


class GRPO(Objective):
    name = "grpo"
    title = "reinforcement learning from rewards (GRPO)"
    short = "GRPO"
    row_formats = ("prompt",)
    rows_hint = "'prompt' (a string or a message list) and the fields its graders read, e.g. 'answer'"
    options = (
        "graders",
        "num_generations",
        "max_new_tokens",
        "temperature",
        "loss_type",
        "clip_epsilon",
        "kl_coef",
        "scale_rewards",
    )
    sections = ("grpo",)
    samples = True
    trainer = "llm_mcp.train.grpo:GRPOObjective"
    flops_factor = 3.0  # sampling is 40-65% of a step (docs/BENCHMARKS.md): a step costs ~2-3 training passes

    def check(self, request: Any, problems: list[str]) -> None:
        if request.train_on is not None:
            problems.append(
                "train_on does not apply to objective='grpo': its loss is on the sampled completions; drop train_on"
            )
        held_out = [k for k in ("eval_dataset", "eval_fraction", "eval_every") if getattr(request, k, None)]
        if held_out:
            problems.append(
                f"{held_out} do not apply to objective='grpo' (its loss is no yardstick); score held-out prompts with "
                "evaluate(targets=[...], dataset=..., graders=[...]) instead"
            )
        new_tokens = request.max_new_tokens or field_default(GRPOSettings, "max_new_tokens")
        seq_len = request.max_seq_len or field_default(JobConfig, "max_seq_len")
        if new_tokens >= seq_len:
            problems.append(
                f"max_new_tokens={new_tokens} leaves no room for the prompt in max_seq_len={seq_len}; give "
                f"max_seq_len above max_new_tokens + the longest prompt, or a smaller max_new_tokens"
            )
        if not request.graders:
            if any(p.startswith("graders") for p in problems):
                return  # given, but refused: those problems say why
            problems.append(
                f"graders is required with objective='grpo': how each completion is scored, e.g. [{{'grader': "
                f"'numeric', 'field': 'answer'}}]; graders: {list(GRADERS)}"
            )
            return
        problems += check_graders(request.graders)
        if any(g.grader == "agent" for g in request.graders):
            self._check_agent(request, problems)

    def _check_agent(self, request: Any, problems: list[str]) -> None:
        if (request.num_processes or 1) > 1:
            problems.append("an agent grader scores one process's completions: drop num_processes (or set it to 1)")
        sizes = {k: getattr(request, k) or field_default(JobConfig, k) for k in ("batch_size", "gradient_accumulation")}
        generations = request.num_generations or field_default(GRPOSettings, "num_generations")
        per_step = sizes["batch_size"] * sizes["gradient_accumulation"] * generations
        if per_step > MAX_PENDING:
            problems.append(
                f"an agent grader scores at most {MAX_PENDING} completions a step, but batch_size x "
                f"gradient_accumulation x num_generations = {sizes['batch_size']} x {sizes['gradient_accumulation']} "
                f"x {generations} = {per_step}; lower batch_size or num_generations"
            )

    def job_settings(self, request: Any) -> dict[str, Any]:
        given = {RENAMED.get(k, k): getattr(request, k) for k in self.options if getattr(request, k) is not None}
        given["graders"] = [g.model_dump(exclude_unset=True) for g in request.graders]
        return {"grpo": GRPOSettings.model_validate(given).model_dump(exclude_none=True)}

    def sequences(self, config: dict[str, Any]) -> int:
        return config["grpo"]["num_generations"]

    def describe(self, config: dict[str, Any]) -> str:
        g = config["grpo"]
        graders = describe([GraderSpec.model_validate(s) for s in g["graders"]])
        return f"GRPO ({g['num_generations']} generations, reward {graders})"

    def refuse_row(self, fmt: str) -> str | None:
        if fmt in self.row_formats:
            return None
        return (
            f"a {fmt} row in a GRPO job; objective='grpo' trains on prompts: {{'prompt': '...' or a message list, "
            "plus the fields your graders read, e.g. 'answer'}} (no completion: the job samples them)"
        )


GRPO_OBJECTIVE = GRPO()
