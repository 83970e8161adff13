"""The job config: the one contract between the server and everything that reads a job.

Validation (`llm_mcp.validation.finetune`) produces a `JobConfig`; the server writes it as
`jobs/<id>/config.json` and stores it with the job record; the trainer, export, sampling and
the executors read it back as attributes. Unknown keys are rejected, so a typo or a key that
no reader uses fails loudly. `version` says which layout a file has: files written before the
version field existed (version 0) load through `_upgrade`.

Imports neither torch nor the MCP SDK: the training process and the server both use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llm_mcp.core import atomic
from llm_mcp.core.errors import ConfigurationError
from llm_mcp.core.graders import GraderSpec
from llm_mcp.core.hub_datasets import HubRef
from llm_mcp.core.names import MethodName, ObjectiveName

CONFIG_VERSION = 1
CONFIG_FILE = "config.json"
# Keys a version-0 config.json could carry that no reader ever used.
_DEAD_V0_KEYS = ("accelerate_config", "distributed")

# The bounds of every value a job trains with, declared once: the job config and start_finetune's request
# (llm_mcp.validation.requests) both use these types.
MaxSteps = Annotated[int, Field(ge=1, le=1_000_000)]
Epochs = Annotated[float, Field(ge=0.01, le=100)]
LearningRate = Annotated[float, Field(ge=1e-8, le=1.0)]
Rank = Annotated[int, Field(ge=1, le=1024)]
Alpha = Annotated[float, Field(ge=0.01, le=16384)]
Dropout = Annotated[float, Field(ge=0.0, le=0.9)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
Accumulation = Annotated[int, Field(ge=1, le=4096)]
SeqLen = Annotated[int, Field(ge=8, le=1_048_576)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Every = Annotated[int, Field(ge=0, le=1_000_000)]
KeepCheckpoints = Annotated[int, Field(ge=1, le=100)]
EvalFraction = Annotated[float, Field(ge=0.0, le=0.5)]
WarmupRatio = Annotated[float, Field(ge=0.0, le=0.5)]
WeightDecay = Annotated[float, Field(ge=0.0, le=1.0)]
Beta = Annotated[float, Field(ge=0.001, le=10.0)]
LabelSmoothing = Annotated[float, Field(ge=0.0, le=0.49)]
Generations = Annotated[int, Field(ge=2, le=64)]  # GRPO: completions sampled per prompt
NewTokens = Annotated[int, Field(ge=1, le=8192)]  # GRPO: a completion's length limit
Temperature = Annotated[float, Field(ge=0.05, le=2.0)]
ClipEpsilon = Annotated[float, Field(ge=0.0, le=1.0)]
KlCoef = Annotated[float, Field(ge=0.0, le=10.0)]
GraderList = Annotated[list[GraderSpec], Field(min_length=1, max_length=16)]
Density = Annotated[float, Field(ge=1e-6, le=1.0)]
SparsityRatio = Annotated[float, Field(ge=0.0, le=0.999999)]
MaskInterval = Annotated[int, Field(ge=1, le=1_000_000)]
MaskFraction = Annotated[float, Field(ge=0.0, le=1.0)]
Nodes = Annotated[int, Field(ge=1, le=4096)]
Processes = Annotated[int, Field(ge=1, le=1_048_576)]
EvalRows = Annotated[int, Field(ge=1, le=5000)]  # an evaluation's rows
EvalTokens = Annotated[int, Field(ge=1, le=512)]  # an evaluation's generation length per row
Pattern = Annotated[str, Field(max_length=1000)]  # a regular expression generations are scored against
TrainOn = Literal["completion", "all"]
ColumnName = Literal[
    "messages", "prompt", "completion", "text", "instruction", "input", "output", "system", "history",
    "conversations", "tools", "chosen", "rejected", "answer", "regex",
]  # fmt: skip
Columns = Annotated[dict[ColumnName, Annotated[str, Field(min_length=1, max_length=200)]], Field(max_length=16)]
LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    """The base model: its matrix id (or local directory name) and where to load it from."""

    id: str
    path: str = Field(description="Hub id or absolute local directory passed to from_pretrained.")
    trust_remote_code: bool = False
    hf_architecture: str | None = None
    local: bool = False


class LoraSettings(_Strict):
    """Adapter shape. Sparse jobs use `target_modules` (and `rank` for density 'auto') too."""

    rank: Rank
    alpha: Alpha
    dropout: Dropout
    target_modules: list[str]
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Fused MoE expert parameters adapted too (PEFT target_parameters; llm_mcp.core.experts).",
    )
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class QuantizationSettings(_Strict):
    """The 4-bit NF4 base of QLoRA (and of sparse jobs with quantize_base); configs/qlora.yaml sets it."""

    load_in_4bit: Literal[True] = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    cpu_compute_dtype: Literal["bfloat16", "float32"] = "float32"


class SparseSettings(_Strict):
    """Sparse deltas with RigL-style mask updates (llm_mcp.modeling.sparse)."""

    density: Density | Literal["auto"]
    sparsity_type: Literal["unstructured"] = "unstructured"
    mask_update_interval: MaskInterval
    mask_update_fraction: MaskFraction
    use_rigl: bool = True
    quantize_base: bool = False


class DPOSettings(_Strict):
    """Direct Preference Optimization (llm_mcp.train.dpo)."""

    beta: Beta = Field(0.1, description="How far the policy may move from the reference.")
    label_smoothing: LabelSmoothing = Field(
        0.0, description="Assumed fraction of flipped preference labels (conservative DPO)."
    )


class GRPOSettings(_Strict):
    """Group Relative Policy Optimization (llm_mcp.train.grpo); defaults as TRL 1.16's GRPOConfig."""

    num_generations: Generations = 8
    max_new_tokens: NewTokens = 256
    temperature: Temperature = 1.0
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    epsilon: ClipEpsilon = 0.2
    kl_coef: KlCoef = Field(0.0, description="TRL's beta: the KL penalty to the starting model (0: none).")
    scale_rewards: Literal["group", "none"] = "group"
    graders: GraderList


SLURM_NAME = r"^[A-Za-z0-9_.+-]{1,64}$"


class SchedulerSettings(_Strict):
    """Where a cluster executor queues the job (Slurm's sbatch options); unset fields use the server's settings."""

    partition: str | None = Field(None, pattern=SLURM_NAME)
    account: str | None = Field(None, pattern=SLURM_NAME)
    qos: str | None = Field(None, pattern=SLURM_NAME)
    time_limit: str | None = Field(
        None,
        pattern=r"^(\d{1,3}-)?\d{1,3}(:\d{2}){0,2}$",
        description="Slurm's format: minutes, HH:MM:SS or D-HH:MM:SS.",
    )
    constraint: str | None = Field(None, pattern=r"^[A-Za-z0-9_.&|,\[\]*!()-]{1,128}$")


class JobConfig(_Strict):
    """Everything a job trains with, resolved: no defaults are left for a reader to guess."""

    version: int = CONFIG_VERSION
    job_id: str | None = Field(None, description="None in a dry run.")
    model: ModelRef
    method: MethodName = Field(description="llm_mcp.core.methods.METHODS: what trains and how it is stored.")
    objective: ObjectiveName = Field("causal_lm", description="llm_mcp.core.objectives.OBJECTIVES: what the loss is.")
    dpo: DPOSettings | None = None
    grpo: GRPOSettings | None = None
    init_from: str | None = Field(None, description="The job whose adapter this job starts from (e.g. SFT -> DPO).")
    init_adapter: str | None = Field(None, description="That adapter's directory.")
    dataset: str
    dataset_hub: HubRef | None = Field(None, description="A Hub dataset: its id, commit, subset and split.")
    eval_dataset: str | None = None
    dataset_fingerprint: dict[str, int] | None = Field(
        None, description="The validated file's identity; the trainer refuses a dataset that changed since."
    )
    eval_dataset_fingerprint: dict[str, int] | None = None
    eval_fraction: EvalFraction = 0.0
    max_steps: MaxSteps | None = None
    epochs: Epochs | None = None
    learning_rate: LearningRate
    # The defaults below are what a request's unset arguments mean (llm_mcp.validation.requests).
    batch_size: BatchSize = 4
    gradient_accumulation: Accumulation = 1
    max_seq_len: SeqLen = 1024
    train_on: TrainOn = "completion"
    train_reasoning: bool = Field(True, description="The loss covers the assistant's reasoning too.")
    columns: Columns | None = Field(None, description="The dataset's own keys, by the names training knows.")
    seed: Seed = 0
    checkpoint_every: Every = 50
    keep_checkpoints: KeepCheckpoints = 3
    eval_every: Every = 0
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: WarmupRatio = 0.03
    weight_decay: WeightDecay = 0.0
    max_grad_norm: float = Field(1.0, gt=0)
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    num_processes: Processes = Field(1, description="Training processes in all (over every node).")
    nodes: Nodes = Field(1, description="Machines the processes are spread over (cluster executors).")
    scheduler: SchedulerSettings | None = None
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds a whole replica (also one process); fsdp: weights and optimizer "
        "state sharded over the processes (chosen by validation when one GPU is too small).",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    lora: LoraSettings
    quantization: QuantizationSettings | None = None
    sparse: SparseSettings | None = None
    request: dict[str, Any] = Field(
        default_factory=dict, description="The start_finetune arguments as given (a resume compares them)."
    )
    resume_from: str | None = None
    resume_checkpoint: str | None = None
    resume_step: int | None = None
    task: Literal["train"] = "train"
    entry: Literal["llm_mcp.train.run"] = Field("llm_mcp.train.run", description="The module the job runs.")

    @property
    def quantized(self) -> bool:
        """True when the base is loaded in 4-bit (QLoRA, or sparse over a 4-bit base)."""
        return self.quantization is not None

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps: max_steps, or epochs x steps_per_epoch (at least one)."""
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil((self.epochs or 1.0) * steps_per_epoch))

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def write(self, job_dir: Path) -> Path:
        return write_config(self, job_dir)

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = "job config") -> JobConfig:
        """Validate a config dict of any known version.

        Raises:
            ConfigurationError: unknown keys, missing keys or bad values, each listed.
        """
        if not isinstance(data, dict):
            raise ConfigurationError(f"{where} holds a {type(data).__name__}, not a job config object")
        data = _upgrade(dict(data))
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']} (got {e.get('input')!r:.80})"
                for e in exc.errors()
            ]
            raise ConfigurationError(
                f"{where} is not a valid job config (version {data.get('version')}):", problems
            ) from None

    @classmethod
    def read(cls, job_dir: Path) -> JobConfig:
        """Load `job_dir/config.json`."""
        path = job_dir / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from exc
        return cls.parse(data, str(path))


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older config.json to the current version (version 0 = written before versions existed)."""
    version = data.get("version", 0)
    if version > CONFIG_VERSION:
        raise ConfigurationError(
            f"job config version {version} is newer than this server understands ({CONFIG_VERSION}); upgrade llm-mcp"
        )
    if version == 0:
        for key in _DEAD_V0_KEYS:
            data.pop(key, None)
        data["version"] = 1
    return data


def write_config(config: JobConfig | EvalConfig, job_dir: Path) -> Path:
    """Write `job_dir/config.json` atomically (a crash never leaves half a config)."""
    path = job_dir / CONFIG_FILE
    atomic.replace(path, config.to_json().encode("utf-8"))
    return path


class EvalTarget(_Strict):
    """One model an evaluation scores: the base, or a job's adapter (final or a checkpoint)."""

    label: str = Field(description="'base', 'JOB_ID' or 'JOB_ID@STEP' as the caller named it.")
    job_id: str | None = None
    checkpoint: str | None = Field(None, description="'final' or 'step N'.")
    adapter_path: str | None = None
    quantized: bool = False
    layout: str = Field("peft", description="How the adapter is stored (llm_mcp.core.layouts).")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Evaluations written before layouts had a `sparse` flag instead."""
        if isinstance(data, dict):
            data = dict(data)
            legacy = data.pop("sparse", None)
            if legacy is not None:
                data.setdefault("layout", "sparse" if legacy else "peft")
        return data


class EvalConfig(_Strict):
    """An evaluation job (`evaluate` tool): score targets on a dataset; run by llm_mcp.inference.evaluate."""

    version: int = CONFIG_VERSION
    task: Literal["evaluate"] = "evaluate"
    job_id: str | None = None
    model: ModelRef
    targets: list[EvalTarget] = Field(min_length=1, max_length=8)
    dataset: str
    dataset_hub: HubRef | None = None
    dataset_fingerprint: dict[str, int] | None = None
    columns: Columns | None = None
    max_rows: EvalRows
    max_tokens: EvalTokens
    generate: bool = True
    regex: Pattern | None = None
    graders: list[GraderSpec] | None = Field(
        None, description="Score each generation with these (llm_mcp.core.graders)."
    )
    max_seq_len: SeqLen
    batch_size: int = Field(8, ge=1, le=256)
    num_processes: int = 1
    nodes: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    method: Literal["evaluate"] = "evaluate"
    entry: Literal["llm_mcp.inference.evaluate"] = "llm_mcp.inference.evaluate"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def write(self, job_dir: Path) -> Path:
        return write_config(self, job_dir)

    @classmethod
    def read(cls, job_dir: Path) -> EvalConfig:
        config = parse_config(json.loads((job_dir / CONFIG_FILE).read_text(encoding="utf-8")), str(job_dir))
        if not isinstance(config, cls):
            raise ConfigurationError(f"{job_dir} holds a training job, not an evaluation")
        return config


def parse_config(data: dict[str, Any], where: str = "job config") -> JobConfig | EvalConfig:
    """A job's config of either task: training (JobConfig) or evaluation (EvalConfig).

    Raises:
        ConfigurationError: not a config of either kind (every problem listed).
    """
    if not isinstance(data, dict):
        raise ConfigurationError(f"{where} holds a {type(data).__name__}, not a job config object")
    if data.get("task") != "evaluate":
        return JobConfig.parse(data, where)
    try:
        return EvalConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(f"{where} is not a valid evaluation config: {exc}") from None
