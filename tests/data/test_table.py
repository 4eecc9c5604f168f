"""table_task: the user's own CSV as a task (domains, features, targets, splits, bad input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from immunekit.data import TASKS
from immunekit.data.table import table_task
from immunekit.errors import ConfigError, DataError


def _frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.normal(size=n) * 5 + 3,
            "region": rng.choice(["north", "south"], n),
            "const": np.ones(n),
        }
    )
    df["price"] = 2 * df.a + df.b + rng.normal(size=n) * 0.1
    df["label"] = (df.a > 0).map({True: "yes", False: "no"})
    return df


@pytest.fixture
def csv(tmp_path: Path) -> Path:
    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    return path


def test_domains_splits_and_preprocessing(csv: Path) -> None:
    df = pd.read_csv(csv)
    t = table_task(
        str(csv), "price", "region == 'north'", features=["a", "b", "const"], evaluation_splits=True
    )
    assert t.loss == "mse" and t.name == "csv" and t.input_dim == 3
    north = set(np.flatnonzero(df.region == "north"))
    for split in ("harmful", "attack", "eval_harmful", "val_harmful", "attack_disjoint"):
        assert {int(i.split(":")[1]) for i in getattr(t, split).ids} <= north
    for split in ("primary", "eval_primary"):
        assert not {int(i.split(":")[1]) for i in getattr(t, split).ids} & north
    every = [
        i
        for s in ("primary", "eval_primary", "harmful", "eval_harmful", "val_harmful", "attack_disjoint")
        for i in getattr(t, s).ids
    ]
    assert len(every) == len(set(every)) == len(df)  # a partition of the rows
    # z-scored with the defender's training rows (primary + harmful), the constant column is 0
    train = np.concatenate([t.primary.x.numpy(), t.harmful.x.numpy()])
    assert np.allclose(train[:, :2].mean(0), 0, atol=1e-12) and np.allclose(train[:, :2].std(0, ddof=1), 1)
    assert np.all(train[:, 2] == 0)
    assert t.info["dropped_columns"] == ["region", "label"]


def test_the_default_task_sets_the_evaluation_rows_aside(csv: Path) -> None:
    plain = table_task(str(csv), "price", "region == 'north'")
    full = table_task(str(csv), "price", "region == 'north'", evaluation_splits=True)
    assert plain.val_harmful is None and plain.attack_disjoint is None
    assert plain.harmful.ids == full.harmful.ids and plain.eval_harmful.ids == full.eval_harmful.ids
    assert not set(plain.harmful.ids) & set(full.attack_disjoint.ids)


def test_classification_targets_and_registry(csv: Path) -> None:
    t = TASKS.get("csv")(path=str(csv), target="label", harmful_where="b > 3")
    assert t.loss == "ce" and t.classes == 2 and t.info["classes"] == ["no", "yes"]
    assert set(t.primary.y.tolist()) == {0, 1}


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"target": "prize"}, ConfigError, "did you mean 'price'"),
        ({"harmful_where": "regoin == 'north'"}, ConfigError, "cannot be evaluated"),
        ({"harmful_where": "a + 1"}, ConfigError, "one True/False per row"),
        ({"harmful_where": "a > 100"}, DataError, "selects no row"),
        ({"harmful_where": "a < 100"}, DataError, "selects every row"),
        ({"harmful_where": " "}, ConfigError, "--harmful-where is empty"),
        ({"test_fraction": 0.7}, ConfigError, "test_fraction must be in"),
        ({"features": ["region"]}, ConfigError, "not numeric"),
    ],
)
def test_bad_input_is_named(csv: Path, kw: dict, error: type, match: str) -> None:
    args = {"target": "price", "harmful_where": "region == 'north'", **kw}
    with pytest.raises(error, match=match):
        table_task(str(csv), **args)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        table_task(str(tmp_path / "missing.csv"), "y", "x > 0")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        table_task(str(empty), "y", "x > 0")
    header = tmp_path / "header.csv"
    header.write_text("x,y\n")
    with pytest.raises(DataError, match="no data rows"):
        table_task(str(header), "y", "x > 0")
    tiny = tmp_path / "tiny.csv"
    _frame(n=12).to_csv(tiny, index=False)
    with pytest.raises(DataError, match="too few to split"):
        table_task(str(tiny), "price", "region == 'north'")
