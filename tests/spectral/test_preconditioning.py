"""Left preconditioning by K⁺ (spec §4 Theorem 4.3, §5 dummy layer), step bounds and Proposition 3.2."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor
from torch.testing import assert_close

from immunekit.errors import NumericalError
from immunekit.spectral.condition import condition_number
from immunekit.spectral.hessians import linear_l2_hessian
from immunekit.spectral.regularizers import (
    Preconditioner,
    g_ill,
    g_well,
    make_preconditioner,
    precondition_layer,
    r_ill_autograd,
    r_ill_step_bound,
    r_ill_theta_grad,
    r_well_autograd,
    r_well_step_bound,
    r_well_theta_grad,
    theta_grad,
)

from ._util import F64, SETTINGS, gen, linear_instance, log_uniform, orthogonal, seeds, separated_descending

RTOL_H = 1e-10  # rank threshold for H = θᵀKθ when K is singular (its zeros carry ~eps·‖θ‖²‖K‖ noise)


def singular_k(d: int, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    q = orthogonal(d, g)
    gam = 10.0 ** (2 * torch.rand(rank, generator=g, dtype=F64) - 1)
    return (q[:, :rank] * gam) @ q[:, :rank].T, q


def eig_desc(h: Tensor) -> tuple[Tensor, Tensor]:
    w, v = torch.linalg.eigh(0.5 * (h + h.T))
    return w.flip(0), v.flip(1)


# ---------------------------------------------------------------------------------------------
# Preconditioner construction
# ---------------------------------------------------------------------------------------------


def test_pinv_preconditioner_full_rank_is_inverse() -> None:
    g = gen(0)
    x = torch.randn(30, 5, generator=g, dtype=F64)
    k = x.T @ x
    p = make_preconditioner(k)
    assert p.method == "pinv"
    assert p.rank == 5
    assert_close(p.matrix, torch.linalg.inv(k), rtol=1e-10, atol=1e-12)
    assert_close(p.projector, torch.eye(5, dtype=F64), rtol=0, atol=1e-12)
    grad = torch.randn(5, 3, generator=g, dtype=F64)
    assert_close(p.apply(grad), torch.linalg.solve(k, grad), rtol=1e-10, atol=1e-12)
    assert p.describe() == {"method": "pinv", "rtol": 5 * torch.finfo(F64).eps, "ridge": 0.0, "rank": 5}


def test_pinv_preconditioner_singular_k_projects_onto_range() -> None:
    k, q = singular_k(6, 4, seed=1)
    p = make_preconditioner(k)
    assert p.rank == 4
    proj = q[:, :4] @ q[:, :4].T
    assert_close(p.projector, proj, rtol=0, atol=1e-12)
    assert_close(p.projector @ p.projector, p.projector, rtol=0, atol=1e-12)
    assert_close(p.matrix, torch.linalg.pinv(k, hermitian=True), rtol=1e-9, atol=1e-10)
    assert_close(p.matrix @ k, p.projector, rtol=0, atol=1e-12)
    assert_close(k @ p.projector, k, rtol=0, atol=1e-12)  # K P_K = K: why pinv stays exact
    # The scale of K does not change the rank (relative threshold).
    assert make_preconditioner(1e-30 * k).rank == 4


@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 1.0])
def test_ridge_projector_is_regularized_inverse_times_k(ridge: float) -> None:
    k, _ = singular_k(5, 3, seed=2)
    p = make_preconditioner(k, method="ridge", ridge=ridge)
    eye = torch.eye(5, dtype=F64)
    assert p.method == "ridge"
    assert p.ridge == ridge
    assert p.rank == 3
    inv = torch.linalg.inv(k + ridge * eye)
    # (K + εI)⁻¹ has condition number up to λ_max/ε: compare on the scale of its largest entry.
    assert_close(p.matrix, inv, rtol=1e-9, atol=1e-9 * float(inv.abs().max()))
    assert_close(p.projector, torch.linalg.solve(k + ridge * eye, k), rtol=1e-9, atol=1e-9)
    # Only approximate: the projector is not idempotent, unlike P_K.
    assert float((p.projector @ p.projector - p.projector).abs().max()) > 1e-8


def test_none_preconditioner_is_identity() -> None:
    k, _ = singular_k(4, 4, seed=3)
    p = make_preconditioner(k, method="none")
    theta = torch.randn(4, 3, generator=gen(4), dtype=F64)
    g = g_well(linear_l2_hessian(theta, k)).g
    assert_close(p.matrix, torch.eye(4, dtype=F64), rtol=0, atol=0)
    # spectral_step then equals the raw gradient 2KθG.
    assert_close(p.spectral_step(theta, g), theta_grad(theta, k, g), rtol=1e-13, atol=1e-13)


def test_make_preconditioner_errors() -> None:
    with pytest.raises(NumericalError):
        make_preconditioner(torch.ones(2, 3, dtype=F64))
    with pytest.raises(NumericalError, match="ridge"):
        make_preconditioner(torch.eye(2, dtype=F64), method="ridge", ridge=0.0)
    with pytest.raises(NumericalError, match="unknown"):
        make_preconditioner(torch.eye(2, dtype=F64), method="cholesky")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Dummy layer == closed form 2 P_K θ G
# ---------------------------------------------------------------------------------------------


def test_precondition_layer_forward_identity_backward_m_times_grad() -> None:
    g = gen(5)
    theta = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    m = torch.randn(4, 4, generator=g, dtype=F64)
    upstream = torch.randn(4, 3, generator=g, dtype=F64)
    out = precondition_layer(theta, m)
    assert torch.equal(out, theta)
    (out * upstream).sum().backward()
    assert theta.grad is not None
    assert_close(theta.grad, m @ upstream, rtol=1e-14, atol=1e-14)


def _dummy_grad(theta: Tensor, k: Tensor, pre: Preconditioner, which: str) -> Tensor:
    t = theta.detach().clone().requires_grad_(True)
    tp = precondition_layer(t, pre.matrix)
    h = tp.T @ k @ tp
    loss = r_well_autograd(h) if which == "well" else r_ill_autograd(h, rtol=RTOL_H)
    loss.backward()
    assert t.grad is not None
    return t.grad


@SETTINGS
@given(seed=seeds, d=st.integers(3, 6), which=st.sampled_from(["well", "ill"]), data=st.data())
def test_dummy_layer_equals_spectral_step(seed: int, d: int, which: str, data: st.DataObject) -> None:
    """autograd of R(Dummy(θ)ᵀK Dummy(θ)) with M = K⁺ equals 2 P_K θ G, for full-rank and singular K."""
    n_null = data.draw(st.integers(0, min(2, d - 2)))  # rank ≥ 2, or R_ill is infinite
    r = d - n_null
    h_eigs = data.draw(separated_descending(min_size=r, max_size=r, min_ratio=1.2, max_ratio=3.0, low=0.1))
    k_eigs = data.draw(log_uniform(-1, 1, min_size=r, max_size=r))
    theta, k, _ = linear_instance(h_eigs, k_eigs, d, d, seed)
    pre = make_preconditioner(k)
    assert pre.rank == r
    h = linear_l2_hessian(theta, k)
    sg = g_well(h) if which == "well" else g_ill(h, rtol=RTOL_H)
    closed = pre.spectral_step(theta, sg.g)
    got = _dummy_grad(theta, k, pre, which)
    scale = float(closed.abs().max())
    assert_close(got, closed, rtol=1e-9, atol=1e-9 * scale)
    # ... which is K⁺ applied to the raw Theorem 4.2 gradient.
    raw = r_well_theta_grad(theta, k) if which == "well" else r_ill_theta_grad(theta, k, rtol=RTOL_H)
    assert_close(pre.apply(raw), closed, rtol=1e-9, atol=1e-9 * scale)
    if n_null:
        # Singular K: the step has no component in K's null space (P_K θ G, not θ G).
        assert float((closed - pre.projector @ closed).abs().max()) <= 1e-12 * scale


def test_task_gradient_is_not_preconditioned() -> None:
    """Regularizer reads Dummy(θ), task loss reads θ: total grad = ∇L + K⁺∇R."""
    g = gen(6)
    x = torch.randn(20, 4, generator=g, dtype=F64)
    y = torch.randn(20, generator=g, dtype=F64)
    w = torch.randn(4, generator=g, dtype=F64)
    k = x.T @ x
    pre = make_preconditioner(k)
    theta0 = torch.randn(4, 4, generator=g, dtype=F64)
    t = theta0.clone().requires_grad_(True)
    task = ((x @ t @ w - y) ** 2).mean()
    tp = precondition_layer(t, pre.matrix)
    (task + r_well_autograd(tp.T @ k @ tp)).backward()
    t_task = theta0.clone().requires_grad_(True)
    ((x @ t_task @ w - y) ** 2).mean().backward()
    assert t.grad is not None and t_task.grad is not None
    expected = t_task.grad + pre.spectral_step(theta0, g_well(linear_l2_hessian(theta0, k)).g)
    assert_close(t.grad, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


# ---------------------------------------------------------------------------------------------
# Step bounds
# ---------------------------------------------------------------------------------------------


def test_r_well_step_bound_closed_form_and_paper_term_counterexample() -> None:
    """Spectrum (10, 1), p = 2: bound = min{(√10 − 1)/1, (1 − 10^{-1/2})/10}; the paper's 1/((1−1/p)σ_1)
    alone would allow τ = 0.099, which raises κ from 10 to ≈ 1.2e3 (spec §4)."""
    w = torch.tensor([10.0, 1.0], dtype=F64)
    bound = r_well_step_bound(w)
    assert bound == pytest.approx(min(math.sqrt(10) - 1, (1 - 10**-0.5) / 10), rel=1e-14, abs=0)
    assert bound < 0.099 < 1 / ((1 - 1 / 2) * 10)
    tau = 0.099
    g = torch.tensor([10.0 * (1 - 1 / 2), -1.0 / 2], dtype=F64)
    new = w * (1 - 2 * tau * g) ** 2
    assert float(new.max() / new.min()) == pytest.approx(1207.8, rel=1e-4, abs=0)
    # Zeros are ignored by κ but count in p.
    w3 = torch.tensor([10.0, 1.0, 0.0], dtype=F64)
    assert r_well_step_bound(w3) == pytest.approx(
        min((math.sqrt(10) - 1) / (2 / 3), (1 - 10**-0.5) / (2 * (2 / 3) * 10)), rel=1e-14, abs=0
    )


def test_r_well_step_bound_rank_threshold() -> None:
    """A rounding-noise eigenvalue (1e-14 ≫ p·eps·λ_1) must not be taken as σ_min when rtol says so."""
    w = torch.tensor([5.0, 2.0, 1e-14], dtype=F64)
    first = (math.sqrt(10) - 2) / ((2 / 3) * 4)
    exact = min(first, (1 - 2.5**-0.5) / (2 * (2 / 3) * 5))
    assert r_well_step_bound(w, rtol=1e-10) == pytest.approx(exact, rel=1e-14, abs=0)
    # With the default threshold the noise counts, κ looks like 5e14 and the bound is ~2.7x larger.
    assert r_well_step_bound(w) == pytest.approx(
        min(first, (1 - (5e14) ** -0.5) / (2 * (2 / 3) * 5)), rel=1e-12, abs=0
    )
    assert r_well_step_bound(w) > 2 * exact


def test_step_bounds_degenerate_cases() -> None:
    assert r_well_step_bound(torch.tensor([3.0], dtype=F64)) == math.inf
    assert r_well_step_bound(torch.tensor([3.0, 0.0], dtype=F64)) == math.inf
    assert r_ill_step_bound(torch.tensor([3.0, 0.0], dtype=F64), 1.0, 1) == math.inf
    # τ < Δ² / (2(1 − 1/k) λ_k):  λ = (3, 1), Δ = 2, k = 2 -> 4 / (2 · 0.5 · 1) = 4.
    assert r_ill_step_bound(torch.tensor([3.0, 1.0], dtype=F64), 2.0, 2) == pytest.approx(
        4.0, rel=1e-15, abs=0
    )


# ---------------------------------------------------------------------------------------------
# Theorem 4.3: preconditioned steps change κ monotonically and keep H's eigenvectors
# ---------------------------------------------------------------------------------------------


def predicted_spectrum(sig: Tensor, gvals: Tensor, tau: float) -> Tensor:
    return sig * (1 - 2 * tau * gvals) ** 2


def g_values_well(sig: Tensor, p: int) -> Tensor:
    """Eigenvalues of G_well along H's eigenvectors (spec §4): g_1 = σ_1(1−1/p), g_i = −σ_i/p."""
    out = -sig / p
    out[0] = sig[0] * (1 - 1 / p)
    return out


def g_values_ill(sig: Tensor, k: int) -> Tensor:
    """g_k = σ_k(1−1/k)/Δ², g_{i≠k} = −σ_i/(kΔ²); zero eigenvalues give g = 0."""
    d = float((sig[:k] ** 2).sum() / (2 * k) - 0.5 * sig[k - 1] ** 2)
    out = -sig / (k * d**2)
    out[k - 1] = sig[k - 1] * (1 - 1 / k) / d**2
    return out


def check_step(
    theta: Tensor, k: Tensor, step: Tensor, tau: float, sig: Tensor, gvals: Tensor, v: Tensor
) -> None:
    """After θ' = θ − τ·step: H' has eigenvalues σ_i(1−2τg_i)² on H's eigenvectors v (columns)."""
    r = int((sig > 0).sum())
    h2 = linear_l2_hessian(theta - tau * step, k)
    pred = predicted_spectrum(sig, gvals, tau)
    w2, v2 = eig_desc(h2)
    order = torch.argsort(pred, descending=True)
    pred_sorted = pred[order]
    # Non-zero eigenvalues match the prediction; zero eigenvalues stay zero.
    assert_close(w2[:r], pred_sorted[:r], rtol=1e-6, atol=0)
    if r < sig.numel():
        assert float(w2[r:].abs().max()) <= 1e-12 * float(w2[0])
    # Eigenvectors are kept: new eigenvector j matches old eigenvector order[j].
    cos = (v2[:, :r] * v[:, order[:r]]).sum(0).abs()
    assert float(cos.min()) >= 1 - 1e-8


@SETTINGS
@given(
    seed=seeds,
    d=st.integers(2, 6),
    n_null=st.integers(0, 2),
    frac=st.sampled_from([0.5, 0.99]),
    data=st.data(),
)
def test_preconditioned_r_well_step_lowers_kappa_and_keeps_eigenvectors(
    seed: int, d: int, n_null: int, frac: float, data: st.DataObject
) -> None:
    r = d - n_null
    assume(r >= 2)
    sig_nz = data.draw(separated_descending(min_size=r, max_size=r, min_ratio=1.2, max_ratio=3.0, low=0.1))
    k_eigs = data.draw(log_uniform(-1, 1, min_size=r, max_size=r))
    theta, k, _ = linear_instance(sig_nz, k_eigs, d, d, seed)
    pre = make_preconditioner(k)
    h = linear_l2_hessian(theta, k)
    sg = g_well(h)
    sig = torch.cat([sig_nz, torch.zeros(n_null, dtype=F64)])
    assert_close(sg.eigenvalues, sig, rtol=1e-9, atol=1e-12 * float(sig[0]))
    bound = r_well_step_bound(sig)
    assert bound == pytest.approx(r_well_step_bound(sg.eigenvalues, rtol=RTOL_H), rel=1e-6, abs=0)
    tau = frac * bound
    gvals = g_values_well(sig, d)
    check_step(theta, k, pre.spectral_step(theta, sg.g), tau, sig, gvals, sg.eigenvectors)

    before = condition_number(h, hermitian=True, rtol=RTOL_H)
    after = condition_number(
        linear_l2_hessian(theta - tau * pre.spectral_step(theta, sg.g), k), hermitian=True, rtol=RTOL_H
    )
    pred = predicted_spectrum(sig_nz, gvals[:r], tau)
    assert float(pred.max() / pred.min()) < float(sig_nz[0] / sig_nz[-1])  # the bound's guarantee, exactly
    assert after.rank == before.rank == r
    assert after.kappa < before.kappa
    assert after.kappa == pytest.approx(float(pred.max() / pred.min()), rel=1e-6, abs=0)


def tau_cap_for_kappa(sig: Tensor, gvals: Tensor, upper: float, kappa_max: float) -> float:
    """Largest τ ≤ upper whose predicted κ stays ≤ kappa_max (κ increases with τ below the bound)."""
    r = int((sig > 0).sum())

    def kappa(tau: float) -> float:
        pred = predicted_spectrum(sig[:r], gvals[:r], tau)
        return float(pred.max() / pred.min())

    if kappa(upper) <= kappa_max:
        return upper
    lo, hi = 0.0, upper
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kappa(mid) <= kappa_max else (lo, mid)
    return lo


@SETTINGS
@given(
    seed=seeds,
    d=st.integers(2, 6),
    n_null=st.integers(0, 2),
    frac=st.floats(0.05, 0.99),
    data=st.data(),
)
def test_preconditioned_r_ill_step_raises_kappa_and_keeps_eigenvectors(
    seed: int, d: int, n_null: int, frac: float, data: st.DataObject
) -> None:
    r = d - n_null
    assume(r >= 2)
    sig_nz = data.draw(separated_descending(min_size=r, max_size=r, min_ratio=1.2, max_ratio=3.0, low=0.1))
    k_eigs = data.draw(log_uniform(-1, 1, min_size=r, max_size=r))
    theta, k, _ = linear_instance(sig_nz, k_eigs, d, d, seed)
    pre = make_preconditioner(k)
    h = linear_l2_hessian(theta, k)
    sg = g_ill(h, rtol=RTOL_H)
    assert sg.rank == r
    sig = torch.cat([sig_nz, torch.zeros(n_null, dtype=F64)])
    gvals = g_values_ill(sig, r)
    bound = r_ill_step_bound(sg.eigenvalues, sg.delta, sg.rank)
    # The bound keeps 1 − 2τg_k > 0: at τ = bound the smallest eigenvalue would be exactly 0.
    assert 1 - 2 * bound * float(gvals[r - 1]) == pytest.approx(0.0, abs=1e-8)
    # The bound can be huge (κ' → ∞ as τ → bound); cap τ so that float64 still resolves σ_k'.
    tau = frac * tau_cap_for_kappa(sig, gvals, bound, kappa_max=1e6)
    step = pre.spectral_step(theta, sg.g)
    check_step(theta, k, step, tau, sig, gvals, sg.eigenvectors)

    before = condition_number(h, hermitian=True, rtol=RTOL_H)
    after = condition_number(linear_l2_hessian(theta - tau * step, k), hermitian=True, rtol=RTOL_H)
    pred = predicted_spectrum(sig_nz, gvals[:r], tau)
    assert after.rank == before.rank == r
    assert after.kappa > before.kappa
    assert after.kappa == pytest.approx(float(pred.max() / pred.min()), rel=1e-6, abs=0)


def test_r_ill_step_inside_huge_bound_on_a_concrete_instance() -> None:
    """A concrete case where the R_ill bound is astronomically large, so the cap is what keeps κ' finite."""
    sig = torch.tensor([400.0, 20.0, 1.0], dtype=F64)
    theta, k, _ = linear_instance(sig, torch.tensor([2.0, 1.0, 0.5], dtype=F64), 3, 3, seed=7)
    sg = g_ill(linear_l2_hessian(theta, k))
    bound = r_ill_step_bound(sg.eigenvalues, sg.delta, sg.rank)
    assert bound > 1e8
    gvals = g_values_ill(sig, 3)
    tau = 0.9 * tau_cap_for_kappa(sig, gvals, bound, kappa_max=1e6)
    assert tau < bound
    check_step(theta, k, make_preconditioner(k).spectral_step(theta, sg.g), tau, sig, gvals, sg.eigenvectors)


def test_right_preconditioning_does_not_keep_eigenvectors() -> None:
    """θ − τ∇_θR·K⁻¹ (the reference's layout error, spec §11.3) rotates H's eigenvectors."""
    d = 5
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=F64)
    theta, k, _ = linear_instance(sig, torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2], dtype=F64), d, d, seed=8)
    pre = make_preconditioner(k)
    h = linear_l2_hessian(theta, k)
    _, v = eig_desc(h)
    for sg, tau in (
        (g_well(h), 0.5 * r_well_step_bound(sig)),
        (
            g_ill(h),
            0.5 * tau_cap_for_kappa(sig, g_values_ill(sig, d), r_ill_step_bound(sig, g_ill(h).delta, d), 1e6),
        ),
    ):
        left = theta - tau * pre.apply(theta_grad(theta, k, sg.g))
        right = theta - tau * theta_grad(theta, k, sg.g) @ pre.matrix
        deficits = {}
        for name, t in (("left", left), ("right", right)):
            _, v2 = eig_desc(linear_l2_hessian(t, k))
            best = (v.T @ v2).abs().max(dim=1).values  # best match of each old eigenvector
            deficits[name] = float((1 - best).max())
        assert deficits["left"] <= 1e-8
        assert deficits["right"] > 1e-3


# ---------------------------------------------------------------------------------------------
# Proposition 3.2 (aligned θ only)
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, d=st.integers(2, 7), data=st.data())
def test_proposition_3_2_on_aligned_theta(seed: int, d: int, data: st.DataObject) -> None:
    """θ = Q_π diag(s) Vᵀ, left singular vectors = K's eigenvectors (any order).

    Then σ_i(H) = Σ_j (s_i u_iᵀq_j√γ_j)², i.e. the multiset {s_i² γ_π(i)}.
    """
    g = gen(seed)
    gamma = data.draw(log_uniform(-2, 2, min_size=d, max_size=d))
    # Distinct s_i, so θ's SVD is unique and its left singular vectors really are K's eigenvectors.
    s = data.draw(separated_descending(min_size=d, max_size=d, min_ratio=1.1, max_ratio=3.0, low=0.1))
    perm = torch.randperm(d, generator=g)
    q = orthogonal(d, g)
    k = (q * gamma) @ q.T
    theta = (q[:, perm] * s) @ orthogonal(d, g).T
    u, s_theta, _ = torch.linalg.svd(theta)
    formula = ((s_theta[:, None] * (u.T @ q) * gamma.sqrt()[None, :]) ** 2).sum(dim=1)
    eig = torch.linalg.eigvalsh(linear_l2_hessian(theta, k))
    assert_close(torch.sort(formula).values, eig, rtol=1e-8, atol=1e-12 * float(eig[-1]))
    # In closed form: the multiset {s_i² γ_π(i)}.
    assert_close(torch.sort(s**2 * gamma[perm]).values, eig, rtol=1e-8, atol=1e-12 * float(eig[-1]))


def test_proposition_3_2_only_matches_the_trace_when_not_aligned() -> None:
    """Spec caveat: for generic θ the right-hand side is diag(MMᵀ), not spec(MMᵀ)."""
    g = gen(9)
    gamma = torch.tensor([9.0, 3.0, 1.0, 0.2], dtype=F64)
    q = orthogonal(4, g)
    k = (q * gamma) @ q.T
    theta = torch.randn(4, 4, generator=g, dtype=F64)
    u, s_theta, _ = torch.linalg.svd(theta)
    formula = ((s_theta[:, None] * (u.T @ q) * gamma.sqrt()[None, :]) ** 2).sum(dim=1)
    eig = torch.linalg.eigvalsh(linear_l2_hessian(theta, k))
    assert float(formula.sum()) == pytest.approx(float(eig.sum()), rel=1e-10, abs=0)
    assert float((torch.sort(formula).values - eig).abs().max()) > 1e-3 * float(eig[-1])
