"""The one rank rule of the toolkit, decided on factors (methods/condition_number.md §7.1).

For a second-moment matrix K = XᵀX the rank is decided on the singular values s_1 ≥ s_2 ≥ … of
the data factor X ``(N, D)``, never on the eigenvalues of K:

    r = #{s_i > rtol · s_1},   rtol = max(N, D) · eps_64 by default,   κ(K) = (s_1 / s_r)².

Deciding on the eigenvalues of K at ``D · eps`` is a cut of about √(D·eps) ≈ 4e-7 on s: on MNIST it
drops real directions (digit 1 has λ/λ_max = 6.3e-14 above a noise floor near 1e-28).

The null space of a task's K is decided **once**, on X, by :class:`FactorSpectrum`; the thin factor
F = diag(s_1..s_r) V_rᵀ (FᵀF = K on the retained subspace), the K⁺ preconditioner and the range
projector all come from the same SVD. For a probe Hessian H = θᵀKθ the rank is *fixed on K*:
κ(H) = (s_1 / s_r)² of the factor Fθ with r = rank K (:meth:`FactorSpectrum.kappa`), so a
defense cannot move a direction across the threshold and out of the metric.

Every κ ratio also carries a sensitivity band: the same ratios with the cut at ``rtol / band``
and ``rtol · band`` (default band 10², rank re-decided on K at each cut), see
:data:`BAND_MULTIPLIERS` and :func:`band_multipliers`.

References:
    Zheng et al., Model Immunization from a Condition Number Perspective, arXiv 2505.23760, Eq. 1.

"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from immunekit.errors import ConfigError, NumericalError
from immunekit.spectral.condition import KappaInfo, check_matrix, check_rtol, default_rtol, gram_spectrum
from immunekit.spectral.fast import RangeProjector
from immunekit.spectral.regularizers import Preconditioner

F64 = torch.float64

RANK_RULE = "factor-svd-v1"
"""Name of the rank rule, recorded with every result: a results directory written under another
rule (e.g. the older eigenvalues-of-K cut at D·eps) is refused for resume with this name."""

RANK_RULE_TEXT = (
    "r = #{s_i > rtol·s_1} on the singular values of the data factor X (K = XᵀX), "
    "rtol = max(N, D)·eps_64 unless given; κ(θᵀKθ) = (s_1/s_r)² of the factor F·θ with r fixed on K"
)

DEFAULT_BAND = 100.0
"""The sensitivity band: κ ratios are also computed with the cut at rtol/100 and rtol·100."""

THRESHOLD_SENSITIVE_FACTOR = 2.0
"""A RIR that moves by more than this factor across the band is flagged *threshold-sensitive*."""


def check_band(band: float) -> float:
    """A band factor, validated: finite and > 1 (the cuts are rtol/band, rtol, rtol·band).

    Raises:
        ConfigError: naming the value and the fix.

    """
    ok = isinstance(band, int | float) and not isinstance(band, bool) and math.isfinite(band)
    if not ok or not float(band) > 1.0:
        raise ConfigError(
            f"band factor must be a finite number > 1, got {band!r}; the default is {DEFAULT_BAND:g} "
            "(cuts at rtol/100 and rtol·100)"
        )
    return float(band)


def band_multipliers(band: float = DEFAULT_BAND) -> tuple[float, float, float]:
    """The multipliers of rtol at which every κ ratio is computed: ``(1/band, 1, band)``.

    Example:
        >>> band_multipliers(100.0)
        (0.01, 1.0, 100.0)

    """
    b = check_band(band)
    return (1.0 / b, 1.0, b)


@dataclass(frozen=True)
class FactorSpectrum:
    """The SVD of a data factor X ``(N, D)`` and the rank of K = XᵀX decided on it.

    Attributes:
        singular_values: ``(p,)`` singular values of X, descending, p = min(N, D).
        right_vectors: ``(D, p)`` right singular vectors V (columns; eigenvectors of K).
        rows: N.
        rtol: the relative cut; r = #{s_i > rtol · s_1}.

    """

    singular_values: Tensor
    right_vectors: Tensor
    rows: int
    rtol: float

    @classmethod
    def of(cls, x: Tensor, *, rtol: float | None = None) -> FactorSpectrum:
        """Decompose X once (float64) and cut at ``rtol`` (default ``max(N, D)·eps_64``).

        Args:
            x: ``(N, D)`` data factor (rows are samples), any float dtype.
            rtol: explicit relative cut in (0, 1), or ``None`` for the default.

        Raises:
            NumericalError: X not 2-D or not finite.
            ConfigError: an explicit ``rtol`` outside (0, 1).

        Example:
            >>> x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1e-20]])
            >>> spec = FactorSpectrum.of(x)
            >>> spec.rank, spec.kappa().kappa
            (2, 9.0)

        """
        xf = check_matrix(x, "the data factor X (N, D)")
        n, d = xf.shape
        tol = default_rtol(n, d) if rtol is None else check_rtol(rtol)
        _, s, vh = torch.linalg.svd(xf, full_matrices=False)
        return cls(s, vh.T.contiguous(), n, tol)

    @classmethod
    def from_factor(cls, r: Tensor, *, rows: int, rtol: float | None = None) -> FactorSpectrum:
        """The spectrum of an N-row data factor X known only through a factor R with RᵀR = XᵀX.

        RᵀR = XᵀX gives X and R the same non-zero singular values and the same right singular
        vectors, so the rule is decided exactly as :meth:`of` would decide it on X itself: the SVD is
        taken of R ``(m, D)``, only the p = min(N, D) largest values are kept (rank X ≤ N, so any
        further value of R is zero in exact arithmetic), R is padded with zero rows when m < p, and
        the default cut is ``max(N, D)·eps_64`` with the *row count of X*, not of R. ``rows`` and
        ``rtol`` of the result, and hence :attr:`rank` and :meth:`describe`, are then those of
        ``FactorSpectrum.of(X)``; the singular values agree to rounding (backward-stable QR and SVD:
        absolute error a small multiple of ``eps · s_1``).

        The typical R is the ``(D, D)`` triangular factor of a streamed QR
        (:class:`immunekit.spectral.streaming.StreamingFactor`).

        Args:
            r: ``(m, D)`` factor with RᵀR = XᵀX, any float dtype (computed in float64).
            rows: N, the number of rows of X (≥ 1).
            rtol: explicit relative cut in (0, 1), or ``None`` for ``max(N, D)·eps_64``.

        Raises:
            NumericalError: R not 2-D or not finite.
            ConfigError: ``rows`` not an integer ≥ 1, or an explicit ``rtol`` outside (0, 1).

        Example:
            >>> x = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
            >>> spec = FactorSpectrum.from_factor(torch.linalg.qr(x, mode="r").R, rows=3)
            >>> spec.rank, spec.rows, spec.rtol == FactorSpectrum.of(x).rtol, spec.kappa().kappa
            (2, 3, True, 9.0)

        """
        rf = check_matrix(r, "the factor R (m, D) with RᵀR = XᵀX")
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"rows must be the number of rows N >= 1 of the data factor X, got {rows!r}")
        m, d = rf.shape
        tol = default_rtol(rows, d) if rtol is None else check_rtol(rtol)
        p = min(rows, d)
        if m < p:
            rf = torch.cat([rf, rf.new_zeros(p - m, d)])
        _, s, vh = torch.linalg.svd(rf, full_matrices=False)
        return cls(s[:p].contiguous(), vh[:p].T.contiguous(), rows, tol)

    def at(self, rtol: float) -> FactorSpectrum:
        """The same SVD with the cut at another ``rtol`` (no new decomposition)."""
        return FactorSpectrum(self.singular_values, self.right_vectors, self.rows, check_rtol(rtol))

    def scaled(self, multiplier: float) -> FactorSpectrum:
        """The same SVD with the cut at ``rtol · multiplier`` (a band edge)."""
        if multiplier == 1.0:
            return self
        return self.at(self.rtol * multiplier)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.right_vectors.shape[0])

    @property
    def rank(self) -> int:
        """The numerical rank r = #{s_i > rtol · s_1} (0 when X = 0)."""
        s = self.singular_values
        if s.numel() == 0 or float(s[0]) == 0.0:
            return 0
        return int((s > self.rtol * float(s[0])).sum())

    def gap(self) -> tuple[float | None, float | None]:
        """(s_r / s_1, s_{r+1} / s_1): the last kept and first dropped singular value, relative.

        The first dropped value is 0.0 when every computed value is kept but N < D (the remaining
        D − N singular values are exact zeros), and ``None`` when nothing is dropped.
        """
        s, r = self.singular_values, self.rank
        if r == 0:
            return None, None
        s1 = float(s[0])
        last = float(s[r - 1]) / s1
        if r < s.numel():
            return last, float(s[r]) / s1
        return last, (0.0 if self.rows < self.dim else None)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the decision: rule, rank, dim, rows, rtol and the gap at the cut."""
        last, first = self.gap()
        return {
            "rule": RANK_RULE,
            "rank": self.rank,
            "dim": self.dim,
            "rows": self.rows,
            "rtol": self.rtol,
            "sigma_last_kept": last,
            "sigma_first_dropped": first,
            "gap": (last / first) if last is not None and first else None,
        }

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of K = XᵀX, descending, ``(D,)``: s_i² then zeros (all of them, uncut)."""
        w = torch.zeros(self.dim, dtype=F64)
        w[: self.singular_values.numel()] = self.singular_values**2
        return w

    def factor(self, *, thin: bool = True) -> Tensor:
        """F with FᵀF = K on the retained subspace: ``(r, D)`` diag(s_1..s_r) V_rᵀ.

        ``thin=False`` pads it with zero rows to ``(D, D)`` (the same Gram matrix and the same
        non-zero singular values for every θ).
        """
        r = self.rank
        f = self.singular_values[:r, None] * self.right_vectors[:, :r].T
        if thin:
            return f
        full = torch.zeros(self.dim, self.dim, dtype=F64)
        full[:r] = f
        return full

    def kappa(self, theta: Tensor | None = None) -> KappaInfo:
        """κ(θᵀKθ) with the rank fixed on K: (s_1 / s_r)² of F·θ, r = rank K (θ = I: κ(K)).

        Args:
            theta: ``(D, D_hid)`` linear extractor, or ``None`` for K itself.

        Returns:
            KappaInfo of θᵀKθ (``sigma_*`` are its eigenvalues), ``rtol`` = this cut.

        """
        return self.kappa_spectrum(theta)[0]

    def kappa_spectrum(self, theta: Tensor | None = None) -> tuple[KappaInfo, Tensor]:
        """:meth:`kappa` and the singular values of F·θ it was computed from (descending)."""
        f = self.factor(thin=True)
        m = f if theta is None else f @ theta.detach().to(F64)
        return gram_spectrum(m, rtol=self.rtol, rank=self.rank)

    def range_basis(self) -> Tensor:
        """``(D, r)`` orthonormal basis V_r of range(K)."""
        return self.right_vectors[:, : self.rank]

    def projector(self) -> RangeProjector:
        """P_K = K⁺K, the orthogonal projector onto range(K), by the thinner basis available."""
        d, r = self.dim, self.rank
        v = self.right_vectors
        if r <= d - r or v.shape[1] < d:
            return RangeProjector(v[:, :r].contiguous(), False, d)
        return RangeProjector(v[:, r:].contiguous(), True, d)

    def preconditioner(
        self, method: str = "pinv", *, ridge: float = 0.0, dense: bool = True
    ) -> Preconditioner:
        """Left preconditioner for Algorithm 1 from this SVD (null space decided by :attr:`rank`).

        * ``pinv``: K⁺ = V_r diag(1/s²) V_rᵀ and P_K = V_r V_rᵀ; ``dense=False`` stores empty
          matrices (use :meth:`projector` for the closed form 2 P_K θ G).
        * ``ridge``: (K + εI)⁻¹ and (K + εI)⁻¹K.
        * ``none``: I and K.
        """
        d, r = self.dim, self.rank
        v, s = self.right_vectors, self.singular_values
        if method == "pinv":
            if not dense:
                empty = torch.empty(0, 0, dtype=F64)
                return Preconditioner(empty, empty, "pinv", self.rtol, 0.0, r)
            vr = v[:, :r]
            m = (vr / s[:r] ** 2) @ vr.T
            return Preconditioner(m, vr @ vr.T, "pinv", self.rtol, 0.0, r)
        w = s**2
        k = (v * w) @ v.T
        if method == "ridge":
            if not ridge > 0:
                raise NumericalError(f"ridge must be > 0 for method='ridge', got {ridge}; e.g. ridge=1e-6")
            # (K + εI)⁻¹ = V diag(1/(w + ε)) Vᵀ + (I − VVᵀ)/ε (the second term when N < D)
            m = (v / (w + ridge)) @ v.T
            if v.shape[1] < d:
                m = m + (torch.eye(d, dtype=F64) - v @ v.T) / ridge
            return Preconditioner(m, (v * (w / (w + ridge))) @ v.T, "ridge", self.rtol, float(ridge), r)
        if method == "none":
            return Preconditioner(torch.eye(d, dtype=F64), k, "none", self.rtol, 0.0, r)
        raise NumericalError(f"unknown preconditioner {method!r}; choose 'pinv', 'ridge' or 'none'")

    def whitener(self) -> Tensor:
        """θ = s_1·K^{-1/2} on range(K), the identity on null(K): V_r diag(s_1/s_i) V_rᵀ + (I − V_rV_rᵀ).

        Then θᵀKθ = s_1² V_rV_rᵀ, whose retained spectrum is constant (κ = 1). The factor s_1 keeps
        θ equal to the identity on the top direction v_1 as well as on null(K), so no block of θ is
        rescaled against another (K = 0: the identity).

        Example:
            >>> spec = FactorSpectrum.of(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
            >>> spec.whitener().diagonal().tolist()
            [1.0, 2.0]

        """
        r = self.rank
        eye = torch.eye(self.dim, dtype=F64)
        if r == 0:
            return eye
        vr = self.range_basis()
        s = self.singular_values[:r]
        return (vr * (s[0] / s)) @ vr.T + eye - vr @ vr.T


_SPECTRA: OrderedDict[int, tuple[weakref.ref[Tensor], tuple, FactorSpectrum]] = OrderedDict()
_SPECTRA_SIZE = 4


def factor_spectrum_cached(x: Tensor, *, rtol: float | None = None) -> FactorSpectrum:
    """:meth:`FactorSpectrum.of` shared by every caller that passes the very same tensor X.

    The trials of one task (every method, the defense's setup and the measurement) decide the rank
    rule on the same data factor; one SVD per tensor and process serves them all. An entry is used
    only for the same live tensor object (held by a weak reference, so a freed tensor's id is never
    mistaken for a new one), with unchanged shape, in-place-modification counter and ``rtol``; the
    cache keeps at most 4 entries (least recently used dropped first). The result is the same
    object :meth:`FactorSpectrum.of` would compute (bit for bit: the same SVD of the same input).
    """
    key, stamp = id(x), (tuple(x.shape), x._version, x.dtype, rtol)
    entry = _SPECTRA.get(key)
    if entry is not None and entry[0]() is x and entry[1] == stamp:
        _SPECTRA.move_to_end(key)
        return entry[2]
    spec = FactorSpectrum.of(x, rtol=rtol)
    _SPECTRA[key] = (weakref.ref(x), stamp, spec)
    _SPECTRA.move_to_end(key)
    while len(_SPECTRA) > _SPECTRA_SIZE:
        _SPECTRA.popitem(last=False)
    return spec
