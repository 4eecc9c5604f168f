"""Helpers shared by the report modules: display names, number formatting, atomic file writes.

Standard library only, so that ``import immunekit.reports`` stays light.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from immunekit._atomic import atomic_path
from immunekit._atomic import atomic_write_text as _write_text
from immunekit._versions import RULES_VERSION

logger = logging.getLogger(__name__)

DASH = "—"

METHOD_NAMES: dict[str, str] = {
    "condition_number": "Ours (condition number)",
    "rill_only": "R_ill only",
    "opt_kappa": "Opt-κ",
    "imma": "IMMA",
    "identity": "Identity (no defense)",
}

IDENTITY = "identity"

# |x| outside [SCI_LOW, SCI_HIGH) is shown in scientific notation.
SCI_LOW = 1e-3
SCI_HIGH = 1e4


HOLDS, NOT_HOLDS, UNDECIDED, NOT_TESTED = "holds", "does not hold", "undecided", "not tested"


def immunity_text(entry: Mapping[str, Any] | None) -> str:
    """What a per-attack verdict says in words: holds, does not hold, undecided, not tested."""
    if not isinstance(entry, Mapping):
        return DASH
    status = entry.get("status")
    if status is None:  # records written before rules version 2
        holds = entry.get("holds")
        return NOT_TESTED if holds is None else (HOLDS if holds else NOT_HOLDS)
    return {"PASS": HOLDS, "FAIL": NOT_HOLDS, "INCONCLUSIVE": UNDECIDED}.get(str(status), NOT_TESTED)


def stale_rules_note(record: Mapping[str, Any]) -> str | None:
    """A warning for evaluation records written by older verdict rules, or ``None``."""
    version = int(record.get("rules_version") or 1)
    if version >= RULES_VERSION:
        return None
    return (
        f"This card was written by verdict rules version {version}, which could call a non-immune "
        "model IMMUNIZED: attacks that broke only the immunized model were ignored, diverged runs "
        "counted as resistance, and t* depended on the evaluation grid. Its verdict is shown as "
        "recorded; rerun `immunekit evaluate` for a verdict under the current rules "
        f"(version {RULES_VERSION})."
    )


def verdict_rules(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (verdict, when) rule table the record's verdict was decided by ([] when not recorded)."""
    rules = (record.get("verdict") or {}).get("rules") or []
    return [(str(r[0]), str(r[1])) for r in rules if isinstance(r, list | tuple) and len(r) == 2]


#: Threshold key of an evaluation record → (symbol, meaning, unit); unit ``None``: the task score.
THRESHOLD_TEXT: dict[str, tuple[str, str, str | None]] = {
    "harm": ("φ", "harm threshold", None),
    "slowdown": ("κ", "required slowdown", "×"),
    "stability": ("δ_stab", "max utility drop", None),
    "train": ("δ_train", "trainability target slack", "fraction of M's gain"),
    "train_steps": ("ε", "allowed trainability lag", "steps"),
    "divergence": ("F", "divergence factor", "×"),
}
#: What a threshold left unset (``None``) means.
THRESHOLD_DEFAULTS = {"train_steps": "0.1·t_reach(M)", "harm": "default per task"}


def score_name(record: Mapping[str, Any]) -> str:
    """The task score of an evaluation record: ``task.score``, else R² for ``mse`` and accuracy otherwise."""
    task = record.get("task") or {}
    if isinstance(task, Mapping) and task.get("score"):
        return str(task["score"])
    return "R²" if isinstance(task, Mapping) and task.get("loss") == "mse" else "accuracy"


def utility_name(record: Mapping[str, Any]) -> str:
    """The utility (stability) score of a record: ``task.utility_score``, else :func:`score_name`."""
    task = record.get("task") or {}
    if isinstance(task, Mapping) and task.get("utility_score"):
        return str(task["utility_score"])
    return score_name(record)


def threshold_label(key: str, value: Any, score: str) -> str:
    """A threshold with its symbol, meaning and unit.

    Args:
        key: a key of :data:`THRESHOLD_TEXT` (other keys are returned as ``"key = value"``).
        value: the threshold (``None``: its default, see :data:`THRESHOLD_DEFAULTS`).
        score: the task score, the unit of φ and δ_stab (e.g. ``"R²"``, ``"accuracy"``).

    Example:
        >>> threshold_label("harm", 0.8, "R²"), threshold_label("slowdown", 25, "R²")
        ('φ = 0.8 (harm threshold, R²)', 'κ = 25 (required slowdown, ×)')
        >>> threshold_label("stability", 0.02, "accuracy")
        'δ_stab = 0.02 (max utility drop, accuracy)'

    """
    shown = THRESHOLD_DEFAULTS.get(key, DASH) if value is None else _plain(value)
    if key not in THRESHOLD_TEXT:
        return f"{key} = {shown}"
    symbol, meaning, unit = THRESHOLD_TEXT[key]
    return f"{symbol} = {shown} ({meaning}, {unit or score})"


def _plain(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return fmt_num(value)


def display_name(method: str) -> str:
    """Human-readable name of a method key; unknown keys are returned as-is."""
    return METHOD_NAMES.get(method, method)


def fmt_num(x: float | int | None, digits: int = 4) -> str:
    """Format a number with 3–4 significant digits.

    Args:
        x: the number; ``None`` stands for "not measured".
        digits: significant digits in fixed notation (scientific notation always shows 3).

    Returns:
        ``"—"`` for ``None``, ``"nan"``/``"∞"``/``"-∞"`` for non-finite values, scientific notation with
        3 significant digits (``"2.10e+05"``) when ``|x| >= 1e4`` or ``|x| < 1e-3``, else up to 4
        significant digits (``"356.2"``, ``"0.053"``).

    Example:
        >>> fmt_num(356.2), fmt_num(0.053), fmt_num(2.1e5), fmt_num(None), fmt_num(37.0)
        ('356.2', '0.053', '2.10e+05', '—', '37')

    """
    if x is None:
        return DASH
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    if SCI_LOW <= abs(x) < SCI_HIGH:
        return f"{x:.{digits}g}"
    return f"{x:.2e}"


def fmt_mean_std(mean: float | None, std: float | None, n: int | None = None) -> str:
    """``"mean ± std"`` (mean to 4, std to 3 significant digits), or only the mean for a single value.

    Example:
        >>> fmt_mean_std(18.92, 0.59397, 3), fmt_mean_std(18.92, 0.0, 1), fmt_mean_std(None, None)
        ('18.92 ± 0.594', '18.92', '—')

    """
    if mean is None:
        return DASH
    if std is None or (n is not None and n < 2):
        return fmt_num(mean)
    return f"{fmt_num(mean)} ± {fmt_num(std, digits=3)}"


def attack_label(attack: Mapping[str, Any]) -> str:
    """Plain description of an attacker setting, e.g. ``"GD, exact line search"`` or ``"Adam (lr 0.01)"``."""
    opt = str(attack.get("optimizer") or attack.get("key") or "attack")
    lr = attack.get("lr")
    lr_txt = f"lr {fmt_num(lr)}" if lr is not None else "default lr"
    batch = attack.get("batch_size")
    batch_txt = f", batch {batch}" if batch is not None else ""
    if opt == "gd_exact":
        return "GD, exact line search"
    if opt == "gd":
        return f"GD, fixed step ({lr_txt})"
    if opt == "sgd":
        return f"SGD ({lr_txt}{batch_txt})"
    if opt == "adam":
        return f"Adam ({lr_txt}{batch_txt})"
    return f"{opt} ({lr_txt})"


def method_order(results: Mapping[str, Any]) -> list[str]:
    """List method keys in display order: ``config.methods`` first, then any other method.

    ``results.json`` is written with sorted keys, so the order of ``methods`` itself is alphabetical;
    the run's intended order lives in ``config["methods"]`` (strings or objects with a ``key``).
    """
    methods = results.get("methods")
    if not isinstance(methods, Mapping):
        return []
    config = results.get("config")
    declared = config.get("methods") if isinstance(config, Mapping) else None
    order: list[str] = []
    for item in declared if isinstance(declared, list) else []:
        key = item.get("key") if isinstance(item, Mapping) else item
        if isinstance(key, str) and key in methods and key not in order:
            order.append(key)
    return order + [m for m in methods if m not in order]


def attack_by_key(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Key the ``attacks`` list of a results record by attack key (display order kept)."""
    out: dict[str, Mapping[str, Any]] = {}
    for attack in results.get("attacks") or []:
        if isinstance(attack, Mapping) and "key" in attack:
            out[str(attack["key"])] = attack
    return out


def safe_filename(text: str) -> str:
    """Keep letters, digits, ``-``, ``_`` and ``.``; replace anything else with ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def atomic_target(path: Path, suffix: str = "") -> contextlib.AbstractContextManager[Path]:
    """A temporary path next to ``path``, moved onto it only if the block succeeds (``_atomic``)."""
    return atomic_path(path, suffix=suffix + ".tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text to ``path`` atomically with the user's umask (:mod:`immunekit._atomic`)."""
    _write_text(path, text)


def read_kind_record(path: str | Path, kind: str, label: str, required: Sequence[str]) -> dict[str, Any]:
    """Read a ``results.json`` of one record ``kind`` and check its required top-level keys.

    Args:
        path: the file.
        kind: the ``kind`` it must have.
        label: what to call it in messages, with its article, e.g. ``"a deep vision record"``.
        required: keys that must be present.

    Raises:
        ReportError: missing file, not JSON, another kind, or a required key missing (named, with the fix).

    """
    from immunekit.reports.schema import RERUN_HINT, ReportError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist; {RERUN_HINT}") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc}); {RERUN_HINT}") from None
    if not isinstance(data, Mapping) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, Mapping) else type(data).__name__
        raise ReportError(f"{path} is not {label} (kind {found!r}); render it with write_report")
    missing = [k for k in required if k not in data]
    if missing:
        raise ReportError(f"{path}: missing key(s) {missing}; {RERUN_HINT}")
    return dict(data)


def write_figures_and_report(
    results: Mapping[str, Any],
    out: Path,
    plots: Mapping[str, tuple[str, Callable[[Mapping[str, Any], Path], Any]]],
    render: Callable[[Mapping[str, Any], Mapping[str, str]], str],
    source: Path,
) -> Path:
    """Draw the figures, then write ``report.md`` rendered with the figures drawn.

    ``plots`` maps a figure key to ``(file name, plot(results, path))``; a figure is skipped without
    matplotlib or when its plot returns ``None``.

    Returns:
        The path of ``report.md``.

    """
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning(
            "matplotlib is not installed (pip install 'immunekit[plots]'); the report has no figures"
        )
    else:
        for key, (name, plot) in plots.items():
            if plot(results, out / name) is not None:
                figures[key] = name
    report = out / "report.md"
    _write_text(report, render(results, figures))
    logger.info("wrote %s (%d figure(s)) from %s", report, len(figures), source)
    return report
