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
        info = model_info(model_id, timeout=timeout_s)
    except Exception as exc:  # any failure means it cannot be fetched now; say why
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return Availability(
            False,
            f"not in the local cache ({constants.HF_HUB_CACHE}) and the Hugging Face Hub "
            f"cannot be reached or refuses it ({reason})",
        )
    if info.gated and not has_access(model_id, timeout_s):  # model_info answers without access; the files do not
        return Availability(
            False,
            f"it is gated: this machine's Hugging Face token has no access. Request access at "
            f"https://huggingface.co/{model_id}, then log in here (`hf auth login`, or set HF_TOKEN for the server)",
        )
    return Availability(True, "the Hugging Face Hub (downloaded when the job starts)")


def has_access(model_id: str, timeout_s: float) -> bool:
    """Whether this machine's token may read a gated repository (auth_check, bounded by `timeout_s`; an answer
    that does not come in time counts as access: the job's own download then says)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Late

    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(auth_check, model_id).result(timeout=timeout_s)
    except (GatedRepoError, RepositoryNotFoundError):
        return False
    except (Late, Exception):  # unreachable or slow: not a refusal
        return True
    finally:
        pool.shutdown(wait=False)
    return True


def unavailable_message(model_id: str, why: str) -> str:
    return (
        f"model={model_id!r} cannot be loaded here: {why}. Next: download it where the hub is reachable "
        f"(`hf download {model_id}`) and copy the cache here, or put a checkpoint directory under "
        "LLM_MCP_HOME/models and pass its path (list_models shows local checkpoints)."
    )
