"""Serving and sampling through vLLM: managed or external servers, runtime LoRA loading.

`servers` runs the vLLM processes, `sampler` is the `Sampler` backend over their OpenAI API,
`watch` keeps a managed server from outliving the MCP server. This module decides what a job
is served as: its LoRA adapter on the base model, or (DoRA, sparse) its merged model.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from llm_mcp.core.settings import Settings
from llm_mcp.core.store import Job
from llm_mcp.inference.export import export
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
    exported = export(settings, job, job_dir, adapter, label, "merged", None, False)
    notes.append(f"{why}: serving the merged model {exported.destination}")
    if exported.state != "done":
        return None, name + "-merged", notes
    merged = Target(
        base_path=exported.destination, base_id=name + "-merged", trust_remote_code=target.trust_remote_code
    )
    return merged, merged.base_id, notes


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
