"""Where a job's rows come from: a file or directory under the allowed roots, or a Hub dataset ('hf:ORG/NAME')
pinned to the commit in the local Hugging Face cache (llm_mcp.core.hub_datasets)."""

from __future__ import annotations

from typing import Any

from llm_mcp.core.data import fingerprint
from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.hub_datasets import HubRows, is_hub_id, resolve
from llm_mcp.core.readers import Source
from llm_mcp.core.settings import Settings


def dataset_source(
    settings: Settings,
    value: str,
    field_name: str = "dataset",
    subset: str | None = None,
    split: str | None = None,
    revision: str | None = None,
) -> Source:
    """The rows `value` names.

    Raises:
        InvalidArgumentError: a Hub id that is bad or not cached, subset / split / revision with a file.
        PathNotAllowedError: a path outside the allowed roots.
    """
    if is_hub_id(value):
        try:
            return HubRows(resolve(value, subset, split, revision, field_name))
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
    given = {k: v for k, v in (("subset", subset), ("split", split), ("revision", revision)) if v is not None}
    if given:
        raise InvalidArgumentError(
            f"{', '.join(f'{k}={v!r}' for k, v in given.items())}: these choose part of a Hub dataset "
            f"({field_name}='hf:ORG/NAME'); {field_name}={value!r} is a file, so drop them"
        )
    return settings.check_path(settings.under_home(value), field_name)


def source_fields(source: Source) -> dict[str, Any]:
    """The job config's fields for a dataset: its path (or Hub label), the Hub commit, or the file's fingerprint."""
    if isinstance(source, HubRows):
        return {"dataset": str(source), "dataset_hub": source.ref.model_dump(), "dataset_fingerprint": None}
    return {"dataset": str(source), "dataset_hub": None, "dataset_fingerprint": fingerprint(source)}
