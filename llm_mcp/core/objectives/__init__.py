"""Training objectives, one module each, registered in `OBJECTIVES`.

    causal_lm  supervised fine-tuning: next-token cross-entropy on the answer (or all) tokens
    dpo        Direct Preference Optimization on {prompt, chosen, rejected} rows
    grpo       Group Relative Policy Optimization: sampled completions scored by graders (llm_mcp.core.graders)

An objective module (llm_mcp.core.objectives.base.Objective) holds what the server needs: the row
formats it trains on, its options and their checks, its job-config section, its learning-rate factor and
cost; its `trainer` names the loss the training process runs. Outside this package no code compares an
objective's name. CONTRIBUTING.md says how to add one.
"""

from __future__ import annotations

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.names import OBJECTIVE_NAMES
from llm_mcp.core.objectives.base import Objective
from llm_mcp.core.objectives.causal_lm import CAUSAL_LM
from llm_mcp.core.objectives.dpo import DPO_OBJECTIVE
from llm_mcp.core.objectives.grpo import GRPO_OBJECTIVE

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (CAUSAL_LM, DPO_OBJECTIVE, GRPO_OBJECTIVE)}
assert tuple(OBJECTIVES) == OBJECTIVE_NAMES, "llm_mcp.core.names.ObjectiveName and OBJECTIVES list the same names"
OBJECTIVE_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for obj in OBJECTIVES.values() for o in obj.options))
DEFAULT_OBJECTIVE = CAUSAL_LM


def get_objective(name: str | None) -> Objective:
    """The objective called `name` (None: supervised fine-tuning).

    Raises:
        ConfigurationError: no such objective.
    """
    if name is None:
        return DEFAULT_OBJECTIVE
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigurationError(f"objective={name!r}; allowed: {list(OBJECTIVES)}") from None


__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "OBJECTIVE_OPTIONS", "Objective", "get_objective"]
