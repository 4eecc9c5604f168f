"""Condition-number immunization (Algorithm 1, spec §§4–5, 7, 8): behaviour and exact one-step maths.

* Behaviour: on a synthetic task with designed spectra the default config immunizes (RIR ≫ 1 with
  (ii) ≤ 1) while the R_ill-only baseline does not; thresholds are about half the measured effect
  in log space (DESIGN §6).
* One preconditioned R_well step (R_ill step) lowers κ(H_P) (raises κ(H_H)), keeps the Hessian's
  eigenvectors, and equals the closed form θ_0 − τ·2P_Kθ_0G (Theorem 4.3).
* The task-step guard keeps R_ill-only finite.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.defenses import DEFENSES
from immunekit.experiments.linear import kappa_pair
from immunekit.metrics import rir
from immunekit.models.base import LinearModel, linear_model
from immunekit.spectral import (
    condition_number,
    covariance,
    g_ill,
    g_well,
    linear_l2_hessian,
    make_preconditioner,
    r_ill_step_bound,
    r_well_step_bound,
)

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Behaviour (Definition 3.1 / Table 1 pattern)
# ---------------------------------------------------------------------------------------------

BEHAVIOUR_TASK = {"dim": 16, "n": 512, "cond_primary": 100.0, "cond_harmful": 10.0, "seed": 0}


@pytest.fixture(scope="module")
def behaviour() -> dict[str, object]:
    task = gaussian_spectra(**BEHAVIOUR_TASK)
    model0 = linear_model(task.input_dim)
    x_h, x_p = task.harmful.x, task.primary.x
    ref = kappa_pair(model0.theta, x_h, x_p)
    out: dict[str, object] = {"task": task}
    for name in ("condition_number", "rill_only"):
        defense = DEFENSES.get(name)()
        model = defense.fit(model0, task, seed=0)
        out[name] = rir(ref, kappa_pair(model.theta, x_h, x_p))
        out[name + "_model"] = model
        out[name + "_defense"] = defense
    return out


def test_condition_number_immunizes_a_designed_spectra_task(behaviour: dict) -> None:
    r = behaviour["condition_number"]
    # Measured with the default config on gaussian_spectra(dim=16, n=512, cond_primary=100,
    # cond_harmful=10, seed=0): RIR = 887.1 (log 6.788), (i) = 17.68 (log 2.873),
    # (ii) = 0.01993 (log −3.916). Thresholds: about half of each effect in log space.
    assert r.rir >= 10.0
    assert r.kappa_ratio_primary <= 1.0
    assert r.log_rir >= 3.39
    assert math.log(r.kappa_ratio_harmful) >= 1.44
    assert math.log(r.kappa_ratio_primary) <= -1.96


def test_condition_number_keeps_the_primary_task(behaviour: dict) -> None:
    # Condition (c): θ^I stays invertible, so the best primary probe loses nothing.
    task: Task = behaviour["task"]
    model: LinearModel = behaviour["condition_number_model"]
    info = condition_number(model.theta)
    assert info.rank == task.input_dim
    assert math.isfinite(info.kappa)


def test_rill_only_fails_where_condition_number_succeeds(behaviour: dict) -> None:
    cn, ro = behaviour["condition_number"], behaviour["rill_only"]
    # Measured (same task, defaults): rill_only RIR = 15.26 (log 2.726) with (i) = 4.45e8 and
    # (ii) = 2.9e7 (log 17.19): it makes *both* probes harder. Half-effect thresholds: log (ii) ≥ 8.6,
    # or a log-RIR gap to condition_number of ≥ (6.788 − 2.726)/2 ≈ 2.03.
    assert ro.kappa_ratio_primary > 1.0 or ro.log_rir < cn.log_rir
    assert math.log(ro.kappa_ratio_primary) >= 8.6 or cn.log_rir - ro.log_rir >= 2.03
    assert math.log(ro.kappa_ratio_harmful) > 0.0  # it does raise κ(H_H)


def test_history_has_one_entry_per_step_and_final_kappa_matches(behaviour: dict) -> None:
    for name in ("condition_number", "rill_only"):
        defense = behaviour[name + "_defense"]
        model = behaviour[name + "_model"]
        assert [h["step"] for h in defense.history_] == list(range(defense.config.steps))
        task: Task = behaviour["task"]
        lk = condition_number(linear_l2_hessian(model.theta, covariance(task.primary.x)), hermitian=True)
        # the smallest eigenvalue carries a relative error of about κ·eps
        tol = max(1e-9, 100 * lk.kappa * torch.finfo(F64).eps)
        assert defense.info_["final_log_kappa_primary"] == pytest.approx(lk.log_kappa, abs=tol)


def test_without_the_task_loss_kappa_primary_never_increases() -> None:
    # safeguard_against="previous": R_well (guarded) lowers κ(H_P) and the primary safeguard
    # backtracks the R_ill step, so with no task gradient the joint step is monotone in κ(H_P)
    # (measured max increase: −3.9e-5).
    task = gaussian_spectra(dim=8, n=128, cond_primary=100.0, cond_harmful=10.0, seed=1)
    d = DEFENSES.get("condition_number")(task_loss=False, steps=40, safeguard_against="previous")
    d.fit(linear_model(8), task, seed=0)
    lk = [h["log_kappa_primary"] for h in d.history_] + [d.info_["final_log_kappa_primary"]]
    for t, (a, b) in enumerate(itertools.pairwise(lk)):
        assert b <= a + 1e-12, f"κ(H_P) rose at step {t}: {a} -> {b}"
    assert lk[-1] < lk[0]


def test_default_safeguard_keeps_kappa_primary_at_or_below_theta0() -> None:
    # safeguard_against="initial" (default): κ(H_P) may rise between steps but never above its
    # value at θ_0 — condition (ii) of Definition 3.1 holds at every iterate, and R_ill gets
    # larger steps than under the per-step rule, so κ(H_H) ends higher.
    task = gaussian_spectra(dim=8, n=128, cond_primary=100.0, cond_harmful=10.0, seed=1)
    d = DEFENSES.get("condition_number")(task_loss=False, steps=40)
    assert d.config.safeguard_against == "initial"
    d.fit(linear_model(8), task, seed=0)
    lk = [h["log_kappa_primary"] for h in d.history_] + [d.info_["final_log_kappa_primary"]]
    assert max(lk) <= lk[0] + 1e-12
    strict = DEFENSES.get("condition_number")(task_loss=False, steps=40, safeguard_against="previous")
    strict.fit(linear_model(8), task, seed=0)
    assert d.info_["final_log_kappa_harmful"] > strict.info_["final_log_kappa_harmful"]


def test_condition_number_ignores_harmful_labels() -> None:
    # Immunization uses only X_H (spec §1): permuting or replacing harmful targets changes nothing.
    task = gaussian_spectra(dim=6, n=64, cond_primary=30.0, cond_harmful=5.0, seed=2)
    y = torch.randn(len(task.harmful), generator=torch.Generator().manual_seed(0), dtype=F64)
    other = _replace_harmful(task, y)
    a = DEFENSES.get("condition_number")(steps=10).fit(linear_model(6), task, seed=0)
    b = DEFENSES.get("condition_number")(steps=10).fit(linear_model(6), other, seed=0)
    assert torch.equal(a.theta, b.theta)


def _replace_harmful(task: Task, y: torch.Tensor) -> Task:
    h = Dataset(task.harmful.x, y, task.harmful.ids)
    return Task(
        name=task.name,
        version=task.version,
        loss=task.loss,
        primary=task.primary,
        harmful=h,
        attack=h,
        eval_primary=task.eval_primary,
        eval_harmful=task.eval_harmful,
    )


# ---------------------------------------------------------------------------------------------
# One Algorithm-1 step, closed form (Theorem 4.3)
# ---------------------------------------------------------------------------------------------

STEP_TASK = {"dim": 6, "n": 64, "cond_primary": 50.0, "cond_harmful": 5.0, "seed": 1}


def _theta0(d: int) -> LinearModel:
    m = linear_model(d)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        m.extractor.weight.add_(0.1 * torch.randn(d, d, generator=g, dtype=F64))
    return m


def _assert_separated(eigs: torch.Tensor, rel_gap: float = 1e-5) -> None:
    # eigenvector error ≈ eps·λ_max/gap, so 1e-5 keeps |cos| within 1e-10 of the truth
    e = eigs.sort(descending=True).values
    gaps = (e[:-1] - e[1:]) / e[0]
    assert float(gaps.min()) > rel_gap, f"spectrum not separated: {e}"


def _assert_same_eigenvectors(h0: torch.Tensor, h1: torch.Tensor) -> None:
    w0, v0 = torch.linalg.eigh(h0)
    w1, v1 = torch.linalg.eigh(h1)
    _assert_separated(w0)
    _assert_separated(w1)
    cos = (v1.T @ v0).abs()  # (new, old) |cosines|
    best = cos.max(dim=1).values
    assert float(best.min()) >= 1 - 1e-8, f"eigenvectors moved: min |cos| = {float(best.min())}"
    # ... and the matching is a permutation (each old vector used once)
    assert sorted(cos.argmax(dim=1).tolist()) == list(range(h0.shape[0]))


def _eigenvectors_moved(h0: torch.Tensor, h1: torch.Tensor) -> float:
    v0 = torch.linalg.eigh(h0)[1]
    v1 = torch.linalg.eigh(h1)[1]
    return 1 - float((v1.T @ v0).abs().max(dim=1).values.min())


def _one_step(name: str, *, lam_p: float, lam_h: float, **kw: object):
    task = gaussian_spectra(**STEP_TASK)
    model = _theta0(task.input_dim)
    d = DEFENSES.get(name)(
        steps=1,
        task_loss=False,
        primary_safeguard=False,
        balance="fixed",
        lambda_primary=lam_p,
        lambda_harmful=lam_h,
        guard=True,
        **kw,
    )
    out = d.fit(model, task, seed=0)
    return task, model.theta, out.theta, d


@pytest.mark.parametrize("clipped", [False, True], ids=["free", "clipped"])
def test_one_r_well_step_is_the_closed_form_and_lowers_kappa_primary(clipped: bool) -> None:
    task = gaussian_spectra(**STEP_TASK)
    theta0 = _theta0(task.input_dim).theta
    k_p = covariance(task.primary.x)
    h0 = linear_l2_hessian(theta0, k_p)
    sg = g_well(h0)
    bound = r_well_step_bound(sg.eigenvalues)
    lr = 0.005
    lam = 1e6 if clipped else 0.5 * bound / lr  # clipped: λ far above the bound

    _, theta0_, theta1, d = _one_step("condition_number", lam_p=lam, lam_h=0.0, lr=lr)
    assert torch.equal(theta0_, theta0)
    rec = d.history_[0]
    assert rec["clipped_primary"] == float(clipped)
    tau = rec["tau_primary"]
    if clipped:  # the guard keeps τ inside the admissible interval (0, bound]
        assert 0.0 < tau <= bound
    else:
        assert tau == pytest.approx(lr * lam, rel=1e-12)
    assert rec["tau_harmful"] == 0.0

    proj = make_preconditioner(k_p).projector
    expected = theta0 - tau * 2.0 * proj @ theta0 @ sg.g
    assert torch.allclose(theta1, expected, rtol=0, atol=1e-12), float((theta1 - expected).abs().max())

    h1 = linear_l2_hessian(theta1, k_p)
    k0 = condition_number(h0, hermitian=True).kappa
    k1 = condition_number(h1, hermitian=True).kappa
    assert k1 < k0
    _assert_same_eigenvectors(h0, h1)
    # Theorem 4.3: σ_i' = σ_i(1 − 2τg_i)², g_1 = σ_1(1 − 1/p), g_i = −σ_i/p. (At τ = bound
    # 1 − 2τg_1 = κ^{-1/2}, so σ_1 lands on σ_p: a near-tie by construction.)
    sig = sg.eigenvalues
    p = sig.numel()
    g = -sig / p
    g[0] = sig[0] * (1 - 1 / p)
    predicted = (sig * (1 - 2 * tau * g) ** 2).sort(descending=True).values
    got = torch.linalg.eigvalsh(h1).flip(0)
    assert torch.allclose(got, predicted, rtol=1e-10, atol=0)


def _r_ill_setup(clipped: bool) -> dict:
    task = gaussian_spectra(**STEP_TASK)
    theta0 = _theta0(task.input_dim).theta
    k_h = covariance(task.harmful.x)
    h0 = linear_l2_hessian(theta0, k_h)
    sg = g_ill(h0, delta_min=1e-300)
    bound = r_ill_step_bound(sg.eigenvalues, sg.delta, sg.rank)
    lr = 0.005
    lam = 1e3 * bound / lr if clipped else 0.5 * bound / lr  # clipped: λ far above the bound
    # rill_only refuses any λ_P ≠ 0 (it has no R_well term), so λ_P = 0 is passed explicitly.
    _, _, theta1, d = _one_step("rill_only", lam_p=0.0, lam_h=lam, lr=lr)
    tau = d.history_[0]["tau_harmful"]
    if clipped:  # the guard keeps τ inside the admissible interval (0, bound]
        assert 0.0 < tau <= bound
    else:
        assert tau == pytest.approx(lr * lam, rel=1e-12)
    return {
        "theta0": theta0,
        "theta1": theta1,
        "k_h": k_h,
        "h0": h0,
        "sg": sg,
        "tau": tau,
        "defense": d,
        "h1": linear_l2_hessian(theta1, k_h),
    }


@pytest.mark.parametrize("clipped", [False, True], ids=["free", "clipped"])
def test_one_r_ill_step_is_the_closed_form(clipped: bool) -> None:
    c = _r_ill_setup(clipped)
    rec = c["defense"].history_[0]
    assert rec["clipped_harmful"] == float(clipped)
    assert rec["tau_primary"] == 0.0
    proj = make_preconditioner(c["k_h"]).projector
    expected = c["theta0"] - c["tau"] * 2.0 * proj @ c["theta0"] @ c["sg"].g
    err = float((c["theta1"] - expected).abs().max())
    assert torch.allclose(c["theta1"], expected, rtol=0, atol=1e-12), err


def _check_r_ill_step_raises_kappa_and_keeps_eigenvectors(c: dict) -> None:
    h0, h1, sg, tau = c["h0"], c["h1"], c["sg"], c["tau"]
    k0, k1 = condition_number(h0, hermitian=True), condition_number(h1, hermitian=True)
    assert k1.rank == k0.rank, f"the step annihilated a direction: rank {k0.rank} -> {k1.rank}"
    assert k1.kappa > k0.kappa
    _assert_same_eigenvectors(h0, h1)
    # Theorem 4.3: σ_i' = σ_i(1 − 2τg_i)², g_k = σ_k(1 − 1/k)/Δ², g_i = −σ_i/(kΔ²)
    sig, k, dlt = sg.eigenvalues, sg.rank, sg.delta
    g = -sig / (k * dlt**2)
    g[k - 1] = sig[k - 1] * (1 - 1 / k) / dlt**2
    assert float(1 - 2 * tau * g[k - 1]) > 0
    predicted = (sig * (1 - 2 * tau * g) ** 2).sort(descending=True).values
    got = torch.linalg.eigvalsh(h1).flip(0)
    assert torch.allclose(got, predicted, rtol=1e-10, atol=0)


def test_an_admissible_r_ill_step_raises_kappa_harmful_and_keeps_eigenvectors() -> None:
    _check_r_ill_step_raises_kappa_and_keeps_eigenvectors(_r_ill_setup(clipped=False))


def test_the_guard_clipped_r_ill_step_raises_kappa_harmful_without_losing_rank() -> None:
    _check_r_ill_step_raises_kappa_and_keeps_eigenvectors(_r_ill_setup(clipped=True))


def test_default_rill_only_keeps_the_extractor_invertible() -> None:
    # Defaults on the behaviour task: step 0 is clipped by the R_ill guard; clipping at the bound
    # itself (a former bug) gave θ_1 with σ_min/σ_max = 2e-16, i.e. rank 15 of 16.
    task = gaussian_spectra(**BEHAVIOUR_TASK)
    d = DEFENSES.get("rill_only")(steps=1)
    theta = d.fit(linear_model(task.input_dim), task, seed=0).theta
    assert d.history_[0]["clipped_harmful"] == 1.0
    sv = torch.linalg.svdvals(theta)
    assert float(sv[-1] / sv[0]) > 1e-8


def test_without_preconditioning_the_step_moves_the_eigenvectors() -> None:
    # The ablation preconditioner='none' is the plain gradient 2Kθ G: Theorem 4.3 no longer applies,
    # so the same check that passes above must detect rotated eigenvectors here.
    task = gaussian_spectra(**STEP_TASK)
    theta0 = _theta0(task.input_dim).theta
    k_p = covariance(task.primary.x)
    h0 = linear_l2_hessian(theta0, k_p)
    bound = r_well_step_bound(g_well(h0).eigenvalues)
    lam = 0.5 * bound / 0.005 / float(torch.linalg.eigvalsh(k_p)[-1])  # a comparable step size
    _, _, theta1, _ = _one_step("condition_number", lam_p=lam, lam_h=0.0, lr=0.005, preconditioner="none")
    assert _eigenvectors_moved(h0, linear_l2_hessian(theta1, k_p)) > 1e-6


# ---------------------------------------------------------------------------------------------
# λ balancing at θ_0 and the task-step guard
# ---------------------------------------------------------------------------------------------


def test_init_balance_equalises_the_preconditioned_terms_at_theta0() -> None:
    task = gaussian_spectra(**STEP_TASK)
    theta0 = _theta0(task.input_dim).theta
    k_p, k_h = covariance(task.primary.x), covariance(task.harmful.x)
    d_p = make_preconditioner(k_p).spectral_step(theta0, g_well(linear_l2_hessian(theta0, k_p)).g)
    d_h = make_preconditioner(k_h).spectral_step(theta0, g_ill(linear_l2_hessian(theta0, k_h)).g)
    d = DEFENSES.get("condition_number")(steps=1, lambda_primary=2.0)
    d.fit(_theta0(task.input_dim), task, seed=0)
    assert d.info_["lambda_primary"] == 2.0
    assert d.info_["lambda_harmful"] == pytest.approx(2.0 * float(d_p.norm()) / float(d_h.norm()), rel=1e-10)


@pytest.mark.parametrize("lr", [0.005, 1.0])
def test_task_step_guard_keeps_rill_only_finite(lr: float) -> None:
    # Measured on this task: with lr=1.0 the guard caps the task step on 100 of 100 steps, and
    # task_step_guard=False overflows within the run (not asserted: "may diverge").
    task = gaussian_spectra(dim=8, n=128, cond_primary=100.0, cond_harmful=10.0, seed=0)
    d = DEFENSES.get("rill_only")(steps=100, lr=lr)
    model = d.fit(linear_model(8), task, seed=0)
    assert torch.isfinite(model.theta).all()
    assert torch.isfinite(model.omega).all()
    assert len(d.history_) == 100
    losses = [h["task_loss"] for h in d.history_]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert all(h["task_lr"] <= lr for h in d.history_)
    if lr == 1.0:
        assert sum(h["task_lr_capped"] for h in d.history_) > 0  # the guard was exercised
