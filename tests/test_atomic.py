"""The one atomic writer (immunekit._atomic): all-or-nothing, and files get the user's umask."""

from __future__ import annotations

import ast
import os
import stat
import sys
from pathlib import Path

import pytest

from immunekit import _atomic, _versions
from immunekit.experiments.io import atomic_write_json
from immunekit.models import linear_model
from immunekit.models.checkpoint import save_checkpoint
from immunekit.reports._common import atomic_write_text as report_write


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_uses_the_umask(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    files = [
        atomic_write_json(tmp_path / "results.json", {"a": 1.0}),
        _atomic.atomic_write_text(tmp_path / "x.txt", "x"),
        _atomic.atomic_write_bytes(tmp_path / "b.bin", b"\x00"),
    ]
    report_write(tmp_path / "report.md", "# r")
    save_checkpoint(linear_model(3), tmp_path / "m.safetensors")
    files += [tmp_path / "report.md", tmp_path / "m.safetensors"]
    assert [oct(_mode(f)) for f in files] == [oct(mode)] * len(files)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), _atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("module", [_atomic, _versions])
def test_the_modules_reports_may_import_use_only_the_standard_library(module) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(sys.stdlib_module_names) | {"__future__"}, mods
