"""Adapter layouts, the torch side of a method: attach for training, save, load, merge, switch in a sampler.

    peft    LoRA / QLoRA / DoRA through PEFT (llm_mcp.modeling.adapters.peft)
    sparse  sparse deltas (llm_mcp.modeling.adapters.sparse over llm_mcp.modeling.sparse)

A method names its layout (llm_mcp.core.methods.Method.layout); the files of each are llm_mcp.core.layouts.
Importing this package is light: torch, transformers and peft are imported inside the methods that use them.
"""

from __future__ import annotations

from pathlib import Path

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.layouts import layout_of
from llm_mcp.core.methods import get_method
from llm_mcp.modeling.adapters.base import Adapter
from llm_mcp.modeling.adapters.peft import PEFT
from llm_mcp.modeling.adapters.sparse import SPARSE

ADAPTERS: dict[str, Adapter] = {a.layout.name: a for a in (PEFT, SPARSE)}


def adapter_of_method(method: str) -> Adapter:
    """The layout a method's adapters have."""
    return ADAPTERS[get_method(method).layout]


def adapter_in(path: Path) -> Adapter:
    """The layout of the adapter saved in `path`.

    Raises:
        InvalidArgumentError: `path` holds no adapter.
    """
    layout = layout_of(path)
    if layout is None:
        raise InvalidArgumentError(
            f"{path} holds no adapter ({' or '.join(a.layout.config_file for a in ADAPTERS.values())})"
        )
    return ADAPTERS[layout.name]


__all__ = ["ADAPTERS", "Adapter", "adapter_in", "adapter_of_method"]
