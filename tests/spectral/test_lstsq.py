"""MinNormLstsq: min-norm least squares from QR + SVD of R, against the pinv formula it replaces.

The reference is what ``least_squares`` computed before: ``torch.linalg.pinv(A, rtol) @ B`` with
rtol = max(N, D)·eps. Two backward-stable solvers of the same problem agree to about κ(A)·eps
relative (plus κ(A)²·eps·‖r‖/(‖A‖‖x‖) for inconsistent systems), so each tolerance below is
stated against that bound for the problem's κ.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from immunekit.errors import NumericalError
from immunekit.spectral import default_rtol, gram_condition_number
from immunekit.spectral.lstsq import MinNormLstsq, min_norm_lstsq

from ._util import F64, SETTINGS, gen, orthogonal, seeds

EPS = float(torch.finfo(F64).eps)


def _pinv_solve(a: torch.Tensor, b: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    tol = default_rtol(*a.shape) if rtol is None else rtol
    return torch.linalg.pinv(a, rtol=tol) @ b


def _designed(
    sv: list[float], rows: int, cols: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = U diag(sv) Vᵀ (rows×cols, len(sv) = min(rows, cols)) and its U (rows×p), V (cols×cols)."""
    g = gen(seed)
    p = len(sv)
    u = orthogonal(rows, g)[:, :p]
    v = orthogonal(cols, g)
    a = (u * torch.tensor(sv, dtype=F64)) @ v[:, :p].T
    return a, u, v


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# Agreement with the pinv result
# ---------------------------------------------------------------------------------------------


def test_well_conditioned_full_rank_agrees_with_pinv_and_the_exact_solution() -> None:
    sv = torch.linspace(3.0, 0.3, 12, dtype=F64).tolist()  # κ(A) = 10
    a, u, v = _designed(sv, 60, 12, seed=1)
    b = torch.randn(60, 3, generator=gen(2), dtype=F64)  # inconsistent: residual ≈ ‖b‖
    f = MinNormLstsq.of(a)
    x = f.solve(b)
    assert f.rank == 12 and f.shape == (60, 12)
    assert _rel(x, _pinv_solve(a, b)) < 1e-14
    exact = v[:, :12] @ ((u.T @ b) / torch.tensor(sv, dtype=F64)[:, None])
    assert _rel(x, exact) < 1e-14
    # the singular values are A's
    assert torch.allclose(f.singular_values, torch.tensor(sv, dtype=F64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kappa", [1e4, 1e8, 1e11])
def test_ill_conditioned_consistent_system_agrees_with_pinv_to_kappa_eps(kappa: float) -> None:
    sv = torch.logspace(0.0, -math.log10(kappa), 16, dtype=F64).tolist()  # all above 64·eps
    a, _, _ = _designed(sv, 64, 16, seed=3)
    x_true = torch.randn(16, 2, generator=gen(4), dtype=F64)
    b = a @ x_true
    x = min_norm_lstsq(a, b)
    ref = _pinv_solve(a, b)
    assert MinNormLstsq.of(a).rank == 16
    # forward error of a backward-stable solver is O(κ(A)·eps) (measured: 0.01–0.04 κ·eps for
    # both solvers and between them, at every κ here)
    bound = kappa * EPS
    assert _rel(x, x_true) < bound
    assert _rel(ref, x_true) < bound
    assert _rel(x, ref) < bound
    # and the residual is at rounding level (backward stability), relative to ‖A‖‖x‖ (measured ≤ 12)
    assert float((a @ x - b).norm()) < 32 * EPS * float(x.norm())


def test_ill_conditioned_inconsistent_system_agrees_with_pinv_to_the_perturbation_bound() -> None:
    kappa = 1e6
    sv = torch.logspace(0.0, -6.0, 10, dtype=F64).tolist()
    a, u, _ = _designed(sv, 50, 10, seed=5)
    b = torch.randn(50, 1, generator=gen(6), dtype=F64)
    x, ref = min_norm_lstsq(a, b), _pinv_solve(a, b)
    r = float((b - u @ (u.T @ b)).norm())  # the residual norm of the exact solution
    # Wedin's perturbation bound (‖A‖ = 1) is 2e-9 here; a random b puts most of x in the small
    # singular directions, which both solvers resolve to eps relative (measured 3e-16), so the
    # test holds them to κ·eps, far inside the bound
    assert EPS * (kappa + kappa**2 * r / float(ref.norm())) > 1e-9
    assert _rel(x, ref) < kappa * EPS
    # the normal equations hold to rounding: ‖Aᵀ(Ax − b)‖ ≲ eps·‖A‖(‖A‖‖x‖ + ‖b‖) (measured 0.06)
    assert float((a.T @ (a @ x - b)).norm()) < 4 * EPS * (float(x.norm()) + float(b.norm()))


# ---------------------------------------------------------------------------------------------
# Rank deficiency: the minimum-norm solution
# ---------------------------------------------------------------------------------------------


def test_rank_deficient_returns_the_minimum_norm_solution() -> None:
    sv = [3.0, 2.0, 1.0, 0.5, 0.0, 0.0]
    a, u, v = _designed(sv, 40, 6, seed=7)
    b = torch.randn(40, 2, generator=gen(8), dtype=F64)
    f = MinNormLstsq.of(a)
    x = f.solve(b)
    assert f.rank == 4
    assert _rel(x, _pinv_solve(a, b)) < 1e-14  # measured 4e-16
    exact = v[:, :4] @ ((u[:, :4].T @ b) / torch.tensor(sv[:4], dtype=F64)[:, None])
    assert _rel(x, exact) < 1e-14
    null = v[:, 4:]
    assert float((null.T @ x).abs().max()) < 1e-14 * float(x.norm())
    # any other least-squares solution x + Nz has the same residual and a larger norm
    other = x + null @ torch.randn(2, 2, generator=gen(9), dtype=F64)
    assert float((a @ other - b).norm()) == pytest.approx(float((a @ x - b).norm()), rel=1e-12)
    assert float(other.norm()) > float(x.norm())


def test_duplicate_and_constant_zero_columns_split_weight_evenly_and_ignore_the_zero_column() -> None:
    # MNIST-like: identical columns (pixels that always agree) and an all-zero column
    g = gen(10)
    base = torch.randn(30, 4, generator=g, dtype=F64)
    a = torch.cat([base[:, :1], base[:, :1], torch.zeros(30, 1, dtype=F64), base[:, 1:]], dim=1)
    b = torch.randn(30, 1, generator=g, dtype=F64)
    x = min_norm_lstsq(a, b)
    assert MinNormLstsq.of(a).rank == 4
    assert abs(float(x[0] - x[1])) < 1e-13 * float(x.norm())
    assert abs(float(x[2])) < 1e-14 * float(x.norm())
    assert _rel(x, _pinv_solve(a, b)) < 1e-13


@pytest.mark.parametrize(("rtol", "rank"), [(1e-6, 2), (1e-12, 3), (0.5, 1)])
def test_explicit_rtol_drops_the_same_singular_values_as_pinv(rtol: float, rank: int) -> None:
    a, _, _ = _designed([1.0, 1e-3, 1e-10], 20, 3, seed=11)
    b = torch.randn(20, 1, generator=gen(12), dtype=F64)
    f = MinNormLstsq.of(a, rtol=rtol)
    assert f.rank == rank
    assert _rel(f.solve(b), _pinv_solve(a, b, rtol)) < 1e-14  # measured ≤ 1.2e-15


def test_wide_matrix_gives_the_min_norm_solution_in_the_row_space() -> None:
    g = gen(13)
    a = torch.randn(8, 20, generator=g, dtype=F64)
    b = torch.randn(8, 2, generator=g, dtype=F64)
    f = MinNormLstsq.of(a)
    x = f.solve(b)
    assert f.rank == 8 and f.core.shape == (8, 20)
    assert _rel(x, _pinv_solve(a, b)) < 1e-13
    assert float((a @ x - b).norm()) < 1e-13 * float(b.norm())  # consistent: exact fit
    z = torch.linalg.lstsq(a @ a.T, b).solution  # x = Aᵀz lies in the row space
    assert _rel(x, a.T @ z) < 1e-12


def test_zero_and_empty_matrices_solve_to_zero() -> None:
    b = torch.randn(5, 2, generator=gen(14), dtype=F64)
    f = MinNormLstsq.of(torch.zeros(5, 3, dtype=F64))
    assert f.rank == 0 and f.sigma_max == 0.0
    assert torch.equal(f.solve(b), torch.zeros(3, 2, dtype=F64))
    w0 = torch.randn(3, 2, generator=gen(15), dtype=F64)
    assert torch.equal(f.gd_limit(b, w0), w0)  # A⁺ = 0: GD never moves
    assert math.isinf(f.gram_kappa().kappa) and f.gram_kappa().rank == 0
    e = MinNormLstsq.of(torch.zeros(5, 0, dtype=F64))
    assert e.solve(b).shape == (0, 2) and e.rank == 0


# ---------------------------------------------------------------------------------------------
# w* from a start, κ, projections
# ---------------------------------------------------------------------------------------------


def test_gd_limit_matches_the_pinv_formula_and_keeps_the_null_component_of_w0() -> None:
    a, _, v = _designed([2.0, 1.5, 1.0, 0.2, 0.0], 30, 5, seed=16)
    b = torch.randn(30, 2, generator=gen(17), dtype=F64)
    w0 = torch.randn(5, 2, generator=gen(18), dtype=F64)
    p = torch.linalg.pinv(a, rtol=default_rtol(30, 5))
    ref = p @ b + w0 - p @ (a @ w0)
    w = MinNormLstsq.of(a).gd_limit(b, w0)
    assert _rel(w, ref) < 1e-13
    null = v[:, 4:]
    assert torch.allclose(null.T @ w, null.T @ w0, rtol=0, atol=1e-14)
    f = MinNormLstsq.of(a)
    assert torch.equal(f.gd_limit(b, torch.zeros(5, 2, dtype=F64)), f.solve(b))
    assert torch.equal(f.gd_limit(b, w0, qtb=f.qt(b)), f.gd_limit(b, w0))


@pytest.mark.parametrize("sv", [[4.0, 2.0, 1.0, 0.1], [3.0, 1.0, 1e-5, 0.0], [1.0, 1e-7, 1e-9, 1e-12]])
def test_gram_kappa_reports_what_gram_condition_number_reports(sv: list[float]) -> None:
    a, _, _ = _designed(sv, 25, 4, seed=19)
    got, ref = MinNormLstsq.of(a).gram_kappa(), gram_condition_number(a)
    assert (got.rank, got.dim, got.rtol) == (ref.rank, ref.dim, ref.rtol)
    assert got.kappa == pytest.approx(ref.kappa, rel=1e-10)
    assert got.sigma_max == pytest.approx(ref.sigma_max, rel=1e-14)
    assert got.log_kappa == pytest.approx(ref.log_kappa, rel=1e-10)


def test_project_splits_the_residual_into_a_core_part_and_an_unreachable_part() -> None:
    a, _, _ = _designed([2.0, 1.0, 0.5, 0.0], 20, 4, seed=20)
    b = torch.randn(20, 3, generator=gen(21), dtype=F64)
    f = MinNormLstsq.of(a)
    c, unreachable = f.project(b)
    assert c.shape == (4, 3) and unreachable.shape == (3,)
    assert torch.allclose((c**2).sum(0) + unreachable, (b**2).sum(0), rtol=1e-13, atol=0)
    w = torch.randn(4, 3, generator=gen(22), dtype=F64)
    direct = ((a @ w - b) ** 2).sum()
    assert float(((f.core @ w - c) ** 2).sum() + unreachable.sum()) == pytest.approx(float(direct), rel=1e-13)
    assert torch.allclose(f.core.T @ f.core, a.T @ a, rtol=0, atol=1e-14)  # AᵀA = RᵀR


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(NumericalError, match="2-D"):
        MinNormLstsq.of(torch.zeros(3, dtype=F64))
    with pytest.raises(NumericalError, match="NaN"):
        MinNormLstsq.of(torch.tensor([[1.0, float("nan")]], dtype=F64))
    with pytest.raises(NumericalError, match="rtol"):
        MinNormLstsq.of(torch.eye(2, dtype=F64), rtol=-1.0)
    with pytest.raises(NumericalError, match=r"\(3, C\)"):
        MinNormLstsq.of(torch.ones(3, 2, dtype=F64)).solve(torch.ones(2, 1, dtype=F64))


@SETTINGS
@given(
    seed=seeds,
    rows=st.integers(1, 24),
    cols=st.integers(1, 12),
    rank=st.integers(0, 12),
    log_kappa=st.floats(0.0, 6.0),
)
def test_property_agrees_with_pinv_for_any_shape_and_rank(
    seed: int, rows: int, cols: int, rank: int, log_kappa: float
) -> None:
    p = min(rows, cols)
    r = min(rank, p)
    kept = torch.logspace(0.0, -log_kappa, r, dtype=F64) if r else torch.zeros(0, dtype=F64)
    sv = torch.cat([kept, torch.zeros(p - r, dtype=F64)]).tolist()
    a, _, _ = _designed(sv, rows, cols, seed)
    b = torch.randn(rows, 2, generator=gen(seed + 1), dtype=F64)
    f = MinNormLstsq.of(a)
    assert f.rank == r
    x, ref = f.solve(b), _pinv_solve(a, b)
    if r == 0:
        assert torch.equal(x, torch.zeros(cols, 2, dtype=F64)) and not bool(ref.any())
        return
    kappa = 10**log_kappa if r > 1 else 1.0
    resid = float((a @ ref - b).norm())
    # Wedin: ‖δx‖/‖x‖ ≤ c·eps·(κ + κ²‖r‖/(‖A‖‖x‖)), ‖A‖ = 1
    bound = 16 * EPS * (kappa + kappa**2 * resid / float(ref.norm()))
    assert _rel(x, ref) <= bound


def test_robust_svd_falls_back_when_lapack_does_not_converge(monkeypatch) -> None:
    """gesdd can fail on extreme dynamic ranges (whitened MNIST features): retry, never give up silently."""
    from immunekit.errors import NumericalError
    from immunekit.spectral import lstsq

    m = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    real = torch.linalg.svd
    calls = []

    def flaky(x, full_matrices=True):
        calls.append(tuple(x.shape))
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("did not converge")
        return real(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = lstsq.robust_svd(m)
    assert calls == [(7, 5), (5, 7)]  # the transpose was decomposed
    assert torch.allclose(u @ torch.diag(s) @ vh, m, atol=1e-13, rtol=0)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-13)

    def broken(x, full_matrices=True):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(NumericalError, match=r"SVD of a \(7, 5\) matrix did not converge"):
        lstsq.robust_svd(m)
