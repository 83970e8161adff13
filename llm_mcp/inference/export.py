"""export_adapter: a job's adapter as a PEFT directory, a .tar.gz, or a merged full model.

Writes go to a temporary path renamed into place, with a manifest (export.json) naming the
source (job, checkpoint, adapter sha256). Exporting the same thing again returns the existing
export; a destination holding anything else is never overwritten. Merged exports run in a
detached `python -m llm_mcp.inference.export` process, so a long merge survives the server that asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llm_mcp.inference.targets import weights_file
from llm_mcp.core.errors import InvalidArgumentError, PathNotAllowedError
from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.quiet import quiet_bitsandbytes
from llm_mcp.core.store import Job
from llm_mcp.core.settings import Settings

FORMATS = ("peft", "archive", "merged")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
MERGE_WAIT_S = 25  # tool calls must answer within 30 s; a longer merge returns state "running"


class ExportedFile(BaseModel):
    path: str
    size: int
    sha256: str


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_destination(settings: Settings, value: str | None, default_name: str) -> Path:
    """Destination inside the exports root (relative values) or another allowed root; no symlinks."""
    exports = settings.home / "exports"
    raw = exports / default_name if not value else Path(value).expanduser()
    if not raw.is_absolute():
        raw = exports / raw
    if raw.is_symlink():
        raise PathNotAllowedError(f"destination={value!r} is a symlink; give a plain directory or file path")
    dest = settings.check_path(raw, "destination")
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


def _files(dest: Path) -> list[ExportedFile]:
    paths = [dest] if dest.is_file() else sorted(p for p in dest.rglob("*") if p.is_file())
    return [ExportedFile(path=str(p), size=p.stat().st_size, sha256=sha256_file(p)) for p in paths]


def model_card(job: Job, label: str, fmt: str, base: str, job_dir: Path) -> str:
    """README.md for an export: method, data, hyperparameters, losses, how to load."""
    cfg = job.config
    metrics = read_metrics(job_dir)
    steps = [m for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    lora, sparse = cfg.lora, cfg.sparse
    title = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA (Weight-Decomposed Low-Rank Adaptation)",
             "sparse": "Sparse (dynamic sparse delta)"}.get(job.method, job.method)
    lines = [
        f"# {job.name}", "",
        f"{title} fine-tune of `{base}` made with llm_mcp (job `{job.id}`, {label}).", "",
        "## Training", "",
        f"- data: `{cfg.dataset}`" + (f", eval: `{cfg.eval_dataset}`" if cfg.eval_dataset else ""),
        f"- steps: {steps[-1]['step'] if steps else 0} of {cfg.max_steps or str(cfg.epochs) + ' epoch(s)'}",
        f"- learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio:g}), "
        f"batch {cfg.batch_size} x {cfg.gradient_accumulation} x {cfg.num_processes} process(es), "
        f"max_seq_len {cfg.max_seq_len}, loss on {cfg.train_on} tokens, seed {cfg.seed}",
        (f"- sparse delta on {', '.join(lora.target_modules)}: density {sparse.density} ('auto' = LoRA rank "
         f"{lora.rank}'s parameter count), RigL mask updates every {sparse.mask_update_interval} steps "
         f"(fraction {sparse.mask_update_fraction:g}, cosine-decayed)" if sparse and sparse.use_rigl else
         f"- sparse delta on {', '.join(lora.target_modules)}: density {sparse.density}, fixed random mask"
         if sparse else
         f"- adapter: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
         f"targets {', '.join(lora.target_modules)}" + (", use_dora" if lora.use_dora else "")),
    ]
    if steps:
        lines.append(f"- train loss: {steps[0]['loss']:.4f} at step 1 -> {steps[-1]['loss']:.4f} at step {steps[-1]['step']}")
    if evals:
        lines.append(f"- eval loss: {evals[-1]:.4f}")
    if job.method == "qlora":
        lines.append("- base quantized to 4-bit NF4 (double quantization) during training")
    lines += ["", "## Load", "", "```python"]
    if fmt == "merged":
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained('.')", "tokenizer = AutoTokenizer.from_pretrained('.')"]
    elif sparse:
        lines += ["# sparse_adapter.safetensors: '<module>.indices' (int64, sorted flat indices into the",
                  "# [out_features, in_features] weight) and '<module>.values' (float32); merged W = W + delta.",
                  "import torch",
                  "from safetensors.torch import load_file",
                  "from transformers import AutoModelForCausalLM",
                  f"model = AutoModelForCausalLM.from_pretrained({base!r})",
                  "delta = load_file('sparse_adapter.safetensors')",
                  "for name in {k.rsplit('.', 1)[0] for k in delta}:",
                  "    w = model.get_submodule(name).weight",
                  "    w.data.view(-1).index_add_(0, delta[name + '.indices'], delta[name + '.values'].to(w.dtype))"]
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"base = AutoModelForCausalLM.from_pretrained({base!r})", "model = PeftModel.from_pretrained(base, '.')",
                  "tokenizer = AutoTokenizer.from_pretrained('.')"]
    lines += ["```", ""]
    return "\n".join(lines)


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
    if fmt == "merged":
        return {"transformers": f"AutoModelForCausalLM.from_pretrained({str(dest)!r})",
                "vllm": f"vllm serve {dest}"}
    path = str(dest) if fmt == "peft" else f"<extracted {dest.name}>"
    if job.method == "sparse":
        return {"llm_mcp": f"sample(adapter={path!r}, prompt=...)  # README.md shows how to apply it by hand",
                "vllm": f"sparse deltas are not LoRA adapters: export_adapter(job_id={job.id!r}, format='merged') "
                        "and run `vllm serve <merged dir>`"}
    out = {"peft": (f"from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                    f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {path!r})")}
    rank = job.config.lora.rank
    max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
    if vllm_adapter:
        out["vllm"] = (f"vllm serve {base} --enable-lora --lora-modules {job.name}={path} --max-lora-rank {max_rank}")
    else:
        out["vllm"] = (f"vLLM cannot serve {job.method} adapters directly: export_adapter(job_id={job.id!r}, "
                       "format='merged') and run `vllm serve <merged dir>`")
    return out


def export(settings: Settings, job: Job, job_dir: Path, adapter: Path, label: str, fmt: str,
           destination: str | None, vllm_adapter: bool) -> ExportResult:
    """Export (or find the identical existing export). Merged exports may return state 'running'."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format={fmt!r}; allowed: {list(FORMATS)}")
    base = job.config.model.id
    slug = label.replace(" ", "-")
    dest = resolve_destination(settings, destination, f"{job.id}-{slug}-{fmt}" + (".tar.gz" if fmt == "archive" else ""))
    if fmt == "archive" and not dest.name.endswith(".tar.gz"):
        raise InvalidArgumentError(f"destination={destination!r}: an archive export is a file ending in .tar.gz")
    manifest = _manifest(job, label, fmt, adapter)
    result = ExportResult(state="done", format=fmt, destination=str(dest), job_id=job.id, checkpoint=label,
                          snippets=snippets(job, fmt, dest, base, vllm_adapter))
    if job.config.quantized and fmt == "merged":
        result.notes.append("QLoRA: merged into the de-quantized NF4 base the adapter was trained on, saved in full "
                            "precision; it differs slightly from the original unquantized base (4-bit rounding). "
                            "Its logits also differ slightly from the 4-bit model's: bitsandbytes' 4-bit kernels "
                            "compute in bf16 on some CPUs and GPUs (up to ~1% of the logit scale was measured).")
    if dest.exists():
        existing = _existing_manifest(dest, fmt)
        if existing == manifest:
            result.reused, result.files = True, _files(dest)
            return result
        what = f"an export of job {existing['job_id']} ({existing['checkpoint']})" if existing else "other files"
        raise InvalidArgumentError(
            f"destination={str(dest)!r} already holds {what}; it is not overwritten. Choose another destination "
            "(or delete that one yourself).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.time_ns()}")
    if fmt == "merged":
        return _run_merge(job, job_dir, adapter, base, dest, manifest, result)
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
    result.files = _files(dest)
    return result


def _run_merge(job: Job, job_dir: Path, adapter: Path, base: str, dest: Path, manifest: dict,
               result: ExportResult) -> ExportResult:
    """Start (or wait for) the detached merge process; up to MERGE_WAIT_S in this call."""
    lock = dest.with_name(f".{dest.name}.lock")
    spec = {"job": {"id": job.id, "name": job.name, "method": job.method, "config": job.config.model_dump(mode="json"),
                    "state": job.state, "created_at": job.created_at},
            "adapter": str(adapter), "base": base, "dest": str(dest), "manifest": manifest, "job_dir": str(job_dir),
            "checkpoint": result.checkpoint}
    if not lock.exists():
        lock.write_text(json.dumps(spec))
        log = open(dest.with_name(f".{dest.name}.log"), "ab")
        subprocess.Popen([sys.executable, "-m", "llm_mcp.inference.export", str(lock)], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        log.close()
    deadline = time.monotonic() + MERGE_WAIT_S
    while time.monotonic() < deadline and lock.exists():
        time.sleep(0.25)
    error_file = dest.with_name(f".{dest.name}.error")
    if error_file.exists():
        message = error_file.read_text()
        error_file.unlink()
        raise InvalidArgumentError(f"the merge failed: {message}")
    if lock.exists():
        result.state = "running"
        result.notes.append("the merge is still running; call export_adapter again with the same arguments")
        return result
    result.files = _files(dest)
    return result


def merge_main(lock_path: str) -> int:
    """Worker: load base (+ de-quantize for QLoRA), apply adapter, merge, save; then remove the lock."""
    quiet_bitsandbytes()  # first: before peft / transformers import bitsandbytes
    lock = Path(lock_path)
    spec = json.loads(lock.read_text())
    dest = Path(spec["dest"])
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        cfg = JobConfig.parse(spec["job"]["config"])
        base_path = cfg.model.path
        trc = cfg.model.trust_remote_code
        if cfg.quantized:
            q = cfg.quantization
            model = AutoModelForCausalLM.from_pretrained(
                base_path, trust_remote_code=trc, device_map={"": "cpu"}, dtype=torch.float32, use_safetensors=True,
                quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                    bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=torch.float32))
            model = model.dequantize()
        else:
            model = AutoModelForCausalLM.from_pretrained(base_path, trust_remote_code=trc, dtype="auto",
                                                         use_safetensors=True)
        if spec["job"]["method"] == "sparse":
            from llm_mcp.train.sparse import merge_sparse_into_weights

            merge_sparse_into_weights(model, Path(spec["adapter"]))
            merged = model
        else:
            merged = PeftModel.from_pretrained(model, spec["adapter"]).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        tok_src = Path(spec["adapter"]) if (Path(spec["adapter"]) / "tokenizer_config.json").exists() else Path(base_path)
        AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trc).save_pretrained(tmp)
        job = Job(id=spec["job"]["id"], name=spec["job"]["name"], state=spec["job"]["state"], model=spec["base"],
                  method=spec["job"]["method"], device_set="", created_at=spec["job"]["created_at"], config=cfg)
        (tmp / "README.md").write_text(model_card(job, spec["checkpoint"], "merged", spec["base"], Path(spec["job_dir"])))
        (tmp / "export.json").write_text(json.dumps(spec["manifest"], indent=2))
        os.rename(tmp, dest)
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the waiting tool call through the error file
        dest.with_name(f".{dest.name}.error").write_text(f"{type(exc).__name__}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)
        return 1
    finally:
        lock.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(merge_main(sys.argv[1]))
