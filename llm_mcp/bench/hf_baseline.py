"""The baseline for `bench train`: a plain, well-written HF Trainer + PEFT LoRA script.

What a user would write instead of llm_mcp: same model, data (same tokenization and label
masks), steps, batch, LR, schedule, LoRA config; padding to the longest sequence in each batch;
bf16 on a GPU. Run: python -m llm_mcp.bench.hf_baseline CONFIG.json  -> prints one JSON line of results.
`trl_baseline.py` reuses the pieces here for TRL's SFTTrainer.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def load(cfg: dict[str, Any]):
    """(tokenizer, encoded examples, model with LoRA) exactly as both baselines use them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_mcp.core.data import load_rows
    from llm_mcp.modeling.encode import encode_rows

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples, _ = encode_rows(tok, load_rows(Path(cfg["dataset"])), cfg["max_seq_len"], "completion")
    cuda = torch.cuda.is_available()
    extra = {"attn_implementation": cfg["attn_implementation"]} if cfg.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if cuda else torch.float32, **extra)
    if cuda:
        model.to("cuda")
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg["rank"],
            lora_alpha=cfg["alpha"],
            lora_dropout=cfg["dropout"],
            target_modules=cfg["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    return tok, examples, model


def training_kwargs(cfg: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by both baselines (SFTConfig takes them too)."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["max_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg["warmup_ratio"] * cfg["max_steps"]),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=not cuda,
        bf16=cuda,
        seed=cfg["seed"],
        dataloader_drop_last=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )


def counting(collate_fn, counted: dict[str, list[int]]):
    """Wrap a data collator so the real (non-padding) tokens of each batch it hands out are recorded.

    The data loader fetches one batch ahead, so only the first max_steps batches are trained on."""

    def collator(batch):
        out = collate_fn(batch)
        mask = out.get("attention_mask")
        counted["batches"].append(int(mask.sum()) if mask is not None else int(out["input_ids"].numel()))
        return out

    return collator


def report(trainer, output, wall: float, counted: dict[str, list[int]], **extra: Any) -> None:
    """Print the one JSON line `bench train` reads."""
    import torch

    cuda = torch.cuda.is_available()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    train_s = output.metrics.get("train_runtime", wall)  # the whole loop, incl. fetching the first batch
    tokens = sum(counted["batches"][: len(losses)])
    print(
        json.dumps(
            {
                "tokens": tokens,
                "train_s": round(train_s, 3),
                "tokens_per_s": round(tokens / train_s, 1),
                "final_loss": losses[-1],
                "peak_memory_mb": round(peak, 1),
                "steps": len(losses),
                **extra,
            }
        )
    )


def main(config_path: str) -> None:
    from transformers import Trainer, TrainingArguments

    from llm_mcp.modeling.encode import collate

    cfg = json.loads(Path(config_path).read_text())
    tok, examples, model = load(cfg)
    counted: dict[str, list[int]] = {"batches": []}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**training_kwargs(cfg, tmp)),
            train_dataset=examples,
            data_collator=counting(lambda b: collate(b, tok.pad_token_id), counted),
        )
        t0 = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - t0
    report(trainer, output, wall, counted)


if __name__ == "__main__":
    main(sys.argv[1])
