"""How an adapter is stored on disk: the files of each layout (llm_mcp.modeling.adapters loads and saves them).

    peft    PEFT's LoRA format (LoRA, QLoRA, DoRA): adapter_config.json + adapter_model.safetensors
    sparse  llm_mcp's sparse deltas (llm_mcp.modeling.sparse): sparse_config.json + sparse_adapter.safetensors

A method names its layout (`Method.layout`); a directory's layout is found from its config file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llm_mcp.core.errors import InvalidArgumentError


@dataclass(frozen=True)
class Layout:
    name: str
    config_file: str
    weights_file: str
    peft: bool  # PeftModel.from_pretrained loads it (else: llm_mcp's sample or the model card's recipe)


LAYOUTS = {
    "peft": Layout("peft", "adapter_config.json", "adapter_model.safetensors", peft=True),
    "sparse": Layout("sparse", "sparse_config.json", "sparse_adapter.safetensors", peft=False),
}


def layout_of(path: Path) -> Layout | None:
    """The layout of the adapter in `path`, or None if it holds none."""
    return next((layout for layout in LAYOUTS.values() if (path / layout.config_file).exists()), None)


def weights_file(path: Path) -> Path:
    """The adapter's weights file in `path` (PEFT's adapter_model.safetensors or the sparse layout's).

    Raises:
        InvalidArgumentError: `path` holds no adapter weights.
    """
    for layout in LAYOUTS.values():
        if (path / layout.weights_file).exists():
            return path / layout.weights_file
    names = " or ".join(layout.weights_file for layout in LAYOUTS.values())
    raise InvalidArgumentError(f"{path} holds no adapter weights ({names})")


def adapter_key(path: Path) -> str:
    """Identifies an adapter's current weights (path + mtime): a cache key that changes when they are rewritten."""
    return f"{path.resolve()}@{weights_file(path).stat().st_mtime_ns}"
