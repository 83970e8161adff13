"""The vLLM sampling backend: the `Sampler` protocol over vLLM's OpenAI-compatible API.

The adapter is the model name: it is registered with `/v1/load_lora_adapter` on first use and
then checked, because vLLM has answered 200 to loads that then served the base model
(vllm #18372, #55193). The check compares prompt log-probabilities on a short probe:
- against the base model: identical outputs mean the adapter is not applied;
- against the probe logits the trainer saved at the end of the job (probe.safetensors next to
  a final adapter): vLLM must reproduce the trained model within a dtype tolerance.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from llm_mcp.core.errors import InvalidArgumentError
from llm_mcp.core.layouts import LAYOUTS, adapter_key
from llm_mcp.inference.sampling import Completion, Generation, SampleParams, TokenLogprob
from llm_mcp.inference.serving.servers import START_WAIT_S, VllmError, VllmPool, VllmServer
from llm_mcp.inference.targets import Target

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 1 2 3 4 5"
SAME_AS_BASE = 1e-6


def adapter_config(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}


def needs_merge(target: Target) -> str | None:
    """Why vLLM cannot serve this adapter as a LoRA (REFERENCE §4), or None if it can."""
    if not target.adapter_path:
        return None
    if not LAYOUTS[target.layout].peft:
        return f"{target.layout} adapters are not LoRA adapters"
    cfg = adapter_config(target.adapter_path)
    if cfg.get("use_dora"):
        return "DoRA adapters carry magnitude vectors vLLM does not load"
    if isinstance(cfg.get("target_modules"), str):
        return "the adapter targets a vision-language model's language model by pattern, which vLLM does not load"
    if cfg.get("target_parameters"):
        return (
            "the adapter trains fused MoE expert parameters (PEFT target_parameters); vLLM serving them as a LoRA "
            "is untested here"
        )
    if cfg.get("modules_to_save"):
        return f"the adapter trains whole modules ({cfg['modules_to_save']}), which vLLM does not load"
    return None


def adapter_name(adapter_path: str, label: str | None = None) -> str:
    """A stable, readable served name: the caller's label, else a short hash of the path."""
    return label or "adapter-" + hashlib.sha1(str(Path(adapter_path).resolve()).encode()).hexdigest()[:10]


def _prompt_logprobs(server: VllmServer, model: str, prompt: list[int] | str) -> list[float]:
    out = server.request(
        "POST",
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0},
        timeout=120,
    )
    rows = out["choices"][0]["prompt_logprobs"][1:]
    return [next(iter(r.values()))["logprob"] for r in rows]


def probe_tolerance(gpu: bool, max_abs_logit: float) -> float:
    """How far vLLM's log-probabilities may be from the trainer's probe and still be the same model.

    On CPU both compute in fp32: 2e-3. On a GPU vLLM computes in bf16 (8 significant bits) and the LoRA delta in
    bf16 where PEFT used fp32; a log-probability is a difference of logits, so the error grows with their size:
    0.05 + 4 x 2^-8 x max |logit| (~0.36 at |logit| 20; a tiny model's bf16 forward at |logit| 45 is 0.43 off).
    A wrong adapter is caught regardless: it is the base model's distance that tells it (SAME_AS_BASE).
    """
    return 0.05 + 4 * 2**-8 * max_abs_logit if gpu else 2e-3


def _probe(adapter_path: str) -> tuple[list[int], list[float], float] | None:
    """(input ids, expected log-probabilities of each next input token, the largest |logit|) from the trainer's
    probe."""
    path = Path(adapter_path).parent / "probe.safetensors"
    if not path.exists():
        return None
    import numpy as np
    from safetensors.numpy import load_file

    probe = load_file(str(path))
    ids, logits = probe["input_ids"].astype(np.int64), probe["logits"].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return ids.tolist(), [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)], float(np.abs(logits).max())


class VllmSampler:
    """Generation through vLLM servers from a `VllmPool`; adapters are loaded at runtime."""

    backend = "vllm"

    def __init__(self, pool: VllmPool, wait_s: float = START_WAIT_S, tolerance: float | None = None):
        self.pool, self.wait_s = pool, wait_s
        self.tolerance = tolerance  # None: probe_tolerance for the device and the probe's logits
        self.adapter_loads = 0
        self.checks: dict[str, dict[str, Any]] = {}  # served adapter name -> verification figures

    def server(self, target: Target, rank: int = 0, wait_s: float | None = None) -> tuple[VllmServer, bool]:
        wait_s = self.wait_s if wait_s is None else wait_s
        return self.pool.server_for(
            target.base_path, target.base_id, rank=rank, trust_remote_code=target.trust_remote_code, wait_s=wait_s
        )

    def register(
        self, target: Target, label: str | None = None, wait_s: float | None = None
    ) -> tuple[VllmServer, str, bool, bool]:
        """Make the target servable: (server, model name, server started now, adapter loaded now); a server still
        starting is waited for up to `wait_s` (default: the sampler's)."""
        why = needs_merge(target)
        if why:
            raise InvalidArgumentError(
                f"vLLM cannot serve this adapter directly: {why}. Serve the merged model instead: "
                "serve_adapter(job_id=...) merges and serves a job's result, or start the server with "
                "--sampler transformers to sample it in-process."
            )
        rank = int(adapter_config(target.adapter_path).get("r", 0)) if target.adapter_path else 0
        server, started = self.server(target, rank, wait_s)
        if not target.adapter_path:
            return server, server.name, started, False
        name = adapter_name(target.adapter_path, label)
        key = adapter_key(Path(target.adapter_path))
        if server.adapters.get(name) == key:
            return server, name, started, False
        if name in server.adapters:  # same name, new weights: replace
            server.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, timeout=30)
            del server.adapters[name]
        server.request(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": target.adapter_path}, timeout=120
        )
        try:
            self.checks[name] = self._verify(server, name, target)
        except VllmError:
            server.request("POST", "/v1/unload_lora_adapter", {"lora_name": name}, timeout=30)
            raise
        server.adapters[name] = key
        self.adapter_loads += 1
        return server, name, started, True

    def _verify(self, server: VllmServer, name: str, target: Target) -> dict[str, Any]:
        probe = _probe(target.adapter_path or "")
        prompt: list[int] | str = probe[0] if probe else PROBE_TEXT
        served = _prompt_logprobs(server, name, prompt)
        base = _prompt_logprobs(server, server.name, prompt)
        vs_base = max(abs(a - b) for a, b in zip(served, base))
        if vs_base < SAME_AS_BASE:
            raise VllmError(
                f"vLLM reported adapter {name!r} ({target.adapter_path}) as loaded, but it serves the base model's "
                "outputs unchanged (a known vLLM failure, vllm #18372 / #55193). It was unloaded. Check that the "
                "adapter's target_modules exist in the base model, or sample with --sampler transformers."
            )
        check: dict[str, Any] = {"max_abs_logprob_diff_vs_base": round(vs_base, 6)}
        if probe and not target.quantized:  # QLoRA trained on a 4-bit base; vLLM serves the full-precision one
            vs_trained = max(abs(a - b) for a, b in zip(served, probe[1]))
            tolerance = self.tolerance if self.tolerance is not None else probe_tolerance(self.pool.gpu, probe[2])
            check["max_abs_logprob_diff_vs_training"] = round(vs_trained, 6)
            check["tolerance"] = round(tolerance, 6)
            if vs_trained > tolerance:
                raise VllmError(
                    f"vLLM serves adapter {name!r} differently from the trained model: max |logprob difference| "
                    f"{vs_trained:.4g} on the training probe (tolerance {tolerance:.3g}). It was unloaded. "
                    "Sample it with --sampler transformers, or export it merged and serve that."
                )
        return check

    def generate(
        self, target: Target, params: SampleParams, label: str | None = None, wait_s: float | None = None
    ) -> Generation:
        t0 = time.perf_counter()
        server, model, started, loaded = self.register(target, label, wait_s)
        load_s = time.perf_counter() - t0
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        chat = params.messages is not None
        if chat:
            body.update(messages=params.messages, logprobs=True, top_logprobs=0)
        else:
            body.update(prompt=params.prompt, logprobs=0)
        t1 = time.perf_counter()
        try:
            out = server.request(
                "POST",
                "/v1/chat/completions" if chat else "/v1/completions",
                body,
                timeout=600.0 if params.deadline is None else max(1.0, params.remaining() or 0.0),
            )  # vLLM aborts a request whose client left
        except VllmError as exc:
            if "maximum context length" in str(exc) or "max_tokens" in str(exc):
                raise InvalidArgumentError(f"{exc}. Lower max_tokens or shorten the prompt.") from None
            raise
        generate_s = time.perf_counter() - t1
        server.last_used = time.monotonic()
        completions = [
            self._completion(c, chat, params.logprobs) for c in sorted(out["choices"], key=lambda c: c["index"])
        ]
        total = out.get("usage", {}).get("completion_tokens") or sum(c.completion_tokens for c in completions)
        return Generation(
            completions=completions,
            prompt_tokens=out.get("usage", {}).get("prompt_tokens", 0),
            backend=self.backend,
            load_s=round(load_s, 4),
            base_loaded=started,
            adapter_loaded=loaded,
            generate_s=round(generate_s, 4),
            tokens_per_s=round(total / generate_s, 1) if generate_s > 0 else 0.0,
        )

    @staticmethod
    def _completion(choice: dict[str, Any], chat: bool, want_logprobs: bool) -> Completion:
        if chat:
            text = choice["message"]["content"] or ""
            pairs = [(t["token"], t["logprob"]) for t in (choice.get("logprobs") or {}).get("content") or []]
        else:
            text = choice["text"]
            lp = choice.get("logprobs") or {}
            pairs = list(zip(lp.get("tokens") or [], lp.get("token_logprobs") or []))
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        logprobs = [TokenLogprob(token=t, logprob=round(v, 5)) for t, v in pairs] if want_logprobs else None
        return Completion(text=text, finish_reason=finish, completion_tokens=len(pairs), logprobs=logprobs)
