"""The baseline for `bench train`: a plain, well-written HF Trainer + PEFT LoRA script.

What a user would write instead of llm_mcp: same model, data (same tokenization and label
masks), steps, batch, LR, schedule, LoRA config; padding to the longest sequence in each batch.
Run: python -m llm_mcp.bench.hf_baseline CONFIG.json  -> prints one JSON line of results.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(config_path: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from llm_mcp.core.data import load_rows
    from llm_mcp.train.encode import collate, encode_rows

    cfg = json.loads(open(config_path).read())
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples, _ = encode_rows(tok, load_rows(Path(cfg["dataset"])), cfg["max_seq_len"], "completion")
    counted = {"tokens": 0}

    def collator(batch):
        out = collate(batch, tok.pad_token_id)
        counted["tokens"] += int(out["attention_mask"].sum())
        return out

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                                             target_modules=cfg["target_modules"], task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        start = end = None

        def on_step_begin(self, args, state, control, **kw):
            self.start = self.start or time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.end = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg["batch_size"], max_steps=cfg["max_steps"],
            learning_rate=cfg["learning_rate"], lr_scheduler_type="cosine",
            warmup_steps=int(cfg["warmup_ratio"] * cfg["max_steps"]),
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=not cuda, bf16=cuda, seed=cfg["seed"], dataloader_drop_last=True,
            remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                          callbacks=[clock])
        t0 = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # The first on_step_begin comes after the first batch is fetched; train_runtime covers the whole loop.
    train_s = output.metrics.get("train_runtime", wall)
    print(json.dumps({"tokens": counted["tokens"], "train_s": round(train_s, 3),
                      "tokens_per_s": round(counted["tokens"] / train_s, 1), "final_loss": losses[-1],
                      "peak_memory_mb": round(peak, 1), "steps": len(losses)}))


if __name__ == "__main__":
    main(sys.argv[1])
