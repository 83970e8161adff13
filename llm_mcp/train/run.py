"""The training loop, top to bottom: setup -> train -> save. Run by `accelerate launch`.

    accelerate launch --config_file configs/accelerate/<kind>.yaml -m llm_mcp.train.run JOB_DIR

Reads JOB_DIR/config.json (written and validated by the server), appends one JSON line per
optimizer step to metrics.jsonl, checkpoints every `checkpoint_every` steps, and ends by
writing result.json. SIGTERM (cancel_job) stops at the next step boundary, with a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from llm_mcp.train.checkpoint import load_checkpoint, save_adapter, save_checkpoint
from llm_mcp.train.encode import IGNORE, collate, encode_rows


class Run:
    """State shared by the steps of one run (kept explicit rather than hidden in a trainer)."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.cfg: dict[str, Any] = json.loads((job_dir / "config.json").read_text())
        self.stop_requested = False
        self.t0 = time.time()

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def metric(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.job_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def result(self, state: str, **fields: Any) -> None:
        if self.accelerator.is_main_process:
            tmp = self.job_dir / "result.json.tmp"
            tmp.write_text(json.dumps({"state": state, **fields}, indent=2))
            tmp.rename(self.job_dir / "result.json")


def _split(rows: list, cfg: dict[str, Any]) -> tuple[list, list]:
    if cfg.get("eval_dataset"):
        from llm_mcp.data import load_rows

        return rows, load_rows(Path(cfg["eval_dataset"]))
    frac = cfg.get("eval_fraction") or 0.0
    if frac <= 0 or len(rows) < 2:
        return rows, []
    g = torch.Generator().manual_seed(cfg["seed"])
    perm = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * frac))
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


class BatchOrder:
    """Which examples each step trains on: a pure function of (seed, step), so resume is exact.

    Each epoch shuffles the examples; with group_by_length, examples are then sorted by length
    inside mega-chunks of 32 steps and those steps are shuffled, so a batch holds sequences of
    similar length and little compute goes to padding.
    """

    def __init__(self, lengths: list[int], cfg: dict[str, Any], world: int):
        self.lengths, self.cfg, self.world = lengths, cfg, world
        self.per_step = cfg["batch_size"] * cfg["gradient_accumulation"] * world
        self.steps_per_epoch = len(lengths) // self.per_step
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _steps_of(self, epoch: int) -> list[list[int]]:
        if self._epoch and self._epoch[0] == epoch:
            return self._epoch[1]
        g = torch.Generator().manual_seed(self.cfg["seed"] * 100003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        if self.cfg.get("group_by_length", True):
            mega = self.per_step * 32
            steps = []
            for start in range(0, len(perm), mega):
                chunk = sorted(perm[start:start + mega], key=lambda i: -self.lengths[i])
                steps += [chunk[k:k + self.per_step] for k in range(0, len(chunk) - self.per_step + 1, self.per_step)]
            steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
        else:
            steps = [perm[k * self.per_step:(k + 1) * self.per_step] for k in range(self.steps_per_epoch)]
        self._epoch = (epoch, steps)
        return steps

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Example indices of each micro-batch this rank runs at `step`."""
        epoch, idx = divmod(step, self.steps_per_epoch)
        chunk = self._steps_of(epoch)[idx]
        bs, world = self.cfg["batch_size"], self.world
        return [chunk[(m * world + rank) * bs:(m * world + rank + 1) * bs] for m in range(self.cfg["gradient_accumulation"])]


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropy over label positions, computing logits only there.

    Runs the decoder, gathers the positions whose next token is trained on, and applies the LM
    head and the (fp32) cross-entropy to those alone: prompt and padding positions never pay for
    the vocabulary projection. Falls back to full logits for models without the usual layout.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = getattr(causal_lm, "base_model", None), causal_lm.get_output_embeddings()
        self.split = decoder is not None and decoder is not causal_lm and head is not None
        self.decoder, self.head = (decoder, head) if self.split else (None, None)

    def forward(self, input_ids, attention_mask, labels):
        targets = labels[:, 1:]
        mask = targets != IGNORE
        if self.split:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            logits = self.head(hidden[mask])
            return torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")


def token_loss_sum(loss_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return loss_model(batch["input_ids"], batch["attention_mask"], batch["labels"])


@torch.no_grad()
def evaluate(run: Run, model, examples: list[dict], pad_id: int) -> float | None:
    if not examples:
        return None
    acc = run.accelerator
    model.eval()
    total = torch.zeros(2, device=acc.device)
    bs = run.cfg["batch_size"]
    for start in range(acc.process_index * bs, len(examples), bs * acc.num_processes):
        batch = {k: v.to(acc.device) for k, v in collate(examples[start:start + bs], pad_id).items()}
        total[0] += token_loss_sum(model, batch)
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    total = acc.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train(run: Run) -> None:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from llm_mcp.data import load_rows
    from llm_mcp.train.model import load_model, load_tokenizer

    cfg = run.cfg
    acc = run.accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    set_seed(cfg["seed"])
    device = "cpu" if acc.device.type == "cpu" else "cuda"
    run.log(f"job {cfg['job_id']}: {cfg['method']} on {cfg['model']['id']} | {world} process(es) on {device}")

    tok = load_tokenizer(cfg)
    train_rows, eval_rows = _split(load_rows(Path(cfg["dataset"])), cfg)
    examples, stats = encode_rows(tok, train_rows, cfg["max_seq_len"], cfg["train_on"])
    eval_examples, _ = encode_rows(tok, eval_rows, cfg["max_seq_len"], cfg["train_on"])
    if stats.truncated:
        run.log(f"truncated {stats.truncated} of {len(train_rows)} training sequences to max_seq_len={cfg['max_seq_len']}")
    if stats.dropped_empty:
        run.log(f"dropped {stats.dropped_empty} sequences with no trainable token left after truncation")
    order = BatchOrder([len(e["input_ids"]) for e in examples], cfg, world)
    per_step = order.per_step
    if len(examples) < per_step:
        raise ValueError(
            f"only {len(examples)} usable training examples, but one step needs batch_size x gradient_accumulation "
            f"x processes = {per_step}; add data or lower batch_size / gradient_accumulation / num_processes"
        )
    steps_per_epoch = order.steps_per_epoch
    total_steps = cfg["max_steps"] or max(1, math.ceil(cfg["epochs"] * steps_per_epoch))

    model = load_model(cfg, device, acc.local_process_index)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    warmup = int(cfg["warmup_ratio"] * total_steps)
    scheduler = get_scheduler(cfg["lr_scheduler"], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    loss_model, optimizer = acc.prepare(CausalLMLoss(model), optimizer)

    start_step = 0
    if cfg.get("resume_checkpoint"):
        start_step = load_checkpoint(acc, model, optimizer, scheduler, Path(cfg["resume_checkpoint"]))
        run.log(f"resumed from {cfg['resume_checkpoint']} at step {start_step}")
        if start_step >= total_steps:
            raise ValueError(f"the checkpoint is at step {start_step}, not before total_steps={total_steps}")
    run.metric({"event": "start", "total_steps": total_steps, "start_step": start_step,
                "steps_per_epoch": steps_per_epoch, "examples": stats.examples, "eval_examples": len(eval_examples),
                "truncated": stats.truncated, "dropped": stats.dropped_empty, "trainable_params": n_trainable,
                "target_tokens": stats.target_tokens, "processes": world, "device": device})
    run.log(f"{stats.examples} examples ({stats.target_tokens} trainable tokens), {total_steps} steps, "
            f"{n_trainable:,} trainable params")

    model.train()
    pad_id = tok.pad_token_id
    eval_every = cfg.get("eval_every") or 0
    meta = {"job_id": cfg["job_id"], "method": cfg["method"], "model": cfg["model"]["id"],
            "base_model_name_or_path": cfg["model"]["id"], "target_modules": cfg["lora"]["target_modules"]}
    from llm_mcp.train.sparse import cosine_fraction, sparse_modules

    sparse = sparse_modules(acc.unwrap_model(model))
    sp = cfg.get("sparse") or {}
    rigl_every = sp.get("mask_update_interval", 0) if sparse and sp.get("use_rigl") else 0
    changed = 0
    step_loss = float("nan")
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        update_mask = bool(rigl_every) and (step + 1) % rigl_every == 0 and step + 1 < total_steps
        for m in sparse.values():
            m.collect_dense_grad = update_mask
        micro = [collate([examples[i] for i in idx], pad_id) for idx in order.micro_batches(step, rank)]
        counts = torch.tensor([float(sum((b["labels"][:, 1:] != IGNORE).sum() for b in micro)),
                               float(sum(b["attention_mask"].sum() for b in micro))], device=acc.device)
        global_counts = acc.reduce(counts.clone(), "sum")
        loss_sum = torch.zeros((), device=acc.device)
        for m, batch in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            ctx = acc.no_sync(loss_model) if m < len(micro) - 1 else _nullcontext()
            with ctx:
                loss = token_loss_sum(loss_model, batch)
                # DDP averages gradients over ranks; scale so the result is the global token mean.
                acc.backward(loss * world / global_counts[0])
            loss_sum += loss.detach()
        grad_norm = acc.clip_grad_norm_(trainable, cfg["max_grad_norm"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if update_mask:
            changed = update_sparse_masks(acc, sparse, optimizer, cosine_fraction(
                sp["mask_update_fraction"], step + 1, total_steps))
        step_loss = (acc.reduce(loss_sum, "sum") / global_counts[0]).item()
        done = step + 1
        elapsed = time.perf_counter() - t_step
        record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": round(step_loss, 6),
                  "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                  "tokens": int(global_counts[1]), "tokens_per_s": round(float(global_counts[1]) / elapsed, 1),
                  "step_time_s": round(elapsed, 4), "elapsed_s": round(time.time() - run.t0, 2)}
        if sparse:
            record["density"] = round(sum(m.k for m in sparse.values()) /
                                      sum(m.shape[0] * m.shape[1] for m in sparse.values()), 6)
            record["mask_changed"] = changed if update_mask else 0
        if eval_every and done % eval_every == 0 and done < total_steps:
            record["eval_loss"] = evaluate(run, loss_model, eval_examples, pad_id)
        run.metric(record)
        stop = acc.reduce(torch.tensor(float(run.stop_requested), device=acc.device), "max").item() > 0
        if stop or (cfg["checkpoint_every"] and done % cfg["checkpoint_every"] == 0 and done < total_steps):
            ckpt = save_checkpoint(acc, model, optimizer, scheduler, run.job_dir, done, meta, cfg["keep_checkpoints"])
            run.metric({"event": "checkpoint", "step": done, "path": str(ckpt)})
        if stop:
            run.log(f"cancel requested: stopped after step {done} with a checkpoint")
            run.result("cancelled", step=done, total_steps=total_steps, loss=step_loss)
            return

    eval_loss = evaluate(run, loss_model, eval_examples, pad_id)
    run.metric({"event": "end", "peak_memory_mb": peak_memory_mb(device)})
    if eval_loss is not None:
        run.metric({"step": total_steps, "eval_loss": eval_loss})
    acc.wait_for_everyone()
    adapter_dir = run.job_dir / "adapter"
    if acc.is_main_process:
        save_adapter(acc.unwrap_model(model), adapter_dir, meta)
        tok.save_pretrained(adapter_dir)
        save_probe(acc.unwrap_model(model), examples[0]["input_ids"][:16], run.job_dir / "probe.safetensors")
    acc.wait_for_everyone()
    run.log(f"done: {total_steps} steps, final loss {step_loss:.4f}; adapter in {adapter_dir}")
    run.result("succeeded", step=total_steps, total_steps=total_steps, loss=step_loss, eval_loss=eval_loss,
               adapter=str(adapter_dir))


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@torch.no_grad()
def update_sparse_masks(acc, sparse: dict, optimizer, fraction: float) -> int:
    """RigL step on every sparse layer; dense gradients are summed over processes first."""
    changed = 0
    for module in sparse.values():
        if acc.num_processes > 1:
            module.dense_grad = acc.reduce(module.dense_grad, "sum")
        changed += module.update_mask(int(round(fraction * module.k)), optimizer)
        module.collect_dense_grad = False
    return changed


@torch.no_grad()
def save_probe(model, input_ids: list[int], path: Path) -> None:
    """The trained model's logits on a short fixed input: exports are checked against them."""
    from safetensors.torch import save_file

    model.eval()
    ids = torch.tensor([input_ids], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0].float().cpu()
    save_file({"input_ids": ids[0].cpu(), "logits": logits.contiguous()}, str(path))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _next_step_for(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text:
        return "lower batch_size or max_seq_len, use method='qlora', or enable gradient_checkpointing, then resume_from this job"
    return "read the last log lines (job_status), fix the cause, then start again or resume_from this job"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run = Run(Path(args[0]).resolve())

    def on_sigterm(signum, frame):
        run.stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        train(run)
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure is recorded with its cause, then re-raised
        traceback.print_exc()
        if getattr(run, "accelerator", None) is None or run.accelerator.is_main_process:
            tmp = run.job_dir / "result.json.tmp"
            tmp.write_text(json.dumps({"state": "failed", "error": f"{type(exc).__name__}: {exc}",
                                       "next_step": _next_step_for(exc)}, indent=2))
            os.replace(tmp, run.job_dir / "result.json")
        return 1


if __name__ == "__main__":
    sys.exit(main())
