"""export_adapter: a job's adapter in a format people load, one module per format, registered in `FORMATS`.

    peft     the adapter directory (PeftModel.from_pretrained; the sparse layout for sparse jobs)
    archive  the same as one .tar.gz
    merged   the adapter merged into its base: a full safetensors model (a detached worker)
    gguf     llama.cpp / Ollama files, merged or the LoRA adapter alone, checked in llama.cpp (a detached worker)

Writes go to a temporary path renamed into place, with a manifest (export.json) naming the source (job,
checkpoint, adapter sha256). Exporting the same thing again returns the existing export; a destination
holding anything else is never overwritten. Outside this package no code compares a format's name.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llm_mcp.core.atomic import check_room, claim, disk_full, no_space
from llm_mcp.core.errors import InvalidArgumentError, PathNotAllowedError
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import Job
from llm_mcp.inference.card import ExportedFile, list_files
from llm_mcp.inference.exports.archive import ARCHIVE
from llm_mcp.inference.exports.base import ExportFormat, ExportOptions, manifest
from llm_mcp.inference.exports.gguf import GGUF
from llm_mcp.inference.exports.merged import MERGED
from llm_mcp.inference.exports.peft import PEFT_DIRECTORY
from llm_mcp.inference.merge import cancel, merging, run_merge

FORMATS: dict[str, ExportFormat] = {f.name: f for f in (PEFT_DIRECTORY, ARCHIVE, MERGED, GGUF)}
CLAIM_WAIT_S = 20.0  # how long a second export to a destination being written waits for the first
DEFAULT_OPTIONS = ExportOptions()
MERGED_FORMAT = MERGED  # what vLLM serves when it cannot load a method's adapter (llm_mcp.inference.serving)


class ExportResult(BaseModel):
    state: str = Field(
        description="'done'; 'running' for a merge or conversion still in progress (call again); 'cancelled'."
    )
    format: str
    destination: str
    job_id: str
    checkpoint: str
    reused: bool = Field(False, description="The same export already existed; nothing was written.")
    files: list[ExportedFile] = []
    snippets: dict[str, str] = {}
    notes: list[str] = []
    checked: dict[str, Any] | None = Field(
        None, description="What was checked after writing (gguf: llama.cpp against the transformers model)."
    )


def resolve_destination(settings: Settings, value: str | None, default_name: str) -> Path:
    """Destination inside the exports root (relative values) or an allowed root outside the state directory.

    The rest of the state directory (jobs.db and its journal, jobs/, data/, models/) is never a
    destination: a directory planted there could disable the job store or pose as a checkpoint.
    """
    exports = settings.home / "exports"
    raw = exports / default_name if not value else Path(value).expanduser()
    if not raw.is_absolute():
        raw = exports / raw
    if raw.is_symlink():
        raise PathNotAllowedError(f"destination={value!r} is a symlink; give a plain directory or file path")
    dest = settings.check_path(raw, "destination")
    home, exports_root = settings.home.resolve(), exports.resolve()
    if dest.is_relative_to(home) and not (dest.is_relative_to(exports_root) and dest != exports_root):
        raise PathNotAllowedError(
            f"destination={value!r} resolves to {str(dest)!r}, inside the state directory but not under its exports "
            f"folder {str(exports_root)!r}; only LLM_MCP_HOME/exports (a relative destination) or an allowed root "
            "outside LLM_MCP_HOME can receive exports. Omit destination or give a name relative to exports/."
        )
    exports.mkdir(parents=True, exist_ok=True)
    return dest


def export(
    settings: Settings,
    job: Job,
    job_dir: Path,
    adapter: Path,
    label: str,
    fmt: str,
    destination: str | None,
    vllm_adapter: bool,
    options: ExportOptions = DEFAULT_OPTIONS,
    stop: bool = False,
) -> ExportResult:
    """Export (or find the identical existing export). Background formats may return state 'running';
    `stop` cancels a background export under way to this destination."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format={fmt!r}; allowed: {list(FORMATS)}")
    form = FORMATS[fmt].configured(job, options)
    base = job.config.model.id
    dest = resolve_destination(settings, destination, form.default_name(job, label))
    if form.suffix and not dest.name.endswith(form.suffix):
        raise InvalidArgumentError(f"destination={destination!r}: a {fmt} export is a file ending in {form.suffix}")
    if stop:
        return _cancel(form, job, label, dest)
    wanted = manifest(job, label, form, adapter)
    result = ExportResult(
        state="done",
        format=fmt,
        destination=str(dest),
        job_id=job.id,
        checkpoint=label,
        snippets=form.snippets(job, dest, base, vllm_adapter),
        notes=form.notes(job),
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One writer per destination at a time: a second caller waits, then finds the export there (the same one:
    # reused; another: refused), so a destination never ends up holding something its caller was not told of.
    with claim(dest.with_name(f".{dest.name}.writing"), wait_s=CLAIM_WAIT_S) as held:
        if not held:
            raise InvalidArgumentError(
                f"destination={str(dest)!r} is being written by another export right now; call export_adapter "
                "again in a few seconds"
            )
        if dest.exists():
            return _existing(form, dest, wanted, result)
        if not merging(dest):  # a merge under way has taken its room already
            check_room(dest, form.needed_bytes(job, adapter))
        if form.background:
            result = run_merge(job, job_dir, adapter, base, dest, wanted, result)
            return result if result.state != "done" else _existing(form, dest, wanted, result, reused=False)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.time_ns()}")
        try:
            form.write(job, label, adapter, base, tmp, job_dir, wanted)
            os.rename(tmp, dest)
        except OSError as exc:
            if disk_full(exc):
                raise no_space(dest) from exc
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
            shutil.rmtree(tmp.with_name(tmp.name + "-dir"), ignore_errors=True)
    result.files = list_files(dest)
    return result


def _cancel(form: ExportFormat, job: Job, label: str, dest: Path) -> ExportResult:
    answer = ExportResult(state="cancelled", format=form.name, destination=str(dest), job_id=job.id, checkpoint=label)
    if not form.background or not cancel(dest):
        raise InvalidArgumentError(
            f"cancel=true: no {form.name} export of job {job.id} ({label}) is being written to {str(dest)!r}"
            + (" (it is done: delete it yourself if you do not want it)" if dest.exists() else "")
            + "; call export_adapter without cancel to export"
        )
    answer.notes.append("the export was stopped and what it had written removed")
    return answer


def _existing(form: ExportFormat, dest: Path, wanted: dict, result: ExportResult, reused: bool = True) -> ExportResult:
    """The export already at `dest`: returned when it is this one, refused when it is anything else."""
    existing = form.read_manifest(dest)
    if existing is not None and {k: existing.get(k) for k in wanted} == wanted:
        result.reused, result.files = reused, list_files(dest)
        result.checked = existing.get("check")
        return result
    what = f"an export of job {existing['job_id']} ({existing['checkpoint']})" if existing else "other files"
    raise InvalidArgumentError(
        f"destination={str(dest)!r} already holds {what}; it is not overwritten. Choose another destination "
        "(or delete that one yourself)."
    )


__all__ = ["FORMATS", "MERGED_FORMAT", "ExportOptions", "ExportResult", "ExportedFile", "export", "resolve_destination"]
