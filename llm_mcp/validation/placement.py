"""Where a job may run: nodes and processes against the executor's hardware, and per-request Slurm options."""

from __future__ import annotations

from typing import Any

from llm_mcp.core.hardware import Hardware
from llm_mcp.validation.requests import FinetuneRequest


def placement(request: FinetuneRequest, hardware: Hardware, problems: list[str]) -> tuple[int, int | None]:
    """(nodes, num_processes) checked against what the executor offers; with nodes > 1 and no num_processes,
    one process per device of each node. num_processes None: validation's memory plan decides."""
    nodes = request.nodes or 1
    if nodes > hardware.max_nodes:
        problems.append(
            f"nodes={nodes} is more than jobs here may span ({hardware.max_nodes}: {hardware.describe()}); "
            + (
                "start the server with --executor slurm or --executor ray to run over several machines"
                if hardware.max_nodes == 1 and hardware.source == "detected"
                else f"use nodes<={hardware.max_nodes}"
            )
        )
        return nodes, request.num_processes
    per_node = max(1, len(hardware.gpus) or hardware.cpu_count)
    procs = request.num_processes
    if procs is None and nodes > 1:
        procs = nodes * max(1, len(hardware.gpus))
    if procs is not None and procs > per_node * nodes:
        problems.append(f"num_processes={procs} is out of range; allowed: an integer from 1 to {per_node * nodes}")
    if procs is not None and nodes > 1 and procs % nodes:
        problems.append(f"num_processes={procs} does not split evenly over nodes={nodes}; give a multiple of {nodes}")
    return nodes, procs


def scheduler(request: FinetuneRequest, executor: str, problems: list[str]) -> dict[str, Any] | None:
    """scheduler: Slurm options, only for the slurm executor (the request model checks each against Slurm's syntax)."""
    given = request.scheduler.model_dump(exclude_none=True) if request.scheduler else {}
    if not given:
        return None
    if executor != "slurm":
        problems.append(
            f"scheduler={given!r}: these are Slurm options, but this server runs jobs with "
            f"executor={executor!r}; leave scheduler out"
        )
        return None
    return given
