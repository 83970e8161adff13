"""format='archive': the adapter directory as one .tar.gz file."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

from llm_mcp.core.store import Job
from llm_mcp.inference.exports.base import MANIFEST, ExportFormat, write_adapter_dir


class Archive(ExportFormat):
    name = "archive"
    description = "archive: the same as .tar.gz"
    suffix = ".tar.gz"

    def read_manifest(self, dest: Path) -> dict[str, Any] | None:
        try:
            with tarfile.open(dest, "r:gz") as tar:
                member = tar.extractfile(MANIFEST)
                return json.loads(member.read()) if member else None
        except (OSError, ValueError, KeyError, tarfile.TarError):
            return None

    def write(self, job: Job, label: str, adapter: Path, base: str, tmp: Path, job_dir: Path, manifest: dict) -> None:
        staging = tmp.with_name(tmp.name + "-dir")
        try:
            write_adapter_dir(job, label, adapter, base, staging, job_dir, manifest)
            with tarfile.open(tmp, "w:gz") as tar:
                for p in sorted(staging.iterdir()):
                    tar.add(p, arcname=p.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def shown_path(self, dest: Path) -> str:
        return f"<extracted {dest.name}>"


ARCHIVE = Archive()
