"""edge/'s sub-packages follow the data's way: imports only point back along it, and never in a circle."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EDGE = REPO / "edge"
# Along the data's way: a module may import from its own place or an earlier one, never a later one.
# config is first: every stage's shell reads its settings, so it imports no stage; cli is last.
ORDER = ("config", "capture", "vision", "counting", "reports", "links", "web", "service", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(EDGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["edge", *parts])


def edge_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(EDGE.rglob("*.py"))}


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The edge modules `path` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("hematovision.edge"):
                target = "edge" + node.module[len("hematovision.edge"):]
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
        elif isinstance(node, ast.Import):
            found.update("edge" + a.name[len("hematovision.edge"):] for a in node.names
                         if a.name.startswith("hematovision.edge"))
    return {m for m in found if m in modules and m != name}


def place(name: str) -> str:
    return name.split(".")[1] if "." in name else "edge"


def import_graph() -> dict[str, set[str]]:
    modules = edge_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_every_edge_module_has_a_place_along_the_data_way():
    unplaced = sorted(n for n in edge_modules() if place(n) not in ORDER and n != "edge")
    assert not unplaced, f"add their folder to ORDER (and to setup.cfg's packages): {unplaced}"


def test_edge_imports_point_back_along_the_data_way():
    backwards = [f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
                 if target != "edge" and ORDER.index(place(target)) > ORDER.index(place(name))]
    assert not backwards, backwards


def test_edge_modules_import_in_no_circle():
    graph, done, path = import_graph(), set(), []

    def visit(name: str) -> None:
        if name in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_every_edge_package_is_installed_with_its_data():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {"hematovision." + module_name(p.parent / "__init__.py") for p in EDGE.rglob("__init__.py")}
    assert packages <= listed, f"add to setup.cfg's packages: {sorted(packages - listed)}"
    data = config["options.package_data"]["hematovision.edge.reports"]
    assert "report_schema.json" in data and (EDGE / "reports" / "report_schema.json").is_file()
    web = config["options.package_data"]["hematovision.edge.web"].split()
    assert {"templates/*.html", "static/*"} <= set(web)
    assert list((EDGE / "web" / "templates").glob("*.html")) and list((EDGE / "web" / "static").glob("*.js"))
