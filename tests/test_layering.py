"""Dependencies point one way (DESIGN.md §1): walk every module's imports with ast."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "immunekit"

# layer -> immunekit layers it may import (shared utility modules are always allowed)
ALLOWED = {
    "spectral": set(),
    "metrics": {"spectral"},
    "models": set(),
    "data": set(),
    "attacks": {"spectral", "metrics", "models", "data"},
    "defenses": {"spectral", "metrics", "models", "data", "attacks"},
    "experiments": {"spectral", "metrics", "models", "data", "attacks", "defenses", "reports"},
    "reports": set(),
    "cli": {"experiments", "reports", "attacks", "data", "defenses", "metrics"},
}
SHARED = {"errors", "registry", "config", "_typing", "_atomic", "_versions", "assets", "_dist"}
#: Standard-library-only utilities that even ``reports`` (JSON in, files out) may import.
STDLIB_ONLY = {"_atomic", "_versions"}


def imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "immunekit" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_no_upward_imports() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in (SRC / layer).rglob("*.py"):
            for dep in imported_layers(path) - allowed - SHARED - {layer}:
                bad.append(f"{path.relative_to(SRC)} imports immunekit.{dep}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_reports_import_no_immunekit_layer_at_all() -> None:
    for path in (SRC / "reports").rglob("*.py"):
        assert imported_layers(path) <= {"reports", *STDLIB_ONLY}, path
