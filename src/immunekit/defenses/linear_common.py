"""Pieces shared by the linear-extractor defenses: the primary task loss and its gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from immunekit.data.task import Dataset


def head_width(data: Dataset, loss: str) -> int:
    """Head outputs: target columns for regression, 1 for binary, C for C-class classification."""
    if loss == "mse":
        return 1 if data.y.ndim == 1 else int(data.y.shape[1])
    classes = int(data.y.max()) + 1
    return 1 if classes <= 2 else classes


def task_loss(x: Tensor, y: Tensor, theta: Tensor, omega: Tensor, loss: str) -> Tensor:
    """Primary loss L(D; ω, θ) of the linear model x ↦ xθω.

    Args:
        x: ``(N, D_in)``.
        y: ``(N,)`` or ``(N, C)`` targets (class indices for ``ce``).
        theta: ``(D_in, D_hid)``.
        omega: ``(D_hid, C)``.
        loss: ``"mse"`` (mean squared error) or ``"ce"`` (BCE-with-logits for one output, else CE).

    Returns:
        Scalar loss.

    """
    out = x @ theta @ omega
    if loss == "mse":
        return ((out - y.reshape(out.shape)) ** 2).mean()
    if out.shape[1] == 1:
        return functional.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype))
    return functional.cross_entropy(out, y.long())


def task_grads(data: Dataset, theta: Tensor, omega: Tensor, loss: str) -> tuple[float, Tensor, Tensor]:
    """L(D; ω, θ) and its closed-form gradients with respect to θ ``(D_in, D_hid)`` and ω ``(D_hid, C)``.

    With Z = Xθω and the loss's residual R = ∂L/∂Z (MSE: 2(Z − Y)/(N·C); BCE/CE: (p − Y)/N),
    ∇_ω L = (Xθ)ᵀR and ∇_θ L = Xᵀ R ωᵀ. Closed forms avoid autograd overhead in the inner loop.
    Products are ordered for a narrow head (C ≪ D): Z = X(θω), ∇_θ L = (XᵀR)ωᵀ and
    ∇_ω L = θᵀ(XᵀR), which costs O(N·D·C + D²·C) instead of the O(N·D²) of forming Xθ.
    """
    x = data.x.to(torch.float64)
    out = x @ (theta @ omega)
    n = out.shape[0]
    if loss == "mse":
        y = data.y.to(torch.float64).reshape(out.shape)
        value = float(((out - y) ** 2).mean())
        resid = 2.0 * (out - y) / out.numel()
    elif out.shape[1] == 1:
        y = data.y.to(torch.float64).reshape(out.shape)
        value = float(functional.binary_cross_entropy_with_logits(out, y))
        resid = (torch.sigmoid(out) - y) / n
    else:
        y = functional.one_hot(data.y.long(), out.shape[1]).to(torch.float64)
        value = float(functional.cross_entropy(out, data.y.long()))
        resid = (torch.softmax(out, dim=1) - y) / n
    xr = x.T @ resid  # (D_in, C)
    return value, xr @ omega.T, theta.T @ xr
