"""The package's structure, read from its source with `ast`: no import cycles, no private
names imported across modules, the layers import downwards only, and one place reads a
run config's `method`."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "scott_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def imports(name: str) -> list[tuple[str, str]]:
    """(imported scott_jax module, imported name or '') for every import in module `name`,
    at any depth (function-level imports included)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("scott_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("scott_jax"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, "") if submodule in MODULES else (base, alias.name))
    return found


GRAPH = {name: {target for target, _ in imports(name) if target in MODULES} for name in MODULES}


def test_the_import_graph_is_read():
    assert "scott_jax.methods.mim_jepa" in GRAPH["scott_jax.methods"]
    assert "scott_jax.optim" in GRAPH["scott_jax.loop"]


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_no_private_names_imported_across_modules():
    bad = [
        f"{name} imports {target}.{imported}"
        for name in MODULES
        for target, imported in imports(name)
        if imported.startswith("_")
    ]
    assert not bad


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("scott_jax.models", ("scott_jax.methods", "scott_jax.loop", "scott_jax.evaluators")),
        ("scott_jax.data", ("scott_jax.methods", "scott_jax.loop", "scott_jax.evaluators")),
        ("scott_jax.evaluators", ("scott_jax.loop",)),
        ("scott_jax.feature_stats", ("scott_jax.methods", "scott_jax.loop")),
        ("scott_jax.visualize", ("scott_jax.methods", "scott_jax.loop")),
    ],
)
def test_layers_import_downwards(layer, forbidden):
    bad = [
        f"{name} -> {target}"
        for name in MODULES
        if name == layer or name.startswith(layer + ".")
        for target in GRAPH[name]
        if target.startswith(forbidden)
    ]
    assert not bad


def test_methods_do_not_import_each_other():
    methods = {n for n in MODULES if n.startswith("scott_jax.methods.")} - {
        "scott_jax.methods.base"
    }
    bad = [f"{m} -> {t}" for m in methods for t in GRAPH[m] if t in methods]
    assert not bad


def reads_method_field(node: ast.AST) -> bool:
    """`x.method`, `x["method"]` or `x.get("method", ...)`."""
    if isinstance(node, ast.Attribute) and node.attr == "method":
        return True
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value == "method"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        first = node.args[0] if node.args else None
        return (
            node.func.attr == "get" and isinstance(first, ast.Constant) and first.value == "method"
        )
    return False


def test_one_place_reads_the_run_configs_method():
    readers = sorted(
        name for name, tree in TREES.items() if any(map(reads_method_field, ast.walk(tree)))
    )
    assert readers == ["scott_jax.methods"]
