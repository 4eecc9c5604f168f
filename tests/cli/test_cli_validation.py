"""Every bad input of ``run`` and ``report`` is refused in one line before any trial runs.

Each test runs ``immunekit.cli.main.main`` in this process against a copy of a finished results
folder, with trials forbidden (``no_trials``), and checks that every file under ``--out`` is byte
for byte what it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from _cli_helpers import assert_one_line_error, digest, write_tiny

# ------------------------------------------------------------------ 1. defense settings, attack budgets


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["defenses.condition_number.steps=-5"], ["steps must be >= 1, got -5", "defenses.condition_number"]),
        (["defenses.imma.steps=-5"], ["steps must be > 0, got -5", "defenses.imma"]),  # the last method
        (["defenses.condition_number.stepz=5"], ["stepz", "did you mean 'steps'"]),
        (
            ["defenses.condition_numbr.steps=5"],
            ["no method 'condition_numbr'", "did you mean 'condition_number'"],
        ),
        (["defenses.imma=5"], ["defenses.imma must be a mapping", "defenses.imma.steps=50"]),
        (["attacks=[{key: a, optimizer: adam, steps: -1}]"], ["attacks[a]", "budget.steps must be >= 1"]),
        (["attacks=[{key: a, optimizer: adamm, steps: 5}]"], ["attacks[a]", "adamm"]),
        (["attacks=[{key: a, optimizer: adam, steps: 5, lr: -1}]"], ["attacks[a]", "budget.lr must be > 0"]),
    ],
)
def test_invalid_method_settings_fail_before_any_trial(
    cli, no_trials, results_dir: Path, tmp_path: Path, sets: list[str], needles: list[str]
) -> None:
    before = digest(results_dir)
    argv = ["run", "synthetic", "--config", write_tiny(tmp_path), "--out", results_dir, "--workers", "1"]
    for item in sets:
        argv += ["--set", item]
    assert_one_line_error(*cli(*argv, "--no-progress"), *needles)
    assert no_trials == [] and digest(results_dir) == before


# ------------------------------------------------------------------ 2. --csv problems come first


def _kaggle_like(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    ids = np.arange(1, rows + 1)
    return pd.DataFrame(
        {
            "Id": ids,
            "MSZoning": ["RM" if i % 3 == 0 else "RL" for i in ids],
            "LotFrontage": 50.0 + ids,
            "LotArea": rng.integers(3000, 20000, rows),
            "SalePrice": rng.integers(80_000, 400_000, rows),
        }
    )


def _write_csv(kind: str, path: Path) -> Path:
    if kind == "not-a-csv":
        path.write_bytes(bytes(range(256)) * 8)  # binary, not text
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "header-only":
        path.write_text("Id,MSZoning,LotArea,SalePrice\n")
    elif kind == "no-columns":
        path.write_text("a,b\n1,2\n3,4\n")
    elif kind == "too-small":
        _kaggle_like(60).to_csv(path, index=False)  # 20 primary rows < n_train + 1 = 201
    return path


@pytest.mark.parametrize(
    ("kind", "needles"),
    [
        ("missing", ["does not exist", "train.csv"]),
        ("not-a-csv", ["is not a readable CSV file"]),
        ("empty", ["is empty"]),
        ("header-only", ["has a header but no data rows"]),
        ("no-columns", ["lacks the column(s)", "MSZoning"]),
        ("too-small", ["primary domain has 20 rows in", "n_train=200", "lower n_train to at most 19"]),
    ],
)
def test_bad_csv_is_reported_before_the_results_folder(
    cli, no_trials, results_dir: Path, tmp_path: Path, kind: str, needles: list[str]
) -> None:
    csv = tmp_path / "train.csv"
    if kind != "missing":
        _write_csv(kind, csv)
    before = digest(results_dir)
    code, out, err = cli(
        "run", "house-prices", "--csv", csv, "--out", results_dir, "--seeds", "1", "--methods", "identity",
        "--workers", "1", "--no-progress",
    )  # fmt: skip
    line = assert_one_line_error(code, out, err, str(csv), *needles)
    assert "different configuration" not in line
    assert no_trials == [] and digest(results_dir) == before


# ------------------------------------------------------------------ 3. --methods, --seeds, --config


@pytest.mark.parametrize(
    ("args", "config_text", "needles"),
    [
        (["--methods", ""], None, ["--methods '' selects no method", "identity"]),
        (["--methods", " , "], None, ["selects no method"]),
        (["--methods", "identity,condition_numbr"], None, ["unknown method 'condition_numbr'", "did you"]),
        (["--seeds=-1"], None, ["seeds must be integers >= 0, got -1"]),
        (["--seeds", "1,1"], None, ["seed 1 is repeated"]),
        (["--seeds", "abc"], None, ["comma-separated integers", "'abc'"]),
        (["--seeds", ","], None, ["gives no seed"]),
        ([], "seeds: [1, 2\nmethods: [identity]\n", ["is not valid YAML", "line", "column"]),
        ([], "- identity\n- imma\n", ["expected a YAML mapping", "got a list"]),
        ([], "just a string\n", ["expected a YAML mapping", "got a str"]),
        ([], "seeds: [-3]\n", ["seeds must be integers >= 0, got -3"]),
        ([], "seeds: [2, 2]\n", ["seeds must be distinct", "repeated: [2]"]),
    ],
)
def test_bad_methods_seeds_and_config_files_are_refused(
    cli,
    no_trials,
    results_dir: Path,
    tmp_path: Path,
    args: list[str],
    config_text: str | None,
    needles: list[str],
) -> None:
    config = write_tiny(tmp_path)
    if config_text is not None:
        config = tmp_path / "user.yaml"
        config.write_text(config_text)
    before = digest(results_dir)
    code, out, err = cli(
        "run", "synthetic", "--config", config, "--out", results_dir, "--workers", "1", "--no-progress", *args
    )
    assert_one_line_error(code, out, err, *needles)
    assert no_trials == [] and digest(results_dir) == before


def test_a_negative_seed_parses_as_a_separate_value(
    cli, no_trials, results_dir: Path, tmp_path: Path
) -> None:
    config = write_tiny(tmp_path)
    code, out, err = cli("run", "synthetic", "--config", config, "--out", results_dir, "--seeds", "-1")
    assert_one_line_error(code, out, err, "seeds must be integers >= 0, got -1")


# ------------------------------------------------------------------ 4. options of another experiment


@pytest.mark.parametrize(
    ("experiment", "args", "needles"),
    [
        ("house-prices", ["--pairs", "0-1"], ["--pairs applies to mnist-pairs", "not house-prices"]),
        ("house-prices", ["--protocol", "reference"], ["--protocol applies to mnist-pairs"]),
        ("synthetic", ["--pairs", "0-1"], ["--pairs applies to mnist-pairs", "not synthetic"]),
        ("mnist-pairs", ["--csv", "train.csv"], ["--csv applies to house-prices", "not mnist-pairs"]),
        ("synthetic", ["--csv", "train.csv"], ["--csv applies to house-prices"]),
    ],
)
def test_an_option_of_another_experiment_names_the_experiment_that_has_it(
    cli, no_trials, results_dir: Path, experiment: str, args: list[str], needles: list[str]
) -> None:
    before = digest(results_dir)
    code, out, err = cli("run", experiment, "--out", results_dir, "--workers", "1", *args)
    assert_one_line_error(code, out, err, *needles)
    assert no_trials == [] and digest(results_dir) == before


# ------------------------------------------------------------------ 5. unwritable --out


@pytest.mark.parametrize(
    ("command", "where", "needles"),
    [
        ("run", "under-file", ["--out", "is a file, not a folder", "choose another --out"]),
        ("run", "is-file", ["--out", "exists and is not a folder"]),
        ("run", "read-only", ["--out", "not writable"]),
        ("report", "under-file", ["--out", "is a file, not a folder"]),
        ("report", "read-only", ["--out", "not writable"]),
        ("report-in-place", "read-only", ["DIR", "not writable", "pass --out"]),
    ],
)
def test_unwritable_out_is_refused_before_any_work(
    cli, no_trials, results_dir: Path, tmp_path: Path, command: str, where: str, needles: list[str]
) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder\n")
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes through chmod; the regular-file cases cover this check")
        target = results_dir if command == "report-in-place" else tmp_path / "locked"
        target.mkdir(exist_ok=True)
        target.chmod(0o500)
    else:
        target = blocker / "out" if where == "under-file" else blocker
    before = digest(tmp_path)
    try:
        if command == "run":
            args = ["run", "synthetic", "--config", write_tiny(tmp_path), "--out", target, "--workers", "1"]
            before = digest(tmp_path)
        elif command == "report":
            args = ["report", results_dir, "--out", target]
        else:
            args = ["report", results_dir]
        assert_one_line_error(*cli(*args), str(target), *needles)
    finally:
        if where == "read-only":
            target.chmod(0o700)
    assert no_trials == [] and digest(tmp_path) == before


# ------------------------------------------------------------------ 8. --device


@pytest.mark.parametrize(
    ("device", "expect"),
    [
        ("cpu", "cpu"),
        ("auto", "cpu"),
        ("cuda", "error"),
        ("cuda:3", "error"),
        ("gpu", "not a torch device"),
    ],
)
def test_device_is_honoured_or_refused_before_any_trial(
    cli, results_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, expect: str
) -> None:
    if expect == "cpu":  # runs for real, into a new folder
        out = tmp_path / "fresh"
        code, _, err = cli(
            "run", "synthetic", "--config", write_tiny(tmp_path, methods=["identity"]), "--out", out,
            "--workers", "1", "--no-progress", "--no-report", "--device", device,
        )  # fmt: skip
        assert code == 0, err
        provenance = json.loads((out / "results.json").read_text())["provenance"]
        assert provenance["device"] == "cpu" and provenance["device_requested"] == device
        return
    import immunekit.experiments.linear as linear

    monkeypatch.setattr(linear, "immunize_and_measure", _no_trial)
    before = digest(results_dir)
    code, out, err = cli(
        "run", "synthetic", "--config", write_tiny(tmp_path), "--out", results_dir, "--workers", "1",
        "--device", device,
    )  # fmt: skip
    if expect == "error":
        usable = torch.cuda.is_available() and device == "cuda"
        reason = "cannot be honoured" if usable else "is not available"
        assert_one_line_error(code, out, err, f"--device {device!r}", reason, "--device cpu")
    else:
        assert_one_line_error(code, out, err, f"--device {device!r}", expect, "auto, cpu, cuda")
    assert digest(results_dir) == before


def _no_trial(*args: object, **kwargs: object) -> None:
    raise AssertionError("a trial started")
