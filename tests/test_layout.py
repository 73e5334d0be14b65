"""The package's shape: no import cycles, stages import only the stages below them, no module
reaches into a sibling's private names, and modules stay small enough to read."""

import ast
from pathlib import Path

import sae_jax

PACKAGE = Path(sae_jax.__file__).parent
STAGES = ["saes", "data", "lm", "training", "analysis", "planning", "release"]
"""Pipeline stages, lowest first: each may import only itself and the stages before it (the
top-level modules are the shared foundation and the entry points)."""
MAX_LINES = 460
LARGER = {"sae_jax.planning.cost": 520}
"""One concept each: the cost model's formulas, accelerator table and report."""


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(tree: ast.Module, name: str) -> list[tuple[str, list[str]]]:
    """`(module, imported names)` for every `sae_jax` import anywhere in the module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("sae_jax"):
                found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("sae_jax")]
    return found


def resolve(module: str, names: list[str], known: set[str]) -> set[str]:
    """The sae_jax modules an import statement loads: `from pkg import mod` names a module."""
    targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in known}
    return targets or ({module} if module in known else set())


def test_no_import_cycles():
    mods = modules()
    graph = {name: set().union(*[resolve(m, ns, set(mods)) for m, ns in imports(tree, name)])
             - {name} for name, tree in mods.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_stages_import_only_the_stages_below():
    def stage(module: str) -> int | None:
        parts = module.split(".")
        return STAGES.index(parts[1]) if len(parts) > 2 and parts[1] in STAGES else None

    wrong = []
    for name, tree in modules().items():
        own = stage(name) if name.count(".") >= 2 else None
        for module, _ in imports(tree, name):
            other = stage(module + ".x") if module.count(".") == 1 else stage(module)
            if own is not None and other is not None and other > own:
                wrong.append(f"{name} imports {module}")
    assert not wrong, wrong


def test_no_module_imports_a_siblings_private_name():
    wrong = [f"{name}: from {module} import {n}"
             for name, tree in modules().items() for module, names in imports(tree, name)
             for n in names if n.startswith("_") and module != name]
    assert not wrong, wrong


def test_modules_stay_small():
    big = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        lines = len(path.read_text().splitlines())
        if lines > LARGER.get(name, MAX_LINES):
            big[name] = lines
    assert not big, big
