"""The package layout: stages import only from earlier stages, no cycles, small modules, a light import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "onnxsnpe"
STAGES = ["errors", "graph", "data", "stats", "encode", "optimize", "simulate", "report",
          "export", "stages", "precision", "recipe", "api", "compare", "cli"]
"""Each top-level module or subpackage, in pipeline order; a module may import only from its own
stage or earlier ones (the package's ``__init__`` and ``__version__`` are open to all)."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every onnxsnpe module ``path`` imports, at any depth (function-level and TYPE_CHECKING included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "onnxsnpe":
                continue
            for alias in node.names:  # "from . import export" names a module
                candidate = f"{target}.{alias.name}"
                exists = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                found.add(candidate if exists else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "onnxsnpe"}
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; the package itself (its lazy facade and __version__) left out."""
    return {_module_name(p): _imports(p) - {"onnxsnpe"} for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}


def test_every_module_belongs_to_a_stage():
    assert {m.split(".")[1] for m in _graph() if "." in m} <= set(STAGES)


def test_stages_import_only_from_earlier_stages():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _stage(module) is not None and _stage(target) is not None and _stage(target) > _stage(module)
    ]
    assert not upward


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, " -> ".join([*trail, module, target])
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > 500}
    assert not long


def test_importing_the_package_and_the_command_loads_nothing_heavy():
    heavy = ["numba", "matplotlib", "onnxruntime_qnn"]
    code = (
        "import sys, onnxsnpe, onnxsnpe.cli\n"
        "from onnxsnpe import ImageOptions, OnnxSnpeError\n"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


def test_public_api_names():
    import onnxsnpe

    for name in ("quantize", "compare", "ImageOptions", "OnnxSnpeError", "QuantizeResult", "CompareResult"):
        assert getattr(onnxsnpe, name) is not None
