"""What an export holds besides the weights: the model card and the file list with sha256 (cached)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel

from llm_mcp.core.jobdir import read_metrics
from llm_mcp.core.methods import get_method
from llm_mcp.core.store import Job


class ExportedFile(BaseModel):
    path: str
    size: int
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_files(dest: Path) -> list[ExportedFile]:
    """Every exported file with its sha256; hashes are cached beside the export by (size, mtime), so asking
    again for a merged model (every vLLM sample of a DoRA / sparse job) does not re-read gigabytes."""
    cache_path = dest.with_name(f".{dest.name}.sha256.json")
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    paths = [dest] if dest.is_file() else sorted(p for p in dest.rglob("*") if p.is_file())
    out, changed = [], False
    for p in paths:
        st, known = p.stat(), cache.get(str(p))
        if not known or known["size"] != st.st_size or known["mtime_ns"] != st.st_mtime_ns:
            known = cache[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
            changed = True
        out.append(ExportedFile(path=str(p), size=st.st_size, sha256=known["sha256"]))
    if changed:
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    return out


def auto_class(job: Job) -> str:
    """The transformers class that loads the job's model: AutoModelForImageTextToText for a vision-language base."""
    try:
        vlm = "vision_config" in json.loads((Path(job.config.model.path) / "config.json").read_text())
    except (OSError, ValueError):
        vlm = False
    return "AutoModelForImageTextToText" if vlm else "AutoModelForCausalLM"


def model_card(job: Job, label: str, full_model: bool, base: str, job_dir: Path, load: list[str] | None = None) -> str:
    """README.md for an export: method, data, hyperparameters, losses, how to load (`load`: that section's
    lines instead of the transformers / PEFT code)."""
    cfg = job.training
    metrics = read_metrics(job_dir)
    steps = [m for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    lora, sparse = cfg.lora, cfg.sparse
    method = get_method(job.method)
    title = method.short
    lines = [
        f"# {job.name}",
        "",
        f"{title} fine-tune of `{base}` made with llm_mcp (job `{job.id}`, {label}).",
        "",
        "## Training",
        "",
        f"- data: `{cfg.dataset}`" + (f", eval: `{cfg.eval_dataset}`" if cfg.eval_dataset else ""),
        f"- steps: {steps[-1]['step'] if steps else 0} of {cfg.max_steps or str(cfg.epochs) + ' epoch(s)'}",
        f"- learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}, warmup {cfg.warmup_ratio:g}), "
        f"batch {cfg.batch_size} x {cfg.gradient_accumulation} x {cfg.num_processes} process(es), "
        f"max_seq_len {cfg.max_seq_len}, loss on {cfg.train_on} tokens, seed {cfg.seed}",
        (
            f"- sparse delta on {', '.join(lora.target_modules)}: density {sparse.density} ('auto' = LoRA rank "
            f"{lora.rank}'s parameter count), RigL mask updates every {sparse.mask_update_interval} steps "
            f"(fraction {sparse.mask_update_fraction:g}, cosine-decayed)"
            if sparse and sparse.use_rigl
            else f"- sparse delta on {', '.join(lora.target_modules)}: density {sparse.density}, fixed random mask"
            if sparse
            else f"- adapter: rank {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, "
            f"targets {', '.join(lora.target_modules)}" + (", use_dora" if lora.use_dora else "")
        ),
    ]
    if steps:
        lines.append(
            f"- train loss: {steps[0]['loss']:.4f} at step 1 -> {steps[-1]['loss']:.4f} at step {steps[-1]['step']}"
        )
    if evals:
        lines.append(f"- eval loss: {evals[-1]:.4f}")
    lines += method.card_notes(cfg.quantized)
    if load is not None:
        return "\n".join([*lines, "", *load, ""])
    auto = auto_class(job)
    lines += ["", "## Load", "", "```python"]
    if full_model:
        lines += [
            f"from transformers import {auto}, AutoTokenizer",
            f"model = {auto}.from_pretrained('.')",
            "tokenizer = AutoTokenizer.from_pretrained('.')",
        ]
    elif sparse:
        lines += [
            "# sparse_adapter.safetensors: '<module>.indices' (int64, sorted flat indices into the",
            "# [out_features, in_features] weight) and '<module>.values' (float32); merged W = W + delta.",
            "import torch",
            "from safetensors.torch import load_file",
            f"from transformers import {auto}",
            f"model = {auto}.from_pretrained({base!r})",
            "delta = load_file('sparse_adapter.safetensors')",
            "for name in {k.rsplit('.', 1)[0] for k in delta}:",
            "    w = model.get_submodule(name).weight",
            "    w.data.view(-1).index_add_(0, delta[name + '.indices'], delta[name + '.values'].to(w.dtype))",
        ]
    else:
        lines += [
            "from peft import PeftModel",
            f"from transformers import {auto}, AutoTokenizer",
            f"base = {auto}.from_pretrained({base!r})",
            "model = PeftModel.from_pretrained(base, '.')",
            "tokenizer = AutoTokenizer.from_pretrained('.')",
        ]
    lines += ["```", ""]
    return "\n".join(lines)
