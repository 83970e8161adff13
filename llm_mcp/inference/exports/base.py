"""What an export format is (`ExportFormat`), and the adapter directory the adapter formats are built from."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.layouts import LAYOUTS, layout_of, weights_file
from llm_mcp.core.methods import get_method
from llm_mcp.core.store import Job
from llm_mcp.inference.card import auto_class, model_card, sha256_file

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
MANIFEST = "export.json"


@dataclass(frozen=True)
class ExportOptions:
    """What export_adapter takes beyond the format (only formats that use an option accept a non-default one)."""

    quantization: str | None = None
    merge: bool = True


class ExportFormat:
    """One export format: where it goes, how it is written, how it is loaded.

    `write` builds the export at a temporary path that the caller renames into place; a format that takes
    long (`background`) starts a detached worker instead and reports 'running' until it is done.
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one line for export_adapter's schema
    suffix: ClassVar[str] = ""  # the destination's required ending ('.tar.gz' for an archive)
    full_model: ClassVar[bool] = False  # a whole model (merged) rather than an adapter
    background: ClassVar[bool] = False  # written by a detached worker (llm_mcp.inference.exports.worker)
    options: ExportOptions = ExportOptions()

    def configured(self, job: Job, options: ExportOptions) -> ExportFormat:
        """This format with the caller's options, checked against the job (a format without options refuses any)."""
        if options.quantization is not None:
            raise InvalidArgumentError(
                f"quantization={options.quantization!r} applies to format='gguf' only (format={self.name!r}); "
                "omit it, or export format='gguf'"
            )
        if not options.merge:
            raise InvalidArgumentError(
                f"merge=false applies to format='gguf' only (format={self.name!r}: the 'peft' and 'archive' formats "
                "are the adapter alone already); omit merge"
            )
        return self

    def with_options(self, options: ExportOptions) -> ExportFormat:
        configured = copy.copy(self)
        configured.options = options
        return configured

    def manifest_options(self) -> dict[str, Any]:
        """The options that make one export of this format differ from another (recorded in the manifest)."""
        return {}

    def from_manifest(self, manifest: dict[str, Any]) -> ExportFormat:
        """This format with the options a manifest records (the background worker's view of the request)."""
        return self

    def write_background(self, spec: dict[str, Any], tmp: Path, progress: Any) -> dict[str, Any]:
        """A background format's worker: write the export into the directory `tmp` (llm_mcp.inference.exports.worker
        renames it into place); `progress(stage)` reports where it is. Returns what to add to the manifest."""
        raise NotImplementedError

    def default_name(self, job: Job, label: str) -> str:
        return f"{job.id}-{label.replace(' ', '-')}-{self.name}{self.suffix}"

    def read_manifest(self, dest: Path) -> dict[str, Any] | None:
        """The manifest of an existing export at `dest` (None: not an export of ours)."""
        try:
            return json.loads((dest / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def write(self, job: Job, label: str, adapter: Path, base: str, tmp: Path, job_dir: Path, manifest: dict) -> None:
        """Write the export at `tmp` (renamed into place by the caller)."""
        raise NotImplementedError

    def needed_bytes(self, job: Job, adapter: Path) -> int:
        """About what the export takes on disk (checked against the free space first)."""
        return sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())

    def shown_path(self, dest: Path) -> str:
        """How a snippet names the export (an archive must be extracted first)."""
        return str(dest)

    def notes(self, job: Job) -> list[str]:
        return []

    def snippets(self, job: Job, dest: Path, base: str, vllm_adapter: bool) -> dict[str, str]:
        """Ready-to-run code that loads an adapter export (PEFT, vLLM), or says what to do instead."""
        auto, path = auto_class(job), self.shown_path(dest)
        if not LAYOUTS[get_method(job.method).layout].peft:
            return {
                "llm_mcp": f"sample(adapter={path!r}, prompt=...)  # README.md shows how to apply it by hand",
                "vllm": f"these adapters are not LoRA adapters: export_adapter(job_id={job.id!r}, format='merged') "
                "and run `vllm serve <merged dir>`",
            }
        out = {
            "peft": (
                f"from peft import PeftModel\nfrom transformers import {auto}\n"
                f"model = PeftModel.from_pretrained({auto}.from_pretrained({base!r}), {path!r})"
            )
        }
        rank = job.training.lora.rank
        max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
        if job.training.lora.target_parameters:
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


def manifest(job: Job, label: str, form: ExportFormat, adapter: Path) -> dict[str, Any]:
    """What an export holds: its job, checkpoint, format (and options) and the adapter's sha256 (a second call
    compares it)."""
    return {
        "job_id": job.id,
        "checkpoint": label,
        "format": form.name,
        **form.manifest_options(),
        "adapter_sha256": sha256_file(weights_file(adapter)),
    }


def tokenizer_source(adapter: Path, base: Path) -> Path:
    """Where an export's tokenizer comes from: the adapter's own (a job that changed it) or the base's."""
    return adapter if (adapter / "tokenizer_config.json").exists() else base


def write_adapter_dir(job: Job, label: str, adapter: Path, base: str, out: Path, job_dir: Path, manifest: dict) -> None:
    """The adapter directory: its layout's files, the tokenizer, a model card and the manifest (with whether the
    adapter was trained on a 4-bit base: sample(adapter=...) then loads the base so, as for the job)."""
    out.mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps({**manifest, "quantized_base": job.training.quantized}, indent=2))
    layout = layout_of(adapter)
    assert layout is not None, f"{adapter} holds an adapter (job_adapter found it)"
    cfg = json.loads((adapter / layout.config_file).read_text())
    cfg["base_model_name_or_path"] = base
    (out / layout.config_file).write_text(json.dumps(cfg, indent=2))
    shutil.copy2(weights_file(adapter), out / weights_file(adapter).name)
    tok_src = tokenizer_source(adapter, Path(job.config.model.path))
    for name in TOKENIZER_FILES:
        if (tok_src / name).exists():
            shutil.copy2(tok_src / name, out / name)
    (out / "README.md").write_text(model_card(job, label, False, base, job_dir))
