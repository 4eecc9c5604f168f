"""Fast, result-preserving building blocks for the K⁺-preconditioned linear defenses at large D.

Everything here reproduces an existing computation of this package either bit for bit or up to
rounding (float64, relative ``~D·eps``), and is cheaper at D ≈ 10³:

* :class:`PsdSpectrum`: ONE ``eigh`` of a PSD K from which the pseudo-inverse preconditioner, the
  factor F (FᵀF = K) and the range projector are derived. :func:`make_preconditioner` and
  :func:`psd_factor` each run their own ``eigh`` of the same (bitwise identical) matrix, so the
  results are bitwise equal to theirs; the *thin* factor keeps only F's non-zero rows.
* :class:`RangeProjector`: P_V X and P_VΔP_V + P_NΔP_N (V = range K, N = null K) with the thinner
  of the two orthonormal bases instead of dense D×D projectors (identity when K has full rank).
* :func:`gram_log_kappa_lower_bound` / :func:`gram_kappa_bound`: a certified lower bound on what
  :func:`gram_condition_number` would report for a factor Φ, from a QR of Φ, a triangular
  inverse and a few Lanczos steps (a quarter to a half of ``svdvals`` at p ≈ 500–800). Used to
  reject backtracking candidates that certainly fail a ``log κ ≤ limit`` test; anything not
  certified is decided by the exact computation.
* :class:`SelectedSpectrum` and :func:`g_well_fast` / :func:`g_ill_fast` /
  :func:`g_log_kappa_fast`: the spectral terms need all eigenvalues of H but only one or two
  eigenvectors: ``eigvalsh`` plus inverse iteration (≈ half of ``eigh`` at p ≈ 800), on the
  r × r Gram MMᵀ when H = MᵀM with a thin factor M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from immunekit.errors import NumericalError
from immunekit.spectral.condition import EPS64, default_rtol
from immunekit.spectral.hessians import symmetrize
from immunekit.spectral.regularizers import (
    Preconditioner,
    SpectralGrad,
    _floored,
    _rank,
    g_ill,
    g_log_kappa,
)

F64 = torch.float64


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(F64)


# ---------------------------------------------------------------------------------------------
# One eigendecomposition of K for the preconditioner, the factor and the projector
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PsdSpectrum:
    """``eigh`` of a symmetric PSD K with the relative threshold that decides its range.

    Attributes:
        matrix: the symmetrized float64 K.
        eigenvalues: ascending eigenvalues (as returned by ``eigh``).
        eigenvectors: matching eigenvectors as columns.
        rtol: relative threshold; eigenvalues ``> rtol · λ_max`` are kept.
        keep: boolean mask of kept eigenvalues.

    """

    matrix: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    rtol: float
    keep: Tensor

    @classmethod
    def of(cls, k: Tensor, *, rtol: float | None = None) -> PsdSpectrum:
        """Decompose K once (the same ``eigh`` input, bit for bit, as make_preconditioner/psd_factor).

        Example:
            >>> s = PsdSpectrum.of(torch.diag(torch.tensor([4.0, 1.0, 0.0])))
            >>> s.rank, s.factor(thin=True).shape
            (2, torch.Size([2, 3]))

        """
        if k.ndim != 2 or k.shape[0] != k.shape[1]:
            raise NumericalError(f"K must be square, got shape {tuple(k.shape)}")
        k = symmetrize(_f64(k))
        if not bool(torch.isfinite(k).all()):
            raise NumericalError("K contains NaN/Inf; check the inputs that produced it")
        d = k.shape[0]
        w, v = torch.linalg.eigh(k)
        tol = default_rtol(d, d) if rtol is None else float(rtol)
        keep = w > tol * float(w.max())
        return cls(k, w, v, tol, keep)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.matrix.shape[0])

    @property
    def rank(self) -> int:
        """Numerical rank (number of kept eigenvalues)."""
        return int(self.keep.sum())

    def factor(self, *, thin: bool = False) -> Tensor:
        """F = diag(√λ_i · [kept]) Qᵀ, equal to :func:`psd_factor` (``thin``: only its non-zero rows).

        The thin factor ``(rank, D)`` has the same Gram matrix and the same non-zero singular values
        for every θ (the dropped rows of F θ are exactly zero), so ``gram_condition_number(F_thin θ)``
        keeps the rank and, since its default threshold is ``max(rank, D)·eps = D·eps``, also the
        threshold of ``gram_condition_number(F θ)``.
        """
        w = self.eigenvalues
        full = (w.clamp_min(0.0).sqrt() * self.keep.to(w.dtype))[:, None] * self.eigenvectors.T
        return full[self.keep] if thin else full

    def preconditioner(
        self, method: str = "pinv", *, ridge: float = 0.0, dense: bool = True
    ) -> Preconditioner:
        """The :func:`make_preconditioner` result for this K (bitwise equal for ``dense=True``).

        ``dense=False`` (pinv only) skips the two D×D products for ``matrix`` and ``projector``
        and stores empty tensors: use it when only :meth:`describe` and :meth:`projector` are needed.
        """
        w, v, keep, tol = self.eigenvalues, self.eigenvectors, self.keep, self.rtol
        rank = self.rank
        if method == "pinv":
            if not dense:
                empty = torch.empty(0, 0, dtype=F64)
                return Preconditioner(empty, empty, "pinv", tol, 0.0, rank)
            inv = torch.where(keep, 1.0 / w.clamp_min(1e-300), torch.zeros_like(w))
            m = (v * inv) @ v.T
            proj = (v * keep.to(w.dtype)) @ v.T
            return Preconditioner(m, proj, "pinv", tol, 0.0, rank)
        if method == "ridge":
            if ridge <= 0:
                raise NumericalError(f"ridge must be > 0 for method='ridge', got {ridge}; e.g. ridge=1e-6")
            m = (v / (w + ridge)) @ v.T
            return Preconditioner(m, m @ self.matrix, "ridge", tol, float(ridge), rank)
        if method == "none":
            eye = torch.eye(self.dim, dtype=F64)
            return Preconditioner(eye, self.matrix, "none", tol, 0.0, rank)
        raise NumericalError(f"unknown preconditioner {method!r}; choose 'pinv', 'ridge' or 'none'")

    def projector(self) -> RangeProjector:
        """P_K = K⁺K (orthogonal projector onto range K) in thin form."""
        d, r = self.dim, self.rank
        if r <= d - r:
            return RangeProjector(self.eigenvectors[:, self.keep].contiguous(), False, d)
        return RangeProjector(self.eigenvectors[:, ~self.keep].contiguous(), True, d)


@dataclass(frozen=True)
class RangeProjector:
    """An orthogonal projector P = VVᵀ stored by the thinner of V and its complement N.

    In exact arithmetic every method equals the dense form with P = (v·[kept]) vᵀ; in floating
    point they differ by rounding (relative ``~m·eps``). Costs are O(m·D²) instead of O(D³), and 0
    for a full-rank K (P = I, ``m = 0``).

    Attributes:
        basis: ``(D, m)`` orthonormal columns: V (``complement=False``) or N (``complement=True``).
        complement: whether ``basis`` spans the null side, P = I − NNᵀ.
        dim: D.

    """

    basis: Tensor
    complement: bool
    dim: int

    @property
    def rank(self) -> int:
        """Dimension of range(P)."""
        m = int(self.basis.shape[1])
        return self.dim - m if self.complement else m

    def dense(self) -> Tensor:
        """The D×D projector (for checks)."""
        w = self.basis
        outer = w @ w.T
        return torch.eye(self.dim, dtype=F64) - outer if self.complement else outer

    def apply(self, x: Tensor) -> Tensor:
        """P X for X of shape ``(D, ·)``."""
        w = self.basis
        if w.shape[1] == 0:
            return x if self.complement else torch.zeros_like(x)
        inner = w @ (w.T @ x)
        return x - inner if self.complement else inner

    def sandwich(self, delta: Tensor) -> Tensor:
        """P Δ P + (I − P) Δ (I − P) (symmetric in P ↔ I − P, so either basis works).

        With W the stored basis, X = WᵀΔ, Y = ΔW and Z = WᵀΔW:
        PΔP + (I−P)Δ(I−P) = Δ − W(X − ZWᵀ) − (Y − WZ)Wᵀ.
        """
        w = self.basis
        if w.shape[1] == 0:
            return delta
        x = w.T @ delta
        y = delta @ w
        z = x @ w
        return delta - w @ (x - z @ w.T) - (y - w @ z) @ w.T


# ---------------------------------------------------------------------------------------------
# Certified lower bound on κ(ΦᵀΦ) as gram_condition_number reports it
# ---------------------------------------------------------------------------------------------

BACKWARD_CONSTANT = 8.0
"""c in the backward-error model ``‖δΦ‖₂ ≤ c · max(n, d) · eps · ‖Φ‖_F`` of Householder QR and of
``svdvals``. Observed backward errors of both are ≈ eps·‖Φ‖₂·O(1); with max(n, d) ≥ 10 this
model is at least 10²× larger (tested in tests/spectral/test_spectral_fast_paths.py)."""


class _Lanczos:
    """Lanczos on a symmetric PSD operator, one step at a time; ``top`` is the largest Ritz value.

    Ritz values interlace the spectrum, so ``top`` never exceeds λ_max (up to rounding, which the
    caller covers) and never decreases from one step to the next. Full re-orthogonalisation.
    """

    def __init__(self, matvec: Callable[[Tensor], Tensor], start: Tensor, max_iters: int) -> None:
        n = start.numel()
        self.matvec = matvec
        self.cap = min(max_iters, n)
        self.basis = torch.empty(self.cap, n, dtype=F64)
        self.q = start / start.norm()
        self.alphas = np.zeros(self.cap)
        self.betas = np.zeros(self.cap)
        self.j = 0
        self.top = 0.0
        self.finished = False

    def step(self, rel_tol: float) -> float:
        """One more iteration (no-op once finished); returns the largest Ritz value."""
        if self.finished:
            return self.top
        j = self.j
        self.basis[j] = self.q
        w = self.matvec(self.q)
        self.alphas[j] = float(w @ self.q)
        b = self.basis[: j + 1]
        for _ in range(2):
            w = w - b.T @ (b @ w)
        beta = float(w.norm())
        top = float(np.linalg.eigvalsh(self._tridiagonal())[-1])
        gain = top - self.top
        self.top = max(self.top, top)
        self.j = j + 1
        if gain <= rel_tol * self.top or beta <= 1e-14 * self.top or self.j == self.cap:
            self.finished = True
        else:
            self.betas[j] = beta
            self.q = w / beta
        return self.top

    def _tridiagonal(self) -> np.ndarray:
        j = self.j if self.finished else self.j + 1
        return np.diag(self.alphas[:j]) + np.diag(self.betas[: j - 1], 1) + np.diag(self.betas[: j - 1], -1)

    def vector(self) -> Tensor:
        """The Ritz vector of ``top`` (a warm start for a nearby operator)."""
        j = max(self.j, 1)
        t = np.diag(self.alphas[:j]) + np.diag(self.betas[: j - 1], 1) + np.diag(self.betas[: j - 1], -1)
        s = torch.from_numpy(np.linalg.eigh(t)[1][:, -1].copy())
        return self.basis[:j].T @ s


@dataclass(frozen=True)
class KappaBound:
    """Result of :func:`gram_kappa_bound`.

    Attributes:
        log_kappa_lower: certified lower bound on the reported log κ (``-inf``: no claim).
        top: approximate top left singular vector of Φ (row coordinates), or ``None``.
        bottom: approximate bottom left singular vector of Φ, or ``None``.

    """

    log_kappa_lower: float
    top: Tensor | None = None
    bottom: Tensor | None = None


def gram_log_kappa_lower_bound(
    factor: Tensor,
    *,
    rtol: float | None = None,
    abs_err: float = 0.0,
    target: float | None = None,
    max_iters: int = 40,
    rel_tol: float = 1e-10,
) -> float:
    """A lower bound on ``gram_condition_number(Φ').log_kappa`` for every Φ' near Φ, or ``-inf``.

    Guarantee (under the backward-error model of :data:`BACKWARD_CONSTANT`): for every Φ' with
    ‖Φ' − Φ‖₂ ≤ ``abs_err``, ``gram_condition_number(Φ', rtol=rtol)`` keeps all p = min(n, d)
    singular values (the rank is certified) and reports ``log_kappa ≥`` the returned value. When
    the rank p cannot be certified the result is ``-inf`` (no claim). See :func:`gram_kappa_bound`.

    Args:
        factor: ``(n, d)`` Φ.
        rtol: the relative rank threshold the reference uses (default ``max(n, d)·eps``).
        abs_err: bound on the spectral-norm distance between Φ and the reference's factor.
        target: stop refining as soon as the bound exceeds it (the caller only asks "> target?").
        max_iters: Lanczos iterations per extreme singular value.
        rel_tol: stop a Lanczos run once its Ritz value gains less than this (relative).

    Returns:
        The bound (``-inf`` if nothing is certified).

    Example:
        >>> phi = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        >>> round(gram_log_kappa_lower_bound(phi), 10) == round(2 * math.log(3.0), 10)
        True

    """
    return gram_kappa_bound(
        factor, rtol=rtol, abs_err=abs_err, target=target, max_iters=max_iters, rel_tol=rel_tol
    ).log_kappa_lower


def gram_kappa_bound(
    factor: Tensor,
    *,
    rtol: float | None = None,
    abs_err: float = 0.0,
    target: float | None = None,
    max_iters: int = 40,
    rel_tol: float = 1e-10,
    start: tuple[Tensor | None, Tensor | None] = (None, None),
) -> KappaBound:
    """:func:`gram_log_kappa_lower_bound` with warm starts and the singular vectors it found.

    Method: R from a Householder QR of Φᵀ (or Φ), so ΦΦᵀ = RᵀR (or ΦᵀΦ = RᵀR) and σ(R) = σ(Φ);
    R⁻¹ by a triangular solve. σ_p ≥ 1/‖R⁻¹‖_F certifies the rank, and Lanczos Ritz values
    (lower bounds of λ_max) of RᵀR and R⁻¹R⁻ᵀ = (RᵀR)⁻¹ bound σ_1 from below and σ_p from above.
    Errors accounted for: ``abs_err``, QR's and ``svdvals``' backward errors, the forward error of
    R⁻¹ (≤ c·eps·‖R‖_F‖R⁻¹‖_F relative) and rounding in the Ritz values. Costs one QR, one
    triangular inverse and O(p²) per Lanczos step.

    ``start`` holds Lanczos start vectors (in the coordinates of Φ's rows if n ≤ d, else of its
    columns) for the top and the bottom singular value, e.g. the vectors returned for a nearby Φ:
    any vector is valid (only the speed of convergence depends on it).
    """
    phi = _f64(factor)
    if phi.ndim != 2:
        raise NumericalError(f"factor must be 2-D, got shape {tuple(phi.shape)}")
    n, d = phi.shape
    p = min(n, d)
    if p == 0:
        return KappaBound(-math.inf)
    tol = default_rtol(n, d) if rtol is None else float(rtol)
    r = torch.linalg.qr(phi.T if n <= d else phi, mode="r").R
    diag = r.diagonal().abs()
    if not float(diag.min()) > 0.0:  # also catches NaN
        return KappaBound(-math.inf)
    c = BACKWARD_CONSTANT * max(n, d) * EPS64
    e = abs_err + 2.0 * c * float(phi.norm())  # our QR + the reference's svdvals
    rinv = torch.linalg.solve_triangular(r, _eye(p), upper=True)
    n_r, n_ri = float(r.norm()), float(rinv.norm())
    inv_rel = c * n_r * n_ri
    if not (math.isfinite(inv_rel) and math.isfinite(e) and inv_rel < 0.5):  # NaN/Inf anywhere: no claim
        return KappaBound(-math.inf)
    # σ_p ≥ 1/‖R⁻¹‖₂ ≥ 1/‖R⁻¹‖_F and σ_1 ≤ ‖R‖_F, each widened by the errors above.
    if not (1.0 - inv_rel) / n_ri - e > tol * (n_r + e):
        return KappaBound(-math.inf)
    shrink = 1.0 - 4.0 * p * EPS64  # rounding in Rayleigh quotients / Ritz values

    def bound(top_a: float, top_b: float) -> float:
        s1_lo = math.sqrt(top_a * shrink) - e
        sp_hi = (1.0 + inv_rel) / math.sqrt(top_b * shrink) + e
        if s1_lo <= 0.0:
            return -math.inf
        return max(0.0, 2.0 * (math.log(s1_lo) - math.log(sp_hi)))

    def op_a(x: Tensor) -> Tensor:  # RᵀR
        return r.T @ (r @ x)

    def op_b(x: Tensor) -> Tensor:  # (RᵀR)⁻¹ = R⁻¹R⁻ᵀ
        return rinv @ (rinv.T @ x)

    # Rayleigh quotients at unit vectors: σ_1² ≥ max_j ‖R e_j‖², 1/σ_p² ≥ max_j ‖R⁻ᵀ e_j‖² (rows of
    # R⁻¹); and for a triangular R, σ_p ≤ min_j |r_jj| (the smallest |eigenvalue|): 1/σ_p² ≥ 1/r_jj².
    col_r, row_ri = (r * r).sum(0), (rinv * rinv).sum(1)
    j_a, j_b = int(col_r.argmax()), int(row_ri.argmax())
    top_a, top_b = float(col_r[j_a]), max(float(row_ri[j_b]), float(diag.min()) ** -2 * (1.0 - inv_rel) ** 2)
    starts = []
    for vec, j in zip(start, (j_a, j_b), strict=True):
        if vec is None or vec.numel() != p or not bool(torch.isfinite(vec).all()) or float(vec.norm()) == 0:
            vec = torch.full((p,), 1e-3, dtype=F64)
            vec[j] += 1.0
        starts.append(vec.to(F64))
    best = bound(top_a, top_b)
    lan_a = _Lanczos(op_a, starts[0], max_iters)
    lan_b = _Lanczos(op_b, starts[1], max_iters)
    while not (target is not None and best > target) and not (lan_a.finished and lan_b.finished):
        top_a = max(top_a, lan_a.step(rel_tol))
        top_b = max(top_b, lan_b.step(rel_tol))
        gain = bound(top_a, top_b) - best
        best = max(best, best + gain)
        # Give up on a target that the (geometrically slowing) gains will not reach: only costs a
        # weaker bound, never a wrong one.
        if target is not None and lan_a.j >= 8 and gain >= 0.0 and target - best > 32.0 * gain:
            break
    return KappaBound(best, lan_a.vector() if lan_a.j else None, lan_b.vector() if lan_b.j else None)


_EYES: dict[int, Tensor] = {}


def _eye(p: int) -> Tensor:
    if p not in _EYES:
        if len(_EYES) >= 4:
            _EYES.clear()
        _EYES[p] = torch.eye(p, dtype=F64)
    return _EYES[p]


# ---------------------------------------------------------------------------------------------
# Spectral terms that need all eigenvalues but only one or two eigenvectors of H
# ---------------------------------------------------------------------------------------------


def _start_vector(n: int) -> Tensor:
    """A fixed pseudo-random unit vector (deterministic start for inverse iteration)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(20505), dtype=F64)
    return x / x.norm()


def _inverse_iteration(a: Tensor, mu: float, scale: float, max_iters: int = 4) -> Tensor | None:
    """Unit eigenvector of symmetric ``a`` for the eigenvalue ``mu`` (accurate to ~eps·scale).

    Converged when the residual ‖a x − μ x‖ ≤ 16·n·eps·scale, the level ``eigh`` itself reaches
    (its backward error is O(n·eps·‖a‖)); ``None`` if that does not happen.
    """
    n = a.shape[0]
    tol = 16.0 * n * EPS64 * scale
    # An exactly singular a − μI (μ exact, e.g. a multiple of I) gets a shift perturbed by n·eps·scale.
    for shift in (mu, mu + n * EPS64 * max(scale, 1e-300)):
        lu, piv, info = torch.linalg.lu_factor_ex(a - shift * _eye(n))
        if int(info) == 0 and bool(torch.isfinite(lu).all()):
            break
    else:
        return None
    x = _start_vector(n)
    for _ in range(max_iters):
        y = torch.linalg.lu_solve(lu, piv, x[:, None])[:, 0]
        norm = float(y.norm())
        if not (math.isfinite(norm) and norm > 0.0):
            return None
        x = y / norm
        if float((a @ x - mu * x).norm()) <= tol:
            return x
    return None


@dataclass
class SelectedSpectrum:
    """All eigenvalues of a symmetric PSD H (p × p) and, on request, single eigenvectors.

    ``eigh`` computes every eigenvector (≈ 2.3× the cost of ``eigvalsh`` at p ≈ 800) while the
    spectral terms need one or two. Here: ``eigvalsh``, then inverse iteration with the computed
    eigenvalue as shift (one LU), accepted at eigh's own residual level ‖Hv − λv‖ = O(p·eps·‖H‖);
    otherwise (e.g. an exactly repeated eigenvalue) the eigenvectors of a full ``eigh`` are used.

    With a thin factor M (H = MᵀM, r < p rows) the problem is solved on the r × r Gram MMᵀ: the
    non-zero eigenvalues of MᵀM and MMᵀ coincide, v = Mᵀu/‖Mᵀu‖ for an eigenvector u of MMᵀ, and
    the other p − r eigenvalues of H are exactly zero. Both routes agree with :func:`psd_eigh` of H
    up to rounding (eigenvalues to ≈ eps·λ_max absolute, as ``eigh`` resolves them).

    Attributes:
        eigenvalues: ``(p,)`` descending, clipped at 0, zero-padded (as :func:`psd_eigh`).

    """

    eigenvalues: Tensor
    _a: Tensor
    _raw: Tensor
    _m: Tensor | None
    _all: Tensor | None = None

    @classmethod
    def of(cls, h: Tensor, *, factor: Tensor | None = None) -> SelectedSpectrum:
        """Eigenvalues of H (or of MMᵀ for a wide ``factor`` M with H = MᵀM)."""
        p = h.shape[0]
        m = None if factor is None or factor.shape[0] >= factor.shape[1] else _f64(factor)
        a = symmetrize(m @ m.T) if m is not None else symmetrize(_f64(h))
        raw = torch.linalg.eigvalsh(a).flip(0)
        w = torch.zeros(p, dtype=F64)
        w[: raw.numel()] = raw.clamp_min(0.0)
        return cls(w, a, raw, m)

    def vectors(self, indices: list[int]) -> Tensor:
        """Unit eigenvectors of H for the given descending indices, as columns ``(p, len)``."""
        a, raw = self._a, self._raw
        scale = float(raw.abs().max()) if raw.numel() else 0.0
        cols = []
        for i in indices:
            x = _inverse_iteration(a, float(raw[i]), scale) if self._all is None else None
            if x is None:
                if self._all is None:
                    self._all = torch.linalg.eigh(a)[1].flip(1)
                x = self._all[:, i]
            cols.append(x)
        u = torch.stack(cols, dim=1)
        if self._m is None:
            return u
        v = self._m.T @ u
        return v / v.norm(dim=0, keepdim=True)


def _wide(factor: Tensor | None) -> bool:
    return factor is not None and factor.shape[0] < factor.shape[1]


def _factor_eigenvalues(w: Tensor, values: Tensor | None) -> Tensor:
    """Eigenvalues of H = MᵀM as s² of M's singular values ``values``, where given.

    They are accurate to eps relative, ``eigvalsh``'s to eps·λ_max absolute only.
    """
    if values is None:
        return w
    out = torch.zeros_like(w)
    n = min(int(values.numel()), int(w.numel()))
    out[:n] = _f64(values[:n]) ** 2
    return out


def g_well_fast(
    h: Tensor, *, factor: Tensor | None = None, rank: int | None = None, values: Tensor | None = None
) -> SpectralGrad:
    """:func:`g_well` (G = λ_1 v_1v_1ᵀ − H/p) computing only v_1 (see :class:`SelectedSpectrum`).

    ``factor``: optional M with H = MᵀM (used when it has fewer rows than columns). ``rank``: the
    rank decided on K (default: H's eigenvalues at p·eps). ``values``: M's singular values
    (descending), whose squares replace the eigenvalues. The result's ``eigenvectors`` holds only
    v_1.
    """
    spec = SelectedSpectrum.of(h, factor=factor)
    w, p = _factor_eigenvalues(spec.eigenvalues, values), h.shape[0]
    k = _rank(w, default_rtol(p, p)) if rank is None else int(rank)
    v1 = spec.vectors([0])
    g = w[0] * (v1 @ v1.T) - symmetrize(_f64(h)) / p
    value = float((w[0] ** 2 - w**2).sum() / (2 * p))
    return SpectralGrad(g, value, w, v1, k)


def g_ill_fast(
    h: Tensor,
    *,
    rank: int,
    delta_min: float = 0.0,
    factor: Tensor | None = None,
    values: Tensor | None = None,
) -> SpectralGrad:
    """:func:`g_ill` with a given rank k, computing only v_k (see :func:`g_well_fast`).

    Falls back to :func:`g_ill` when λ_k is not positive or k exceeds the factor's rows.
    """
    k = int(rank)
    if k == 0 or (_wide(factor) and k > factor.shape[0]):  # type: ignore[union-attr]
        return g_ill(h, delta_min=delta_min, rank=rank)
    spec = SelectedSpectrum.of(h, factor=factor)
    w = _factor_eigenvalues(spec.eigenvalues, values)
    if not float(w[k - 1]) > 0.0:
        return g_ill(h, delta_min=delta_min, rank=rank)
    d = float((w[:k] ** 2).sum() / (2 * k) - 0.5 * w[k - 1] ** 2)
    if d < delta_min:
        return SpectralGrad(torch.zeros(h.shape, dtype=F64), 1.0 / delta_min, w, torch.empty(0), k, d, True)
    d_eff = _floored(d, delta_min)
    vk = spec.vectors([k - 1])
    g = (w[k - 1] * (vk @ vk.T) - symmetrize(_f64(h)) / k) / d_eff**2
    return SpectralGrad(g, 1.0 / d_eff, w, vk, k, d)


def g_log_kappa_fast(
    h: Tensor, *, rank: int, factor: Tensor | None = None, values: Tensor | None = None
) -> SpectralGrad:
    """:func:`g_log_kappa` with a given rank k, computing only v_1 and v_k (see :func:`g_well_fast`).

    Falls back to :func:`g_log_kappa` when λ_k is not positive or k exceeds the factor's rows.
    """
    k = int(rank)
    if k == 0 or (_wide(factor) and k > factor.shape[0]):  # type: ignore[union-attr]
        return g_log_kappa(h, rank=rank)
    spec = SelectedSpectrum.of(h, factor=factor)
    w = _factor_eigenvalues(spec.eigenvalues, values)
    if not float(w[k - 1]) > 0.0:
        return g_log_kappa(h, rank=rank)
    v = spec.vectors([0, k - 1])
    g = torch.outer(v[:, 0], v[:, 0]) / w[0] - torch.outer(v[:, 1], v[:, 1]) / w[k - 1]
    return SpectralGrad(g, float(torch.log(w[0] / w[k - 1])), w, v, k)
