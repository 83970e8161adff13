"""A job's examples: its rows loaded (the files validation checked), split for eval, encoded, batched;
and the objective's reference for each example (DPO's log-probs), computed once or read from a checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from llm_mcp.core.data import check_fingerprint, load_rows, source_of
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.modeling.encode import EncodeStats
from llm_mcp.train.batches import BatchOrder
from llm_mcp.train.objectives import Objective

REFERENCE_FILE = "reference.pt"  # in a checkpoint: the objective's reference for every example (DPO)


def split_rows(rows: list, cfg: JobConfig) -> tuple[list, list]:
    """(training rows, eval rows): the eval dataset's, or a seeded eval_fraction of the rows."""
    if cfg.eval_dataset:
        check_fingerprint(Path(cfg.eval_dataset), cfg.eval_dataset_fingerprint, "eval_dataset")
        return rows, load_rows(Path(cfg.eval_dataset), cfg.columns)
    if cfg.eval_fraction <= 0 or len(rows) < 2:
        return rows, []
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(rows), generator=g).tolist()
    n_eval = max(1, int(len(rows) * cfg.eval_fraction))
    return [rows[i] for i in perm[n_eval:]], [rows[i] for i in perm[:n_eval]]


def load_examples(
    cfg: JobConfig, tok, objective: Objective, world: int, log: Callable[[str], None]
) -> tuple[list, list, EncodeStats, BatchOrder]:
    """Encode the training and eval rows; log what truncation dropped; order the batches."""
    check_fingerprint(Path(cfg.dataset), cfg.dataset_fingerprint)
    train_rows, eval_rows = split_rows(load_rows(source_of(cfg.dataset, cfg.dataset_hub), cfg.columns), cfg)
    examples, stats = objective.encode(tok, train_rows, cfg)
    eval_examples, _ = objective.encode(tok, eval_rows, cfg)
    if stats.truncated:
        log(f"truncated {stats.truncated} of {len(train_rows)} training sequences to max_seq_len={cfg.max_seq_len}")
    if stats.dropped_empty:
        log(f"dropped {stats.dropped_empty} sequences with no trainable token left after truncation")
    order = BatchOrder([objective.length(e) for e in examples], cfg, world)
    if len(examples) < order.per_step:
        raise ValueError(
            f"only {len(examples)} usable training examples, but one step needs batch_size x gradient_accumulation "
            f"x processes = {order.per_step}; add data or lower batch_size / gradient_accumulation / num_processes"
        )
    return examples, eval_examples, stats, order


REFERENCE_FILE = "reference.pt"  # in a checkpoint: the objective's reference for every example (DPO)


def reference(
    acc,
    cfg: JobConfig,
    log: Callable[[str], None],
    objective: Objective,
    wrapped,
    tok,
    examples: list[dict],
    eval_examples: list[dict],
) -> torch.Tensor | None:
    """The objective's reference for every example (train, then eval), set on each as "ref": read from the
    checkpoint a resume continues, or computed from the starting model (the adapter as loaded, before any
    step), each process a share, summed over processes. None for objectives without a reference."""
    if not getattr(objective, "needs_reference", False):
        return None
    from llm_mcp.train.fsdp import is_fsdp

    t0 = time.perf_counter()
    everything = examples + eval_examples
    if cfg.resume_checkpoint:
        path = Path(cfg.resume_checkpoint) / REFERENCE_FILE
        if not path.exists():
            raise ValueError(f"checkpoint {cfg.resume_checkpoint} holds no reference log-probs; start a new job")
        table = torch.load(path, weights_only=True, map_location="cpu")
        if table.shape[0] != len(everything):
            raise ValueError(
                f"the checkpoint's reference covers {table.shape[0]} examples but this job has "
                f"{len(everything)}: its data or max_seq_len differ; start a new job"
            )
    else:
        rank, world = (0, 1) if is_fsdp(acc) else (acc.process_index, acc.num_processes)  # FSDP: forwards collective
        objective.reference(wrapped, everything[rank::world], tok.pad_token_id, cfg.batch_size, acc.device)
        table = torch.zeros(len(everything), 2, dtype=torch.float64)
        for i in range(rank, len(everything), world):
            table[i] = torch.tensor(everything[i]["ref"], dtype=torch.float64)
        if world > 1:
            table = acc.reduce(table.to(acc.device), "sum").cpu()
        log(f"reference log-probs of {len(everything)} pairs in {time.perf_counter() - t0:.1f} s")
    for example, ref in zip(everything, table.tolist()):
        example["ref"] = tuple(ref)
    return table
