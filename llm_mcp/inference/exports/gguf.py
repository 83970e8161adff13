"""format='gguf': files llama.cpp, Ollama and LM Studio run, written by llama.cpp's own converter and quantizer.

merge=true (every method): the adapter merged into its base, converted (and quantized): model-<q>.gguf.
merge=false (LoRA / QLoRA): the base converted (base-<q>.gguf) and the adapter alone as a GGUF LoRA
(adapter-f16.gguf) for llama.cpp's --lora and Ollama's ADAPTER.

With them a Modelfile for `ollama create`, a README with the commands, and export.json holding the check: the
written file loaded in llama.cpp and compared with the transformers model it came from (llama_cpp.check).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.methods import get_method
from llm_mcp.core.store import Job
from llm_mcp.inference.card import model_card
from llm_mcp.inference.exports.base import ExportFormat, ExportOptions, tokenizer_source
from llm_mcp.inference.exports.llama_cpp import (
    QUANTIZATIONS,
    check,
    quantize,
    require_llama_cpp,
    run_converter,
    verdict,
)
from llm_mcp.inference.exports.modelfile import modelfile

DEFAULT_QUANTIZATION = "q4_k_m"
# Architectures whose tiny checkpoints convert, load and pass the check (tests/test_architectures.py, test_cell);
# any other is refused at the call, with the reason where it is known.
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
    "FalconForCausalLM",
    "DeepseekV3ForCausalLM",
}
VISION = "a vision-language model's image side goes into a separate mmproj GGUF, which this export does not write"
NOT_CONVERTED = {"Gemma3ForConditionalGeneration": VISION, "Qwen3VLMoeForConditionalGeneration": VISION}


def hf_architecture(job: Job) -> str:
    """The base's transformers architecture (the matrix's, else its config.json's)."""
    if job.training.model.hf_architecture:
        return job.training.model.hf_architecture
    try:
        config = json.loads((Path(job.training.model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return (config.get("architectures") or ["unknown"])[0]


def local_dir(path: str) -> Path:
    """The directory the converter reads: a local checkpoint, or a hub model's snapshot in the cache (its job
    downloaded it)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    from llm_mcp.core.hub_datasets import cache_dir

    return Path(snapshot_download(path, cache_dir=cache_dir(), local_files_only=True))


class Gguf(ExportFormat):
    name = "gguf"
    description = (
        f"gguf: for llama.cpp / Ollama / LM Studio, with a Modelfile (quantization: {', '.join(QUANTIZATIONS)}; "
        f"default {DEFAULT_QUANTIZATION}; merge=false: LoRA / QLoRA adapter alone as a GGUF LoRA plus the base), "
        "checked in llama.cpp against the transformers model"
    )
    full_model = True
    background = True

    @property
    def quant(self) -> str:
        return self.options.quantization or DEFAULT_QUANTIZATION

    def configured(self, job: Job, options: ExportOptions) -> ExportFormat:
        if options.quantization is not None and options.quantization not in QUANTIZATIONS:
            raise InvalidArgumentError(
                f"quantization={options.quantization!r}; allowed: {list(QUANTIZATIONS)} (f16: checked token for "
                "token; q4_k_m: the usual size / quality trade-off)"
            )
        method = get_method(job.method)
        if not options.merge and not method.gguf_adapter:
            raise InvalidArgumentError(
                f"merge=false: llama.cpp cannot apply {method.short} adapters (job {job.id}); omit merge to export "
                "the merged model as GGUF"
            )
        if not options.merge and job.training.lora.target_parameters:
            raise InvalidArgumentError(
                f"merge=false: job {job.id}'s adapter also trains the MoE experts (target_parameters), which "
                "llama.cpp's LoRA converter does not take; omit merge to export the merged model as GGUF"
            )
        arch = hf_architecture(job)
        if arch not in GGUF_ARCHITECTURES:
            reason = NOT_CONVERTED.get(arch, "not checked with llama.cpp's converter here")
            raise InvalidArgumentError(
                f"format='gguf': {arch} ({job.model}) is not exported to GGUF: {reason}. GGUF export covers "
                f"{sorted(GGUF_ARCHITECTURES)}; export format='merged' instead"
            )
        require_llama_cpp()
        return self.with_options(options)

    def manifest_options(self) -> dict[str, Any]:
        return {"quantization": self.quant, "merge": self.options.merge}

    def from_manifest(self, manifest: dict[str, Any]) -> ExportFormat:
        return self.with_options(ExportOptions(quantization=manifest["quantization"], merge=manifest["merge"]))

    def default_name(self, job: Job, label: str) -> str:
        kind = "gguf" if self.options.merge else "gguf-lora"
        return f"{job.id}-{label.replace(' ', '-')}-{kind}-{self.quant}"

    def files(self) -> tuple[str, str | None]:
        """(the model file, the adapter file or None)."""
        if self.options.merge:
            return f"model-{self.quant}.gguf", None
        return f"base-{self.quant}.gguf", "adapter-f16.gguf"

    def needed_bytes(self, job: Job, adapter: Path) -> int:
        """The f16 intermediate, the quantized file and (merge) the merged checkpoint, from the base's size."""
        try:
            stored = sum(p.stat().st_size for p in local_dir(job.training.model.path).glob("*.safetensors"))
        except Exception:  # not on this disk: the worker says so
            stored = 0
        f16 = stored  # a bf16 / fp16 checkpoint; an fp32 one over-estimates, which is the safe side
        return int(stored * self.options.merge + f16 + f16 * QUANTIZATIONS[self.quant].bits / 16)

    def notes(self, job: Job) -> list[str]:
        out = []
        if job.training.quantized:
            out.append(
                "QLoRA: the GGUF is built from the base checkpoint (merged: the de-quantized NF4 base, as "
                "format='merged'); it differs slightly from the 4-bit model the adapter was trained on"
            )
        out.append("the Modelfile is written for Ollama's format; it has not been run in Ollama here")
        return out

    def snippets(self, job: Job, dest: Path, base: str, vllm_adapter: bool) -> dict[str, str]:
        model, lora = self.files()
        name = job.name.lower().replace(" ", "-")
        lora_arg = f" --lora {dest / lora}" if lora else ""
        return {
            "ollama": f"cd {dest} && ollama create {name} -f Modelfile && ollama run {name}",
            "llama-cli": f"llama-cli -m {dest / model}{lora_arg} -cnv",
            "llama-server": f"llama-server -m {dest / model}{lora_arg} --port 8080",
        }

    def write_background(self, spec: dict[str, Any], tmp: Path, progress: Any) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from llm_mcp.inference.exports.worker import load_export_base, save_merged, worker_job
        from llm_mcp.modeling.adapters import adapter_of_method

        job = worker_job(spec)
        cfg, adapter = job.training, Path(spec["adapter"])
        quant = QUANTIZATIONS[self.quant]
        model_name, lora_name = self.files()
        work = tmp / ".work"
        work.mkdir()
        log = Path(spec["dest"]).with_name(f".{Path(spec['dest']).name}.log")
        progress("loading the base model")
        base_dir = local_dir(cfg.model.path)
        if self.options.merge:
            reference = load_export_base(cfg)
            progress("merging the adapter")
            reference = adapter_of_method(job.method).merge(reference, adapter)
            source = work / "merged"
            save_merged(spec, cfg, reference, source)
        else:  # the base checkpoint as it is (QLoRA too: the GGUF is built from it) with the PEFT adapter
            from peft import PeftModel

            from llm_mcp.modeling.base import load_base

            source = base_dir
            base = load_base(str(source), dtype="auto", trust_remote_code=cfg.model.trust_remote_code)
            reference = PeftModel.from_pretrained(base, str(adapter))
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source(adapter, base_dir), trust_remote_code=cfg.model.trust_remote_code
        )
        progress(f"converting to GGUF ({quant.outtype}) with llama.cpp's converter")
        converted = tmp / model_name if quant.ftype is None else work / f"model-{quant.outtype}.gguf"
        run_converter("convert", [str(source), "--outtype", quant.outtype, "--outfile", str(converted)], log)
        if quant.ftype is not None:
            progress(f"quantizing to {self.quant} with llama.cpp's quantizer")
            quantize(converted, tmp / model_name, quant)
        lora_file = None
        if lora_name is not None:
            progress("converting the adapter to a GGUF LoRA")
            lora_file = tmp / lora_name
            args = [str(adapter), "--base", str(source), "--outtype", "f16", "--outfile", str(lora_file)]
            run_converter("lora", args, log)
        progress("checking the GGUF in llama.cpp against the transformers model")
        shutil.rmtree(work)  # the room the check and the rename need
        result = check(tmp / model_name, lora_file, reference.eval(), tokenizer, self.quant)
        refused = verdict(result, quant.exact)
        if refused:
            raise RuntimeError(f"the GGUF failed its check in llama.cpp: {refused} ({json.dumps(result)})")
        (tmp / "Modelfile").write_text(modelfile(tokenizer, model_name, lora_name, base_dir))
        card = model_card(job, spec["checkpoint"], True, spec["base"], Path(spec["job_dir"]), load=self._run(result))
        (tmp / "README.md").write_text(card)
        return {"check": result}

    def _run(self, result: dict[str, Any]) -> list[str]:
        """The model card's section on running the files, with what was checked."""
        model, lora = self.files()
        lora_arg = f" --lora {lora}" if lora else ""
        return [
            "## Run",
            "",
            "```sh",
            "ollama create my-model -f Modelfile && ollama run my-model",
            f"llama-cli -m {model}{lora_arg} -cnv",
            f"llama-server -m {model}{lora_arg} --port 8080",
            "```",
            "",
            f"Checked after writing in {result['runtime']}: the probe prompt ({result['prompt_tokens']} tokens) "
            f"tokenized identically: {result['tokenizer_match']}; greedy tokens matching the transformers model: "
            f"{result['greedy_tokens_matched']}; top-1 agreement {result['top1_agreement']}.",
        ]


GGUF = Gguf()
