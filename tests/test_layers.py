"""The package's layers: imports go only downward, and no two modules import each other in a circle.

Every ``import`` in every module is read, including those inside functions and under
``TYPE_CHECKING``: a lazy import is a dependency too, only a hidden one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "pyro_ldvae"
# Lower layers first; a module may import from its own layer and the layers before it.
LAYERS = {"kernels": 0, "data": 1, "models": 2, "infer": 3, "tasks": 3, "api": 4}
# infer and tasks share a level but stay independent of each other.
SIBLINGS_APART = {("infer", "tasks"), ("tasks", "infer")}
ABOVE_LAYERS = {"pyro_ldvae", "pyro_ldvae.__main__"}  # the public names and ``python -m pyro_ldvae``
VERSION = "pyro_ldvae._version"  # a leaf that imports nothing; every layer may read it


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Package modules that ``path`` imports (``from . import x`` resolves to the submodule ``x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyro_ldvae"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pyro_ldvae"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py"
                ).exists()
                found.add(candidate if is_module else target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    top_level = {m for m in graph() if layer(m) is None} - ABOVE_LAYERS - {VERSION}
    assert not top_level, f"modules outside the layers {sorted(LAYERS)}: {sorted(top_level)}"


def test_imports_only_go_downward():
    upward = []
    for module, targets in graph().items():
        src = layer(module)
        if src is None:
            continue  # the package root and __main__ sit above every layer
        for target in targets:
            dst = layer(target)
            if target == VERSION:
                continue
            if dst is None or (src, dst) in SIBLINGS_APART or LAYERS[dst] > LAYERS[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt.rpartition(".")[0] == node or nxt not in edges:
                continue  # a package importing its own submodule, or not a module of ours
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path):
    assert len(path.read_text().splitlines()) <= 500, f"{path.name} is over 500 lines: split it by job"


def test_the_walker_sees_an_upward_import_inside_a_function(tmp_path):
    bad = PACKAGE / "kernels" / "_layers_probe.py"
    bad.write_text("def f():\n    from ..api import linear_scvi\n")
    try:
        assert "pyro_ldvae.api.linear_scvi" in imported_modules(bad)
        with pytest.raises(AssertionError, match="kernels._layers_probe -> pyro_ldvae.api.linear_scvi"):
            test_imports_only_go_downward()
    finally:
        bad.unlink()
