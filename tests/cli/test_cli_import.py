"""``immunekit --import MODULE``: a user module's registry entries exist before the command runs."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from _cli_helpers import assert_one_line_error, digest, write_tiny
from immunekit.cli.main import leading_imports
from immunekit.data import TASKS
from immunekit.defenses import DEFENSES
from immunekit.experiments import sweep

DEFENSE_MODULE = """
    import copy

    from immunekit.defenses import DEFENSES
    from immunekit.defenses.identity import Identity


    @DEFENSES.register("{name}")
    class Copycat(Identity):
        name = "{name}"

        def fit(self, model, task, *, seed):
            immunized = super().fit(model, task, seed=seed)
            self.info_ = {{"note": "registered by --import"}}
            return immunized
"""

TASK_MODULE = """
    from immunekit.data import TASKS
    from immunekit.data.synthetic import gaussian_spectra


    @TASKS.register("{name}")
    def tiny(seed=0):
        return gaussian_spectra(dim=4, n=32, seed=seed)
"""


@pytest.fixture
def user_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for the test's modules; registries and worker imports restored afterwards."""
    folder = tmp_path / "usermods"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    for registry in (DEFENSES, TASKS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
        monkeypatch.setattr(registry, "_meta", dict(registry._meta))
    monkeypatch.setattr(sweep, "_WORKER_IMPORTS", [])
    return folder


def _module(folder: Path, text: str, **names: str) -> str:
    module = f"usermod_{uuid.uuid4().hex[:10]}"
    (folder / f"{module}.py").write_text(textwrap.dedent(text.format(**names)))
    return module


@pytest.mark.parametrize(
    "case", ["defense-ls", "task-ls", "defense-run", "defense-pool", "missing", "raises", "syntax", "empty"]
)
def test_import_option_registers_before_the_command(
    cli, user_modules: Path, results_dir: Path, tmp_path: Path, case: str
) -> None:
    name = f"custom_{uuid.uuid4().hex[:8]}"
    if case in ("defense-ls", "defense-run", "defense-pool"):
        module = _module(user_modules, DEFENSE_MODULE, name=name)
    elif case == "task-ls":
        module = _module(user_modules, TASK_MODULE, name=name)
    elif case == "missing":
        module = "no_such_module_xyz.models"
    elif case == "raises":
        module = _module(user_modules, "raise RuntimeError('registry offline\\nsecond line')\n")
    elif case == "syntax":
        module = _module(user_modules, "def broken(:\n")
    else:
        module = ""

    if case in ("defense-ls", "task-ls"):
        kind = "defenses" if case == "defense-ls" else "tasks"
        code, out, err = cli("--import", module, "ls", kind)
        assert code == 0, err
        assert f"  {name}" in out.splitlines()
        assert sweep.worker_imports() == []  # workers import it during the command only (defense-pool)
        return
    if case in ("defense-run", "defense-pool"):  # in this process, or in 2 spawned workers
        out_dir = tmp_path / "custom-run"
        config = write_tiny(tmp_path, methods=["identity", name])
        code, out, err = cli(
            "-v", f"--import={module}", "run", "synthetic", "--config", config, "--out", out_dir,
            "--workers", "1" if case == "defense-run" else "2", "--no-progress", "--no-report",
        )  # fmt: skip
        assert code == 0, err
        results = json.loads((out_dir / "results.json").read_text())
        assert results["methods"][name]["defense_info"]["note"] == "registered by --import"
        return
    before = digest(results_dir)
    code, out, err = cli("--import", module, "report", results_dir)
    needles = {
        "missing": ["--import no_such_module_xyz.models", "ModuleNotFoundError", "sys.path"],
        "raises": [f"--import {module}", "RuntimeError: registry offline second line"],
        "syntax": [f"--import {module}", "SyntaxError"],
        "empty": ["--import needs a module name"],
    }[case]
    assert_one_line_error(code, out, err, *needles)
    assert digest(results_dir) == before


def test_only_imports_before_the_command_are_read_early() -> None:
    assert leading_imports(["--import", "a", "-v", "--import=b", "run", "x", "--import", "c"]) == ["a", "b"]
    assert leading_imports(["run", "--import", "a"]) == []
    assert leading_imports(["--import"]) == []
