"""Minimum-norm least squares with a relative rank threshold, from a QR of A and an SVD of R.

For A of shape ``(N, D)`` with N ≥ D, a Householder QR A = Q R (Q: N×D with orthonormal columns,
R: D×D upper triangular) followed by an SVD R = U diag(s) Vᵀ gives the SVD A = (QU) diag(s) Vᵀ
without ever forming Q or QU. With r = #{s_i > rtol · s_1} retained singular values,

    A⁺ B = V_r diag(1/s_r) U_rᵀ (Qᵀ B)_{1:D},

which is ``torch.linalg.pinv(A, rtol=rtol) @ B`` in exact arithmetic and is backward stable in
floating point (Householder QR and the SVD both are). Cost: 2ND² − ⅔D³ for the QR, O(D³) for the
SVD of R and 4NDC to apply Qᵀ to a ``(N, C)`` right-hand side, against a thin SVD of A (which
forms Q and QU: about three times the QR) plus the D×N pseudo-inverse for ``pinv``. For N < D the
SVD of A itself is already small (Q = I and R = A).

The factorization is kept, so every right-hand side, the singular values (κ of AᵀA) and the
"core" R with A = QR (‖Ax‖ = ‖Rx‖, AᵀA = RᵀR) come from one decomposition.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from immunekit.errors import NumericalError
from immunekit.spectral.condition import KappaInfo, check_matrix, default_rtol, kappa_from_values

log = logging.getLogger(__name__)

F64 = torch.float64


def robust_svd(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, s, Vᴴ)`` of ``m`` that does not give up where LAPACK's gesdd does.

    gesdd (torch's CPU driver) can fail to converge on matrices with an extreme dynamic range,
    e.g. features whitened along directions at σ/σ₁ ≈ 10⁻¹⁰. The fallbacks, in order: the SVD of
    ``mᵀ`` (the same factorization, another iteration path), then the SVD of ``m`` scaled by its
    largest entry. Each fallback is logged; if all fail the LAPACK error is raised as a
    NumericalError naming the matrix shape.
    """
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError as first:
        log.warning(
            "SVD of a %s matrix did not converge (%s); retrying on its transpose", tuple(m.shape), first
        )
    try:
        u, s, vh = torch.linalg.svd(m.mT, full_matrices=False)
        return vh.mT, s, u.mT
    except torch.linalg.LinAlgError:
        log.warning("SVD of the transpose did not converge either; retrying on the rescaled matrix")
    scale = float(m.abs().max())
    try:
        u, s, vh = torch.linalg.svd(m / scale, full_matrices=False)
        return u, s * scale, vh
    except torch.linalg.LinAlgError as err:
        raise NumericalError(
            f"the SVD of a {tuple(m.shape)} matrix did not converge ({err}); its dynamic range is beyond "
            "float64 LAPACK here: check for features scaled by huge factors"
        ) from None


@dataclass(frozen=True, eq=False)
class MinNormLstsq:
    """A = Q T with orthonormal Q and a small core T, plus the SVD of T, for min-norm solves.

    For N ≥ D, T = R of a Householder QR (``(D, D)``, Q kept as reflectors); for N < D, Q = I and
    T = A (``(N, D)``). Either way the singular values of T are those of A.

    Attributes:
        shape: ``(N, D)`` of A.
        rtol: relative rank threshold: singular values ``≤ rtol · s_1`` are dropped (as ``pinv``).
        singular_values: ``(k,)`` singular values of A, descending, k = min(N, D).
        rank: numerical rank r.
        core: ``(k, D)`` the factor T with A = Q T.

    Example:
        >>> a = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        >>> f = MinNormLstsq.of(a)
        >>> x = f.solve(torch.tensor([[2.0], [2.0], [5.0]], dtype=torch.float64))
        >>> f.rank, [round(v, 12) for v in x.flatten().tolist()]
        (1, [1.0, 1.0])

    """

    shape: tuple[int, int]
    rtol: float
    singular_values: Tensor
    rank: int
    core: Tensor
    _reflectors: Tensor | None
    _tau: Tensor | None
    _u: Tensor
    _vh: Tensor

    @classmethod
    def of(cls, a: Tensor, *, rtol: float | None = None) -> MinNormLstsq:
        """Factorize A (float64).

        Args:
            a: ``(N, D)`` matrix.
            rtol: relative threshold on the singular values; default ``max(N, D) · eps_64`` (the
                rule of :func:`immunekit.spectral.default_rtol`).

        Raises:
            NumericalError: if ``a`` is not 2-D, has NaN/Inf, or ``rtol < 0``.

        """
        a = check_matrix(a, "A")
        n, d = a.shape
        tol = default_rtol(n, d) if rtol is None else float(rtol)
        if tol < 0:
            raise NumericalError(f"rtol must be >= 0, got {tol}; pass rtol=None for the default")
        if min(n, d) == 0:
            none = torch.zeros(0, 0, dtype=F64)
            return cls((n, d), tol, torch.zeros(0, dtype=F64), 0, a[:0], None, None, none, a[:0])
        reflectors = tau = None
        if n >= d:
            reflectors, tau = torch.geqrf(a.contiguous())
            core = reflectors[:d].triu()
        else:
            core = a
        u, s, vh = robust_svd(core)
        smax = float(s[0])
        rank = int((s > tol * smax).sum()) if smax > 0 else 0
        return cls((n, d), tol, s, rank, core, reflectors, tau, u[:, :rank], vh[:rank])

    def qt(self, b: Tensor) -> Tensor:
        """Coordinates of B in range(Q): ``(Qᵀ B)_{1:k}``, shape ``(k, C)`` for B of shape ``(N, C)``."""
        return self.project(b)[0]

    def project(self, b: Tensor) -> tuple[Tensor, Tensor]:
        """(QᵀB, ‖(I − QQᵀ)B‖² per column): ``(k, C)`` and ``(C,)``, from one application of Qᵀ.

        The second part is what no W can reach, so ‖AW − B‖²_F = ‖TW − QᵀB‖²_F + its sum: a sum of
        squares without cancellation.
        """
        b = self._rhs(b)
        k = min(self.shape)
        if self._reflectors is None or self._tau is None:  # Q = I (N < D), or Q is N×0 (D = 0)
            return b[:k], (b[k:] ** 2).sum(0)
        full = torch.ormqr(self._reflectors, self._tau, b, left=True, transpose=True)
        return full[:k], (full[k:] ** 2).sum(0)

    def solve_core(self, c: Tensor) -> Tensor:
        """The min-norm solution T⁺C, ``(D, C)``, of the core system for C ``(k, C)`` (solve = this ∘ qt)."""
        if self.rank == 0:
            return torch.zeros(self.shape[1], c.shape[1], dtype=F64)
        s = self.singular_values[: self.rank]
        return self._vh.T @ ((self._u.T @ c) / s[:, None])

    def solve(self, b: Tensor) -> Tensor:
        """The minimum-norm least-squares solution A⁺ B, shape ``(D, C)``."""
        return self.solve_core(self.qt(b))

    def gd_limit(self, b: Tensor, w0: Tensor, *, qtb: Tensor | None = None) -> Tensor:
        """w* = A⁺B + (I − A⁺A) w_0 = w_0 + T⁺(QᵀB − T w_0), the limit of GD on ‖AW − B‖² from w_0.

        Args:
            b: ``(N, C)`` targets.
            w0: ``(D, C)`` start.
            qtb: ``qt(b)`` if already computed (the result is the same, bit for bit).

        Returns:
            ``(D, C)``; equals ``solve(b)`` (bit for bit) for w_0 = 0.

        """
        c = self.qt(b) if qtb is None else qtb
        w0 = w0.to(F64)
        if not bool(w0.any()):
            return self.solve_core(c)
        return w0 + self.solve_core(c - self.core @ w0)

    def gram_kappa(self) -> KappaInfo:
        """κ(AᵀA) as :func:`immunekit.spectral.gram_condition_number` ``(A, rtol=self.rtol)`` reports it.

        The same thresholding of the same singular values (here from the SVD of T), so the two agree
        to rounding: κ = (s_1 / s_r)², ``sigma_*`` are eigenvalues of AᵀA.
        """
        n, d = self.shape
        s = kappa_from_values(self.singular_values, rtol=self.rtol, dim=min(n, d))
        if s.rank == 0:
            return s
        return KappaInfo(
            kappa=s.kappa**2,
            log_kappa=2 * s.log_kappa,
            rank=s.rank,
            dim=d,
            rtol=self.rtol,
            sigma_max=s.sigma_max**2,
            sigma_min=s.sigma_min**2,
        )

    @property
    def sigma_max(self) -> float:
        """s_1 = ‖A‖₂ (0 for an empty or zero matrix)."""
        return float(self.singular_values[0]) if self.singular_values.numel() else 0.0

    def _rhs(self, b: Tensor) -> Tensor:
        b = b.detach().to(F64)
        if b.ndim != 2 or b.shape[0] != self.shape[0]:
            raise NumericalError(f"B must be ({self.shape[0]}, C), got shape {tuple(b.shape)}")
        return b


def min_norm_lstsq(a: Tensor, b: Tensor, *, rtol: float | None = None) -> Tensor:
    """A⁺B with a relative rank threshold (``pinv(A, rtol) @ B`` without the pseudo-inverse).

    Args:
        a: ``(N, D)``.
        b: ``(N, C)``.
        rtol: singular values ``≤ rtol · s_1`` are dropped; default ``max(N, D) · eps_64``.

    Returns:
        ``(D, C)`` minimum-norm least-squares solution.

    Example:
        >>> a = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> min_norm_lstsq(a, torch.tensor([[4.0], [3.0]], dtype=torch.float64)).flatten().tolist()
        [2.0, 0.0]

    """
    return MinNormLstsq.of(a, rtol=rtol).solve(b)


__all__ = ["MinNormLstsq", "min_norm_lstsq"]
