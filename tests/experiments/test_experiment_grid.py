"""Grid experiments (digit pairs): one trial per (pair, method, seed), per-pair summaries, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from immunekit.data import TASKS
from immunekit.data.synthetic import gaussian_spectra
from immunekit.errors import ConfigError
from immunekit.experiments.linear import build_config, parse_pairs, run_linear_experiment, trial_path

if "tiny_pairs" not in TASKS:

    @TASKS.register("tiny_pairs")
    def tiny_pairs(*, primary: int, harmful: int, seed: int = 0):
        """A stand-in digit-pair task: the pair picks the spectra, so cells differ."""
        return gaussian_spectra(
            dim=5, n=48, cond_primary=5.0 + primary, cond_harmful=5.0 + 3 * harmful, seed=seed
        )


def grid_config(**changes: object) -> dict:
    data = {
        "experiment": "tiny_grid",
        "task": "tiny_pairs",
        "pairs": "0-1,2-3,3-2",
        "seeds": [1, 2],
        "methods": ["identity", {"key": "condition_number", "overrides": {"steps": 10}}],
        "attacks": [{"key": "gd_exact", "optimizer": "gd_exact", "steps": 10}],
        "paper_table": "table2_mnist_mean_rir",
    }
    data.update(changes)
    return data


def test_parse_pairs() -> None:
    assert parse_pairs("0-1,3-8") == [(0, 1), (3, 8)]
    assert len(parse_pairs("all")) == 90 and (3, 3) not in parse_pairs("all")
    for bad, match in (
        ("3-3", "two different digits"),
        ("1-12", "digits are 0-9"),
        ("a-b", "is not 'p-h'"),
        ("0-1,0-1", "repeat"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_pairs(bad)


def test_grid_run_summarises_per_pair_and_across_pairs(tmp_path: Path) -> None:
    results = run_linear_experiment(build_config(grid_config()), tmp_path, progress=False, workers=1)
    assert set(results["cells"]) == {"0-1", "2-3", "3-2"}
    assert results["cells"]["3-2"]["primary"] == 3 and results["cells"]["3-2"]["harmful"] == 2
    assert trial_path(tmp_path, "condition_number", 2, "2-3").exists()
    cell_means = [
        results["cells"][c]["methods"]["condition_number"]["metrics"]["rir"]["mean"] for c in results["cells"]
    ]
    across = results["methods"]["condition_number"]["metrics"]["rir"]
    assert across["values"] == cell_means  # mean of per-pair RIR, not a ratio of means
    assert across["mean"] == pytest.approx(sum(cell_means) / 3, rel=1e-12)
    assert len(results["methods"]["condition_number"]["verdict"]) == 6  # 3 pairs × 2 seeds
    assert results["paper"]["table2"]["condition_number"] == 70.04
    assert len(results["paper"]["fig2"]["condition_number"]) == 10
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["grid"]["rows"] == "harmful"


def test_grid_resume_and_extension(tmp_path: Path) -> None:
    run_linear_experiment(build_config(grid_config(pairs="0-1")), tmp_path, progress=False, workers=1)
    first = trial_path(tmp_path, "identity", 1, "0-1").read_text()
    # adding pairs reuses the finished ones (their trial identity does not include the pair list)
    run_linear_experiment(build_config(grid_config(pairs="0-1,2-3")), tmp_path, progress=False, workers=1)
    assert trial_path(tmp_path, "identity", 1, "0-1").read_text() == first
    assert trial_path(tmp_path, "identity", 1, "2-3").exists()
