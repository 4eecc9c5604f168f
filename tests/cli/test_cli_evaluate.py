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
    # in this process: a pool's start-up would dominate these tiny runs (test_cli_evaluate_sweep uses one)
    code = main(["evaluate", *args, "--no-progress", "--workers", "1"])
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
        (["--threshold", "slowdown=0.5"], "slowdown (κ) = 0.5 is outside (1, ∞)"),
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


# --- a directory of checkpoints: per-model cards plus the method comparison --------------------

DIR_META = {"task": "gaussian_spectra", "task_config": {"dim": 6, "n": 96, "seed": 0}}
DIR_ARGS = ("--budget", "steps=10", "--seeds", "0,1,2", "--attacks", "linear_probe,closed_form_probe")


@pytest.fixture(scope="module")
def evaluated_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny linear checkpoints (no defense; an ill-conditioned extractor) evaluated once."""
    root = tmp_path_factory.mktemp("dir")
    models = root / "models"
    plain = linear_model(6)
    save_checkpoint(
        plain, models / "identity--seed0.safetensors", metadata={**DIR_META, "method": "identity"}
    )
    skewed = linear_model(6)
    with torch.no_grad():
        skewed.extractor.weight.copy_(torch.diag(torch.logspace(0, -3, 6, dtype=torch.float64)))
    save_checkpoint(
        skewed, models / "sub" / "kappa--seed0.safetensors", metadata={**DIR_META, "method": "kappa"}
    )
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("immunekit.reports.card._matplotlib_available", lambda: False)  # keep it fast
        args = ["--model", str(models), *DIR_ARGS, "--out", str(out), "--no-progress", "--workers", "1"]
        assert main(["evaluate", *args]) == 0
    return models, out


def summary_rows(out: Path) -> dict[str, list[str]]:
    """model → cells of the Markdown conditions table."""
    text = (out / "summary.md").read_text()
    table = text.split("## Conditions")[1].split("##")[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")
    ]
    head, body = rows[0], rows[2:]
    return {r[0]: dict(zip(head, r, strict=True)) for r in body}  # type: ignore[misc]


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import immunekit.experiments.evaluate as ev

    calls: list[str] = []
    real = ev.evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs["model_source"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", counting)
    monkeypatch.setattr("immunekit.reports.card._matplotlib_available", lambda: False)
    return calls


def test_directory_writes_a_card_per_model_and_the_comparison(evaluated_dir: tuple[Path, Path]) -> None:
    models, out = evaluated_dir
    for rel, method in (("identity--seed0", "identity"), ("sub/kappa--seed0", "kappa")):
        rec = json.loads((out / rel / "results.json").read_text())
        assert rec["kind"] == "evaluation" and rec["checkpoint"]["metadata"]["method"] == method
        assert rec["model"]["source"] == str(models / f"{rel}.safetensors")
        assert (out / rel / "report.html").is_file() and (out / rel / "report.md").is_file()
        row = summary_rows(out)[rel]
        assert row["method"] == method and row["verdict"] == rec["verdict"]["verdict"]
        assert row["Stability"] == rec["conditions"]["stability"]["status"]
    assert len(summary_rows(out)) == 2
    md = (out / "summary.md").read_text()
    attacks = md.split("## Resistance per attack")[1].split("##")[0]
    assert "| seed | linear_probe | closed_form_probe |" in attacks  # the Adam probe and the closed form
    cf_cells = [line.strip("|").split("|")[-1] for line in attacks.splitlines() if "--seed0 |" in line]
    assert len(cf_cells) == 2 and all(c.strip().startswith("does not hold") for c in cf_cells)
    page = (out / "summary.html").read_text()
    assert page.count('class="badge does-not-hold "') >= 2 and "<style>" in page


def test_directory_rerun_resumes_without_reevaluating(capsys, evaluated_dir, monkeypatch, caplog) -> None:
    models, out = evaluated_dir
    calls = count_evaluations(monkeypatch)
    before = (out / "identity--seed0" / "results.json").stat().st_mtime_ns
    caplog.set_level("INFO", logger="immunekit.cli.evaluate")
    code, text, _ = run(capsys, "--model", str(models), *DIR_ARGS, "--out", str(out))
    assert code == 0 and calls == []  # the predicted config sha256 equals the recorded one
    assert (out / "identity--seed0" / "results.json").stat().st_mtime_ns == before
    assert text.count("(already evaluated)") == 2 and "summary: " in text
    assert "identity--seed0: already evaluated with the same config sha256" in caplog.text
    code, text, _ = run(
        capsys, "--model", str(models), "--match", "sub/*", *DIR_ARGS, "--out", str(out)
    )  # a filter: only one model visited, the summary still covers both
    assert code == 0 and calls == [] and "kappa--seed0" in text and "identity--seed0" not in text
    assert len(summary_rows(out)) == 2


def test_directory_refuses_to_mix_configurations(capsys, evaluated_dir, monkeypatch) -> None:
    models, out = evaluated_dir
    calls = count_evaluations(monkeypatch)
    code, _, err = run(capsys, "--model", str(models), *DIR_ARGS, "--budget", "steps=12", "--out", str(out))
    assert code == 2 and calls == []
    assert "refusing to mix" in err and str(out / "identity--seed0") in err and "budget" in err
    code, _, err = run(capsys, "--model", str(models), "--match", "*nothing*", *DIR_ARGS, "--out", str(out))
    assert code == 2 and "matches --match '*nothing*'" in err


def test_report_rebuilds_the_directory_summary(capsys, evaluated_dir) -> None:
    _, out = evaluated_dir
    before = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    (out / "summary.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").read_text() == before and (out / "summary.html").is_file()
    assert "summary.html" in capsys.readouterr().out


def test_a_reference_named_in_the_metadata_is_the_default(tmp_path: Path) -> None:
    from argparse import Namespace

    from immunekit.cli.evaluate import _model_inputs
    from immunekit.errors import ConfigError

    ref = linear_model(5)
    save_checkpoint(ref, tmp_path / "before.safetensors", metadata=TASK_META)
    model = save_checkpoint(
        linear_model(5),
        tmp_path / "after.safetensors",
        metadata={**TASK_META, "reference_model": "before.safetensors"},
    )
    args = Namespace(device="cpu", task=None, task_sets=[], target=None, harmful_where=None, reference=None)
    inputs, _ = _model_inputs(args, model)
    assert inputs["reference_source"] == str(tmp_path / "before.safetensors")
    assert torch.equal(inputs["reference"].extractor.weight, ref.extractor.weight)
    explicit, _ = _model_inputs(Namespace(**{**vars(args), "reference": model}), model)  # --reference wins
    assert explicit["reference_source"] == str(model)
    (tmp_path / "before.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"names its reference model 'before\.safetensors'"):
        _model_inputs(args, model)
