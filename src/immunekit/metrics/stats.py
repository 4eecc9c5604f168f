"""Statistics over seeds: mean, sample std and a bootstrap confidence interval of the mean.

Every figure the toolkit reports over seeds is a :class:`Summary`; a defended-vs-undefended gap
is a :class:`PairedSummary` of the per-seed differences (seed ``i`` of the defended run is paired
with seed ``i`` of the undefended run, so the between-seed variation common to both cancels).

Two bootstrap intervals are offered; both resample the values with replacement ``n_boot`` times
and take quantiles of the resampled means θ*_1, …, θ*_B:

* ``"percentile"`` (the default): [q_{α/2}, q_{1−α/2}] of the θ*_b, with α = 1 − confidence.
  Simple and transformation-respecting; first-order accurate.
* ``"bca"`` (bias-corrected and accelerated, Efron 1987): the same quantiles taken at adjusted
  levels, which corrects for median bias and skewness; second-order accurate and the better
  choice for skewed metrics (e.g. steps-to-threshold) when there are ≳ 10 seeds.

With very few seeds no bootstrap interval is trustworthy: for normal data the percentile interval
is ≈ x̄ ± z·s·√((n−1)/n)/√n, which ignores the Student-t widening, so at n = 3 it covers the true
mean only ≈ 75 % of the time (≈ 84 % at n = 5, ≈ 93 % at n = 20; BCa is no better there; measured
over 2 000 simulated normal samples). The interval is still the recorded convention (method and n
are stored with it); read it as descriptive at small n.

References:
    B. Efron, "Better bootstrap confidence intervals", JASA 82(397), 1987.
    B. Efron and R. Tibshirani, *An Introduction to the Bootstrap*, ch. 13-14, 1993.

"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from immunekit.errors import ConfigError, DataError, NumericalError

logger = logging.getLogger(__name__)

Method = Literal["percentile", "bca"]
METHODS: tuple[str, ...] = ("percentile", "bca")
MIN_N_BOOT = 100
RECOMMENDED_MIN_N = 3  # issue 4: every figure over >= 3 seeds
_BLOCK_ELEMENTS = 1 << 18

_STD_NORMAL = NormalDist()


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Mean, sample standard deviation and bootstrap confidence interval of values over seeds.

    Attributes:
        n: number of values (seeds).
        mean: arithmetic mean x̄ = (1/n) Σ x_i.
        std: **sample** standard deviation s = √(Σ (x_i − x̄)² / (n − 1)) (ddof = 1).
        ci_low: lower end of the bootstrap confidence interval of the mean.
        ci_high: upper end of the bootstrap confidence interval of the mean.
        confidence: nominal coverage of the interval, e.g. 0.95.
        n_boot: number of bootstrap resamples B.
        method: ``"percentile"`` or ``"bca"``.
        seed: seed of the local random generator that drew the resamples.

    """

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    confidence: float
    n_boot: int
    method: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class PairedSummary(Summary):
    """:class:`Summary` of per-seed differences d_i = defended_i − undefended_i.

    Attributes:
        frac_positive: fraction of bootstrap means of d that are > 0, (1/B) Σ_b [θ*_b > 0].
            A bootstrap measure of how consistently the defended value is higher; it is not a
            p-value.

    """

    frac_positive: float


def summarise(
    values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    method: Method = "percentile",
) -> Summary:
    """Mean, sample std (ddof = 1) and a bootstrap confidence interval of the mean.

    x̄ = (1/n) Σ x_i and s = √(Σ (x_i − x̄)² / (n − 1)) are computed in float64 with exactly
    rounded sums (``math.fsum``). The interval resamples the n values with replacement B = n_boot
    times from ``numpy.random.default_rng(seed)`` (a local generator: global RNG state is neither
    read nor changed) and is the percentile or BCa interval of the resampled means (see the
    module docstring). A warning is logged when n < 3.

    Args:
        values: the per-seed values, shape ``(n,)``, n ≥ 2, all finite.
        confidence: nominal coverage 1 − α in (0, 1).
        n_boot: number of bootstrap resamples B ≥ 100 (10 000 keeps the Monte-Carlo sd of the
            interval ends near 1 % of its half-width).
        seed: seed of the local generator; the same seed gives the same interval.
        method: ``"percentile"`` (default) or ``"bca"``.

    Returns:
        A frozen :class:`Summary`.

    Raises:
        DataError: fewer than 2 values, values not one-dimensional, or NaN/Inf values.
        ConfigError: ``confidence``, ``n_boot`` or ``method`` out of range.
        NumericalError: BCa is undefined for this sample (use ``method="percentile"``).

    Example:
        >>> s = summarise([1.0, 2.0, 3.0, 4.0], n_boot=1000)
        >>> s.mean, round(s.std, 6), s.ci_low <= s.mean <= s.ci_high
        (2.5, 1.290994, True)

    """
    x = _as_values(values, "values")
    means = _check_and_resample(x, confidence=confidence, n_boot=n_boot, seed=seed, method=method)
    return Summary(
        **_summary_fields(x, means, confidence=confidence, n_boot=n_boot, seed=seed, method=method)
    )


def paired_difference(
    defended: ArrayLike,
    undefended: ArrayLike,
    *,
    confidence: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
    method: Method = "percentile",
) -> PairedSummary:
    """Summary of the paired differences d_i = defended_i − undefended_i over seeds.

    Values are paired by position, so ``defended[i]`` and ``undefended[i]`` must come from the
    same seed. Pairing removes the between-seed variance the two runs share:
    Var(d̄) = (σ²_D + σ²_U − 2 Cov(D, U)) / n, often far below the unpaired σ²_D/n + σ²_U/n.
    The interval is that of :func:`summarise` applied to d, and ``frac_positive`` is the
    fraction of the same bootstrap means of d that are > 0.

    Args:
        defended: per-seed values of the defended model, shape ``(n,)``.
        undefended: per-seed values of the undefended model, shape ``(n,)``, same seed order.
        confidence: nominal coverage 1 − α in (0, 1).
        n_boot: number of bootstrap resamples B ≥ 100.
        seed: seed of the local generator.
        method: ``"percentile"`` (default) or ``"bca"``.

    Returns:
        A frozen :class:`PairedSummary` of d.

    Raises:
        DataError: the two inputs differ in length, or either fails the checks of
            :func:`summarise`.
        ConfigError: ``confidence``, ``n_boot`` or ``method`` out of range.
        NumericalError: BCa is undefined for this sample (use ``method="percentile"``).

    Example:
        >>> p = paired_difference([3.0, 5.0, 4.0], [1.0, 3.0, 2.0], n_boot=1000)
        >>> p.mean, p.std, p.ci_low, p.ci_high, p.frac_positive
        (2.0, 0.0, 2.0, 2.0, 1.0)

    """
    d_def = _as_values(defended, "defended")
    d_und = _as_values(undefended, "undefended")
    if d_def.shape != d_und.shape:
        raise DataError(
            f"defended and undefended must have one value per seed in the same order, got "
            f"{d_def.size} and {d_und.size} values; pass the same seeds to both runs"
        )
    d = d_def - d_und
    means = _check_and_resample(d, confidence=confidence, n_boot=n_boot, seed=seed, method=method)
    fields = _summary_fields(d, means, confidence=confidence, n_boot=n_boot, seed=seed, method=method)
    return PairedSummary(**fields, frac_positive=float(np.count_nonzero(means > 0) / means.size))


def _as_values(values: ArrayLike, name: str) -> NDArray[np.float64]:
    """Validate and convert to a 1-D finite float64 array of length ≥ 2."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(
            f"{name} must be one-dimensional (one value per seed), got shape {x.shape}; "
            "pass a flat list such as [0.71, 0.69, 0.73]"
        )
    if x.size < 2:
        raise DataError(
            f"{name} has {x.size} value(s), need >= 2 for a std and a bootstrap interval "
            f"(>= {RECOMMENDED_MIN_N} recommended); run more seeds"
        )
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise DataError(
            f"{name}[{bad[0]}] = {x[bad[0]]} is not finite ({bad.size} non-finite value(s)); "
            "drop or fix the failed seeds before summarising"
        )
    return x


def _check_and_resample(
    x: NDArray[np.float64], *, confidence: float, n_boot: int, seed: int, method: str
) -> NDArray[np.float64]:
    """Validate the options, warn on small n, and return the B bootstrap means of x."""
    _check_options(confidence=confidence, n_boot=n_boot, method=method)
    if x.size < RECOMMENDED_MIN_N:
        logger.warning(
            "bootstrap interval over only %d seeds: the issue asks for >= %d, and with so few "
            "values the interval is far too narrow; run more seeds",
            x.size,
            RECOMMENDED_MIN_N,
        )
    return _bootstrap_means(x, n_boot=n_boot, rng=np.random.default_rng(seed))


def _check_options(*, confidence: float, n_boot: int, method: str) -> None:
    # `not 0 < c < 1` is also true for NaN, which must be rejected too.
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}; e.g. confidence=0.95")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < MIN_N_BOOT:
        raise ConfigError(
            f"n_boot must be an integer >= {MIN_N_BOOT}, got {n_boot!r}; "
            "10_000 resamples keep the Monte-Carlo sd of the interval ends near 1 % of its half-width"
        )
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")


def _bootstrap_means(x: NDArray[np.float64], *, n_boot: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """Means θ*_b of B resamples of x with replacement, drawn as (rows, n) index blocks.

    Blocks of ~2¹⁸ indices stay in cache (about twice as fast as one (B, n) array at B = 10⁴,
    n = 100) and bound memory for large n; the generator is consumed in row order, so the
    result does not depend on the block size.
    """
    n = x.size
    rows = max(1, _BLOCK_ELEMENTS // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def _summary_fields(
    x: NDArray[np.float64],
    means: NDArray[np.float64],
    *,
    confidence: float,
    n_boot: int,
    seed: int,
    method: str,
) -> dict[str, Any]:
    n = int(x.size)
    mean = math.fsum(x.tolist()) / n
    # Two-pass with exactly rounded sums: exact up to the final division and sqrt.
    std = math.sqrt(math.fsum(((x - mean) ** 2).tolist()) / (n - 1))
    if method == "bca":
        lo, hi = _bca_interval(x, means, mean, confidence)
    else:
        alpha = 1.0 - confidence
        lo, hi = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "confidence": float(confidence),
        "n_boot": int(n_boot),
        "method": method,
        "seed": int(seed),
    }


def _bca_interval(
    x: NDArray[np.float64], means: NDArray[np.float64], mean: float, confidence: float
) -> tuple[float, float]:
    """BCa interval of the mean (Efron 1987).

    Bias correction z₀ = Φ⁻¹(p̂), with p̂ = (#{θ*_b < θ̂} + ½ #{θ*_b = θ̂}) / B (ties split so
    that discrete data are not biased one way). Acceleration from the jackknife: with
    θ̂_(i) the mean without x_i and d_i = θ̂_(·) − θ̂_(i),
    a = Σ d_i³ / (6 (Σ d_i²)^{3/2}); for the mean d_i = (x_i − x̄)/(n − 1), so
    a = Σ (x_i − x̄)³ / (6 (Σ (x_i − x̄)²)^{3/2}). The ends are the quantiles of θ* at
    α_j = Φ(z₀ + (z₀ + z_j) / (1 − a (z₀ + z_j))) for z_j = Φ⁻¹(α/2), Φ⁻¹(1 − α/2).
    """
    B = means.size
    p_below = (np.count_nonzero(means < mean) + 0.5 * np.count_nonzero(means == mean)) / B
    if not 0.0 < p_below < 1.0:
        raise NumericalError(
            f"BCa bias correction is infinite: {p_below:.0%} of the bootstrap means lie below the "
            "sample mean; use method='percentile'"
        )
    z0 = _STD_NORMAL.inv_cdf(p_below)
    dev = x - mean
    ss = math.fsum((dev**2).tolist())
    # Constant data: every resample equals the mean, the interval is the point whatever a is.
    a = 0.0 if ss == 0.0 else math.fsum((dev**3).tolist()) / (6.0 * ss**1.5)
    alpha = 1.0 - confidence
    levels = []
    for z in (_STD_NORMAL.inv_cdf(alpha / 2), _STD_NORMAL.inv_cdf(1.0 - alpha / 2)):
        denom = 1.0 - a * (z0 + z)
        if denom <= 0.0:
            raise NumericalError(
                f"BCa acceleration a = {a:.3g} is too large for confidence {confidence} "
                "(the adjusted level is not monotone); use method='percentile'"
            )
        levels.append(_STD_NORMAL.cdf(z0 + (z0 + z) / denom))
    lo, hi = np.quantile(means, levels)
    return float(lo), float(hi)
