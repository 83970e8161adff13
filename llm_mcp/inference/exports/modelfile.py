"""An Ollama Modelfile for a GGUF export: FROM (and ADAPTER), the chat template, stop tokens, sampling defaults.

The TEMPLATE is derived from the model's own chat template: one turn rendered with placeholders for the system
message and the prompt, with and without a system message, so it is the template the model was trained with
(tests/test_gguf.py renders both and compares).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SYSTEM, PROMPT = "\x00SYSTEM\x00", "\x00PROMPT\x00"
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty")
OLLAMA_NAMES = {"repetition_penalty": "repeat_penalty"}


def _turn(tokenizer: Any, system: bool) -> str | None:
    messages = [{"role": "user", "content": PROMPT}]
    if system:
        messages.insert(0, {"role": "system", "content": SYSTEM})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses a system message
        return None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
        text = text[len(bos) :]
    if PROMPT not in text or (system and SYSTEM not in text) or "{{" in text:
        return None
    return text.replace(SYSTEM, "{{ .System }}").replace(PROMPT, "{{ .Prompt }}")


def ollama_template(tokenizer: Any) -> tuple[str | None, list[str]]:
    """(the Go template of one turn, its stop tokens); (None, []) when the chat template cannot be rendered so."""
    from llm_mcp.modeling.chat import closing_token

    if not getattr(tokenizer, "chat_template", None):
        return None, []
    plain, with_system = _turn(tokenizer, False), _turn(tokenizer, True)
    if plain is None:
        return None, []
    closing = closing_token(tokenizer)
    stops = [t for t in dict.fromkeys([closing, tokenizer.eos_token]) if t]
    body = plain if with_system is None else f"{{{{ if .System }}}}{with_system}{{{{ else }}}}{plain}{{{{ end }}}}"
    return body + "{{ .Response }}" + (closing or ""), stops


def modelfile(tokenizer: Any, model_file: str, lora_file: str | None, base_dir: Path) -> str:
    """The Modelfile text; paths are relative to the export directory (`ollama create -f Modelfile` there)."""
    lines = [f"FROM ./{model_file}"]
    if lora_file:
        lines.append(f"ADAPTER ./{lora_file}")
    template, stops = ollama_template(tokenizer)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    try:
        generation = json.loads((base_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    for key in SAMPLING:
        if isinstance(generation.get(key), int | float) and generation.get("do_sample", True):
            lines.append(f"PARAMETER {OLLAMA_NAMES.get(key, key)} {generation[key]}")
    return "\n".join(lines) + "\n"
