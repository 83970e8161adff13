"""The docs stay true to the code: the tool reference is generated, the README stays short, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from llm_mcp.tools.reference import render

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_tool_reference_is_what_the_schemas_say():
    committed = (REPO / "docs" / "tools.md").read_text()
    assert committed == render(), "docs/tools.md is stale: run `.venv/bin/llm-mcp reference > docs/tools.md`"


def test_the_readme_is_short_and_says_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    assert max(len(line) for line in text.splitlines()) <= 200


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, "\n".join(broken)


def test_every_tool_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    tools = re.findall(r"^## (\w+)$", render(), re.M)
    assert tools and all(f"| `{t}` |" in readme for t in tools), tools
