"""Streaming data factors: the rank rule of §7.1 for features that do not fit in memory.

A deep backbone produces the features Φ ``(N, D)`` of a split in mini-batches Φ_1, …, Φ_m
(Φ = [Φ_1; …; Φ_m]) and cannot hold them all. The probe Hessian H̃ = ΦᵀΦ (Eq. 18) only needs a factor
of Φ, and a ``(D, D)`` one suffices. The tall-skinny QR update, in float64,

    R_0 = (0 × D),   R_k = qr([R_{k-1}; Φ_k]).R,   so   R_kᵀR_k = R_{k-1}ᵀR_{k-1} + Φ_kᵀΦ_k = Σ_{j≤k} Φ_jᵀΦ_j,

keeps an upper-triangular R with RᵀR = ΦᵀΦ in O(D²) memory. Every step is a backward-stable
Householder QR, so R is the exact factor of some Φ + E with ‖E‖ = O(eps·‖Φ‖₂): the singular values of R
equal those of Φ to an *absolute* error of a small multiple of eps·s_1, as for an in-memory SVD of Φ.
The rank is decided on them by the toolkit's one rule (:meth:`FactorSpectrum.from_factor`):
r = #{s_i > rtol·s_1} with rtol = max(N, D)·eps_64 for the *total* row count N, κ(ΦᵀΦ) = (s_1/s_r)².

Accumulating the Gram matrix G = Σ_k Φ_kᵀΦ_k instead rounds each entry of G at about eps·λ_max =
eps·s_1², so every singular value s_i below √eps·s_1 ≈ 1.5e-8·s_1 is lost in G (and κ, a ratio of
squares, with it). The factor keeps singular values down to about eps·s_1.

Merging uses the same update: qr([R_a; R_b]).R has RᵀR = R_aᵀR_a + R_bᵀR_b, the factor of the union of
the two accumulators' rows, for any split of the rows. Data-parallel workers each stream their shard
and all-gather their ``(D, D)`` factors and row counts; :meth:`StreamingFactor.from_factor` and one
:meth:`StreamingFactor.merge_all` then give the global factor.

Batches are buffered until ``block_rows`` rows are pending and then folded in together, one QR of
[R; buffer] instead of one per batch. This keeps batch size 1 affordable (about 2·N·D²·(1 + D/block_rows)
flops in all), and memory stays at O((D + block_rows)·D) besides the current batch.

References:
    Zheng et al., Model Immunization from a Condition Number Perspective, arXiv 2505.23760, Eq. 18.
    Demmel, Grigori, Hoemmen, Langou, Communication-optimal parallel and sequential QR and LU
    factorizations, SIAM J. Sci. Comput. 34 (2012): TSQR, the reduction tree behind :meth:`merge`.

"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

from immunekit.errors import ConfigError, DataError
from immunekit.spectral.rank import FactorSpectrum

F64 = torch.float64

MIN_BLOCK_ROWS = 256
"""Smallest default buffer: batches are folded in once ``max(2·D, 256)`` rows are pending."""

BatchT = TypeVar("BatchT")


def _check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _qr_r(stack: Tensor) -> Tensor:
    """The ``(min(m, D), D)`` upper-triangular R of a ``(m, D)`` stack (Householder, float64)."""
    return torch.linalg.qr(stack, mode="r").R


class StreamingFactor:
    """An upper-triangular R ``(D, D)`` with RᵀR = ΦᵀΦ, accumulated over row batches of Φ ``(N, D)``.

    Each :meth:`update` with a batch Φ_b ``(B, D)`` sets R ← qr([R; Φ_b]).R in float64 (small batches
    are buffered up to :attr:`block_rows` rows first), so after all batches RᵀR = Σ_b Φ_bᵀΦ_b = ΦᵀΦ
    for the stacked Φ, in any batch order and with any batch sizes. :meth:`spectrum` decides the rank
    on the singular values of R exactly as ``FactorSpectrum.of(Φ)`` decides it on Φ (same rows, same
    default ``rtol = max(N, D)·eps_64``, same :meth:`FactorSpectrum.describe`). Everything is held on
    the CPU; inputs on other devices or in other float dtypes are copied to CPU float64.

    Args:
        dim: D, if known in advance (an empty accumulator then still has a ``(D, D)`` zero factor,
            e.g. for a data-parallel worker with an empty shard); ``None`` takes D from the first batch.
        block_rows: buffer size in rows (default ``max(2·D, 256)``); ``1`` folds every batch in at once.

    Raises:
        ConfigError: ``dim`` or ``block_rows`` not an integer ≥ 1.

    Example:
        >>> phi = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        >>> acc = StreamingFactor()
        >>> for batch in phi.split(2):
        ...     _ = acc.update(batch)
        >>> acc.rows, acc.spectrum().rank, acc.spectrum().kappa().kappa
        (3, 2, 9.0)
        >>> torch.equal(acc.gram(), phi.T @ phi)
        True

    """

    def __init__(self, dim: int | None = None, *, block_rows: int | None = None) -> None:
        self._dim = None if dim is None else _check_count(dim, "dim", minimum=1)
        self._block_request = (
            None if block_rows is None else _check_count(block_rows, "block_rows", minimum=1)
        )
        self._r: Tensor | None = None  # (m, D), m ≤ D, upper-triangular; None while nothing is folded in
        self._rows = 0
        self._pending: list[Tensor] = []
        self._pending_rows = 0
        self._batches = 0

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int | None:
        """D (``None`` until the first batch when not given)."""
        return self._dim

    @property
    def rows(self) -> int:
        """N, the total number of rows seen (buffered rows included)."""
        return self._rows

    @property
    def batches(self) -> int:
        """Number of batches passed to :meth:`update`."""
        return self._batches

    @property
    def block_rows(self) -> int | None:
        """Rows buffered before a QR update (``None`` until D is known, unless given)."""
        if self._block_request is not None:
            return self._block_request
        return None if self._dim is None else max(2 * self._dim, MIN_BLOCK_ROWS)

    @property
    def buffered_rows(self) -> int:
        """Rows held in the buffer, not yet folded into R (always < :attr:`block_rows`)."""
        return self._pending_rows

    # ------------------------------------------------------------------ accumulation

    def _check_batch(self, phi: Tensor) -> Tensor:
        """``phi`` as a detached CPU float64 ``(B, D)`` matrix, or DataError naming the problem."""
        k = self._batches
        if not isinstance(phi, Tensor):
            raise DataError(
                f"batch {k}: features must be a torch.Tensor of shape (B, D), got {type(phi).__name__}"
            )
        shape = tuple(phi.shape)
        if phi.ndim != 2:
            raise DataError(
                f"batch {k}: features must be a 2-D (B, D) matrix, got shape {shape}; flatten or pool the "
                "feature maps to one D-vector per sample"
            )
        if phi.is_complex():
            raise DataError(f"batch {k}: features must be real, got dtype {phi.dtype}")
        if shape[0] < 1:
            raise DataError(f"batch {k}: got an empty batch of shape {shape}; every batch needs >= 1 row")
        if self._dim is not None and shape[1] != self._dim:
            raise DataError(
                f"batch {k}: feature dimension changed: got shape {shape}, but earlier batches had "
                f"shape (·, {self._dim}); every batch must have the same number of columns D"
            )
        if shape[1] < 1:
            raise DataError(f"batch {k}: features have no columns, shape {shape}")
        x = phi.detach().to(device="cpu", dtype=F64)
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0, 0])
            raise DataError(
                f"batch {k} of shape {shape} has {int(bad.sum())} NaN/Inf value(s) (first in row {row}); "
                "check the model outputs that produced it"
            )
        return x

    def update(self, phi: Tensor) -> StreamingFactor:
        """Fold in a batch of rows: R ← qr([R; Φ_b]).R, so that RᵀR gains Φ_bᵀΦ_b.

        Args:
            phi: ``(B, D)`` features of B ≥ 1 samples, any real dtype and device (copied to CPU
                float64; the caller may reuse its buffer afterwards). D is fixed by the first batch.

        Returns:
            ``self`` (for chaining).

        Raises:
            DataError: not a 2-D real tensor, B = 0, D different from earlier batches, or NaN/Inf
                (the message names the batch index and shapes).

        """
        x = self._check_batch(phi)
        if self._dim is None:
            self._dim = int(x.shape[1])
        block = self.block_rows
        assert block is not None
        self._pending.append(x)
        self._pending_rows += int(x.shape[0])
        self._rows += int(x.shape[0])
        self._batches += 1
        if self._pending_rows >= block:
            self._flush()
        elif x.untyped_storage().data_ptr() == phi.untyped_storage().data_ptr():
            self._pending[-1] = x.clone()  # buffered: do not alias the caller's tensor
        return self

    def _parts(self) -> list[Tensor]:
        return ([] if self._r is None else [self._r]) + self._pending

    def _flush(self) -> None:
        """Fold the buffered rows into R (one QR of [R; buffer])."""
        if self._pending:
            self._r = _qr_r(torch.cat(self._parts()))
            self._pending = []
            self._pending_rows = 0

    def _check_dims(self, other: StreamingFactor) -> None:
        if self._dim is not None and other._dim is not None and self._dim != other._dim:
            raise DataError(
                f"cannot merge factors of different feature dimensions: (·, {self._dim}) with "
                f"(·, {other._dim}) (rows {self._rows} and {other._rows})"
            )

    def merge(self, other: StreamingFactor) -> StreamingFactor:
        """Absorb another accumulator's rows: R ← qr([R; R_other]).R (``other`` is not modified).

        RᵀR becomes R_selfᵀR_self + R_otherᵀR_other, the Gram matrix of the union of both row sets,
        and :attr:`rows` the sum, whatever the split of the rows was: merging the accumulators of
        shards Φ = [Φ_a; Φ_b] gives the factor of Φ (to rounding).

        Returns:
            ``self``.

        Raises:
            DataError: different D.
            ConfigError: ``other`` is ``self`` (its rows would count twice).

        """
        if not isinstance(other, StreamingFactor):
            raise TypeError(f"can only merge a StreamingFactor, got {type(other).__name__}")
        if other is self:
            raise ConfigError("cannot merge a StreamingFactor with itself: its rows would be counted twice")
        self._check_dims(other)
        if self._dim is None:
            self._dim = other._dim
        if other._rows == 0:
            return self
        self._r = _qr_r(torch.cat(self._parts() + other._parts()))
        self._pending = []
        self._pending_rows = 0
        self._rows += other._rows
        self._batches += other._batches
        return self

    @classmethod
    def merge_all(cls, parts: Iterable[StreamingFactor], *, block_rows: int | None = None) -> StreamingFactor:
        """A new accumulator holding the rows of all ``parts``: one QR of their stacked factors.

        Args:
            parts: accumulators of disjoint row sets (not modified).
            block_rows: buffer size of the result (see :class:`StreamingFactor`).

        Raises:
            DataError: no parts, or parts of different D.

        """
        out = cls(block_rows=block_rows)
        stack: list[Tensor] = []
        count = 0
        for part in parts:
            count += 1
            if not isinstance(part, StreamingFactor):
                raise TypeError(f"can only merge StreamingFactor objects, got {type(part).__name__}")
            out._check_dims(part)
            if out._dim is None:
                out._dim = part._dim
            stack += part._parts()
            out._rows += part._rows
            out._batches += part._batches
        if count == 0:
            raise DataError("merge_all needs at least one StreamingFactor, got none")
        if stack:
            out._r = _qr_r(torch.cat(stack))
        return out

    @classmethod
    def from_factor(cls, r: Tensor, *, rows: int, block_rows: int | None = None) -> StreamingFactor:
        """An accumulator from a factor R ``(m, D)`` with RᵀR = ΦᵀΦ of ``rows`` rows (e.g. all-gathered).

        With workers ``w``: ``merge_all(from_factor(R_w, rows=N_w) for w)`` after gathering each
        worker's :meth:`factor` and :attr:`rows` (equal ``(D, D)`` shapes on every worker).

        Args:
            r: ``(m, D)`` factor, any real dtype; stored as the triangular qr(r).R in float64.
            rows: N ≥ 0 rows it stands for (0 only with R = 0: an empty shard).
            block_rows: buffer size of the result (see :class:`StreamingFactor`).

        Raises:
            DataError: R not 2-D, not finite, or non-zero with ``rows = 0``.
            ConfigError: ``rows`` not an integer ≥ 0.

        """
        n = _check_count(rows, "rows", minimum=0)
        if not isinstance(r, Tensor) or r.ndim != 2 or r.shape[1] < 1 or r.is_complex():
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise DataError(f"the factor R must be a real 2-D (m, D) tensor with D >= 1, got {shape}")
        rf = r.detach().to(device="cpu", dtype=F64)
        if not bool(torch.isfinite(rf).all()):
            raise DataError(f"the factor R of shape {tuple(r.shape)} contains NaN/Inf")
        out = cls(int(rf.shape[1]), block_rows=block_rows)
        if n == 0:
            if bool((rf != 0).any()):
                raise DataError("rows = 0 but the factor R is non-zero; pass the row count it was built from")
            return out
        out._r = _qr_r(rf)
        out._rows = n
        return out

    # ------------------------------------------------------------------ results

    def factor(self) -> Tensor:
        """R ``(D, D)``, upper-triangular, with RᵀR = ΦᵀΦ (zero rows below row N when N < D; a copy).

        Raises:
            DataError: nothing accumulated and D unknown.

        """
        self._flush()
        d = self._dim
        if d is None:
            raise DataError("the factor is empty: no batch was accumulated and dim was not given")
        out = torch.zeros(d, d, dtype=F64)
        if self._r is not None:
            out[: self._r.shape[0]] = self._r
        return out

    def gram(self) -> Tensor:
        """ΦᵀΦ = RᵀR ``(D, D)``, symmetrised (only for inspection: decide ranks on :meth:`spectrum`)."""
        r = self.factor()
        g = r.T @ r
        return 0.5 * (g + g.T)

    def spectrum(self, rtol: float | None = None) -> FactorSpectrum:
        """The rank rule on the singular values of R, as ``FactorSpectrum.of(Φ)`` on the stacked Φ.

        r = #{s_i > rtol·s_1} with rtol = max(N, D)·eps_64 (N = :attr:`rows`) unless given; the
        result keeps the p = min(N, D) largest singular values and their right vectors.

        Raises:
            DataError: no rows accumulated.
            ConfigError: an explicit ``rtol`` outside (0, 1).

        """
        self._flush()
        if self._r is None or self._rows == 0:
            raise DataError(
                "the factor is empty: accumulate at least one batch before asking for its spectrum"
            )
        return FactorSpectrum.from_factor(self._r, rows=self._rows, rtol=rtol)

    def __repr__(self) -> str:
        return f"StreamingFactor(dim={self._dim}, rows={self._rows}, batches={self._batches})"


def feature_factor(
    features_fn: Callable[[BatchT], Tensor],
    batches: Iterable[BatchT],
    *,
    max_rows: int | None = None,
    block_rows: int | None = None,
) -> StreamingFactor:
    """Stream ``features_fn`` over ``batches`` under ``torch.no_grad()`` into a :class:`StreamingFactor`.

    The batches are pulled one at a time and each feature batch is folded in (or buffered up to
    ``block_rows`` rows) before the next is requested, so memory stays at one batch plus
    O((D + block_rows)·D), whatever the split size. Put the model in eval mode first (BatchNorm,
    dropout): this function does not touch module state.

    Args:
        features_fn: maps a batch to its ``(B, D)`` features Φ_b (e.g. ``lambda b: model(b[0])``).
        batches: any iterable (a DataLoader, a generator), iterated once.
        max_rows: stop after this many rows (the last batch is cut; no further batch is requested);
            ``None`` uses every batch.
        block_rows: see :class:`StreamingFactor`.

    Returns:
        The accumulator; ``.spectrum()`` gives the rank rule and κ of ΦᵀΦ.

    Raises:
        DataError: ``batches`` yields nothing, or a feature batch is invalid (see
            :meth:`StreamingFactor.update`).
        ConfigError: ``max_rows`` not an integer ≥ 1.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> data = [torch.eye(2), torch.eye(2)]
        >>> acc = feature_factor(lambda x: x @ w, data)
        >>> acc.rows, [round(s * s, 9) for s in acc.spectrum().singular_values.tolist()]
        (4, [8.0, 2.0])

    """
    limit = None if max_rows is None else _check_count(max_rows, "max_rows", minimum=1)
    acc = StreamingFactor(block_rows=block_rows)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            seen += 1
            phi = features_fn(batch)
            if limit is not None and isinstance(phi, Tensor) and phi.ndim == 2:
                phi = phi[: limit - acc.rows]
            acc.update(phi)
            if limit is not None and acc.rows >= limit:
                break
    if seen == 0:
        raise DataError(
            "batches yielded no batch: there are no features to accumulate (empty split or loader?)"
        )
    return acc
