"""The package is a one-way stack: no module imports from a layer above its own, and no import cycle exists,
at module level, hidden in a function or under ``if TYPE_CHECKING`` (a type-only back edge is still a back edge).
Checked on the source with ``ast``, then by importing every module first in a fresh interpreter."""

import ast
import graphlib
import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import asqpost

PACKAGE = Path(asqpost.__file__).parent

# bottom to top; a module may import from its own layer or any layer below
LAYERS = (
    (
        "asqpost.version",
        "asqpost.files",
        "asqpost.cpp",
        "asqpost.timing",
        "asqpost.devices",
        "asqpost.registry",
        "asqpost.levels",
        "asqpost.functional",
        "asqpost.batches",
        "asqpost.masking",
        "asqpost.rotation",
    ),
    ("asqpost.adapters",),
    ("asqpost.config",),
    ("asqpost.quantizers",),
    ("asqpost.nn",),
    ("asqpost.policy",),
    ("asqpost.convert",),
    ("asqpost.models", "asqpost.data", "asqpost.size", "asqpost.runconfig", "asqpost.beta_report", "asqpost.text"),
    ("asqpost.packed",),
    ("asqpost.kernels",),
    ("asqpost.export",),
    ("asqpost.train",),
    ("asqpost.compare",),
    ("asqpost.demo",),
    ("asqpost.cli",),
    ("asqpost",),  # the public API re-exports: nothing inside the package imports from it
)
LAZY_IMPORTS_ALLOWED = {"asqpost.cli"}  # the CLI defers heavy subcommand imports for start-up speed


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, names in enumerate(LAYERS)
        for prefix in names
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(matches)[1]


def _imports(module: str) -> list[tuple[str, int, bool]]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_of(module, package, path.read_text())


def _imports_of(module: str, package: str, source: str) -> list[tuple[str, int, bool]]:
    """``(imported asqpost module, line, inside a function)`` for every import, ``if TYPE_CHECKING`` ones too."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, in_function) for a in node.names if a.name.startswith("asqpost"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("asqpost"):
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.append((target if target in MODULES else base, node.lineno, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source, module), False)
    return found


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above(module):
    upward = [
        f"{module}:{line} imports {target} (layer {_layer(target)} > {_layer(module)})"
        for target, line, _ in _imports(module)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def _check_no_cycle(imports: dict[str, list[str]]) -> None:
    """Raise ``graphlib.CycleError`` (naming the cycle) if the modules' imports form one."""
    graph: dict[str, set[str]] = {module: set() for module in imports}
    for module, targets in imports.items():
        for target in targets:
            graph[module].add(target)
            # importing asqpost.a.b from outside asqpost.a runs asqpost/a/__init__.py first
            parent = target.rpartition(".")[0]
            if parent != "asqpost" and parent in MODULES and not module.startswith(parent):
                graph[module].add(parent)
        graph[module].discard(module)
    graphlib.TopologicalSorter(graph).prepare()


def test_no_import_cycle_even_through_function_level_or_type_only_imports():
    _check_no_cycle({module: [target for target, _, _ in _imports(module)] for module in MODULES})


def test_function_level_imports_only_where_allowed():
    lazy = {
        f"{module}:{line} {target}"
        for module in MODULES
        if module not in LAZY_IMPORTS_ALLOWED
        for target, line, in_function in _imports(module)
        if in_function
    }
    assert not lazy, f"function-level imports inside the package (import at module level): {sorted(lazy)}"


def test_the_import_reader_sees_every_kind_of_import():
    source = (
        "from typing import TYPE_CHECKING\nfrom .train.run import fit\nimport asqpost.cli\n"
        "if TYPE_CHECKING:\n    from .export.modules import PackedLayer\n"
        "def f():\n    from . import compare\n    from .levels import SQRT1_2\n"
    )
    found = [(target, lazy) for target, _, lazy in _imports_of("asqpost.size", "asqpost", source)]
    assert found == [
        ("asqpost.train.run", False),
        ("asqpost.cli", False),
        ("asqpost.export.modules", False),
        ("asqpost.compare", True),
        ("asqpost.levels", True),
    ]
    assert _layer("asqpost.train.run") > _layer("asqpost.size")


def test_a_type_only_back_edge_is_an_upward_import():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..export.modules import PackedLayer\n"
    found = _imports_of("asqpost.kernels.native", "asqpost.kernels", source)
    assert found == [("asqpost.export.modules", 3, False)]
    assert _layer("asqpost.export.modules") > _layer("asqpost.kernels.native")


def test_the_cycle_check_fails_on_a_type_only_cycle():
    back_edge = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..export.modules import PackedLayer\n"
    found = _imports_of("asqpost.kernels.native", "asqpost.kernels", back_edge)
    imports = {
        "asqpost.kernels.native": [target for target, _, _ in found],
        "asqpost.export.modules": ["asqpost.kernels.native"],
    }
    with pytest.raises(graphlib.CycleError):
        _check_no_cycle(imports)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module as the first asqpost import: a cycle would fail here whatever the import order."""
    script = (
        "import importlib, json, sys\nimport torch\nfailed = {}\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'asqpost' or m.startswith('asqpost.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as err:\n        failed[name] = repr(err)\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(result.stdout.splitlines()[-1]) == {}


def test_import_asqpost_quantizers_gives_the_subpackage():
    import asqpost.quantizers

    assert isinstance(asqpost.quantizers, types.ModuleType)
    assert asqpost.quantizers.__name__ == "asqpost.quantizers"


def test_one_version_string_from_the_installed_metadata():
    assert asqpost.__version__ == importlib.metadata.version("asq-post")
    written = [
        f"{module}:{node.lineno}"
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    ]
    assert not written, f"__version__ written as a literal in {written}; pyproject.toml is the only place"
