"""`weakclip` stays a pure model library: no Ray, no object storage, no printing."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import weakclip

FORBIDDEN = ("ray", "fsspec", "s3fs", "pipelines", "jobs", "boto3", "botocore")
PACKAGE_DIR = Path(weakclip.__file__).parent


def _module_names() -> list[str]:
    return sorted(f"weakclip.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_every_module_imports_without_forbidden_packages() -> None:
    modules = _module_names()
    assert {"weakclip.config", "weakclip.build", "weakclip.prompt"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_source_has_no_print_and_no_forbidden_import() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"{path.name}:{node.lineno} calls print()"
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots.isdisjoint(FORBIDDEN), f"{path.name}:{node.lineno} imports {roots}"


def test_only_the_builder_opens_files() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "build.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"{path.name}:{node.lineno} opens a file"
