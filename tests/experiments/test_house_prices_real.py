"""Real-data checks of the house-prices experiment (slow, need the pinned asset packages).

Run with ``pytest -m slow tests/experiments/test_house_prices_real.py``; the default run skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from immunekit.config import read_yaml
from immunekit.experiments import default_config_path
from immunekit.experiments.linear import build_config, run_linear_experiment

pytestmark = [pytest.mark.slow, pytest.mark.assets]


def _run(tmp_path: Path, **changes: object) -> dict:
    data = read_yaml(default_config_path("house_prices"))
    data["attacks"] = [{"key": "gd_exact", "optimizer": "gd_exact", "steps": 200}]
    data.update(changes)
    return run_linear_experiment(build_config(data), tmp_path, progress=False)["methods"]


def _mean(methods: dict, key: str, metric: str) -> float:
    return methods[key]["metrics"][metric]["mean"]


def test_default_data_condition_number_wins_and_keeps_the_primary_task(tmp_path: Path) -> None:
    methods = _run(tmp_path)
    best = max((k for k in methods if k != "identity"), key=lambda k: _mean(methods, k, "rir"))
    assert best == "condition_number"
    assert _mean(methods, "condition_number", "kappa_ratio_primary") <= 1.0
    assert all(v <= 1.0 for v in methods["condition_number"]["metrics"]["kappa_ratio_primary"]["values"])
    mse, ref = (
        _mean(methods, "condition_number", "primary_test_mse"),
        _mean(methods, "identity", "primary_test_mse"),
    )
    assert mse <= 1.01 * ref
    assert all(v["immunized"] for v in methods["condition_number"]["verdict"])


def test_kaggle_protocol_beats_the_papers_table_1(tmp_path: Path) -> None:
    from immunekit.assets import asset_path

    csv = str(asset_path("kaggle_house_train"))
    methods = _run(tmp_path, task_config={"csv": csv}, seeds=[1], methods=["identity", "condition_number"])
    assert _mean(methods, "condition_number", "rir") > 356.20  # paper, Table 1
    assert _mean(methods, "condition_number", "kappa_ratio_primary") <= 0.053
