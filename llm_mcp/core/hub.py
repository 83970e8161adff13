"""Can a hub model be loaded here? The local Hugging Face cache first, then a bounded reachability check.

A job whose base model cannot be fetched would otherwise show `running` through a minute of
download retries and then fail; the dry run and start_finetune refuse it up front instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HUB_CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Availability:
    available: bool
    where: str  # 'local cache', 'the Hugging Face Hub', or why neither


def hub_availability(model_id: str, timeout_s: float = HUB_CHECK_TIMEOUT_S) -> Availability:
    """Whether `model_id`'s config.json is in the local cache, or the hub answers for it within `timeout_s`."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str) and os.path.exists(cached):
        return Availability(True, f"local cache ({constants.HF_HUB_CACHE})")
    if constants.HF_HUB_OFFLINE:
        return Availability(False, f"not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set")
    try:
        model_info(model_id, timeout=timeout_s)
    except Exception as exc:  # any failure means it cannot be fetched now; say why
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return Availability(
            False,
            f"not in the local cache ({constants.HF_HUB_CACHE}) and the Hugging Face Hub "
            f"cannot be reached or refuses it ({reason})",
        )
    return Availability(True, "the Hugging Face Hub (downloaded when the job starts)")


def unavailable_message(model_id: str, why: str) -> str:
    return (
        f"model={model_id!r} cannot be loaded here: {why}. Next: download it where the hub is reachable "
        f"(`huggingface-cli download {model_id}`) and copy the cache here, or put a checkpoint directory under "
        "LLM_MCP_HOME/models and pass its path (list_models shows local checkpoints)."
    )
