"""The house's import rule (DESIGN.md, "Layout"): imports go down only. The commands on top, the
engine under them, the model at the bottom; nothing imports `cli.py` or `commands/` but
`__main__` (and `cli.py` the commands); a module used by two commands lives below both.

Read from the source with `ast`, module-level and function-local imports alike (a lazy import
that keeps torch out of a quick command is still an import), so a function-local import that
reaches up fails here as a module-level one would."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "live2diff_engine"

# The package's top-level modules and packages, top first. An import from one to another must go
# to a later layer; within one package the modules import each other freely, but in no circle.
LAYERS = [
    ["__main__"],
    ["cli"],
    ["commands"],
    ["bench", "remote", "saved_settings"],
    ["assemble"],
    ["engine", "control", "reference", "quality"],
    ["options"],
    ["styles"],
    ["pipeline", "io"],
    ["models"],
    ["depth"],
    ["config", "threads", "installer"],
    ["errors", "__init__"],
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of the package, anywhere in the file."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "live2diff_engine":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                target = target if target in known else base  # `from .pkg import module` or `from .module import name`
                if target in known:
                    found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name in known]
    return [(line, target) for line, target in found if target != name]


def graph() -> dict[str, list[tuple[int, str]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_of_the_package_has_a_layer():
    assert sorted({unit(m) for m in modules()} - set(RANK)) == [], "place the new module or package in LAYERS"


def test_imports_go_down_only():
    wrong = []
    for name, targets in graph().items():
        for line, target in targets:
            a, b = unit(name), unit(target)
            if a == b:
                if a == "commands" and name != target and target != "live2diff_engine.commands":
                    wrong.append(f"{name}:{line} imports {target}: a command never imports another (what both use goes below)")
                continue
            if RANK[b] <= RANK[a]:
                wrong.append(f"{name}:{line} imports {target}, which is not below it")
    assert wrong == [], "\n".join(wrong)


def test_nothing_imports_the_command_line_or_the_commands():
    allowed = {("live2diff_engine.__main__", "live2diff_engine.cli")}
    wrong = [f"{name}:{line} imports {target}"
             for name, targets in graph().items() for line, target in targets
             if unit(target) in ("cli", "commands") and unit(name) not in ("cli", "commands") and (name, target) not in allowed]
    assert wrong == [], "\n".join(wrong)


def test_no_import_circle():
    edges = {name: sorted({t for _, t in targets}) for name, targets in graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                circles.append(sorted(members))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_rule_is_read_from_function_local_imports_too(tmp_path):
    """A lazy import is an import: one that reaches up inside a function is found."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from ..cli import main\n    from ...elsewhere import y\n    import torch\n")
    known = {"live2diff_engine.models.x": path, "live2diff_engine.cli": tmp_path}
    assert imports("live2diff_engine.models.x", path, known) == [(2, "live2diff_engine.cli")]


def test_ray_is_imported_by_the_fleet_only_and_the_fleet_by_serve_ray_only():
    """Ray is an optional extra (`[fleet]`): remote/fleet.py is the one module that imports it, and
    only `serve --ray` imports that module, inside the function that runs it, so no other command
    (nor `serve` without --ray) ever loads Ray."""
    wrong = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "ray" or n.startswith("ray.") for n in names) and name != "live2diff_engine.remote.fleet":
                wrong.append(f"{name}:{node.lineno} imports Ray")
        for line, target in imports(name, path, modules()):
            if target == "live2diff_engine.remote.fleet" and name != "live2diff_engine.commands.serve":
                wrong.append(f"{name}:{line} imports remote.fleet")
        if name == "live2diff_engine.commands.serve":
            top = {t for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for t in
                   [f"{n.module}" if isinstance(n, ast.ImportFrom) else ""]}
            assert not any("fleet" in t for t in top), "commands/serve.py imports the fleet at module level"
    assert wrong == [], "\n".join(wrong)
