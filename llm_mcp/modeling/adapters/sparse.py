"""The sparse layout: sparse deltas over frozen weights (sparse_config.json + sparse_adapter.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.layouts import LAYOUTS, adapter_key
from llm_mcp.modeling.adapters.base import Adapter


class SparseAdapter(Adapter):
    layout = LAYOUTS["sparse"]

    def attach(self, model: Any, cfg: JobConfig, dtype: Any) -> Any:
        from llm_mcp.modeling.adapters.peft import enable_checkpointing
        from llm_mcp.modeling.sparse import attach_sparse_deltas, load_sparse_into

        assert cfg.sparse is not None, "a sparse job's config has its sparse section"
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        attach_sparse_deltas(model, cfg.lora.target_modules, cfg.sparse.density, cfg.lora.rank, cfg.seed)
        if cfg.init_adapter:  # start from another job's sparse delta (its mask and values)
            load_sparse_into(model, Path(cfg.init_adapter))
        model.config.use_cache = False
        return model

    def save(self, model: Any, out_dir: Path, meta: dict[str, Any], state_dict: dict | None = None) -> None:
        from llm_mcp.modeling.sparse import save_sparse

        save_sparse(model, out_dir, {k: meta[k] for k in ("base_model_name_or_path", "target_modules") if k in meta})

    def load_weights(self, model: Any, path: Path) -> None:
        from llm_mcp.modeling.sparse import load_sparse_into

        load_sparse_into(model, path)

    def merge(self, model: Any, path: Path) -> Any:
        from llm_mcp.modeling.sparse import merge_sparse_into_weights

        merge_sparse_into_weights(model, path)
        return model

    def select(self, sampler: Any, base: dict[str, Any], path: Path | None) -> bool:
        """Apply a sparse delta (indices + values wrappers; no weight is densified). None: deltas off.

        Only the modules the adapter names carry a delta; every other wrapped module is switched off, so
        nothing of a previously loaded sparse adapter leaks into this one.
        """
        from llm_mcp.modeling.sparse import attach_sparse_deltas, load_sparse_state, sparse_modules

        model, loaded = base["model"], False
        if path is None:
            base["sparse_active"] = set()
        else:
            key = adapter_key(path)
            if key != base.get("sparse"):
                config = json.loads((path / self.layout.config_file).read_text())
                state = load_sparse_state(path)
                if any(name not in sparse_modules(model) for name in state):
                    attach_sparse_deltas(model, config["target_modules"], "auto", 1, seed=0)
                mods = sparse_modules(model)
                unknown = sorted(set(state) - set(mods))
                if unknown:
                    raise InvalidArgumentError(
                        f"adapter {str(path)!r} has deltas for {unknown[:3]}, which are not "
                        "linear layers of its base model; was it trained on another base?"
                    )
                for name, (indices, values) in state.items():
                    mods[name].set_delta(indices, values)
                base["sparse"], base["sparse_active"] = key, set(state)
                sampler.adapter_loads += 1
                loaded = True
        for name, m in sparse_modules(model).items():
            m.enabled = name in base.get("sparse_active", set())
        return loaded


SPARSE = SparseAdapter()
