"""The training loss of a task: one definition for the defenses' task term and the attacks.

A task's ``loss`` and the width C of the model's head fix the loss:

* ``mse`` → mean squared error over all N·C outputs, L = Σ(Z − Y)² / (N·C);
* ``ce`` with one output → squared loss on 0/1 targets, L = Σ(z − y)² / N. This is the ℓ2 threat
  model of arXiv 2505.23760 (the attacker fits a linear head by gradient descent on an ℓ2 loss, whose
  Hessian is the feature covariance the condition numbers are measured on), and the defenses' task
  term uses the same loss, so "the primary task stays trainable" is judged in the loss the attacks
  train with. (The reference code's BCE-with-logits task term is not used: with it a defense
  optimised a different objective from the one its card measured.) The predicted class is 1 iff z > ½;
* ``ce`` with C ≥ 2 outputs → cross-entropy of the softmax, L = −(1/N) Σ log softmax(Z)_{i,y_i}.

Every fine-tuning attack and every linear defense builds its loss from :class:`LossSpec`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from immunekit.errors import ConfigError, DataError

LOSS_RULE = "lossspec-v1"
"""Name of the loss rule, recorded with every trial (a results directory of another rule is refused)."""
LOSS_RULE_TEXT = (
    "one-output binary heads train on squared loss with 0/1 targets in attacks and defenses alike"
)

LossKind = Literal["mse", "squared_01", "cross_entropy"]

_DESCRIPTIONS: dict[str, str] = {
    "mse": "mean squared error",
    "squared_01": "squared loss on 0/1 targets (one-output binary head, ℓ2 threat model)",
    "cross_entropy": "cross-entropy",
}


class LossSpec:
    """The loss of a task with loss ``loss`` for a head with ``outputs`` columns.

    Args:
        loss: the task's loss, ``"mse"`` or ``"ce"``.
        outputs: head width C ≥ 1.
        dtype: floating dtype of the targets (the model's).

    Raises:
        ConfigError: ``loss`` is ``"lm"`` (not a fine-tuning loss yet) or unknown, or ``outputs`` < 1.

    Example:
        >>> LossSpec("ce", 1).kind
        'squared_01'

    """

    def __init__(self, loss: str, outputs: int, dtype: torch.dtype = torch.float64) -> None:
        if loss == "lm":
            raise ConfigError(
                "fine-tuning attacks and linear defenses do not support loss 'lm' yet (language "
                "models come in a later issue); use a task with loss 'mse' or 'ce'"
            )
        if loss not in ("mse", "ce"):
            raise ConfigError(f"unknown task loss {loss!r}; expected 'mse' or 'ce'")
        if outputs < 1:
            raise ConfigError(f"a head needs at least one output, got outputs={outputs}")
        self.loss, self.outputs, self.dtype = loss, outputs, dtype
        self.kind: LossKind = "mse" if loss == "mse" else ("squared_01" if outputs == 1 else "cross_entropy")

    def targets(self, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """Training targets of labels/values ``y`` of split ``name``, checked against the head width.

        Returns:
            ``(target, labels)``: ``target`` is ``(N, C)`` values (``mse``), ``(N, 1)`` 0/1 floats
            (``squared_01``) or ``(N,)`` class indices (``cross_entropy``); ``labels`` is what the task
            score compares against (the values for ``mse``, class indices otherwise).

        Raises:
            DataError: the number of target columns or the labels do not fit ``outputs``.

        """
        if self.kind == "mse":
            target = y.to(self.dtype).reshape(len(y), -1)
            if target.shape[1] != self.outputs:
                raise DataError(
                    f"split {name!r} has {target.shape[1]} target columns but the model has "
                    f"{self.outputs} outputs; use a head with one output per target column"
                )
            return target, target
        labels = y.reshape(-1).long()
        low, top = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
        if self.kind == "squared_01":
            if low < 0 or top > 1:
                raise DataError(
                    f"split {name!r} has labels in [{low}, {top}] but the model has one output "
                    "(binary 0/1 targets); use a head with one output per class"
                )
            return labels.to(self.dtype)[:, None], labels
        if low < 0 or top >= self.outputs:
            raise DataError(
                f"split {name!r} has labels in [{low}, {top}] but the model has {self.outputs} "
                "outputs; use a head with one output per class"
            )
        return labels, labels

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean loss of predictions ``pred`` ``(N, C)`` against ``target`` from :meth:`targets`."""
        if self.kind == "cross_entropy":
            return nn.functional.cross_entropy(pred, target)
        return nn.functional.mse_loss(pred, target)  # one fused kernel (forward and backward)

    def residual(self, pred: Tensor, target: Tensor) -> Tensor:
        """∂L/∂Z ``(N, C)`` in closed form: 2(Z − Y)/(N·C) (squared losses), (softmax(Z) − onehot(y))/N."""
        if self.kind == "cross_entropy":
            onehot = nn.functional.one_hot(target, pred.shape[1]).to(pred.dtype)
            return (torch.softmax(pred, dim=1) - onehot) / pred.shape[0]
        return 2.0 * (pred - target) / pred.numel()

    def describe(self) -> str:
        """One line naming the loss, for logs and results."""
        return _DESCRIPTIONS[self.kind]


def head_width(classes: int, loss: str, target_columns: int = 1) -> int:
    """Outputs of a head for a task: target columns (``mse``), 1 for binary ``ce``, C for C ≥ 3 classes.

    Args:
        classes: the task's number of classes (:attr:`immunekit.data.task.Task.classes`; 0 for ``mse``).
        loss: the task's loss.
        target_columns: regression target columns (``mse`` only).

    Example:
        >>> head_width(2, "ce"), head_width(10, "ce"), head_width(0, "mse", 3)
        (1, 10, 3)

    """
    if loss == "mse":
        return target_columns
    return 1 if classes <= 2 else classes
