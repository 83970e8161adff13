"""start_finetune's request: every argument typed, bounded and described once.

The bounds are the job config's own types (llm_mcp.core.jobconfig); an unset argument means the job
config's default, or what validation (llm_mcp.validation.finetune) derives from the model and method.
The start_finetune tool's schema is this model's.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from llm_mcp.core.hub_datasets import Revision, Split, Subset
from llm_mcp.core.jobconfig import (
    Accumulation,
    Alpha,
    BatchSize,
    Beta,
    ClipEpsilon,
    Columns,
    Density,
    Dropout,
    Epochs,
    EvalFraction,
    EvalRows,
    EvalTokens,
    Every,
    Generations,
    GraderList,
    JobConfig,
    KeepCheckpoints,
    KlCoef,
    LabelSmoothing,
    LearningRate,
    MaskFraction,
    MaskInterval,
    MaxSteps,
    NewTokens,
    Nodes,
    Pattern,
    Processes,
    Rank,
    SchedulerSettings,
    Seed,
    SeqLen,
    SparsityRatio,
    Temperature,
    WarmupRatio,
)
from llm_mcp.core.names import METHOD_NAMES, OBJECTIVE_NAMES
from llm_mcp.core.request import Request, choice, field_default

PATH = Annotated[str, Field(max_length=4096)]
JobId = Annotated[str, Field(max_length=64)]


def _default(name: str) -> str:
    return f" (default {field_default(JobConfig, name)})"


class FinetuneRequest(Request):
    """What an agent asks start_finetune for. Unset (None) arguments take the defaults."""

    deferred_problems: ClassVar[bool] = True  # bad arguments are reported with the dataset's, model's, ... problems
    path_fields: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset", "model")

    model: PATH = Field(
        description="Matrix id / alias, or a local checkpoint directory (list_models shows both; relative paths are "
        "under LLM_MCP_HOME)."
    )
    method: choice(*METHOD_NAMES) = Field(  # type: ignore[valid-type]
        description="lora | qlora | dora (Weight-Decomposed LoRA) | sparse (sparse delta, RigL mask updates)."
    )
    dataset: PATH = Field(
        description="JSONL / JSON / CSV / Parquet file, a save_to_disk directory, or a Hub dataset 'hf:ORG/NAME' in "
        "the local Hugging Face cache. Rows: 'messages' (with tools, tool calls, reasoning), Alpaca, ShareGPT, "
        "'prompt'+'completion' or 'text' (objective='dpo': 'prompt'+'chosen'+'rejected'; objective='grpo': 'prompt' "
        "and the fields its graders read); any other keys through "
        "columns. Relative paths are under LLM_MCP_HOME; a file elsewhere: the user is asked to allow its folder."
    )
    objective: choice(*OBJECTIVE_NAMES) | None = Field(  # type: ignore[valid-type]
        None,
        description="causal_lm (default): supervised fine-tuning. dpo: preference tuning (Direct Preference "
        "Optimization) on rows {prompt, chosen, rejected}; the reference is the starting model (the base, or "
        "init_from's); default learning rate 1/40 of the LoRA one. grpo: reinforcement learning from rewards (GRPO) on "
        "rows {prompt, ...}: num_generations completions per prompt, scored by graders.",
    )
    beta: Beta | None = Field(None, description="dpo: how far the model may move from the reference (0.1).")
    label_smoothing: LabelSmoothing | None = Field(None, description="dpo: assumed share of wrong labels (0-0.49).")
    graders: GraderList | None = Field(
        None,
        description="grpo (required) and how rewards are given: a list of {'grader': exact_match | contains | regex | "
        "json_fields | numeric | length | http | agent, 'weight'?, ...}, summed with their weights (docs/guide.md).",
    )
    num_generations: Generations | None = Field(None, description="grpo: completions per prompt (default 8; 2-64).")
    max_new_tokens: NewTokens | None = Field(None, description="grpo: a completion's token limit (default 256).")
    temperature: Temperature | None = Field(None, description="grpo: sampling temperature (default 1.0).")
    loss_type: choice("dapo", "grpo", "dr_grpo") | None = Field(  # type: ignore[valid-type]
        None, description="grpo: how token losses are averaged (TRL's; default dapo)."
    )
    clip_epsilon: ClipEpsilon | None = Field(None, description="grpo: the policy ratio's clip range (default 0.2).")
    kl_coef: KlCoef | None = Field(None, description="grpo: KL penalty to the starting model (TRL's beta; default 0).")
    scale_rewards: choice("group", "none") | None = Field(  # type: ignore[valid-type]
        None, description="grpo: divide advantages by the group's reward std (default group) or not (none)."
    )
    init_from: JobId | None = Field(
        None,
        description="Train further from this succeeded job's adapter (e.g. SFT before dpo); same model and adapter "
        "kind.",
    )
    eval_dataset: PATH | None = Field(None, description="Held-out data for eval loss (same formats).")
    eval_fraction: EvalFraction | None = Field(None, description="Hold out this fraction of dataset instead (0-0.5).")
    max_steps: MaxSteps | None = Field(None, description="Optimizer steps (1-1e6). Give this or epochs.")
    epochs: Epochs | None = Field(None, description="Passes over the data (default 1).")
    learning_rate: LearningRate | None = Field(None, description="Default: the model's recommended LoRA LR.")
    lora_rank: Rank | None = Field(None, description="Adapter rank (default 32; 1-1024).")
    lora_alpha: Alpha | None = Field(None, description="Scaling numerator (default = rank).")
    lora_dropout: Dropout | None = Field(None, description="Dropout on the adapter input (0-0.9).")
    target_modules: list[Annotated[str, Field(max_length=128)]] | None = Field(
        None, description="Module names to adapt (default: the model's all-linear list).", max_length=64
    )
    train_experts: bool | None = Field(
        None, description="MoE models: LoRA / QLoRA also adapt the experts (default true; needs lora_dropout 0)."
    )
    batch_size: BatchSize | None = Field(
        None, description="Sequences per micro-batch per process" + _default("batch_size")
    )
    gradient_accumulation: Accumulation | None = Field(
        None, description="Micro-batches per optimizer step" + _default("gradient_accumulation")
    )
    max_seq_len: SeqLen | None = Field(
        None, description="Longer sequences are truncated, and counted in the log" + _default("max_seq_len")
    )
    train_on: choice("completion", "all") | None = Field(  # type: ignore[valid-type]
        None, description="Loss on assistant / completion tokens only (default) or on all tokens."
    )
    train_reasoning: bool | None = Field(
        None, description="Rows with the assistant's reasoning: the loss covers it too (default true)."
    )
    subset: Subset = None
    split: Split = None
    revision: Revision = None
    columns: Columns | None = Field(
        None,
        description="Your dataset's own keys by the names training knows, e.g. {'prompt': 'ticket', 'completion': "
        "'expected'} (also instruction / input / output, messages, conversations, text, chosen / rejected).",
    )
    seed: Seed | None = Field(None, description="Seed for init, data order and dropout" + _default("seed"))
    name: str | None = Field(None, description="A label for the job.", pattern=r"^[\w.-]{1,64}$")
    num_processes: Processes | None = Field(
        None, description="Data-parallel processes in all nodes (default 1, or 1 per GPU with nodes)."
    )
    nodes: Nodes | None = Field(
        None, description="Machines to spread them over, one launcher per machine (slurm or ray executor; default 1)."
    )
    scheduler: SchedulerSettings | None = Field(
        None, description="slurm executor: this job's sbatch options (default: LLM_MCP_SLURM_*)."
    )
    checkpoint_every: Every | None = Field(
        None, description="Checkpoint every N steps (default 50; 0 = only on cancel)."
    )
    keep_checkpoints: KeepCheckpoints | None = Field(
        None, description="How many recent checkpoints to keep" + _default("keep_checkpoints")
    )
    eval_every: Every | None = Field(None, description="Eval loss every N steps (default: only at the end).")
    lr_scheduler: choice("cosine", "linear", "constant", "constant_with_warmup") | None = Field(  # type: ignore[valid-type]
        None, description="cosine (default) | linear | constant | constant_with_warmup."
    )
    warmup_ratio: WarmupRatio | None = Field(
        None, description="Fraction of steps warming up" + _default("warmup_ratio")
    )
    gradient_checkpointing: bool | None = Field(None, description="Default: on when memory is tight.")
    group_by_length: bool | None = Field(
        None, description="Batch sequences of similar length together (less padding; default true)."
    )
    density: Density | None = Field(
        None, description="sparse: fraction of each target matrix trained (default: LoRA rank 32's parameter count)."
    )
    sparsity_ratio: SparsityRatio | None = Field(
        None, description="sparse: fraction NOT trained (= 1 - density), as in the 'Supported LLM Models' config."
    )
    sparsity_type: choice("unstructured") | None = Field(  # type: ignore[valid-type]
        None, description="sparse: only 'unstructured'."
    )
    mask_update_interval: MaskInterval | None = Field(
        None, description="sparse: steps between RigL mask updates (default 100)."
    )
    mask_update_fraction: MaskFraction | None = Field(
        None, description="sparse: fraction of entries dropped and regrown per update, cosine-decayed (0.3)."
    )
    use_rigl: bool | None = Field(
        None, description="sparse: dynamic mask (default true); false = fixed random mask (SHiRA)."
    )
    quantize_base: bool | None = Field(None, description="sparse: train the delta over a 4-bit NF4 base.")
    resume_from: JobId | None = Field(
        None,
        description="Continue this failed or cancelled job from its last checkpoint (a new job; model, method and "
        "data as before).",
    )
    dry_run: bool = Field(False, description="Validate and estimate only; start nothing.")

    def given(self) -> dict:
        """The arguments the caller set (what a job records as its request and a resume compares)."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"dry_run", "resume_from"})

    def check(self) -> list[str]:
        problems = []
        if self.max_steps is not None and self.epochs is not None and self.resume_from is None:
            problems.append("give max_steps or epochs, not both")
        if self.eval_dataset is not None and self.eval_fraction:
            problems.append("give eval_dataset or eval_fraction, not both")
        return problems


class EvaluateRequest(Request):
    """What an agent asks evaluate for."""

    deferred_problems: ClassVar[bool] = True  # reported with the targets', dataset's and pattern's problems
    path_fields: ClassVar[tuple[str, ...]] = ("dataset", "model")

    targets: list[Annotated[str, Field(max_length=200)]] = Field(
        description="What to score, side by side (1-8): 'base' (the base model), a job id (its final adapter), or "
        "'JOB_ID@STEP' / 'JOB_ID@latest' (a checkpoint). All must share one base model.",
        min_length=1,
        max_length=8,
    )
    dataset: PATH = Field(
        description="Held-out rows (a file as for start_finetune, or 'hf:ORG/NAME'; relative paths are under "
        "LLM_MCP_HOME): SFT rows get "
        "loss / perplexity and, with a reference answer, exact_match / contains / regex; preference rows get "
        "preference accuracy."
    )
    model: PATH | None = Field(None, description="The base model when targets is only ['base'].")
    max_rows: EvalRows = Field(100, description="Score the first N rows (1-5000).")
    max_tokens: EvalTokens = Field(64, description="Greedy generation length per row (1-512).")
    generate: bool = Field(True, description="Generate and score answers (false: loss only, faster).")
    regex: Pattern | None = Field(
        None, description="Pattern every generation should match (a row's own 'regex' field wins)."
    )
    graders: GraderList | None = Field(
        None,
        description="Score each generation with these, as a GRPO job does (built-in or http graders; see "
        "start_finetune's graders); prompt rows {prompt, answer?, ...} are scored by graders only.",
    )
    subset: Subset = None
    split: Split = None
    revision: Revision = None
    columns: Columns | None = Field(
        None,
        description="The dataset's own keys by the names evaluation knows, e.g. {'prompt': 'ticket', "
        "'completion': 'expected'}.",
    )
    plot: bool = Field(False, description="Also return a bar chart (PNG) of the scores when finished.")
    wait_seconds: float = Field(
        20,
        description="Wait up to this long (0-30 s) for it to finish, with progress notifications; longer ones keep "
        "running.",
        ge=0,
        le=30,
    )
