"""The model support matrix (models.yaml): schema, loading, validation and lookup.

The matrix is data, not code: one entry per hub model with the dims needed for estimates,
the recommended LoRA learning rate, and per fine-tuning method a status, a note, the
minimum GPU memory and whether vLLM can serve the result as an adapter. `architectures`
holds the same per-method facts for *local* checkpoints, keyed by their config.json
architecture class.
"""

from __future__ import annotations

import difflib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llm_mcp.core.errors import ConfigurationError, UnknownModelError
from llm_mcp.core.names import METHOD_NAMES

Status = Literal["supported", "experimental", "unsupported"]
ModelType = Literal["base", "instruct", "hybrid", "reasoning", "vision"]

PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_every_method(methods: dict[str, Any], what: str) -> None:
    missing = [m for m in METHOD_NAMES if m not in methods]
    if missing:
        raise ValueError(f"methods is missing {missing}; every {what} lists all of {list(METHOD_NAMES)}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"methods has {unknown}, which are not methods; allowed: {list(METHOD_NAMES)}")


class MethodSupport(_Strict):
    status: Status
    note: str = Field(min_length=1, description="Why this status; what to watch for.")
    min_gpu_memory_gb: float = Field(
        ge=0, description="Smallest total GPU memory (GB) that trains this at batch 1, 2048 tokens."
    )
    vllm_adapter: bool = Field(description="vLLM can serve the result as a LoRA adapter (else: serve merged).")


class LocalMethodSupport(_Strict):
    status: Status
    note: str = Field(min_length=1)
    vllm_adapter: bool


class Dims(_Strict):
    """Config dims used for parameter and memory estimates (the text decoder for VLMs)."""

    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    head_dim: PositiveInt
    vocab_size: PositiveInt
    intermediate_size: PositiveInt | None = Field(None, description="Dense MLP width (None for all-MoE layers).")
    tie_word_embeddings: bool = False
    num_experts: int = Field(0, ge=0)
    experts_per_token: int = Field(0, ge=0)
    moe_intermediate_size: PositiveInt | None = None
    num_shared_experts: int = Field(0, ge=0)
    dense_layers: int = Field(0, ge=0, description="Leading layers with a dense MLP in an MoE model.")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys (Qwen3, Gemma 3).")
    norms_per_layer: int = Field(2, ge=1, description="RMSNorms around attention and MLP (Gemma 3: 4).")
    eager_attention: bool = Field(
        False, description="Attention without an SDPA / flash kernel (gpt-oss' sinks): it keeps the s^2 scores."
    )
    # Multi-head latent attention (DeepSeek-V3, Kimi-K2).
    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Dims:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts and not (self.experts_per_token and self.moe_intermediate_size):
            raise ValueError("an MoE model (num_experts > 0) needs experts_per_token and moe_intermediate_size")
        if not self.num_experts and self.intermediate_size is None:
            raise ValueError("a dense model needs intermediate_size")
        return self


class ModelEntry(_Strict):
    id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="Hugging Face hub id.")
    aliases: list[str] = Field(default_factory=list)
    family: str = Field(min_length=1)
    type: ModelType
    architecture: Literal["dense", "moe"]
    hf_architecture: str = Field(min_length=1, description="config.json 'architectures[0]'.")
    params_b: float = Field(gt=0, description="Total parameters, billions.")
    active_params_b: float = Field(gt=0, description="Parameters active per token, billions (= total if dense).")
    dims: Dims
    context_length: PositiveInt
    target_modules: list[str] = Field(min_length=1, description="Default LoRA target modules.")
    chat_template: bool
    trust_remote_code: bool = False
    weights_dtype: Literal["bf16", "fp16", "fp32", "fp8", "mxfp4", "int4"] = "bf16"
    recommended_lr: float = Field(gt=0, lt=1)
    lr_source: str = Field(min_length=1)
    sources: list[str] = Field(default_factory=list, description="Seed documents that name this model.")
    note: str = ""
    methods: dict[str, MethodSupport]

    @model_validator(mode="after")
    def _all_methods(self) -> ModelEntry:
        _require_every_method(self.methods, "entry")
        if self.active_params_b > self.params_b:
            raise ValueError(f"active_params_b={self.active_params_b} exceeds params_b={self.params_b}")
        if (self.architecture == "moe") != bool(self.dims.num_experts):
            raise ValueError(
                f"architecture={self.architecture!r} disagrees with dims.num_experts={self.dims.num_experts}"
            )
        return self

    @property
    def is_local(self) -> bool:
        return False


class ArchitectureProfile(_Strict):
    """Per-method facts for local checkpoints whose config.json names this architecture."""

    hf_architecture: str = Field(min_length=1)
    family: str = Field(min_length=1)
    target_modules: list[str] = Field(min_length=1)
    methods: dict[str, LocalMethodSupport]

    @model_validator(mode="after")
    def _all_methods(self) -> ArchitectureProfile:
        _require_every_method(self.methods, "profile")
        return self


class Matrix(_Strict):
    version: Literal[1]
    models: list[ModelEntry]
    architectures: list[ArchitectureProfile] = Field(default_factory=list)

    @cached_property
    def _index(self) -> dict[str, ModelEntry]:
        index: dict[str, ModelEntry] = {}
        for entry in self.models:
            for key in (entry.id, *entry.aliases):
                index[key.lower()] = entry
        return index

    @cached_property
    def _profiles(self) -> dict[str, ArchitectureProfile]:
        return {p.hf_architecture: p for p in self.architectures}

    def get(self, model_id: str) -> ModelEntry:
        """Find an entry by hub id or alias (case-insensitive).

        Raises:
            UnknownModelError: with the closest known names.
        """
        entry = self._index.get(model_id.strip().lower())
        if entry is None:
            raise UnknownModelError(
                f"model={model_id!r} is not in the support matrix. {self.suggest(model_id)}"
                "Call list_models to see every supported model, or pass a local model directory."
            )
        return entry

    def find(self, model_id: str) -> ModelEntry | None:
        return self._index.get(model_id.strip().lower())

    def suggest(self, model_id: str) -> str:
        """A 'Did you mean ...?' sentence (with a trailing space), or '' when nothing is close."""
        query = model_id.strip().lower()
        names = {key: entry.id for key, entry in self._index.items()}
        short = {key.split("/")[-1]: entry_id for key, entry_id in names.items()}
        hits = difflib.get_close_matches(query, list(names), n=3, cutoff=0.6)
        hits += difflib.get_close_matches(query.split("/")[-1], list(short), n=3, cutoff=0.6)
        ids: list[str] = []
        for hit in hits:
            entry_id = names.get(hit) or short[hit]
            if entry_id not in ids:
                ids.append(entry_id)
        return f"Did you mean {', '.join(repr(i) for i in ids[:3])}? " if ids else ""

    def profile(self, hf_architecture: str) -> ArchitectureProfile | None:
        return self._profiles.get(hf_architecture)


def _describe_location(raw: Any, loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into 'models[3] (meta-llama/Llama-2-7b-hf) methods.lora.status'."""
    parts: list[str] = []
    node = raw
    label = ""
    for i, key in enumerate(loc):
        if isinstance(key, int):
            parts[-1] = f"{parts[-1]}[{key}]" if parts else f"[{key}]"
            if isinstance(node, list) and 0 <= key < len(node):
                node = node[key]
                if i <= 1 and isinstance(node, dict):
                    name = node.get("id") or node.get("hf_architecture")
                    label = f" ({name})" if name else ""
                    parts[-1] += label
                    label = ""
                continue
        else:
            parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
    head, *rest = parts or ["(top level)"]
    return head + (" " + ".".join(rest) if rest else "")


def _format_errors(raw: Any, exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        where = _describe_location(raw, tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (remove it or check its spelling)"
        problem = f"{where}: {msg}"
        if err["type"] not in ("missing",) and "input" in err and not isinstance(err["input"], dict | list):
            problem += f" (got {err['input']!r})"
        problems.append(problem)
    return problems


def _cross_checks(matrix: Matrix) -> list[str]:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(matrix.models):
        for key in (entry.id, *entry.aliases):
            other = seen.get(key.lower())
            if other is not None and other != entry.id:
                problems.append(f"models[{i}] ({entry.id}): name {key!r} is already used by {other!r}")
            seen[key.lower()] = entry.id
    for i, profile in enumerate(matrix.architectures):
        if [p.hf_architecture for p in matrix.architectures].index(profile.hf_architecture) != i:
            problems.append(f"architectures[{i}] ({profile.hf_architecture}): duplicate architecture")
    return problems


def parse_matrix(raw: Any, source: str = "models.yaml") -> Matrix:
    """Validate already-parsed YAML. Collects every problem, then raises once.

    Raises:
        ConfigurationError: one line per problem (entry, field, bad value, allowed values).
    """
    try:
        matrix = Matrix.model_validate(raw)
    except ValidationError as exc:
        problems = _format_errors(raw, exc)
        raise ConfigurationError(
            f"{source} is not a valid model support matrix ({len(problems)} problem(s)); fix them and restart:",
            problems,
        ) from None
    problems = _cross_checks(matrix)
    if problems:
        raise ConfigurationError(f"{source} is not a valid model support matrix:", problems)
    return matrix


def load_matrix(path: Path) -> Matrix:
    """Read and validate a models.yaml file.

    Raises:
        ConfigurationError: unreadable file, bad YAML, or schema problems (all listed).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the model matrix {str(path)!r}: {exc.strerror}. Check --models / LLM_MCP_MODELS."
        ) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path} is not valid YAML: {exc}") from exc
    return parse_matrix(raw, source=str(path))
