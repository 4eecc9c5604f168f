"""Pieces shared by the linear-extractor defenses: head width and the primary loss with its gradients.

The loss is :class:`immunekit.metrics.losses.LossSpec`, the one the attacks train with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from immunekit.data.task import Dataset, Task
from immunekit.metrics.losses import LossSpec, head_width


def task_head_width(task: Task, data: Dataset) -> int:
    """Outputs of a linear head on ``data`` of ``task``.

    :func:`~immunekit.metrics.losses.head_width` with the task's number of classes
    (:attr:`Task.classes`, the same for every split).
    """
    columns = 1 if data.y.ndim == 1 else int(data.y.shape[1])
    return head_width(task.classes, task.loss, columns)


def task_grads(data: Dataset, theta: Tensor, omega: Tensor, loss: str) -> tuple[float, Tensor, Tensor]:
    """L(D; ω, θ) and its closed-form gradients with respect to θ ``(D_in, D_hid)`` and ω ``(D_hid, C)``.

    With Z = Xθω and the loss's residual R = ∂L/∂Z (:meth:`LossSpec.residual`: 2(Z − Y)/(N·C) for the
    squared losses, (softmax(Z) − Y)/N for cross-entropy), ∇_ω L = (Xθ)ᵀR and ∇_θ L = Xᵀ R ωᵀ.
    Closed forms avoid autograd overhead in the inner loop. Products are ordered for a narrow head
    (C ≪ D): Z = X(θω), ∇_θ L = (XᵀR)ωᵀ and ∇_ω L = θᵀ(XᵀR), which costs O(N·D·C + D²·C) instead of
    the O(N·D²) of forming Xθ.
    """
    spec = LossSpec(loss, omega.shape[1], torch.float64)
    x = data.x.to(torch.float64)
    out = x @ (theta @ omega)
    target, _ = spec.targets(data.y, "defense data")
    value = float(spec(out, target))
    xr = x.T @ spec.residual(out, target)  # (D_in, C)
    return value, xr @ omega.T, theta.T @ xr
