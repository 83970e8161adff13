"""Where a job may run: nodes and processes against the executor's hardware, and per-request Slurm options."""

from __future__ import annotations

import math
from typing import Any

from llm_mcp.core.hardware import Hardware


def in_range(problems: list[str], name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    if value is None:
        return
    bad_type = (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or (kind is int and not float(value).is_integer())
    )
    if bad_type or not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
        problems.append(f"{name}={value!r} is out of range; allowed: {kind.__name__} from {lo:g} to {hi:g}")


def check_placement(args: dict[str, Any], hardware: Hardware, problems: list[str]) -> None:
    """nodes and num_processes against what the executor offers; with nodes and no num_processes, one per device."""
    nodes = args.get("nodes", 1)
    in_range(problems, "nodes", args.get("nodes"), 1, 4096)
    if isinstance(nodes, int) and nodes > hardware.max_nodes:
        problems.append(
            f"nodes={nodes} is more than jobs here may span ({hardware.max_nodes}: {hardware.describe()}); "
            + (
                "start the server with --executor slurm to run over several machines"
                if hardware.max_nodes == 1 and hardware.source == "detected"
                else f"use nodes<={hardware.max_nodes}"
            )
        )
        return
    per_node = len(hardware.gpus) or hardware.cpu_count
    if "nodes" in args and "num_processes" not in args and isinstance(nodes, int) and nodes > 1:
        args["num_processes"] = nodes * max(1, len(hardware.gpus))
    in_range(problems, "num_processes", args.get("num_processes"), 1, max(1, per_node) * max(1, nodes))
    procs = args.get("num_processes", 1)
    if isinstance(procs, int) and isinstance(nodes, int) and nodes > 1 and procs % nodes:
        problems.append(f"num_processes={procs} does not split evenly over nodes={nodes}; give a multiple of {nodes}")


def check_scheduler(args: dict[str, Any], settings, problems: list[str]) -> None:
    """scheduler: Slurm options, only for the slurm executor, each field checked against Slurm's syntax."""
    if not args.get("scheduler"):
        args.pop("scheduler", None)
        return
    if settings.executor != "slurm":
        problems.append(
            f"scheduler={args['scheduler']!r}: these are Slurm options, but this server runs jobs with "
            f"executor={settings.executor!r}; leave scheduler out"
        )
        return
    from pydantic import ValidationError

    from llm_mcp.core.jobconfig import SchedulerSettings

    try:
        args["scheduler"] = SchedulerSettings.model_validate(args["scheduler"]).model_dump(exclude_none=True)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(
                f"scheduler.{where}={err.get('input')!r}: {err['msg']}; allowed: "
                f"{list(SchedulerSettings.model_fields)}, e.g. {{'partition': 'gpu', 'time_limit': '04:00:00'}}"
            )
