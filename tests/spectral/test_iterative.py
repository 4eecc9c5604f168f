"""Certified iterative extreme spectra (spectral.iterative) against eigvalsh and set spectra, float64."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from immunekit.errors import ConfigError
from immunekit.spectral.iterative import SolverStats, check_solver, gram_extremes, lanczos_top

from ._util import SETTINGS, gen, orthogonal, seeds, sym_with_spectrum

F64 = torch.float64
EPS = torch.finfo(F64).eps


def _spectrum(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Descending positive spectra: spread, clustered at the top, clustered at the bottom, tiny tail."""
    u = torch.rand(n, generator=g, dtype=F64)
    if kind == "spread":
        w = torch.logspace(0, -3, n, dtype=F64) * (1 + 0.1 * u)
    elif kind == "top_cluster":
        w = torch.logspace(0, -2, n, dtype=F64)
        w[:4] = 1.0 + 1e-9 * u[:4]  # four eigenvalues within 1e-9 of each other
    elif kind == "bottom_cluster":
        w = torch.logspace(0, -4, n, dtype=F64)
        w[-3:] = 1e-4 * (1 + 1e-10 * u[-3:])
    else:  # tiny: smallest values 1e-14 .. 1e-12 relative (κ ≈ 1e14, far below eps·λ_max absolute)
        w = torch.logspace(0, -14, n, dtype=F64) * (1 + 0.2 * u)
    return w.sort(descending=True).values


KINDS = st.sampled_from(["spread", "top_cluster", "bottom_cluster", "tiny"])


@SETTINGS
@given(seed=seeds, n=st.integers(8, 60), kind=KINDS)
def test_lanczos_top_within_certified_bound_of_eigvalsh(seed: int, n: int, kind: str) -> None:
    g = gen(seed)
    a, _ = sym_with_spectrum(_spectrum(kind, n, g), g)
    ref = torch.linalg.eigvalsh(a).flip(0)
    res = lanczos_top(lambda x: a @ x, torch.randn(n, generator=g, dtype=F64), count=2, max_iters=n)
    assert res.certified  # n iterations always reach an invariant subspace
    slack = 8 * n * EPS * float(ref[0])  # eigvalsh's own backward error
    for pair, lam in zip(res.pairs, ref[:2], strict=True):
        # the certificate: some eigenvalue within the bound; the extreme one unless clustered
        assert float((ref - pair.value).abs().min()) <= pair.bound + slack
        if kind != "top_cluster":
            assert abs(pair.value - float(lam)) <= pair.bound + slack
        # the vector is an eigenvector to its residual
        assert float((a @ pair.vector - pair.value * pair.vector).norm()) <= pair.residual + slack


@SETTINGS
@given(seed=seeds, r=st.integers(6, 40), extra=st.integers(0, 30), kind=KINDS)
def test_gram_extremes_match_set_spectrum_including_tiny(seed: int, r: int, extra: int, kind: str) -> None:
    g = gen(seed)
    lam = _spectrum(kind, r, g)
    d = r + extra
    q = orthogonal(d, g)[:r]  # (r, d) orthonormal rows
    m = orthogonal(r, g) @ (lam.sqrt()[:, None] * q)  # a general (ungraded) M with σ(M)² = lam
    stats = SolverStats()
    e = gram_extremes(m, second=True, stats=stats, max_iters=r)
    s_ref = torch.linalg.svdvals(m) ** 2  # eps·σ_1 absolute on σ
    width = 2e-9 if kind == "top_cluster" else 0.0  # a Ritz value may sit on another cluster member
    assert abs(e.lam_max - float(s_ref[0])) <= (e.rel_bound + 64 * d * EPS + width) * e.lam_max
    assert abs(e.lam_second - float(s_ref[1])) <= (e.rel_bound + 64 * d * EPS + width) * e.lam_max
    # the smallest: relative accuracy is what the dense path (svdvals) cannot always give here, so
    # compare with svdvals at its own error level ~ d·eps·σ_1 on σ
    s_min_err = 2 * math.sqrt(float(s_ref[-1])) * 16 * d * EPS * math.sqrt(e.lam_max)
    width = 2e-10 if kind == "bottom_cluster" else 0.0
    assert abs(e.lam_min - float(s_ref[-1])) <= (e.rel_bound + width) * e.lam_min + s_min_err
    assert stats.calls == 1
    if not e.dense:
        assert e.rel_bound <= 1e-6
        v = e.h_vector(m, e.u_max)
        h = m.T @ m
        assert float((h @ v - e.lam_max * v).norm()) <= 1e-6 * e.lam_max


@SETTINGS
@given(seed=seeds, r=st.integers(6, 40), kind=KINDS)
def test_gram_extremes_tiny_values_relative_on_graded_factor(seed: int, r: int, kind: str) -> None:
    """M = diag(s)·Q (rows graded, as F·θ is): σ(M) = s to relative accuracy, far below eps·σ_1."""
    g = gen(seed)
    lam = _spectrum(kind, r, g)
    q = orthogonal(r + 5, g)[:r]
    m = lam.sqrt()[:, None] * q
    e = gram_extremes(m, second=True, max_iters=r)
    assert not e.dense
    top_w = 2e-9 if kind == "top_cluster" else 0.0  # cluster widths (relative)
    low_w = 2e-10 if kind == "bottom_cluster" else 0.0
    assert abs(e.lam_min / float(lam[-1]) - 1) <= e.rel_bound + low_w + 1e-12
    assert abs(e.lam_max / float(lam[0]) - 1) <= e.rel_bound + top_w + 1e-12
    assert abs(e.log_kappa - math.log(float(lam[0] / lam[-1]))) <= 2 * e.rel_bound + top_w + low_w + 1e-12


def test_iteration_cap_falls_back_to_dense_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    g = gen(0)
    lam = torch.logspace(0, -3, 50, dtype=F64)
    m = lam.sqrt()[:, None] * orthogonal(60, g)[:50]
    stats = SolverStats()
    with caplog.at_level(logging.WARNING, logger="immunekit.spectral.iterative"):
        e = gram_extremes(m, stats=stats, max_iters=3)
    assert e.dense and stats.fallbacks == 1 and "not certified" in stats.reasons[0]
    assert any("dense fall-back" in r.message for r in caplog.records)
    s = torch.linalg.svdvals(m) ** 2
    assert e.lam_max == float(s[0]) and e.lam_min == pytest.approx(float(s[-1]), rel=1e-12)


def test_singular_gram_falls_back() -> None:
    m = torch.zeros(5, 7, dtype=F64)
    m[:4, :4] = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64))
    stats = SolverStats()
    e = gram_extremes(m, stats=stats)
    assert e.dense and stats.fallbacks == 1
    assert e.lam_max == pytest.approx(16.0) and e.lam_min == pytest.approx(0.0, abs=1e-28)


def test_warm_start_needs_fewer_iterations() -> None:
    g = gen(3)
    lam = torch.logspace(0, -6, 200, dtype=F64)
    m = lam.sqrt()[:, None] * orthogonal(260, g)[:200]
    cold = gram_extremes(m)
    m2 = m + 1e-4 * lam.sqrt()[:, None] * torch.randn(200, 260, generator=g, dtype=F64)
    warm = gram_extremes(m2, start_max=cold.u_max, start_min=cold.u_min)
    again = gram_extremes(m2)
    assert not warm.dense and not again.dense
    assert warm.iterations < again.iterations
    assert warm.lam_min == pytest.approx(again.lam_min, rel=2e-6)


def test_unknown_solver_did_you_mean() -> None:
    with pytest.raises(ConfigError, match="did you mean 'lanczos'"):
        check_solver("lanzcos")
    assert check_solver("dense") == "dense"
