"""Linear-probe maths (spec §1 threat model, §7.4): closed-form heads, GD rates and κ.

The attacker fits w on frozen features A by GD on ‖Aw − Y‖², whose Hessian is 2AᵀA. With θ = I
the features are the inputs, so every test builds A with a set spectrum directly.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.data.task import Dataset, Task
from immunekit.metrics import steps_to_epsilon
from immunekit.models.base import linear_model

F64 = torch.float64


def _features(sv: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """(n, d) matrix U diag(sv) Vᵀ with orthonormal U (n×d) and orthogonal V."""
    g = torch.Generator().manual_seed(seed)
    d = sv.numel()
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (u * sv) @ v.T


def _gram_kappa_sv(kappa: float, d: int) -> torch.Tensor:
    """Singular values whose Gram matrix AᵀA has eigenvalues log-spaced in [1/κ, 1]."""
    return torch.logspace(0.0, -math.log10(kappa), d, dtype=F64).sqrt()


def _task(a: torch.Tensor, y: torch.Tensor, loss: str = "mse") -> Task:
    def ds(prefix: str) -> Dataset:
        return Dataset(a, y, tuple(f"{prefix}:{i}" for i in range(a.shape[0])))

    return Task(
        name="probe-math",
        version="test",
        loss=loss,  # type: ignore[arg-type]
        primary=ds("p"),
        harmful=ds("h"),
        attack=ds("h"),
        eval_primary=ds("ep"),
        eval_harmful=ds("eh"),
    )


def _probe(task: Task, budget: AttackBudget, *, model=None, seed: int = 0, **cfg: object):
    model = linear_model(task.input_dim) if model is None else model
    return ATTACKS.get(cfg.pop("attack", "linear_probe"))(**cfg)(model, task, budget, seed=seed)  # type: ignore[arg-type]


def _targets(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# Closed form
# ---------------------------------------------------------------------------------------------


def test_closed_form_head_equals_numpy_lstsq() -> None:
    a = _features(torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.1], dtype=F64), 40, seed=1)
    y = _targets(40, 2)
    res = _probe(_task(a, y), AttackBudget(steps=1), attack="closed_form_probe")
    w = res.model.head.weight.detach().T  # (D, 1)
    ref, *_ = np.linalg.lstsq(a.numpy(), y.numpy()[:, None], rcond=None)
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert res.records[0].norm_ratio == 0.0
    assert res.stopped_by == "converged"


def test_closed_form_head_is_the_min_norm_pinv_solution_for_rank_deficient_features() -> None:
    d, n = 6, 40
    x = _features(torch.linspace(2.0, 1.0, d, dtype=F64), n, seed=3)
    theta = _features(torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0, 0.0], dtype=F64), d, seed=4)  # rank 4
    model = linear_model(d)
    with torch.no_grad():
        model.extractor.weight.copy_(theta.T)
    y = _targets(n, 5)
    res = _probe(_task(x, y), AttackBudget(steps=1), model=model, attack="closed_form_probe")
    a = (x @ theta).numpy()
    ref = np.linalg.pinv(a, rcond=1e-10) @ y.numpy()[:, None]
    np.testing.assert_allclose(res.model.head.weight.detach().T.numpy(), ref, rtol=1e-9, atol=1e-12)
    # min norm: no component in the null space of A
    null = np.linalg.svd(a)[2][4:]
    assert np.abs(null @ res.model.head.weight.detach().numpy().T).max() < 1e-12


def test_closed_form_multiclass_head_is_columnwise_lstsq_of_one_hot_targets() -> None:
    a = _features(torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3], dtype=F64), 45, seed=6)
    labels = torch.arange(45) % 3
    res = _probe(_task(a, labels, loss="ce"), AttackBudget(steps=1), attack="closed_form_probe")
    one_hot = np.eye(3)[labels.numpy()]
    ref, *_ = np.linalg.lstsq(a.numpy(), one_hot, rcond=None)
    np.testing.assert_allclose(res.model.head.weight.detach().T.numpy(), ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# gd_exact (exact line search)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_gd_exact_converges_in_one_step_when_the_hessian_is_proportional_to_identity(init: str) -> None:
    a = _features(torch.full((6,), 2.5, dtype=F64), 30, seed=7)  # AᵀA = 6.25 I
    res = _probe(_task(a, _targets(30, 8)), AttackBudget(steps=3, optimizer="gd_exact"), init=init, seed=1)
    assert res.info["kappa_probe_hessian"]["kappa"] == pytest.approx(1.0, abs=1e-12)
    assert res.initial.norm_ratio == 1.0
    assert res.records[0].norm_ratio < 1e-26
    # α = 1/λ(2AᵀA) along the summed-loss gradient, recorded as the step on the mean-loss gradient
    # (AttackBudget.lr's unit): N·α = N/(2·6.25), the default 1/L of gd for the mean loss
    assert res.records[0].lr == pytest.approx(30 / (2 * 6.25), rel=1e-12)


def test_gd_exact_norm_ratio_is_non_increasing() -> None:
    a = _features(_gram_kappa_sv(1e3, 8), 64, seed=9)
    res = _probe(_task(a, _targets(64, 10)), AttackBudget(steps=80, optimizer="gd_exact"))
    ratios = res.curve("norm_ratio")
    assert ratios[0] == 1.0
    for t, (prev, cur) in enumerate(itertools.pairwise(ratios), start=1):
        assert cur <= prev * (1 + 1e-12), f"norm ratio increased at step {t}: {prev} -> {cur}"
    assert ratios[-1] < 0.5  # it does move
    losses = res.curve("loss")[1:]
    assert all(b <= a_ * (1 + 1e-12) for a_, b in itertools.pairwise(losses))


# ---------------------------------------------------------------------------------------------
# gd with the default step 1/L
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sv",
    [
        torch.tensor([2.0, 1.8, 1.5, 1.3, 1.1, 1.0], dtype=F64),  # full rank, κ(AᵀA) = 4
        torch.tensor([2.0, 1.7, 1.2, 1.0, 0.0, 0.0], dtype=F64),  # rank 4: κ over the range = 4
    ],
    ids=["full-rank", "rank-deficient"],
)
def test_gd_default_lr_obeys_the_linear_rate_bound(sv: torch.Tensor) -> None:
    a = _features(sv, 36, seed=11)
    steps = 30
    res = _probe(_task(a, _targets(36, 12)), AttackBudget(steps=steps, optimizer="gd", lr=None))
    hess = 2.0 * a.T @ a
    eig = torch.linalg.eigvalsh(hess)
    big = float(eig[-1])
    small = float(eig[eig > 1e-10 * big].min())  # restricted to the range of AᵀA
    kappa = big / small
    assert kappa == pytest.approx(4.0, rel=1e-12)
    assert res.info["kappa_probe_hessian"]["kappa"] == pytest.approx(kappa, rel=1e-10)
    # default η = 1/L of the mean loss (1/N)‖Aw − Y‖², L = λ_max(2AᵀA)/N
    assert res.info["lr"] == pytest.approx(36 / big, rel=1e-12)
    ratios = res.curve("norm_ratio")
    rate = 1.0 - 1.0 / kappa
    for t in range(1, steps + 1):
        assert ratios[t] <= rate**t, f"step {t}: {ratios[t]} > (1 - 1/κ)^t = {rate**t}"
        # the squared-norm ratio actually contracts at the square of the rate
        assert ratios[t] <= rate ** (2 * t) * (1 + 1e-9) + 1e-28
    assert ratios[steps] > 0.0


def test_larger_kappa_probes_slower() -> None:
    y = _targets(64, 13)
    eps = 0.1
    budget = AttackBudget(steps=600, optimizer="gd_exact")
    steps = {}
    for kappa in (10.0, 1000.0):
        a = _features(_gram_kappa_sv(kappa, 8), 64, seed=14)
        res = _probe(_task(a, y), budget)
        assert res.info["kappa_probe_hessian"]["kappa"] == pytest.approx(kappa, rel=1e-10)
        steps[kappa] = steps_to_epsilon(res.curve("norm_ratio"), eps)
    # measured (features seed 14, targets seed 13): 2 steps at κ=10 and 310 at κ=1000, a ×155
    # effect; the threshold is about half of it in log space (√155 ≈ 12).
    assert steps[10.0] is not None
    assert steps[1000.0] is not None
    assert steps[1000.0] >= 12 * steps[10.0]
