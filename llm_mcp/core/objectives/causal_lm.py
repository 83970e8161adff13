"""Supervised fine-tuning: next-token cross-entropy on the completion (or all) tokens."""

from __future__ import annotations

from llm_mcp.core.objectives.base import SFT_FORMATS, Objective


class CausalLM(Objective):
    name = "causal_lm"
    title = "supervised fine-tuning (next-token cross-entropy)"
    row_formats = SFT_FORMATS
    rows_hint = "'messages', 'prompt'+'completion' or 'text'"
    trainer = "llm_mcp.train.objectives:CausalLMObjective"

    def refuse_row(self, fmt: str) -> str | None:
        if fmt in self.row_formats:
            return None
        if fmt == "prompt":
            return (
                "a prompt row with no 'completion' in a causal_lm job; add the answer as 'completion', or train on "
                "prompts alone with objective='grpo' and graders that score the sampled answers"
            )
        return (
            f"a {fmt} row (chosen / rejected) in a {self.name} job; train on it with objective='dpo', or give SFT "
            "rows ('messages', 'prompt'+'completion' or 'text')"
        )


CAUSAL_LM = CausalLM()
