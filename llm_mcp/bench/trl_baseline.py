"""The second baseline for `bench train --device cuda`: TRL's SFTTrainer with padding-free packing.

As TRL's docs recommend for speed: `packing=True` with the best-fit-decreasing strategy (which turns on
padding-free batches: one row of concatenated sequences with position_ids, no padding) and a
FlashAttention implementation, so sequences in one row do not attend to each other. Same model, LoRA
config, encoded rows and labels (a pre-tokenized dataset with a `labels` column is used as is), steps,
LR and schedule as the other paths. `max_length` = batch_size x max_seq_len tokens per packed row, so
a step sees about as many tokens as a padded batch would hold.

TRL is optional (`pip install 'llm-mcp[bench]'`); it is imported here only.
Run: python -m llm_mcp.bench.trl_baseline CONFIG.json  -> prints one JSON line of results.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from llm_mcp.bench.hf_baseline import counting, load, report, training_kwargs


def attention_for_padding_free() -> str:
    """FlashAttention when installed (needed for padding-free correctness); else SDPA, reported as such."""
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def main(config_path: str) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = json.loads(Path(config_path).read_text())
    cfg.setdefault("attn_implementation", attention_for_padding_free())
    tok, examples, model = load(cfg)
    data = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    kwargs = training_kwargs(cfg, "")
    kwargs["per_device_train_batch_size"] = 1  # one packed row of batch_size x max_seq_len tokens
    counted: dict[str, list[int]] = {"batches": []}
    with tempfile.TemporaryDirectory() as tmp:
        kwargs["output_dir"] = tmp
        args = SFTConfig(
            **kwargs,
            packing=True,
            packing_strategy="bfd",
            max_length=cfg["batch_size"] * cfg["max_seq_len"],
            dataset_num_proc=None,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.data_collator = counting(trainer.data_collator, counted)
        t0 = time.perf_counter()
        output = trainer.train()
        wall = time.perf_counter() - t0
    report(
        trainer,
        output,
        wall,
        counted,
        attn_implementation=cfg["attn_implementation"],
        padding_free=bool(getattr(trainer, "padding_free", False)),
    )


if __name__ == "__main__":
    main(sys.argv[1])
