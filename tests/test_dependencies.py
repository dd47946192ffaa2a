"""Every third-party package the code imports at module level is a declared main dependency."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN = {"scgpt", "data_modules", "conf"}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported by the module's own statements (not inside functions, try or if)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")
            for spec in project["dependencies"]}


def test_module_level_imports_are_declared_main_dependencies():
    distributions = packages_distributions()
    declared = _declared()
    missing = {}
    for path in sorted([*(ROOT / "scgpt").rglob("*.py"), *(ROOT / "data_modules").rglob("*.py")]):
        for name in _module_level_imports(path) - OWN - set(sys.stdlib_module_names) - {"__future__"}:
            dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
            if not dists & declared:
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
