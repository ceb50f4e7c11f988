"""No function in pipeline/ or jobs/ is longer than MAX_LINES (read with `ast`), except the
argparse declarations named in ARGPARSE: one flag after another reads best as one list."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
ARGPARSE = {"jobs/run.py:add_run", "jobs/cli.py:add_eval"}


def function_lengths() -> dict[str, int]:
    """`path:name` -> lines (decorators and docstring included) of every function."""
    found = {}
    for package in ("pipeline", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    name = f"{path.relative_to(ROOT).as_posix()}:{node.name}"
                    found[name] = max(found.get(name, 0), node.end_lineno - start + 1)
    return found


def test_no_function_is_longer_than_60_lines():
    lengths = function_lengths()
    assert ARGPARSE <= set(lengths), "an exception names a function that does not exist"
    long = {name: n for name, n in lengths.items() if n > MAX_LINES and name not in ARGPARSE}
    assert not long, f"functions over {MAX_LINES} lines: {long}"


if __name__ == "__main__":
    for name, n in sorted(function_lengths().items(), key=lambda item: -item[1])[:15]:
        print(f"{n:4d} {name}")
