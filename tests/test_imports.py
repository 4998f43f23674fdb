"""The package's module layering: no module imports one that imports it back (counting imports inside
functions too), so each module can be read, and imported, on its own. A package's ``__init__`` that
re-exports its own submodules is the one allowed exception."""

import ast
from pathlib import Path

import zo_scale

PACKAGE = Path(zo_scale.__file__).parent


def module_imports() -> dict[str, set[str]]:
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}  # from pkg import submodule
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_two_modules_import_each_other():
    graph = module_imports()
    cycles = sorted(
        (a, b) for a in graph for b in graph[a]
        if a < b and a in graph[b] and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert not cycles, f"modules that import each other: {cycles}"
