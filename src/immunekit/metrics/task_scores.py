"""Task scores: how well a model does a task, higher = better (harm and utility of the harm curve).

* ``mse`` (regression): R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)², summed over every row and output column, with
  ȳ the per-column mean. Range (−∞, 1]; 0 is the constant predictor ȳ.
* ``ce`` (classification): accuracy. A one-column prediction is class 1 iff ŷ > ½ (the ℓ2 threat
  model: binary tasks with one output are trained with squared loss on 0/1 targets, as the linear
  probe does); a prediction with C ≥ 2 columns is its argmax. Range [0, 1].

Harm h is the score on the harmful held-out split, utility u the score on ``eval_primary``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from immunekit.errors import ConfigError, DataError

_RANGES: dict[str, tuple[float, float]] = {"mse": (float("-inf"), 1.0), "ce": (0.0, 1.0), "lm": (0.0, 1.0)}
"""``lm``: the harm of a language model is a judged harmfulness rate, its utility 1 / perplexity."""


def score_range(loss: str) -> tuple[float, float]:
    """(lowest, highest) value :func:`task_score` can take for ``loss``, to validate thresholds.

    Example:
        >>> score_range("ce")
        (0.0, 1.0)

    """
    if loss not in _RANGES:
        raise ConfigError(f"no task score for loss {loss!r}; choose one of {sorted(_RANGES)}")
    return _RANGES[loss]


def _labels(y: Tensor) -> Tensor:
    """Class indices ``(N,)`` from indices ``(N,)``/``(N, 1)`` or one-hot/score rows ``(N, C ≥ 2)``."""
    if y.ndim == 2 and y.shape[1] > 1:
        return y.argmax(1)
    y = y.reshape(-1)
    return (y > 0.5).long() if y.is_floating_point() else y.long()


def task_score(pred: Tensor, y: Tensor, loss: Literal["mse", "ce"]) -> float:
    """Score of predictions on one split: R² (``mse``) or accuracy (``ce``); higher is better.

    Args:
        pred: ``(N, C)`` model outputs (``(N,)`` is read as one column).
        y: targets: ``(N,)`` or ``(N, C)`` values for ``mse``; class indices ``(N,)``/``(N, 1)``
            (0/1 floats are read with threshold ½) or one-hot ``(N, C ≥ 2)`` rows for ``ce``.
        loss: ``"mse"`` or ``"ce"``.

    Returns:
        R² = 1 − Σ(y − ŷ)²/Σ(y − ȳ)² for ``mse``; for ``ce`` the share of rows whose predicted class
        (ŷ > ½ for one column, argmax for C ≥ 2) equals the label.

    Raises:
        ConfigError: ``loss`` is not ``mse``/``ce``.
        DataError: shapes do not match, the split is empty, or ``mse`` targets are constant (R² undefined).

    Example:
        >>> task_score(torch.tensor([[0.9], [0.2], [0.7]]), torch.tensor([1, 0, 0]), "ce")
        0.6666666666666666
        >>> task_score(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), "mse")
        1.0

    """
    score_range(loss)
    pred = pred.detach()
    if pred.ndim == 1:
        pred = pred[:, None]
    if pred.ndim != 2 or pred.shape[0] != y.shape[0] or pred.shape[0] == 0:
        raise DataError(
            f"task_score needs (N, C) predictions for N = len(y) > 0 targets, got pred "
            f"{tuple(pred.shape)} and y {tuple(y.shape)}"
        )
    if loss == "ce":
        got = pred.argmax(1) if pred.shape[1] > 1 else (pred[:, 0] > 0.5).long()
        return float((got == _labels(y)).to(torch.float64).mean())
    pred = pred.to(torch.float64)
    if y.numel() != pred.numel():
        raise DataError(
            f"R² needs one target per output, got pred {tuple(pred.shape)} and y {tuple(y.shape)}"
        )
    target = y.detach().to(torch.float64).reshape(pred.shape)
    total = float(((target - target.mean(0)) ** 2).sum())
    if total == 0.0:
        raise DataError("R² is undefined for constant targets; evaluate on a split whose targets vary")
    return 1.0 - float(((target - pred) ** 2).sum()) / total
