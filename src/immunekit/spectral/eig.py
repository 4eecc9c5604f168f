"""Extreme eigenvalues of symmetric operators: dense ``eigh`` or matrix-free Lanczos.

Lanczos only needs ``v ↦ A v`` (e.g. a Hessian-vector product), so it scales to probe Hessians
that are never formed. Full re-orthogonalisation keeps it stable for the few dozen iterations
needed here; convergence is judged by the Ritz residual ‖A y − θ y‖ = |β_m s_m|.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from immunekit.errors import NumericalError
from immunekit.spectral.hessians import symmetrize

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ExtremeEigs:
    """Largest and smallest eigenvalue estimates of a symmetric operator.

    Attributes:
        lambda_max: largest eigenvalue.
        lambda_min: smallest eigenvalue.
        method: ``"eigh"`` or ``"lanczos"``.
        converged: both residuals below ``tol · |λ|max`` (always true for ``eigh``).
        num_iters: Lanczos iterations (0 for ``eigh``).
        residual_max: Ritz residual of λ_max (0 for ``eigh``).
        residual_min: Ritz residual of λ_min (0 for ``eigh``).

    """

    lambda_max: float
    lambda_min: float
    method: str
    converged: bool
    num_iters: int
    residual_max: float = 0.0
    residual_min: float = 0.0


def dense_extreme_eigs(a: Tensor) -> ExtremeEigs:
    """Extreme eigenvalues of a dense symmetric ``(n, n)`` matrix with ``eigvalsh`` in float64.

    Example:
        >>> e = dense_extreme_eigs(torch.diag(torch.tensor([3.0, -1.0, 2.0])))
        >>> e.lambda_max, e.lambda_min
        (3.0, -1.0)

    """
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise NumericalError(f"expected a square matrix, got shape {tuple(a.shape)}")
    w = torch.linalg.eigvalsh(symmetrize(a.detach().to(torch.float64)))
    return ExtremeEigs(float(w[-1]), float(w[0]), "eigh", True, 0)


def lanczos_extreme_eigs(
    matvec: MatVec,
    dim: int,
    *,
    max_iters: int = 100,
    tol: float = 1e-10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> ExtremeEigs:
    """Lanczos with full re-orthogonalisation for the extreme eigenvalues of a symmetric operator.

    Args:
        matvec: ``v ↦ A v`` for ``v`` of shape ``(dim,)``; ``A`` must be symmetric.
        dim: operator dimension n.
        max_iters: Krylov dimension cap (≤ ``dim``).
        tol: relative residual tolerance, ``|β_m s_m| ≤ tol · max|θ|``.
        generator: RNG for the start vector (results are then reproducible).
        dtype: working dtype (float64 by default).

    Returns:
        ExtremeEigs with ``converged``, ``num_iters`` and both residuals.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> e = lanczos_extreme_eigs(lambda v: a @ v, 50, generator=torch.Generator().manual_seed(0))
        >>> round(e.lambda_max, 8), round(e.lambda_min, 8), e.converged
        (50.0, 1.0, True)

    """
    if dim < 1 or max_iters < 1:
        raise NumericalError(f"dim and max_iters must be >= 1, got dim={dim}, max_iters={max_iters}")
    m_cap = min(max_iters, dim)
    q = torch.randn(dim, generator=generator, dtype=dtype)
    q = q / q.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    result = None
    for j in range(m_cap):
        w = matvec(basis[j]).to(dtype)
        alpha = float(w @ basis[j])
        alphas.append(alpha)
        stacked = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - stacked.T @ (stacked @ w)
        beta = float(w.norm())
        result = _ritz(alphas, betas, beta, j + 1)
        # Invariant subspace found (β ≈ 0), judged relative to the spectrum's scale like the
        # residuals: an absolute floor of 1 would stop a small-scale operator after one step.
        if result.converged_at(tol) or beta <= tol * max(abs(result.lmax), abs(result.lmin)):
            return result.done("lanczos", True)
        if j + 1 < m_cap:
            betas.append(beta)
            basis.append(w / beta)
    assert result is not None
    return result.done("lanczos", result.converged_at(tol))


@dataclass(frozen=True)
class _Ritz:
    lmax: float
    lmin: float
    rmax: float
    rmin: float
    iters: int

    def converged_at(self, tol: float) -> bool:
        scale = max(abs(self.lmax), abs(self.lmin), math.ulp(1.0))
        return self.rmax <= tol * scale and self.rmin <= tol * scale

    def done(self, method: str, converged: bool) -> ExtremeEigs:
        return ExtremeEigs(self.lmax, self.lmin, method, converged, self.iters, self.rmax, self.rmin)


def _ritz(alphas: list[float], betas: list[float], beta_next: float, m: int) -> _Ritz:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    res = (beta_next * s[-1, :]).abs()
    return _Ritz(float(theta[-1]), float(theta[0]), float(res[-1]), float(res[0]), m)


def extreme_eigs(
    operator: Tensor | MatVec,
    dim: int | None = None,
    *,
    method: str = "auto",
    dense_max_dim: int = 2048,
    **lanczos_kwargs: object,
) -> ExtremeEigs:
    """Extreme eigenvalues of a dense matrix or a matrix-free operator.

    Args:
        operator: a symmetric ``(n, n)`` tensor, or a callable ``v ↦ A v``.
        dim: operator dimension (required for callables).
        method: ``"eigh"``, ``"lanczos"`` or ``"auto"`` (``eigh`` for tensors up to ``dense_max_dim``).
        dense_max_dim: size above which ``auto`` switches a dense matrix to Lanczos.
        **lanczos_kwargs: forwarded to :func:`lanczos_extreme_eigs`.

    Returns:
        ExtremeEigs.

    """
    if method not in ("auto", "eigh", "lanczos"):
        raise NumericalError(f"unknown method {method!r}; choose 'auto', 'eigh' or 'lanczos'")
    if isinstance(operator, Tensor):
        n = operator.shape[0]
        if method == "eigh" or (method == "auto" and n <= dense_max_dim):
            return dense_extreme_eigs(operator)
        a = symmetrize(operator.detach().to(torch.float64))
        return lanczos_extreme_eigs(lambda v: a @ v, n, **lanczos_kwargs)  # type: ignore[arg-type]
    if dim is None:
        raise NumericalError("a matrix-free operator needs dim=<its dimension>")
    if method == "eigh":
        raise NumericalError("method='eigh' needs a dense matrix; use method='lanczos' for a callable")
    return lanczos_extreme_eigs(operator, dim, **lanczos_kwargs)  # type: ignore[arg-type]
