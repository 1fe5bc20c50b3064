"""The package layout: imports only go down (no module imports one that imports it back)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "embgemma_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _walk(node: ast.AST):
    """Every node, skipping ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _walk(child)


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """embgemma_jax modules imported anywhere (deferred imports inside functions too), except under
    ``if TYPE_CHECKING:``.
    ``from pkg import submodule`` depends on the submodule (the package itself is initialized first anyway)."""
    out: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("embgemma_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("embgemma_jax"))
    return out


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = {d for d in _imports(tree, set(modules)) if d in modules and d != name}
        graph[name] = deps
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph[n]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)
    assert "embgemma_jax.engine" in graph and "embgemma_jax.encode" in graph
    # encode() never climbs back up: the engine and the model core import no facade, corpus, research or server
    below = ["engine", "batching", "prompts", "model", "masks", "pooling", "tokenizer", "config"]
    above = ("embgemma_jax.encode", "embgemma_jax.corpus", "embgemma_jax.research", "embgemma_jax.server")
    for low in below:
        assert not {d for d in graph[f"embgemma_jax.{low}"] if d.startswith(above)}, low
