"""RIR (Eq. 15, spec §7.2) in log space, and the Definition 3.1 verdict thresholds."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from immunekit.metrics import METRICS, KappaPair, RIRResult, rir, verdict
from immunekit.spectral import condition_number, kappa_from_values
from immunekit.spectral.condition import KappaInfo

F64 = torch.float64


def _k(*values: float) -> KappaInfo:
    return kappa_from_values(torch.tensor(values, dtype=F64), rtol=0.0, dim=len(values))


def _pair(harm: tuple[float, ...], prim: tuple[float, ...]) -> KappaPair:
    return KappaPair(harmful=_k(*harm), primary=_k(*prim))


def test_rir_against_hand_computed_ratios() -> None:
    # reference κ_H = 10, κ_P = 4; immunized κ_H = 2000 (rank 3), κ_P = 2
    ref = _pair((10.0, 3.0, 1.0), (8.0, 2.0))
    imm = _pair((400.0, 1.0, 0.2), (6.0, 3.0))
    r = rir(ref, imm)
    i, ii = 2000.0 / 10.0, 2.0 / 4.0
    assert r.kappa_ratio_harmful == pytest.approx(i, rel=1e-13)
    assert r.kappa_ratio_primary == pytest.approx(ii, rel=1e-13)
    assert r.rir == pytest.approx(i / ii, rel=1e-13)
    assert r.log_rir == pytest.approx(math.log(i) - math.log(ii), rel=1e-13)
    assert r.kappa_harmful_reference == pytest.approx(10.0, rel=1e-15)
    assert r.kappa_harmful_immunized == pytest.approx(2000.0, rel=1e-15)
    assert r.kappa_primary_reference == pytest.approx(4.0, rel=1e-15)
    assert r.kappa_primary_immunized == pytest.approx(2.0, rel=1e-15)
    assert (r.rank_harmful_immunized, r.rank_primary_immunized) == (3, 2)


def test_rir_of_a_model_against_itself_is_exactly_one() -> None:
    p = _pair((7.0, 1.0), (3.0, 2.0))
    r = rir(p, p)
    assert (r.rir, r.log_rir, r.kappa_ratio_harmful, r.kappa_ratio_primary) == (1.0, 0.0, 1.0, 1.0)


def test_rir_is_computed_in_log_space_without_overflow() -> None:
    # κ values whose plain product/ratio chain overflows float64, but whose logs are fine
    ref = KappaPair(_k(1.0, 1e-300), _k(1.0, 1e-300))
    imm = KappaPair(_k(1e300, 1e-300), _k(1.0, 1e-300))
    r = rir(ref, imm)
    assert r.log_rir == pytest.approx(300 * math.log(10.0), rel=1e-12)
    assert math.isfinite(r.log_rir)


def test_rir_uses_pseudo_inverse_kappa_of_rank_deficient_hessians() -> None:
    h = torch.diag(torch.tensor([9.0, 3.0, 0.0], dtype=F64))
    ref = KappaPair(condition_number(h, hermitian=True), condition_number(h, hermitian=True))
    imm = KappaPair(
        condition_number(torch.diag(torch.tensor([9.0, 1.0, 0.0], dtype=F64)), hermitian=True),
        condition_number(h, hermitian=True),
    )
    assert rir(ref, imm).rir == pytest.approx(3.0, rel=1e-13)


positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, database=None)
@given(positive, positive, positive, positive, positive, positive, positive, positive)
def test_log_rir_identities(
    a1: float, a2: float, b1: float, b2: float, c1: float, c2: float, d1: float, d2: float
) -> None:
    ref = KappaPair(_k(a1, a2), _k(b1, b2))
    imm = KappaPair(_k(c1, c2), _k(d1, d2))
    r = rir(ref, imm)
    log_i = imm.harmful.log_kappa - ref.harmful.log_kappa
    log_ii = imm.primary.log_kappa - ref.primary.log_kappa
    assert r.log_rir == pytest.approx(log_i - log_ii, abs=1e-12)
    assert math.log(r.kappa_ratio_harmful) == pytest.approx(log_i, abs=1e-12)
    assert math.log(r.kappa_ratio_primary) == pytest.approx(log_ii, abs=1e-12)
    assert math.log(r.rir) == pytest.approx(r.log_rir, abs=1e-12)
    # swapping the roles of reference and immunized negates log RIR
    assert rir(imm, ref).log_rir == pytest.approx(-r.log_rir, abs=1e-12)
    # swapping the harmful and primary κ also negates it
    swapped = rir(KappaPair(ref.primary, ref.harmful), KappaPair(imm.primary, imm.harmful))
    assert swapped.log_rir == pytest.approx(-r.log_rir, abs=1e-12)


def test_rir_is_registered_as_higher_is_better() -> None:
    assert METRICS.get("rir") is rir
    assert METRICS.meta("rir")["direction"] == "higher"


# ---------------------------------------------------------------------------------------------
# Verdict (Definition 3.1)
# ---------------------------------------------------------------------------------------------


def _result(ratio_harmful: float, ratio_primary: float) -> RIRResult:
    return RIRResult(
        rir=ratio_harmful / ratio_primary,
        log_rir=math.log(ratio_harmful) - math.log(ratio_primary),
        kappa_ratio_harmful=ratio_harmful,
        kappa_ratio_primary=ratio_primary,
        kappa_harmful_reference=1.0,
        kappa_harmful_immunized=ratio_harmful,
        kappa_primary_reference=1.0,
        kappa_primary_immunized=ratio_primary,
        rank_harmful_immunized=2,
        rank_primary_immunized=2,
    )


def _verdict(ratio_harmful: float, ratio_primary: float, loss: float = 1.0, **kw: float):
    return verdict(
        _result(ratio_harmful, ratio_primary), primary_loss_reference=1.0, primary_loss_immunized=loss, **kw
    )


def test_verdict_a_holds_from_the_threshold_on() -> None:
    assert _verdict(10.0, 0.5).a
    assert not _verdict(math.nextafter(10.0, 0.0), 0.5).a
    assert _verdict(1e9, 0.5).a


def test_verdict_b_holds_up_to_the_threshold() -> None:
    assert _verdict(20.0, 1.0).b
    assert not _verdict(20.0, math.nextafter(1.0, 2.0)).b
    assert _verdict(20.0, 1e-9).b


def test_verdict_c_relative_loss_tolerance_edges() -> None:
    edge = (1 + 0.01) * 1.0
    assert _verdict(20.0, 0.5, loss=edge).c
    assert not _verdict(20.0, 0.5, loss=math.nextafter(edge, 2.0)).c
    assert _verdict(20.0, 0.5, loss=0.0).c


def test_verdict_immunized_needs_all_three() -> None:
    assert _verdict(10.0, 1.0, loss=1.01).immunized
    for args in ((9.0, 1.0, 1.0), (10.0, 1.5, 1.0), (10.0, 1.0, 1.5)):
        v = _verdict(*args)
        assert not v.immunized
        assert [v.a, v.b, v.c].count(False) == 1


def test_verdict_custom_thresholds_are_used_and_recorded() -> None:
    v = _verdict(
        3.0, 1.2, loss=1.1, min_ratio_harmful=3.0, max_ratio_primary=1.2, max_relative_loss_increase=0.1
    )
    assert (v.a, v.b, v.c, v.immunized) == (True, True, True, True)
    d = v.to_dict()
    assert d["threshold_a_min_ratio_harmful"] == 3.0
    assert d["threshold_b_max_ratio_primary"] == 1.2
    assert d["threshold_c_max_relative_loss_increase"] == 0.1
    assert d["primary_loss_reference"] == 1.0
    assert d["primary_loss_immunized"] == 1.1
    assert set(d) == {f.name for f in dataclasses.fields(v)}


def test_verdict_defaults_are_the_documented_ones() -> None:
    v = _verdict(10.0, 1.0)
    assert v.threshold_a_min_ratio_harmful == 10.0
    assert v.threshold_b_max_ratio_primary == 1.0
    assert v.threshold_c_max_relative_loss_increase == 0.01


# ------------------------------------------------------------------------ sensitivity band


def test_band_ratios_by_hand_with_the_rank_recut_on_k() -> None:
    from immunekit.errors import ConfigError
    from immunekit.metrics.rir import rir_band
    from immunekit.spectral import FactorSpectrum, band_multipliers

    # X_H = diag(1, 0.1, 1e-11, 1e-13): at rtol 1e-14 / 1e-12 / 1e-10 rank K_H is 4 / 3 / 2
    x_h = torch.diag(torch.tensor([1.0, 0.1, 1e-11, 1e-13], dtype=F64))
    x_p = torch.diag(torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=F64))  # full rank at every cut
    theta = torch.diag(torch.tensor([1.0, 1.0, 10.0, 100.0], dtype=F64))
    mults = band_multipliers(100.0)
    spec_h, spec_p = FactorSpectrum.of(x_h, rtol=1e-12), FactorSpectrum.of(x_p, rtol=1e-12)
    refs = [KappaPair(spec_h.scaled(m).kappa(), spec_p.scaled(m).kappa()) for m in mults]
    imms = [KappaPair(spec_h.scaled(m).kappa(theta), spec_p.scaled(m).kappa(theta)) for m in mults]
    band = rir_band(refs, imms, mults)
    # F_Hθ has singular values 1, 0.1, 1e-10, 1e-11; κ at the fixed rank over κ(K_H) at the same cut
    # rank 4: κ(H) = (1/1e-11)², κ(K) = (1/1e-13)²; rank 3: (1/1e-10)² over (1/1e-11)²; rank 2: 1
    i_want = [(1 / 1e-11) ** 2 / (1 / 1e-13) ** 2, (1 / 1e-10) ** 2 / (1 / 1e-11) ** 2, 1.0]
    ii_want = (12.5 / 0.5) ** 2 / 8.0**2  # F_Pθ: 1, 0.5, 2.5, 12.5
    got_i = [r.kappa_ratio_harmful for r in band.results]
    assert got_i == pytest.approx([1e-4, 1e-2, 1.0], rel=1e-9)
    assert got_i == pytest.approx(i_want, rel=1e-9)
    assert [r.kappa_ratio_primary for r in band.results] == pytest.approx([ii_want] * 3, rel=1e-12)
    assert [r.rir for r in band.results] == pytest.approx([g / ii_want for g in got_i], rel=1e-9)
    assert band.spread == pytest.approx(1e4, rel=1e-9) and band.threshold_sensitive
    flat = band.to_metrics()
    assert flat["kappa_ratio_harmful_band_low"] == pytest.approx(1e-4, rel=1e-9)
    assert flat["kappa_ratio_harmful_band_high"] == pytest.approx(1.0, rel=1e-9)
    assert flat["rir_band_high"] == pytest.approx(1.0 / ii_want, rel=1e-9)
    assert flat["log_rir_band_low"] == pytest.approx(math.log(1e-4 / ii_want), rel=1e-9)
    assert flat["threshold_sensitive"] == 1.0
    # an insensitive band: the same κ at every cut
    same = rir_band(refs[1:2] * 3, imms[1:2] * 3, mults)
    assert (
        same.spread == 1.0
        and not same.threshold_sensitive
        and same.to_metrics()["threshold_sensitive"] == 0.0
    )
    # just at and just above the 2× flag
    two = [_pair((2.0, 1.0), (1.0, 1.0)), _pair((4.0, 1.0), (1.0, 1.0))]
    ref2 = [_pair((1.0, 1.0), (1.0, 1.0))] * 2
    assert not rir_band(ref2, two, (1.0, 10.0)).threshold_sensitive  # spread exactly 2
    two[1] = _pair((4.0 * (1 + 1e-9), 1.0), (1.0, 1.0))
    assert rir_band(ref2, two, (1.0, 10.0)).threshold_sensitive
    with pytest.raises(ConfigError, match="one reference and one immunized"):
        rir_band(refs, imms[:2], mults)
    with pytest.raises(ConfigError, match="ascending"):
        rir_band(refs, imms, (100.0, 1.0, 0.01))
    with pytest.raises(ConfigError, match="> 1"):
        rir_band(refs, imms, mults, factor=1.0)
