"""The names of the methods and objectives: the one list of each.

Each name has a module in its table (`llm_mcp.core.methods.METHODS`, `llm_mcp.core.objectives.OBJECTIVES`),
which says everything else about it; the tables check at import that they cover exactly these names.
"""

from __future__ import annotations

from typing import Literal, get_args

MethodName = Literal["lora", "qlora", "dora", "sparse"]
ObjectiveName = Literal["causal_lm", "dpo", "grpo"]

METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveName)
