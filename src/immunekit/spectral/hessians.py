"""Linear-probe Hessians: the curvature an attacker meets when fitting a head on frozen features.

Conventions (κ is scale-invariant, so constant factors only matter for step sizes):

* ℓ2 on a linear extractor: ``H(θ) = θᵀ K θ`` with ``K = XᵀX`` (the factor 2 of ‖Xθw − y‖² dropped).
* ℓ2 on features Φ: ``H = ΦᵀΦ`` (Gauss–Newton proxy, Eq. 18 of arXiv 2505.23760).
* Binary logistic, mean loss: ``H = (1/N) Σ_n p_n(1−p_n) φ_n φ_nᵀ``, p_n = σ(φ_nᵀ w).
* Softmax cross-entropy, mean loss, W ∈ ℝ^{D×C} flattened row-major (index d·C + c):
  ``H = (1/N) Σ_n (φ_n φ_nᵀ) ⊗ (diag(p_n) − p_n p_nᵀ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from immunekit.errors import NumericalError


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def symmetrize(a: Tensor) -> Tensor:
    """(A + Aᵀ)/2 — removes rounding asymmetry before ``eigh``."""
    return 0.5 * (a + a.transpose(-1, -2))


def covariance(x: Tensor) -> Tensor:
    """Uncentred second-moment matrix K = XᵀX in float64.

    Args:
        x: ``(N, D)`` inputs.

    Returns:
        ``(D, D)`` symmetric PSD matrix.

    """
    x = _f64(x)
    if x.ndim != 2:
        raise NumericalError(f"inputs must be (N, D), got shape {tuple(x.shape)}")
    return symmetrize(x.T @ x)


def linear_l2_hessian(theta: Tensor, k: Tensor) -> Tensor:
    """ℓ2 linear-probe Hessian of a linear extractor, H(θ) = θᵀ K θ.

    Args:
        theta: ``(D_in, D_hid)`` extractor.
        k: ``(D_in, D_in)`` input second-moment matrix XᵀX.

    Returns:
        ``(D_hid, D_hid)`` symmetric matrix.

    Example:
        >>> linear_l2_hessian(torch.eye(2), torch.diag(torch.tensor([2.0, 1.0]))).diagonal()
        tensor([2., 1.], dtype=torch.float64)

    """
    theta, k = _f64(theta), _f64(k)
    if k.shape != (theta.shape[0], theta.shape[0]):
        raise NumericalError(
            f"K must be ({theta.shape[0]}, {theta.shape[0]}) for θ of shape {tuple(theta.shape)}, "
            f"got {tuple(k.shape)}"
        )
    return symmetrize(theta.T @ k @ theta)


def l2_probe_hessian(features: Tensor) -> Tensor:
    """ℓ2 probe Hessian (Gauss–Newton proxy) ΦᵀΦ of features ``(N, D)``."""
    return covariance(features)


def logistic_probe_hessian(features: Tensor, w: Tensor) -> Tensor:
    """Hessian of the mean binary logistic loss in the head ``w``.

    Args:
        features: ``(N, D)`` Φ.
        w: ``(D,)`` head weights.

    Returns:
        ``(D, D)``: (1/N) Φᵀ diag(p(1−p)) Φ.

    """
    phi, w = _f64(features), _f64(w).reshape(-1)
    p = torch.sigmoid(phi @ w)
    return symmetrize(phi.T @ (phi * (p * (1 - p))[:, None]) / phi.shape[0])


def softmax_probe_hessian(features: Tensor, w: Tensor) -> Tensor:
    """Hessian of the mean softmax cross-entropy in the head ``W``, flattened row-major.

    Args:
        features: ``(N, D)`` Φ.
        w: ``(D, C)`` head weights.

    Returns:
        ``(D·C, D·C)``: (1/N) Σ_n (φ_nφ_nᵀ) ⊗ (diag(p_n) − p_n p_nᵀ).

    """
    phi, w = _f64(features), _f64(w)
    n, d = phi.shape
    c = w.shape[1]
    p = torch.softmax(phi @ w, dim=1)  # (N, C)
    a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
    h = torch.einsum("ni,nj,nab->iajb", phi, phi, a) / n  # (D, C, D, C)
    return symmetrize(h.reshape(d * c, d * c))
