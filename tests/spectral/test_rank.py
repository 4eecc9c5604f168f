"""The rank rule from factors (spectral.rank): closed forms in float64 with set singular values.

X = U diag(s) Vᵀ is built with orthogonal U, V and chosen s, some just above and some just below the
cut rtol·s_1, so every decision (rank, gap, factor, preconditioner, κ with the rank fixed on K, the
band's re-cuts) can be checked against the numbers it must produce.
"""

from __future__ import annotations

import math

import pytest
import torch

from immunekit.errors import ConfigError, NumericalError
from immunekit.spectral import (
    FactorSpectrum,
    band_multipliers,
    check_band,
    check_rtol,
    condition_number,
    covariance,
    gram_condition_number,
    kappa_fixed_rank,
)
from immunekit.spectral.condition import EPS64

from ._util import gen, orthogonal

F64 = torch.float64
N, D = 12, 6
RTOL = 1e-8


def _factor(s: list[float], seed: int = 0, n: int = N, d: int = D) -> torch.Tensor:
    """X = U diag(s) Vᵀ (N, D) with orthonormal U (N×p), V (D×p), p = len(s)."""
    g = gen(seed)
    u = orthogonal(n, g)[:, : len(s)]
    v = orthogonal(d, g)[:, : len(s)]
    return (u * torch.tensor(s, dtype=F64)) @ v.T


# s_4 just above the cut 1e-8·s_1, s_5 just below, s_6 = 0
VALUES = [2.0, 1.0, 0.5, 2e-8 * 1.000001, 2e-8 * 0.999999, 0.0]


def test_rank_gap_and_kappa_against_closed_forms() -> None:
    x = _factor(VALUES)
    spec = FactorSpectrum.of(x, rtol=RTOL)
    assert spec.rank == 4
    s = spec.singular_values
    torch.testing.assert_close(s[:5], torch.tensor(VALUES[:5], dtype=F64), rtol=1e-7, atol=1e-15)
    last, first = spec.gap()
    assert last == pytest.approx(1e-8 * 1.000001, rel=1e-7)
    assert first == pytest.approx(1e-8 * 0.999999, rel=1e-7)
    rec = spec.describe()
    assert rec["rank"] == 4 and rec["dim"] == D and rec["rows"] == N and rec["rtol"] == RTOL
    assert rec["gap"] == pytest.approx(1.000001 / 0.999999, rel=1e-6)
    # κ(K) = (s_1 / s_r)², r = 4
    info = spec.kappa()
    assert info.rank == 4
    assert info.kappa == pytest.approx((2.0 / (2e-8 * 1.000001)) ** 2, rel=1e-6)
    assert info.log_kappa == pytest.approx(2 * math.log(2.0 / (2e-8 * 1.000001)), rel=1e-9)


def test_default_rtol_is_max_rows_cols_eps_and_a_cut_on_sigma_not_lambda() -> None:
    # λ/λ_max = 1e-20 (σ/σ_1 = 1e-10): kept by the rule on σ(X) (default 12·eps ≈ 2.7e-15), lost by the
    # eigenvalues of K at D·eps (a cut of √(D·eps) ≈ 3.6e-8 on σ)
    x = _factor([1.0, 0.3, 1e-10])
    spec = FactorSpectrum.of(x)
    assert spec.rtol == max(N, D) * EPS64
    assert spec.rank == 3
    assert condition_number(covariance(x), hermitian=True).rank == 2
    assert spec.kappa().kappa == pytest.approx(1e20, rel=1e-5)


def test_thin_factor_preconditioner_and_projector_from_the_svd() -> None:
    x = _factor(VALUES)
    spec = FactorSpectrum.of(x, rtol=RTOL)
    f = spec.factor()
    assert f.shape == (4, D)
    v = spec.right_vectors[:, :4]
    s2 = spec.singular_values[:4] ** 2
    k_kept = (v * s2) @ v.T
    torch.testing.assert_close(f.T @ f, k_kept, rtol=0, atol=1e-14)
    full = spec.factor(thin=False)
    assert full.shape == (D, D) and torch.equal(full[:4], f) and not full[4:].any()
    pre = spec.preconditioner("pinv")
    torch.testing.assert_close(pre.matrix, (v / s2) @ v.T, rtol=1e-12, atol=0)
    torch.testing.assert_close(pre.projector, v @ v.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(spec.projector().dense(), v @ v.T, rtol=0, atol=1e-14)
    assert pre.describe() == {"method": "pinv", "rtol": RTOL, "ridge": 0.0, "rank": 4}
    ridge = spec.preconditioner("ridge", ridge=1e-3)
    k = covariance(x)
    torch.testing.assert_close(
        ridge.matrix, torch.linalg.inv(k + 1e-3 * torch.eye(D, dtype=F64)), rtol=1e-9, atol=0
    )
    with pytest.raises(NumericalError, match="ridge must be > 0"):
        spec.preconditioner("ridge")


def test_ridge_with_fewer_rows_than_columns() -> None:
    x = _factor([3.0, 1.0], n=2, d=4)
    spec = FactorSpectrum.of(x)
    assert spec.right_vectors.shape == (4, 2) and spec.gap() == (pytest.approx(1 / 3), 0.0)
    k = covariance(x)
    got = spec.preconditioner("ridge", ridge=0.5)
    torch.testing.assert_close(
        got.matrix, torch.linalg.inv(k + 0.5 * torch.eye(4, dtype=F64)), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(got.projector, got.matrix @ k, rtol=1e-12, atol=1e-15)
    pk = torch.linalg.pinv(k, hermitian=True) @ k  # P_K = K⁺K
    torch.testing.assert_close(spec.projector().dense(), pk, atol=1e-12, rtol=0)


def test_kappa_of_theta_keeps_the_rank_fixed_on_k() -> None:
    x = _factor(VALUES)
    spec = FactorSpectrum.of(x, rtol=RTOL)
    g = gen(3)
    q = orthogonal(D, g)
    theta = q @ torch.diag(torch.tensor([1.0, 2.0, 1e-3, 1.0, 4.0, 1.0], dtype=F64)) @ q.T
    info = spec.kappa(theta)
    assert info.rank == 4  # not re-decided on F·θ
    s = torch.linalg.svdvals(spec.factor() @ theta)
    assert info.kappa == pytest.approx(float(s[0] / s[3]) ** 2, rel=1e-12)
    # the same number from the retained part of X (U_4 S_4 V_4ᵀ, whose Gram is FᵀF), rank given
    u = torch.linalg.svd(x, full_matrices=False)[0][:, :4]
    kept = u @ spec.factor()
    direct = gram_condition_number(kept @ theta, rank=4)
    assert info.kappa == pytest.approx(direct.kappa, rel=1e-6)
    # a θ that annihilates a retained direction: κ = ∞ at the fixed rank, not a smaller rank
    v4 = spec.right_vectors[:, 3:4]
    crushed = torch.eye(D, dtype=F64) - v4 @ v4.T
    assert spec.kappa(crushed).rank == 4 and spec.kappa(crushed).kappa > 1e14


def test_band_recuts_the_same_svd() -> None:
    spec = FactorSpectrum.of(_factor(VALUES), rtol=RTOL)
    assert band_multipliers(100.0) == (0.01, 1.0, 100.0)
    low, mid, high = (spec.scaled(m) for m in band_multipliers(100.0))
    assert mid is spec and low.singular_values is spec.singular_values
    # the cut at 1e-10 keeps s_5 ≈ 2e-8 too (rank 5); at 1e-6 s_4 and s_5 go (rank 3)
    assert (low.rank, mid.rank, high.rank) == (5, 4, 3)
    assert high.kappa().kappa == pytest.approx(16.0, rel=1e-9)
    assert low.rtol == pytest.approx(1e-10, rel=1e-15) and high.rtol == pytest.approx(1e-6, rel=1e-15)


@pytest.mark.parametrize("bad", [0.0, -1e-9, 1.0, 2.0, math.nan, math.inf, True])
def test_explicit_rtol_outside_the_open_unit_interval_is_refused(bad: float) -> None:
    x = _factor(VALUES)
    with pytest.raises(ConfigError, match=r"rtol must be a relative threshold in \(0, 1\)"):
        FactorSpectrum.of(x, rtol=bad)
    with pytest.raises(ConfigError, match="rtol=None"):
        gram_condition_number(x, rtol=bad)
    with pytest.raises(ConfigError):
        condition_number(x, rtol=bad)
    with pytest.raises(ConfigError):
        check_rtol(bad, name="rank_rtol")


@pytest.mark.parametrize("bad", [1.0, 0.5, 0.0, -100.0, math.inf, math.nan])
def test_band_factor_must_exceed_one(bad: float) -> None:
    with pytest.raises(ConfigError, match="band factor must be a finite number > 1"):
        check_band(bad)
    with pytest.raises(ConfigError, match=str(bad)):
        band_multipliers(bad)


def test_kappa_fixed_rank_closed_form_and_bad_rank() -> None:
    values = torch.tensor([4.0, 2.0, 1e-20, 0.0], dtype=F64)
    assert kappa_fixed_rank(values, rank=2, rtol=1e-3, dim=4).kappa == 2.0
    assert kappa_fixed_rank(values, rank=3, rtol=1e-3, dim=4).kappa == pytest.approx(4e20, rel=1e-15)
    assert kappa_fixed_rank(values, rank=4, rtol=1e-3, dim=4).kappa == math.inf
    assert kappa_fixed_rank(values, rank=9, rtol=1e-3, dim=4).rank == 4
    assert kappa_fixed_rank(values, rank=0, rtol=1e-3, dim=4).rank == 0
    with pytest.raises(ConfigError, match="rank must be an integer >= 0"):
        kappa_fixed_rank(values, rank=-1, rtol=1e-3, dim=4)


def test_whitener_gives_a_constant_retained_spectrum() -> None:
    x = _factor([2.0, 1.0, 0.5, 0.1])  # rank 4 of D = 6
    spec = FactorSpectrum.of(x)
    w = spec.whitener()
    v = spec.range_basis()
    # θᵀKθ = s_1² V_rV_rᵀ, and θ = V diag(s_1/s_i) Vᵀ + I − VVᵀ exactly
    torch.testing.assert_close((x @ w).T @ (x @ w), 4.0 * v @ v.T, rtol=0, atol=1e-12)
    gains = torch.tensor([1.0, 2.0, 4.0, 20.0], dtype=F64)
    expected = (v * gains) @ v.T + torch.eye(D, dtype=F64) - v @ v.T
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)
    assert spec.kappa(w).kappa == pytest.approx(1.0, abs=1e-12)


def test_zero_and_bad_factors() -> None:
    zero = FactorSpectrum.of(torch.zeros(3, 2, dtype=F64))
    assert zero.rank == 0 and zero.gap() == (None, None) and zero.kappa().kappa == math.inf
    assert torch.equal(zero.whitener(), torch.eye(2, dtype=F64))
    with pytest.raises(NumericalError):
        FactorSpectrum.of(torch.ones(3, dtype=F64))
    bad = torch.ones(2, 2, dtype=F64)
    bad[0, 0] = math.nan
    with pytest.raises(NumericalError):
        FactorSpectrum.of(bad)
