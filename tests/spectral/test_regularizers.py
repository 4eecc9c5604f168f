"""R_well / R_ill (spec §4): values, Theorem 4.1, gradients in S and in θ (Theorem 4.2)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

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
    delta,
    g_ill,
    g_log_kappa,
    g_well,
    psd_eigh,
    r_ill,
    r_ill_autograd,
    r_ill_grad,
    r_ill_theta_grad,
    r_well,
    r_well_autograd,
    r_well_grad,
    r_well_theta_grad,
    theta_grad,
)

from ._util import (
    F64,
    SETTINGS,
    gen,
    linear_instance,
    log_uniform,
    orthogonal,
    seeds,
    separated_descending,
    sym_with_spectrum,
    with_singular_values,
)

# ---------------------------------------------------------------------------------------------
# Helpers: independent references
# ---------------------------------------------------------------------------------------------


def fd_grad(f: Callable[[Tensor], float], x: Tensor, h: float) -> Tensor:
    """Central finite differences, one entry at a time."""
    out = torch.zeros_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        e = torch.zeros_like(x)
        e[idx] = h
        out[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return out


def r_well_svd_torch(s: Tensor) -> Tensor:
    sig = torch.linalg.svdvals(s)
    return 0.5 * sig[0] ** 2 - (s**2).sum() / (2 * min(s.shape))


def r_ill_svd_torch(s: Tensor, k: int) -> Tensor:
    sig = torch.linalg.svdvals(s)
    return 1.0 / ((sig[:k] ** 2).sum() / (2 * k) - 0.5 * sig[k - 1] ** 2)


def autograd_of(fn: Callable[[Tensor], Tensor], s: Tensor) -> Tensor:
    x = s.detach().clone().requires_grad_(True)
    fn(x).backward()
    assert x.grad is not None
    return x.grad


def assert_grad_close(got: Tensor, expected: Tensor, rel: float) -> None:
    """Entry-wise agreement with tolerance relative to the gradient's largest entry."""
    scale = float(expected.abs().max())
    assert scale > 0
    assert_close(got, expected, rtol=rel, atol=rel * scale)


shapes = st.tuples(st.integers(2, 6), st.integers(2, 6))

# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def test_r_well_closed_forms() -> None:
    assert r_well(torch.eye(3, dtype=F64)) == pytest.approx(0.0, abs=1e-15)
    assert r_well(torch.diag(torch.tensor([2.0, 0.0], dtype=F64))) == pytest.approx(1.0, rel=1e-15, abs=0)
    # (1/2p) Σ (σ_1² − σ_i²) with σ = (3, 2, 1): (0 + 5 + 8)/6.
    assert r_well(torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=F64))) == pytest.approx(
        13 / 6, rel=1e-14, abs=0
    )
    # Rectangular: p = min(shape), zeros included.  σ = (2, 0) for a 2x5 matrix.
    s = torch.zeros(2, 5, dtype=F64)
    s[0, 3] = 2.0
    assert r_well(s) == pytest.approx(1.0, rel=1e-15, abs=0)


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data())
def test_r_well_is_nonnegative_with_zeros_included(
    seed: int, shape: tuple[int, int], data: st.DataObject
) -> None:
    p = min(shape)
    sig = data.draw(log_uniform(-3, 3, min_size=1, max_size=p))
    s = with_singular_values(sig, *shape, gen(seed))
    sig_sorted = torch.sort(sig, descending=True).values
    full = torch.cat([sig_sorted, torch.zeros(p - sig.numel(), dtype=F64)])
    expected = float(((full[0] ** 2 - full**2).sum()) / (2 * p))
    value = r_well(s)
    assert value >= 0.0
    assert value == pytest.approx(expected, rel=1e-9, abs=1e-12 * float(full[0] ** 2))


@SETTINGS
@given(seed=seeds, shape=shapes, log_c=st.floats(-3, 3))
def test_r_well_is_zero_iff_singular_values_are_equal(
    seed: int, shape: tuple[int, int], log_c: float
) -> None:
    p = min(shape)
    c = 10.0**log_c
    g = gen(seed)
    equal = with_singular_values(torch.full((p,), c, dtype=F64), *shape, g)
    assert abs(r_well(equal)) <= 1e-13 * c**2
    # One singular value off by 1 %: R_well = (σ_1² − σ_p²)/(2p) exactly, far above rounding.
    sig = torch.full((p,), c, dtype=F64)
    sig[-1] = 0.99 * c
    unequal = with_singular_values(sig, *shape, g)
    assert r_well(unequal) == pytest.approx((1 - 0.99**2) * c**2 / (2 * p), rel=1e-9, abs=0)
    assert r_well(unequal) > 0


def test_r_well_is_never_negative_by_rounding_at_equal_singular_values() -> None:
    """½σ_1² − ‖S‖_F²/(2p) cancels to −eps·σ² for equal σ; the value must still be ≥ 0."""
    for seed in range(200):
        for sig in ([1.0, 1.0], [56.2341, 56.2341], [10.0, 10.0, 10.0]):
            p = len(sig)
            s = with_singular_values(torch.tensor(sig, dtype=F64), p, p + seed % 2, gen(seed))
            assert r_well(s) >= 0.0
            h = s.T @ s if seed % 2 == 0 else s @ s.T
            assert g_well(h).value >= 0.0
            assert float(r_well_autograd(h)) >= 0.0


def test_delta_and_r_ill_closed_forms() -> None:
    s = torch.diag(torch.tensor([3.0, 1.0], dtype=F64))
    d, k = delta(s)
    assert (d, k) == (pytest.approx(2.0, rel=1e-15, abs=0), 2)
    assert r_ill(s) == pytest.approx(0.5, rel=1e-15, abs=0)
    # Δ uses the numerical rank: zeros neither count in k nor set σ_k.
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=F64))
    d, k = delta(s)
    assert k == 3
    assert d == pytest.approx((9 + 4 + 1) / 6 - 0.5, rel=1e-15, abs=0)
    # An explicit rtol can drop a small singular value.
    d, k = delta(torch.diag(torch.tensor([3.0, 1.0, 1e-6], dtype=F64)), rtol=1e-3)
    assert k == 2
    assert d == pytest.approx(2.0, rel=1e-10, abs=0)


def test_r_ill_is_infinite_for_equal_singular_values_unless_floored() -> None:
    s = 2.0 * torch.eye(3, dtype=F64)
    with pytest.raises(NumericalError, match="delta_min"):
        r_ill(s)
    assert r_ill(s, delta_min=1e-3) == pytest.approx(1e3, rel=1e-12, abs=0)
    assert torch.equal(r_ill_grad(s, delta_min=1e-3), torch.zeros(3, 3, dtype=F64))
    with pytest.raises(NumericalError):
        g_ill(s)
    floored = g_ill(s, delta_min=1e-3)
    assert floored.floored is True
    assert floored.value == pytest.approx(1e3, rel=1e-12, abs=0)
    assert torch.equal(floored.g, torch.zeros(3, 3, dtype=F64))


def test_r_ill_grad_raises_like_r_ill_for_equal_singular_values() -> None:
    """Without a floor, Δ = 0 must raise, not return inf/NaN silently."""
    with pytest.raises(NumericalError):
        r_ill_grad(2.0 * torch.eye(3, dtype=F64))
    with pytest.raises(NumericalError):
        r_ill_grad(torch.zeros(3, 2, dtype=F64))


def test_r_ill_undefined_for_zero_matrix() -> None:
    with pytest.raises(NumericalError):
        delta(torch.zeros(3, 3, dtype=F64))
    with pytest.raises(NumericalError):
        g_ill(torch.zeros(3, 3, dtype=F64))
    with pytest.raises(NumericalError):
        g_log_kappa(torch.zeros(3, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Theorem 4.1
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data())
def test_theorem_4_1_bounds_on_r_ill(seed: int, shape: tuple[int, int], data: st.DataObject) -> None:
    p = min(shape)
    sig = data.draw(log_uniform(-3, 3, min_size=2, max_size=p))
    assume(float(sig.max() / sig.min()) > 1.001)
    s = with_singular_values(sig, *shape, gen(seed))
    info = condition_number(s)
    k, kappa, sk, s1 = info.rank, info.kappa, info.sigma_min, info.sigma_max
    assert k == sig.numel()
    value = r_ill(s)
    lower = 2 * k / ((k - 1) * (kappa**2 - 1) * sk**2)
    upper = 2 * k / ((kappa**2 - 1) * sk**2)
    assert value > 0
    assert lower <= value * (1 + 1e-9)
    assert value <= upper * (1 + 1e-9)
    assert 1 / math.log(kappa) <= s1**2 * value * (1 + 1e-9)
    # Closed form of Δ from the set spectrum.
    expected_delta = float((sig**2 - sig.min() ** 2).sum() / (2 * k))
    assert delta(s)[0] == pytest.approx(expected_delta, rel=1e-8, abs=1e-12 * float(sig.max() ** 2))


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data(), frac=st.floats(0.05, 0.95))
def test_theorem_4_1_r_ill_step_maps_singular_values_and_raises_kappa(
    seed: int, shape: tuple[int, int], data: st.DataObject, frac: float
) -> None:
    p = min(shape)
    sig = data.draw(separated_descending(min_size=2, max_size=p, min_ratio=1.2, max_ratio=3.0, low=0.1))
    k = sig.numel()
    s = with_singular_values(sig, *shape, gen(seed))
    d = float((sig**2).sum() / (2 * k) - 0.5 * sig[-1] ** 2)
    eta = frac * k / (k - 1) * d**2
    s2 = s - eta * r_ill_grad(s)
    expected = sig * (1 + eta / (k * d**2))
    expected[-1] = sig[-1] * (1 - eta * (k - 1) / (k * d**2))
    got = torch.linalg.svdvals(s2)[:k]
    assert_close(
        torch.sort(got).values, torch.sort(expected.abs()).values, rtol=1e-9, atol=1e-12 * float(sig[0])
    )
    assert condition_number(s2).kappa > condition_number(s).kappa


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data(), eta=st.floats(0.01, 0.5))
def test_r_well_gd_step_maps_singular_values(
    seed: int, shape: tuple[int, int], data: st.DataObject, eta: float
) -> None:
    p = min(shape)
    sig = data.draw(separated_descending(min_size=p, max_size=p, min_ratio=1.2, max_ratio=3.0, low=0.1))
    s = with_singular_values(sig, *shape, gen(seed))
    s2 = s - eta * r_well_grad(s)
    expected = sig * (1 + eta / p)
    expected[0] = sig[0] * (1 - eta * (1 - 1 / p))
    got = torch.linalg.svdvals(s2)
    assert_close(torch.sort(got).values, torch.sort(expected).values, rtol=1e-9, atol=1e-12 * float(sig[0]))


# ---------------------------------------------------------------------------------------------
# Gradients with respect to S
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data())
def test_r_well_grad_matches_autograd_and_finite_differences(
    seed: int, shape: tuple[int, int], data: st.DataObject
) -> None:
    p = min(shape)
    sig = data.draw(separated_descending(min_size=p, max_size=p, min_ratio=1.1, max_ratio=3.0, low=0.1))
    s = with_singular_values(sig, *shape, gen(seed))
    grad = r_well_grad(s)
    assert grad.shape == s.shape
    assert_grad_close(grad, autograd_of(r_well_svd_torch, s), rel=1e-10)
    assert_grad_close(grad, fd_grad(r_well, s, 1e-5 * float(sig[0])), rel=1e-6)


@SETTINGS
@given(seed=seeds, shape=shapes, data=st.data())
def test_r_ill_grad_matches_autograd_and_finite_differences(
    seed: int, shape: tuple[int, int], data: st.DataObject
) -> None:
    p = min(shape)
    sig = data.draw(separated_descending(min_size=p, max_size=p, min_ratio=1.1, max_ratio=3.0, low=0.1))
    s = with_singular_values(sig, *shape, gen(seed))
    grad = r_ill_grad(s)
    assert_grad_close(grad, autograd_of(lambda x: r_ill_svd_torch(x, p), s), rel=1e-10)
    assert_grad_close(grad, fd_grad(r_ill, s, 1e-5 * float(sig[0])), rel=1e-6)


@SETTINGS
@given(seed=seeds, shape=st.tuples(st.integers(3, 6), st.integers(3, 6)), data=st.data())
def test_r_ill_grad_on_rank_deficient_matrix_matches_autograd(
    seed: int, shape: tuple[int, int], data: st.DataObject
) -> None:
    """k = rank S < p: the zero singular values take no part (checked against autograd with that k)."""
    p = min(shape)
    sig = data.draw(separated_descending(min_size=2, max_size=p - 1, min_ratio=1.1, max_ratio=3.0, low=0.1))
    k = sig.numel()
    s = with_singular_values(sig, *shape, gen(seed))
    assert delta(s)[1] == k
    assert_grad_close(r_ill_grad(s), autograd_of(lambda x: r_ill_svd_torch(x, k), s), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Spectral gradients G = ∂R/∂H and Theorem 4.2
# ---------------------------------------------------------------------------------------------


def directional_fd(f: Callable[[Tensor], float], h: Tensor, e: Tensor, step: float) -> float:
    return (f(h + step * e) - f(h - step * e)) / (2 * step)


@SETTINGS
@given(seed=seeds, data=st.data())
def test_spectral_gradients_match_directional_finite_differences(seed: int, data: st.DataObject) -> None:
    eigs = data.draw(separated_descending(min_size=2, max_size=6, min_ratio=1.2, max_ratio=3.0, low=0.1))
    g = gen(seed)
    h, _ = sym_with_spectrum(eigs, g)
    step = 1e-6 * float(eigs[0])
    gw, gi, gk = g_well(h), g_ill(h), g_log_kappa(h)
    for _ in range(3):
        e = torch.randn(h.shape, generator=g, dtype=F64)
        e = e + e.T
        e = e / e.norm()
        for sg, f in (
            (gw, r_well),
            (gi, r_ill),
            (gk, lambda m: condition_number(m, hermitian=True).log_kappa),
        ):
            fd = directional_fd(f, h, e, step)
            analytic = float((sg.g * e).sum())
            scale = float(sg.g.norm() * e.norm())
            assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-7 * scale)
    for sg in (gw, gi, gk):
        assert_close(sg.g, sg.g.T, rtol=0, atol=1e-14 * float(sg.g.abs().max()))
        assert_close(sg.eigenvalues, eigs, rtol=1e-10, atol=0)
        assert sg.rank == eigs.numel()
    assert gw.value == pytest.approx(r_well(h), rel=1e-9, abs=1e-13 * float(eigs[0] ** 2))
    assert gi.value == pytest.approx(r_ill(h), rel=1e-9, abs=0)
    assert gi.delta == pytest.approx(delta(h)[0], rel=1e-9, abs=0)
    assert gk.value == pytest.approx(math.log(float(eigs[0] / eigs[-1])), rel=1e-9, abs=1e-12)


def test_spectral_gradient_closed_forms_on_diagonal_h() -> None:
    h = torch.diag(torch.tensor([1.0, 4.0, 2.0], dtype=F64))
    # G_well = λ_1 e e^T − H/p with λ_1 = 4 at index 1.
    expected = -h / 3
    expected[1, 1] += 4.0
    assert_close(g_well(h).g, expected, rtol=0, atol=1e-15)
    # Δ = (16 + 4 + 1)/6 − 1/2 = 3;  G_ill = (λ_k e_k e_kᵀ − H/k)/Δ² with λ_k = 1 at index 0.
    expected = -h / 3
    expected[0, 0] += 1.0
    gi = g_ill(h)
    assert gi.delta == pytest.approx(3.0, rel=1e-15, abs=0)
    assert_close(gi.g, expected / 9, rtol=0, atol=1e-15)
    gk = torch.zeros(3, 3, dtype=F64)
    gk[1, 1], gk[0, 0] = 1 / 4, -1.0
    assert_close(g_log_kappa(h).g, gk, rtol=0, atol=1e-15)


def test_psd_eigh_descending_clipped_with_rank() -> None:
    h, _ = sym_with_spectrum(torch.tensor([0.0, 5.0, 2.0, 0.0], dtype=F64), gen(11))
    w, v, k = psd_eigh(h)
    assert k == 2
    assert bool((w >= 0).all())
    assert_close(w[:2], torch.tensor([5.0, 2.0], dtype=F64), rtol=1e-13, atol=0)
    assert_close((v * w) @ v.T, h, rtol=0, atol=1e-13)


@SETTINGS
@given(
    seed=seeds,
    dims=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    singular=st.booleans(),
    data=st.data(),
)
def test_theta_gradients_match_finite_differences(
    seed: int, dims: tuple[int, int], singular: bool, data: st.DataObject
) -> None:
    """Theorem 4.2: ∇_θ R(θᵀKθ) = 2KθG, for rectangular θ and for singular K (rank r < D_in)."""
    d_in, d_hid = dims
    r = min(d_in, d_hid) - (1 if singular and min(d_in, d_hid) > 2 else 0)
    h_eigs = data.draw(separated_descending(min_size=r, max_size=r, min_ratio=1.2, max_ratio=3.0, low=0.1))
    k_eigs = data.draw(log_uniform(-1, 1, min_size=r, max_size=r))
    theta, k, _ = linear_instance(h_eigs, k_eigs, d_in, d_hid, seed)
    rtol = 1e-10  # H = θᵀKθ has exact zeros when r < D_hid; keep rounding noise out of the rank.
    step = 1e-6 * float(theta.abs().max())

    gw = r_well_theta_grad(theta, k)
    fd_w = fd_grad(lambda t: r_well(linear_l2_hessian(t, k)), theta, step)
    assert_grad_close(gw, fd_w, rel=1e-7)

    gi = r_ill_theta_grad(theta, k, rtol=rtol)
    fd_i = fd_grad(lambda t: r_ill(linear_l2_hessian(t, k), rtol=rtol), theta, step)
    assert_grad_close(gi, fd_i, rel=1e-7)

    # Explicit 2KθG with the spectral G.
    h = linear_l2_hessian(theta, k)
    assert_close(gw, 2 * k @ theta @ g_well(h).g, rtol=1e-12, atol=1e-12 * float(gw.abs().max()))
    assert_close(theta_grad(theta, k, g_ill(h, rtol=rtol).g), gi, rtol=0, atol=0)


@SETTINGS
@given(seed=seeds, data=st.data())
def test_autograd_regularizers_match_closed_forms(seed: int, data: st.DataObject) -> None:
    eigs = data.draw(separated_descending(min_size=2, max_size=6, min_ratio=1.2, max_ratio=3.0, low=0.1))
    n_zero = data.draw(st.integers(0, 2))
    h, _ = sym_with_spectrum(torch.cat([eigs, torch.zeros(n_zero, dtype=F64)]), gen(seed))
    assert float(r_well_autograd(h)) == pytest.approx(r_well(h), rel=1e-9, abs=1e-13 * float(eigs[0] ** 2))
    assert float(r_ill_autograd(h, rtol=1e-10)) == pytest.approx(r_ill(h, rtol=1e-10), rel=1e-9, abs=0)
    assert_grad_close(autograd_of(r_well_autograd, h), g_well(h).g, rel=1e-9)
    assert_grad_close(
        autograd_of(lambda x: r_ill_autograd(x, rtol=1e-10), h), g_ill(h, rtol=1e-10).g, rel=1e-9
    )
    # Floor: r_ill_autograd with delta_min above Δ returns 1/δ_min.
    d = delta(h, rtol=1e-10)[0]
    assert float(r_ill_autograd(h, rtol=1e-10, delta_min=2 * d)) == pytest.approx(
        1 / (2 * d), rel=1e-12, abs=0
    )


def test_g_well_is_orthogonally_equivariant() -> None:
    """G is a spectral function of H: G(QHQᵀ) = Q G(H) Qᵀ (what makes left preconditioning exact)."""
    g = gen(12)
    h, _ = sym_with_spectrum(torch.tensor([6.0, 3.0, 1.0, 0.5], dtype=F64), g)
    q = orthogonal(4, g)
    for fn in (g_well, g_ill, g_log_kappa):
        assert_close(fn(q @ h @ q.T).g, q @ fn(h).g @ q.T, rtol=1e-10, atol=1e-12)
