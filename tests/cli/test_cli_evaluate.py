"""``immunekit evaluate``: help, one-line errors with exit code 2, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from immunekit.cli.main import main
from immunekit.models import linear_model, save_checkpoint

TASK_META = {"task": "gaussian_spectra", "task_config": {"dim": 5, "n": 64}}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    m = linear_model(5)
    with torch.no_grad():
        m.extractor.weight.copy_(torch.diag(torch.logspace(0, -2, 5, dtype=torch.float64)))
    return save_checkpoint(m, tmp_path / "m.safetensors", metadata=TASK_META)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in ("--model", "--task", "--task-set", "--attacks", "--budget", "--seeds", "--search-trials"):
        assert flag in text
    assert "--reference" in text and "--out" in text and "--no-report" in text and "examples:" in text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--budget", "steps=0"], "budget.steps must be >= 1, got 0"),
        (["--budget", "steps=-3"], "budget.steps must be >= 1, got -3"),
        (["--attacks", "lin_probe"], "unknown attack 'lin_probe'; did you mean 'linear_probe'?"),
        (["--threshold", "harm=1.5"], "thresholds.harm (φ) = 1.5 is outside the range"),
        (["--threshold", "slowdown=0.5"], "slowdown (κ) = 0.5 is outside [1, ∞)"),
        (["--seeds", "a,b"], "--seeds expects comma-separated integers"),
        (["--task-set", "bogus=1"], "check the --task-set keys"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, ckpt: Path, extra: list[str], match: str) -> None:
    code, _, err = run(capsys, "--model", str(ckpt), "--out", str(ckpt.parent / "o"), *extra)
    assert code == 2 and match in err
    assert err.count("\n") == 1 and err.startswith("immunekit: error: ")


def test_not_a_checkpoint_is_refused(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04pickled")
    code, _, err = run(capsys, "--model", str(bad), "--task", "gaussian_spectra")
    assert (
        code == 2
        and "is not a safetensors file" in err
        and "never loaded" in err
        and "save_checkpoint" in err
    )
    code, _, err = run(capsys, "--model", str(tmp_path / "missing.safetensors"), "--task", "gaussian_spectra")
    assert code == 2 and "missing" in err


def test_search_on_a_task_without_validation_split(capsys, ckpt: Path, monkeypatch) -> None:
    pytest.importorskip("optuna")
    import immunekit.data
    from immunekit.data.synthetic import gaussian_spectra

    def no_splits(*, evaluation_splits: bool = False, **kw: object):
        return gaussian_spectra(**kw)  # a builder that has no evaluation splits

    real_get = immunekit.data.TASKS.get
    monkeypatch.setattr(
        immunekit.data.TASKS, "get", lambda n: no_splits if n == "gaussian_spectra" else real_get(n)
    )
    code, _, err = run(capsys, "--model", str(ckpt), "--search-trials", "2", "--out", str(ckpt.parent / "o"))
    assert code == 2 and "no validation split 'val_harmful'" in err
    assert not (ckpt.parent / "o").exists()  # refused before any attack ran


def test_evaluate_then_report_rebuild(capsys, ckpt: Path, monkeypatch) -> None:
    monkeypatch.setattr("immunekit.reports.card._matplotlib_available", lambda: False)  # keep it fast
    out = ckpt.parent / "run"
    code, text, _ = run(
        capsys,
        "--model", str(ckpt), "--attacks", "linear_probe,closed_form_probe", "--budget", "steps=10",
        "--budget", "eval_every=5", "--seeds", "0,1", "--out", str(out),
    )  # fmt: skip
    assert (
        code == 0 and "verdict: NOT IMMUNIZED" in text and "does not hold against closed_form_probe" in text
    )
    rec = json.loads((out / "results.json").read_text())
    assert rec["kind"] == "evaluation" and rec["model"]["source"] == str(ckpt)
    assert rec["task"]["splits"]["val_harmful"] > 0  # built with evaluation_splits=True
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()
