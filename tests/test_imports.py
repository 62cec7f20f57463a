"""The package's layering: no import cycle between llava_jax's subpackages.

Each `llava_jax/<pkg>/` is one node and each top-level module its own node; an edge is any
`import` of another node anywhere in a file (function-local imports included, since a lazy
import still ties the two packages together). The layers are documented in
docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llava_jax

PACKAGE = Path(llava_jax.__file__).parent


def _node(module: str) -> str | None:
    """The graph node of a dotted module name, or None outside llava_jax."""
    parts = module.split(".")
    if parts[0] != "llava_jax" or len(parts) < 2:
        return None
    return parts[1]


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every llava_jax module `tree` imports, relative imports resolved against `module`."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            # `from llava_jax import data` imports the subpackage `data`.
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Node -> the other nodes it imports."""
    nodes = {p.stem for p in package.iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    nodes |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    graph: dict[str, set[str]] = {n: set() for n in nodes}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        source = _node(module)
        if source is None:  # llava_jax/__init__.py
            continue
        for imported in _imported_modules(ast.parse(path.read_text()), module, is_package):
            target = _node(imported)
            if target in nodes and target != source:
                graph[source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_resolves_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "llava_jax"
    (pkg / "x").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "x" / "__init__.py").write_text("from . import a\n")
    (pkg / "x" / "a.py").write_text("def f():\n    from ..y import b\n")
    (pkg / "y").mkdir()
    (pkg / "y" / "__init__.py").write_text("")
    (pkg / "y" / "b.py").write_text("from llava_jax import top\n")
    (pkg / "top.py").write_text("import llava_jax.x.a\n")
    assert import_graph(pkg) == {"x": {"y"}, "y": {"top"}, "top": {"x"}}


def test_no_import_cycle_between_subpackages():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle between llava_jax packages: {' -> '.join(cycle)}"


def test_media_imports_neither_data_nor_models():
    graph = import_graph()
    assert "media" in graph, "llava_jax/media/ is missing"
    assert not graph["media"] & {"data", "models"}, sorted(graph["media"])
