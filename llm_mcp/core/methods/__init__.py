"""The fine-tuning methods, one module each, registered in `METHODS` (as PEFT registers its tuners).

    lora    LoRA: low-rank adapters over a frozen base
    qlora   LoRA over a 4-bit NF4 base
    dora    DoRA, Weight-Decomposed Low-Rank Adaptation
    sparse  sparse deltas with RigL mask updates

A method module says everything llm_mcp knows about the method (llm_mcp.core.methods.base.Method): its
facts, the request options only it takes, its job-config sections, its memory-estimate terms and its
adapter layout. Outside this package no code compares a method's name; it asks the method. Its
defaults are configs/<name>.yaml (llm_mcp.core.methods.defaults). CONTRIBUTING.md says how to add one.
"""

from __future__ import annotations

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.methods.base import Method
from llm_mcp.core.methods.dora import DORA
from llm_mcp.core.methods.lora import LORA
from llm_mcp.core.methods.qlora import QLORA
from llm_mcp.core.methods.sparse import SPARSE
from llm_mcp.core.names import METHOD_NAMES

METHODS: dict[str, Method] = {m.name: m for m in (LORA, QLORA, DORA, SPARSE)}
assert tuple(METHODS) == METHOD_NAMES, "llm_mcp.core.names.MethodName and METHODS list the same methods"
# Request options that only some methods take (each method's `options`).
METHOD_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for m in METHODS.values() for o in m.options))


def get_method(name: str) -> Method:
    """The method called `name`.

    Raises:
        ConfigurationError: no such method (a job config or matrix naming one this version does not have).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigurationError(f"method={name!r} is not a method of this server; allowed: {list(METHODS)}") from None


__all__ = ["METHODS", "METHOD_OPTIONS", "Method", "get_method"]
