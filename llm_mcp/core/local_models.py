"""Local model directories: a `model` argument that names a checkpoint on disk.

A local directory must lie under an allowed root and hold a config.json whose
architectures[0] has a profile in the matrix's `architectures` section. Dims come from
config.json (its text_config for multimodal checkpoints) and the exact parameter count
from the safetensors headers, so nothing heavy is loaded. Relative paths are resolved
against LLM_MCP_HOME, since an MCP server's working directory is arbitrary.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError, UnknownModelError
from llm_mcp.core.estimates import estimate_memory, gpu_class_gb
from llm_mcp.core.matrix import Dims, Matrix, MethodSupport, ModelEntry
from llm_mcp.core.settings import Settings

_MAX_HEADER = 100 * 1024 * 1024


class LocalModelEntry(ModelEntry):
    """A matrix-shaped entry built from a local checkpoint directory."""

    path: str

    @property
    def is_local(self) -> bool:
        return True


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") != 1


def safetensors_param_count(model_dir: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (no tensor data is read); None without safetensors.

    Raises:
        InvalidArgumentError: a file is truncated or not safetensors (a half-copied checkpoint).
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > _MAX_HEADER:
                    raise ValueError(f"a header of {size} bytes")
                header = json.loads(fh.read(size))
                end = (
                    8 + size + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                )
                if file.stat().st_size < end:
                    raise ValueError(f"{file.stat().st_size:,} bytes where the header promises {end:,}")
            total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
        except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise InvalidArgumentError(
                f"{file.name} in {model_dir} is truncated or not a safetensors file ({exc}); copy the checkpoint "
                "again (a half-copied directory cannot be trained)"
            ) from None
    return total


QK_NORM_TYPES = ("qwen3", "gemma3", "olmo2")  # config model_type prefixes whose attention normalizes q and k


def _dims_from_config(cfg: dict[str, Any]) -> Dims:
    text = cfg.get("text_config") or cfg
    hidden = text["hidden_size"]
    heads = text["num_attention_heads"]
    experts = text.get("num_local_experts") or text.get("num_experts") or text.get("n_routed_experts") or 0
    kv_heads = text.get("num_key_value_heads") or text.get("num_kv_heads") or heads
    if text.get("multi_query") and not text.get("new_decoder_architecture"):  # Falcon-7B: one key-value head
        kv_heads = 1
    return Dims(
        hidden_size=hidden,
        num_layers=text["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=text.get("head_dim") or hidden // heads,
        vocab_size=text["vocab_size"],
        intermediate_size=text.get("intermediate_size")
        or text.get("ffn_hidden_size")
        or (None if experts else 4 * hidden),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        num_experts=experts,
        experts_per_token=text.get("num_experts_per_tok", 0) if experts else 0,
        moe_intermediate_size=(text.get("moe_intermediate_size") or text.get("intermediate_size")) if experts else None,
        num_shared_experts=text.get("n_shared_experts") or 0 if experts else 0,
        dense_layers=min(text.get("first_k_dense_replace") or 0, text["num_hidden_layers"]) if experts else 0,
        # multi-head latent attention (DeepSeek-V3, Kimi-K2): low-rank query / key-value projections
        q_lora_rank=text.get("q_lora_rank"),
        kv_lora_rank=text.get("kv_lora_rank"),
        qk_nope_head_dim=text.get("qk_nope_head_dim"),
        qk_rope_head_dim=text.get("qk_rope_head_dim"),
        v_head_dim=text.get("v_head_dim"),
        eager_attention=text.get("model_type") == "gpt_oss",  # attention sinks: no SDPA kernel
        qk_norm=str(text.get("model_type", "")).startswith(QK_NORM_TYPES),
        norms_per_layer=4 if str(text.get("model_type", "")).startswith("gemma") else 2,
    )


def load_local_model(matrix: Matrix, settings: Settings, value: str) -> LocalModelEntry:
    """Build an entry for a local checkpoint directory.

    Raises:
        PathNotAllowedError: outside the allowed roots.
        UnknownModelError: not a directory, no config.json, or an architecture the matrix lacks.
    """
    path = settings.check_path(settings.under_home(value), "model")
    if not path.is_dir():
        raise UnknownModelError(
            f"model={value!r} is neither a matrix model nor an existing directory ({path}). "
            f"{matrix.suggest(value)}Call list_models for the supported ids, or pass a checkpoint directory."
        )
    config_file = path / "config.json"
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnknownModelError(
            f"model={value!r}: {config_file} is missing or not JSON ({exc}); a local model directory needs the "
            "config.json that save_pretrained writes."
        ) from exc
    if not isinstance(cfg, dict):
        raise UnknownModelError(
            f"model={value!r}: {config_file} holds a {type(cfg).__name__}, not the object save_pretrained writes"
        )
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else "?"
    profile = matrix.profile(arch)
    if profile is None:
        known = sorted(p.hf_architecture for p in matrix.architectures)
        raise UnknownModelError(
            f"model={value!r} has architecture {arch!r}, which the support matrix does not know; allowed: {known}. "
            "Add an `architectures` profile to your models.yaml to train it."
        )
    try:
        dims = _dims_from_config(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise InvalidArgumentError(
            f"model={value!r}: config.json lacks a usable field needed for estimates ({type(exc).__name__}: {exc})"
        ) from None

    counted = safetensors_param_count(path)
    params = counted if counted else _estimate_params(dims)
    params_b = params / 1e9
    qwen = profile.family.startswith("qwen")
    exponent = 0.0775 if qwen else 0.781
    lr = float(f"{5e-4 * (2000 / dims.hidden_size) ** exponent:.1e}")
    methods = {}
    for name, support in profile.methods.items():
        est = estimate_memory(dims, params_b, name, target_modules=profile.target_modules)
        methods[name] = MethodSupport(
            status=support.status,
            note=support.note,
            min_gpu_memory_gb=gpu_class_gb(est.total_gb),
            vllm_adapter=support.vllm_adapter,
        )
    text_cfg = cfg.get("text_config") or cfg
    has_template = (path / "chat_template.jinja").exists() or "chat_template" in read_json(
        path / "tokenizer_config.json"
    )
    return LocalModelEntry.model_construct(
        id=str(path),
        path=str(path),
        aliases=[],
        family=profile.family,
        type="instruct" if has_template else "base",
        architecture="moe" if dims.num_experts else "dense",
        hf_architecture=arch,
        params_b=params_b,
        active_params_b=params_b,
        dims=dims,
        context_length=text_cfg.get("max_position_embeddings", 2048),
        target_modules=profile.target_modules,
        chat_template=has_template,
        trust_remote_code=False,
        weights_dtype="bf16",
        recommended_lr=lr,
        lr_source=f"formula 5e-5 x 10 x (2000/hidden)^{exponent} ({'Qwen' if qwen else 'Llama'} exponent)",
        sources=["local directory"],
        note="" if counted else "no safetensors found: parameter count estimated",
        methods=methods,
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _estimate_params(dims: Dims) -> int:
    h, layers = dims.hidden_size, dims.num_layers
    attn = h * dims.head_dim * (2 * dims.num_attention_heads + 2 * dims.num_key_value_heads)
    mlp = 3 * h * (dims.intermediate_size or 0)
    embed = dims.vocab_size * h * (1 if dims.tie_word_embeddings else 2)
    return layers * (attn + mlp) + embed


def resolve_model(matrix: Matrix, settings: Settings, value: str) -> ModelEntry:
    """A matrix entry by id/alias, else a local directory under an allowed root.

    Raises:
        UnknownModelError, PathNotAllowedError: with suggestions and the next step.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError("model must be a non-empty string: a matrix id (see list_models) or a directory")
    entry = matrix.find(value)
    if entry is not None:
        return entry
    if _looks_like_path(value) or settings.under_home(value).exists():
        return load_local_model(matrix, settings, value)
    return matrix.get(value)  # raises UnknownModelError with suggestions


def local_checkpoints(settings: Settings, limit: int = 50) -> list[Path]:
    """Directories with a config.json in LLM_MCP_HOME/models (two levels deep) and the allowed roots' top level."""
    found: list[Path] = []
    for root, depth in [(settings.home / "models", 2), *[(r, 1) for r in settings.roots[1:]]]:
        level = [root] if root.is_dir() else []
        for _ in range(depth):
            level = sorted(
                d
                for parent in level
                for d in parent.iterdir()
                if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
            )[:200]
            found += [d for d in level if (d / "config.json").is_file() and d not in found]
            if len(found) >= limit:
                return found[:limit]
    return found
