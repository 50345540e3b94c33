"""The package's shape: a module per concept, each named in docs/layout.md or the README's stage table, none
too long, no import cycle."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "selfalign"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
LONGEST = 420  # lines: "no module over ~400"; past it a concept is two concepts


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The selfalign modules a file imports, at the top or inside functions."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_the_docs_name_every_module():
    readme = "\n".join((REPO / name).read_text(encoding="utf-8") for name in ("README.md", "docs/layout.md"))
    tables = "\n".join(line for line in readme.splitlines() if line.startswith("|"))
    for path in MODULES:
        relative = path.relative_to(REPO).as_posix()
        folder = path.parent.relative_to(REPO).as_posix()
        # A row names the file by its path, or a package's row lists it by name after the first path.
        row = next((line for line in tables.splitlines() if relative in line or (
            f"`{folder}/" in line and re.search(rf"`{re.escape(path.name)}`", line))), None)
        assert row, f"neither the README's stage table nor docs/layout.md says where {relative} is"


def test_no_module_is_over_the_size_of_one_concept():
    long = {p.relative_to(REPO).as_posix(): n for p in MODULES if (n := len(p.read_text().splitlines())) > LONGEST}
    assert not long, f"split these: {long}"


def test_no_import_cycle():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    assert graph["selfalign.generation.contract"] == set()  # the contract imports nothing of ours
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for target in graph.get(name, ()):
            # A package's __init__ re-exporting its own modules is not a cycle of concepts.
            if target in path and not (target == name.rsplit(".", 1)[0]):
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in done and target not in path:
                visit(target, path + [target])
        done.add(name)

    for name in graph:
        visit(name, [name])
