"""The layout of `pipelines/` (docs/ARCHITECTURE.md): one package per stage, a stage never imports
another, the shared machinery imports no stage, and no module grows past 500 lines.

Imports are read from the source (`ast`), including those inside functions, so nothing is
imported to check them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
STAGES = ("ingest", "refine", "train", "pseudo_masks", "retrain", "evaluate", "synthetic")
CHAIN_DRIVER = "pipelines.pipeline"  # runs every stage, so it alone may import them all
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PIPELINES.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module the source of `module` imports, as absolute dotted names (`from a import b`
    yields `a.b` as well as `a`, since `b` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "pipelines" and parts[1] in STAGES:
        return parts[1]
    return None


def _modules() -> list[Path]:
    return sorted(PIPELINES.rglob("*.py"))


def _imports_of(path: Path) -> set[str]:
    return _imported_modules(
        path.read_text(), _module_name(path), is_package=path.name == "__init__.py"
    )


def test_every_stage_is_a_package() -> None:
    for stage in STAGES:
        assert (PIPELINES / stage / "__init__.py").is_file(), f"pipelines/{stage}/ is no package"


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "synthetic"])
def test_stage_package_exports_its_config_and_run_function(stage: str) -> None:
    """Imported at the top or on first use (a PEP 562 `__getattr__`), the names resolve."""
    package = importlib.import_module(f"pipelines.{stage}")
    exported = set(getattr(package, "__all__", ()))
    tree = ast.parse((PIPELINES / stage / "__init__.py").read_text())
    exported |= {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert f"run_{stage}" in exported
    assert callable(getattr(package, f"run_{stage}"))
    configs = [name for name in exported if name.endswith("Config")]
    assert configs and all(isinstance(getattr(package, n), type) for n in configs), exported


def test_no_stage_imports_another_stage() -> None:
    offences = []
    for path in _modules():
        own = _stage_of(_module_name(path))
        if own is None:
            continue
        for imported in sorted(_imports_of(path)):
            other = _stage_of(imported)
            if other is not None and other != own:
                offences.append(f"{path.relative_to(PIPELINES.parent)} imports {imported}")
    assert not offences, "a stage imports another stage:\n" + "\n".join(offences)


def test_shared_modules_import_no_stage() -> None:
    offences = []
    for path in _modules():
        module = _module_name(path)
        if _stage_of(module) is not None or module == CHAIN_DRIVER:
            continue
        for imported in sorted(_imports_of(path)):
            if _stage_of(imported) is not None:
                offences.append(f"{path.relative_to(PIPELINES.parent)} imports {imported}")
    assert not offences, "shared machinery imports a stage:\n" + "\n".join(offences)


def test_no_module_exceeds_the_line_budget() -> None:
    long = {
        str(path.relative_to(PIPELINES.parent)): n
        for path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"


def test_the_checker_sees_every_form_of_cross_stage_import() -> None:
    source = (
        "from pipelines import train\n"
        "from ..evaluate import stage\n"
        "from . import rows\n"
        "def f():\n"
        "    import pipelines.ingest.rows\n"
    )
    found = {_stage_of(m) for m in _imported_modules(source, "pipelines.refine.units")}
    assert found - {None} == {"train", "evaluate", "ingest", "refine"}
