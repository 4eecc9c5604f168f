"""Certified iterative extreme spectra of Gram matrices A = MMᵀ (warm-started Lanczos).

The spectral terms of Algorithm 1 and its safeguard need only a few extreme eigenpairs of a probe
Hessian H = θᵀKθ = MᵀM, M = F·θ ``(r, D)`` with F the thin factor of K (FᵀF = K, r = rank K decided
once per task). The non-zero eigenvalues of H are those of the ``r × r`` Gram A = MMᵀ, and an
eigenvector u of A gives the eigenvector v = Mᵀu/√λ of H. Here:

* λ_max (and λ_2) with their eigenvectors: Lanczos on A (full re-orthogonalisation);
* λ_min (the smallest *retained* eigenvalue, λ_r): Lanczos on A⁻¹ = R⁻¹R⁻ᵀ with R the triangular
  factor of a QR of Mᵀ (RᵀR = A, without squaring the conditioning); its top eigenvalue is 1/λ_min.

**Certificate.** For a symmetric operator B and a unit Ritz vector y with Rayleigh quotient ρ and
residual r = By − ρy, some eigenvalue of B lies within ‖r‖ of ρ (the certified bound), and within
‖r‖²/gap when the other eigenvalues are at least ``gap`` away from ρ (reported as ``gap_bound``
with the gap estimated from the other Ritz values, less their residuals: an estimate, since an
unresolved cluster hides its members). The residual is recomputed explicitly for every value
returned. That the certified eigenvalue is the *extreme* one rests on Lanczos' convergence from a
start with a component along it (a fixed pseudo-random part is added to every warm start). The
inverse operator is the computed R⁻¹R⁻ᵀ, not A⁻¹: its distance to A is bounded *relatively*, on
M̂ = D⁻¹M (D = row norms of M; F·θ has rows graded like s_i, and Householder QR does not see the
scaling), by :func:`graded_error_bound`:

    |λ_i(A) − λ_i(Ã)| / λ_i(A) ≤ ε_A ≈ 2c·√r·‖R̂⁻¹‖₂ + 8γ_r·‖R̂⁻¹‖₂‖R̂‖₂,   c = 8·max(r, D)·eps

(Demmel & Veselić 1992; Higham 2002 §8, §19). λ_min is certified only when ε_A plus the Ritz
bound is below ``min_tol``. Small eigenvalues of an ill-conditioned A are
therefore certified *relative to themselves* (an absolute residual bound on A would be
eps·λ_max, useless for κ ≈ 10¹³), as ``svdvals`` of M resolves them on the dense path.

**Fall-back.** When R is singular, ε_A is too large, or a Lanczos run does not meet its bound
within ``max_iters``, the dense path (``svd`` of M) gives the values and vectors, a ``logging``
warning says why, and :class:`SolverStats` counts it. An uncertified value is never returned.

References:
    Parlett, The Symmetric Eigenvalue Problem, 1998, Thm 4.5.1 (residual bound), §11.7 (gap bound);
    Demmel & Veselić, Jacobi's method is more accurate than QR, SIAM J. Matrix Anal. Appl. 1992.

"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from immunekit.errors import ConfigError, NumericalError
from immunekit.registry import did_you_mean
from immunekit.spectral.condition import EPS64

log = logging.getLogger(__name__)

F64 = torch.float64

SOLVERS = ("dense", "lanczos")
"""Names of the spectral solvers: ``dense`` (SVD of the factor; the reference) and ``lanczos``."""

DEFAULT_REL_TOL = 1e-8
"""Default certified relative error bound on λ_1, λ_2 (the residual bound ‖r‖ ≤ rel_tol·λ_1)."""

DEFAULT_VEC_TOL = 1e-8
"""Default relative residual target ‖r‖ ≤ vec_tol·λ_1: eigenvector angles ≤ vec_tol·λ_1/gap."""

DEFAULT_MIN_TOL = 1e-6
"""Default certified relative bound on λ_min: the graded error analysis (ε_A above) is pessimistic
by up to a factor r, so the smallest value is held to this looser, still ample, level."""

DEFAULT_MAX_ITERS = 120
"""Default cap on Lanczos iterations per run; beyond it the dense path is used (recorded)."""


def check_solver(name: object, *, where: str = "spectral.solver") -> str:
    """A solver name, validated against :data:`SOLVERS` (with a did-you-mean hint).

    Raises:
        ConfigError: an unknown name.

    Example:
        >>> check_solver("lanczos")
        'lanczos'

    """
    if not isinstance(name, str) or name not in SOLVERS:
        raise ConfigError(f"{where}: unknown solver {name!r}{did_you_mean(str(name), list(SOLVERS))}")
    return name


def _gamma(n: int) -> float:
    u = n * EPS64
    return u / (1.0 - u)


@dataclass
class SolverStats:
    """Counters of one fit's iterative spectra (recorded with the trial).

    Attributes:
        calls: certified solves attempted.
        iterations: Lanczos iterations over all solves.
        fallbacks: solves that fell back to the dense path.
        reasons: why, per fall-back (first few kept).
        seconds: wall time spent in the solves (Gram, QR, Lanczos, fall-backs).

    """

    calls: int = 0
    iterations: int = 0
    fallbacks: int = 0
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fell_back(self, reason: str) -> None:
        """Count a fall-back, keep its reason and warn."""
        self.fallbacks += 1
        if len(self.reasons) < 8:
            self.reasons.append(reason)
        log.warning("iterative spectrum not certified, dense fall-back: %s", reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {
            "calls": self.calls,
            "iterations": self.iterations,
            "fallbacks": self.fallbacks,
            "fallback_reasons": list(self.reasons),
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class RitzPair:
    """A certified eigenpair estimate of a symmetric operator.

    Attributes:
        value: Rayleigh quotient ρ = yᵀBy.
        vector: unit Ritz vector y ``(n,)``.
        residual: ‖By − ρy‖ (computed explicitly, plus a rounding allowance).
        bound: certified bound on |λ − ρ| for an eigenvalue λ of B: the residual ‖r‖.
        gap_bound: ‖r‖²/gap with the gap estimated from the other Ritz values (less their
            residuals). Much tighter, but only an estimate: inside a cluster that Lanczos has not
            resolved the Ritz gap overstates the true one, so it is reported, never certified.

    """

    value: float
    vector: Tensor
    residual: float
    bound: float
    gap_bound: float


@dataclass(frozen=True)
class LanczosResult:
    """Top Ritz pairs of one Lanczos run (descending) and whether all met the bound."""

    pairs: tuple[RitzPair, ...]
    iterations: int
    certified: bool


def lanczos_top(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    count: int = 1,
    rel_tol: float = DEFAULT_REL_TOL,
    vec_tol: float = DEFAULT_VEC_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    scale_error: float = 0.0,
) -> LanczosResult:
    """The ``count`` largest eigenpairs of a symmetric PSD operator, with residual certificates.

    Lanczos with full re-orthogonalisation (twice, Kahan–Parlett) from ``start`` (any non-zero
    vector; a previous step's eigenvector makes it a warm start). The Ritz residual estimates
    β_j|s_ji| are checked as the basis grows; once they predict success the Ritz vectors are formed
    and their residuals recomputed explicitly (one matvec each). A pair is certified when its
    ``bound ≤ rel_tol · ρ_1`` and its residual ``≤ vec_tol · ρ_1`` (which bounds the angle to the
    eigenvector by vec_tol·ρ_1/gap); λ_2 is judged on λ_1's scale, as the step bounds use it.

    Args:
        matvec: ``x ↦ Bx`` for ``x`` of shape ``(n,)``, B symmetric positive semi-definite.
        start: ``(n,)`` start vector.
        count: how many top pairs (1 or 2).
        rel_tol: relative tolerance on the eigenvalue bounds.
        vec_tol: relative tolerance on the residuals (eigenvector accuracy).
        max_iters: iteration cap (at most n).
        scale_error: relative error of one matvec (added to the residual as ``scale_error·‖B‖``).

    Returns:
        The pairs (descending), the iterations used and whether every pair is certified.

    Example:
        >>> b = torch.diag(torch.linspace(1.0, 10.0, 40, dtype=torch.float64))
        >>> res = lanczos_top(lambda x: b @ x, torch.ones(40, dtype=torch.float64), count=2)
        >>> round(res.pairs[0].value, 12), round(res.pairs[1].value, 6), res.certified
        (10.0, 9.769231, True)

    """
    n = start.numel()
    cap = max(1, min(max_iters, n))
    q = start.detach().to(F64).reshape(-1)
    norm = float(q.norm())
    if not (math.isfinite(norm) and norm > 0.0):
        raise NumericalError("Lanczos start vector must be finite and non-zero")
    basis = torch.empty(cap, n, dtype=F64)
    q = q / norm
    alphas = torch.zeros(cap, dtype=F64)
    betas = torch.zeros(cap, dtype=F64)
    j = 0
    next_check = count
    while True:
        basis[j] = q
        w = matvec(q)
        alphas[j] = w @ q
        b = basis[: j + 1]
        for _ in range(2):
            w = w - b.T @ (b @ w)
        beta = float(w.norm())
        betas[j] = beta
        m = j + 1
        exhausted = m == n
        if m >= next_check or exhausted or m == cap:
            next_check = m + (1 if m < 16 else 3)
            theta, s = _tridiagonal_eigh(alphas[:m], betas[: m - 1])
            top = max(float(theta[-1]), 1e-300)
            exhausted = exhausted or beta <= 1e-14 * top
            c = min(count, m)
            est = (beta * s[-1, -c:]).abs()
            ok_est = bool((est <= 0.5 * min(rel_tol, vec_tol) * top).all())
            if (m >= count and ok_est) or exhausted or m == cap:
                pairs = _explicit_pairs(matvec, basis[:m], theta, s, c, scale_error)
                scale = max(pairs[0].value, 1e-300)
                ok = len(pairs) == count and all(
                    p.bound <= rel_tol * scale and p.residual <= vec_tol * scale for p in pairs
                )
                if ok or m == cap or exhausted:
                    return LanczosResult(pairs, m, ok)
        q = w / beta
        j += 1


def _tridiagonal_eigh(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.diag(alphas)
    if betas.numel():
        t = t + torch.diag(betas, 1) + torch.diag(betas, -1)
    return torch.linalg.eigh(t)


def _ritz_gap(theta: Tensor, i: int) -> float:
    others = torch.cat([theta[:i], theta[i + 1 :]])
    return float((others - theta[i]).abs().min()) if others.numel() else math.inf


def _explicit_pairs(
    matvec: Callable[[Tensor], Tensor], basis: Tensor, theta: Tensor, s: Tensor, count: int, err: float
) -> tuple[RitzPair, ...]:
    m = basis.shape[0]
    out = []
    vecs, vals, res = [], [], []
    for i in range(count):
        y = basis.T @ s[:, m - 1 - i]
        y = y / y.norm()
        by = matvec(y)
        rho = float(y @ by)
        r = float((by - rho * y).norm())
        vecs.append(y)
        vals.append(rho)
        res.append(r)
    top = max(max(vals), 0.0)
    for i in range(count):
        # rounding in the matvec and in forming r: n·eps·‖B‖ (‖B‖ ≈ ρ_1 up to its residual)
        r = res[i] + (err + 4.0 * basis.shape[1] * EPS64) * (top + res[0])
        gap = _ritz_gap(theta, m - 1 - i) - max(res)
        out.append(RitzPair(vals[i], vecs[i], r, r, (r * r / gap) if gap > r else r))
    return tuple(out)


@dataclass(frozen=True)
class GramExtremes:
    """Certified extreme eigenpairs of A = MMᵀ (``r × r``, positive definite) for a factor M.

    Attributes:
        lam_max: λ_1(A) (= largest eigenvalue of H = MᵀM).
        lam_second: λ_2(A), or NaN when not asked for.
        lam_min: λ_r(A), the smallest retained eigenvalue of H (NaN when not asked for).
        u_max: ``(r,)`` unit eigenvector of A for λ_1.
        u_min: ``(r,)`` unit eigenvector of A for λ_r (or ``None``).
        frob_sq: ‖A‖_F² = Σ λ_i² (= ‖H‖_F²).
        rel_bound: certified relative error bound of each value (max over those returned).
        iterations: Lanczos iterations spent (0 on the dense path).
        dense: whether the values came from the dense path (fall-back or ``solver='dense'``).
        gram: the Gram A (kept for the directions: A·M).

    """

    lam_max: float
    lam_second: float
    lam_min: float
    u_max: Tensor
    u_min: Tensor | None
    frob_sq: float
    rel_bound: float
    iterations: int
    dense: bool
    gram: Tensor

    @property
    def log_kappa(self) -> float:
        """log(λ_1/λ_r)."""
        return math.log(self.lam_max) - math.log(self.lam_min)

    def h_vector(self, m: Tensor, u: Tensor) -> Tensor:
        """The unit eigenvector v = Mᵀu/‖Mᵀu‖ of H = MᵀM for the eigenvector u of A, ``(D,)``."""
        v = m.T @ u
        return v / v.norm()


def _unit_start(n: int, start: Tensor | None, salt: int) -> Tensor:
    """The warm start (if usable) plus a small fixed pseudo-random component.

    The component makes a start that is orthogonal to the wanted eigenvector by accident converge.
    """
    g = torch.Generator().manual_seed(1_000_003 * salt + n)
    noise = torch.randn(n, generator=g, dtype=F64)
    noise = noise / noise.norm()
    if (
        start is None
        or start.numel() != n
        or not bool(torch.isfinite(start).all())
        or float(start.norm()) == 0
    ):
        return noise
    s = start.to(F64) / start.norm()
    return s + 1e-3 * noise


def gram_extremes(*args: Any, stats: SolverStats | None = None, **kwargs: Any) -> GramExtremes:
    """Certified λ_1 (and λ_2), λ_r and their eigenvectors of A = MMᵀ (see :func:`_gram_extremes`).

    Same arguments as :func:`_gram_extremes`; ``stats`` also accumulates the wall time.

    Example:
        >>> m = torch.diag(torch.tensor([3.0, 2.0, 1e-4], dtype=torch.float64))
        >>> e = gram_extremes(m, second=True)
        >>> round(e.lam_max, 10), round(e.lam_second, 10), round(e.lam_min / 1e-8, 10), e.dense
        (9.0, 4.0, 1.0, False)

    """
    start = time.perf_counter()
    try:
        return _gram_extremes(*args, stats=stats, **kwargs)
    finally:
        if stats is not None:
            stats.seconds += time.perf_counter() - start


def _gram_extremes(
    m: Tensor,
    *,
    second: bool = False,
    smallest: bool = True,
    start_max: Tensor | None = None,
    start_min: Tensor | None = None,
    rel_tol: float = DEFAULT_REL_TOL,
    min_tol: float = DEFAULT_MIN_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    stats: SolverStats | None = None,
    gram: Tensor | None = None,
) -> GramExtremes:
    """Certified λ_1 (and λ_2), λ_r and their eigenvectors of A = MMᵀ, falling back to dense.

    Args:
        m: ``(r, D)`` factor, r ≤ D, with MMᵀ positive definite (e.g. F·θ, F the thin factor of a
            rank-r K and θ invertible).
        second: also certify λ_2 (the R_well step bound uses it).
        smallest: also certify λ_r and its eigenvector (κ, R_ill, Opt-κ).
        start_max: warm start for λ_1 (its eigenvector of A from a nearby M), ``(r,)``.
        start_min: warm start for λ_r, ``(r,)``.
        rel_tol: certified relative bound required on λ_1 and λ_2 (and Lanczos' residual target).
        min_tol: certified relative bound required on λ_r (Ritz bound plus ε_A).
        max_iters: Lanczos iteration cap per run.
        stats: counters to update (calls, iterations, fall-backs).
        gram: A = MMᵀ if already formed (symmetric, from this M).

    Returns:
        :class:`GramExtremes`.

    Example:
        >>> m = torch.diag(torch.tensor([3.0, 2.0, 1e-4], dtype=torch.float64))
        >>> e = gram_extremes(m, second=True)
        >>> round(e.lam_max, 10), round(e.lam_second, 10), round(e.lam_min / 1e-8, 10), e.dense
        (9.0, 4.0, 1.0, False)

    """
    m = m.detach().to(F64)
    r, d = m.shape
    if stats is not None:
        stats.calls += 1
    a = gram if gram is not None else m @ m.T
    a = 0.5 * (a + a.T)
    frob_sq = float((a * a).sum())
    if r <= 2:
        return _dense(m, a, frob_sq, second, smallest, stats, None)
    iters = 0
    err_a = r * _gamma(d)
    top = lanczos_top(
        lambda x: a @ x,
        _unit_start(r, start_max, 1),
        count=2 if second else 1,
        rel_tol=rel_tol,
        max_iters=max_iters,
        scale_error=err_a,
    )
    iters += top.iterations
    if not top.certified:
        return _dense(
            m, a, frob_sq, second, smallest, stats, f"λ_max not certified in {top.iterations} iterations"
        )
    lam_max = top.pairs[0].value
    bound = top.pairs[0].bound / lam_max + err_a
    lam_second = top.pairs[1].value if second else math.nan
    if second:
        bound = max(bound, (top.pairs[1].bound + err_a * lam_max) / max(lam_second, 1e-300))
    lam_min, u_min = math.nan, None
    if smallest:
        rq = torch.linalg.qr(m.T, mode="r").R  # (r, r) upper triangular, RᵀR = MMᵀ
        if not bool(torch.isfinite(rq).all()) or not float(rq.diagonal().abs().min()) > 0.0:
            return _dense(m, a, frob_sq, second, smallest, stats, "QR of Mᵀ is singular (MMᵀ not definite)")
        dscale = a.diagonal().sqrt()  # row norms of M
        rinv = torch.linalg.solve_triangular(rq, torch.eye(r, dtype=F64), upper=True)
        eps_a = graded_error_bound(rq / dscale, rinv * dscale[:, None], d)
        if not eps_a < 0.5 * min_tol:  # also catches NaN
            return _dense(m, a, frob_sq, second, smallest, stats, f"graded error bound {eps_a:.2e} too large")
        low = lanczos_top(
            lambda x: rinv @ (rinv.T @ x),
            _unit_start(r, start_min, 2),
            count=1,
            rel_tol=rel_tol,
            max_iters=max_iters,
        )
        iters += low.iterations
        mu = low.pairs[0].value
        rel_low = low.pairs[0].bound / mu + eps_a
        if not low.certified or not rel_low <= min_tol:
            return _dense(
                m, a, frob_sq, second, smallest, stats, f"λ_min not certified in {low.iterations} iterations"
            )
        lam_min, u_min = 1.0 / mu, low.pairs[0].vector
        bound = max(bound, rel_low)
    if stats is not None:
        stats.iterations += iters
    return GramExtremes(
        lam_max, lam_second, lam_min, top.pairs[0].vector, u_min, frob_sq, bound, iters, False, a
    )


def _abs_norm2(x: Tensor) -> float:
    """An upper bound on ‖|X|‖₂: min(‖X‖_F, √(‖X‖_1‖X‖_∞)) (both also bound ‖X‖₂)."""
    ax = x.abs()
    return min(float(x.norm()), math.sqrt(float(ax.sum(0).max()) * float(ax.sum(1).max())))


def graded_error_bound(r_hat: Tensor, r_hat_inv: Tensor, cols: int) -> float:
    """ε_A: relative distance of every eigenvalue of the computed R⁻¹R⁻ᵀ, inverted, to that of A = MMᵀ.

    With D the row norms of M, M = DM̂, the QR of Mᵀ gives R = R̂D with R̂ the R of M̂ᵀ
    (Householder QR is column-scaling invariant). Its backward error is columnwise on Mᵀ, i.e. a
    perturbation Dδ̂ of M with ‖δ̂‖₂ ≤ c·√r (c = 8·max(r, D)·eps, the backward-error model of
    :data:`immunekit.spectral.fast.BACKWARD_CONSTANT`), which moves every singular value of M by a
    relative ≤ ‖M̂⁺‖₂‖δ̂‖₂ = ‖R̂⁻¹‖₂‖δ̂‖₂ (squared for λ: twice that). The explicit inverse X of R
    satisfies |XR − I| ≤ 4γ_r|X||R| (scale invariant): a relative perturbation of the eigenvalues
    of R⁻¹R⁻ᵀ by at most twice its norm. Norms are bounded by min(‖·‖_F, √(‖·‖_1‖·‖_∞)).

    Args:
        r_hat: ``(r, r)`` R̂ = R·D⁻¹.
        r_hat_inv: R̂⁻¹ = D·R⁻¹ from the computed inverse.
        cols: D, the number of columns of M.

    Returns:
        The bound (``inf`` if anything is not finite).

    """
    r = r_hat.shape[0]
    n_inv = _abs_norm2(r_hat_inv)
    n_r = _abs_norm2(r_hat)
    eps_sigma = 8.0 * max(r, cols) * EPS64 * math.sqrt(r) * n_inv
    out = 2.0 * eps_sigma + eps_sigma**2 + 2.0 * 4.0 * _gamma(r) * n_inv * n_r
    return out if math.isfinite(out) else math.inf


def _dense(
    m: Tensor,
    a: Tensor,
    frob_sq: float,
    second: bool,
    smallest: bool,
    stats: SolverStats | None,
    why: str | None,
) -> GramExtremes:
    """The dense path: SVD of M (the values ``svdvals`` gives, and the left singular vectors)."""
    if why is not None and stats is not None:
        stats.fell_back(why)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    lam = s**2
    r = lam.numel()
    return GramExtremes(
        float(lam[0]),
        float(lam[1]) if second and r > 1 else math.nan,
        float(lam[-1]) if smallest else math.nan,
        u[:, 0],
        u[:, -1] if smallest else None,
        frob_sq,
        0.0,
        0,
        True,
        a,
    )
