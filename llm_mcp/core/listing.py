"""list_models: filter the matrix, estimate memory against a machine, and summarise."""

from __future__ import annotations

from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.experts import expert_targets
from llm_mcp.core.fit import plan_memory
from llm_mcp.core.hardware import Hardware
from llm_mcp.core.jobconfig import JobConfig
from llm_mcp.core.matrix import Matrix, ModelEntry
from llm_mcp.core.methods import METHODS
from llm_mcp.core.methods.defaults import MethodDefaults
from llm_mcp.core.request import field_default
from llm_mcp.core.shapes import lora_param_count


class HardwareInfo(BaseModel):
    description: str
    device: str = Field(description="'cuda' or 'cpu': what the estimates assume.")
    usable_memory_gb: float = Field(
        description="Memory one training process may plan on: 95% of one GPU less what "
        "vLLM servers claim, or 85% of RAM."
    )
    source: str = Field(
        description="'detected' (this machine), 'hypothetical' (gpu_memory_gb argument), or the "
        "cluster partition one node of which the estimates plan for."
    )
    nodes: int = Field(1, description="Nodes like this a job may span (start_finetune nodes=...).")


class MemoryBreakdown(BaseModel):
    weights_gb: float
    trainable_gb: float
    activations_gb: float
    overhead_gb: float
    total_gb: float


class MethodInfo(BaseModel):
    method: str
    status: str = Field(description="supported | experimental | unsupported")
    note: str
    min_gpu_memory_gb: float = Field(description="From the matrix: smallest GPU memory for batch 1 x 2048 tokens.")
    vllm_adapter: bool = Field(description="vLLM can serve the result as a LoRA adapter; else serve a merged model.")
    estimated_memory_gb: float = Field(
        description="Estimate on the hardware above at start_finetune's defaults "
        "(batch 4 x 1024 tokens, or the context length if shorter)."
    )
    fits: bool = Field(
        description="estimated_memory_gb (per process) <= what one process may use and the method is "
        "not unsupported: start_finetune at its defaults accepts it."
    )
    trainable_params: int
    adapts: list[str] = Field(
        default_factory=list,
        description="The layers (and fused MoE expert parameters) the method trains at its defaults.",
    )
    distributed: str = Field(
        "ddp",
        description="How it fits: 'ddp' (a whole replica per process, one GPU each) or "
        "'fsdp' (sharded over `processes` GPUs, when one GPU is too small).",
    )
    processes: int = 1
    gradient_checkpointing: bool = Field(
        False, description="On when the job fits only with it (what start_finetune picks at its defaults)."
    )
    memory: MemoryBreakdown | None = Field(None, description="Parts of the estimate (single-model view only).")


class ModelInfo(BaseModel):
    id: str
    aliases: list[str]
    family: str
    type: str
    architecture: str
    params_b: float
    active_params_b: float
    context_length: int
    recommended_lr: float
    recommended_rank: int
    lora_params_at_default_rank: int = Field(description="rank x sum(in + out) over the default target matrices.")
    methods: list[MethodInfo]
    fits_methods: list[str] = Field(description="Methods that fit the hardware above.")
    note: str = ""
    # Full detail, filled by list_models(model=ID):
    hf_architecture: str | None = None
    target_modules: list[str] | None = None
    chat_template: bool | None = None
    trust_remote_code: bool | None = None
    weights_dtype: str | None = None
    lr_source: str | None = None
    sources: list[str] | None = None
    dims: dict[str, int | bool | None] | None = None
    local_path: str | None = None


class LocalCheckpoint(BaseModel):
    path: str = Field(description="Pass this as model=...: relative to LLM_MCP_HOME when under it.")
    hf_architecture: str | None = None
    model: ModelInfo | None = Field(None, description="What the matrix says for this architecture, as for hub models.")
    problem: str | None = Field(None, description="Why it cannot be trained (then model is empty).")


class ListModelsResult(BaseModel):
    hardware: HardwareInfo
    filters: dict[str, str | bool | float | int]
    count: int
    total_in_matrix: int
    models: list[ModelInfo]
    local: list[LocalCheckpoint] = Field(
        default_factory=list, description="Checkpoint directories in LLM_MCP_HOME/models and the allowed roots."
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Where the tools may read the user's files (LLM_MCP_HOME first, then --allow-root folders and "
        "the folders the user allowed when asked).",
    )


def describe_model(
    entry: ModelEntry, hardware: Hardware, defaults: dict[str, MethodDefaults], *, full: bool = False
) -> ModelInfo:
    """One model's row: per-method status, matrix minimum and the estimate on `hardware`."""
    rank = defaults["lora"].lora.rank
    batch = field_default(JobConfig, "batch_size")
    seq_len = min(field_default(JobConfig, "max_seq_len"), entry.context_length)
    methods = []
    for name, method in METHODS.items():
        support = entry.methods[name]
        plan = plan_memory(
            entry,
            method,
            hardware,
            target_modules=entry.target_modules,
            rank=rank,
            batch_size=batch,
            seq_len=seq_len,
            dropout=defaults[name].lora.dropout,
            rigl_fraction=method.rigl_fraction(None, defaults[name]),
        )
        est = plan.estimate
        methods.append(
            MethodInfo(
                method=name,
                status=support.status,
                note=support.note,
                min_gpu_memory_gb=support.min_gpu_memory_gb,
                vllm_adapter=support.vllm_adapter,
                estimated_memory_gb=est.total_gb,
                fits=support.status != "unsupported" and plan.fits,
                trainable_params=est.trainable_params,
                adapts=list(entry.target_modules) + expert_targets(entry.dims, method.trains_experts),
                distributed=plan.distributed,
                processes=plan.processes,
                gradient_checkpointing=plan.gradient_checkpointing,
                memory=MemoryBreakdown(**{k: v for k, v in est.to_dict().items() if k.endswith("_gb")})
                if full
                else None,
            )
        )
    lora_params = lora_param_count(entry.dims, entry.target_modules + expert_targets(entry.dims), rank)
    info = ModelInfo(
        id=entry.id,
        aliases=entry.aliases,
        family=entry.family,
        type=entry.type,
        architecture=entry.architecture,
        params_b=round(entry.params_b, 4),
        active_params_b=round(entry.active_params_b, 4),
        context_length=entry.context_length,
        recommended_lr=entry.recommended_lr,
        recommended_rank=rank,
        lora_params_at_default_rank=lora_params,
        methods=methods,
        fits_methods=[m.method for m in methods if m.fits],
        note=entry.note,
    )
    if full:
        info.hf_architecture = entry.hf_architecture
        info.target_modules = entry.target_modules
        info.chat_template = entry.chat_template
        info.trust_remote_code = entry.trust_remote_code
        info.weights_dtype = entry.weights_dtype
        info.lr_source = entry.lr_source
        info.sources = entry.sources
        info.dims = entry.dims.model_dump()
    info.local_path = getattr(entry, "path", None)
    return info


def list_models(
    matrix: Matrix,
    hardware: Hardware,
    defaults: dict[str, MethodDefaults],
    *,
    method: str | None = None,
    type: str | None = None,
    family: str | None = None,
    fits: bool = False,
) -> ListModelsResult:
    """Filter the matrix and describe each remaining model against `hardware`.

    A `method` filter keeps models where that method is supported or experimental.

    Raises:
        InvalidArgumentError: an unknown family (type and method are checked by the tool schema).
    """
    families = sorted({e.family for e in matrix.models})
    if family is not None and family.lower() not in families:
        raise InvalidArgumentError(
            f"family={family!r} is not in the matrix; allowed: {families}. Omit family to list every model."
        )
    rows = []
    for entry in matrix.models:
        if type and entry.type != type:
            continue
        if family and entry.family != family.lower():
            continue
        if method and entry.methods[method].status == "unsupported":
            continue
        row = describe_model(entry, hardware, defaults)
        if fits and not (method in row.fits_methods if method else row.fits_methods):
            continue
        rows.append(row)
    filters: dict[str, str | bool | float | int] = {
        k: v for k, v in {"method": method, "type": type, "family": family}.items() if v is not None
    }
    if fits:
        filters["fits"] = True
    return ListModelsResult(
        hardware=hardware_info(hardware),
        filters=filters,
        count=len(rows),
        total_in_matrix=len(matrix.models),
        models=rows,
    )


def hardware_info(hardware: Hardware) -> HardwareInfo:
    return HardwareInfo(
        description=hardware.describe(),
        device=hardware.device,
        usable_memory_gb=hardware.usable_gb(),
        source=hardware.source,
        nodes=hardware.max_nodes,
    )


def format_params(billions: float) -> str:
    return f"{billions:g}B" if billions >= 1 else f"{billions * 1000:.3g}M"


_MARK = {"supported": "ok", "experimental": "exp", "unsupported": "no"}


def _fits(i: MethodInfo) -> str:
    return (" fits" + (f" (FSDP over {i.processes} GPUs)" if i.distributed == "fsdp" else "")) if i.fits else ""


def summarize(result: ListModelsResult, method: str | None = None) -> str:
    """A compact text view an LLM reads easily; structured content carries the full data."""
    hw = result.hardware
    lines = [
        f"{result.count} of {result.total_in_matrix} models"
        + (f" (filters: {', '.join(f'{k}={v}' for k, v in result.filters.items())})" if result.filters else "")
        + f". Hardware: {hw.description}; estimates for {hw.device}, {hw.usable_memory_gb:g} GB usable per process.",
        "Per method: status, minimum GPU GB (matrix), 'fits' if it fits the hardware above.",
    ]
    for m in result.models:
        methods = [i for i in m.methods if method is None or i.method == method]
        cells = " | ".join(f"{i.method} {_MARK[i.status]} {i.min_gpu_memory_gb:g}GB{_fits(i)}" for i in methods)
        size = format_params(m.params_b) + (
            f"/{format_params(m.active_params_b)} active" if m.architecture == "moe" else ""
        )
        lines.append(
            f"- {m.id} ({m.type}, {m.architecture} {size}) lr {m.recommended_lr:.0e} rank {m.recommended_rank}: {cells}"
        )
    if not result.models:
        lines.append(
            "No model matches. Drop a filter (fits, family, type) or ask for hypothetical hardware "
            "with gpu_memory_gb / num_gpus."
        )
    if result.local:
        lines.append(f"Local checkpoints ({len(result.local)}; pass the path as model=...):")
    for c in result.local:
        if c.model is None:
            lines.append(f"- {c.path} ({c.hf_architecture or '?'}): cannot train: {c.problem}")
            continue
        cells = " | ".join(f"{i.method} {_MARK[i.status]}{' fits' if i.fits else ''}" for i in c.model.methods)
        lines.append(f"- {c.path} ({c.hf_architecture}, {format_params(c.model.params_b)}): {cells}")
    return "\n".join(lines)


def summarize_one(info: ModelInfo, hardware: HardwareInfo) -> str:
    lines = [
        f"{info.id} — {info.family} {info.type}, {info.architecture}, {format_params(info.params_b)} params"
        + (f" ({format_params(info.active_params_b)} active)" if info.architecture == "moe" else "")
        + f", context {info.context_length}.",
        f"Recommended LoRA LR {info.recommended_lr:g} ({info.lr_source}); rank {info.recommended_rank}, "
        f"{info.lora_params_at_default_rank:,} LoRA params on {', '.join(info.target_modules or [])}.",
        f"Chat template: {'yes' if info.chat_template else 'no'}; trust_remote_code: "
        f"{'required' if info.trust_remote_code else 'not needed'}; weights {info.weights_dtype}.",
        f"Hardware: {hardware.description} ({hardware.usable_memory_gb:g} GB usable on {hardware.device}).",
    ]
    for m in info.methods:
        lines.append(
            f"- {METHODS[m.method].title}: {m.status} ({m.note}). Min GPU {m.min_gpu_memory_gb:g} GB; "
            f"estimate here {m.estimated_memory_gb:g} GB per process ({_fits(m).strip() or 'does not fit'}); "
            f"vLLM adapter: {'yes' if m.vllm_adapter else 'no (serve merged)'}; adapts {', '.join(m.adapts)}."
        )
    if info.note:
        lines.append(f"Note: {info.note}")
    return "\n".join(lines)
