"""Linear-probe Hessians (spec §3): closed forms against torch.func.hessian of the probe losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf
from hypothesis import given
from hypothesis import strategies as st
from torch.func import hessian
from torch.testing import assert_close

from immunekit.errors import NumericalError
from immunekit.spectral.condition import condition_number
from immunekit.spectral.hessians import (
    covariance,
    l2_probe_hessian,
    linear_l2_hessian,
    logistic_probe_hessian,
    softmax_probe_hessian,
    symmetrize,
)

from ._util import F64, SETTINGS, gen, seeds


def test_covariance_is_uncentred_second_moment() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=F64)
    expected = torch.tensor([[1 + 9 + 0.25, 2 - 3], [2 - 3, 4 + 1]], dtype=F64)
    assert_close(covariance(x), expected, rtol=0, atol=1e-15)
    # Not centred: a constant column contributes N·c², not 0.
    ones = torch.ones(4, 1, dtype=F64) * 3.0
    assert covariance(ones).item() == pytest.approx(36.0, rel=1e-15, abs=0)


def test_covariance_output_is_float64_and_symmetric() -> None:
    x = torch.randn(20, 6, generator=gen(0), dtype=torch.float32)
    k = covariance(x)
    assert k.dtype == F64
    assert torch.equal(k, k.T)
    assert_close(k, x.double().T @ x.double(), rtol=1e-14, atol=1e-13)


def test_covariance_rejects_non_2d() -> None:
    with pytest.raises(NumericalError):
        covariance(torch.ones(3, dtype=F64))


def test_mse_probe_hessian_is_gram_matrix() -> None:
    g = gen(1)
    phi = torch.randn(30, 5, generator=g, dtype=F64)
    y = torch.randn(30, generator=g, dtype=F64)
    h = l2_probe_hessian(phi)
    assert_close(h, phi.T @ phi, rtol=1e-14, atol=1e-13)

    def half_sse(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((phi @ w - y) ** 2).sum()

    assert_close(h, hessian(half_sse)(torch.zeros(5, dtype=F64)), rtol=1e-12, atol=1e-12)


def test_linear_l2_hessian_is_theta_t_k_theta() -> None:
    g = gen(2)
    x = torch.randn(25, 6, generator=g, dtype=F64)
    theta = torch.randn(6, 4, generator=g, dtype=F64)
    k = covariance(x)
    h = linear_l2_hessian(theta, k)
    assert h.shape == (4, 4)
    assert_close(h, theta.T @ k @ theta, rtol=1e-13, atol=1e-12)
    assert torch.equal(h, h.T)
    # It is half the Hessian in w of ‖Xθw − y‖² (the dropped factor 2 of spec §3).
    y = torch.randn(25, generator=g, dtype=F64)

    def sse(w: torch.Tensor) -> torch.Tensor:
        return ((x @ theta @ w - y) ** 2).sum()

    assert_close(2 * h, hessian(sse)(torch.zeros(4, dtype=F64)), rtol=1e-12, atol=1e-11)
    # H(I) = K.
    assert_close(linear_l2_hessian(torch.eye(6, dtype=F64), k), k, rtol=1e-15, atol=1e-14)


def test_linear_l2_hessian_rejects_mismatched_k() -> None:
    with pytest.raises(NumericalError):
        linear_l2_hessian(torch.ones(3, 2, dtype=F64), torch.eye(2, dtype=F64))


def test_linear_l2_hessian_kappa_of_identity_extractor() -> None:
    k = torch.diag(torch.tensor([9.0, 3.0, 1.0], dtype=F64))
    assert condition_number(linear_l2_hessian(torch.eye(3, dtype=F64), k)).kappa == pytest.approx(
        9.0, rel=1e-14, abs=0
    )
    theta = torch.diag(torch.tensor([1 / 3, 3**-0.5, 1.0], dtype=F64))  # equalises the spectrum
    assert condition_number(linear_l2_hessian(theta, k)).kappa == pytest.approx(1.0, rel=1e-14, abs=0)


@SETTINGS
@given(seed=seeds, n=st.integers(1, 12), d=st.integers(1, 6), w_scale=st.floats(0.0, 3.0))
def test_logistic_probe_hessian_matches_autograd(seed: int, n: int, d: int, w_scale: float) -> None:
    g = gen(seed)
    phi = torch.randn(n, d, generator=g, dtype=F64)
    w = w_scale * torch.randn(d, generator=g, dtype=F64)
    y = (torch.rand(n, generator=g, dtype=F64) > 0.5).to(F64)

    def loss(w_: torch.Tensor) -> torch.Tensor:
        return nnf.binary_cross_entropy_with_logits(phi @ w_, y, reduction="mean")

    expected = hessian(loss)(w)
    got = logistic_probe_hessian(phi, w)
    assert got.dtype == F64
    assert_close(got, expected, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(
    seed=seeds, n=st.integers(1, 10), d=st.integers(1, 5), c=st.integers(2, 5), w_scale=st.floats(0.0, 3.0)
)
def test_softmax_probe_hessian_matches_autograd(seed: int, n: int, d: int, c: int, w_scale: float) -> None:
    g = gen(seed)
    phi = torch.randn(n, d, generator=g, dtype=F64)
    w = w_scale * torch.randn(d, c, generator=g, dtype=F64)
    y = torch.randint(0, c, (n,), generator=g)

    def loss(w_flat: torch.Tensor) -> torch.Tensor:
        return nnf.cross_entropy(phi @ w_flat.reshape(d, c), y, reduction="mean")

    expected = hessian(loss)(w.reshape(-1))  # row-major flattening: index d·C + c
    got = softmax_probe_hessian(phi, w)
    assert got.shape == (d * c, d * c)
    assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_softmax_probe_hessian_flattening_is_row_major() -> None:
    """A column-major layout would fail this: with one sample φ = e_0, only rows/cols d=0 are non-zero."""
    phi = torch.tensor([[1.0, 0.0]], dtype=F64)
    w = torch.zeros(2, 3, dtype=F64)
    h = softmax_probe_hessian(phi, w)
    block = torch.eye(3, dtype=F64) / 3 - torch.full((3, 3), 1 / 9, dtype=F64)
    expected = torch.zeros(6, 6, dtype=F64)
    expected[:3, :3] = block
    assert_close(h, expected, rtol=0, atol=1e-15)


def test_probe_hessians_at_zero_head() -> None:
    """At w = 0, p = 1/2 (logistic) so H = ΦᵀΦ/(4N)."""
    phi = torch.randn(7, 3, generator=gen(3), dtype=F64)
    assert_close(logistic_probe_hessian(phi, torch.zeros(3)), phi.T @ phi / 28, rtol=1e-14, atol=1e-15)


def test_symmetrize() -> None:
    a = torch.tensor([[1.0, 2.0], [4.0, 3.0]], dtype=F64)
    assert_close(symmetrize(a), torch.tensor([[1.0, 3.0], [3.0, 3.0]], dtype=F64), rtol=0, atol=0)
