"""Optional evaluation splits of Task (val_harmful, attack_disjoint, attack_cross) and the task builders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from immunekit.data import mnist
from immunekit.data.house_prices import house_prices
from immunekit.data.mnist import MnistArrays, mnist_pair
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError

DEFAULT_SPLITS = ("primary", "harmful", "attack", "eval_primary", "eval_harmful")


def _rows(prefix: str, start: int, n: int, dim: int = 3) -> Dataset:
    x = torch.arange(start * dim, (start + n) * dim, dtype=torch.float64).reshape(n, dim)
    return Dataset(x, x.sum(1), tuple(f"{prefix}:{i}" for i in range(start, start + n)))


def _task(**extra) -> Task:
    return Task(
        name="toy",
        version="0",
        loss="mse",
        primary=_rows("p", 0, 4),
        harmful=_rows("h", 0, 4),
        attack=_rows("h", 0, 4),
        eval_primary=_rows("p", 4, 4),
        eval_harmful=_rows("h", 4, 4),
        **extra,
    )


def test_optional_splits_default_to_none_and_accept_disjoint_rows():
    assert _task().val_harmful is _task().attack_disjoint is _task().attack_cross is None
    t = _task(val_harmful=_rows("h", 8, 2), attack_disjoint=_rows("h", 10, 3), attack_cross=_rows("c", 0, 3))
    assert (len(t.val_harmful), len(t.attack_disjoint), len(t.attack_cross)) == (2, 3, 3)


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"val_harmful": _rows("h", 6, 3)}, "'val_harmful' shares 2 rows with 'eval_harmful'"),
        ({"val_harmful": _rows("h", 3, 1)}, "'val_harmful' shares 1 rows with 'attack'"),
        (
            {"val_harmful": _rows("h", 8, 2), "attack_disjoint": _rows("h", 9, 3)},
            "'val_harmful' shares 1 rows with 'attack_disjoint'",
        ),
        (
            {"val_harmful": _rows("h", 8, 2), "attack_cross": _rows("h", 9, 3)},
            "'val_harmful' .* 'attack_cross'",
        ),
        ({"attack_disjoint": _rows("h", 2, 3)}, "'attack_disjoint' shares 2 rows with 'harmful'"),
        ({"attack_disjoint": _rows("h", 7, 3)}, "'attack_disjoint' shares 1 rows with 'eval_harmful'"),
        ({"attack_cross": _rows("h", 0, 1)}, "'attack_cross' shares 1 rows with 'harmful'"),
        ({"attack_cross": _rows("h", 5, 1)}, "'attack_cross' shares 1 rows with 'eval_harmful'"),
    ],
)
def test_overlapping_optional_splits_raise(extra, pattern):
    with pytest.raises(DataError, match=pattern):
        _task(**extra)


def test_optional_split_with_another_input_shape_raises():
    with pytest.raises(DataError, match="share the input shape"):
        _task(attack_disjoint=_rows("h", 10, 2, dim=4))


def _same(a: Dataset, b: Dataset) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.y.dtype == b.y.dtype and a.ids == b.ids


def _disjoint(task: Task) -> None:
    ids = {
        s: set(getattr(task, s).ids)
        for s in ("harmful", "attack", "eval_harmful", "val_harmful", "attack_disjoint")
    }
    pairs = [("val_harmful", "eval_harmful"), ("val_harmful", "attack"), ("val_harmful", "attack_disjoint"),
             ("attack_disjoint", "harmful"), ("attack_disjoint", "eval_harmful")]  # fmt: skip
    for a, b in pairs:
        assert not ids[a] & ids[b], (a, b)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gaussian_spectra_default_path_is_bit_identical(loss):
    plain = gaussian_spectra(dim=5, n=48, cond_harmful=30.0, loss=loss, seed=2)
    full = gaussian_spectra(dim=5, n=48, cond_harmful=30.0, loss=loss, seed=2, evaluation_splits=True)
    assert all(_same(getattr(plain, s), getattr(full, s)) for s in DEFAULT_SPLITS)
    assert plain.val_harmful is None and "evaluation_splits" not in plain.info
    assert (len(full.val_harmful), len(full.attack_disjoint)) == (len(full.eval_harmful), len(full.attack))
    assert full.attack_cross is None
    _disjoint(full)


def test_gaussian_spectra_extra_rows_follow_the_harmful_law():
    # The extra rows share the harmful domain's linear target: a least-squares fit on the training
    # rows explains them as well as the held-out rows (R² > 0.95 with 10 % noise).
    t = gaussian_spectra(dim=4, n=400, seed=0, evaluation_splits=True)
    w = torch.linalg.lstsq(t.harmful.x, t.harmful.y[:, None]).solution
    for split in ("eval_harmful", "val_harmful", "attack_disjoint"):
        d = getattr(t, split)
        r2 = 1 - ((d.y[:, None] - d.x @ w) ** 2).sum() / ((d.y - d.y.mean()) ** 2).sum()
        assert r2 > 0.95, split
    cov_h = t.harmful.x.T @ t.harmful.x / len(t.harmful)
    cov_d = t.attack_disjoint.x.T @ t.attack_disjoint.x / len(t.attack_disjoint)
    assert torch.linalg.matrix_norm(cov_h - cov_d) < 0.25 * torch.linalg.matrix_norm(cov_h)


# -- house prices on a small Kaggle-like CSV ------------------------------------------------------


@pytest.fixture
def csv_path(tmp_path):
    rng = np.random.default_rng(0)
    n = 80
    ids = np.arange(1, n + 1)
    frame = pd.DataFrame(
        {
            "Id": ids,
            "MSZoning": ["RM" if i % 4 == 0 else "RL" for i in ids],  # 20 RM, 60 RL
            "LotFrontage": 50.0 + ids,
            "Street": [["Pave", "Grvl"][i % 2] for i in ids],
            "LotArea": rng.integers(3000, 20000, n),
            "SalePrice": rng.integers(80_000, 400_000, n),
        }
    )
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False)
    return path


def test_house_prices_takes_spare_rows_and_keeps_eval_harmful(csv_path):
    # file_order with n_test=10 leaves 60 - 10 - 10 = 40 spare RL rows: the reported split is unchanged.
    plain = house_prices(csv=str(csv_path), n_train=10, n_test=10, seed=1)
    full = house_prices(
        csv=str(csv_path), n_train=10, n_test=10, seed=1, evaluation_splits=True, n_val_harmful=12
    )
    assert all(_same(getattr(plain, s), getattr(full, s)) for s in DEFAULT_SPLITS)
    assert (len(full.val_harmful), len(full.attack_disjoint)) == (12, 10)  # n_attack_disjoint = n_train
    assert (
        full.info["n_rows"]["val_harmful"] == 12
        and "neither training nor" in full.info["evaluation_splits"]["val_harmful"]
    )
    assert "evaluation_splits" not in plain.info
    _disjoint(full)
    again = house_prices(
        csv=str(csv_path), n_train=10, n_test=10, seed=1, evaluation_splits=True, n_val_harmful=12
    )
    assert _same(again.val_harmful, full.val_harmful)  # seeded


def test_house_prices_carves_from_a_default_sized_eval_split(csv_path):
    plain = house_prices(csv=str(csv_path), n_train=10, split="seeded", seed=4)
    full = house_prices(
        csv=str(csv_path), n_train=10, split="seeded", seed=4, evaluation_splits=True, n_val_harmful=5
    )
    assert all(_same(getattr(plain, s), getattr(full, s)) for s in ("primary", "harmful", "eval_primary"))
    assert len(full.eval_harmful) == len(plain.eval_harmful) - 15
    kept = [i for i in plain.eval_harmful.ids if i in set(full.eval_harmful.ids)]
    assert kept == list(full.eval_harmful.ids)  # the rest, in the same order
    carved = set(full.val_harmful.ids) | set(full.attack_disjoint.ids)
    assert carved | set(full.eval_harmful.ids) == set(plain.eval_harmful.ids)
    _disjoint(full)


def test_house_prices_never_shrinks_an_explicit_eval_split(csv_path):
    with pytest.raises(DataError, match="n_val_harmful / n_attack_disjoint"):
        house_prices(csv=str(csv_path), n_train=5, n_test=15, evaluation_splits=True)  # 40 spare < 205
    with pytest.raises(ConfigError, match="n_attack_disjoint"):
        house_prices(csv=str(csv_path), evaluation_splits=True, n_attack_disjoint=0)


# -- MNIST on a synthetic in-memory copy ----------------------------------------------------------


@pytest.fixture
def fake_mnist(monkeypatch):
    rng = np.random.default_rng(0)
    splits = {}
    for name, per_digit in (("train", 12), ("val", 7), ("test", 6)):
        labels = rng.permutation(np.repeat(np.arange(10), per_digit + np.arange(10) % 3))
        splits[name] = (rng.random((len(labels), 784), dtype=np.float32), labels.astype(np.int64))
    arrays = MnistArrays(source="synthetic", splits=splits)
    monkeypatch.setattr(mnist, "load_mnist", lambda path=None: arrays)
    return arrays


@pytest.mark.parametrize(
    ("overrides", "spare"),
    [
        ({}, "val"),
        ({"protocol": "one_vs_rest"}, "val"),
        ({"protocol": "one_vs_rest", "test_split": "val"}, "test"),
    ],
)
def test_mnist_evaluation_splits_come_from_the_spare_split(fake_mnist, overrides, spare):
    plain = mnist_pair(primary=2, harmful=5, seed=3, **overrides)
    full = mnist_pair(primary=2, harmful=5, seed=3, evaluation_splits=True, **overrides)
    assert all(_same(getattr(plain, s), getattr(full, s)) for s in DEFAULT_SPLITS)
    assert {k: v for k, v in full.info.items() if k not in ("evaluation_splits", "n_rows")} == {
        k: v for k, v in plain.info.items() if k != "n_rows"
    }
    _disjoint(full)
    for split in ("val_harmful", "attack_disjoint"):
        ds = getattr(full, split)
        rows = np.array([int(i.split(":")[2]) for i in ds.ids])
        assert all(i.startswith(f"mnist:{spare}:") for i in ds.ids)
        digits = fake_mnist.labels(spare)[rows]
        assert np.array_equal(ds.y.numpy(), (digits == 5).astype(np.int64))  # h-vs-rest (reference: all 5s)
    n_pos = [int(getattr(full, s).y.sum()) for s in ("val_harmful", "attack_disjoint")]
    assert n_pos[1] - n_pos[0] in (0, 1)  # halved per label


def test_mnist_config_rejects_a_non_bool_option(fake_mnist):
    with pytest.raises(ConfigError, match="evaluation_splits"):
        mnist_pair(evaluation_splits="yes")


def test_task_is_still_a_frozen_dataclass_with_the_optional_fields_last():
    names = [f.name for f in dataclasses.fields(Task)]
    assert names[-4:] == ["val_harmful", "attack_disjoint", "attack_cross", "info"]
