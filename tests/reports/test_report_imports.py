"""The reports layer reads JSON only: no torch, no other immunekit layer."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import immunekit.reports

REPORTS_DIR = Path(immunekit.reports.__file__).parent
ALLOWED_THIRD_PARTY = {"matplotlib", "numpy"}
#: immunekit modules that import only the standard library (the one atomic writer).
STDLIB_ONLY = {"immunekit._atomic", "immunekit._versions"}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # relative imports stay inside immunekit.reports
            names.append("immunekit.reports" if node.level else node.module or "")
    return names


def allowed(name: str) -> bool:
    top = name.split(".")[0]
    if top == "immunekit":
        return name == "immunekit.reports" or name.startswith("immunekit.reports.") or name in STDLIB_ONLY
    return top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY


def test_reports_modules_import_only_allowed_packages() -> None:
    files = sorted(REPORTS_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "schema.py", "markdown.py", "plots.py", "write.py"}
    bad = {f"{f.name}: {name}" for f in files for name in imported_modules(f) if not allowed(name)}
    assert not bad, f"forbidden imports in immunekit.reports: {sorted(bad)}"


def test_import_walk_catches_forbidden_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom immunekit.metrics import rir\nfrom . import schema\nimport json\n")
    assert [allowed(n) for n in imported_modules(probe)] == [False, False, True, True]


def test_import_loads_no_torch_matplotlib_or_other_layers() -> None:
    code = (
        "import sys, immunekit\n"
        "before = set(sys.modules)\n"
        "import immunekit.reports\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(m for m in new if m.split('.')[0] in ('torch', 'matplotlib', 'pandas')\n"
        "             or (m.startswith('immunekit.') and not m.startswith('immunekit.reports')\n"
        "                 and m not in ('immunekit._atomic', 'immunekit._versions')))\n"
        "print(','.join(bad))\n"
    )
    path = os.pathsep.join([str(REPORTS_DIR.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "", f"import immunekit.reports loaded: {out.stdout.strip()}"
