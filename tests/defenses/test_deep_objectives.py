"""Closed-form checks (float64) of the deep objectives' terms: Opt-κ's log κ, 1/log κ; IMMA's inner head."""

from __future__ import annotations

import math

import pytest
import torch

from immunekit.defenses.deep import r_ill_of_factor, r_well_of_factor
from immunekit.defenses.deep_baselines import (
    LOG_KAPPA_FLOOR,
    adapt_head,
    inverse_log_kappa_of_factor,
    log_kappa_of_factor,
)
from immunekit.errors import NumericalError
from immunekit.metrics.losses import LossSpec
from immunekit.spectral.rank import FactorSpectrum

F64 = torch.float64


def _factor(rows: int = 20, seed: int = 0) -> torch.Tensor:
    """A (rows, 6) factor with well-separated singular values (the derivatives need simple ones)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, 6, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    return q @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.3, 0.7, 0.4], dtype=F64)) @ v.T


# ---------------------------------------------------------------------------------------------
# log κ and 1/log κ of a factor
# ---------------------------------------------------------------------------------------------


def test_log_kappa_of_a_diagonal_factor_is_the_closed_form() -> None:
    phi = torch.zeros(5, 3, dtype=F64)
    phi[:3] = torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=F64))  # S = diag(16, 4, 0.25)
    assert FactorSpectrum.of(phi).rank == 3
    assert float(log_kappa_of_factor(phi, 3)) == pytest.approx(math.log(64.0), rel=1e-14)
    assert float(log_kappa_of_factor(phi, 2)) == pytest.approx(math.log(4.0), rel=1e-14)
    value, floored = inverse_log_kappa_of_factor(phi, 3)
    assert not floored and float(value) == pytest.approx(1.0 / math.log(64.0), rel=1e-14)


def test_inverse_log_kappa_is_floored_when_all_singular_values_are_equal() -> None:
    value, floored = inverse_log_kappa_of_factor(torch.eye(4, dtype=F64), 4)
    assert floored and float(value) == 0.0
    # just above the floor the term is finite and large
    phi = torch.diag(torch.tensor([1.0 + 1e-6, 1.0], dtype=F64))
    value, floored = inverse_log_kappa_of_factor(phi, 2)
    assert not floored and float(value) == pytest.approx(1.0 / (2 * math.log1p(1e-6)), rel=1e-8)
    assert 2 * math.log1p(1e-6) > LOG_KAPPA_FLOOR
    with pytest.raises(NumericalError, match="rank 0"):
        log_kappa_of_factor(torch.zeros(3, 2, dtype=F64), 0)


def test_log_kappa_gradient_is_the_singular_vector_formula() -> None:
    """∂ log κ/∂Φ = 2(u_1 v_1ᵀ/s_1 − u_r v_rᵀ/s_r) for simple s_1 and s_r."""
    phi = _factor().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_kappa_of_factor(phi, 6), phi)
    u, s, vh = torch.linalg.svd(phi.detach(), full_matrices=False)
    expected = 2 * (torch.outer(u[:, 0], vh[0]) / s[0] - torch.outer(u[:, 5], vh[5]) / s[5])
    assert torch.allclose(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("term", ["log_kappa", "inverse_log_kappa"])
def test_gradients_match_central_finite_differences(term: str) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        if term == "log_kappa":
            return log_kappa_of_factor(x, 6)
        return inverse_log_kappa_of_factor(x, 6)[0]

    phi = _factor(seed=1)
    x = phi.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        d = torch.randn(phi.shape, generator=g, dtype=F64)
        d /= d.norm()
        h = 1e-5
        fd = (float(f(phi + h * d)) - float(f(phi - h * d))) / (2 * h)
        assert float((grad * d).sum()) == pytest.approx(fd, rel=1e-7, abs=1e-10)


def test_r_well_of_factor_is_r_well_of_the_gram_matrix() -> None:
    """R_well(ΦᵀΦ) = (1/2p) Σ (λ_1² − λ_i²) with λ = s² (p = D)."""
    phi = _factor(seed=2)
    lam = torch.linalg.svdvals(phi) ** 2
    expected = float((lam[0] ** 2 - lam**2).sum() / (2 * 6))
    assert float(r_well_of_factor(phi, 6)) == pytest.approx(expected, rel=1e-12)
    # and R_ill of the same factor, Δ = Σλ²/(2k) − ½λ_k² (k = 6)
    delta = float((lam**2).sum() / 12 - 0.5 * lam[5] ** 2)
    assert float(r_ill_of_factor(phi, 6)[0]) == pytest.approx(1.0 / delta, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# IMMA's inner head
# ---------------------------------------------------------------------------------------------


def test_one_inner_step_is_the_closed_form_for_the_squared_loss() -> None:
    """w_1 = −η ∇L(0) = η · 2ΦᵀY/(N·C) for L = ‖Φw − Y‖²/(N·C) (mse, C = 2)."""
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(12, 4, generator=g, dtype=F64)
    y = torch.randn(12, 2, generator=g, dtype=F64)
    spec = LossSpec("mse", 2, F64)
    target, _ = spec.targets(y, "harmful")
    w, before, after = adapt_head(phi, target, spec, steps=1, lr=0.1)
    assert torch.allclose(w, 0.1 * 2 * phi.T @ y / 24, rtol=1e-14, atol=0)
    assert before == pytest.approx(float((y**2).mean()), rel=1e-14)
    assert after == pytest.approx(float(((phi @ w - y) ** 2).mean()), rel=1e-14)
    assert after < before


@pytest.mark.parametrize("steps", [1, 5])
def test_the_inner_head_lowers_the_cross_entropy_of_the_harmful_batch(steps: int) -> None:
    g = torch.Generator().manual_seed(4)
    labels = torch.arange(30) % 3
    phi = torch.randn(30, 5, generator=g, dtype=F64) + 2.0 * torch.nn.functional.one_hot(labels, 5).to(F64)
    spec = LossSpec("ce", 3, F64)
    target, _ = spec.targets(labels, "harmful")
    w, before, after = adapt_head(phi, target, spec, steps=steps, lr=0.5)
    assert before == pytest.approx(math.log(3.0), rel=1e-14)  # a zero head predicts uniformly
    assert after < before - 0.05 * steps
    # the same steps by autograd
    v = torch.zeros(5, 3, dtype=F64)
    for _ in range(steps):
        v = v.requires_grad_(True)
        (gv,) = torch.autograd.grad(torch.nn.functional.cross_entropy(phi @ v, labels), v)
        v = (v - 0.5 * gv).detach()
    assert torch.allclose(w, v, rtol=1e-12, atol=1e-14)
