"""The layering of docs/architecture.md, checked on the source: which
module may import which."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names, relative ones resolved),
    under ``if TYPE_CHECKING`` too: a type-only import is a dependency of
    the design all the same."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def sources(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in ROOT.glob(pattern))


ENGINES = ["balancekit/_engine_async.py", "balancekit/_engine_sync.py", "balancekit/_websocket.py"]
CORE = [
    "balancekit/_backend.py",
    "balancekit/_pool.py",
    "balancekit/_decision.py",
    "balancekit/_engine_core.py",
    "balancekit/_classify.py",
]
ABOVE_THE_MODEL = {"balancekit._balancer", "balancekit.asgi", "balancekit.wsgi", "balancekit.cli"}


@pytest.mark.parametrize("path", sources(*ENGINES, *CORE, "balancekit/_transports/*.py"))
def test_engines_core_and_transports_never_import_the_balancer_or_an_adapter(path: Path) -> None:
    assert not imported(path) & ABOVE_THE_MODEL


@pytest.mark.parametrize("path", sources("balancekit/_transports/*.py"))
def test_transports_never_import_an_engine(path: Path) -> None:
    engines = {"balancekit." + Path(e).stem for e in ENGINES}
    assert not imported(path) & engines


@pytest.mark.parametrize("path", sources("balancekit_django/**/*.py", "balancekit_flask/*.py"))
def test_framework_adapters_import_only_public_modules(path: Path) -> None:
    private = sorted(
        name
        for name in imported(path)
        if name.startswith("balancekit.") and any(p.startswith("_") for p in name.split(".")[1:2])
    )
    assert not private, f"{path.relative_to(ROOT)} imports private modules: {private}"


def test_the_checker_sees_relative_and_type_only_imports() -> None:
    # The rules above are only as good as imported(): it must resolve
    # "from .._balancer import X" and look inside TYPE_CHECKING blocks.
    names = imported(ROOT / "balancekit/_transports/httptools.py")
    assert "balancekit._exceptions" in names and "balancekit._backend" in names
    assert "balancekit._balancer" in imported(ROOT / "balancekit/status/__init__.py")
