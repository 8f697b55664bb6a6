"""The package's shape: no import cycles between tunelab modules, and no layer importing a later one.

Imports are read from the source (every `import` statement, also those inside functions and under TYPE_CHECKING),
so a cycle hidden behind a lazy import is found too; nothing is imported.

    .venv/bin/python -m pytest -q tests/test_imports.py
"""

import ast
from pathlib import Path
from helpers import REPO

SRC = REPO / "src"
#: Layers in order: a module may import its own layer and the ones before it (README.md, "Layout").
LAYERS = ("config", "data", "model", "eval", "training", "infer", "api webui", "cli")
#: Top-level modules outside the layers: `env` reads versions only; the package and `python -m` face the user.
OUTSIDE = {"tunelab.env": 0, "tunelab": len(LAYERS), "tunelab.__main__": len(LAYERS)}
#: The root package defines `__version__` before anything else and imports the layers only inside its functions,
#: so a layer reading the version from it neither goes upward nor closes a cycle.
ROOT = "tunelab"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / "tunelab").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The tunelab modules `path` imports; `from package import submodule` counts as importing the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the tunelab modules it imports, less imports of the root package (see ROOT)."""
    files = module_files()
    return {name: imports_of(path, name, set(files)) - {ROOT} for name, path in files.items()}


def layer(module: str) -> int:
    if module in OUTSIDE:
        return OUTSIDE[module]
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names.split())


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as a path that returns to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_through(graph, group) for group in groups]


def _path_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle from the group's first module back to itself, staying inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_the_graph_sees_lazy_imports_and_every_module_has_a_layer():
    graph = import_graph()
    # Imported inside a function only, so only a source walk finds it.
    assert "tunelab.training.run" in graph["tunelab"]
    assert "tunelab.eval.text_metrics" in graph["tunelab.training.predict"]
    for module in graph:
        layer(module)


def test_cycle_finder_reports_a_cycle_it_is_given():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles_between_tunelab_modules():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_no_layer_imports_a_later_one():
    graph = import_graph()
    upward = [f"{module} imports {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer(target) > layer(module)]
    assert not upward, "imports of a later layer:\n" + "\n".join(upward)


#: Longer than this, a module holds more than one idea (split it; STYLE.md).
MAX_LINES = 350


def test_no_source_file_is_longer_than_max_lines():
    long = {str(path.relative_to(SRC)): count for path in (SRC / "tunelab").rglob("*.py")
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py and conftest.py, so each test module stands alone."""
    tests = REPO / "tests"
    modules = {path.stem for path in tests.rglob("test_*.py")}
    found = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.relative_to(tests)} imports {name}" for name in names if name in modules]
    assert not found, "\n".join(found)
