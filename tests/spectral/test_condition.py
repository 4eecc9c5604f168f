"""Pseudo-inverse condition numbers (spec §7.1): closed forms, rank handling and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from immunekit.errors import NumericalError
from immunekit.spectral.condition import (
    EPS64,
    KappaInfo,
    condition_number,
    default_rtol,
    gram_condition_number,
    kappa_from_values,
)

from ._util import F64, SETTINGS, gen, log_uniform, orthogonal, seeds, sym_with_spectrum, with_singular_values

# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("diag", "kappa"),
    [
        ([4.0, 2.0, 1.0], 4.0),
        ([1.0, 1e-3, 10.0], 1e4),
        ([-8.0, 2.0], 4.0),  # singular values are |d_i|
        ([7.5], 1.0),
        ([3.0, 3.0, 3.0], 1.0),
    ],
)
def test_kappa_of_diagonal_matrix(diag: list[float], kappa: float) -> None:
    info = condition_number(torch.diag(torch.tensor(diag, dtype=F64)))
    assert info.kappa == pytest.approx(kappa, rel=1e-14, abs=0)
    assert info.log_kappa == pytest.approx(math.log(kappa), rel=1e-12, abs=1e-14)
    assert info.rank == len(diag)
    assert info.dim == len(diag)
    assert info.sigma_max == pytest.approx(max(abs(d) for d in diag), rel=1e-14, abs=0)
    assert info.sigma_min == pytest.approx(min(abs(d) for d in diag), rel=1e-14, abs=0)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_identity_has_kappa_one(n: int) -> None:
    for hermitian in (False, True):
        info = condition_number(torch.eye(n, dtype=F64), hermitian=hermitian)
        assert info.kappa == pytest.approx(1.0, abs=1e-14)
        assert info.log_kappa == pytest.approx(0.0, abs=1e-14)
        assert info.rank == n


def test_zero_singular_values_are_excluded_and_rank_reported() -> None:
    a = torch.diag(torch.tensor([4.0, 2.0, 0.0, 0.0], dtype=F64))
    info = condition_number(a)
    assert info.kappa == pytest.approx(2.0, rel=1e-14, abs=0)
    assert info.rank == 2
    assert info.dim == 4
    assert info.sigma_min == pytest.approx(2.0, rel=1e-14, abs=0)
    assert info.rtol == default_rtol(4, 4) == 4 * EPS64


def test_rectangular_rank_deficient_matrix() -> None:
    g = gen(0)
    a = with_singular_values(torch.tensor([5.0, 2.0, 0.5], dtype=F64), 9, 6, g)  # rank 3 of a 9x6 matrix
    info = condition_number(a)
    assert info.rank == 3
    assert info.dim == 6
    assert info.kappa == pytest.approx(10.0, rel=1e-12, abs=0)
    assert info.rtol == 9 * EPS64
    # The transpose has the same κ and rank.
    info_t = condition_number(a.T)
    assert info_t.kappa == pytest.approx(info.kappa, rel=1e-12, abs=0)
    assert info_t.rank == 3


@pytest.mark.parametrize("scale", [1e-30, 1e-200, 1.0, 1e30, 1e200])
def test_rank_threshold_is_relative(scale: float) -> None:
    """Scaling by 1e-30 (or 1e200) changes neither the rank nor κ: there is no absolute cut-off."""
    g = gen(1)
    a = with_singular_values(torch.tensor([3.0, 1.0, 1e-4], dtype=F64), 6, 6, g)
    base = condition_number(a)
    info = condition_number(scale * a)
    assert base.rank == 3
    assert info.rank == 3
    assert info.kappa == pytest.approx(base.kappa, rel=1e-10, abs=0)
    assert info.sigma_max == pytest.approx(scale * base.sigma_max, rel=1e-12, abs=0)
    assert info.sigma_min == pytest.approx(scale * base.sigma_min, rel=1e-10, abs=0)
    herm = condition_number(scale * (a @ a.T), hermitian=True)
    assert herm.rank == 3


def test_values_below_relative_threshold_are_dropped() -> None:
    info = condition_number(torch.diag(torch.tensor([1.0, 1e-20], dtype=F64)))
    assert info.rank == 1
    assert info.kappa == 1.0
    # Tiny but relatively large values are kept.
    info = condition_number(torch.diag(torch.tensor([1e-30, 1e-35], dtype=F64)))
    assert info.rank == 2
    assert info.kappa == pytest.approx(1e5, rel=1e-12, abs=0)


def test_explicit_rtol() -> None:
    a = torch.diag(torch.tensor([1.0, 1e-3, 1e-6], dtype=F64))
    coarse = condition_number(a, rtol=1e-4)
    assert coarse.rank == 2
    assert coarse.kappa == pytest.approx(1e3, rel=1e-12, abs=0)
    assert coarse.rtol == 1e-4
    fine = condition_number(a, rtol=1e-9)
    assert fine.rank == 3
    assert fine.kappa == pytest.approx(1e6, rel=1e-12, abs=0)


def test_hermitian_path_matches_svd_path_on_indefinite_symmetric_matrix() -> None:
    g = gen(2)
    a, _ = sym_with_spectrum(torch.tensor([-5.0, 3.0, 0.25, -1.0, 0.0], dtype=F64), g)
    herm = condition_number(a, hermitian=True)
    svd = condition_number(a)
    assert herm.kappa == pytest.approx(20.0, rel=1e-12, abs=0)
    assert svd.kappa == pytest.approx(20.0, rel=1e-12, abs=0)
    assert herm.rank == svd.rank == 4


def test_kappa_from_values() -> None:
    info = kappa_from_values(torch.tensor([0.5, 2.0, 0.0, -1e-18], dtype=F64), rtol=1e-12, dim=7)
    assert info == KappaInfo(4.0, math.log(4.0), 2, 7, 1e-12, 2.0, 0.5)
    zero = kappa_from_values(torch.zeros(3, dtype=F64), rtol=1e-12, dim=3)
    assert zero.kappa == math.inf
    assert zero.rank == 0
    with pytest.raises(NumericalError):
        kappa_from_values(torch.ones(2), rtol=-1.0, dim=2)


def test_zero_matrix_has_infinite_kappa_and_rank_zero() -> None:
    info = condition_number(torch.zeros(3, 4, dtype=F64))
    assert info.kappa == math.inf
    assert info.rank == 0
    assert gram_condition_number(torch.zeros(3, 4, dtype=F64)).rank == 0


def test_to_dict_is_json_ready() -> None:
    d = condition_number(torch.diag(torch.tensor([2.0, 1.0]))).to_dict()
    assert set(d) == {"kappa", "log_kappa", "rank", "dim", "rtol", "sigma_max", "sigma_min"}
    assert d["rank"] == 2
    assert d["kappa"] == pytest.approx(2.0, rel=1e-14, abs=0)


def test_float32_input_is_computed_in_float64() -> None:
    a = torch.diag(torch.tensor([1.0, 1e-5], dtype=torch.float32))
    info = condition_number(a)
    assert info.rank == 2
    assert info.kappa == pytest.approx(1.0 / float(torch.tensor(1e-5, dtype=torch.float32)), rel=1e-12, abs=0)
    assert info.rtol == default_rtol(2, 2)


# ---------------------------------------------------------------------------------------------
# Gram condition number
# ---------------------------------------------------------------------------------------------


def test_gram_condition_number_equals_condition_number_of_gram() -> None:
    g = gen(3)
    phi = with_singular_values(torch.tensor([4.0, 3.0, 1.5, 0.8, 0.5], dtype=F64), 40, 5, g)
    via_factor = gram_condition_number(phi)
    via_gram = condition_number(phi.T @ phi)
    assert via_factor.kappa == pytest.approx(64.0, rel=1e-12, abs=0)
    assert via_factor.kappa == pytest.approx(via_gram.kappa, rel=1e-12, abs=0)
    assert via_factor.rank == via_gram.rank == 5
    assert via_factor.dim == 5
    assert via_factor.sigma_max == pytest.approx(via_gram.sigma_max, rel=1e-12, abs=0)
    assert via_factor.sigma_min == pytest.approx(via_gram.sigma_min, rel=1e-12, abs=0)
    assert via_factor.log_kappa == pytest.approx(math.log(64.0), rel=1e-12, abs=0)


@SETTINGS
@given(seed=seeds, sig=log_uniform(-3, 3, min_size=1, max_size=6), extra_rows=st.integers(0, 5))
def test_gram_condition_number_is_exactly_squared_singular_value_ratio(
    seed: int, sig: torch.Tensor, extra_rows: int
) -> None:
    d = sig.numel()
    phi = with_singular_values(sig, d + extra_rows, d, gen(seed))
    s = torch.linalg.svdvals(phi)
    info = gram_condition_number(phi)
    assert info.rank == d
    s1, sr = float(s[0]), float(s[-1])
    assert info.kappa == (s1 / sr) ** 2
    assert info.sigma_max == s1**2
    assert info.sigma_min == sr**2


def test_gram_condition_number_of_rank_deficient_factor() -> None:
    g = gen(4)
    phi = with_singular_values(torch.tensor([2.0, 1.0, 0.1], dtype=F64), 3, 8, g)  # N=3 < D=8: rank 3
    info = gram_condition_number(phi)
    assert info.rank == 3
    assert info.dim == 8
    assert info.kappa == pytest.approx(400.0, rel=1e-10, abs=0)
    assert info.rtol == default_rtol(3, 8)


def test_gram_condition_number_resolves_what_the_gram_matrix_loses() -> None:
    """s_min(Φ) = 1e-10 is resolved from Φ; in ΦᵀΦ the eigenvalue 1e-20 sinks below eps·λ_max."""
    g = gen(5)
    phi = with_singular_values(torch.tensor([1.0, 0.5, 1e-10], dtype=F64), 10, 3, g)
    info = gram_condition_number(phi)
    assert info.rank == 3
    assert info.kappa == pytest.approx(1e20, rel=1e-5, abs=0)
    assert condition_number(phi.T @ phi).rank == 2


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bad: float) -> None:
    a = torch.eye(3, dtype=F64)
    a[1, 2] = bad
    with pytest.raises(NumericalError):
        condition_number(a)
    with pytest.raises(NumericalError):
        condition_number(a, hermitian=True)
    with pytest.raises(NumericalError):
        gram_condition_number(a)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 3), ()])
def test_non_2d_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(NumericalError):
        condition_number(torch.ones(shape, dtype=F64))
    with pytest.raises(NumericalError):
        gram_condition_number(torch.ones(shape, dtype=F64))


def test_hermitian_needs_square() -> None:
    with pytest.raises(NumericalError):
        condition_number(torch.ones(2, 3, dtype=F64), hermitian=True)


# ---------------------------------------------------------------------------------------------
# Hypothesis properties over SPD matrices with set spectra in [1e-3, 1e3]
# ---------------------------------------------------------------------------------------------

spd_spectra = log_uniform(-3, 3, min_size=1, max_size=8)


@SETTINGS
@given(seed=seeds, eigs=spd_spectra)
def test_kappa_is_at_least_one_and_matches_spectrum(seed: int, eigs: torch.Tensor) -> None:
    a, _ = sym_with_spectrum(eigs, gen(seed))
    expected = float(eigs.max() / eigs.min())
    for hermitian in (False, True):
        info = condition_number(a, hermitian=hermitian)
        assert info.kappa >= 1.0
        assert info.rank == eigs.numel()
        assert info.kappa == pytest.approx(expected, rel=1e-8, abs=0)


@SETTINGS
@given(seed=seeds, eigs=spd_spectra, log_c=st.floats(min_value=-12, max_value=12))
def test_kappa_is_scale_invariant(seed: int, eigs: torch.Tensor, log_c: float) -> None:
    a, _ = sym_with_spectrum(eigs, gen(seed))
    c = 10.0**log_c
    base, scaled = condition_number(a), condition_number(c * a)
    assert scaled.kappa == pytest.approx(base.kappa, rel=1e-8, abs=0)
    assert scaled.rank == base.rank
    assert condition_number(-c * a, hermitian=True).kappa == pytest.approx(base.kappa, rel=1e-8, abs=0)


@SETTINGS
@given(seed=seeds, eigs=spd_spectra)
def test_kappa_is_orthogonally_invariant(seed: int, eigs: torch.Tensor) -> None:
    g = gen(seed)
    a, _ = sym_with_spectrum(eigs, g)
    q = orthogonal(eigs.numel(), g)
    assert condition_number(q @ a @ q.T).kappa == pytest.approx(condition_number(a).kappa, rel=1e-8, abs=0)
    # One-sided orthogonal factors leave singular values unchanged as well.
    assert condition_number(q @ a).kappa == pytest.approx(condition_number(a).kappa, rel=1e-8, abs=0)


@SETTINGS
@given(seed=seeds, eigs=spd_spectra)
def test_kappa_of_inverse_equals_kappa(seed: int, eigs: torch.Tensor) -> None:
    a, q = sym_with_spectrum(eigs, gen(seed))
    inv_exact = (q / eigs) @ q.T
    inv_numeric = torch.linalg.inv(a)
    k = condition_number(a).kappa
    assert condition_number(inv_exact).kappa == pytest.approx(k, rel=1e-8, abs=0)
    assert condition_number(inv_numeric).kappa == pytest.approx(k, rel=1e-8, abs=0)


@SETTINGS
@given(seed=seeds, eigs=spd_spectra, n_zero=st.integers(0, 5), log_c=st.floats(min_value=-30, max_value=30))
def test_rank_of_psd_matrix_equals_number_of_nonzero_eigenvalues(
    seed: int, eigs: torch.Tensor, n_zero: int, log_c: float
) -> None:
    r = eigs.numel()
    spectrum = torch.cat([eigs, torch.zeros(n_zero, dtype=F64)]) * 10.0**log_c
    a, _ = sym_with_spectrum(spectrum, gen(seed))
    expected_kappa = float(eigs.max() / eigs.min())
    for hermitian in (False, True):
        info = condition_number(a, hermitian=hermitian)
        assert info.rank == r
        assert info.dim == r + n_zero
        assert info.kappa == pytest.approx(expected_kappa, rel=1e-8, abs=0)
