"""format='merged': the adapter merged into its base, a full safetensors model (a detached merge worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_mcp.core.store import Job
from llm_mcp.inference.card import auto_class, model_card
from llm_mcp.inference.exports.base import ExportFormat


class Merged(ExportFormat):
    name = "merged"
    description = (
        "merged: a full model AutoModelForCausalLM (a vision-language model: AutoModelForImageTextToText) loads"
    )
    full_model = True
    background = True  # llm_mcp.inference.exports.worker writes it; a call waits up to MERGE_WAIT_S

    def needed_bytes(self, job: Job, adapter: Path) -> int:
        """The base model's weights (a local checkpoint's safetensors; 0 where they are not on this disk)."""
        base = Path(job.training.model.path)
        return sum(p.stat().st_size for p in base.glob("*.safetensors")) if base.is_dir() else 0

    def notes(self, job: Job) -> list[str]:
        if not job.training.quantized:
            return []
        return [
            "QLoRA: merged into the de-quantized NF4 base the adapter was trained on, saved in the base "
            "checkpoint's dtype; it differs slightly from the original unquantized base (4-bit rounding). "
            "Its logits also differ slightly from the 4-bit model's: bitsandbytes' 4-bit kernels "
            "compute in bf16 on some CPUs and GPUs (up to ~1% of the logit scale was measured)."
        ]

    def write_background(self, spec: dict[str, Any], tmp: Path, progress: Any) -> dict[str, Any]:
        from llm_mcp.inference.exports.worker import load_export_base, save_merged, worker_job
        from llm_mcp.modeling.adapters import adapter_of_method

        job = worker_job(spec)
        progress("loading the base model")
        model = load_export_base(job.training)
        progress("merging the adapter")
        merged = adapter_of_method(job.method).merge(model, Path(spec["adapter"]))
        progress("saving the merged model")
        save_merged(spec, job.training, merged, tmp)
        (tmp / "README.md").write_text(model_card(job, spec["checkpoint"], True, spec["base"], Path(spec["job_dir"])))
        return {}

    def snippets(self, job: Job, dest: Path, base: str, vllm_adapter: bool) -> dict[str, str]:
        return {"transformers": f"{auto_class(job)}.from_pretrained({str(dest)!r})", "vllm": f"vllm serve {dest}"}


MERGED = Merged()
