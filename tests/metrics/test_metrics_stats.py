"""Statistics over seeds: closed forms, bootstrap known answers, coverage, determinism, errors."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest

from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.metrics.stats import PairedSummary, Summary, paired_difference, summarise


def test_mean_and_sample_std_are_exact_in_float64() -> None:
    s = summarise([1.0, 2.0, 3.0, 4.0], n_boot=100)
    assert s.n == 4
    assert s.mean == 2.5
    assert s.std == math.sqrt(5.0 / 3.0)  # ddof = 1: Σ(x − x̄)² = 5 over n − 1 = 3


def test_mean_and_std_match_exact_rational_arithmetic_on_awkward_values() -> None:
    # Large offset + small spread: naive one-pass formulas lose every digit here.
    x = (1e9 + np.random.default_rng(0).normal(size=37)).tolist()
    s = summarise(x, n_boot=100)
    assert s.mean == statistics.fmean(x)
    assert s.std == pytest.approx(statistics.stdev(x), rel=4e-16)


def test_constant_values_give_zero_std_and_a_point_interval() -> None:
    for method in ("percentile", "bca"):
        s = summarise([0.25] * 5, n_boot=200, method=method)
        assert (s.mean, s.std, s.ci_low, s.ci_high) == (0.25, 0.0, 0.25, 0.25)


def test_summary_records_its_settings_and_serialises_to_json() -> None:
    s = summarise([0.1, 0.4, 0.3], confidence=0.9, n_boot=500, seed=7, method="bca")
    assert isinstance(s, Summary)
    d = s.to_dict()
    assert d == json.loads(json.dumps(d))
    assert set(d) == {"n", "mean", "std", "ci_low", "ci_high", "confidence", "n_boot", "method", "seed"}
    assert (d["confidence"], d["n_boot"], d["method"], d["seed"]) == (0.9, 500, "bca", 7)
    with pytest.raises(AttributeError):
        s.mean = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_large_n_interval_approaches_the_normal_interval(method: str) -> None:
    # For n = 1000 the bootstrap distribution of the mean is ≈ N(x̄, s²(n−1)/n²): the interval
    # must be x̄ ± 1.96·s/√n up to the Monte-Carlo error of the ends (sd ≈ 0.9 % of the
    # half-width at B = 20 000, ≈ 1.4 % for BCa, which also estimates z₀) and the O(1/n)
    # plug-in factor.
    n = 1000
    x = np.random.default_rng(1).normal(3.0, 2.0, size=n)
    s = summarise(x, n_boot=20_000, seed=2, method=method)
    half = NormalDist().inv_cdf(0.975) * s.std / math.sqrt(n)
    assert s.ci_low == pytest.approx(s.mean - half, abs=0.05 * half)
    assert s.ci_high == pytest.approx(s.mean + half, abs=0.05 * half)


def _misses(method: str, draw: Callable[[np.random.Generator], np.ndarray], reps: int) -> tuple[int, int]:
    """(intervals entirely below 0, entirely above 0) over simulated samples with true mean 0."""
    rng, low, high = np.random.default_rng(3), 0, 0
    for rep in range(reps):
        s = summarise(draw(rng), n_boot=1000, seed=rep, method=method)
        low, high = low + (s.ci_high < 0.0), high + (s.ci_low > 0.0)
    return low, high


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_coverage_on_normal_data_is_near_nominal(method: str) -> None:
    # 800 simulated samples of n = 50: the binomial sd of the coverage is ≈ 0.008. The
    # percentile interval is expected slightly below 95 % (≈ 94 %: it lacks the t-widening).
    reps = 800
    coverage = 1.0 - sum(_misses(method, lambda rng: rng.normal(size=50), reps)) / reps
    sd = math.sqrt(0.95 * 0.05 / reps)
    assert 0.94 - 4 * sd <= coverage <= 0.95 + 4 * sd


def test_bca_corrects_the_one_sided_misses_of_percentile_on_skewed_data() -> None:
    # Centred exponential (skewness 2), n = 30, the same 800 samples for both methods: the
    # percentile interval sits too low far more often than too high (measured 57 vs 16);
    # BCa shifts it up (40 vs 27) and covers at least as often.
    def draw(rng: np.random.Generator) -> np.ndarray:
        return rng.exponential(size=30) - 1.0

    pct_low, pct_high = _misses("percentile", draw, 800)
    bca_low, bca_high = _misses("bca", draw, 800)
    assert pct_low > 3 * pct_high
    assert bca_low <= 0.8 * pct_low
    assert bca_low - bca_high < pct_low - pct_high
    assert bca_low + bca_high <= pct_low + pct_high


def test_same_seed_same_interval_and_no_global_rng_use() -> None:
    x = [0.61, 0.72, 0.55, 0.69, 0.64]
    before = np.random.get_state()
    a = summarise(x, seed=11)
    after = np.random.get_state()  # the global generator is not touched
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]
    np.random.random(5)  # nor read: advancing it changes nothing
    assert summarise(x, seed=11) == a
    assert summarise(x, seed=12) != a
    assert summarise(x, seed=11, method="bca") == summarise(x, seed=11, method="bca")


def test_paired_difference_of_a_constant_shift_is_exact() -> None:
    undefended = [0.25, 1.5, -3.0, 8.0, 0.75]  # large between-seed spread
    defended = [u + 0.5 for u in undefended]  # dyadic: the differences are exactly 0.5
    p = paired_difference(defended, undefended, n_boot=1000)
    assert isinstance(p, PairedSummary)
    assert (p.mean, p.std, p.ci_low, p.ci_high, p.frac_positive) == (0.5, 0.0, 0.5, 0.5, 1.0)
    assert paired_difference(undefended, defended, n_boot=1000).frac_positive == 0.0


def test_pairing_detects_a_small_shift_that_unpaired_intervals_miss() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(0.0, 1.0, size=8)  # seed effect shared by both runs
    undefended = base + rng.normal(0.0, 0.01, size=8)
    defended = base + 0.1 + rng.normal(0.0, 0.01, size=8)
    p = paired_difference(defended, undefended, seed=1)
    assert p.ci_low > 0.05 and p.ci_high < 0.15
    assert p.frac_positive == 1.0
    d, u = summarise(defended, seed=1), summarise(undefended, seed=1)
    assert d.ci_low < u.ci_high  # unpaired intervals overlap
    assert p.to_dict()["frac_positive"] == 1.0
    assert summarise(np.subtract(defended, undefended), seed=1).ci_low == p.ci_low


def test_frac_positive_is_about_one_half_with_no_effect() -> None:
    x = np.random.default_rng(6).normal(size=30)
    p = paired_difference(x - x.mean(), np.zeros(30), seed=0)  # d̄ = 0 up to rounding
    assert 0.45 < p.frac_positive < 0.55


def test_fewer_than_three_values_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="immunekit.metrics.stats"):
        summarise([1.0, 2.0, 3.0], n_boot=100)
        assert not caplog.records
        summarise([1.0, 2.0], n_boot=100)
        paired_difference([1.0, 2.0], [0.0, 0.5], n_boot=100)
    assert len(caplog.records) == 2
    assert "only 2 seeds" in caplog.records[0].getMessage()


@pytest.mark.parametrize("values", [[], [1.0], np.array(2.0)])
def test_fewer_than_two_values_raise(values: object) -> None:
    with pytest.raises(DataError, match=r"need >= 2|one-dimensional"):
        summarise(values)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_raise_and_name_the_position(bad: float) -> None:
    with pytest.raises(DataError, match=r"values\[2\] = .* is not finite.*failed seeds"):
        summarise([1.0, 2.0, bad, 3.0])
    with pytest.raises(DataError, match=r"undefended\[0\]"):
        paired_difference([1.0, 2.0], [bad, 1.0])


def test_two_dimensional_values_raise() -> None:
    with pytest.raises(DataError, match=r"one-dimensional.*\(2, 2\)"):
        summarise([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 95.0, float("nan")])
def test_confidence_outside_open_unit_interval_raises(confidence: float) -> None:
    with pytest.raises(ConfigError, match=r"confidence must be in \(0, 1\).*0.95"):
        summarise([1.0, 2.0, 3.0], confidence=confidence)


@pytest.mark.parametrize("n_boot", [0, 99, -1, 1000.0, True])
def test_too_few_or_non_integer_resamples_raise(n_boot: object) -> None:
    with pytest.raises(ConfigError, match=r"n_boot must be an integer >= 100"):
        summarise([1.0, 2.0, 3.0], n_boot=n_boot)  # type: ignore[arg-type]


def test_unknown_method_raises() -> None:
    with pytest.raises(
        ConfigError, match=r"method must be one of \['percentile', 'bca'\], got 'studentized'"
    ):
        summarise([1.0, 2.0, 3.0], method="studentized")  # type: ignore[arg-type]


def test_paired_length_mismatch_raises() -> None:
    with pytest.raises(DataError, match=r"got 3 and 2 values; pass the same seeds"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_bca_with_an_extreme_outlier_refuses_instead_of_returning_nonsense() -> None:
    # One outlier among zeros gives the largest acceleration the mean allows (a → 1/6); at an
    # extreme confidence 1 − a(z₀ + z) < 0 and the BCa level map is no longer monotone.
    x, confidence = [0.0] * 40 + [1.0], 1.0 - 1e-10
    with pytest.raises(NumericalError, match="use method='percentile'"):
        summarise(x, confidence=confidence, method="bca")
    assert summarise(x, confidence=confidence).ci_high > 0.0
