"""The training loop, top to bottom: setup -> steps -> save. Run by `accelerate launch`.

    accelerate launch --config_file configs/accelerate/<kind>.yaml -m llm_mcp.train.run JOB_DIR

Reads JOB_DIR/config.json (a `JobConfig`, written by the server after validation), appends one
JSON line per optimizer step to metrics.jsonl, checkpoints every `checkpoint_every` steps, and
ends by writing result.json. SIGTERM (cancel_job) stops at the next step boundary, with a
checkpoint. The loss comes from the job's objective (`llm_mcp.train.objectives`).

Imports torch, transformers, peft and accelerate; never the MCP SDK or the server.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.jobdir import append_metric, cancel_requested, write_result
from llm_mcp.core.quiet import quiet_bitsandbytes
from llm_mcp.modeling.encode import EncodeStats
from llm_mcp.train.batches import BatchOrder
from llm_mcp.train.checkpoint import load_adapter_weights, load_checkpoint, save_adapter, save_checkpoint
from llm_mcp.train.data import REFERENCE_FILE, load_examples, reference
from llm_mcp.train.ending import peak_memory_mb, record_failure, record_rank, record_rank_end, save_probe
from llm_mcp.train.fsdp import is_fsdp, trainable_state, unsharded_root, wrap_units
from llm_mcp.train.objectives import Objective, objective_for
from llm_mcp.train.rollout import GraderFailed

quiet_bitsandbytes()  # at import, before setup imports peft (which imports bitsandbytes)


STOP = (
    threading.Event()
)  # set by SIGTERM (cancel_job): checkpoint and stop after the current step (so does a cancel file)


class Run:
    """One job's files and output: the log, metrics.jsonl and result.json (main process only)."""

    def __init__(self, job_dir: Path):
        self.job_dir = job_dir
        self.cfg = JobConfig.read(job_dir)
        self.t0 = time.time()
        self.accelerator: Any = None  # accelerate.Accelerator, made by setup
        self.step = 0  # optimizer steps done

    @property
    def stop_requested(self) -> bool:
        return STOP.is_set() or cancel_requested(self.job_dir)

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def metric(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            append_metric(self.job_dir, record)

    def result(self, state: str, **fields: Any) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            write_result(self.job_dir, {"state": state, **fields})


@dataclass
class Setup:
    """Everything the loop needs, built once by `setup`."""

    tok: Any
    objective: Objective
    stats: EncodeStats
    examples: list[dict]
    eval_examples: list[dict]
    order: BatchOrder
    total_steps: int
    model: Any
    loss_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    start_step: int
    sparse: dict
    meta: dict[str, Any]
    reference: torch.Tensor | None = None  # the objective's per-example reference (DPO), saved with checkpoints


def setup(run: Run) -> Setup:
    """Accelerator, data, model with its trainable parameters, optimizer, scheduler, resume."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from llm_mcp.modeling.base import mixed_precision
    from llm_mcp.modeling.sparse import sparse_modules
    from llm_mcp.train.model import load_model, load_tokenizer

    cfg = run.cfg
    cuda = torch.cuda.is_available()  # fp16 GPUs: accelerate scales the loss (GradScaler), skips inf steps
    acc = run.accelerator = Accelerator(
        cpu=not cuda, mixed_precision=mixed_precision("cuda" if cuda else "cpu"), kwargs_handlers=ddp_kwargs()
    )
    record_rank(acc, run.job_dir)
    set_seed(cfg.seed)
    device = "cpu" if acc.device.type == "cpu" else "cuda"
    run.log(f"job {cfg.job_id}: {cfg.method} on {cfg.model.id} | {acc.num_processes} process(es) on {device}")
    objective = objective_for(cfg)
    tok = load_tokenizer(cfg)
    examples, eval_examples, stats, order = load_examples(cfg, tok, objective, acc.num_processes, run.log)
    total_steps = cfg.total_steps(order.steps_per_epoch)

    model = load_model(cfg, device, acc.local_process_index)
    if hasattr(objective, "remember_start"):  # GRPO's KL reference: the weights as the job started
        objective.remember_start([p for p in model.parameters() if p.requires_grad])
    if cfg.resume_checkpoint:  # before prepare: FSDP shards what was loaded
        load_adapter_weights(model, Path(cfg.resume_checkpoint))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loss_model, optimizer = acc.prepare(wrap_units(objective.wrap(model), model), optimizer)
    trainable = [p for p in loss_model.parameters() if p.requires_grad]  # FSDP replaces them with sharded ones
    ref = reference(acc, cfg, run.log, objective, acc.unwrap_model(loss_model), tok, examples, eval_examples)
    start_step = 0
    if cfg.resume_checkpoint:
        start_step = load_checkpoint(acc, optimizer, scheduler, Path(cfg.resume_checkpoint))
        run.log(f"resumed from {cfg.resume_checkpoint} at step {start_step}")
        if start_step >= total_steps:
            raise ValueError(f"the checkpoint is at step {start_step}, not before total_steps={total_steps}")
    meta = {
        "job_id": cfg.job_id,
        "method": cfg.method,
        "model": cfg.model.id,
        "base_model_name_or_path": cfg.model.id,
        "target_modules": cfg.lora.target_modules,
    }
    return Setup(
        tok=tok,
        objective=objective,
        stats=stats,
        examples=examples,
        eval_examples=eval_examples,
        order=order,
        total_steps=total_steps,
        model=model,
        loss_model=loss_model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        start_step=start_step,
        sparse=sparse_modules(acc.unwrap_model(model)),
        meta=meta,
        reference=ref,
    )


def _reduce(acc):
    return lambda t: acc.reduce(t.to(acc.device), "sum").cpu()


def ddp_kwargs() -> list:
    """DDP without its per-forward buffer broadcast: the buffers here never drift apart (rotary tables are
    constants; sparse masks change only in update_sparse_masks, from candidates gathered over all ranks), and
    broadcasting the sparse deltas' int64 index buffers every forward moved ~1.3 GB per step for an 8B model."""
    from accelerate import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(broadcast_buffers=False)]


@torch.no_grad()
def evaluate(run: Run, s: Setup) -> dict[str, float] | None:
    """Mean loss per target over the eval examples (and the objective's metrics), across processes."""
    if not s.eval_examples:
        return None
    acc = run.accelerator
    # The unwrapped module: a DDP forward runs a collective (buffer broadcast), and ranks may have a different
    # number of eval batches; only the final reduce is collective.
    model = acc.unwrap_model(s.loss_model)
    model.eval()
    total = torch.zeros(2, device=acc.device)
    bs, stride = run.cfg.batch_size, run.cfg.batch_size * acc.num_processes
    # Under FSDP a forward is collective: every rank runs the same number, the spare ones weighted 0.
    end = -(-len(s.eval_examples) // stride) * stride if is_fsdp(acc) else len(s.eval_examples)
    for start in range(acc.process_index * bs, end, stride):
        rows = s.eval_examples[start : start + bs]
        batch = {
            k: v.to(acc.device)
            for k, v in s.objective.collate(rows or s.eval_examples[:bs], s.tok.pad_token_id).items()
        }
        total += torch.stack(
            [s.objective.loss_sum(model, batch), torch.tensor(float(s.objective.targets(batch)), device=acc.device)]
        ) * bool(rows)
    total = acc.reduce(total, "sum")
    model.train()
    metrics = {f"eval_{k}": v for k, v in s.objective.pop_metrics(_reduce(acc)).items()}
    return {"eval_loss": (total[0] / total[1].clamp(min=1)).item(), **metrics}


def train_step(run: Run, s: Setup, step: int, update_mask: bool) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; returns the metrics record."""
    acc, cfg, obj = run.accelerator, run.cfg, s.objective
    t_step = time.perf_counter()
    if update_mask:  # RigL: this step's backward keeps each layer's regrowth candidates (llm_mcp.modeling.sparse)
        from llm_mcp.modeling.sparse import collect_candidates, cosine_fraction

        fraction = cfg.sparse.mask_update_fraction if cfg.sparse else 0.0
        collect_candidates(s.sparse, cosine_fraction(fraction, step + 1, s.total_steps))
    groups = [[s.examples[i] for i in idx] for idx in s.order.micro_batches(step, acc.process_index)]
    if hasattr(obj, "rollout"):  # GRPO: sample and score completions with the policy as it is now
        micro = obj.rollout(run, s, groups, step)
    else:
        micro = [obj.collate(g, s.tok.pad_token_id) for g in groups]
    counts = torch.tensor(
        [float(sum(obj.targets(b) for b in micro)), float(sum(b["attention_mask"].sum() for b in micro))],
        device=acc.device,
    )
    global_counts = acc.reduce(counts.clone(), "sum")
    loss_sum = torch.zeros((), device=acc.device)
    for m, batch in enumerate(micro):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with acc.no_sync(s.loss_model) if m < len(micro) - 1 else nullcontext():
            loss = obj.loss_sum(s.loss_model, batch)
            # DDP averages gradients over ranks; scale so the result is the global target mean.
            acc.backward(loss * acc.num_processes / global_counts[0])
        loss_sum += loss.detach()
    extra = obj.pop_metrics(_reduce(acc))
    grad_norm = acc.clip_grad_norm_(s.trainable, cfg.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    changed = 0
    if update_mask:
        from llm_mcp.modeling.sparse import update_sparse_masks

        changed = update_sparse_masks(s.sparse, s.optimizer, acc.gather if acc.num_processes > 1 else None)
    done, elapsed = step + 1, time.perf_counter() - t_step
    record = {
        "step": done,
        "epoch": round(done / s.order.steps_per_epoch, 4),
        "loss": round((acc.reduce(loss_sum, "sum") / global_counts[0]).item(), 6),
        "lr": s.scheduler.get_last_lr()[0],
        "grad_norm": round(float(grad_norm), 6),
        "tokens": int(global_counts[1]),
        "tokens_per_s": round(float(global_counts[1]) / elapsed, 1),
        "step_time_s": round(elapsed, 4),
        "elapsed_s": round(time.time() - run.t0, 2),
        **extra,
    }
    if s.sparse:
        record["density"] = round(
            sum(m.k for m in s.sparse.values()) / sum(m.shape[0] * m.shape[1] for m in s.sparse.values()), 6
        )
        record["mask_changed"] = changed
    return record


def train(run: Run) -> None:
    from llm_mcp.modeling.base import four_bit_layers

    s = setup(run)
    cfg, acc = run.cfg, run.accelerator
    stats = s.stats
    run.metric(
        {
            "event": "start",
            "total_steps": s.total_steps,
            "start_step": s.start_step,
            "steps_per_epoch": s.order.steps_per_epoch,
            "examples": stats.examples,
            "eval_examples": len(s.eval_examples),
            "truncated": stats.truncated,
            "dropped": stats.dropped_empty,
            "trainable_params": sum(p.numel() for p in s.trainable),
            "params": sum(p.numel() for p in s.model.parameters()),
            "started_wall": round(run.t0, 2),
            "target_tokens": stats.target_tokens,
            "processes": acc.num_processes,
            "device": acc.device.type,
            "objective": s.objective.name,
            "threads": torch.get_num_threads(),
            "four_bit_layers": four_bit_layers(s.model),
        }
    )
    run.log(
        f"{stats.examples} examples ({stats.target_tokens} trainable tokens), {s.total_steps} steps, "
        f"{sum(p.numel() for p in s.trainable):,} trainable params"
    )
    s.loss_model.train()
    rigl_every = cfg.sparse.mask_update_interval if s.sparse and cfg.sparse and cfg.sparse.use_rigl else 0
    loss = float("nan")
    for step in range(s.start_step, s.total_steps):
        done = run.step = step + 1
        try:
            record = train_step(run, s, step, bool(rigl_every) and done % rigl_every == 0 and done < s.total_steps)
        except GraderFailed:  # GRPO: keep the steps done, then end with the grader's cause
            _checkpoint(run, s, step)
            if not run.stop_requested:
                raise
            run.log(f"cancel requested: stopped before step {done} with a checkpoint")
            run.result("cancelled", step=step, total_steps=s.total_steps, loss=loss)
            return
        loss = record["loss"]
        if cfg.eval_every and done % cfg.eval_every == 0 and done < s.total_steps:
            record.update(evaluate(run, s) or {"eval_loss": None})
        run.metric(record)
        stop = acc.reduce(torch.tensor(float(run.stop_requested), device=acc.device), "max").item() > 0
        if stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < s.total_steps):
            _checkpoint(run, s, done)
        if stop:
            run.log(f"cancel requested: stopped after step {done} with a checkpoint")
            run.result("cancelled", step=done, total_steps=s.total_steps, loss=loss)
            return
    finish(run, s, loss)


def _checkpoint(run: Run, s: Setup, done: int) -> None:
    ckpt = save_checkpoint(
        run.accelerator,
        s.model,
        s.optimizer,
        s.scheduler,
        run.job_dir,
        done,
        s.meta,
        run.cfg.keep_checkpoints,
        extra={REFERENCE_FILE: s.reference},
    )
    run.metric({"event": "checkpoint", "step": done, "path": str(ckpt)})


def finish(run: Run, s: Setup, loss: float) -> None:
    """Final eval, the adapter (+ tokenizer) and the probe logits exports are checked against."""
    acc = run.accelerator
    evaluation = evaluate(run, s)
    eval_loss = evaluation["eval_loss"] if evaluation else None
    run.metric({"event": "end", "peak_memory_mb": peak_memory_mb(acc.device.type)})
    if evaluation:
        run.metric({"step": s.total_steps, **evaluation})
    acc.wait_for_everyone()
    adapter_dir = run.job_dir / "adapter"
    sharded = is_fsdp(acc)  # gathering the adapter and the probe's forward are collective under FSDP
    state = trainable_state(s.model) if sharded else None
    if acc.is_main_process or sharded:
        first = s.examples[0]
        probe_ids = first["input_ids"] if "input_ids" in first else first["prompt"] + first.get("chosen", [])
        with unsharded_root(s.loss_model if sharded else None):
            save_probe(
                acc.unwrap_model(s.model),
                probe_ids[:16],
                run.job_dir / "probe.safetensors" if acc.is_main_process else None,
            )
    if acc.is_main_process:
        save_adapter(acc.unwrap_model(s.model), adapter_dir, s.meta, state)
        s.tok.save_pretrained(adapter_dir)
    acc.wait_for_everyone()
    run.log(f"done: {s.total_steps} steps, final loss {loss:.4f}; adapter in {adapter_dir}")
    run.result(
        "succeeded",
        step=s.total_steps,
        total_steps=s.total_steps,
        loss=loss,
        eval_loss=eval_loss,
        adapter=str(adapter_dir),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job_dir = Path(args[0]).resolve()
    run = None
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    try:
        run = Run(job_dir)
        train(run)
        record_rank_end(run.accelerator, job_dir, run.step)
        return 0
    except Exception as exc:  # every failure is recorded with its cause
        traceback.print_exc()
        record_rank_end(run and run.accelerator, job_dir, run.step if run else 0, exc)
        if run is None or run.accelerator is None or run.accelerator.is_main_process:
            record_failure(job_dir, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
