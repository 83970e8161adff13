"""The tool reference (docs/tools.md), generated from the tools' own descriptions and schemas.

    llm-mcp reference > docs/tools.md

tests/test_docs.py fails when the committed file differs from what this renders, so the reference
is never stale.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from llm_mcp.core.request import allowed
from llm_mcp.tools import MODULES

HEADER = """# Tool reference

Generated from the tools' schemas by `llm-mcp reference > docs/tools.md` (a test fails when it is stale).
Every argument is checked against its bounds and choices; a bad one is reported with the field, the
value, what is allowed and the next step, together with every other problem the call has. Relative
paths resolve under the state directory `LLM_MCP_HOME`.
"""


def _type(prop: dict[str, Any]) -> str:
    options = [prop, *prop.get("anyOf", [])]
    kinds = []
    for o in options:
        if "$ref" in o:
            kinds.append("object")
        elif o.get("type") == "array":
            kinds.append(f"list of {o.get('items', {}).get('type', 'object')}")
        elif "type" in o and o["type"] != "null":
            kinds.append(o["type"])
        elif "enum" in o or "const" in o:
            kinds.append("string")
    return " or ".join(dict.fromkeys(kinds)) or "any"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def first_sentence(description: str) -> str:
    """A tool description's first sentence, on one line."""
    text = " ".join(description.split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def render() -> str:
    """The reference for every tool, in registration order."""
    mcp = MCPServer(name="llm-mcp")
    for module in MODULES:
        module.register(mcp)
    parts = [HEADER]
    tools = mcp._tool_manager.list_tools()
    parts.append("| tool | what it does |\n| --- | --- |")
    parts += [f"| [`{t.name}`](#{t.name}) | {_cell(first_sentence(t.description))} |" for t in tools]
    for tool in tools:
        schema = tool.parameters
        required = set(schema.get("required", []))
        parts.append(f"\n## {tool.name}\n\n*{tool.title}*\n\n{tool.description}\n")
        parts.append("| argument | type | default | allowed | description |\n| --- | --- | --- | --- | --- |")
        for name, prop in schema.get("properties", {}).items():
            default = "required" if name in required else f"`{prop.get('default')!r}`"
            bounds = allowed(prop) if any(k in str(prop) for k in ("enum", "minimum", "maximum", "maxLength")) else ""
            parts.append(
                f"| `{name}` | {_type(prop)} | {default} | {_cell(bounds)} | {_cell(prop.get('description', ''))} |"
            )
        output = tool.output_schema or {}
        fields = list(output.get("properties", {}))
        if fields:
            parts.append(f"\nStructured result: {', '.join(f'`{f}`' for f in fields)}.")
    return "\n".join(parts) + "\n"
