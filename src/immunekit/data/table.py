"""A task from the user's own table: a CSV file, a target column and a row filter for the harmful task.

``table_task(path, target="price", harmful_where="region == 'north'")`` (the CLI's
``--task csv:PATH --target COL --harmful-where EXPR``) reads the file with pandas and builds:

* **domains**: rows where the boolean pandas expression ``harmful_where`` holds
  (:meth:`pandas.DataFrame.eval`, e.g. ``"age > 60"`` or ``"kind == 'b'"``) form the harmful task;
  the other rows the primary task.
* **features**: the numeric columns other than the target (or the ``features`` given); other
  columns are dropped and listed in ``info["dropped_columns"]``. Missing values become the
  training mean; every column is z-scored with the mean and standard deviation (ddof = 1) of the
  defender's training rows of both domains (a constant column becomes 0), so no held-out row
  shapes the preprocessing.
* **target**: numeric with more than two distinct values → regression (``loss="mse"``, z-scored
  with the same rows' statistics); otherwise classification (``loss="ce"``), the sorted distinct
  values numbered 0, 1, …
* **splits**: each domain is shuffled with ``seed``. Primary: the first ``test_fraction`` of the
  rows are ``eval_primary``, the rest ``primary``. Harmful: ``test_fraction`` each for
  ``eval_harmful`` and ``val_harmful``, and the rest halved into ``harmful`` (= ``attack``, the
  defender's and the attacker's rows) and ``attack_disjoint``. The rows of ``val_harmful`` and
  ``attack_disjoint`` are set aside whether or not ``evaluation_splits`` attaches them, so a model
  immunized on the default task never saw them.

Row ids are ``row:<i>`` with i the 0-based data row of the file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.registry import did_you_mean

logger = logging.getLogger(__name__)

VERSION = "1"
MIN_ROWS_PER_SPLIT = 2


def table_task(
    path: str,
    target: str,
    harmful_where: str,
    *,
    features: list[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    evaluation_splits: bool = False,
) -> Task:
    """Build a :class:`Task` from a CSV table (see the module docstring for every rule).

    Args:
        path: the CSV file.
        target: the target column.
        harmful_where: boolean pandas expression selecting the harmful rows.
        features: feature columns (default: every numeric column but the target).
        test_fraction: share of each domain held out for evaluation (and, for the harmful domain,
            again for the attacker's validation split).
        seed: seed of the row shuffle.
        evaluation_splits: attach ``val_harmful`` and ``attack_disjoint``.

    Returns:
        The task, named ``csv``.

    Raises:
        ConfigError: missing or unreadable file, unknown column, bad expression or fraction.
        DataError: empty table, a domain without rows or too small to split, missing targets.

    """
    import pandas as pd

    if not 0.0 < test_fraction < 0.5:
        raise ConfigError(f"test_fraction must be in (0, 0.5), got {test_fraction}; e.g. 0.2")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--task csv:{path}: no such file; give the path of a CSV table")
    try:
        df = pd.read_csv(file)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not a readable CSV table ({type(err).__name__}: {err})") from None
    if df.empty:
        raise DataError(f"{file} has no data rows; give a table with a header and rows")
    _check_column(target, df.columns, file, "--target")
    harmful = _harmful_mask(df, harmful_where, file)
    names = _feature_names(df, target, features, file)
    dropped = [c for c in df.columns if c not in names and c != target]
    y_raw = df[target]
    if y_raw.isna().any():
        raise DataError(
            f"{file}: target {target!r} is missing in {int(y_raw.isna().sum())} rows; drop those rows"
        )
    rows = {
        d: _split_rows(np.flatnonzero(m), d, test_fraction, seed)
        for d, m in (("p", ~harmful), ("h", harmful))
    }
    train = np.concatenate([rows["p"]["primary"], rows["h"]["harmful"]])
    x = _standardized(df[names].to_numpy(dtype=np.float64), train)
    loss, y, classes = _targets(y_raw, train)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    def ds(idx: np.ndarray) -> Dataset:
        return Dataset(x_t[idx], y_t[idx], tuple(f"row:{i}" for i in idx))

    extra = {"val_harmful": ds(rows["h"]["val_harmful"]), "attack_disjoint": ds(rows["h"]["attack_disjoint"])}
    sha = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    info: dict[str, Any] = {
        "path": str(file),
        "target": target,
        "harmful_where": harmful_where,
        "features": names,
        "dropped_columns": dropped,
        "classes": classes,
        "rows": {"primary": int((~harmful).sum()), "harmful": int(harmful.sum())},
        "split_rows": {f"{d}.{k}": len(v) for d, r in rows.items() for k, v in r.items()},
    }
    if dropped:
        logger.info("%s: non-numeric or unselected columns dropped: %s", file, ", ".join(map(str, dropped)))
    return Task(
        name="csv",
        version=f"csv-{VERSION}:sha256={sha};target={target};harmful_where={harmful_where}",
        loss=loss,
        primary=ds(rows["p"]["primary"]),
        harmful=ds(rows["h"]["harmful"]),
        attack=ds(rows["h"]["harmful"]),
        eval_primary=ds(rows["p"]["eval_primary"]),
        eval_harmful=ds(rows["h"]["eval_harmful"]),
        **(extra if evaluation_splits else {}),
        info=info,
    )


def _check_column(name: str, columns: Any, file: Path, flag: str) -> None:
    if name not in columns:
        hint = did_you_mean(str(name), [str(c) for c in columns])
        raise ConfigError(f"{flag} {name!r} is not a column of {file}{hint}")


def _harmful_mask(df: Any, expr: str, file: Path) -> np.ndarray:
    """Boolean ``(N,)`` mask of the harmful rows: ``df.eval(expr)``."""
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigError("--harmful-where is empty; give a boolean expression, e.g. \"region == 'north'\"")
    try:
        mask = df.eval(expr)
    except Exception as err:  # pandas raises many types for a bad expression
        raise ConfigError(
            f"--harmful-where {expr!r} cannot be evaluated on {file} ({type(err).__name__}: {err}); "
            f"columns: {', '.join(map(str, df.columns))}"
        ) from None
    values = np.asarray(mask)
    if values.shape != (len(df),) or values.dtype != bool:
        raise ConfigError(
            f"--harmful-where {expr!r} must give one True/False per row, got {values.dtype} of shape "
            f'{values.shape}; compare a column, e.g. "age > 60"'
        )
    if values.all() or not values.any():
        which = "every" if values.all() else "no"
        raise DataError(
            f"--harmful-where {expr!r} selects {which} row of {file}; the primary and the harmful task "
            "both need rows"
        )
    return values


def _feature_names(df: Any, target: str, features: list[str] | None, file: Path) -> list[str]:
    import pandas as pd

    if features is None:
        names = [c for c in df.columns if c != target and pd.api.types.is_numeric_dtype(df[c])]
        if not names:
            raise DataError(f"{file} has no numeric column besides the target {target!r}; add features")
        return names
    for name in features:
        _check_column(name, df.columns, file, "features")
        if name == target:
            raise ConfigError(f"features include the target {target!r}; remove it")
        if not pd.api.types.is_numeric_dtype(df[name]):
            raise ConfigError(f"feature {name!r} of {file} is not numeric; encode it or leave it out")
    return list(features)


def _split_rows(idx: np.ndarray, domain: str, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Shuffled row indices of one domain cut into its splits (module docstring)."""
    order = np.random.default_rng([seed, 0 if domain == "p" else 1]).permutation(idx)
    n_test = max(MIN_ROWS_PER_SPLIT, round(len(order) * fraction))
    if domain == "p":
        parts = {"eval_primary": order[:n_test], "primary": order[n_test:]}
    else:
        rest = order[2 * n_test :]
        half = len(rest) // 2
        parts = {
            "eval_harmful": order[:n_test],
            "val_harmful": order[n_test : 2 * n_test],
            "harmful": rest[:half],
            "attack_disjoint": rest[half:],
        }
    small = {k: len(v) for k, v in parts.items() if len(v) < MIN_ROWS_PER_SPLIT}
    if small:
        name = "primary" if domain == "p" else "harmful"
        raise DataError(
            f"the {name} rows ({len(idx)}) are too few to split: {small}; each split needs at least "
            f"{MIN_ROWS_PER_SPLIT} rows; add rows or lower test_fraction"
        )
    return {k: np.sort(v) for k, v in parts.items()}


def _standardized(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Z-score with the training rows' mean and std (ddof 1); missing values → the mean; std 0 → 1."""
    mean = np.nanmean(x[train], axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)  # a column missing in every training row
    x = np.where(np.isnan(x), mean, x)
    std = x[train].std(axis=0, ddof=1) if len(train) > 1 else np.ones(x.shape[1])
    std = np.where(std > 0, std, 1.0)
    return (x - mean) / std


def _targets(y: Any, train: np.ndarray) -> tuple[Any, np.ndarray, list[str] | None]:
    """``(loss, targets, class names)``: z-scored values (regression) or class indices."""
    import pandas as pd

    values = pd.unique(y)
    if pd.api.types.is_numeric_dtype(y) and len(values) > 2:
        v = y.to_numpy(dtype=np.float64)
        std = v[train].std(ddof=1)
        return "mse", (v - v[train].mean()) / (std if std > 0 else 1.0), None
    try:
        classes = sorted(values.tolist())
    except TypeError:  # mixed types: order by their text
        classes = sorted(values.tolist(), key=str)
    if len(classes) < 2:
        raise DataError(f"target {y.name!r} has one value ({classes[0]!r}) in every row; nothing to learn")
    lookup = {c: i for i, c in enumerate(classes)}
    return "ce", np.array([lookup[v] for v in y], dtype=np.int64), [str(c) for c in classes]
