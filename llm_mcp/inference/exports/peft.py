"""format='peft': the adapter directory PeftModel.from_pretrained loads (the sparse layout for sparse jobs)."""

from __future__ import annotations

import json
from pathlib import Path

from llm_mcp.core.store import Job
from llm_mcp.inference.exports.base import MANIFEST, ExportFormat, write_adapter_dir


class PeftDirectory(ExportFormat):
    name = "peft"
    description = "peft: adapter directory (PeftModel.from_pretrained)"

    def write(self, job: Job, label: str, adapter: Path, base: str, tmp: Path, job_dir: Path, manifest: dict) -> None:
        write_adapter_dir(job, label, adapter, base, tmp, job_dir)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


PEFT_DIRECTORY = PeftDirectory()
