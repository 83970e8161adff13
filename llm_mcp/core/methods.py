"""Per-method defaults from configs/<method>.yaml, schema-checked at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.matrix import METHODS, Method
from llm_mcp.core.settings import data_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraDefaults(_Strict):
    rank: int = Field(gt=0, le=1024)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = "auto"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False


class QuantizationDefaults(_Strict):
    load_in_4bit: Literal[True] = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    cpu_compute_dtype: Literal["bfloat16", "float32"] = "float32"


class SparseDefaults(_Strict):
    density: Literal["auto"] | float = "auto"
    sparsity_ratio: float | None = Field(None, ge=0, lt=1)
    sparsity_type: Literal["unstructured"] = "unstructured"
    mask_update_interval: int = Field(gt=0)
    mask_update_fraction: float = Field(ge=0, le=1)
    use_rigl: bool = True
    target_modules: Literal["auto"] | list[str] = "auto"


class MethodDefaults(_Strict):
    method: Method
    lora: LoraDefaults | None = None
    quantization: QuantizationDefaults | None = None
    sparse: SparseDefaults | None = None


def load_method_defaults(config_dir: Path | None = None) -> dict[str, MethodDefaults]:
    """Load configs/{lora,qlora,dora,sparse}.yaml.

    Raises:
        ConfigurationError: every missing file or schema problem, listed.
    """
    config_dir = config_dir or data_path("configs")
    out: dict[str, MethodDefaults] = {}
    problems: list[str] = []
    for method in METHODS:
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
