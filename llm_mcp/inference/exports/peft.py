"""format='peft': the adapter directory PeftModel.from_pretrained loads (the sparse layout for sparse jobs)."""

from __future__ import annotations

from pathlib import Path

from llm_mcp.core.store import Job
from llm_mcp.inference.exports.base import ExportFormat, write_adapter_dir


class PeftDirectory(ExportFormat):
    name = "peft"
    description = "peft: adapter directory (PeftModel.from_pretrained)"

    def write(self, job: Job, label: str, adapter: Path, base: str, tmp: Path, job_dir: Path, manifest: dict) -> None:
        write_adapter_dir(job, label, adapter, base, tmp, job_dir, manifest)


PEFT_DIRECTORY = PeftDirectory()
