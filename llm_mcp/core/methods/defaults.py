"""Per-method defaults from configs/<method>.yaml, schema-checked at start-up (bounds: llm_mcp.core.jobconfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.jobconfig import (
    Alpha,
    Density,
    Dropout,
    MaskFraction,
    MaskInterval,
    QuantizationSettings,
    Rank,
    SparsityRatio,
)
from llm_mcp.core.names import METHOD_NAMES, MethodName
from llm_mcp.core.settings import data_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraDefaults(_Strict):
    rank: Rank
    alpha: Alpha
    dropout: Dropout
    target_modules: Literal["auto"] | list[str] = "auto"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False


class SparseDefaults(_Strict):
    density: Literal["auto"] | Density = "auto"
    sparsity_ratio: SparsityRatio | None = None
    sparsity_type: Literal["unstructured"] = "unstructured"
    mask_update_interval: MaskInterval
    mask_update_fraction: MaskFraction
    use_rigl: bool = True
    target_modules: Literal["auto"] | list[str] = "auto"


class MethodDefaults(_Strict):
    method: MethodName
    lora: LoraDefaults = Field(description="The adapter's shape (sparse: rank sets density 'auto', targets apply).")
    quantization: QuantizationSettings | None = None
    sparse: SparseDefaults | None = None


def load_method_defaults(config_dir: Path | None = None) -> dict[str, MethodDefaults]:
    """Load configs/{lora,qlora,dora,sparse}.yaml.

    Raises:
        ConfigurationError: every missing file or schema problem, listed.
    """
    config_dir = config_dir or data_path("configs")
    out: dict[str, MethodDefaults] = {}
    problems: list[str] = []
    for method in METHOD_NAMES:
        path = config_dir / f"{method}.yaml"
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            defaults = MethodDefaults.model_validate(raw)
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror})")
            continue
        except yaml.YAMLError as exc:
            problems.append(f"{path}: invalid YAML ({exc})")
            continue
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                problems.append(f"{path} {where}: {err['msg']} (got {err.get('input')!r})")
            continue
        if defaults.method != method:
            problems.append(f"{path}: method is {defaults.method!r}, expected {method!r}")
        out[method] = defaults
    if problems:
        raise ConfigurationError("method defaults in configs/ are invalid:", problems)
    return out
