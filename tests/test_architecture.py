"""The house rules, read from the code's own imports (issue 14).

Every `import` and `from … import` in kiln/, tasks/ and flows/ counts, wherever it is written: at the top
of a module, inside a function or under `if TYPE_CHECKING:`. Layers, lowest first (kiln's own
`__init__` is the floor: it only holds the version):

    model → host → store → sources → build → image → cloud → boot → publish → server → tasks → flows → cli

A module may import its own layer and the layers below it, never one above; there is no import circle;
no module is over 600 lines; Prefect is imported only by tasks/, flows/ and kiln/server/prefect.py (the
one module that starts Prefect's server); and no kiln module is imported inside a function (that is how
circles hide). The one exception: the command line (kiln.cli) imports flows/ where a command runs a
flow, since importing Prefect takes about a second that `kiln plan`, `kiln --help` or a usage error
should not pay. Those imports still point down (cli is the top floor), so they cannot close a circle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.e2e import REPO

LAYERS = ("model", "host", "store", "sources", "build", "image", "cloud", "boot", "publish", "server", "tasks",
          "flows", "cli")
PREFECT_FACING = ("tasks", "flows", "kiln.server.prefect")
MAX_LINES = 600
OURS = ("kiln", "tasks", "flows")


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for root in OURS:
        for path in sorted((REPO / root).rglob("*.py")):
            if {"helpers", "keys"} & set(path.relative_to(REPO).parts):
                continue
            found[module_name(path)] = path
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] in ("tasks", "flows"):
        return LAYERS.index(parts[0])
    if len(parts) == 1:
        return -1  # kiln/__init__.py: below everything
    return LAYERS.index(parts[1])


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([child.module] if child.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for target in targets:
                found.append(Import(name, target, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def graph() -> tuple[dict[str, Path], list[Import]]:
    known = modules()
    return known, [i for name, path in known.items() for i in imports_of(name, path, known)]


def ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def test_every_module_has_a_layer() -> None:
    known, _ = graph()
    for name in known:
        assert layer(name) is not None, name
    assert "kiln.cli.main" in known and "kiln.model.spec" in known  # the walk found the house


def test_imports_only_point_down() -> None:
    _, edges = graph()
    upward = [f"{i.importer}:{i.line} imports {i.imported} ({LAYERS[layer(i.imported)]} is above "
              f"{LAYERS[layer(i.importer)] if layer(i.importer) >= 0 else 'kiln'})"
              for i in edges if ours(i.imported) and layer(i.imported) > layer(i.importer)]
    assert upward == []


def test_no_import_circle() -> None:
    known, edges = graph()
    deps: dict[str, set[str]] = {name: set() for name in known}
    for i in edges:
        target = i.imported
        while target and target not in known:  # `from kiln.boot.qemu import boot_test` -> kiln.boot.qemu
            target = target.rpartition(".")[0]
        if target and target != i.importer and not (known[target].name == "__init__.py"
                                                   and i.importer.startswith(target + ".")):
            deps[i.importer].add(target)
    # Tarjan's strongly connected components: any with two or more modules is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in deps[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in deps:
        if v not in index:
            strong(v)
    assert circles == []


def test_no_module_over_600_lines() -> None:
    known, _ = graph()
    long = {name: n for name, path in known.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_prefect_only_in_the_prefect_facing_modules() -> None:
    _, edges = graph()
    stray = [f"{i.importer}:{i.line} imports {i.imported}" for i in edges
             if i.imported.split(".")[0] == "prefect" and not i.importer.startswith(PREFECT_FACING)]
    assert stray == []


def test_no_kiln_import_inside_a_function() -> None:
    _, edges = graph()
    hidden = [f"{i.importer}:{i.line} imports {i.imported}" for i in edges if i.in_function and ours(i.imported)
              and not (i.importer.startswith("kiln.cli.") and i.imported.split(".")[0] == "flows")]
    assert hidden == []


def test_the_walk_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The rules are not vacuous: an upward import, a function-level import and a Prefect import are seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("import prefect\nfrom kiln.cli import main\n\ndef f():\n    from kiln.boot import qemu\n")
    found = imports_of("kiln.model.bad", bad, modules())
    assert [(i.imported, i.in_function) for i in found] == [
        ("prefect", False), ("kiln.cli.main", False), ("kiln.boot.qemu", True)]
    assert layer("kiln.cli.main") > layer("kiln.model.bad")
