"""Condition numbers with pseudo-inverse semantics, computed in float64.

κ(S) = σ_max / σ_min⁺, where σ_min⁺ is the smallest singular value above a *relative* rank
threshold ``rtol · σ_max``. Null directions (σ ≤ threshold) are excluded, so a rank-deficient
matrix has a finite κ that describes the retained spectrum; the numerical rank is returned
with it so callers can see what was dropped.

The toolkit's rank rule (methods/condition_number.md §7.1) decides rank on the singular values of
a *factor*: :func:`gram_condition_number` for S = ΦᵀΦ, and :class:`~immunekit.spectral.rank.FactorSpectrum`
for K = XᵀX and θᵀKθ (null(K) decided once on X). :func:`psd_factor` and ``hermitian=True`` are for
the case where only the matrix S is available (``eigvalsh`` at dim·eps·λ_max). An explicit ``rtol``
must lie in (0, 1) (:func:`check_rtol`).

References:
    Zheng et al., Model Immunization from a Condition Number Perspective, arXiv 2505.23760, Eq. 1.

"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from immunekit.errors import ConfigError, NumericalError

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


def check_rtol(rtol: float, *, name: str = "rtol") -> float:
    """An explicit relative rank threshold, validated: it must lie in the open interval (0, 1).

    rtol ≤ 0 keeps rounding noise as rank (κ then measures the noise floor); rtol ≥ 1 drops every
    direction. ``None`` (the default ``max(rows, cols)·eps_64``) is handled by the callers.

    Raises:
        ConfigError: naming the value and the fix.

    Example:
        >>> check_rtol(1e-10)
        1e-10

    """
    ok = isinstance(rtol, int | float) and not isinstance(rtol, bool) and math.isfinite(rtol)
    if not ok or not 0.0 < float(rtol) < 1.0:
        raise ConfigError(
            f"{name} must be a relative threshold in (0, 1), got {rtol!r}; pass {name}=None for the "
            "default max(rows, cols)·eps_64, or a value such as 1e-10"
        )
    return float(rtol)


def _resolve_rtol(rtol: float | None, rows: int, cols: int) -> float:
    return default_rtol(rows, cols) if rtol is None else check_rtol(rtol)


def check_matrix(a: Tensor, name: str) -> Tensor:
    """``a`` as a detached float64 matrix; NumericalError naming ``name`` if not 2-D or not finite."""
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
    a = check_matrix(a, "matrix")
    m, n = a.shape
    tol = _resolve_rtol(rtol, m, n)
    if hermitian:
        if m != n:
            raise NumericalError(f"hermitian=True needs a square matrix, got {m}x{n}")
        values = torch.linalg.eigvalsh(0.5 * (a + a.T)).abs()
    else:
        values = torch.linalg.svdvals(a)
    return kappa_from_values(values, rtol=tol, dim=min(m, n))


def gram_condition_number(factor: Tensor, *, rtol: float | None = None, rank: int | None = None) -> KappaInfo:
    """κ(ΦᵀΦ) from the factor Φ without forming the Gram matrix: κ = (s_1 / s_r)².

    The rank rule of the toolkit (methods/condition_number.md §7.1): r = #{s_i > rtol · s_1} on
    the singular values of Φ. Thresholding the singular values of Φ is more accurate than
    eigenvalues of ΦᵀΦ, whose small eigenvalues are lost below ``eps · λ_max``.

    Args:
        factor: ``(N, D)`` feature matrix Φ.
        rtol: relative threshold on the singular values of Φ; default ``max(N, D) · eps_64``; an
            explicit value must lie in (0, 1).
        rank: a rank decided elsewhere (on the factor of K when Φ = F_K θ, see
            :class:`immunekit.spectral.rank.FactorSpectrum`): then r = min(rank, min(N, D)) and
            ``rtol`` is only recorded.

    Returns:
        KappaInfo of ΦᵀΦ (``sigma_*`` are eigenvalues of ΦᵀΦ, i.e. squared singular values of Φ).

    Raises:
        ConfigError: an explicit ``rtol`` outside (0, 1) or a negative ``rank``.

    Example:
        >>> phi = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> gram_condition_number(phi).kappa
        9.0

    """
    return gram_spectrum(factor, rtol=rtol, rank=rank)[0]


def kappa_fixed_rank(values: Tensor, *, rank: int, rtol: float, dim: int) -> KappaInfo:
    """κ = s_1 / s_r from descending singular values with r fixed (not re-thresholded).

    Used when the rank was decided on another factor (the data factor of K for H = θᵀKθ):
    r = min(rank, len(values)); κ = ``inf`` if s_r = 0 (θ annihilates a retained direction).

    Example:
        >>> values = torch.tensor([4.0, 2.0, 1e-20], dtype=torch.float64)
        >>> kappa_fixed_rank(values, rank=3, rtol=1e-12, dim=3).kappa
        4e+20

    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"rank must be an integer >= 0, got {rank!r}")
    v = values.detach().to(torch.float64).clamp_min(0.0)
    r = min(rank, int(v.numel()))
    if r == 0 or float(v[0]) == 0.0:
        return KappaInfo(math.inf, math.inf, 0, dim, rtol, 0.0, 0.0)
    smax, smin = float(v[0]), float(v[r - 1])
    if smin == 0.0:
        return KappaInfo(math.inf, math.inf, r, dim, rtol, smax, 0.0)
    return KappaInfo(smax / smin, math.log(smax) - math.log(smin), r, dim, rtol, smax, smin)


def gram_spectrum(
    factor: Tensor, *, rtol: float | None = None, rank: int | None = None
) -> tuple[KappaInfo, Tensor]:
    """:func:`gram_condition_number` and the singular values of Φ it was computed from (descending).

    The values give all eigenvalues of ΦᵀΦ (s², padded with zeros up to D) without another
    decomposition.

    Example:
        >>> info, s = gram_spectrum(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        >>> info.kappa, s.tolist()
        (9.0, [3.0, 1.0])

    """
    phi = check_matrix(factor, "factor")
    n, d = phi.shape
    tol = _resolve_rtol(rtol, n, d)
    values = torch.linalg.svdvals(phi)
    if rank is None:
        s = kappa_from_values(values, rtol=tol, dim=min(n, d))
    else:
        s = kappa_fixed_rank(values, rank=rank, rtol=tol, dim=min(n, d))
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

    Only for a K given without its data factor: with X at hand use
    :class:`~immunekit.spectral.rank.FactorSpectrum` (the rank rule decides on σ(X), which resolves
    λ/λ_max far below ``D·eps``).

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
    k = check_matrix(k, "K")
    d = k.shape[0]
    w, q = torch.linalg.eigh(0.5 * (k + k.T))
    tol = _resolve_rtol(rtol, d, d)
    keep = w > tol * float(w.max())
    return (w.clamp_min(0.0).sqrt() * keep.to(w.dtype))[:, None] * q.T
