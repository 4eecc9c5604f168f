"""Extreme eigenvalues: dense eigh and matrix-free Lanczos."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, jvp

from immunekit.errors import NumericalError
from immunekit.spectral.eig import dense_extreme_eigs, extreme_eigs, lanczos_extreme_eigs
from immunekit.spectral.hessians import softmax_probe_hessian

from ._util import F64, SETTINGS, gen, log_uniform, seeds, sym_with_spectrum

N_BIG = 300


@pytest.fixture(scope="module")
def big_operator() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 300-dim SPD operator with κ = 1e3, given by (Q, λ) so that A v = Q(λ ⊙ Qᵀv) is matrix-free."""
    g = gen(10)
    lam = 10.0 ** (3.0 * torch.rand(N_BIG, generator=g, dtype=F64))  # log-uniform in [1, 1e3]
    lam[0], lam[1] = 1.0, 1e3  # pin the extremes
    q, _ = torch.linalg.qr(torch.randn(N_BIG, N_BIG, generator=g, dtype=F64))
    return q, lam, (q * lam) @ q.T


def test_dense_extreme_eigs_known_spectrum() -> None:
    a, _ = sym_with_spectrum(torch.tensor([3.5, -2.0, 0.0, 7.25, 1.0], dtype=F64), gen(0))
    e = dense_extreme_eigs(a)
    assert e.lambda_max == pytest.approx(7.25, rel=1e-13, abs=0)
    assert e.lambda_min == pytest.approx(-2.0, rel=1e-13, abs=0)
    assert e.method == "eigh"
    assert e.converged is True
    assert e.num_iters == 0


@SETTINGS
@given(seed=seeds, eigs=log_uniform(-3, 3, min_size=1, max_size=10))
def test_dense_extreme_eigs_random_spectra(seed: int, eigs: torch.Tensor) -> None:
    a, _ = sym_with_spectrum(eigs, gen(seed))
    e = dense_extreme_eigs(a)
    assert e.lambda_max == pytest.approx(float(eigs.max()), rel=1e-12, abs=0)
    # Absolute error of eigh is ~eps·‖A‖, so compare λ_min on that scale.
    assert e.lambda_min == pytest.approx(float(eigs.min()), rel=1e-8, abs=1e-12 * float(eigs.max()))


def test_dense_extreme_eigs_rejects_non_square() -> None:
    with pytest.raises(NumericalError):
        dense_extreme_eigs(torch.ones(2, 3, dtype=F64))
    with pytest.raises(NumericalError):
        dense_extreme_eigs(torch.ones(3, dtype=F64))


def test_lanczos_matrix_free_300_dim(big_operator: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    q, lam, a = big_operator
    calls = 0

    def matvec(v: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return q @ (lam * (q.T @ v))

    e = lanczos_extreme_eigs(matvec, N_BIG, max_iters=N_BIG, generator=gen(1))
    w = torch.linalg.eigvalsh(a)
    assert e.method == "lanczos"
    assert e.converged is True
    assert 1 <= e.num_iters <= N_BIG
    assert calls == e.num_iters
    assert e.lambda_max == pytest.approx(float(w[-1]), rel=1e-8, abs=0)
    assert e.lambda_min == pytest.approx(float(w[0]), rel=1e-8, abs=0)
    assert e.lambda_max == pytest.approx(1e3, rel=1e-8, abs=0)
    assert e.lambda_min == pytest.approx(1.0, rel=1e-8, abs=0)
    assert e.residual_max <= 1e-10 * 1e3
    assert e.residual_min <= 1e-10 * 1e3


def test_lanczos_is_reproducible_with_generator(
    big_operator: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    _, _, a = big_operator
    e1 = lanczos_extreme_eigs(lambda v: a @ v, N_BIG, max_iters=40, generator=gen(7))
    e2 = lanczos_extreme_eigs(lambda v: a @ v, N_BIG, max_iters=40, generator=gen(7))
    assert e1 == e2


def test_lanczos_with_too_few_iterations_reports_not_converged(
    big_operator: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    _, _, a = big_operator
    e = lanczos_extreme_eigs(lambda v: a @ v, N_BIG, max_iters=5, generator=gen(2))
    assert e.converged is False
    assert e.num_iters == 5
    # Ritz values are interior estimates: they never overshoot the true extremes.
    assert e.lambda_max <= 1e3 * (1 + 1e-12)
    assert e.lambda_min >= 1.0 * (1 - 1e-12)
    assert max(e.residual_max, e.residual_min) > 1e-10 * e.lambda_max


def test_lanczos_exact_on_small_full_krylov_space() -> None:
    """max_iters = dim spans the whole space, so the Ritz values are the exact extremes."""
    a, _ = sym_with_spectrum(torch.tensor([5.0, -3.0, 1.0, 2.0, 0.5, 4.0], dtype=F64), gen(3))
    e = lanczos_extreme_eigs(lambda v: a @ v, 6, max_iters=50, generator=gen(4))
    assert e.converged is True
    assert e.num_iters <= 6
    assert e.lambda_max == pytest.approx(5.0, rel=1e-10, abs=0)
    assert e.lambda_min == pytest.approx(-3.0, rel=1e-10, abs=0)


@pytest.mark.parametrize("scale", [1e-12, 1e12])
def test_lanczos_is_scale_invariant(
    scale: float, big_operator: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    """Convergence is judged relative to the spectrum: a tiny operator is not 'converged' early.

    Same start vector, so the iterates of A and c·A agree up to rounding and stop at the same step.
    """
    q, lam, _ = big_operator
    ref = lanczos_extreme_eigs(lambda v: q @ (lam * (q.T @ v)), N_BIG, max_iters=N_BIG, generator=gen(5))
    e = lanczos_extreme_eigs(
        lambda v: scale * (q @ (lam * (q.T @ v))), N_BIG, max_iters=N_BIG, generator=gen(5)
    )
    assert ref.converged is True
    assert e.converged is True
    assert e.lambda_max == pytest.approx(scale * 1e3, rel=1e-8, abs=0)
    assert e.lambda_min == pytest.approx(scale * 1.0, rel=1e-8, abs=0)
    assert abs(e.num_iters - ref.num_iters) <= 2


def test_lanczos_on_hessian_vector_product() -> None:
    """Matrix-free use on a real probe Hessian: HVPs of the softmax loss against the dense closed form."""
    g = gen(6)
    n, d, c = 40, 6, 4
    phi = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(d, c, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)

    def loss(w_flat: torch.Tensor) -> torch.Tensor:
        return nnf.cross_entropy(phi @ w_flat.reshape(d, c), y)

    w0 = w.reshape(-1)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return jvp(grad(loss), (w0,), (v,))[1]

    e = extreme_eigs(hvp, d * c, max_iters=d * c, generator=gen(7))
    dense = torch.linalg.eigvalsh(softmax_probe_hessian(phi, w))
    assert e.converged is True
    assert e.lambda_max == pytest.approx(float(dense[-1]), rel=1e-9, abs=0)
    # The softmax Hessian is singular (rows sum to zero per sample), so λ_min ≈ 0.
    assert e.lambda_min == pytest.approx(float(dense[0]), abs=1e-10 * float(dense[-1]))


def test_lanczos_rejects_bad_sizes() -> None:
    with pytest.raises(NumericalError):
        lanczos_extreme_eigs(lambda v: v, 0)
    with pytest.raises(NumericalError):
        lanczos_extreme_eigs(lambda v: v, 3, max_iters=0)


def test_extreme_eigs_dispatch() -> None:
    n = 40
    lam = torch.linspace(1.0, 50.0, n, dtype=F64)
    a, q = sym_with_spectrum(lam, gen(9))
    auto = extreme_eigs(a)
    assert auto.method == "eigh"
    assert auto.num_iters == 0
    assert auto.lambda_max == pytest.approx(50.0, rel=1e-12, abs=0)
    assert auto.lambda_min == pytest.approx(1.0, rel=1e-12, abs=0)
    forced = extreme_eigs(a, method="lanczos", max_iters=n, generator=gen(8))
    assert forced.method == "lanczos"
    assert forced.converged is True
    assert forced.num_iters >= 1
    assert forced.lambda_min == pytest.approx(1.0, rel=1e-8, abs=0)
    assert forced.lambda_max == pytest.approx(50.0, rel=1e-8, abs=0)
    big = extreme_eigs(a, dense_max_dim=n - 1, max_iters=n, generator=gen(8))
    assert big.method == "lanczos"
    assert big == forced
    free = extreme_eigs(lambda v: q @ (lam * (q.T @ v)), n, max_iters=n, generator=gen(8))
    assert free.method == "lanczos"
    assert free.converged is True
    assert free.lambda_max == pytest.approx(50.0, rel=1e-8, abs=0)
    assert free.lambda_min == pytest.approx(1.0, rel=1e-8, abs=0)
    assert extreme_eigs(a, method="eigh", dense_max_dim=10).method == "eigh"


def test_extreme_eigs_errors() -> None:
    with pytest.raises(NumericalError, match="dim"):
        extreme_eigs(lambda v: v)
    with pytest.raises(NumericalError, match="eigh"):
        extreme_eigs(lambda v: v, 3, method="eigh")
    with pytest.raises(NumericalError, match="unknown method"):
        extreme_eigs(torch.eye(3, dtype=F64), method="arpack")


@SETTINGS
@given(seed=seeds, eigs=log_uniform(-2, 2, min_size=2, max_size=30), shift=st.floats(-50.0, 50.0))
def test_lanczos_full_space_matches_eigh(seed: int, eigs: torch.Tensor, shift: float) -> None:
    """With max_iters = dim Lanczos is exact up to rounding, also for indefinite spectra."""
    a, _ = sym_with_spectrum(eigs + shift, gen(seed))
    n = eigs.numel()
    e = lanczos_extreme_eigs(lambda v: a @ v, n, max_iters=n, generator=gen(seed + 1))
    d = dense_extreme_eigs(a)
    scale = float((eigs + shift).abs().max())
    assert e.lambda_max == pytest.approx(d.lambda_max, abs=1e-8 * scale)
    assert e.lambda_min == pytest.approx(d.lambda_min, abs=1e-8 * scale)
    assert e.num_iters <= n
