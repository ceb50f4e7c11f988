"""The import graph of gem/, pipeline/ and jobs/, read from the source with `ast`: no cycles,
and each layer imports only what lies below it.

- `pipeline/storage` imports nothing of the project outside itself (and so no torch:
  reading an output's tables needs neither the model nor the prompts);
- `gem` imports neither Ray nor the pipeline or the CLI;
- `pipeline` does not import the CLI (`jobs`).

Every import counts, also one inside a function (a lazy import that closes a cycle is still
a cycle). Run `python tests/test_imports.py` to print the graph's edges between packages.
"""

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gem", "pipeline", "jobs")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the three packages: dotted name -> file."""
    files = (p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    return {module_name(p): p for p in sorted(files)}


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """What module `name` (its source at `path`) imports: project modules (the submodule
    where `from package import submodule` names one) and the top-level names of others."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            found.add(target if target in modules else target.split(".")[0])
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (project modules by full name, others top-level)."""
    modules = project_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in graph:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: dict[str, set[str]], package: str, allowed) -> list[str]:
    """`module -> import` for each import of a module of `package` that `allowed` refuses."""
    return [
        f"{name} -> {target}"
        for name, targets in sorted(graph.items())
        if within(name, package)
        for target in sorted(targets)
        if not allowed(target)
    ]


def project(name: str) -> bool:
    return any(within(name, p) for p in PACKAGES)


def test_the_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_storage_imports_nothing_above_it():
    graph = import_graph()
    bad = violations(
        graph,
        "pipeline.storage",
        lambda t: not project(t) or within(t, "pipeline.storage") or t == "pipeline",
    )
    assert bad == []


def test_gem_imports_neither_ray_nor_the_pipeline():
    graph = import_graph()
    assert (
        violations(graph, "gem", lambda t: t != "ray" and not project(t) or within(t, "gem")) == []
    )


def test_the_pipeline_does_not_import_the_cli():
    assert violations(import_graph(), "pipeline", lambda t: not within(t, "jobs")) == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    graph = {"pipeline.storage.x": {"pipeline.prompts.vocab", "pyarrow"}}
    assert violations(graph, "pipeline.storage", lambda t: not within(t, "pipeline.prompts")) == [
        "pipeline.storage.x -> pipeline.prompts.vocab"
    ]


def test_the_graph_reads_relative_and_from_imports():
    graph = import_graph()
    assert "gem.text" in graph["gem.model"]  # from .text import ...
    assert "pipeline.storage.output" in graph["pipeline.storage.tables"]  # from ... import output


def test_reading_the_tables_imports_no_torch():
    code = (
        "import sys\n"
        "import pipeline.storage.tables, pipeline.storage.lock, pipeline.storage.credentials\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'ray', 'gem') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


if __name__ == "__main__":
    edges = Counter()
    for name, targets in import_graph().items():
        for target in targets:
            if project(target):
                edges[(".".join(name.split(".")[:2]), ".".join(target.split(".")[:2]))] += 1
    for (source, target), n in sorted(edges.items()):
        if source != target:
            print(f"{source:20s} -> {target:20s} {n}")
    print("cycles:", cycles(import_graph()) or "none")
