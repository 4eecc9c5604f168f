"""Shared builders for the spectral tests: orthogonal matrices, matrices with set spectra, strategies."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

F64 = torch.float64

# Small matrices, so 40 examples per property keep each property around a second.
# SPECTRAL_MAX_EXAMPLES=500 gives a longer soak run.
SETTINGS = settings(
    max_examples=int(os.environ.get("SPECTRAL_MAX_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(n: int, g: torch.Generator) -> Tensor:
    """Haar-distributed ``(n, n)`` orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def sym_with_spectrum(eigs: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Q diag(eigs) Qᵀ and Q (eigenvectors as columns, in the order of ``eigs``)."""
    eigs = eigs.to(F64)
    q = orthogonal(eigs.numel(), g)
    return (q * eigs) @ q.T, q


def with_singular_values(sig: Tensor, rows: int, cols: int, g: torch.Generator) -> Tensor:
    """U diag(sig) Vᵀ with random orthonormal U (rows×p), V (cols×p), p = len(sig) ≤ min(rows, cols)."""
    p = sig.numel()
    assert p <= min(rows, cols)
    u = orthogonal(rows, g)[:, :p]
    v = orthogonal(cols, g)[:, :p]
    return (u * sig.to(F64)) @ v.T


def log_uniform(lo: float, hi: float, *, min_size: int, max_size: int) -> st.SearchStrategy[Tensor]:
    """Lists of values 10**x, x uniform in [lo, hi], as a float64 tensor."""
    return st.lists(
        st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False),
        min_size=min_size,
        max_size=max_size,
    ).map(lambda xs: torch.tensor([10.0**x for x in xs], dtype=F64))


def separated_descending(
    *, min_size: int, max_size: int, min_ratio: float = 1.2, max_ratio: float = 4.0, low: float = 0.1
) -> st.SearchStrategy[Tensor]:
    """Strictly descending positive spectra whose consecutive ratios lie in [min_ratio, max_ratio]."""

    def build(args: tuple[float, list[float]]) -> Tensor:
        start, ratios = args
        vals = [start]
        for r in ratios:
            vals.append(vals[-1] * r)
        return torch.tensor(sorted(vals, reverse=True), dtype=F64)

    return st.tuples(
        st.floats(min_value=low, max_value=10 * low),
        st.lists(
            st.floats(min_value=min_ratio, max_value=max_ratio), min_size=min_size - 1, max_size=max_size - 1
        ),
    ).map(build)


def linear_instance(
    h_eigs: Tensor, k_eigs: Tensor, d_in: int, d_hid: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(θ, K, V_r) with K = Q_r diag(k_eigs) Q_rᵀ and θᵀKθ = V_r diag(h_eigs) V_rᵀ (in exact arithmetic).

    r = len(k_eigs) = len(h_eigs) is rank K ≤ d_in and rank H ≤ d_hid. θ is generic: it is not aligned
    with K's eigenvectors and, when K is singular, it has a component in K's null space, so P_K θ ≠ θ.
    """
    g = gen(seed)
    r = k_eigs.numel()
    assert h_eigs.numel() == r and r <= d_in and r <= d_hid
    q = orthogonal(d_in, g)
    q_r, q_null = q[:, :r], q[:, r:]
    k = (q_r * k_eigs) @ q_r.T
    rot = orthogonal(r, g)
    v_r = orthogonal(d_hid, g)[:, :r]
    theta = (q_r * k_eigs.rsqrt()) @ rot @ (h_eigs.sqrt()[:, None] * v_r.T)
    if r < d_in:
        theta = theta + q_null @ torch.randn(d_in - r, d_hid, generator=g, dtype=F64)
    return theta, k, v_r


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b))
