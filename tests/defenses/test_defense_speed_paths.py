"""The fast paths of the Algorithm-1 family equal the original dense computations.

``SpectralLinearDefense.use_fast_paths`` switches between them. On small float64 problems, one
with a singular K (rank 30 of 40) and one with a full-rank K, the fast fit must give the same
final θ (1e-9 relative), the same safeguard decisions (halvings), clips and RIR; the pieces of
one step (directions, projections, H, the safeguard) are compared directly as well. The certified
screening of safeguard candidates, which only runs for rank K_P ≥ SCREEN_MIN_RANK, is forced on.
"""

from __future__ import annotations

import math

import pytest
import torch

from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Task
from immunekit.defenses import DEFENSES
from immunekit.defenses import condition_number as cn
from immunekit.experiments.linear import kappa_pair
from immunekit.metrics import rir
from immunekit.models.base import linear_model
from immunekit.spectral import linear_l2_hessian

F64 = torch.float64
SPECTRAL = ("condition_number", "rill_only", "opt_kappa")

# n = 40 rows per domain, 30 of them for training: K_P, K_H have rank 30 < D = 40.
SINGULAR = {"dim": 40, "n": 40, "cond_primary": 100.0, "cond_harmful": 10.0, "seed": 3}
FULL = {"dim": 12, "n": 256, "cond_primary": 50.0, "cond_harmful": 10.0, "seed": 1}


@pytest.fixture(scope="module")
def singular() -> Task:
    return gaussian_spectra(**SINGULAR)


@pytest.fixture(scope="module")
def full() -> Task:
    return gaussian_spectra(**FULL)


def _fit(name: str, task: Task, fast: bool, **overrides: object):
    defense = DEFENSES.get(name)(**{"steps": 20, **overrides})
    defense.use_fast_paths = fast
    model = defense.fit(linear_model(task.input_dim), task, seed=0)
    return model, defense


def _assert_same_fit(task: Task, name: str, **overrides: object) -> None:
    ref_model, ref = _fit(name, task, False, **overrides)
    new_model, new = _fit(name, task, True, **overrides)
    dev = float((new_model.theta - ref_model.theta).norm() / ref_model.theta.norm())
    assert dev <= 1e-9, f"θ deviates by {dev:.2e}"
    assert torch.allclose(new_model.omega, ref_model.omega, rtol=1e-9, atol=1e-12)
    for key in ("safeguard_halvings", "clipped_primary", "clipped_harmful", "task_lr_capped"):
        assert [h[key] for h in new.history_] == [h[key] for h in ref.history_], key
    for key in ("log_kappa_primary", "log_kappa_harmful", "tau_primary", "tau_harmful"):
        a = torch.tensor([h[key] for h in ref.history_], dtype=F64)
        b = torch.tensor([h[key] for h in new.history_], dtype=F64)
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10), key
    assert new.info_.keys() == ref.info_.keys()
    assert new.info_["preconditioner_primary"] == ref.info_["preconditioner_primary"]
    final = ref.info_["final_log_kappa_primary"]
    assert new.info_["final_log_kappa_primary"] == pytest.approx(final, abs=1e-9)
    x_h, x_p = task.harmful.x, task.primary.x
    base = kappa_pair(linear_model(task.input_dim).theta, x_h, x_p)
    r_ref = rir(base, kappa_pair(ref_model.theta, x_h, x_p))
    r_new = rir(base, kappa_pair(new_model.theta, x_h, x_p))
    assert r_new.rir == pytest.approx(r_ref.rir, rel=1e-8)


@pytest.mark.parametrize("name", SPECTRAL)
def test_fast_fit_equals_reference_with_a_singular_k(singular: Task, name: str) -> None:
    _assert_same_fit(singular, name)


@pytest.mark.parametrize("name", SPECTRAL)
def test_fast_fit_equals_reference_with_a_full_rank_k(full: Task, name: str) -> None:
    _assert_same_fit(full, name)


@pytest.mark.parametrize(
    "overrides",
    [
        {"task_loss": False},
        {"primary_subspace": False},
        {"preconditioner": "ridge", "ridge": 1e-6},
        {"safeguard_against": "previous"},
        {"balance": "per_step"},
        {"balance": "fixed", "lambda_primary": 1.0, "lambda_harmful": 1e-4},
        {"rank_rtol": 1e-10},
    ],
)
def test_fast_fit_equals_reference_for_config_variants(singular: Task, overrides: dict) -> None:
    _assert_same_fit(singular, "condition_number", **overrides)


def test_screened_safeguard_takes_the_same_decisions(singular: Task, monkeypatch) -> None:
    # Force the certified screening (normally only for rank K_P ≥ 384) and count what it rejects.
    monkeypatch.setattr(cn, "SCREEN_MIN_RANK", 0)
    calls = {"rejected": 0, "kept": 0}
    original = cn._Screen.certainly_above

    def counting(self, tau: float, limit: float) -> bool:
        out = original(self, tau, limit)
        calls["rejected" if out else "kept"] += 1
        return out

    monkeypatch.setattr(cn._Screen, "certainly_above", counting)
    # the per-step rule rejects many trial steps here, so the screen's rejections get exercised
    for overrides in ({}, {"task_loss": False}, {"safeguard_against": "previous"}):
        _assert_same_fit(singular, "condition_number", **overrides)
    assert calls["rejected"] > 0, calls


def test_one_step_pieces_equal_the_reference(singular: Task) -> None:
    defense = DEFENSES.get("condition_number")()
    g = torch.Generator().manual_seed(0)
    d = singular.input_dim
    theta0 = torch.eye(d, dtype=F64)
    su = defense._setup(theta0, singular)
    fs = defense._fast_setup(theta0, singular)
    # a θ of the primary-subspace form P_N + P_VθP_V, as the iteration keeps it
    theta = theta0 + su.project(0.05 * torch.randn(d, d, generator=g, dtype=F64))
    pp = fs.kappa_p(theta)
    assert pp.info == su.kappa_p(theta) or abs(pp.info.log_kappa - su.kappa_p(theta).log_kappa) < 1e-12
    assert pp.info.rank == su.kappa_p(theta).rank
    h = linear_l2_hessian(theta, su.k_p)
    assert float((pp.hessian() - h).abs().max()) <= 1e-13 * float(h.abs().max())
    delta = torch.randn(d, d, generator=g, dtype=F64)
    assert float((fs.project(delta) - su.project(delta)).abs().max()) <= 1e-13 * float(delta.abs().max())
    sp, sh, d_p, d_h = defense._directions(theta, su)
    fsp, fsh, fd_p, fd_h, _ = defense._fast_directions(theta, fs, pp, primary=True)
    assert fd_p is not None
    for a, b in ((fsp.g, sp.g), (fsh.g, sh.g), (fd_p, d_p), (fd_h, d_h)):
        assert float((a - b).norm() / b.norm()) <= 1e-10
    assert (fsp.rank, fsh.rank) == (sp.rank, sh.rank)
    assert fsh.delta == pytest.approx(sh.delta, rel=1e-10)


def test_fast_safeguard_matches_the_reference_backtracking(singular: Task, monkeypatch) -> None:
    monkeypatch.setattr(cn, "SCREEN_MIN_RANK", 0)
    defense = DEFENSES.get("condition_number")()
    d = singular.input_dim
    theta = torch.eye(d, dtype=F64)
    su = defense._setup(theta, singular)
    fs = defense._fast_setup(theta, singular)
    _, _, _, d_h = defense._directions(theta, su)
    limit = su.kappa_p(theta).log_kappa
    for tau in (1e3, 10.0, 1e-1, 1e-3):  # from far too large (many halvings) to accepted at once
        defense._prev_halvings = 0
        ref = defense._safe_harmful_step(theta, d_h, tau, su, limit)
        defense._prev_halvings = 0
        tau_h, halvings, point = defense._fast_safe_harmful_step(theta, d_h, tau, fs, limit, theta)
        assert (tau_h, halvings) == ref
        if point is not None:
            # the accepted candidate and its κ are what the next step starts from
            assert torch.equal(point.theta, theta - tau_h * d_h)
            # thin and full factor differ by rounding: within TIE_MARGIN the reference decided
            assert point.info.log_kappa <= limit + cn.TIE_MARGIN * max(1.0, abs(limit))
            assert point.info.log_kappa == pytest.approx(su.kappa_p(point.theta).log_kappa, abs=1e-12)


def test_rill_only_skips_the_unused_primary_direction_but_records_its_value(singular: Task) -> None:
    _, ref = _fit("rill_only", singular, False)
    _, new = _fit("rill_only", singular, True)
    a = torch.tensor([h["reg_primary"] for h in ref.history_], dtype=F64)
    b = torch.tensor([h["reg_primary"] for h in new.history_], dtype=F64)
    assert torch.allclose(a, b, rtol=1e-9)
    assert all(h["tau_primary"] == 0.0 for h in new.history_)


@pytest.mark.parametrize("start", [0, 1, 7, 29, 30])
def test_warm_safeguard_search_equals_cold_backtracking_on_an_interval(start: int) -> None:
    # accept(j) ⇔ j ≥ j*: the accepted τ = τ0·2^-j form an interval [0, τ*]
    for j_star in range(0, 32):  # 31: no candidate accepted
        defense = DEFENSES.get("condition_number")(safeguard_search="warm")
        defense._prev_halvings = start
        calls: list[int] = []

        def accept(j: int, j_star: int = j_star, calls: list[int] = calls) -> bool:
            calls.append(j)
            return j >= j_star

        found = defense._search_halvings(accept)
        assert found == (None if j_star > 30 else j_star)
        assert len(set(calls)) == len(calls)  # no candidate evaluated twice
        assert calls[0] == max(start - 1, 0)
        assert len(calls) <= 2 * math.ceil(math.log2(abs(min(j_star, 30) - calls[0]) + 1)) + 2
        assert defense.safeguard_evaluations_ == len(calls)
        assert defense._prev_halvings == (0 if found is None else found)
        cold = DEFENSES.get("condition_number")(safeguard_search="cold")
        cold._prev_halvings = start
        assert cold._search_halvings(lambda j, j_star=j_star: j >= j_star) == found


def test_warm_search_is_local_when_the_accepted_set_is_not_an_interval() -> None:
    # accepted at j = 2 and j ≥ 10 only: cold backtracking finds 2, a warm start at 12 stops at 10
    accept = lambda j: j == 2 or j >= 10  # noqa: E731
    warm = DEFENSES.get("condition_number")()
    warm._prev_halvings = 13
    assert warm._search_halvings(accept) == 10
    cold = DEFENSES.get("condition_number")(safeguard_search="cold")
    assert cold._search_halvings(accept) == 2


def test_warm_and_cold_searches_give_the_same_fit_on_house_like_spectra(singular: Task) -> None:
    runs = {}
    for search in ("warm", "cold"):
        defense = DEFENSES.get("condition_number")(safeguard_search=search, steps=40)
        model = defense.fit(linear_model(singular.input_dim), singular, seed=0)
        runs[search] = (model.theta, defense.history_)
    (theta_w, hist_w), (theta_c, hist_c) = runs["warm"], runs["cold"]
    assert [h["safeguard_halvings"] for h in hist_w] == [h["safeguard_halvings"] for h in hist_c]
    assert torch.equal(theta_w, theta_c)
    assert sum(h["safeguard_evaluations"] for h in hist_w) <= sum(h["safeguard_evaluations"] for h in hist_c)
