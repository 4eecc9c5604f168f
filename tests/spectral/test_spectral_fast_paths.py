"""Fast spectral building blocks equal the reference computations (float64, tight tolerances).

* PsdSpectrum: one eigh of K gives make_preconditioner's and psd_factor's results bit for bit.
* RangeProjector: thin P X and PΔP + (I−P)Δ(I−P) equal the dense forms (singular and full K).
* gram_spectrum: gram_condition_number plus the singular values.
* gram_log_kappa_lower_bound: never above gram_condition_number's log κ (also for every factor
  within ``abs_err``), tight once converged, −inf when the rank cannot be certified; the QR/svdvals
  backward-error model is far above the observed errors.
* SelectedSpectrum and g_*_fast: the spectral terms from eigvalsh + inverse iteration (and from the
  r × r Gram of a thin factor) equal g_well / g_ill / g_log_kappa.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from immunekit.spectral import (
    PsdSpectrum,
    g_ill,
    g_log_kappa,
    g_well,
    gram_condition_number,
    gram_log_kappa_lower_bound,
    gram_spectrum,
    make_preconditioner,
    psd_factor,
)
from immunekit.spectral.condition import EPS64
from immunekit.spectral.fast import (
    BACKWARD_CONSTANT,
    SelectedSpectrum,
    g_ill_fast,
    g_log_kappa_fast,
    g_well_fast,
    gram_kappa_bound,
)
from immunekit.spectral.hessians import symmetrize

from ._util import SETTINGS, gen, orthogonal, seeds, with_singular_values

F64 = torch.float64


def _psd(d: int, rank: int, cond: float, seed: int) -> torch.Tensor:
    """Q diag(λ) Qᵀ with ``rank`` log-spaced eigenvalues in [1/cond, 1] and d − rank exact zeros."""
    g = gen(seed)
    q = orthogonal(d, g)[:, :rank]
    lam = torch.logspace(0, -math.log10(cond), rank, dtype=F64)
    return symmetrize((q * lam) @ q.T)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ---------------------------------------------------------------------------------------------
# PsdSpectrum, RangeProjector, gram_spectrum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "rank"), [(12, 12), (12, 7), (12, 3), (9, 0)])
@pytest.mark.parametrize("rtol", [None, 1e-6])
def test_psd_spectrum_reproduces_preconditioners_and_factor_bit_for_bit(d: int, rank: int, rtol) -> None:
    k = _psd(d, rank, 1e4, seed=d + rank) if rank else torch.zeros(d, d, dtype=F64)
    spec = PsdSpectrum.of(k, rtol=rtol)
    for method, ridge in (("pinv", 0.0), ("ridge", 1e-3), ("none", 0.0)):
        ref = make_preconditioner(k, method=method, rtol=rtol, ridge=ridge)
        got = spec.preconditioner(method, ridge=ridge)
        assert torch.equal(got.matrix, ref.matrix) and torch.equal(got.projector, ref.projector)
        assert got.describe() == ref.describe()
    lean = spec.preconditioner("pinv", dense=False)
    assert lean.describe() == make_preconditioner(k, rtol=rtol).describe()
    full = psd_factor(k, rtol=rtol)
    assert torch.equal(spec.factor(), full)
    thin = spec.factor(thin=True)
    assert thin.shape == (spec.rank, d)
    assert torch.equal(thin, full[full.abs().sum(1) > 0]) or spec.rank == 0


@pytest.mark.parametrize(("d", "rank"), [(14, 14), (14, 10), (14, 4), (14, 0)])
def test_range_projector_equals_the_dense_projector(d: int, rank: int) -> None:
    k = _psd(d, rank, 1e3, seed=rank) if rank else torch.zeros(d, d, dtype=F64)
    dense = make_preconditioner(k).projector
    rp = PsdSpectrum.of(k).projector()
    assert rp.rank == rank
    assert rp.basis.shape[1] == min(rank, d - rank)  # the thinner side is stored
    g = gen(7)
    x = torch.randn(d, 5, generator=g, dtype=F64)
    delta = torch.randn(d, d, generator=g, dtype=F64)
    other = torch.eye(d, dtype=F64) - dense
    assert (rp.apply(x) - dense @ x).abs().max() <= 1e-13 * x.abs().max()
    sand = dense @ delta @ dense + other @ delta @ other
    assert (rp.sandwich(delta) - sand).abs().max() <= 1e-13 * delta.abs().max()
    assert (rp.dense() - dense).abs().max() <= 1e-14


def test_gram_spectrum_is_gram_condition_number_plus_values() -> None:
    phi = with_singular_values(torch.tensor([5.0, 2.0, 1e-3, 0.0]), 6, 4, gen(1))
    info, values = gram_spectrum(phi)
    assert info == gram_condition_number(phi)
    assert torch.equal(values, torch.linalg.svdvals(phi))
    rank0, v0 = gram_spectrum(torch.zeros(3, 2))
    assert rank0.rank == 0 and math.isinf(rank0.kappa) and v0.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Certified lower bound on log κ(ΦᵀΦ)
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=seeds,
    rows=st.integers(2, 40),
    cols=st.integers(2, 40),
    log_cond=st.floats(0.0, 11.0),
    target_offset=st.one_of(st.none(), st.floats(-3.0, 0.5)),
)
def test_bound_never_exceeds_the_reported_log_kappa(
    seed: int, rows: int, cols: int, log_cond: float, target_offset: float | None
) -> None:
    p = min(rows, cols)
    sig = torch.logspace(0, -log_cond / 2, p, dtype=F64) * 3.0
    phi = with_singular_values(sig, rows, cols, gen(seed))
    exact = gram_condition_number(phi).log_kappa
    target = None if target_offset is None else exact + target_offset
    lb = gram_log_kappa_lower_bound(phi, target=target)
    assert lb <= exact + 1e-12
    if target is None and math.isfinite(lb):
        # converged: only the (generous) error model separates it from the exact value
        c = BACKWARD_CONSTANT * max(rows, cols) * EPS64
        slack = 2 * (2 * c * float(phi.norm())) / float(sig[-1]) + 4 * c * float(sig[0]) / float(sig[-1])
        assert exact - lb <= 1e-6 + 10 * slack


@SETTINGS
@given(seed=seeds, log_cond=st.floats(0.0, 8.0), rel=st.floats(1e-12, 1e-6))
def test_bound_holds_for_every_factor_within_abs_err(seed: int, log_cond: float, rel: float) -> None:
    g = gen(seed)
    sig = torch.logspace(0, -log_cond / 2, 8, dtype=F64)
    phi = with_singular_values(sig, 8, 20, g)
    abs_err = rel * float(sig[0])
    lb = gram_log_kappa_lower_bound(phi, abs_err=abs_err)
    for _ in range(5):
        e = torch.randn(8, 20, generator=g, dtype=F64)
        other = phi + e * (abs_err / float(torch.linalg.matrix_norm(e, 2)))
        assert lb <= gram_condition_number(other).log_kappa + 1e-12


def test_bound_is_tight_when_converged_and_early_exits_on_a_target() -> None:
    sig = torch.logspace(0, -4, 30, dtype=F64)
    phi = with_singular_values(sig, 30, 50, gen(3))
    exact = gram_condition_number(phi).log_kappa
    res = gram_kappa_bound(phi)
    assert exact - res.log_kappa_lower <= 1e-7
    assert res.top is not None and res.bottom is not None
    # warm starts from the vectors found give the same bound in fewer steps, and any target
    # below the bound is reported as exceeded
    again = gram_kappa_bound(phi, start=(res.top, res.bottom), target=exact - 1e-3)
    assert again.log_kappa_lower > exact - 1e-3


def test_bound_makes_no_claim_when_the_rank_is_uncertain() -> None:
    # σ_p at the rank threshold: gram_condition_number may or may not keep it, so no claim.
    sig = torch.tensor([1.0, 0.5, 2e-15], dtype=F64)  # threshold max(n, d)·eps = 1.3e-15
    phi = with_singular_values(sig, 3, 6, gen(4))
    assert gram_log_kappa_lower_bound(phi) == -math.inf
    assert gram_log_kappa_lower_bound(torch.zeros(2, 3, dtype=F64)) == -math.inf
    assert gram_log_kappa_lower_bound(torch.full((2, 3), float("nan"), dtype=F64)) == -math.inf


@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (40, 120), (120, 40)])
def test_backward_error_model_is_far_above_observed_errors(rows: int, cols: int) -> None:
    # σ(R) of Householder QR and svdvals against a float64 reference built from a known SVD:
    # the model c·max(n, d)·eps·‖Φ‖_F must exceed the observed differences by ≥ 100×.
    p = min(rows, cols)
    sig = torch.logspace(0, -6, p, dtype=F64)
    phi = with_singular_values(sig, rows, cols, gen(5))
    model = BACKWARD_CONSTANT * max(rows, cols) * EPS64 * float(phi.norm())
    r = torch.linalg.qr(phi.T if rows <= cols else phi, mode="r").R
    s_qr = torch.linalg.svdvals(r)
    s_svd = torch.linalg.svdvals(phi)
    observed = max(float((s_qr - sig).abs().max()), float((s_svd - sig).abs().max()))
    assert observed * 100 <= model


# ---------------------------------------------------------------------------------------------
# Spectral terms from eigvalsh + inverse iteration (and the r × r Gram of a thin factor)
# ---------------------------------------------------------------------------------------------


def _h_and_factor(p: int, r: int, cond: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = MᵀM with M (r × p) of set, well-separated singular values (κ(H) = cond)."""
    sig = torch.logspace(0, -math.log10(cond) / 2, r, dtype=F64)
    m = with_singular_values(sig, r, p, gen(seed))
    return symmetrize(m.T @ m), m


@pytest.mark.parametrize(("p", "r"), [(20, 20), (20, 13), (20, 5)])
@pytest.mark.parametrize("use_factor", [False, True])
def test_fast_terms_equal_the_reference_terms(p: int, r: int, use_factor: bool) -> None:
    h, m = _h_and_factor(p, r, 1e6, seed=p + r)
    factor = m if use_factor else None
    k = gram_condition_number(m).rank
    assert k == r
    pairs = [
        (g_well_fast(h, factor=factor), g_well(h)),
        (g_ill_fast(h, rank=k, factor=factor), g_ill(h, rank=k)),
        (g_log_kappa_fast(h, rank=k, factor=factor), g_log_kappa(h, rank=k)),
    ]
    lmax = float(torch.linalg.eigvalsh(h)[-1])
    for fast, ref in pairs:
        assert _rel(fast.g, ref.g) <= 1e-9
        assert fast.value == pytest.approx(ref.value, rel=1e-9)
        assert fast.rank == ref.rank
        assert (fast.eigenvalues - ref.eigenvalues).abs().max() <= 1e-12 * lmax
        assert fast.delta == pytest.approx(ref.delta, rel=1e-9, nan_ok=True)


def test_selected_spectrum_vectors_are_eigenvectors_and_fall_back_on_repeated_eigenvalues() -> None:
    h, m = _h_and_factor(16, 9, 1e4, seed=2)
    for spec in (SelectedSpectrum.of(h), SelectedSpectrum.of(h, factor=m)):
        v = spec.vectors([0, 8])
        lam = spec.eigenvalues[[0, 8]]
        assert float((h @ v - v * lam).norm()) <= 1e-12 * float(spec.eigenvalues[0])
        assert torch.allclose(v.T @ v, torch.eye(2, dtype=F64), atol=1e-10)
    # an exactly repeated top eigenvalue: any unit vector of the eigenspace is valid
    iso = SelectedSpectrum.of(torch.eye(5, dtype=F64))
    v = iso.vectors([0])
    assert bool(torch.isfinite(v).all()) and float(v.norm()) == pytest.approx(1.0)


def test_g_ill_fast_floors_and_falls_back_like_g_ill() -> None:
    h, m = _h_and_factor(10, 6, 10.0, seed=9)
    k = 6
    floored = g_ill_fast(h, rank=k, delta_min=1e6, factor=m)
    ref = g_ill(h, rank=k, delta_min=1e6)
    assert floored.floored and ref.floored and float(floored.g.abs().max()) == 0.0
    assert floored.value == ref.value
    # a rank above the factor's rows cannot use the Gram: g_ill itself is used
    assert g_ill_fast(h, rank=7, factor=m).rank == g_ill(h, rank=7).rank
