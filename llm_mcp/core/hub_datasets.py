"""Hugging Face Hub datasets by id: `dataset="hf:ORG/NAME"` with a subset, a split and a revision.

A Hub dataset is read from the Hugging Face cache (huggingface_hub's snapshot of one commit) with the `datasets`
library, streamed: the tool call resolves the revision to its commit SHA, which the job config keeps, so a resume
or a re-run reads the same bytes, offline too. A dataset not in the cache is never downloaded by a tool call
itself (that could take minutes): `save_dataset(source="hf:...")` downloads it in the background with progress
(llm_mcp.core.importer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

PREFIX = "hf:"
REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
SHA = re.compile(r"^[0-9a-f]{40}$")


# The arguments that pick part of a Hub dataset, shared by every tool that reads one.
Subset = Annotated[
    str | None, Field(None, description="A Hub dataset ('hf:ORG/NAME'): its subset (configuration).", max_length=200)
]
Split = Annotated[
    str | None, Field(None, description="A Hub dataset: the split to read (default 'train').", max_length=200)
]
Revision = Annotated[
    str | None,
    Field(None, description="A Hub dataset: a branch, tag or commit (default 'main'); jobs keep the commit.",
          max_length=200),
]  # fmt: skip


class HubRef(BaseModel):
    """A Hub dataset pinned to one commit (what a job config keeps)."""

    repo: str = Field(description="ORG/NAME on the Hugging Face Hub.")
    revision: str = Field(description="The commit SHA the rows are read from.", pattern=SHA.pattern)
    subset: str | None = Field(None, description="The dataset's configuration (subset), if it has several.")
    split: str = "train"

    @property
    def label(self) -> str:
        return f"{PREFIX}{self.repo}" + (f" ({self.subset})" if self.subset else "") + f"[{self.split}]"


def is_hub_id(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (read at call time: HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def repo_of(text: str, field_name: str = "dataset") -> str:
    """ORG/NAME from 'hf:ORG/NAME'.

    Raises:
        ValueError: not a Hub dataset id.
    """
    repo = text[len(PREFIX) :]
    if not REPO.fullmatch(repo):
        raise ValueError(
            f"{field_name}={text!r} is not a Hub dataset id; use 'hf:ORG/NAME' (e.g. 'hf:tatsu-lab/alpaca'), with "
            "subset / split / revision as their own arguments"
        )
    return repo


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo` at `revision` (a branch, tag or commit; default 'main'), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo, repo_type="dataset", revision=revision, cache_dir=cache_dir(), local_files_only=True
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return Path(str(path))


def resolve(
    text: str, subset: str | None, split: str | None, revision: str | None, field_name: str = "dataset"
) -> HubRef:
    """Pin 'hf:ORG/NAME' (+ subset, split, revision) to a commit in the local Hugging Face cache.

    Raises:
        ValueError: a bad id, a revision / subset / split the cached dataset does not have, or not cached (with
            the next step: save_dataset(source=...) downloads it, in the background).
    """
    repo = repo_of(text, field_name)
    snapshot = cached_snapshot(repo, revision)
    if snapshot is None:
        where = f"{text}" + (f" at revision {revision!r}" if revision else "")
        fetch = (
            "this machine is offline (HF_HUB_OFFLINE=1): download it where there is network with "
            f"`hf download --repo-type dataset {repo}` into the same Hugging Face cache, or copy the files under an "
            "allowed root and pass their path"
            if offline()
            else f"save_dataset(name=..., source={text!r}" + (f", revision={revision!r}" if revision else "")
            + ") downloads it in the background with progress; then train on the saved file"
        )  # fmt: skip
        raise ValueError(f"{field_name}: {where} is not in the Hugging Face cache ({cache_dir()}). Next: {fetch}")
    ref = HubRef(repo=repo, revision=snapshot.name, subset=subset, split=split or "train")
    splits = available_splits(snapshot, subset, field_name)
    if ref.split not in splits:
        raise ValueError(f"{field_name}: {text} has no split {ref.split!r}; allowed: {splits}")
    return ref


def available_splits(snapshot: Path, subset: str | None, field_name: str = "dataset") -> list[str]:
    """The splits of a cached dataset's subset, as the `datasets` library resolves its files (its card's configs,
    else the Hub's file-name conventions).

    Raises:
        ValueError: an unknown subset, or no data files the library can read.
    """
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(snapshot), name=subset)
    except ValueError as exc:  # an unknown config name lists the allowed ones
        raise ValueError(f"{field_name}: subset={subset!r}: {exc}") from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise ValueError(
            f"{field_name}: the cached dataset has no data files the datasets library reads ({exc})"
        ) from None
    return [str(s) for s in (builder.config.data_files or {})]


def snapshot_of(ref: HubRef) -> Path:
    """The cached snapshot of a pinned dataset.

    Raises:
        FileNotFoundError: it has left the cache since the job was validated.
    """
    snapshot = cached_snapshot(ref.repo, ref.revision)
    if snapshot is None:
        raise FileNotFoundError(
            f"{ref.label} at commit {ref.revision[:12]} is no longer in the Hugging Face cache ({cache_dir()}); "
            f"download that revision again (hf download --repo-type dataset {ref.repo} --revision {ref.revision})"
        )
    return snapshot


@dataclass(frozen=True)
class HubRows:
    """The rows of a pinned Hub dataset (what llm_mcp.core.data reads in place of a file)."""

    ref: HubRef

    @property
    def name(self) -> str:
        return self.ref.label

    def __str__(self) -> str:
        return f"{self.ref.label}@{self.ref.revision[:12]}"

    def rows(self) -> Iterator[tuple[str, Any]]:
        """(location, raw row), streamed with the `datasets` library.

        Raises:
            OSError: the snapshot left the cache, or the library cannot read its files (the reason in the message).
        """
        import datasets

        snapshot = snapshot_of(self.ref)
        try:
            ds = datasets.load_dataset(str(snapshot), name=self.ref.subset, split=self.ref.split, streaming=True)
            for i, row in enumerate(ds, 1):
                yield f"row {i}", row
        except OSError:
            raise
        except Exception as exc:  # the library's own errors (bad files, schema mismatches) say what is wrong
            raise OSError(f"the datasets library cannot read {self}: {type(exc).__name__}: {exc}") from exc
