"""RIR_θ0 by groups (methods/condition_number.md §7.3): closed forms, mean of ratios, band, errors.

Features Φ = Q diag(a) with Q ``(n, D)`` orthonormal columns have singular values a, so
κ(ΦᵀΦ) = (max a / min a)² exactly; scaling the columns by a known diagonal d gives the immunized
features Q diag(a∘d), whose κ ratio to the reference is known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from immunekit.errors import DataError
from immunekit.metrics.rir_groups import GroupStat, rir_by_groups

F64 = torch.float64


def _orthonormal(n: int, d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    return q


def _kappa(a: list[float]) -> float:
    return (max(a) / min(a)) ** 2


def _features(q: Tensor, a: list[float]) -> Tensor:
    return q * torch.tensor(a, dtype=F64)


def test_per_group_ratios_match_the_closed_form_for_diagonal_scalings() -> None:
    n, d, groups = 30, 4, 3
    a_h = [[2.0, 1.5, 1.0, 0.5], [3.0, 1.0, 1.0, 1.0], [1.0, 0.9, 0.8, 0.7]]
    a_p = [[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 2.0]]
    d_h = [[4.0, 1.0, 1.0, 0.25], [1.0, 1.0, 1.0, 0.1], [2.0, 1.0, 1.0, 1.0]]  # κ grows
    d_p = [[1.0, 1.0, 0.5, 0.5], [0.5, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]  # κ shrinks or stays
    h0, hi, p0, pi = [], [], [], []
    want_i, want_ii = [], []
    for g in range(groups):
        qh, qp = _orthonormal(n, d, 2 * g), _orthonormal(n, d, 2 * g + 1)
        ih = [x * y for x, y in zip(a_h[g], d_h[g], strict=True)]
        ip = [x * y for x, y in zip(a_p[g], d_p[g], strict=True)]
        h0.append(_features(qh, a_h[g]))
        hi.append(_features(qh, ih))
        p0.append(_features(qp, a_p[g]))
        pi.append(_features(qp, ip))
        want_i.append(_kappa(ih) / _kappa(a_h[g]))
        want_ii.append(_kappa(ip) / _kappa(a_p[g]))
    res = rir_by_groups(h0, hi, p0, pi)
    want_rir = [i / ii for i, ii in zip(want_i, want_ii, strict=True)]
    for got, want in (
        (res.kappa_ratio_harmful.values, want_i),
        (res.kappa_ratio_primary.values, want_ii),
        (res.rir.values, want_rir),
    ):
        assert len(got) == groups
        for x, y in zip(got, want, strict=True):
            assert x == pytest.approx(y, rel=1e-10)
    assert res.rir.mean == pytest.approx(sum(want_rir) / groups, rel=1e-10)
    assert res.kappa_ratio_harmful.mean == pytest.approx(sum(want_i) / groups, rel=1e-10)
    assert res.log_rir.mean == pytest.approx(sum(math.log(r) for r in want_rir) / groups, rel=1e-10)
    # Exact diagonal spectra: no value sits near the cut, so the band does not move anything.
    assert res.band_spread == pytest.approx(1.0, abs=1e-10)
    assert not res.threshold_sensitive
    assert res.multipliers == (0.01, 1.0, 100.0)
    assert all(g.rank_harmful_immunized == d for g in res.groups)


def test_reported_rir_is_the_mean_of_ratios_not_the_ratio_of_means() -> None:
    # Group 1: (i) = 4, (ii) = 1 → RIR 4; group 2: (i) = 1, (ii) = 4 → RIR 1/4.
    # mean RIR = 2.125, while mean(i)/mean(ii) = 2.5/2.5 = 1.
    q = _orthonormal(10, 2, 0)
    base = _features(q, [1.0, 1.0])
    wide = _features(q, [2.0, 1.0])  # κ 4
    res = rir_by_groups([base, base], [wide, base], [base, base], [base, wide])
    assert res.rir.mean == pytest.approx(2.125, rel=1e-12)
    assert res.ratio_of_means == pytest.approx(1.0, rel=1e-12)
    assert res.rir.mean != pytest.approx(res.ratio_of_means)
    assert res.rir.std == pytest.approx(math.sqrt(((4 - 2.125) ** 2 + (0.25 - 2.125) ** 2) / 1), rel=1e-12)
    assert (res.rir.min, res.rir.max) == (pytest.approx(0.25), pytest.approx(4.0))
    metrics = res.to_metrics()
    assert metrics["rir_mean"] == pytest.approx(2.125) and metrics["ratio_of_means"] == pytest.approx(1.0)


def test_a_value_near_the_cut_is_flagged_threshold_sensitive() -> None:
    # s_3/s_1 = 1e-11 with rtol = 1e-12: kept at rtol and rtol/100, dropped at rtol·100, so the
    # harmful ratio moves from 1e22/4 to 1/4 across the band. (The SVD resolves 1e-11 to about
    # eps/1e-11 ≈ 2e-5 relative, hence the looser tolerance on the huge κ.)
    q = _orthonormal(10, 3, 1)
    ref = _features(q, [1.0, 1.0, 0.5])
    imm = _features(q, [1.0, 1.0, 1e-11])
    res = rir_by_groups([ref], [imm], [ref], [ref], rtol=1e-12)
    assert res.groups[0].rank_harmful_immunized == 3
    assert res.kappa_ratio_harmful.mean == pytest.approx(1e22 / 4, rel=1e-3)
    assert res.band_means[0]["kappa_ratio_harmful"] == pytest.approx(1e22 / 4, rel=1e-3)
    assert res.band_means[-1]["kappa_ratio_harmful"] == pytest.approx(1.0 / 4, rel=1e-10)
    assert res.threshold_sensitive and res.band_spread > 1e20
    assert res.group_band_spread_max == pytest.approx(res.band_spread, rel=1e-12)


def test_group_stat_of_one_value_has_zero_spread() -> None:
    s = GroupStat.of([3.0])
    assert (s.mean, s.std, s.min, s.max, s.values) == (3.0, 0.0, 3.0, 3.0, (3.0,))


def test_mismatched_groups_are_clear_errors() -> None:
    q = _orthonormal(8, 2, 0)
    f = _features(q, [2.0, 1.0])
    with pytest.raises(DataError, match="same groups"):
        rir_by_groups([f, f], [f], [f], [f])
    with pytest.raises(DataError, match="same number of groups"):
        rir_by_groups([f], [f], [f, f], [f, f])
    with pytest.raises(DataError, match="same samples"):
        rir_by_groups([f], [f[:5]], [f], [f])
    with pytest.raises(DataError, match="2-D"):
        rir_by_groups([f.reshape(-1)], [f.reshape(-1)], [f], [f])
    with pytest.raises(DataError, match="no groups"):
        rir_by_groups([], [], [], [])
