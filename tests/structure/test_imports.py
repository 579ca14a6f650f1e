"""The package's layering, read from the source: which parts may import which, no cycles,
and a ``maskrcnn`` command that loads no torch before it knows its subcommand."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "maskrcnn"
# The core never reaches up into the parts built on it.
CORE = ("maskrcnn.model", "maskrcnn.data", "maskrcnn.engine", "maskrcnn.structures",
        "maskrcnn.config")
UPPER = ("maskrcnn.inference", "maskrcnn.export", "maskrcnn.cli", "maskrcnn.bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path) -> Iterator[str]:
    """The maskrcnn modules ``path`` imports, at its top or inside functions (``from a.b
    import c`` counts as ``a.b`` and, when ``a.b.c`` is a module, as that too); imports under
    ``if TYPE_CHECKING`` never run and are left out."""
    tree = ast.parse(path.read_text(), str(path))

    def visit(nodes: list[ast.stmt]) -> Iterator[str]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names if a.name.startswith("maskrcnn"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("maskrcnn"):
                assert node.module is not None
                yield node.module
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if (SRC / sub.replace(".", "/")).with_suffix(".py").exists():
                        yield sub
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from visit([c for c in children if isinstance(c, ast.stmt)] + [
                        s for h in children if isinstance(h, ast.ExceptHandler) for s in h.body
                    ])

    yield from visit(tree.body)


def graph() -> dict[str, set[str]]:
    """Module → the maskrcnn modules it imports."""
    return {module_name(p): set(imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, parts: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parts)


def test_core_never_imports_inference_export_or_cli() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph().items()
        if _within(module, CORE)
        for target in targets
        if _within(target, UPPER)
    ]
    assert wrong == []


def test_no_import_cycles() -> None:
    """Counting every import, lazy ones included: a cycle broken only by a function-level
    import is still a cycle of responsibilities."""
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target == node or (SRC / target.replace(".", "/")).is_dir():
                continue  # a package's __init__ only re-exports its modules
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_help_loads_no_torch() -> None:
    code = (
        "import sys, maskrcnn, maskrcnn.cli.main as m\n"
        "m.build_parser().format_help()\n"
        "print(sorted(k for k in ('torch', 'numpy', 'PIL', 'yaml') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name", ["LossWeights", "MaskRCNN", "ModelConfig", "Predictor", "TTAConfig"]
)
def test_public_names_import_from_the_package(name: str) -> None:
    import maskrcnn

    assert getattr(maskrcnn, name).__name__ == name
    assert name in maskrcnn.__all__


def test_no_module_left_flat_beside_the_packages() -> None:
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "bench.py", "config.py"]
