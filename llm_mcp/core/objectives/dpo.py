"""Direct Preference Optimization (Rafailov et al. 2023) on preference rows {prompt, chosen, rejected}.

The reference is the model as the job starts (the base, or init_from's adapter); the loss is in
llm_mcp.train.dpo. DPO moves a model less than SFT: the alignment-handbook's zephyr-7b-beta QLoRA recipes
use 2e-4 for SFT and 5e-6 for DPO (recipes/zephyr-7b-beta/{sft,dpo}/config_qlora.yaml), so the default
learning rate is 1/40 of the LoRA one.
"""

from __future__ import annotations

from typing import Any

from llm_mcp.core.objectives.base import Objective


class DPO(Objective):
    name = "dpo"
    title = "Direct Preference Optimization"
    short = "DPO"
    row_formats = ("preference",)
    rows_hint = "'prompt', 'chosen' and 'rejected'"
    options = ("beta", "label_smoothing")
    sections = ("dpo",)
    lr_factor = 0.025
    sequences_per_row = 2  # chosen and rejected
    flops_factor = 4 / 3  # the rows' tokens count both answers; plus the reference forward (1/3)
    trainer = "llm_mcp.train.dpo:DPOObjective"

    def check(self, request: Any, problems: list[str]) -> None:
        if request.train_on is not None:
            problems.append(
                "train_on does not apply to objective='dpo': its loss is on the chosen and rejected answers; "
                "drop train_on"
            )

    def job_settings(self, request: Any) -> dict[str, Any]:
        beta = 0.1 if request.beta is None else request.beta
        smoothing = 0.0 if request.label_smoothing is None else request.label_smoothing
        return {"dpo": {"beta": beta, "label_smoothing": smoothing}}

    def describe(self, config: dict[str, Any]) -> str:
        return f"DPO (beta {config['dpo']['beta']:g})"

    def refuse_row(self, fmt: str) -> str | None:
        if fmt in self.row_formats:
            return None
        return (
            f"a {fmt} row in a DPO job; objective='dpo' trains on preference rows: {{'prompt', 'chosen', 'rejected'}} "
            "(or input / preferred_output / non_preferred_output)"
        )


DPO_OBJECTIVE = DPO()
