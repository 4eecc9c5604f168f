"""Streaming feature factors (spectral.streaming) against the in-memory rule on the stacked Φ, in float64.

Φ ``(N, D)`` is fed in row batches; the streamed R (RᵀR = ΦᵀΦ) must give the singular values, rank,
rtol, ``describe()`` and κ that ``FactorSpectrum.of(Φ)`` gives, for any batching and any split of the
rows across merged accumulators. Error model: both routes are backward stable, so singular values agree
to an absolute error of a small multiple of eps·s_1 (relative ≤ 1e-12 on well-conditioned data), while
an accumulated Gram matrix loses every s_i below √eps·s_1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from immunekit.errors import ConfigError, DataError, NumericalError
from immunekit.spectral import FactorSpectrum, StreamingFactor, condition_number, feature_factor
from immunekit.spectral.condition import EPS64

from ._util import SETTINGS, gen, rel_err, seeds, with_singular_values

F64 = torch.float64
N, D = 200, 12


def _well_conditioned(seed: int, n: int = N, d: int = D) -> torch.Tensor:
    """Φ = U diag(s) Vᵀ with s_i ∈ [1, 2] (κ(Φ) ≤ 2), p = min(n, d) values."""
    g = gen(seed)
    p = min(n, d)
    s = 1.0 + torch.rand(p, generator=g, dtype=F64)
    return with_singular_values(s, n, d, g)


def _deficient(seed: int, n: int = 300, d: int = 16) -> torch.Tensor:
    """Gaussian Φ with duplicate columns (3 = 7, 5 = −2.5·9), constant columns (0, 1) and a zero column.

    rank Φ = 16 − 4 = 12 (column 1 ∥ column 0, 3 = 7, 5 ∥ 9, 11 = 0).
    """
    x = torch.randn(n, d, generator=gen(seed), dtype=F64)
    x[:, 3] = x[:, 7]
    x[:, 5] = -2.5 * x[:, 9]
    x[:, 0] = 1.0
    x[:, 1] = -3.5
    x[:, 11] = 0.0
    return x


def _stream(x: torch.Tensor, batch: int, block_rows: int | None = None) -> StreamingFactor:
    acc = StreamingFactor(block_rows=block_rows)
    for b in x.split(batch):
        acc.update(b)
    return acc


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def _assert_same_decision(streamed: FactorSpectrum, ref: FactorSpectrum, *, rel: float = 1e-12) -> None:
    """Same rule, rank, dim, rows and rtol (exactly); kept singular values to ``rel``; dropped ones cut."""
    a, b = streamed.describe(), ref.describe()
    for key in ("rule", "rank", "dim", "rows", "rtol"):
        assert a[key] == b[key], key
    assert streamed.singular_values.shape == ref.singular_values.shape
    assert streamed.right_vectors.shape == ref.right_vectors.shape
    r = ref.rank
    assert _max_rel(streamed.singular_values[:r], ref.singular_values[:r]) <= rel
    assert a["sigma_last_kept"] == pytest.approx(b["sigma_last_kept"], rel=rel)
    if b["sigma_first_dropped"] is None or b["sigma_first_dropped"] == 0.0:
        assert a["sigma_first_dropped"] == b["sigma_first_dropped"]
    else:  # rounding noise on both routes, below the cut
        assert a["sigma_first_dropped"] <= ref.rtol and b["sigma_first_dropped"] <= ref.rtol


# ---------------------------------------------------------------------------- streamed R = factor of Φ


@pytest.mark.parametrize("batch", [1, 7, 13, N], ids=["b1", "b7", "b13-uneven", "bN"])
@pytest.mark.parametrize("block_rows", [1, None], ids=["unbuffered", "buffered"])
def test_streamed_singular_values_match_svdvals_of_stacked(batch: int, block_rows: int | None) -> None:
    # N = 200: batches of 7 and 13 leave a last batch of 4 and 5 rows
    x = _well_conditioned(0)
    acc = _stream(x, batch, block_rows)
    assert acc.rows == N and acc.dim == D and acc.batches == math.ceil(N / batch)
    r = acc.factor()
    assert r.shape == (D, D) and r.dtype == F64
    assert torch.equal(r, torch.triu(r))
    ref = torch.linalg.svdvals(x)
    assert _max_rel(torch.linalg.svdvals(r), ref) <= 1e-12
    assert _max_rel(acc.spectrum().singular_values, ref) <= 1e-12
    g = x.T @ x
    assert float(torch.linalg.matrix_norm(acc.gram() - g)) <= 1e-12 * float(torch.linalg.matrix_norm(g))


@pytest.mark.parametrize("batch", [1, 7, N])
def test_describe_rank_rtol_and_kappa_equal_the_in_memory_rule(batch: int) -> None:
    x = _well_conditioned(1)
    spec, ref = _stream(x, batch).spectrum(), FactorSpectrum.of(x)
    _assert_same_decision(spec, ref)
    assert spec.rank == D and spec.rtol == max(N, D) * EPS64
    assert spec.kappa().kappa == pytest.approx(ref.kappa().kappa, rel=1e-12)
    # κ(θᵀKθ) with the rank fixed on K uses the right vectors too (same up to sign)
    theta = torch.randn(D, 5, generator=gen(2), dtype=F64)
    assert spec.kappa(theta).kappa == pytest.approx(ref.kappa(theta).kappa, rel=1e-10)


def test_fewer_rows_than_columns_keeps_min_n_d_values_and_pads_the_factor() -> None:
    n = 5
    x = _well_conditioned(3, n=n, d=D)
    acc = _stream(x, 2)
    r = acc.factor()
    assert r.shape == (D, D) and bool((r[n:] == 0).all())
    spec, ref = acc.spectrum(), FactorSpectrum.of(x)
    assert spec.singular_values.shape == (n,) and spec.right_vectors.shape == (D, n)
    _assert_same_decision(spec, ref)
    assert spec.describe()["sigma_first_dropped"] == 0.0  # the D − N exact zeros, as in memory
    assert spec.rtol == D * EPS64  # max(N, D) with the total N
    torch.testing.assert_close(
        spec.range_basis() @ spec.range_basis().T, ref.range_basis() @ ref.range_basis().T
    )


# ---------------------------------------------------------------- rank-deficient and ill-conditioned


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_rank_deficient_duplicate_and_constant_columns_decided_like_in_memory(batch: int) -> None:
    x = _deficient(4)
    spec, ref = _stream(x, batch, block_rows=1 if batch == 1 else None).spectrum(), FactorSpectrum.of(x)
    assert ref.rank == 12
    _assert_same_decision(spec, ref, rel=1e-11)
    # the four null directions are rounding noise (a few eps·s_1) well below the cut 300·eps·s_1
    assert float(spec.singular_values[12:].max()) <= 0.1 * spec.rtol * float(spec.singular_values[0])
    torch.testing.assert_close(
        spec.range_basis() @ spec.range_basis().T, ref.range_basis() @ ref.range_basis().T, rtol=0, atol=1e-12
    )
    assert spec.kappa().kappa == pytest.approx(ref.kappa().kappa, rel=1e-11)


def test_rank_deficient_with_fewer_rows_than_columns() -> None:
    # MNIST-like: N = 12 < D = 16, five zero columns, two constant ones (rank 1), a duplicate → rank 9
    x = torch.randn(12, 16, generator=gen(5), dtype=F64)
    x[:, :5] = 0.0
    x[:, 5] = 0.5
    x[:, 6] = 2.0
    x[:, 15] = x[:, 14]
    spec, ref = _stream(x, 5).spectrum(), FactorSpectrum.of(x)
    assert ref.rank == 9
    _assert_same_decision(spec, ref, rel=1e-11)


def test_rank_decided_like_in_memory_at_an_explicit_cut() -> None:
    # s_4 just above the cut 1e-8·s_1 and s_5 just below (relative margins 1e-6 ≫ streamed error ~1e-8)
    values = torch.tensor([2.0, 1.0, 0.5, 2e-8 * 1.000001, 2e-8 * 0.999999, 0.0], dtype=F64)
    x = with_singular_values(values, 40, 6, gen(6))
    spec, ref = _stream(x, 3).spectrum(rtol=1e-8), FactorSpectrum.of(x, rtol=1e-8)
    assert ref.rank == 4 and spec.rank == 4 and spec.rtol == 1e-8
    assert spec.describe()["gap"] == pytest.approx(ref.describe()["gap"], rel=1e-6)


def test_ill_conditioned_factor_keeps_what_the_accumulated_gram_loses() -> None:
    # s_i = 10^-i, i = 0..10: κ(ΦᵀΦ) = 1e20. Stated tolerance for the factor route: every singular value
    # within 100·eps·s_1 (absolute; ≤ 2.2e-4 relative at 1e-10) of the exact one, over batch sizes 1..N.
    # The Gram route rounds λ at ~eps·λ_max ≈ 1e-16, so s = 1e-9 (λ = 1e-18) and 1e-10 (λ = 1e-20) are lost.
    n, d = 400, 11
    s = torch.logspace(0, -10, d, dtype=F64)
    x = with_singular_values(s, n, d, gen(7))
    ref = FactorSpectrum.of(x)
    assert ref.rank == d
    tol = 100 * EPS64 * float(s[0])
    for batch, block in [(1, 1), (7, None), (64, 1), (n, None)]:
        acc = _stream(x, batch, block)
        spec = acc.spectrum()
        assert float((spec.singular_values - s).abs().max()) <= tol, batch
        assert float((spec.singular_values - ref.singular_values).abs().max()) <= tol, batch
        assert spec.rank == ref.rank == d and spec.rtol == ref.rtol
        # κ = (s_1/s_r)² = 1e20 to 2·(100·eps·s_1/s_r) ≈ 4.4e-4 relative
        assert spec.kappa().kappa == pytest.approx(ref.kappa().kappa, rel=5e-4)
        assert spec.kappa().kappa == pytest.approx(1e20, rel=5e-4)
    gram = sum((b.T @ b for b in x.split(7)), torch.zeros(d, d, dtype=F64))
    lam = torch.linalg.eigvalsh(gram).flip(0)
    from_gram = lam.clamp_min(0.0).sqrt()
    lost = (from_gram[-2:] - s[-2:]).abs() / s[-2:]
    assert bool((lost > 0.5).all()), lost  # wrong by more than 50 %: nothing of s = 1e-9, 1e-10 survives
    assert condition_number(gram, hermitian=True).rank == 8  # the cut at D·eps·λ_max drops s ≤ 1e-8


# ---------------------------------------------------------------------------- merging shards


@SETTINGS
@given(seed=seeds, data=st.data())
def test_merged_shards_equal_the_single_stream_for_random_splits(seed: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 60), label="N")
    d = data.draw(st.integers(1, 9), label="D")
    zeros = data.draw(st.integers(0, min(n, d) - 1), label="exact zero singular values")
    g = gen(seed)
    p = min(n, d)
    s = torch.cat([1.0 + torch.rand(p - zeros, generator=g, dtype=F64), torch.zeros(zeros, dtype=F64)])
    x = with_singular_values(s, n, d, g)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4), label="cuts"))
    bounds = [0, *cuts, n]
    shards = []
    for lo, hi in itertools.pairwise(bounds):  # shards may be empty
        acc = StreamingFactor(d, block_rows=data.draw(st.sampled_from([1, 3, None]), label="block"))
        if hi > lo:
            for b in x[lo:hi].split(data.draw(st.integers(1, n), label="batch")):
                acc.update(b)
        shards.append(acc)
    order = data.draw(st.permutations(range(len(shards))), label="merge order")

    single = _stream(x, 5)
    pairwise = StreamingFactor(d)
    for i in order:
        pairwise.merge(shards[i])
    gathered = StreamingFactor.merge_all(StreamingFactor.from_factor(a.factor(), rows=a.rows) for a in shards)
    ref = FactorSpectrum.of(x)
    for merged in (pairwise, gathered):
        assert merged.rows == n == single.rows
        spec = merged.spectrum()
        _assert_same_decision(spec, single.spectrum())
        _assert_same_decision(spec, ref)
        assert spec.rank == p - zeros
        assert spec.kappa().kappa == pytest.approx(ref.kappa().kappa, rel=1e-12)
        g_ref = single.gram()
        assert float(torch.linalg.matrix_norm(merged.gram() - g_ref)) <= 1e-12 * float(
            torch.linalg.matrix_norm(g_ref)
        )
    assert [a.rows for a in shards] == [hi - lo for lo, hi in itertools.pairwise(bounds)]


def test_merge_leaves_the_other_accumulator_and_handles_empty_ones() -> None:
    x = _well_conditioned(8)
    a, b = _stream(x[:50], 7), _stream(x[50:], 9)
    b_factor, b_rows = b.factor(), b.rows
    empty = StreamingFactor(D)
    assert empty.rows == 0 and torch.equal(empty.factor(), torch.zeros(D, D, dtype=F64))
    a.merge(empty).merge(b)
    assert torch.equal(b.factor(), b_factor) and b.rows == b_rows
    assert _max_rel(a.spectrum().singular_values, torch.linalg.svdvals(x)) <= 1e-12
    fresh = StreamingFactor().merge(b)  # D taken from the other accumulator
    assert fresh.dim == D and fresh.rows == b_rows
    assert StreamingFactor.from_factor(torch.zeros(D, D), rows=0).rows == 0


# ---------------------------------------------------------------------------- helper over batches


def test_feature_factor_streams_lazily_without_grad_and_honours_max_rows() -> None:
    model = torch.nn.Linear(6, 4, bias=False).double()
    inputs = torch.randn(100, 6, generator=gen(9), dtype=F64)
    pulled: list[int] = []
    grad_seen: list[bool] = []

    def loader() -> Iterator[torch.Tensor]:
        for i, b in enumerate(inputs.split(8)):
            pulled.append(i)
            yield b

    def features(b: torch.Tensor) -> torch.Tensor:
        out = model(b)
        grad_seen.append(torch.is_grad_enabled() or out.requires_grad)
        return out

    acc = feature_factor(features, loader(), max_rows=30)
    assert acc.rows == 30 and pulled == [0, 1, 2, 3]  # 8 + 8 + 8 + 6 of 8: the fifth batch is never pulled
    assert not any(grad_seen)
    with torch.no_grad():
        ref = FactorSpectrum.of(model(inputs[:30]))
    _assert_same_decision(acc.spectrum(), ref)
    full = feature_factor(features, loader(), block_rows=20)
    assert full.rows == 100 and full.buffered_rows < 20
    with torch.no_grad():
        _assert_same_decision(full.spectrum(), FactorSpectrum.of(model(inputs)))


def test_buffer_stays_bounded_and_does_not_alias_caller_tensors() -> None:
    x = _well_conditioned(10)
    acc = StreamingFactor(block_rows=16)
    buf = torch.empty(3, D, dtype=F64)
    for b in x.split(3):
        buf[: b.shape[0]] = b
        acc.update(buf[: b.shape[0]])  # the caller reuses its buffer for the next batch
        assert acc.buffered_rows < 16
        buf.fill_(float("nan"))
    assert acc.rows == N and acc.block_rows == 16
    assert _max_rel(acc.spectrum().singular_values, torch.linalg.svdvals(x)) <= 1e-12
    assert StreamingFactor(D).block_rows == max(2 * D, 256)


def test_other_dtypes_are_accumulated_in_float64() -> None:
    x = _well_conditioned(11).float()
    acc = _stream(x, 9)
    assert acc.factor().dtype == F64
    assert _max_rel(acc.spectrum().singular_values, torch.linalg.svdvals(x.double())) <= 1e-12


# ---------------------------------------------------------------------------- bad input


def test_dimension_change_is_a_data_error_naming_the_shapes() -> None:
    acc = StreamingFactor().update(torch.ones(4, 5))
    with pytest.raises(DataError, match=r"batch 1.*\(2, 6\).*\(·, 5\)"):
        acc.update(torch.ones(2, 6))
    with pytest.raises(DataError, match=r"\(·, 5\).*\(·, 6\)"):
        acc.merge(StreamingFactor().update(torch.ones(2, 6)))
    with pytest.raises(DataError, match="different feature dimensions"):
        StreamingFactor.merge_all([acc, StreamingFactor(6)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_a_data_error(bad: float) -> None:
    acc = StreamingFactor().update(torch.ones(3, 4))
    x = torch.ones(5, 4)
    x[2, 1] = bad
    with pytest.raises(
        DataError, match=r"batch 1 of shape \(5, 4\) has 1 NaN/Inf value\(s\) \(first in row 2\)"
    ):
        acc.update(x)
    assert acc.rows == 3 and acc.batches == 1  # the bad batch was not folded in


@pytest.mark.parametrize(
    ("phi", "match"),
    [
        (torch.ones(0, 4), "empty batch"),
        (torch.ones(4), r"2-D \(B, D\).*shape \(4,\)"),
        (torch.ones(2, 3, 4), r"shape \(2, 3, 4\); flatten"),
        (torch.ones(2, 0), "no columns"),
        (torch.ones(2, 2, dtype=torch.complex128), "real"),
        ([[1.0, 2.0]], "torch.Tensor"),
    ],
)
def test_malformed_batches_are_data_errors(phi: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        StreamingFactor().update(phi)  # type: ignore[arg-type]


def test_empty_inputs_give_clear_errors() -> None:
    with pytest.raises(DataError, match="yielded no batch"):
        feature_factor(lambda b: b, [])
    with pytest.raises(DataError, match="accumulate at least one batch"):
        StreamingFactor(4).spectrum()
    with pytest.raises(DataError, match="no batch was accumulated"):
        StreamingFactor().factor()
    with pytest.raises(DataError, match="at least one"):
        StreamingFactor.merge_all([])


def test_bad_options_are_config_errors() -> None:
    acc = _stream(_well_conditioned(12), 50)
    for rtol in (0.0, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="rtol"):
            acc.spectrum(rtol=rtol)
    for value in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="block_rows"):
            StreamingFactor(block_rows=value)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="max_rows"):
            feature_factor(lambda b: b, [torch.ones(2, 2)], max_rows=value)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="itself"):
        acc.merge(acc)
    with pytest.raises(DataError, match="rows = 0"):
        StreamingFactor.from_factor(torch.eye(3), rows=0)


# ---------------------------------------------------------------------------- FactorSpectrum.from_factor


def test_from_factor_uses_the_row_count_of_x_not_of_r() -> None:
    x = _deficient(13, n=300, d=16)
    r = torch.linalg.qr(x, mode="r").R  # (16, 16)
    spec, ref = FactorSpectrum.from_factor(r, rows=300), FactorSpectrum.of(x)
    assert spec.rtol == ref.rtol == 300 * EPS64 != FactorSpectrum.of(r).rtol
    _assert_same_decision(spec, ref, rel=1e-11)
    # a thin factor (m < min(N, D)) is padded: still min(N, D) values, the extra ones exactly zero
    thin = ref.factor()  # (12, 16), FᵀF = K on the retained subspace
    spec_thin = FactorSpectrum.from_factor(thin, rows=300)
    assert spec_thin.singular_values.shape == (16,) and spec_thin.rank == 12
    assert rel_err(spec_thin.kappa().kappa, ref.kappa().kappa) <= 1e-11
    with pytest.raises(ConfigError, match="rows"):
        FactorSpectrum.from_factor(r, rows=0)
    with pytest.raises(NumericalError, match="NaN"):
        FactorSpectrum.from_factor(torch.full((2, 2), float("nan")), rows=2)
