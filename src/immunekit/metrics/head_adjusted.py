"""Head-adjusted cross-entropy of MLAC: the loss left after the best bounded linear remap of the logits.

For logits Z ``(N, C)`` (rows z_i), labels y ``(N,)`` in {0, …, C−1} and a bound b > 0::

    CE_adj(Z, y) = min_{W ∈ [−b, b]^{C×C}} f(W),
    f(W) = (1/N) Σ_i [ logsumexp(z_i W) − (z_i W)_{y_i} ]  =  CE(Z W, y).

f is convex and smooth in W, so the minimum over the box is attained. With P = softmax(ZW) row-wise
and Y = onehot(y),

* gradient ∇f(W) = Zᵀ(P − Y)/N ``(C, C)``;
* Hessian, W flattened row-major (index a·C + k): H = (1/N) Σ_i (z_i z_iᵀ) ⊗ (diag(p_i) − p_i p_iᵀ).

H is singular: adding v·1ᵀ to W (the same vector to every column) shifts each row of ZW by a constant
and leaves f unchanged. :func:`solve_remap` therefore uses a damped projected Newton method
(Bertsekas 1982, with an ε-active set), started from the identity clipped to the box or a warm start:

* coordinates within ε of a bound with the gradient pushing outward move to the bound; the others take
  a Levenberg–Marquardt-damped Newton step (damping ∝ the projected-gradient norm); a coordinate near
  its bound whose Newton component points outward is held and the step re-solved;
* Armijo search along the projection arc, trying the first breakpoint (where a free coordinate reaches
  its bound) right after the full step, and doubling the step while f keeps falling when the full step
  beats the quadratic model (saturated softmax: f ≈ e^(−margin), where Newton gains one logit per step);
* f, ∇f and ∇²f are evaluated without cancellation (1 − p_k as Σ_{l≠k} p_l, log1p for the loss of a
  correctly ranked row), so they keep relative precision when f ≪ 1; a projected-gradient fallback.

It stops when the projected-gradient norm ‖P_box(W − ∇f) − W‖₂ is at most ``tol`` (zero exactly at a
KKT point).

:func:`head_adjusted_ce` solves W* on detached logits and returns CE(Z W*, y) with W* held constant.
By Danskin's theorem the gradient with respect to Z, (P − Y) W*ᵀ/N, is the gradient of the min-value
function (up to the solver tolerance). It does not depend on which minimiser is picked along the
v·1ᵀ directions, because the rows of P − Y sum to zero; when Z has full column rank these are the
only directions in which the minimiser can be non-unique. This replaces the reference code's
convex-optimisation layer (cvxpy), which the toolkit does not depend on.

References:
    Henderson et al., "Self-Destructing Models: Increasing the Costs of Harmful Dual Uses of
    Foundation Models", arXiv 2211.14946 (MLAC; head-adjusted harmful loss).

"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from immunekit.errors import ConfigError, DataError

__all__ = ["RemapInfo", "head_adjusted_ce", "head_adjusted_ce_and_remap", "solve_remap"]

_F64 = torch.float64
_ARMIJO = 1e-4  # sufficient-decrease fraction σ
_SHRINK = 0.5  # line-search step factor β
_MIN_STEP = 1e-10  # smallest step tried before the line search gives up
_EPS64 = float(torch.finfo(torch.float64).eps)
_NOISE = 64.0  # ulps of f below which a predicted decrease is treated as invisible
_EXTRAPOLATE = 0.55  # try longer steps when a full step gains more than this fraction of g·Δw
_MAX_EXTRAPOLATION = 1024.0  # (a quadratic model gains ½ at the Newton step, e^(−m) tails 1 − 1/e)


@dataclass(frozen=True)
class RemapInfo:
    """How :func:`solve_remap` ended.

    Attributes:
        iterations: Newton iterations taken (0 when the start point already met ``tol``).
        converged: the projected-gradient norm reached ``tol``.
        pg_norm: final projected-gradient norm ‖P_box(W − ∇f(W)) − W‖₂.
        value: f(W) at the returned W (float64), i.e. CE_adj up to the solver tolerance.

    """

    iterations: int
    converged: bool
    pg_norm: float
    value: float


def _positive_finite(value: object) -> bool:
    """``value`` is a real number (not a bool), finite and > 0."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def _check(z: Tensor, y: Tensor, bound: float, tol: float, max_iter: int) -> None:
    """Raise ConfigError / DataError for unusable inputs (see :func:`solve_remap`)."""
    if not _positive_finite(bound):
        raise ConfigError(
            f"bound must be a finite number > 0 (the box is [−bound, bound]), got bound={bound!r}"
        )
    if not _positive_finite(tol):
        raise ConfigError(f"tol must be a finite number > 0, got tol={tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer ≥ 1, got max_iter={max_iter!r}")
    if not isinstance(z, Tensor) or not isinstance(y, Tensor):
        raise DataError(f"z and y must be torch tensors, got {type(z).__name__} and {type(y).__name__}")
    if z.dim() != 2:
        raise DataError(f"logits z must be 2-D (N, C), got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise DataError(f"logits z must be a floating tensor, got dtype {z.dtype}")
    n, c = z.shape
    if c < 2:
        raise DataError(f"the head-adjusted loss needs C ≥ 2 classes (logit columns), got C={c}")
    if n < 1:
        raise DataError("logits z have no rows (N = 0); the loss is a mean over at least one example")
    if y.dim() != 1 or y.shape[0] != n:
        raise DataError(
            f"labels y must be 1-D with one label per row of z: z has N={n} rows but y has shape "
            f"{tuple(y.shape)} (length {y.shape[0] if y.dim() else 'scalar'})"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels y must be an integer tensor of class indices, got dtype {y.dtype}")
    low, top = int(y.min()), int(y.max())
    if low < 0 or top >= c:
        raise DataError(
            f"labels y must lie in 0..{c - 1} (C={c} logit columns), got labels in [{low}, {top}]"
        )
    if not bool(torch.isfinite(z).all()):
        raise DataError("logits z contain NaN or Inf; the head-adjusted loss needs finite logits")


def solve_remap(
    z: Tensor,
    y: Tensor,
    *,
    bound: float = 1.0,
    tol: float = 1e-9,
    max_iter: int = 100,
    w0: Tensor | None = None,
) -> tuple[Tensor, RemapInfo]:
    """Best bounded linear remap W* = argmin_{W ∈ [−b, b]^{C×C}} (1/N) Σ_i [lse(z_i W) − (z_i W)_{y_i}].

    Solved on ``z.detach()`` in float64 with a damped projected Newton method (see the module
    docstring); deterministic. For C = 2–3 and N = 20–50 it takes 4–10 Newton iterations, about
    1.5–3 ms on one CPU thread (float64 tensors of this size cost a few µs per torch operation).

    Args:
        z: logits ``(N, C)``, any floating dtype; only their values are used.
        y: integer labels ``(N,)`` in {0, …, C−1}.
        bound: b > 0, the box half-width.
        tol: stop when ‖P_box(W − ∇f(W)) − W‖₂ ≤ tol (absolute, in the units of the logits).
        max_iter: maximum Newton iterations.
        w0: warm start ``(C, C)`` (e.g. the previous step's W*); clipped to the box. Default: the
            identity clipped to the box.

    Returns:
        ``(W, info)``: W ``(C, C)`` float64 on z's device, inside the box; ``info`` a
        :class:`RemapInfo` (iterations, converged, final projected-gradient norm, value).

    Raises:
        ConfigError: ``bound``, ``tol`` or ``max_iter`` out of range.
        DataError: z not 2-D, C < 2, N = 0, non-finite z, y not matching z's rows, labels out of
            range, or ``w0`` not ``(C, C)``.

    Example:
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> W, info = solve_remap(z, torch.tensor([1, 0]))
        >>> W.tolist(), info.converged
        ([[-1.0, 1.0], [1.0, -1.0]], True)

    """
    _check(z, y, bound, tol, max_iter)
    problem = _Problem.build(z, y, float(bound))
    c, b = problem.c, problem.b
    if w0 is None:
        W = torch.eye(c, dtype=_F64, device=problem.Z.device).clamp_(-b, b)
    else:
        if not isinstance(w0, Tensor) or tuple(w0.shape) != (c, c):
            shape = tuple(w0.shape) if isinstance(w0, Tensor) else type(w0).__name__
            raise DataError(f"warm start w0 must have shape (C, C) = ({c}, {c}), got {shape}")
        W = w0.detach().to(device=problem.Z.device, dtype=_F64).clamp(-b, b)
        if not bool(torch.isfinite(W).all()):
            raise DataError("warm start w0 contains NaN; pass a finite (C, C) matrix or None")
    with torch.no_grad():
        point = problem.at(W)
        iterations = 0
        while point.pg_norm > tol and iterations < max_iter:
            iterations += 1
            moved = _newton_step(problem, point)
            if moved is None:
                moved = _gradient_step(problem, point)
            if moved is None:  # no decrease representable in float64: the rounding floor
                break
            point = moved
    info = RemapInfo(
        iterations=iterations, converged=point.pg_norm <= tol, pg_norm=point.pg_norm, value=point.f
    )
    return point.W, info


@dataclass(frozen=True)
class _Point:
    """A feasible W with P = softmax(ZW), Q = 1 − P, value f, gradient G and projected-gradient norm."""

    W: Tensor
    P: Tensor
    Q: Tensor  # Q[i, k] = Σ_{l≠k} P[i, l], summed rather than subtracted from 1 (exact when P saturates)
    f: float
    G: Tensor
    pg_norm: float


@dataclass(frozen=True)
class _Problem:
    """The data of one solve, in float64, with the constants the steps reuse.

    Values, gradients and Hessians avoid cancellation: with D = ZW − (ZW)_y (so D_y = 0) and t = max D,
    f_i = t + log Σ_l e^{D_l − t}, or log1p(Σ_{l≠y} e^{D_l}) when t = 0; 1 − p_k is the sum Σ_{l≠k} p_l;
    so f, ∇f and ∇²f keep their relative precision when the softmax saturates (f ≪ 1).
    """

    Z: Tensor  # (N, C)
    y_col: Tensor  # (N, 1) labels
    b: float
    c: int
    lipschitz: float  # ∇f is L-Lipschitz: λmax(diag p − p pᵀ) ≤ ½, so L ≤ Σ‖z_i‖² / (2N)
    others: Tensor  # (C, C) ones − identity: E @ others sums the other classes
    outer_z: Tensor  # (N, C²) rows vec(z_i z_iᵀ)

    @classmethod
    def build(cls, z: Tensor, y: Tensor, b: float) -> _Problem:
        Z = z.detach().to(_F64)
        n, c = Z.shape
        y_col = y.detach().to(device=Z.device, dtype=torch.long)[:, None]
        lipschitz = max(0.5 * float((Z * Z).sum(dim=1).mean()), 1e-300)
        others = 1.0 - torch.eye(c, dtype=_F64, device=Z.device)
        outer_z = (Z[:, :, None] * Z[:, None, :]).reshape(n, c * c)
        return cls(Z, y_col, b, c, lipschitz, others, outer_z)

    def at(self, W: Tensor) -> _Point:
        A = self.Z @ W
        D = A - A.gather(1, self.y_col)
        top = D.max(dim=1, keepdim=True).values  # ≥ 0
        E = torch.exp(D - top)
        rest = E @ self.others  # rest[i, k] = Σ_{l≠k} E[i, l]
        total = E.sum(dim=1, keepdim=True)
        f_i = torch.where(top > 0, top + torch.log(total), torch.log1p(rest.gather(1, self.y_col)))
        f = float(f_i.mean())
        P, Q = E / total, rest / total
        R = P.scatter(1, self.y_col, -Q.gather(1, self.y_col))  # P − onehot(y), exactly −Q at y
        G = self.Z.T @ R / self.Z.shape[0]
        pg_norm = float(torch.linalg.vector_norm((W - G).clamp(-self.b, self.b) - W))
        return _Point(W, P, Q, f, G, pg_norm)

    def hessian(self, point: _Point) -> Tensor:
        """∇²f ``(C², C²)``, W flattened row-major: (1/N) Σ_i (z_i z_iᵀ) ⊗ (diag(p_i) − p_i p_iᵀ)."""
        n, c = self.Z.shape
        S = -point.P[:, :, None] * point.P[:, None, :]
        S.diagonal(dim1=1, dim2=2).copy_(point.P * point.Q)  # p_k (1 − p_k) without cancellation
        H = (self.outer_z.T @ S.reshape(n, c * c)).reshape(c, c, c, c)  # [a, b, k, l]
        return H.permute(0, 2, 1, 3).reshape(c * c, c * c) / n

    def accept(self, point: _Point, W_try: Tensor, predicted: float) -> _Point | None:
        """The trial point W_try if it is an acceptable step from ``point``, else None.

        Acceptable: the Armijo test f(point) − f(trial) ≥ σ·predicted; or, when the predicted decrease
        is below the rounding of f (near the solution), f does not visibly rise and the
        projected-gradient norm falls.
        """
        trial = self.at(W_try)
        noise = _NOISE * _EPS64 * point.f  # f is computed to a few ulps
        if predicted > noise:
            return trial if point.f - trial.f >= _ARMIJO * predicted else None
        if trial.f <= point.f + noise and trial.pg_norm < point.pg_norm:
            return trial
        return None


def _newton_step(problem: _Problem, point: _Point) -> _Point | None:
    """One damped projected Newton step (Bertsekas' ε-active set, Armijo along the projection arc).

    Coordinates within ε of a bound with the gradient pushing outward move to the bound; the others
    take a damped Newton step on the free subspace. A coordinate within ε of a bound whose Newton
    component points outward (against its own gradient) is held in place and the step re-solved, so
    the projection never bends the Newton step of the coordinates that move freely.
    """
    b, c = problem.b, problem.c
    g, w = point.G.reshape(-1), point.W.reshape(-1)
    eps = min(1e-3 * b, point.pg_norm)
    near_low, near_high = w <= -b + eps, w >= b - eps
    to_bound = (near_low & (g > 0)) | (near_high & (g < 0))  # gradient pushing out of the box
    d_bound = -2.0 * b * torch.sign(g) * to_bound
    H = problem.hessian(point)
    # H is singular along W + v·1ᵀ; damp it (Levenberg–Marquardt-like, vanishing at the solution)
    damping = 1e-2 * min(point.pg_norm, 1.0) + 1e-12 * float(H.diagonal().max()) + 1e-300
    free = ~to_bound
    for _ in range(c * c + 1):  # each pass holds at least one more coordinate, so this ends
        # Newton system on the free coordinates, identity rows on the others (whose step is 0)
        keep = free.to(_F64)
        H_free = H * (keep[:, None] * keep[None, :]) + torch.diag(1.0 - keep + damping * keep)
        d_free = -torch.linalg.solve(H_free, g * keep)
        blocked = free & ((near_low & (d_free < 0)) | (near_high & (d_free > 0)))
        if not bool(blocked.any()):
            break
        free = free & ~blocked
    newton_decrease = float(-(g @ d_free))
    d = d_bound + d_free
    to_bound_f = to_bound.to(_F64)
    # first breakpoint: the step at which a free coordinate reaches its bound (beyond it the projection
    # bends the Newton step); tried right after the full step, so that the coordinate lands on the
    # bound instead of creeping towards it by halvings
    room = torch.where(d_free > 0, (b - w) / d_free, torch.where(d_free < 0, (-b - w) / d_free, math.inf))
    first_break = float(room.min())
    step = 1.0
    while step >= _MIN_STEP:
        W_try = (w + step * d).clamp(-b, b)
        predicted = step * newton_decrease + float((g * (w - W_try) * to_bound_f).sum())
        trial = problem.accept(point, W_try.reshape(c, c), predicted)
        if trial is not None:
            if step == 1.0 and point.f - trial.f > _EXTRAPOLATE * predicted:
                trial = _extrapolate(problem, w, d, trial)
            return trial
        step = first_break if step == 1.0 and 0.0 < first_break < 1.0 else step * _SHRINK
    return None


def _extrapolate(problem: _Problem, w: Tensor, d: Tensor, accepted: _Point) -> _Point:
    """Longer steps 2, 4, 8, … along the projection arc while f keeps falling (exponential tails).

    Where the softmax saturates, f behaves like e^(−margin) and a Newton step only gains about one
    logit of margin; doubling the step reaches the box (or the minimiser) in a few evaluations.
    """
    best, step = accepted, 1.0
    while step < _MAX_EXTRAPOLATION:
        step *= 2.0
        W_try = (w + step * d).clamp(-problem.b, problem.b).reshape(best.W.shape)
        if torch.equal(W_try, best.W):  # everything that moves is already on its bound
            break
        trial = problem.at(W_try)
        if trial.f >= best.f - _NOISE * _EPS64 * best.f:
            break
        best = trial
    return best


def _gradient_step(problem: _Problem, point: _Point) -> _Point | None:
    """Fallback: projected gradient step from 1/L with backtracking."""
    step = 1.0 / problem.lipschitz
    while step * problem.lipschitz >= _MIN_STEP:
        W_try = (point.W - step * point.G).clamp(-problem.b, problem.b)
        trial = problem.accept(point, W_try, float((point.G * (point.W - W_try)).sum()))
        if trial is not None:
            return trial
        step *= _SHRINK
    return None


def head_adjusted_ce_and_remap(
    z: Tensor,
    y: Tensor,
    *,
    bound: float = 1.0,
    tol: float = 1e-9,
    max_iter: int = 100,
    w0: Tensor | None = None,
) -> tuple[Tensor, Tensor, RemapInfo]:
    """:func:`head_adjusted_ce` that also returns W* (to warm-start the next call) and the solver info.

    Args:
        z: logits ``(N, C)`` (float32 or float64), may require grad.
        y: integer labels ``(N,)`` in {0, …, C−1}.
        bound: b > 0, the box half-width.
        tol: solver tolerance on the projected-gradient norm (see :func:`solve_remap`).
        max_iter: maximum solver iterations.
        w0: warm start ``(C, C)`` or None (identity clipped to the box).

    Returns:
        ``(loss, W, info)``: ``loss`` the scalar CE(Z W*, y) in z's dtype, differentiable w.r.t. z;
        ``W`` the float64 ``(C, C)`` remap; ``info`` a :class:`RemapInfo`.

    Raises:
        ConfigError: see :func:`solve_remap`.
        DataError: see :func:`solve_remap`.

    """
    W, info = solve_remap(z, y, bound=bound, tol=tol, max_iter=max_iter, w0=w0)
    if not info.converged:
        warnings.warn(
            f"head-adjusted CE: remap solver stopped after {info.iterations} iterations with "
            f"projected-gradient norm {info.pg_norm:.3g} > tol={tol:g}; the loss and its gradient are "
            "approximate (raise max_iter or tol)",
            RuntimeWarning,
            stacklevel=2,
        )
    loss = nn.functional.cross_entropy(
        z @ W.to(dtype=z.dtype, device=z.device), y.to(device=z.device, dtype=torch.long)
    )
    return loss, W, info


def head_adjusted_ce(
    z: Tensor,
    y: Tensor,
    *,
    bound: float = 1.0,
    tol: float = 1e-9,
    max_iter: int = 100,
    w0: Tensor | None = None,
) -> Tensor:
    """Head-adjusted cross-entropy CE_adj(Z, y) = min_{W ∈ [−b, b]^{C×C}} CE(Z W, y).

    W* is solved on the detached logits (:func:`solve_remap`) and the loss is CE(Z W*, y) with W*
    held constant, so ∂loss/∂Z = (softmax(Z W*) − onehot(y)) W*ᵀ / N, the gradient of the
    min-value function by Danskin's theorem (up to ``tol``). A confidently wrong but structured
    output (e.g. swapped labels) has a large plain CE but a small CE_adj, because a remap undoes it.
    When b ≥ 1 the identity is feasible and CE_adj ≤ CE(Z, y); a larger b never increases CE_adj.

    Args:
        z: logits ``(N, C)`` (float32 or float64), may require grad.
        y: integer labels ``(N,)`` in {0, …, C−1}.
        bound: b > 0, the box half-width (MLAC uses 1).
        tol: solver tolerance on the projected-gradient norm (see :func:`solve_remap`).
        max_iter: maximum solver iterations (a RuntimeWarning is issued if they run out).
        w0: warm start ``(C, C)`` or None (identity clipped to the box).

    Returns:
        Scalar tensor in z's dtype.

    Raises:
        ConfigError: ``bound`` ≤ 0 (or not finite), ``tol`` ≤ 0, ``max_iter`` < 1.
        DataError: z not 2-D, C < 2, N = 0, non-finite z, y not matching z's rows, labels outside
            {0, …, C−1}, or ``w0`` not ``(C, C)``.

    Example:
        >>> z = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])  # confidently wrong: labels swapped
        >>> y = torch.tensor([1, 0])
        >>> plain = torch.nn.functional.cross_entropy(z, y)
        >>> round(float(plain), 4), round(float(head_adjusted_ce(z, y)), 4)
        (8.0003, 0.0)

    References:
        Henderson et al., arXiv 2211.14946, §3 (MLAC's head-adjusted harmful loss).

    """
    return head_adjusted_ce_and_remap(z, y, bound=bound, tol=tol, max_iter=max_iter, w0=w0)[0]
