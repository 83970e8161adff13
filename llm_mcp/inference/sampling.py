"""Sampling from a base model with or without an adapter, behind a small backend interface.

The in-process backend (transformers + peft) keeps each base model loaded once and hot-swaps
adapters on it (load / set / least-recently-used eviction), so a second adapter on the same base
costs an adapter load, not a model load. torch is imported on first use, never at server start.
The vLLM backend (`llm_mcp.inference.serving.sampler`) implements the same `Sampler` protocol.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.quiet import quiet_bitsandbytes
from llm_mcp.inference.targets import Target
from llm_mcp.modeling.adapters import ADAPTERS

MAX_TOKENS_LIMIT = 4096
MAX_N = 16
MAX_PROMPT_CHARS = 200_000


@dataclass
class SampleParams:
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    deadline: float | None = None  # time.monotonic() when generation stops (finish_reason 'time_limit'): one per call

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None: no limit)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    cancel: threading.Event | None = None  # set when the caller has gone away: stop at the next token


class TokenLogprob(BaseModel):
    token: str
    logprob: float


class Completion(BaseModel):
    text: str
    finish_reason: str = Field(
        description="'stop' (end token or stop string), 'length' (max_tokens) or "
        "'time_limit' (the call's time budget, LLM_MCP_SAMPLE_TIMEOUT_S)."
    )
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class Generation(BaseModel):
    completions: list[Completion]
    prompt_tokens: int
    backend: str
    load_s: float = Field(description="Time spent loading the base model and/or adapter for this call.")
    base_loaded: bool = Field(description="True if this call had to load the base model.")
    adapter_loaded: bool = Field(description="True if this call had to load the adapter.")
    generate_s: float
    tokens_per_s: float


class Sampler(Protocol):
    backend: str

    def generate(self, target: Target, params: SampleParams) -> Generation: ...


class TransformersSampler:
    """In-process generation with transformers + peft. Thread-safe: one generation at a time."""

    backend = "transformers"

    def __init__(self, max_bases: int = 1, max_adapters: int = 8):
        quiet_bitsandbytes()  # before transformers / peft import bitsandbytes in this process
        self.max_bases, self.max_adapters = max_bases, max_adapters
        self._bases: OrderedDict[tuple[str, bool, str], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.base_loads = 0
        self.adapter_loads = 0

    def _base(self, target: Target) -> tuple[dict[str, Any], bool]:
        # Each adapter layout gets its own copy of the base (sparse deltas wrap the base's linear layers).
        key = (target.base_path, target.quantized, target.layout)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key], False
        while len(self._bases) >= self.max_bases:
            _, old = self._bases.popitem(last=False)
            del old
            _free_memory()
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        from llm_mcp.modeling.base import load_base

        model = load_base(
            target.base_path,
            dtype=dtype,
            trust_remote_code=target.trust_remote_code,
            device_map={"": "cpu" if device == "cpu" else 0},
            quant_type="nf4" if target.quantized else None,
        )
        if not target.quantized:
            model.to(device)
        model.eval()
        from llm_mcp.modeling.encode import tokenizer_for

        tok = tokenizer_for(target.base_path, target.trust_remote_code)  # as training saw it: a chat template, a pad
        entry = {"model": model, "tokenizer": tok, "device": device}  # + what the adapter layout's select keeps
        self._bases[key] = entry
        self.base_loads += 1
        return entry, True

    def _activate(self, target: Target) -> tuple[dict[str, Any], bool, bool]:
        """With the lock held: the base entry with `target`'s adapter (or none) selected; also whether the base
        and the adapter were loaded now."""
        base, base_loaded = self._base(target)
        path = Path(target.adapter_path) if target.adapter_path else None
        return base, base_loaded, ADAPTERS[target.layout].select(self, base, path)

    @staticmethod
    def _adapter_off(model, target: Target):
        """The base alone: PEFT adapters disabled when `target` names none (sparse deltas are switched by select)."""
        return (
            model.disable_adapter()
            if target.adapter_path is None and hasattr(model, "disable_adapter")
            else contextlib.nullcontext()
        )

    @contextlib.contextmanager
    def using(self, target: Target) -> Iterator[dict[str, Any]]:
        """Hold the sampler with `target` active: yields its entry ("model", "tokenizer", "device")."""
        with self._lock:
            base, _, _ = self._activate(target)
            with self._adapter_off(base["model"], target):
                yield base

    def generate(self, target: Target, params: SampleParams) -> Generation:
        import torch

        with self._lock:
            t0 = time.perf_counter()
            base, base_loaded, adapter_loaded = self._activate(target)
            load_s = time.perf_counter() - t0
            model, tok = base["model"], base["tokenizer"]
            from llm_mcp.modeling.encode import chat_ids, end_of_turn_ids

            stop_ids = end_of_turn_ids(tok, model)
            if params.messages is not None:
                ids = chat_ids(tok, params.messages, add_generation_prompt=True)
            else:
                ids = tok(params.prompt, add_special_tokens=True)["input_ids"]
            context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if context and len(ids) + params.max_tokens > context:
                raise InvalidArgumentError(
                    f"the prompt is {len(ids):,} tokens and max_tokens={params.max_tokens}: "
                    f"{len(ids) + params.max_tokens:,} tokens exceed {target.base_id}'s context of {context:,}; "
                    "shorten the prompt or lower max_tokens"
                )
            input_ids = torch.tensor([ids], device=base["device"])
            sample = params.temperature > 0
            gen_kwargs: dict[str, Any] = dict(
                max_new_tokens=params.max_tokens,
                do_sample=sample,
                num_return_sequences=params.n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=stop_ids,
                return_dict_in_generate=True,
            )
            if sample:
                gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
            else:
                gen_kwargs.update(temperature=None, top_p=None, top_k=None)
            if params.stop:
                gen_kwargs.update(stop_strings=params.stop, tokenizer=tok)
            recorder = _LogprobRecorder() if params.logprobs else None
            bounds = _bounds(params, recorder)
            gen_kwargs["stopping_criteria"] = [bounds]
            if recorder is not None:
                gen_kwargs["logits_processor"] = [recorder]
            no_adapter = self._adapter_off(model, target)
            if params.seed is not None:
                torch.manual_seed(params.seed)
            t1 = time.perf_counter()
            with torch.inference_mode(), no_adapter:
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
            generate_s = time.perf_counter() - t1
            new = out.sequences[:, input_ids.shape[1] :]
            scores = torch.stack(recorder.values, dim=1) if recorder is not None and recorder.values else None
            completions, total = [], 0
            for i, row in enumerate(new.tolist()):
                row_scores = scores[i].tolist() if scores is not None else None
                completions.append(self._completion(tok, row, stop_ids, params, row_scores))
                if bounds.timed_out and completions[-1].finish_reason == "length":
                    completions[-1].finish_reason = "time_limit"
                total += completions[-1].completion_tokens
            return Generation(
                completions=completions,
                prompt_tokens=len(ids),
                backend=self.backend,
                load_s=round(load_s, 4),
                base_loaded=base_loaded,
                adapter_loaded=adapter_loaded,
                generate_s=round(generate_s, 4),
                tokens_per_s=round(total / generate_s, 1) if generate_s > 0 else 0.0,
            )

    @staticmethod
    def _completion(
        tok, row: list[int], stop_ids: list[int], params: SampleParams, scores: list[float] | None
    ) -> Completion:
        finish = "length"
        if ends := [j for j, t in enumerate(row) if t in stop_ids]:
            row, finish = row[: ends[0]], "stop"
        while row and row[-1] == tok.pad_token_id:
            row = row[:-1]
        text = tok.decode(row, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        logprobs = None
        if scores is not None:
            logprobs = [TokenLogprob(token=tok.decode([t]), logprob=round(lp, 5)) for t, lp in zip(row, scores)]
        return Completion(text=text, finish_reason=finish, completion_tokens=len(row), logprobs=logprobs)


class _LogprobRecorder:
    """The log-probability of each generated token under the model (before temperature / top-k / top-p, as
    vLLM reports it), kept as one float per sequence and step: the step's whole-vocabulary distribution is
    dropped as soon as the token drawn from it is known, so memory stays n x steps, whatever the vocabulary."""

    def __init__(self) -> None:
        self.values: list = []  # one [n] tensor per generated token
        self._scores = None  # the step's scores (generate holds them anyway) and their log-normaliser, [n]
        self._lse = None

    def __call__(self, input_ids, scores):  # a logits processor: sees the step's scores, changes nothing
        import torch

        self._scores, self._lse = scores, torch.logsumexp(scores.float(), dim=-1)
        return scores

    def take(self, input_ids) -> None:
        """After the step's token is appended (the stopping criterion's turn): keep its log-probability."""
        if self._scores is not None:
            picked = self._scores.gather(1, input_ids[:, -1:]).squeeze(1).float()
            self.values.append((picked - self._lse).cpu())
            self._scores = self._lse = None


def _bounds(params: SampleParams, recorder: _LogprobRecorder | None = None):
    """A stopping criterion for the call's time budget and for a caller that went away (and the logprob
    recorder's turn to keep the token just drawn)."""
    import torch
    from transformers import StoppingCriteria

    deadline = params.deadline

    class Bounds(StoppingCriteria):
        timed_out = False

        def __call__(self, input_ids, scores, **kwargs):
            if recorder is not None:
                recorder.take(input_ids)
            over = deadline is not None and time.monotonic() > deadline
            self.timed_out = self.timed_out or over
            stop = over or (params.cancel is not None and params.cancel.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return Bounds()


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
