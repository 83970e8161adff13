"""Serving and sampling through vLLM: managed or external servers, runtime LoRA loading.

`servers` runs the vLLM processes, `sampler` is the `Sampler` backend over their OpenAI API,
`watch` keeps a managed server from outliving the MCP server. This module decides what a job
is served as: its LoRA adapter on the base model, or (DoRA, sparse) its merged model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from llm_mcp.core.settings import Settings
from llm_mcp.core.store import Job, JobStore
from llm_mcp.inference.exports import MERGED_FORMAT, export
from llm_mcp.inference.serving.sampler import needs_merge
from llm_mcp.inference.targets import Target


class ServeResult(BaseModel):
    state: str = Field(description="'ready'; 'starting' (vLLM is loading) or 'merging': call again shortly.")
    job_id: str
    checkpoint: str
    served_as: str = Field(description="'adapter' (LoRA on the base model) or 'merged' (a merged full model).")
    model: str = Field(description="The model name to send in OpenAI-compatible requests.")
    url: str | None = Field(None, description="Base URL of the OpenAI-compatible API (…/v1).")
    api_key: str | None = Field(None, description="Bearer key of a managed server (it listens on loopback only).")
    verification: dict = Field(default_factory=dict, description="Probe log-probability checks of the served adapter.")
    example_curl: str | None = None
    example_python: str | None = None
    notes: list[str] = []
    servers: list[dict] = Field(default_factory=list, description="The vLLM servers this MCP server runs or uses.")


def job_serving_target(
    settings: Settings, job: Job, job_dir: Path, adapter: Path, label: str, target: Target
) -> tuple[Target | None, str, list[str]]:
    """(what vLLM serves, model name, notes). Target None: the merge is still running (call again).

    LoRA / QLoRA adapters are served on the base model under the job's name; DoRA and sparse
    results are merged first (export_adapter(format='merged'), reused when it exists).
    """
    name = job.id if label == "final" else f"{job.id}-{label.replace(' ', '-')}"
    why = needs_merge(target)
    notes = []
    if target.quantized and not why:
        notes.append(
            "QLoRA: vLLM applies the adapter to the full-precision base, not the 4-bit base it was "
            "trained on; outputs differ slightly from in-process sampling."
        )
    if not why:
        return target, name, notes
    exported = export(settings, job, job_dir, adapter, label, MERGED_FORMAT.name, None, False)
    notes.append(f"{why}: serving the merged model {exported.destination}")
    if exported.state != "done":
        return None, name + "-merged", notes
    merged = Target(
        base_path=exported.destination, base_id=name + "-merged", trust_remote_code=target.trust_remote_code
    )
    return merged, merged.base_id, notes


def job_serving(settings: Settings, store: JobStore, job_id: str, label: str, target: Target):
    """What vLLM serves for a job's adapter: (target or None while merging, model name, notes)."""
    job = store.get(job_id)
    return job_serving_target(settings, job, store.job_dir(job.id), Path(target.adapter_path or ""), label, target)


@dataclass
class SamplePlan:
    """How a sample call generates: with `target` on vLLM under `label` (None: the base model's own name), or,
    while a merged model is still being written, not yet (target None)."""

    target: Target | None
    label: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_vllm_sample(
    settings: Settings, store: JobStore, target: Target, job_id: str | None, checkpoint: str | None
) -> SamplePlan:
    """What vLLM samples for `target`: a job's adapter is served as itself or merged (job_serving_target);
    an adapter directory or a base model as given."""
    if job_id is None:
        return SamplePlan(target, None)
    served, label, notes = job_serving(settings, store, job_id, checkpoint or "final", target)
    if served is None:
        return SamplePlan(None, None, [*notes, "the merged model is still being written; call sample again in ~20 s"])
    return SamplePlan(served, label if served.adapter_path else None, notes)


def examples(url: str, model: str, api_key: str | None) -> tuple[str, str]:
    """curl and openai-client examples for the OpenAI-compatible API at `url` (ending in /v1)."""
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    curl = (
        f"curl {url}/completions -H 'Content-Type: application/json'{auth} "
        f'-d \'{{"model": "{model}", "prompt": "Hello", "max_tokens": 32, "temperature": 0}}\''
    )
    python = (
        "from openai import OpenAI\n"
        f"client = OpenAI(base_url={url!r}, api_key={api_key or 'EMPTY'!r})\n"
        f"print(client.completions.create(model={model!r}, prompt='Hello', max_tokens=32).choices[0].text)"
    )
    return curl, python
