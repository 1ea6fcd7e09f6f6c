"""The layers of docs/architecture.md, checked on every import in the package (module level and
inside functions): nothing imports a layer above its own, siblings of one level stay apart,
and no two modules import each other, directly or around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "poft_mlx"
# Bottom to top; one level may hold several sibling layers that do not import each other.
LEVELS = [("errors", "_version"), ("config", "rundir"), ("runtime",), ("data",), ("models",), ("scoring",), ("training",),
          ("evaluation", "export"), ("recipes", "api"), ("cli",), ("__main__",)]
LEVEL = {layer: i for i, names in enumerate(LEVELS) for layer in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["poft_mlx", *parts])


def imports(path: Path) -> set[str]:
    """The poft_mlx modules `path` imports (relative imports resolved), anywhere in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("poft_mlx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("poft_mlx"):
                continue
            # `from pkg import mod` names a module when pkg/mod.py exists
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if _exists(sub) else target)
    out.discard(me)
    return out


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_nothing_imports_a_layer_above_its_own():
    upward = []
    for mod, targets in GRAPH.items():
        mine = layer(mod)
        if mine is None:
            continue  # poft_mlx/__init__ loads runtime.blas / runtime.malloc before anything else
        for t in targets:
            theirs = layer(t)
            if theirs is None or theirs == mine:
                continue
            if LEVEL[theirs] > LEVEL[mine] or (LEVEL[theirs] == LEVEL[mine]):
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that point up (or across siblings):\n  " + "\n  ".join(sorted(upward))


def test_every_module_is_in_a_known_layer():
    assert {layer(m) for m in GRAPH} - {None} <= set(LEVEL)


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for t in sorted(GRAPH.get(node, ())):
            if t not in GRAPH:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[node] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks above can fail: an import of cli from data is seen as one."""
    f = tmp_path / "poft_mlx" / "data" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text("def f():\n    from ..cli.main import main\n")
    global PKG
    saved, PKG = PKG, tmp_path / "poft_mlx"
    try:
        assert imports(f) == {"poft_mlx.cli.main"}
    finally:
        PKG = saved
    assert LEVEL[layer("poft_mlx.cli.main")] > LEVEL[layer("poft_mlx.data.x")]
