"""export_adapter: a job's adapter as a PEFT directory, a .tar.gz, or a merged full model.

Writes go to a temporary path renamed into place, with a manifest (export.json) naming the
source (job, checkpoint, adapter sha256). Exporting the same thing again returns the existing
export; a destination holding anything else is never overwritten. Merged exports run in a
detached `python -m llm_mcp.inference.merge` process, so a long merge survives the server that asked.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError, PathNotAllowedError
from llm_mcp.core.settings import Settings
from llm_mcp.core.store import Job
from llm_mcp.inference.card import ExportedFile, auto_class, list_files, model_card, sha256_file
from llm_mcp.inference.merge import run_merge
from llm_mcp.inference.targets import weights_file

FORMATS = ("peft", "archive", "merged")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


class ExportResult(BaseModel):
    state: str = Field(description="'done', or 'running' for a merge still in progress (call again).")
    format: str
    destination: str
    job_id: str
    checkpoint: str
    reused: bool = Field(False, description="The same export already existed; nothing was written.")
    files: list[ExportedFile] = []
    snippets: dict[str, str] = {}
    notes: list[str] = []


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


def _manifest(job: Job, label: str, fmt: str, adapter: Path) -> dict[str, Any]:
    return {"job_id": job.id, "checkpoint": label, "format": fmt, "adapter_sha256": sha256_file(weights_file(adapter))}


def _existing_manifest(dest: Path, fmt: str) -> dict[str, Any] | None:
    try:
        if fmt == "archive":
            with tarfile.open(dest, "r:gz") as tar:
                member = tar.extractfile("export.json")
                return json.loads(member.read()) if member else None
        return json.loads((dest / "export.json").read_text())
    except (OSError, ValueError, KeyError, tarfile.TarError):
        return None


def _write_peft(job: Job, label: str, adapter: Path, base: str, out: Path, job_dir: Path) -> None:
    """The adapter directory: PEFT files (or the sparse layout), tokenizer and a model card."""
    out.mkdir(parents=True)
    config_name = "sparse_config.json" if job.method == "sparse" else "adapter_config.json"
    cfg = json.loads((adapter / config_name).read_text())
    cfg["base_model_name_or_path"] = base
    (out / config_name).write_text(json.dumps(cfg, indent=2))
    shutil.copy2(weights_file(adapter), out / weights_file(adapter).name)
    tok_src = adapter if (adapter / "tokenizer_config.json").exists() else Path(job.config.model.path)
    for name in TOKENIZER_FILES:
        if (tok_src / name).exists():
            shutil.copy2(tok_src / name, out / name)
    (out / "README.md").write_text(model_card(job, label, "peft", base, job_dir))


def snippets(job: Job, fmt: str, dest: Path, base: str, vllm_adapter: bool) -> dict[str, str]:
    auto = auto_class(job)
    if fmt == "merged":
        return {"transformers": f"{auto}.from_pretrained({str(dest)!r})", "vllm": f"vllm serve {dest}"}
    path = str(dest) if fmt == "peft" else f"<extracted {dest.name}>"
    if job.method == "sparse":
        return {
            "llm_mcp": f"sample(adapter={path!r}, prompt=...)  # README.md shows how to apply it by hand",
            "vllm": f"sparse deltas are not LoRA adapters: export_adapter(job_id={job.id!r}, format='merged') "
            "and run `vllm serve <merged dir>`",
        }
    out = {
        "peft": (
            f"from peft import PeftModel\nfrom transformers import {auto}\n"
            f"model = PeftModel.from_pretrained({auto}.from_pretrained({base!r}), {path!r})"
        )
    }
    rank = job.config.lora.rank
    max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
    if job.config.lora.target_parameters:
        out["vllm"] = (
            f"this adapter also trains the MoE experts (PEFT target_parameters); serving that as a vLLM "
            f"LoRA adapter is untested here: export_adapter(job_id={job.id!r}, format='merged') and run "
            "`vllm serve <merged dir>`"
        )
    elif vllm_adapter:
        out["vllm"] = f"vllm serve {base} --enable-lora --lora-modules {job.name}={path} --max-lora-rank {max_rank}"
    else:
        out["vllm"] = (
            f"vLLM cannot serve {job.method} adapters directly: export_adapter(job_id={job.id!r}, "
            "format='merged') and run `vllm serve <merged dir>`"
        )
    return out


def export(
    settings: Settings,
    job: Job,
    job_dir: Path,
    adapter: Path,
    label: str,
    fmt: str,
    destination: str | None,
    vllm_adapter: bool,
) -> ExportResult:
    """Export (or find the identical existing export). Merged exports may return state 'running'."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format={fmt!r}; allowed: {list(FORMATS)}")
    base = job.config.model.id
    slug = label.replace(" ", "-")
    dest = resolve_destination(
        settings, destination, f"{job.id}-{slug}-{fmt}" + (".tar.gz" if fmt == "archive" else "")
    )
    if fmt == "archive" and not dest.name.endswith(".tar.gz"):
        raise InvalidArgumentError(f"destination={destination!r}: an archive export is a file ending in .tar.gz")
    manifest = _manifest(job, label, fmt, adapter)
    result = ExportResult(
        state="done",
        format=fmt,
        destination=str(dest),
        job_id=job.id,
        checkpoint=label,
        snippets=snippets(job, fmt, dest, base, vllm_adapter),
    )
    if job.config.quantized and fmt == "merged":
        result.notes.append(
            "QLoRA: merged into the de-quantized NF4 base the adapter was trained on, saved in full "
            "precision; it differs slightly from the original unquantized base (4-bit rounding). "
            "Its logits also differ slightly from the 4-bit model's: bitsandbytes' 4-bit kernels "
            "compute in bf16 on some CPUs and GPUs (up to ~1% of the logit scale was measured)."
        )
    if dest.exists():
        existing = _existing_manifest(dest, fmt)
        if existing == manifest:
            result.reused, result.files = True, list_files(dest)
            return result
        what = f"an export of job {existing['job_id']} ({existing['checkpoint']})" if existing else "other files"
        raise InvalidArgumentError(
            f"destination={str(dest)!r} already holds {what}; it is not overwritten. Choose another destination "
            "(or delete that one yourself)."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.time_ns()}")
    if fmt == "merged":
        return run_merge(job, job_dir, adapter, base, dest, manifest, result)
    try:
        if fmt == "peft":
            _write_peft(job, label, adapter, base, tmp, job_dir)
            (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
        else:
            staging = tmp.with_name(tmp.name + "-dir")
            try:
                _write_peft(job, label, adapter, base, staging, job_dir)
                (staging / "export.json").write_text(json.dumps(manifest, indent=2))
                with tarfile.open(tmp, "w:gz") as tar:
                    for p in sorted(staging.iterdir()):
                        tar.add(p, arcname=p.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    result.files = list_files(dest)
    return result
