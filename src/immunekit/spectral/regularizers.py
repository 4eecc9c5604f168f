"""Condition-number regularizers R_well / R_ill, their closed-form gradients and step bounds.

For S with singular values σ_1 ≥ … ≥ σ_p (p = min dimension) and numerical rank k:

* R_well(S) = ½σ_1² − ‖S‖_F² / (2p) = (1/2p) Σ_{i≤p} (σ_1² − σ_i²) ≥ 0  (κ-minimiser),
  ∇_S R_well = σ_1 u_1 v_1ᵀ − S/p.
* Δ(S) = ‖S‖_F² / (2k) − ½σ_k²,  R_ill(S) = 1/Δ(S)  (κ-maximiser, Eq. 12 of arXiv 2505.23760),
  ∇_S R_ill = (σ_k u_k v_kᵀ − S/k) / Δ².

For the linear-probe Hessian H = θᵀKθ and a symmetric G = ∂R/∂H (Theorem 4.2):
∇_θ R = 2 K θ G with G_well = σ_1 v_1v_1ᵀ − H/p and G_ill = (σ_k v_kv_kᵀ − H/k)/Δ².
Left preconditioning by K⁺ gives K⁺∇_θR = 2 P_K θ G (P_K = K⁺K, exact also for singular K),
so a step θ' = θ(I − 2τG) keeps H's eigenvectors (Theorem 4.3).

Eigen-derivatives are undefined at ties: σ_1 (R_well) and σ_k (R_ill) must be simple.

References:
    Zheng et al., arXiv 2505.23760, Eqs. 3, 11–12, Theorems 4.1–4.3.
    Nenov et al. 2024 (R_well).

"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from immunekit.errors import NumericalError
from immunekit.spectral.condition import default_rtol
from immunekit.spectral.hessians import linear_l2_hessian, symmetrize

log = logging.getLogger(__name__)


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _rank(values: Tensor, rtol: float) -> int:
    smax = float(values.max()) if values.numel() else 0.0
    return int((values > rtol * smax).sum()) if smax > 0 else 0


# ---------------------------------------------------------------------------------------------
# Values and gradients with respect to a general matrix S
# ---------------------------------------------------------------------------------------------


def r_well(s: Tensor) -> float:
    """R_well(S) = ½σ_1² − ‖S‖_F²/(2p), p = min(S.shape).

    Example:
        >>> r_well(torch.eye(3))
        0.0
        >>> r_well(torch.diag(torch.tensor([2.0, 0.0])))
        1.0

    """
    s = _f64(s)
    p = min(s.shape)
    sig = torch.linalg.svdvals(s)  # p values, descending
    # (1/2p) Σ (σ_1² − σ_i²): a sum of non-negative terms, so never negative by rounding.
    return float((sig[0] ** 2 - sig**2).sum() / (2 * p))


def r_well_grad(s: Tensor) -> Tensor:
    """∇_S R_well = σ_1 u_1 v_1ᵀ − S/p (σ_1 must be simple)."""
    s = _f64(s)
    u, sig, vh = torch.linalg.svd(s, full_matrices=False)
    return sig[0] * torch.outer(u[:, 0], vh[0]) - s / min(s.shape)


def delta(s: Tensor, *, rtol: float | None = None) -> tuple[float, int]:
    """Δ(S) = ‖S‖_F²/(2k) − ½σ_k² and the numerical rank k used."""
    s = _f64(s)
    sig = torch.linalg.svdvals(s)
    k = _rank(sig, default_rtol(*s.shape) if rtol is None else rtol)
    if k == 0:
        raise NumericalError("R_ill is undefined for a zero matrix (rank 0)")
    return float((sig[:k] ** 2).sum() / (2 * k) - 0.5 * sig[k - 1] ** 2), k


def r_ill(s: Tensor, *, rtol: float | None = None, delta_min: float = 0.0) -> float:
    """R_ill(S) = 1 / max(Δ(S), δ_min).

    Example:
        >>> round(r_ill(torch.diag(torch.tensor([3.0, 1.0]))), 12)   # Δ = (9+1)/4 − 1/2 = 2
        0.5

    """
    d, _ = delta(s, rtol=rtol)
    return 1.0 / _floored(d, delta_min)


def r_ill_grad(s: Tensor, *, rtol: float | None = None, delta_min: float = 0.0) -> Tensor:
    """∇_S R_ill = (σ_k u_k v_kᵀ − S/k)/Δ² (σ_k must be simple; zero when Δ is floored)."""
    s = _f64(s)
    u, sig, vh = torch.linalg.svd(s, full_matrices=False)
    k = _rank(sig, default_rtol(*s.shape) if rtol is None else rtol)
    if k == 0:
        raise NumericalError("R_ill is undefined for a zero matrix (rank 0)")
    d = float((sig[:k] ** 2).sum() / (2 * k) - 0.5 * sig[k - 1] ** 2)
    if d < delta_min:
        return torch.zeros_like(s)
    d = _floored(d, delta_min)  # raises like r_ill when Δ ≤ 0 and there is no floor
    return (sig[k - 1] * torch.outer(u[:, k - 1], vh[k - 1]) - s / k) / d**2


def _floored(d: float, delta_min: float) -> float:
    if d <= delta_min:
        if delta_min <= 0:
            raise NumericalError(
                f"Δ(S) = {d:.3g}: all retained singular values are equal, so R_ill is infinite; "
                "pass delta_min > 0 to floor it"
            )
        log.debug("Δ=%.3g floored at delta_min=%.3g", d, delta_min)
        return delta_min
    return d


# ---------------------------------------------------------------------------------------------
# Spectral gradients for symmetric PSD H = θᵀKθ (Theorem 4.2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralGrad:
    """G = ∂R/∂H for a symmetric PSD H, with the spectral facts the step bounds need.

    Attributes:
        g: ``(D, D)`` symmetric gradient of R with respect to H.
        value: R(H).
        eigenvalues: H's eigenvalues, descending, ``(D,)``.
        eigenvectors: matching eigenvectors as columns, ``(D, D)``.
        rank: numerical rank k of H.
        delta: Δ(H) (R_ill and Opt-κ only; NaN otherwise).
        floored: Δ hit the floor δ_min (R_ill only).

    """

    g: Tensor
    value: float
    eigenvalues: Tensor
    eigenvectors: Tensor
    rank: int
    delta: float = float("nan")
    floored: bool = False


def psd_eigh(h: Tensor, *, rtol: float | None = None, rank: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Eigen-decomposition of a symmetric PSD matrix, descending, with numerical rank.

    Negative rounding noise is clipped to zero; rank = #{λ_i > rtol·λ_max}, default
    ``rtol = dim · eps_64``. A ``rank`` decided elsewhere (e.g. from a factor of H, which
    resolves small eigenvalues far better than ``eigh`` of H) overrides the threshold.
    """
    w, v = torch.linalg.eigh(symmetrize(_f64(h)))
    w, v = w.flip(0).clamp_min(0.0), v.flip(1)
    if rank is not None:
        return w, v, int(rank)
    return w, v, _rank(w, default_rtol(*h.shape) if rtol is None else rtol)


def g_well(h: Tensor, *, rank: int | None = None) -> SpectralGrad:
    """G_well = λ_1 v_1v_1ᵀ − H/p for symmetric PSD H (p = dim H); ``rank`` as :func:`psd_eigh`."""
    w, v, k = psd_eigh(h, rank=rank)
    p = h.shape[0]
    g = w[0] * torch.outer(v[:, 0], v[:, 0]) - symmetrize(_f64(h)) / p
    value = float((w[0] ** 2 - w**2).sum() / (2 * p))  # ≥ 0 also in floating point
    return SpectralGrad(g, value, w, v, k)


def g_ill(
    h: Tensor, *, rtol: float | None = None, delta_min: float = 0.0, rank: int | None = None
) -> SpectralGrad:
    """G_ill = (λ_k v_kv_kᵀ − H/k)/Δ² for symmetric PSD H, k = numerical rank (or ``rank``)."""
    w, v, k = psd_eigh(h, rtol=rtol, rank=rank)
    if k == 0:
        raise NumericalError("H is numerically zero; R_ill is undefined")
    d = float((w[:k] ** 2).sum() / (2 * k) - 0.5 * w[k - 1] ** 2)
    floored = d < delta_min
    if floored:
        return SpectralGrad(torch.zeros_like(v), 1.0 / delta_min, w, v, k, d, True)
    d_eff = _floored(d, delta_min)
    g = (w[k - 1] * torch.outer(v[:, k - 1], v[:, k - 1]) - symmetrize(_f64(h)) / k) / d_eff**2
    return SpectralGrad(g, 1.0 / d_eff, w, v, k, d)


def g_log_kappa(h: Tensor, *, rtol: float | None = None, rank: int | None = None) -> SpectralGrad:
    """∂ log κ(H)/∂H = v_1v_1ᵀ/λ_1 − v_kv_kᵀ/λ_k (pseudo-inverse κ, k = numerical rank or ``rank``)."""
    w, v, k = psd_eigh(h, rtol=rtol, rank=rank)
    if k == 0:
        raise NumericalError("H is numerically zero; log κ is undefined")
    g = torch.outer(v[:, 0], v[:, 0]) / w[0] - torch.outer(v[:, k - 1], v[:, k - 1]) / w[k - 1]
    return SpectralGrad(g, float(torch.log(w[0] / w[k - 1])), w, v, k)


def theta_grad(theta: Tensor, k: Tensor, g: Tensor) -> Tensor:
    """∇_θ R(θᵀKθ) = 2 K θ G for symmetric G = ∂R/∂H (Theorem 4.2).

    Args:
        theta: ``(D_in, D_hid)``.
        k: ``(D_in, D_in)`` symmetric.
        g: ``(D_hid, D_hid)`` symmetric.

    Returns:
        ``(D_in, D_hid)``.

    """
    return 2.0 * _f64(k) @ _f64(theta) @ _f64(g)


def r_well_theta_grad(theta: Tensor, k: Tensor) -> Tensor:
    """∇_θ R_well(θᵀKθ) = 2Kθ(λ_1 v_1v_1ᵀ − H/p)."""
    return theta_grad(theta, k, g_well(linear_l2_hessian(theta, k)).g)


def r_ill_theta_grad(
    theta: Tensor, k: Tensor, *, rtol: float | None = None, delta_min: float = 0.0
) -> Tensor:
    """∇_θ R_ill(θᵀKθ) = 2Kθ(λ_k v_kv_kᵀ − H/k)/Δ²."""
    return theta_grad(theta, k, g_ill(linear_l2_hessian(theta, k), rtol=rtol, delta_min=delta_min).g)


# ---------------------------------------------------------------------------------------------
# Left preconditioning by K⁺ (or a ridge inverse)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preconditioner:
    """Left preconditioner M ≈ K⁺ applied as ``M @ grad`` (θ layout).

    Build with :func:`make_preconditioner`; ``projector`` is M K (= P_K for the pseudo-inverse).

    Attributes:
        matrix: ``(D_in, D_in)`` M.
        projector: ``(D_in, D_in)`` M K.
        method: ``"pinv"``, ``"ridge"`` or ``"none"``.
        rtol: relative threshold of the pseudo-inverse (pinv).
        ridge: ε of (K + εI)⁻¹ (ridge).
        rank: numerical rank of K.

    """

    matrix: Tensor
    projector: Tensor
    method: str
    rtol: float
    ridge: float
    rank: int

    def apply(self, grad: Tensor) -> Tensor:
        """M ∇ (left multiplication in θ layout, i.e. ∇_W M for W = θᵀ)."""
        return self.matrix @ _f64(grad)

    def spectral_step(self, theta: Tensor, g: Tensor) -> Tensor:
        """M ∇_θR = 2 (MK) θ G without forming ∇_θR (closed form of Algorithm 1 step (c))."""
        return 2.0 * self.projector @ _f64(theta) @ _f64(g)

    def describe(self) -> dict[str, float | int | str]:
        """JSON-ready summary for records."""
        return {"method": self.method, "rtol": self.rtol, "ridge": self.ridge, "rank": self.rank}


def make_preconditioner(
    k: Tensor,
    *,
    method: Literal["pinv", "ridge", "none"] = "pinv",
    rtol: float | None = None,
    ridge: float = 0.0,
) -> Preconditioner:
    """K⁺ with a relative threshold, (K + εI)⁻¹, or the identity.

    Args:
        k: ``(D, D)`` symmetric PSD second-moment matrix.
        method: ``"pinv"`` (exact: K⁺K = P_K, eigenvector-preserving), ``"ridge"`` (approximate),
            or ``"none"`` (no preconditioning, an ablation).
        rtol: pinv threshold relative to λ_max(K); default ``D · eps_64``.
        ridge: ε > 0 for ``"ridge"``.

    Returns:
        Preconditioner.

    Raises:
        NumericalError: for a non-square K or a non-positive ridge with ``method="ridge"``.

    """
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise NumericalError(f"K must be square, got shape {tuple(k.shape)}")
    k = symmetrize(_f64(k))
    d = k.shape[0]
    w, v = torch.linalg.eigh(k)
    tol = default_rtol(d, d) if rtol is None else float(rtol)
    keep = w > tol * float(w.max())
    rank = int(keep.sum())
    if method == "pinv":
        inv = torch.where(keep, 1.0 / w.clamp_min(1e-300), torch.zeros_like(w))
        m = (v * inv) @ v.T
        proj = (v * keep.to(w.dtype)) @ v.T
        return Preconditioner(m, proj, "pinv", tol, 0.0, rank)
    if method == "ridge":
        if ridge <= 0:
            raise NumericalError(f"ridge must be > 0 for method='ridge', got {ridge}; e.g. ridge=1e-6")
        m = (v / (w + ridge)) @ v.T
        return Preconditioner(m, m @ k, "ridge", tol, float(ridge), rank)
    if method == "none":
        eye = torch.eye(d, dtype=torch.float64)
        return Preconditioner(eye, k, "none", tol, 0.0, rank)
    raise NumericalError(f"unknown preconditioner {method!r}; choose 'pinv', 'ridge' or 'none'")


class _LeftPrecondition(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming θ-gradient by M on the left ("dummy layer")."""

    @staticmethod
    def forward(ctx, theta: Tensor, m: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(m)
        return theta.view_as(theta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (m,) = ctx.saved_tensors
        return m.to(grad.dtype) @ grad, None


def precondition_layer(theta: Tensor, m: Tensor) -> Tensor:
    """The paper's "dummy layer" (App. C.3): forward is the identity, backward is g ↦ M g.

    Regularizers read ``precondition_layer(θ, K⁺)`` while the task loss reads θ, so autograd
    produces the preconditioned regularizer gradient of Algorithm 1 step (c).
    """
    return _LeftPrecondition.apply(theta, m)


# ---------------------------------------------------------------------------------------------
# Differentiable versions (autograd through eigvalsh), for deep features and for checking
# ---------------------------------------------------------------------------------------------


def r_well_autograd(s: Tensor) -> Tensor:
    """R_well of a symmetric PSD S as a differentiable scalar (autograd through ``eigvalsh``)."""
    w = torch.linalg.eigvalsh(symmetrize(s))
    return (w[-1] ** 2 - w**2).sum() / (2 * s.shape[0])  # = ½λ_1² − ‖S‖_F²/(2p), never negative


def r_ill_autograd(s: Tensor, *, rtol: float | None = None, delta_min: float = 0.0) -> Tensor:
    """R_ill of a symmetric PSD S as a differentiable scalar; k is fixed from the current spectrum."""
    w = torch.linalg.eigvalsh(symmetrize(s)).flip(0).clamp_min(0.0)
    k = _rank(w.detach(), default_rtol(*s.shape) if rtol is None else rtol)
    d = (w[:k] ** 2).sum() / (2 * k) - 0.5 * w[k - 1] ** 2
    return 1.0 / d.clamp_min(delta_min) if delta_min > 0 else 1.0 / d


# ---------------------------------------------------------------------------------------------
# Step bounds (§4 of the spec)
# ---------------------------------------------------------------------------------------------


def r_well_step_bound(eigenvalues: Tensor, *, rtol: float | None = None, rank: int | None = None) -> float:
    """Largest τ for which θ ← θ − τK⁺∇_θR_well provably lowers κ(H) (H eigenvalues, descending).

    τ < min{ (√(λ_1λ_2) − λ_2)/((2/p)λ_2²), (1 − κ^{-1/2})/(2(1 − 1/p)λ_1) } where the second
    term is the toolkit's sufficient replacement for the paper's 1/((1−1/p)λ_1).
    Returns ``inf`` when H has no spread to reduce (λ_1 = λ_2 or rank ≤ 1).

    ``rtol`` is the relative rank threshold behind κ (default ``p · eps_64``). Pass the one used
    for H elsewhere: with a singular K the zero eigenvalues of H = θᵀKθ carry rounding noise that
    can exceed the default, and a noise eigenvalue taken as σ_min inflates the bound. A ``rank``
    decided elsewhere (from a factor of H) overrides the threshold.
    """
    w = _f64(eigenvalues)
    p = w.numel()
    l1, l2 = float(w[0]), float(w[1]) if p > 1 else 0.0
    if p < 2 or l2 <= 0 or l1 <= l2:
        return float("inf")
    k = rank if rank is not None else _rank(w, default_rtol(p, p) if rtol is None else rtol)
    kappa = l1 / float(w[k - 1])
    a = (l1 * l2) ** 0.5 - l2
    b = (2.0 / p) * l2**2
    return min(a / b, (1 - kappa**-0.5) / (2 * (1 - 1 / p) * l1))


def r_ill_step_bound(eigenvalues: Tensor, delta_value: float, rank: int) -> float:
    """Largest τ for which θ ← θ − τK⁺∇_θR_ill provably raises κ(H): τ < Δ²/(2(1 − 1/k)λ_k).

    Half of the derived sufficient constant c = 1/((1−1/k)λ_k), which keeps 1 − 2τg_k > 0.
    """
    w = _f64(eigenvalues)
    if rank < 2:
        return float("inf")
    lk = float(w[rank - 1])
    return delta_value**2 / (2 * (1 - 1 / rank) * lk)
