"""What an adapter layout does (`Adapter`), implemented by llm_mcp.modeling.adapters.peft and .sparse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.layouts import Layout


class Adapter:
    """One adapter layout's torch side. `model` arguments are transformers models (PEFT-wrapped or not)."""

    layout: Layout

    def attach(self, model: Any, cfg: JobConfig, dtype: Any) -> Any:
        """The base `model` with this job's trainable parameters attached (init_from's loaded); only they train."""
        raise NotImplementedError

    def save(self, model: Any, out_dir: Path, meta: dict[str, Any], state_dict: dict | None = None) -> None:
        """Write the trained adapter (`state_dict`: the trainable parameters gathered whole under FSDP)."""
        raise NotImplementedError

    def load_weights(self, model: Any, path: Path) -> None:
        """A saved adapter's weights into a model this layout attached (a resume, before accelerate's prepare)."""
        raise NotImplementedError

    def merge(self, model: Any, path: Path) -> Any:
        """The base `model` with the adapter in `path` merged into its weights (a merged export)."""
        raise NotImplementedError

    def select(self, sampler: Any, base: dict[str, Any], path: Path | None) -> bool:
        """Make the adapter in `path` the active one on a sampler's loaded base (None: the base alone); True if it
        was loaded now. `base` is the sampler's entry for the base model (llm_mcp.inference.sampling)."""
        raise NotImplementedError
