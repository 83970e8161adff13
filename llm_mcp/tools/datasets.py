"""datasets (list and inspect training data) and save_dataset (write rows an agent composed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult
from pydantic import BaseModel, Field

from llm_mcp.core.data import validate_dataset
from llm_mcp.core.errors import DataError
from llm_mcp.core.hub_datasets import HubRows, Revision, Split, Subset
from llm_mcp.core.jobconfig import Columns, JobConfig, SeqLen
from llm_mcp.core.local_models import resolve_model
from llm_mcp.core.readers import FILE_KINDS, Source
from llm_mcp.core.request import Request, choice, field_default
from llm_mcp.tools.common import READ_ONLY, add_tool, result, state_of
from llm_mcp.validation.sources import dataset_source

MAX_LISTED = 200
MAX_INSPECT_ROWS = 20_000


class DatasetFile(BaseModel):
    path: str = Field(description="Pass this as start_finetune(dataset=...): relative to LLM_MCP_HOME when under it.")
    absolute_path: str
    kind: str
    size_bytes: int
    modified: float


class TokenStats(BaseModel):
    model: str
    max_seq_len: int
    train_on: str
    rows_examined: int
    complete: bool
    tokens: int
    trained_tokens: int
    longest: int
    truncated: int
    dropped: int
    histogram: dict[str, int] = Field(description="Rows per token-length bucket.")


class DatasetsResult(BaseModel):
    home: str
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Where datasets may be read: LLM_MCP_HOME, --allow-root folders and folders the user allowed.",
    )
    datasets: list[DatasetFile] = []
    path: str | None = None
    usable: bool | None = Field(None, description="False: start_finetune would refuse it (see problems).")
    rows: int | None = None
    complete: bool | None = Field(None, description="False: only the rows read within the time budget are counted.")
    formats: dict[str, int] = {}
    problems: list[str] = Field(default_factory=list, description="Bad rows with their line numbers.")
    warnings: list[str] = Field(default_factory=list, description="Rows that train, but maybe not as meant.")
    tokens: TokenStats | None = None
    preview: str | None = Field(None, description="One row as the model sees it; trained tokens inside [[ ]].")
    next_step: str


def _listing(state) -> list[DatasetFile]:
    found: list[DatasetFile] = []
    roots = [state.settings.home / "data"] + [r for r in state.settings.roots[1:]]
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, files in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))[:50]
            if Path(dirpath).relative_to(root).parts.__len__() >= 3:
                dirnames[:] = []
            for name in sorted(files):
                p = Path(dirpath) / name
                if p.suffix.lower() in FILE_KINDS and not p.is_symlink() and p.is_file():
                    st = p.stat()
                    found.append(
                        DatasetFile(
                            path=state.settings.display(p.resolve()),
                            absolute_path=str(p.resolve()),
                            kind=FILE_KINDS[p.suffix.lower()],
                            size_bytes=st.st_size,
                            modified=st.st_mtime,
                        )
                    )
                if len(found) >= MAX_LISTED:
                    return found
    return found


def _inspect(state, path: Source, answer: DatasetsResult, request: DatasetsRequest) -> None:
    model, columns, train_on = request.model, request.columns, request.train_on
    try:
        summary = validate_dataset(path, columns=columns)
        answer.usable, answer.rows, answer.complete = True, summary.rows, summary.complete
        answer.formats, answer.warnings = summary.formats, summary.warnings
    except DataError as exc:
        answer.usable, answer.problems = False, exc.problems
        return
    if model is None:
        answer.next_step = (
            f"inspect token lengths with datasets(path={answer.path!r}, model=MODEL), or "
            f"start_finetune(model=MODEL, method='lora', dataset={answer.path!r}, dry_run=true)"
        )
        return
    entry = resolve_model(state.matrix, state.settings, model)
    seq = request.max_seq_len or min(field_default(JobConfig, "max_seq_len"), entry.context_length)
    from llm_mcp.modeling.preview import first_rows, render_example, token_report, tokenizer_if_local

    tok = tokenizer_if_local(getattr(entry, "path", entry.id), entry.trust_remote_code)
    if tok is None:
        answer.warnings.append(f"the tokenizer of {entry.id} is not available locally: no token counts")
        return
    rows = first_rows(path, MAX_INSPECT_ROWS, columns)
    report = token_report(tok, rows, seq, train_on, train_reasoning=request.train_reasoning)
    answer.tokens = TokenStats(
        model=entry.id,
        max_seq_len=seq,
        train_on=train_on,
        **{
            k: getattr(report, k)
            for k in (
                "rows_examined",
                "complete",
                "tokens",
                "trained_tokens",
                "longest",
                "truncated",
                "dropped",
                "histogram",
            )
        },
    )
    answer.warnings += report.warnings()
    if report.unrenderable:
        answer.usable = False
        answer.problems = [
            f"{report.unrenderable} row(s) cannot be rendered by {entry.id}'s chat template (start_finetune would "
            "refuse them): pick a model whose template renders them, or drop those rows"
        ] + report.unrenderable_at
    if 1 <= request.preview_row <= len(rows):
        answer.preview = render_example(tok, rows[request.preview_row - 1], seq, train_on, request.train_reasoning)
    answer.next_step = (
        f"start_finetune(model={model!r}, method='lora', dataset={answer.path!r}, max_seq_len={seq}, dry_run=true)"
    )


class DatasetsRequest(Request):
    path_fields: ClassVar[tuple[str, ...]] = ("path", "model")

    path: str | None = Field(
        None,
        description="Inspect this dataset (relative to LLM_MCP_HOME, absolute, or a Hub dataset 'hf:ORG/NAME' in the "
        "local Hugging Face cache); omit to list the datasets here.",
        max_length=4096,
    )
    model: str | None = Field(
        None,
        description="With path: count tokens with this model's tokenizer and chat template (a matrix id or local "
        "checkpoint).",
        max_length=4096,
    )
    max_seq_len: SeqLen | None = Field(
        None,
        description="With model: the length to check truncation against (default 1024, capped at the model's context).",
    )
    train_on: choice("completion", "all") = Field(  # type: ignore[valid-type]
        "completion", description="Which tokens the loss covers."
    )
    preview_row: int = Field(1, description="Which row (1-based) to show rendered; 0 = none.", ge=0, le=1_000_000)
    subset: Subset = None
    split: Split = None
    revision: Revision = None
    columns: Columns | None = Field(
        None,
        description="The file's own keys by the names training knows, e.g. {'prompt': 'ticket', 'completion': "
        "'expected'}: check it as start_finetune(columns=...) would read it.",
    )
    train_reasoning: bool = Field(True, description="Rows with the assistant's reasoning: the loss covers it too.")


async def datasets(ctx: Context, request: DatasetsRequest) -> Annotated[CallToolResult, DatasetsResult]:
    """List the datasets in LLM_MCP_HOME/data and the allowed roots, or inspect one: rows per
    format, bad rows with line numbers, suspicious rows (empty or unanswered turns, very long
    rows), and with a model: a token-length histogram, how many rows max_seq_len would truncate
    or drop, and one example rendered with the model's chat template, trained tokens in [[ ]].
    """
    state = state_of(ctx)
    home = state.settings.home
    path = request.path
    answer = DatasetsResult(home=str(home), allowed_roots=[str(r) for r in state.settings.roots], next_step="")
    if path is None:
        answer.datasets = await anyio.to_thread.run_sync(_listing, state)
        answer.next_step = (
            "inspect one with datasets(path=...), or write one with save_dataset(name=..., rows=[...])"
            if answer.datasets
            else f"no datasets yet: save_dataset(name=..., rows=[...]) writes one into {home / 'data'}"
        )
        text = (
            f"{len(answer.datasets)} dataset(s) under {home / 'data'} and the allowed roots "
            f"({', '.join(answer.allowed_roots)}):\n"
            + "\n".join(f"- {d.path} ({d.kind}, {d.size_bytes:,} bytes)" for d in answer.datasets)
            + f"\nnext: {answer.next_step}"
        )
        return result(text, answer)
    hub = (request.subset, request.split, request.revision)
    resolved = await anyio.to_thread.run_sync(dataset_source, state.settings, path, "path", *hub)
    answer.path = str(resolved) if isinstance(resolved, HubRows) else state.settings.display(resolved)
    await anyio.to_thread.run_sync(_inspect, state, resolved, answer, request)
    if not answer.usable:
        answer.next_step = "fix the rows listed in problems (or rewrite the file with save_dataset), then inspect again"
    return result(_summarize(answer), answer)


def _summarize(a: DatasetsResult) -> str:
    if not a.usable:
        return f"{a.path}: NOT usable:\n" + "\n".join(f"  - {p}" for p in a.problems) + f"\nnext: {a.next_step}"
    lines = [f"{a.path}: {a.rows} rows{'' if a.complete else ' (counted within the time budget)'}, formats {a.formats}"]
    if a.tokens:
        t = a.tokens
        lines.append(
            f"tokens ({t.model}, max_seq_len {t.max_seq_len}): {t.tokens:,} total, {t.trained_tokens:,} trained, "
            f"longest {t.longest}; truncated {t.truncated}, dropped {t.dropped}; lengths {t.histogram}"
        )
    lines += [f"warning: {w}" for w in a.warnings]
    if a.preview is not None:
        lines.append(f"row preview (trained tokens in [[ ]]):\n{a.preview}")
    lines.append(f"next: {a.next_step}")
    return "\n".join(lines)


def register(mcp: MCPServer) -> None:
    add_tool(mcp, datasets, DatasetsRequest, "Datasets", READ_ONLY)
