"""Condition numbers with pseudo-inverse semantics, computed in float64.

κ(S) = σ_max / σ_min⁺, where σ_min⁺ is the smallest singular value above a *relative* rank
threshold ``rtol · σ_max``. Null directions (σ ≤ threshold) are excluded, so a rank-deficient
matrix has a finite κ that describes the retained spectrum; the numerical rank is returned
with it so callers can see what was dropped.

References:
    Zheng et al., Model Immunization from a Condition Number Perspective, arXiv 2505.23760, Eq. 1.

"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from immunekit.errors import NumericalError

EPS64 = float(torch.finfo(torch.float64).eps)


@dataclass(frozen=True)
class KappaInfo:
    """A condition number and how it was obtained.

    Attributes:
        kappa: σ_max / σ_min⁺ (``inf`` only if every singular value is zero).
        log_kappa: natural log of ``kappa`` (compare condition numbers in log space).
        rank: numerical rank r = #{σ_i > rtol · σ_max}.
        dim: min(rows, cols) of the matrix.
        rtol: relative threshold used.
        sigma_max: largest singular value.
        sigma_min: smallest retained singular value σ_r.

    """

    kappa: float
    log_kappa: float
    rank: int
    dim: int
    rtol: float
    sigma_max: float
    sigma_min: float

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready view."""
        return asdict(self)


def default_rtol(rows: int, cols: int) -> float:
    """The default relative rank threshold ``max(rows, cols) · eps_64`` (NumPy's ``matrix_rank`` rule)."""
    return max(rows, cols) * EPS64


def _check_matrix(a: Tensor, name: str) -> Tensor:
    if a.ndim != 2:
        raise NumericalError(f"{name} must be a 2-D matrix, got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise NumericalError(f"{name} contains NaN/Inf; check the inputs that produced it")
    return a.detach().to(torch.float64)


def kappa_from_values(values: Tensor, *, rtol: float, dim: int) -> KappaInfo:
    """κ from non-negative singular values (or PSD eigenvalues), any order.

    Args:
        values: ``(p,)`` singular values; negatives (rounding in PSD eigenvalues) count as zero.
        rtol: relative rank threshold; values ≤ ``rtol · max`` are treated as zero.
        dim: the matrix dimension recorded with the result.

    Returns:
        KappaInfo with pseudo-inverse semantics.

    """
    if rtol < 0:
        raise NumericalError(f"rtol must be >= 0, got {rtol}; pass rtol=None for the default")
    v = values.detach().to(torch.float64).clamp_min(0.0)
    smax = float(v.max()) if v.numel() else 0.0
    if smax == 0.0:
        return KappaInfo(math.inf, math.inf, 0, dim, rtol, 0.0, 0.0)
    kept = v[v > rtol * smax]
    smin = float(kept.min())
    return KappaInfo(smax / smin, math.log(smax) - math.log(smin), int(kept.numel()), dim, rtol, smax, smin)


def condition_number(a: Tensor, *, rtol: float | None = None, hermitian: bool = False) -> KappaInfo:
    """Pseudo-inverse condition number κ(A) = ‖A‖₂ ‖A⁺‖₂ of a matrix.

    Args:
        a: ``(m, n)`` matrix, any float dtype (computed in float64).
        rtol: relative rank threshold; default ``max(m, n) · eps_64``.
        hermitian: ``a`` is symmetric (PSD or not): use ``eigvalsh`` and |λ| (faster, symmetrised first).

    Returns:
        KappaInfo with κ, log κ and the numerical rank.

    Raises:
        NumericalError: if ``a`` is not 2-D or has NaN/Inf.

    Example:
        >>> info = condition_number(torch.diag(torch.tensor([4.0, 2.0, 0.0])))
        >>> info.kappa, info.rank
        (2.0, 2)

    """
    a = _check_matrix(a, "matrix")
    m, n = a.shape
    tol = default_rtol(m, n) if rtol is None else float(rtol)
    if hermitian:
        if m != n:
            raise NumericalError(f"hermitian=True needs a square matrix, got {m}x{n}")
        values = torch.linalg.eigvalsh(0.5 * (a + a.T)).abs()
    else:
        values = torch.linalg.svdvals(a)
    return kappa_from_values(values, rtol=tol, dim=min(m, n))


def gram_condition_number(factor: Tensor, *, rtol: float | None = None) -> KappaInfo:
    """κ(ΦᵀΦ) from the factor Φ without forming the Gram matrix: κ = (s_1 / s_r)².

    Thresholding the singular values of Φ (relative ``rtol``) is more accurate than eigenvalues
    of ΦᵀΦ, whose small eigenvalues are lost below ``eps · λ_max``.

    Args:
        factor: ``(N, D)`` feature matrix Φ.
        rtol: relative threshold on the singular values of Φ; default ``max(N, D) · eps_64``.

    Returns:
        KappaInfo of ΦᵀΦ (``sigma_*`` are eigenvalues of ΦᵀΦ, i.e. squared singular values of Φ).

    Example:
        >>> phi = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> gram_condition_number(phi).kappa
        9.0

    """
    return gram_spectrum(factor, rtol=rtol)[0]


def gram_spectrum(factor: Tensor, *, rtol: float | None = None) -> tuple[KappaInfo, Tensor]:
    """:func:`gram_condition_number` and the singular values of Φ it was computed from (descending).

    The values give all eigenvalues of ΦᵀΦ (s², padded with zeros up to D) without another
    decomposition.

    Example:
        >>> info, s = gram_spectrum(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> info.kappa, s.tolist()
        (9.0, [3.0, 1.0])

    """
    phi = _check_matrix(factor, "factor")
    n, d = phi.shape
    tol = default_rtol(n, d) if rtol is None else float(rtol)
    values = torch.linalg.svdvals(phi)
    s = kappa_from_values(values, rtol=tol, dim=min(n, d))
    if s.rank == 0:
        return s, values
    return (
        KappaInfo(
            kappa=s.kappa**2,
            log_kappa=2 * s.log_kappa,
            rank=s.rank,
            dim=d,
            rtol=tol,
            sigma_max=s.sigma_max**2,
            sigma_min=s.sigma_min**2,
        ),
        values,
    )


def psd_factor(k: Tensor, *, rtol: float | None = None) -> Tensor:
    """A factor F with FᵀF = K over K's retained spectrum: F = diag(√λ_i · [λ_i > rtol·λ_max]) Qᵀ.

    κ(θᵀKθ) computed as ``gram_condition_number(F @ θ)`` resolves small eigenvalues to ``eps``
    relative (instead of ``eps · λ_max`` for ``eigh`` of θᵀKθ), and K's null space is decided once,
    on K, with the same threshold as its pseudo-inverse.

    Args:
        k: ``(D, D)`` symmetric PSD matrix.
        rtol: relative threshold on K's eigenvalues; default ``D · eps_64``.

    Returns:
        ``(D, D)`` factor; rows of dropped eigenvalues are exactly zero.

    Example:
        >>> f = psd_factor(torch.diag(torch.tensor([4.0, 1.0, 0.0])))
        >>> bool(torch.allclose(f.T @ f, torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))))
        True

    """
    k = _check_matrix(k, "K")
    d = k.shape[0]
    w, q = torch.linalg.eigh(0.5 * (k + k.T))
    tol = default_rtol(d, d) if rtol is None else float(rtol)
    keep = w > tol * float(w.max())
    return (w.clamp_min(0.0).sqrt() * keep.to(w.dtype))[:, None] * q.T
