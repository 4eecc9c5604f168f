"""RIR_θ0 by groups for deep extractors (Eq. 17 of arXiv 2505.23760; methods/condition_number.md §7.3).

The probe-Hessian proxy of a deep extractor is H̃ = ΦᵀΦ with Φ ``(n, D)`` the features of n samples.
The reference is the extractor θ_0 the defense started from (a separate frozen copy), and the
measurement is taken on G groups of n training samples per domain (20 × 100 in the paper), the
*same* samples for θ_0 and θ^I. Per group g:

    (i)_g  = κ(Φ_{H,g}^{I ᵀ} Φ_{H,g}^I) / κ(Φ_{H,g}^{0 ᵀ} Φ_{H,g}^0)     (harmful domain)
    (ii)_g = κ(Φ_{P,g}^{I ᵀ} Φ_{P,g}^I) / κ(Φ_{P,g}^{0 ᵀ} Φ_{P,g}^0)     (primary domain)
    RIR_g  = (i)_g / (ii)_g

and the report is the **mean of each over the groups** with its spread. Hence the reported RIR is
mean_g((i)_g/(ii)_g), which is not mean(i)/mean(ii) (the paper's ResNet18/Cars row: 2.386/0.699 =
3.41 against a reported 3.467); :attr:`GroupRIR.ratio_of_means` keeps the latter for contrast only.

Every κ is the factor rank rule of :class:`~immunekit.spectral.rank.FactorSpectrum` (§7.1): the
singular values s of Φ (float64), r = #{s_i > rtol·s_1} with rtol = max(n, D)·eps_64 unless given,
κ = (s_1/s_r)². With n ≤ D the Gram matrix is singular (rank ≤ n), so the pseudo-inverse κ is
essential; the rank is decided on each model's features separately. Like :func:`rir_band`, every
figure is also computed with the cut at rtol·10⁻² and rtol·10² (rank re-decided at each cut), and
the mean RIR's spread over the cuts flags a *threshold-sensitive* result.

This module is pure: it takes feature tensors, never models (the layering forbids ``metrics`` to
import ``models``); :func:`immunekit.defenses.deep.group_features` draws the groups from two models.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import Tensor

from immunekit.errors import DataError
from immunekit.metrics.rir import KappaPair, RIRBand, RIRResult, rir_band
from immunekit.spectral.rank import (
    DEFAULT_BAND,
    THRESHOLD_SENSITIVE_FACTOR,
    FactorSpectrum,
    band_multipliers,
)


@dataclass(frozen=True)
class GroupStat:
    """A quantity over the G groups: arithmetic mean and spread.

    Attributes:
        mean: (1/G) Σ_g x_g.
        std: sample standard deviation (ddof = 1; 0.0 for G = 1).
        min: smallest x_g.
        max: largest x_g.
        values: the G per-group values, in group order.

    """

    mean: float
    std: float
    min: float
    max: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> GroupStat:
        """Summarise ``values`` (at least one).

        Example:
            >>> s = GroupStat.of([1.0, 3.0])
            >>> s.mean, round(s.std, 12), s.min, s.max
            (2.0, 1.414213562373, 1.0, 3.0)

        """
        vals = tuple(float(v) for v in values)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return cls(statistics.fmean(vals), std, min(vals), max(vals), vals)


@dataclass(frozen=True)
class GroupRIR:
    """RIR_θ0 over G groups at the default cut, with the band of the rank rule.

    Attributes:
        groups: one :class:`~immunekit.metrics.rir.RIRResult` per group at the default cut
            (reference = θ_0).
        kappa_ratio_harmful: (i)_g over the groups.
        kappa_ratio_primary: (ii)_g over the groups.
        rir: RIR_g = (i)_g/(ii)_g over the groups; ``rir.mean`` is the reported RIR_θ0.
        log_rir: ln RIR_g over the groups.
        ratio_of_means: mean(i)/mean(ii), **not** the reported RIR (kept to show the difference).
        multipliers: multipliers of rtol of the band, ascending, e.g. ``(0.01, 1.0, 100.0)``.
        band_means: per multiplier, the means over groups of (i), (ii) and RIR
            (``{"kappa_ratio_harmful", "kappa_ratio_primary", "rir"}``).
        band_spread: exp(max − min of ln mean RIR over the cuts) (1 = insensitive).
        threshold_sensitive: ``band_spread`` > the factor (default 2).
        group_band_spread_max: the largest per-group spread of :func:`rir_band`.

    """

    groups: tuple[RIRResult, ...]
    kappa_ratio_harmful: GroupStat
    kappa_ratio_primary: GroupStat
    rir: GroupStat
    log_rir: GroupStat
    ratio_of_means: float
    multipliers: tuple[float, ...]
    band_means: tuple[dict[str, float], ...]
    band_spread: float
    threshold_sensitive: bool
    group_band_spread_max: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view (nested dicts and lists)."""
        return asdict(self)

    def to_metrics(self) -> dict[str, float]:
        """Flat record metrics: ``<name>_mean`` / ``_std`` for (i), (ii), RIR, the band edges and flags."""
        out: dict[str, float] = {}
        for name in ("kappa_ratio_harmful", "kappa_ratio_primary", "rir", "log_rir"):
            stat: GroupStat = getattr(self, name)
            out[f"{name}_mean"] = stat.mean
            out[f"{name}_std"] = stat.std
        out["ratio_of_means"] = self.ratio_of_means
        for edge, means in (("band_low", self.band_means[0]), ("band_high", self.band_means[-1])):
            for name, value in means.items():
                out[f"{name}_mean_{edge}"] = value
        out["rir_band_spread"] = self.band_spread
        out["threshold_sensitive"] = float(self.threshold_sensitive)
        return out


def _check_groups(
    name: str, reference: Sequence[Tensor], immunized: Sequence[Tensor], groups: int | None
) -> int:
    if len(reference) != len(immunized):
        raise DataError(
            f"{name}: {len(reference)} reference groups but {len(immunized)} immunized groups; "
            "evaluate the same groups for θ_0 and θ^I"
        )
    if not reference:
        raise DataError(f"{name}: no groups given; pass G >= 1 feature tensors (n, D) per model")
    if groups is not None and len(reference) != groups:
        raise DataError(
            f"the harmful domain has {groups} groups but the primary domain {len(reference)}; "
            "use the same number of groups on both domains"
        )
    for g, (a, b) in enumerate(zip(reference, immunized, strict=True)):
        if a.ndim != 2 or b.ndim != 2:
            raise DataError(
                f"{name} group {g}: features must be 2-D (n, D), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[0]:
            raise DataError(
                f"{name} group {g}: {a.shape[0]} reference rows but {b.shape[0]} immunized rows; "
                "the same samples must be evaluated by both models"
            )
    return len(reference)


def _kappas(features: Tensor, multipliers: Sequence[float], rtol: float | None) -> list:
    spec = FactorSpectrum.of(features, rtol=rtol)
    return [spec.scaled(m).kappa() for m in multipliers]


def rir_by_groups(
    harmful_reference: Sequence[Tensor],
    harmful_immunized: Sequence[Tensor],
    primary_reference: Sequence[Tensor],
    primary_immunized: Sequence[Tensor],
    *,
    rtol: float | None = None,
    band: float = DEFAULT_BAND,
    factor: float = THRESHOLD_SENSITIVE_FACTOR,
) -> GroupRIR:
    """RIR_θ0 of Eq. 17: per-group κ ratios of ΦᵀΦ, immunized over θ_0, averaged over the groups.

    Args:
        harmful_reference: G tensors ``(n_g, D_0)``: θ_0's features of harmful group g.
        harmful_immunized: G tensors ``(n_g, D_I)``: θ^I's features of the same samples.
        primary_reference: G tensors ``(m_g, D_0)``: θ_0's features of primary group g.
        primary_immunized: G tensors ``(m_g, D_I)``: θ^I's features of the same samples.
        rtol: the rank rule's relative cut on the singular values of each Φ, in (0, 1)
            (default max(n, D)·eps_64 per factor).
        band: the band factor; the figures are also computed at rtol/band and rtol·band.
        factor: a mean RIR moving by more than this across the band is *threshold-sensitive*.

    Returns:
        GroupRIR (every κ in float64, ratios formed in log space).

    Raises:
        DataError: group counts differ, a group is not 2-D, or θ_0 and θ^I see different row counts.
        NumericalError: non-finite features (from the rank rule).
        ConfigError: a bad ``rtol``, ``band`` or ``factor``.

    Example:
        >>> import torch
        >>> ref = [torch.eye(2, dtype=torch.float64)]
        >>> imm_h = [torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))]   # κ 1 → 16
        >>> imm_p = [torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))]   # κ 1 → 4
        >>> r = rir_by_groups(ref, imm_h, ref, imm_p)
        >>> round(r.kappa_ratio_harmful.mean, 9), round(r.kappa_ratio_primary.mean, 9), round(r.rir.mean, 9)
        (16.0, 4.0, 4.0)

    """
    g_count = _check_groups("harmful", harmful_reference, harmful_immunized, None)
    _check_groups("primary", primary_reference, primary_immunized, g_count)
    mults = band_multipliers(band)
    bands: list[RIRBand] = []
    for h0, hi, p0, pi in zip(
        harmful_reference, harmful_immunized, primary_reference, primary_immunized, strict=True
    ):
        refs = [
            KappaPair(h, p) for h, p in zip(_kappas(h0, mults, rtol), _kappas(p0, mults, rtol), strict=True)
        ]
        imms = [
            KappaPair(h, p) for h, p in zip(_kappas(hi, mults, rtol), _kappas(pi, mults, rtol), strict=True)
        ]
        bands.append(rir_band(refs, imms, mults, factor=factor))
    centre = mults.index(1.0)
    results = tuple(b.results[centre] for b in bands)
    ratio_h = GroupStat.of([r.kappa_ratio_harmful for r in results])
    ratio_p = GroupStat.of([r.kappa_ratio_primary for r in results])
    band_means = tuple(
        {
            "kappa_ratio_harmful": statistics.fmean(b.results[j].kappa_ratio_harmful for b in bands),
            "kappa_ratio_primary": statistics.fmean(b.results[j].kappa_ratio_primary for b in bands),
            "rir": statistics.fmean(b.results[j].rir for b in bands),
        }
        for j in range(len(mults))
    )
    logs = [math.log(m["rir"]) if m["rir"] > 0 else -math.inf for m in band_means]
    if all(math.isfinite(v) for v in logs):
        width = max(logs) - min(logs)
        spread = math.exp(width) if width < 700 else math.inf
    else:
        spread = math.inf
    return GroupRIR(
        groups=results,
        kappa_ratio_harmful=ratio_h,
        kappa_ratio_primary=ratio_p,
        rir=GroupStat.of([r.rir for r in results]),
        log_rir=GroupStat.of([r.log_rir for r in results]),
        ratio_of_means=ratio_h.mean / ratio_p.mean,
        multipliers=mults,
        band_means=band_means,
        band_spread=spread,
        threshold_sensitive=spread > factor,
        group_band_spread_max=max(b.spread for b in bands),
    )
