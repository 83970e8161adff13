"""The package's shape: one-way layers, no import cycles, small modules, light processes.

    core  <-  modeling  <-  validation / train / inference  <-  jobs  <-  tools / server / http  <-  cli / demo / bench

Imports are read from the source (module level, inside functions and under TYPE_CHECKING), so a
lazy or a type-only import that points the wrong way fails here too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llm_mcp"

# layer of each top-level part of the package, lowest first; a module may import its own layer and below
LAYERS = {
    "core": 0,
    "tiny": 0,
    "__init__": 0,
    "modeling": 1,
    "validation": 2,
    "train": 2,
    "inference": 2,
    "jobs": 3,
    "tools": 4,
    "server": 4,
    "http": 4,
    "cli": 5,
    "__main__": 5,
    "demo": 5,
    "bench": 5,
}
# parts that may import the MCP SDK (the training process, samplers and merges never do)
MCP_ALLOWED = {"tools", "server", "http", "cli", "demo", "bench"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names this module imports, `if TYPE_CHECKING:` blocks included."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}


def test_layers_point_one_way():
    wrong = []
    for module, deps in _graph().items():
        for dep in deps:
            if LAYERS[_part(dep)] > LAYERS[_part(module)]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    # Importing a package runs its __init__: an edge to a submodule is an edge to its parents too.
    for module, deps in graph.items():
        deps |= {".".join(d.split(".")[:k]) for d in list(deps) for k in range(2, d.count(".") + 1)} & set(graph)
        deps.discard(module)
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m) :] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(graph[m]):
            if not m.startswith(d + "."):  # a submodule importing its own package's __init__ is no cycle
                visit(d)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_tool_layer_and_above_import_the_mcp_sdk():
    wrong = [
        f"{m} imports {i}"
        for m, p in _modules().items()
        if _part(m) not in MCP_ALLOWED
        for i in _imports(p, m)
        if i == "mcp" or i.startswith(("mcp.", "mcp_types"))
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_in_the_runtime_or_the_tests_imports_the_benchmarks():
    wrong = [
        f"{m} imports {i}"
        for m, deps in _graph().items()
        if _part(m) not in ("bench", "cli")
        for i in deps
        if _part(i) == "bench"
    ]
    tests = Path(__file__).parent
    wrong += [
        f"{p.name} imports {i}"
        for p in tests.glob("*.py")
        for i in _imports(p, "tests." + p.stem)
        if i.startswith("llm_mcp.bench")
    ]
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_small():
    big = []
    for module, path in _modules().items():
        src = path.read_text()
        if len(src.splitlines()) > 400:
            big.append(f"{module}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                big.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, "split these (a newcomer reads a file in one sitting):\n" + "\n".join(big)


@pytest.mark.parametrize(
    "entry",
    [
        "llm_mcp.train.run",
        "llm_mcp.jobs.supervisor",
        "llm_mcp.inference.exports.worker",
        "llm_mcp.inference.serving.watch",
    ],
)
def test_job_processes_import_neither_the_sdk_nor_the_server(entry):
    """The trainer, the job supervisor, the merge worker and the vLLM watcher run as their own processes."""
    code = (
        f"import sys, {entry}; bad = sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.') "
        "or m in ('llm_mcp.server', 'llm_mcp.tools')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_only_the_extension_tables_compare_a_method_objective_or_format_name():
    """What a method, objective or export format is lives in its module (llm_mcp.core.methods, .core.objectives,
    .inference.exports): code elsewhere asks the table, it never compares a name like `method == "sparse"`."""
    from llm_mcp.core.names import METHOD_NAMES, OBJECTIVE_NAMES
    from llm_mcp.inference.exports import FORMATS

    names = set(METHOD_NAMES) | set(OBJECTIVE_NAMES) | set(FORMATS)
    tables = ("core/methods/", "core/objectives/", "inference/exports/")
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith(tables):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            consts = [c for s in sides for c in ([s] if isinstance(s, ast.Constant) else getattr(s, "elts", []))]
            hits = sorted({c.value for c in consts if isinstance(c, ast.Constant) and c.value in names})
            if hits:
                wrong.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, "ask the table (METHODS / OBJECTIVES / FORMATS) instead:\n" + "\n".join(wrong)


def test_tool_modules_do_not_import_each_other():
    """A tool module holds its request, handler and summary; what tools share is in tools.common / tools.services."""
    shared = {"llm_mcp.tools.common", "llm_mcp.tools.services", "llm_mcp.tools"}
    wrong = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        if m.startswith("llm_mcp.tools.") and m not in shared
        for d in deps
        if d.startswith("llm_mcp.tools.") and d not in shared and d != m
    ]
    assert not wrong, "\n".join(wrong)
