"""The shape of the package: imports flow one way (no cycles), nothing imports the CLI, files stay short.

Imports are read with `ast`, lazy imports inside functions included, so a cycle cannot hide in a
function body.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "eptkit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The eptkit modules `name` imports (a name imported from a package counts as its submodule
    when one exists: `from . import version` is eptkit.version)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    done, stack = set(), []

    def visit(name):
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        stack.append(name)
        for dependency in sorted(GRAPH[name]):
            visit(dependency)
        stack.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_nothing_imports_the_cli():
    importers = sorted(name for name, deps in GRAPH.items() if "eptkit.cli" in deps)
    assert importers == []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        deps = _imports("benchmarks." + script.stem, script) | {
            n.module for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        assert "eptkit.cli" not in deps, script


def test_no_library_module_imports_the_package_root():
    # The root re-exports the public API; a module that imports it depends on everything. The demo
    # is a script that uses the public API as users do.
    importers = sorted(name for name, deps in GRAPH.items() if "eptkit" in deps)
    assert importers == ["eptkit.demo"]


def test_modules_and_classes_stay_short():
    for name, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        assert len(source.splitlines()) <= 500, name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 260, f"{name}.{node.name}"
