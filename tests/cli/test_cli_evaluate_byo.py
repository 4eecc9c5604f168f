"""``immunekit evaluate`` with the user's own model class (``--import``) and own table (``--task csv:``)."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from immunekit.cli.main import main
from immunekit.models import MODELS, linear_model, save_checkpoint

USER_MODULE = '''
"""A user's model class, registered for checkpoints (what a researcher writes in their package)."""
import torch
from torch import nn

import immunekit as ik


@ik.register_model("user_tiny_mlp")
class TinyMLP(ik.ImmunizableModel):
    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.d_in, self.width = d_in, width
        self.extractor = nn.Sequential(nn.Linear(d_in, width, dtype=torch.float64), nn.Tanh())
        self.head = nn.Linear(width, 1, dtype=torch.float64)

    def checkpoint_config(self) -> dict:
        return {"d_in": self.d_in, "width": self.width}
'''


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _forget_user_module(items: dict, meta: dict) -> None:
    """Undo the user module's import and registration, as in a fresh ``immunekit`` process."""
    MODELS._items.clear()
    MODELS._items.update(items)
    MODELS._meta.clear()
    MODELS._meta.update(meta)
    sys.modules.pop("user_models_byo", None)


def test_a_user_registered_model_class_is_evaluated_from_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "user_models_byo.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    items, meta = dict(MODELS._items), dict(MODELS._meta)
    try:
        mod = importlib.import_module("user_models_byo")
        torch.manual_seed(0)
        task_meta = {"task": "gaussian_spectra", "task_config": {"dim": 5, "n": 64}}
        path = save_checkpoint(mod.TinyMLP(5, 6), tmp_path / "mine.safetensors", metadata=task_meta)
        ref = save_checkpoint(mod.TinyMLP(5, 6), tmp_path / "base.safetensors", metadata=task_meta)
        _forget_user_module(items, meta)
        cmd = ["evaluate", "--model", str(path), "--reference", str(ref), "--attacks", "full_finetune"]
        cmd += ["--budget", "steps=10", "--out", str(tmp_path / "eval"), "--no-progress", "--device", "cpu"]
        # a pool: the class must reach its workers too (they import the --import modules)
        cmd += ["--workers", "2"]
        code, _, err = _run(capsys, *cmd)  # without --import the class is unknown: say so
        assert code == 2 and "user_tiny_mlp" in err and err.count("\n") == 1
        assert not (tmp_path / "eval").exists()
        code, stdout, err = _run(capsys, "--import", "user_models_byo", *cmd)
        assert code == 0, err
        record = json.loads((tmp_path / "eval" / "results.json").read_text())
        assert "TinyMLP" in json.dumps(record["model"])
        assert record["verdict"]["verdict"] in stdout and (tmp_path / "eval" / "report.html").exists()
    finally:
        _forget_user_module(items, meta)


def test_an_unknown_model_class_names_the_fix(tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "--import", "no_such_module_xyz", "evaluate", "--model", "m.safetensors")
    assert code == 2 and "--import no_such_module_xyz" in err and err.count("\n") == 1


@pytest.fixture
def table(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 240
    df = pd.DataFrame({f"f{i}": rng.normal(size=n) for i in range(4)})
    df["group"] = rng.choice(["a", "b"], n)
    df["y"] = df.f0 - df.f1 + 0.1 * rng.normal(size=n)
    path = tmp_path / "mine.csv"
    df.to_csv(path, index=False)
    return path


def test_a_users_table_is_evaluated_from_the_cli(tmp_path: Path, table: Path, capsys) -> None:
    model = save_checkpoint(linear_model(4), tmp_path / "lin.safetensors")
    out = tmp_path / "eval"
    code, stdout, err = _run(
        capsys,
        "evaluate",
        "--model",
        str(model),
        "--task",
        f"csv:{table}",
        "--target",
        "y",
        "--harmful-where",
        "group == 'b'",
        "--attacks",
        "linear_probe",
        "--budget",
        "steps=20",
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
        "--workers",
        "1",
    )
    assert code == 0, err
    record = json.loads((out / "results.json").read_text())
    assert record["task"]["name"] == "csv" and record["task"]["loss"] == "mse"
    assert record["task"]["splits"]["val_harmful"] > 0 and "verdict:" in stdout


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--task", "csv:{table}", "--target", "y"], "needs --harmful-where"),
        (["--task", "csv:{table}", "--target", "z", "--harmful-where", "group == 'b'"], "is not a column"),
        (["--task", "gaussian_spectra", "--target", "y"], "--target apply to --task csv:PATH"),
        (["--task", "csv:{table}", "--target", "y", "--harmful-where", "grp == 'b'"], "cannot be evaluated"),
        (["--device", "cuda:7"], "--device 'cuda:7' is not available"),
        (["--device", "toaster"], "--device 'toaster' is not a torch device"),
        (["--out", "{blocker}/out"], "is a file, not a folder"),
    ],
)
def test_bad_input_is_refused_before_any_work(
    tmp_path: Path, table: Path, capsys, extra: list[str], match: str
) -> None:
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("x")
    model = save_checkpoint(
        linear_model(4),
        tmp_path / "lin.safetensors",
        metadata={"task": "gaussian_spectra", "task_config": {"dim": 4, "n": 64}},
    )
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "results.json").write_text('{"keep": true}')
    before = _tree(tmp_path)
    args = [a.format(table=table, blocker=blocker) for a in extra]
    if "--out" not in args:
        args += ["--out", str(existing)]
    code, _, err = _run(capsys, "evaluate", "--model", str(model), "--no-progress", *args)
    assert code == 2 and match in err and err.count("\n") == 1, err
    assert _tree(tmp_path) == before
