"""The whiten_primary baseline and the rank rule shared by every linear defense.

whiten_primary: θ = s_1·K_P^{-1/2} on range(K_P), identity on null(K_P), no training. κ(H_P) = 1, so
(ii) = 1/κ(K_P) and RIR is bought through (ii) alone. The Algorithm-1 family and IMMA decide null(K) by
the rank rule on the singular values of X (spectral.rank), which keeps a direction with σ/σ_1 = 1e-9
(λ/λ_max = 1e-18) that the old eigenvalues-of-K cut at D·eps dropped.
"""

from __future__ import annotations

import pytest
import torch

from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.errors import ConfigError
from immunekit.experiments.linear import kappa_pair
from immunekit.metrics import rir
from immunekit.models.base import linear_model
from immunekit.spectral import FactorSpectrum, condition_number, covariance

F64 = torch.float64


def _rank_deficient_task() -> Task:
    """D = 6; X_P has a zero column (rank 5), X_H a direction at σ/σ_1 = 1e-9 (kept by the rule)."""
    g = torch.Generator().manual_seed(0)
    n = 64
    xp = torch.randn(n, 6, generator=g, dtype=F64) * torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1, 0.0], dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    u, _ = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=F64))
    xh = (u * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.3, 5e-9], dtype=F64)) @ q.T
    yp, yh = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    ep, eh = torch.randn(16, 6, generator=g, dtype=F64), torch.randn(16, 6, generator=g, dtype=F64)
    ids = lambda tag, k: tuple(f"{tag}{i}" for i in range(k))  # noqa: E731
    harmful = Dataset(xh, yh, ids("h", n))
    return Task(
        name="rank_rule_demo",
        version="1",
        loss="mse",
        primary=Dataset(xp, yp, ids("p", n)),
        harmful=harmful,
        attack=harmful,
        eval_primary=Dataset(ep, torch.randn(16, generator=g, dtype=F64), ids("ep", 16)),
        eval_harmful=Dataset(eh, torch.randn(16, generator=g, dtype=F64), ids("eh", 16)),
    )


def test_whiten_primary_is_registered_and_whitens_exactly() -> None:
    task = _rank_deficient_task()
    model0 = linear_model(task.input_dim)
    defense = DEFENSES.get("whiten_primary")()
    out = defense.fit(model0, task, seed=0)
    assert torch.equal(model0.theta, torch.eye(6, dtype=F64))  # input not modified
    spec = FactorSpectrum.of(task.primary.x)
    assert spec.rank == 5
    v, s = spec.range_basis(), spec.singular_values[:5]
    expected = (v * (s[0] / s)) @ v.T + torch.eye(6, dtype=F64) - v @ v.T
    torch.testing.assert_close(out.theta, expected, rtol=0, atol=1e-13)
    assert not out.omega.any()
    # H_P = θᵀK_Pθ = s_1² V_rV_rᵀ: κ = 1, so (ii) = 1/κ(K_P) and RIR = (i)·κ(K_P)
    h = (task.primary.x @ out.theta).T @ (task.primary.x @ out.theta)
    torch.testing.assert_close(h, float(s[0]) ** 2 * v @ v.T, rtol=0, atol=1e-10)
    parts = rir(
        kappa_pair(model0.theta, task.harmful.x, task.primary.x),
        kappa_pair(out.theta, task.harmful.x, task.primary.x),
    )
    kappa_kp = float(s[0] / s[4]) ** 2
    assert parts.kappa_ratio_primary == pytest.approx(1 / kappa_kp, rel=1e-9)
    assert parts.rir == pytest.approx(parts.kappa_ratio_harmful * kappa_kp, rel=1e-9)
    assert defense.info_["rank_rule"]["primary"]["rank"] == 5


def test_whiten_primary_buys_rir_through_ii_on_a_designed_task() -> None:
    task = gaussian_spectra(dim=8, n=256, cond_primary=1e3, cond_harmful=10.0, seed=1)
    model0 = linear_model(8)
    out = DEFENSES.get("whiten_primary")().fit(model0, task, seed=0)
    parts = rir(
        kappa_pair(model0.theta, task.harmful.x, task.primary.x),
        kappa_pair(out.theta, task.harmful.x, task.primary.x),
    )
    assert parts.kappa_ratio_primary < 1e-2  # κ(H_P) = 1 against κ(K_P) ≈ 10³
    assert parts.rir > 10 * parts.kappa_ratio_harmful


def test_whiten_primary_whitens_the_features_of_a_non_identity_start() -> None:
    task = gaussian_spectra(dim=5, n=64, seed=2)
    g = torch.Generator().manual_seed(4)
    start = linear_model(5).with_weights(
        torch.eye(5, dtype=F64) + 0.3 * torch.randn(5, 5, generator=g, dtype=F64)
    )
    out = DEFENSES.get("whiten_primary")().fit(start, task, seed=0)
    phi = task.primary.x @ out.theta
    assert condition_number(phi.T @ phi, hermitian=True).kappa == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("bad", [0.0, -1e-3, 1.0])
def test_explicit_rank_rtol_outside_zero_one_is_a_config_error(bad: float) -> None:
    for name in ("whiten_primary", "condition_number", "rill_only", "opt_kappa"):
        with pytest.raises(ConfigError, match=r"rank_rtol must be a relative threshold in \(0, 1\), got"):
            DEFENSES.get(name)(rank_rtol=bad)


@pytest.mark.parametrize("name", ["condition_number", "opt_kappa", "imma"])
def test_defenses_decide_null_k_by_the_rank_rule_on_x(name: str) -> None:
    task = _rank_deficient_task()
    # the old rule (eigenvalues of K at D·eps) drops the σ/σ_1 = 1e-9 direction of X_H; the rule keeps it
    assert condition_number(covariance(task.harmful.x), hermitian=True).rank == 5
    assert FactorSpectrum.of(task.harmful.x).rank == 6
    defense = DEFENSES.get(name)(steps=3)
    defense.fit(linear_model(6), task, seed=0)
    rule = defense.info_["rank_rule"]
    assert (rule["primary"]["rank"], rule["harmful"]["rank"]) == (5, 6)
    assert rule["harmful"]["sigma_last_kept"] == pytest.approx(1e-9, rel=1e-4)
    if name != "imma":
        assert defense.info_["preconditioner_harmful"]["rank"] == 6
        assert defense.info_["preconditioner_primary"]["rank"] == 5
    # with a coarser explicit cut the same defense drops it, and records that
    if name != "imma":
        coarse = DEFENSES.get(name)(steps=3, rank_rtol=1e-6)
        coarse.fit(linear_model(6), task, seed=0)
        assert coarse.info_["rank_rule"]["harmful"]["rank"] == 5
        assert coarse.info_["rank_rule"]["harmful"]["rtol"] == 1e-6
