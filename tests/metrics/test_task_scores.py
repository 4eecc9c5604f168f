"""Task scores (metrics/task_scores.py): R² and accuracy, higher = the task is done better."""

from __future__ import annotations

import math

import pytest
import torch

from immunekit.errors import ConfigError, DataError
from immunekit.metrics.task_scores import score_range, task_score

F64 = torch.float64


def test_r2_equals_the_formula_over_all_columns() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20, 3, generator=g, dtype=F64)
    pred = y + 0.3 * torch.randn(20, 3, generator=g, dtype=F64)
    expected = 1.0 - float(((y - pred) ** 2).sum()) / float(((y - y.mean(0)) ** 2).sum())
    assert task_score(pred, y, "mse") == pytest.approx(expected, rel=1e-15)
    assert task_score(y, y, "mse") == 1.0
    assert task_score(y.mean(0).expand_as(y), y, "mse") == pytest.approx(0.0, abs=1e-15)
    assert task_score(-y, y, "mse") < 0.0


def test_r2_accepts_flat_targets_for_one_output() -> None:
    y = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    pred = torch.tensor([[1.0], [2.5], [3.5]], dtype=F64)
    assert task_score(pred, y, "mse") == pytest.approx(1.0 - 0.5 / (14 / 3), rel=1e-15)


def test_accuracy_one_column_thresholds_at_half_and_many_columns_take_argmax() -> None:
    pred = torch.tensor([[0.51], [0.5], [-1.0], [2.0]])
    assert task_score(pred, torch.tensor([1, 1, 0, 0]), "ce") == 0.5  # 0.5 is class 0
    assert task_score(pred, torch.tensor([[1.0], [1.0], [0.0], [0.0]]), "ce") == 0.5  # 0/1 float targets
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0]])
    assert task_score(logits, torch.tensor([0, 1, 0]), "ce") == pytest.approx(2 / 3)
    assert task_score(logits, torch.eye(3)[[0, 1, 0]], "ce") == pytest.approx(2 / 3)  # one-hot targets


def test_score_range() -> None:
    low, high = score_range("mse")
    assert math.isinf(low) and low < 0 and high == 1.0
    assert score_range("ce") == (0.0, 1.0)
    assert score_range("lm") == (0.0, 1.0)  # a judged harmfulness rate; utility 1/perplexity
    with pytest.raises(ConfigError, match="'poisson'"):
        score_range("poisson")


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(DataError, match="constant targets"):
        task_score(torch.zeros(4, 1), torch.ones(4), "mse")
    with pytest.raises(DataError, match="len"):
        task_score(torch.zeros(4, 1), torch.ones(5), "ce")
    with pytest.raises(DataError, match="one target per output"):
        task_score(torch.zeros(4, 2), torch.arange(4.0), "mse")
    with pytest.raises(ConfigError, match="'r2'"):
        task_score(torch.zeros(4, 1), torch.arange(4.0), "r2")  # type: ignore[arg-type]
