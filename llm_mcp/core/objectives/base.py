"""What a training objective is: the `Objective` every objective module subclasses.

The facts and hooks here are what the server needs (validation, estimates, summaries) and import no
torch; the loss itself lives in the training process, in the module `trainer` names.
"""

from __future__ import annotations

from typing import Any, ClassVar

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")


class Objective:
    """One objective: which rows it trains on, its options, its job-config section and its cost."""

    name: ClassVar[str]
    title: ClassVar[str]
    short: ClassVar[str] = ""  # in a word, for summaries ('' for plain supervised fine-tuning)
    row_formats: ClassVar[tuple[str, ...]]  # the row formats (llm_mcp.core.data) it trains on
    rows_hint: ClassVar[str]  # what each row needs, for bad-row errors
    options: ClassVar[tuple[str, ...]] = ()  # FinetuneRequest fields only this objective takes
    sections: ClassVar[tuple[str, ...]] = ()  # the job-config sections job_settings fills
    lr_factor: ClassVar[float] = 1.0  # default learning rate = the model's LoRA rate x this
    sequences_per_row: ClassVar[int] = 1  # sequences one row puts through the model (memory: batch x this)
    flops_factor: ClassVar[float] = 1.0  # compute per trained token relative to SFT (time estimate)
    samples: ClassVar[bool] = False  # its jobs sample completions and keep them with their rewards (rollouts)
    trainer: ClassVar[str]  # "module:Class" of its loss in the training process (llm_mcp.train.objectives)

    def check(self, request: Any, problems: list[str]) -> None:
        """Problems with this objective's own options (other objectives' options are refused generically)."""

    def job_settings(self, request: Any) -> dict[str, Any]:
        """This objective's job-config sections (e.g. {'dpo': {...}})."""
        return {}

    def sequences(self, config: dict[str, Any]) -> int:
        """Sequences one row puts through the model in a step (memory: batch x this)."""
        return self.sequences_per_row

    def describe(self, config: dict[str, Any]) -> str:
        """A few words for summaries ('' for plain supervised fine-tuning)."""
        return ""

    def refuse_row(self, fmt: str) -> str | None:
        """Why a row of format `fmt` cannot train with this objective, with what to do (None: it can)."""
        if fmt in self.row_formats:
            return None
        return f"a {fmt} row in a {self.name} job; objective={self.name!r} trains on {self.rows_hint}"
