"""Module boundaries (issue 15): no import cycle inside trainer/ and shards/; shards/ imports nothing of trainer/
(the shard format and the word helpers are leaves of its own, `shards.format` and `shards.text`, that the trainer
reads); the model imports no data code (trainer.data, webdataset, PIL)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "shards")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere in it (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    return {name: project_imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_trainer_and_shards():
    assert find_cycle(import_graph()) is None


def test_shards_import_nothing_of_the_trainer():
    graph = import_graph()
    leaks = {name: sorted(i for i in deps if i.startswith("trainer")) for name, deps in graph.items()
             if name.startswith("shards")}
    assert not {name: deps for name, deps in leaks.items() if deps}


def test_format_and_word_leaves_import_no_project_module():
    graph = import_graph()
    for leaf in ("shards.format", "shards.text", "trainer.data.pixels"):
        assert graph[leaf] == set(), leaf


def test_the_model_imports_no_data_code():
    # the one data module it may import is the pixel-normalisation leaf (its package's __init__ imports nothing)
    code = ("import sys, trainer.models.embedder; allowed = ('trainer.data', 'trainer.data.pixels');"
            "print(sorted(m for m in sys.modules if (m.startswith('trainer.data') and m not in allowed)"
            " or m.split('.')[0] in ('webdataset', 'PIL')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
