"""The package's shape, as the README's architecture section states it.

- the product's layers only import downwards: ``silent_kernels`` (the kernels and the ops)
  never imports ``python_api`` (the trainer, the CLI, the reproduction) or ``bench``;
- no import cycle among the product's Python modules (function-level imports included);
- no module imports another module's private (``_name``) attributes, the compiled
  extension ``silent_kernels._C`` excepted;
- no source file of the product over 500 lines.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("silent_kernels", "python_api")
MAX_LINES = 500
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _absolute(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base.pop()
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, pathlib.Path]):
    """(importer, imported module, private name or None) for every import of the product."""
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES + ("bench",):
                        yield module, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, path, node)
                if target.split(".")[0] not in PACKAGES + ("bench",):
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        yield module, submodule, None
                    else:
                        private = alias.name.startswith("_") and not alias.name.startswith("__")
                        yield module, target, alias.name if private else None


MODULES = _modules()
IMPORTS = list(_imports(MODULES))


def test_the_module_scan_sees_the_package():
    assert "silent_kernels.functional" in MODULES and "python_api.reproduce.report" in MODULES
    assert any(importer == "python_api.cli" for importer, _, _ in IMPORTS)


def test_kernels_layer_never_imports_the_layers_above():
    upward = sorted({(importer, imported) for importer, imported, _ in IMPORTS
                     if importer.startswith("silent_kernels")
                     and imported.split(".")[0] in ("python_api", "bench")})
    assert not upward, f"silent_kernels imports a higher layer: {upward}"


def test_no_import_cycle():
    graph = {module: set() for module in MODULES}
    for importer, imported, _ in IMPORTS:
        if imported in MODULES and imported != importer:
            graph[importer].add(imported)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_no_private_names_imported_across_modules():
    private = sorted({(importer, f"{imported}.{name}") for importer, imported, name in IMPORTS
                      if name is not None and f"{imported}.{name}" != "silent_kernels._C"})
    assert not private, f"private names imported from another module: {private}"


def test_no_product_source_file_over_the_line_limit():
    sources = [p for package in PACKAGES + ("csrc",) for p in (ROOT / package).rglob("*")
               if p.suffix in SOURCE_SUFFIXES]
    assert len(sources) > 50
    long = sorted((str(p.relative_to(ROOT)), n) for p in sources
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, f"source files over {MAX_LINES} lines: {long}"
