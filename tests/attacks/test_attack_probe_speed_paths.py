"""The probe's fast paths against the computation they replace (issue 3, speed).

* w* from one QR of A and an SVD of R, against ``pinv(A) @ Y`` (the previous ``least_squares``);
* full-batch steps through the core R (A = QR) instead of A, and the loss from R when no per-step
  accuracy is recorded, against the previous loop written out below (``_reference_run``);
* :class:`ProbeCache`: features and factorizations shared between probes of the same extractor.

Tolerances: curves must match to 1e-9 relative, plus the rounding floor of the norm ratio. With
e_t = w_t − w* the ratio is ‖e_t‖²/‖e_0‖², and w* (either one) carries an error δ of about
κ(A)·eps·‖w*‖, so the ratio itself is only known to 2‖e_t‖‖δ‖/‖e_0‖² = 2·√ratio·κ(A)·eps (for
w_0 = 0): once GD has converged to 1e-7 of the distance, 1e-9 relative is below what float64
resolves. The floor is that bound with a factor 64.
"""

from __future__ import annotations

import math

import pytest
import torch

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.base import rng_streams
from immunekit.attacks.linear_probe import LinearProbe, ProbeCache, accuracy, least_squares, probe_problem
from immunekit.data.task import Dataset, Task
from immunekit.models.base import linear_model
from immunekit.spectral import default_rtol

F64 = torch.float64


def _features(sv: list[float], n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = len(sv)
    u, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (u * torch.tensor(sv, dtype=F64)) @ v.T


def _task(x: torch.Tensor, y: torch.Tensor, loss: str = "mse", x_eval: torch.Tensor | None = None) -> Task:
    x_eval = x if x_eval is None else x_eval

    def ds(prefix: str, xx: torch.Tensor) -> Dataset:
        return Dataset(xx, y[: len(xx)], tuple(f"{prefix}:{i}" for i in range(xx.shape[0])))

    return Task(
        name="probe-speed",
        version="test",
        loss=loss,  # type: ignore[arg-type]
        primary=ds("p", x),
        harmful=ds("h", x),
        attack=ds("h", x),
        eval_primary=ds("ep", x_eval),
        eval_harmful=ds("eh", x_eval),
    )


def _reference_run(a: torch.Tensor, y: torch.Tensor, budget: AttackBudget, w0: torch.Tensor, seed: int):
    """The probe loop as it was before the fast paths: pinv for w*, every product on A."""
    tol = default_rtol(*a.shape)
    a_pinv = torch.linalg.pinv(a, rtol=tol)
    w_star = a_pinv @ y + w0 - a_pinv @ (a @ w0)
    d0 = float(((w0 - w_star) ** 2).sum())
    (gen,) = rng_streams(seed, "batches")  # the probe's mini-batch stream (issue 9: one per purpose)
    w = w0.clone()
    lr0 = budget.lr
    if lr0 is None:
        lr0 = (
            1.0 / (2.0 * float(torch.linalg.matrix_norm(a, ord=2)) ** 2) if budget.optimizer == "gd" else 1e-3
        )
    m, v, t = torch.zeros_like(w0), torch.zeros_like(w0), 0
    ratios, losses, accs = [], [], []

    def record() -> None:
        pred = a @ w
        ratios.append(float(((w - w_star) ** 2).sum()) / d0)
        losses.append(float(((pred - y) ** 2).mean()))
        accs.append(accuracy(pred, y))

    record()
    for _ in range(budget.steps):
        if budget.optimizer in ("gd", "gd_exact"):
            g = 2.0 * a.T @ (a @ w - y)
            if budget.optimizer == "gd_exact":
                ag = float(((a @ g) ** 2).sum())
                if ag == 0.0:
                    break
                lr = float(g.norm()) ** 2 / (2.0 * ag)
            else:
                lr = lr0
            w = w - lr * g
        else:
            batch = min(budget.batch_size, a.shape[0])
            if batch >= a.shape[0]:
                ab, yb = a, y
            else:
                idx = torch.randperm(a.shape[0], generator=gen)[:batch]
                ab, yb = a[idx], y[idx]
            g = 2.0 * ab.T @ (ab @ w - yb) / len(ab)
            if budget.optimizer == "sgd":
                w = w - lr0 * g
            else:
                t += 1
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
                w = w - lr0 * m_hat / (v_hat.sqrt() + 1e-8)
        record()
    return ratios, losses, accs, w


EPS = float(torch.finfo(F64).eps)


def _assert_curves_close(new: list[float], old: list[float], *, rel: float, kappa_a: float = 0.0) -> None:
    """|new − old| ≤ rel·|old| + 2·√|old|·(64·κ(A)·eps) at every step (κ(A) = 0: no floor)."""
    assert len(new) == len(old)
    noise = 64 * kappa_a * EPS
    for t, (a, b) in enumerate(zip(new, old, strict=True)):
        assert abs(a - b) <= rel * abs(b) + 2 * math.sqrt(abs(b)) * noise, f"step {t}: {a} vs {b}"


PROBLEMS = {
    "well-conditioned": ([2.0, 1.8, 1.5, 1.3, 1.1, 1.0], 40),
    "ill-conditioned": (torch.logspace(0.0, -3.0, 10, dtype=F64).tolist(), 64),  # κ(AᵀA) = 1e6
    "rank-deficient": ([2.0, 1.7, 1.2, 1.0, 0.3, 0.0, 0.0], 36),
    "square": ([1.5, 1.2, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3], 8),
    "wide (N < D)": ([], 6),  # 6×10 Gaussian: the core is A itself, Q = I
}


@pytest.mark.parametrize("optimizer", ["gd_exact", "gd", "sgd", "adam"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_curves_equal_the_previous_loop(problem: str, optimizer: str) -> None:
    sv, n = PROBLEMS[problem]
    if sv:
        a = _features(sv, n, seed=1)
    else:
        a = torch.randn(n, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
        sv = torch.linalg.svdvals(a).tolist()
    y = torch.randn(n, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    budget = AttackBudget(
        steps=60, optimizer=optimizer, batch_size=16, lr=0.05 if optimizer == "sgd" else None
    )  # type: ignore[arg-type]
    res = LinearProbe()(linear_model(a.shape[1]), _task(a, y), budget, seed=3)
    ratios, losses, _, w = _reference_run(a, y, budget, torch.zeros(a.shape[1], 1, dtype=F64), seed=3)
    kappa_a = max(sv) / min(v for v in sv if v > 0)
    _assert_curves_close(res.curve("norm_ratio"), ratios, rel=1e-9, kappa_a=kappa_a)
    _assert_curves_close(res.curve("loss"), losses, rel=1e-9)
    new_w = res.model.head.weight.detach().T
    if optimizer in ("sgd", "adam"):
        # mini-batch steps do the same arithmetic on the same rows: bit for bit the same head
        assert torch.equal(new_w, w)
    else:
        assert float((new_w - w).norm()) <= 1e-9 * float(w.norm())


def test_init_normal_and_classification_records_match_including_accuracy() -> None:
    a = _features(torch.logspace(0.0, -2.0, 8, dtype=F64).tolist(), 48, seed=4)
    labels = (torch.arange(48) % 3).to(torch.long)
    task = _task(a, labels, loss="ce")
    budget = AttackBudget(steps=40, optimizer="gd_exact")
    res = LinearProbe(init="normal")(linear_model(8), task, budget, seed=5)
    w0 = torch.randn(8, 3, generator=rng_streams(5, "init")[0], dtype=F64) / 8**0.5
    y = torch.nn.functional.one_hot(labels, 3).to(F64)
    ratios, losses, accs, _ = _reference_run(a, y, budget, w0, seed=5)
    _assert_curves_close(res.curve("norm_ratio"), ratios, rel=1e-9, kappa_a=100.0)
    _assert_curves_close(res.curve("loss"), losses, rel=1e-12)  # from A·w: as before
    assert res.curve("accuracy") == accs


def test_without_per_step_accuracy_the_loss_comes_from_the_core_and_matches() -> None:
    a = _features([3.0, 2.0, 1.0, 0.5, 0.25, 0.0], 50, seed=6)
    labels = (torch.arange(50) % 2).to(torch.long)
    task = _task(a, labels, loss="ce")
    budget = AttackBudget(steps=30, optimizer="adam", batch_size=8, lr=0.01)
    with_acc = LinearProbe()(linear_model(6), task, budget, seed=7)
    without = LinearProbe(record_accuracy=False)(linear_model(6), task, budget, seed=7)
    assert all(v is not None for v in with_acc.curve("accuracy"))
    assert all(v is None for v in without.curve("accuracy"))
    assert without.curve("norm_ratio") == with_acc.curve("norm_ratio")  # the same iterates
    _assert_curves_close(without.curve("loss"), with_acc.curve("loss"), rel=1e-13)
    assert torch.equal(without.model.head.weight, with_acc.model.head.weight)


def test_info_kappa_and_default_lr_come_from_the_factorization() -> None:
    from immunekit.spectral import gram_condition_number

    a = _features([2.0, 1.0, 0.5, 1e-3], 30, seed=8)
    y = torch.randn(30, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    res = LinearProbe()(linear_model(4), _task(a, y), AttackBudget(steps=2, optimizer="gd", lr=None), seed=0)
    ref = gram_condition_number(a)
    assert res.info["kappa_probe_hessian"]["kappa"] == pytest.approx(ref.kappa, rel=1e-10)
    assert res.info["kappa_probe_hessian"]["rank"] == ref.rank
    assert res.info["lr"] == pytest.approx(  # 1/L of the mean loss over the 30 rows
        30 / (2.0 * float(torch.linalg.matrix_norm(a, ord=2)) ** 2), rel=1e-14
    )


# ---------------------------------------------------------------------------------------------
# least_squares
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w0_scale", [0.0, 1.0])
def test_least_squares_equals_the_pinv_formula(w0_scale: float) -> None:
    a = _features([2.0, 1.0, 0.5, 0.1, 0.0], 25, seed=10)
    y = torch.randn(25, 2, generator=torch.Generator().manual_seed(11), dtype=F64)
    w0 = w0_scale * torch.randn(5, 2, generator=torch.Generator().manual_seed(12), dtype=F64)
    p = torch.linalg.pinv(a, rtol=default_rtol(25, 5))
    ref = p @ y + w0 - p @ (a @ w0)
    got = least_squares(a, y, w0)
    assert float((got - ref).norm()) <= 1e-14 * float(ref.norm())


# ---------------------------------------------------------------------------------------------
# ProbeCache
# ---------------------------------------------------------------------------------------------


def _small_task(seed: int = 0) -> Task:
    x = _features([2.0, 1.5, 1.0, 0.5, 0.0], 30, seed=seed)
    y = torch.randn(30, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return _task(x, y)


def test_cache_shares_problems_between_models_with_the_same_extractor_only() -> None:
    task, cache = _small_task(), ProbeCache()
    m1, m2 = linear_model(5), linear_model(5)
    p1 = cache.problem(m1, task, "attack", "eval_harmful")
    assert cache.problem(m2, task, "attack", "eval_harmful") is p1  # equal θ, other object
    assert cache.problem(m1, task, "primary", "eval_primary") is not p1  # other split
    other = linear_model(5)
    with torch.no_grad():
        other.extractor.weight.mul_(2.0)
    assert cache.problem(other, task, "attack", "eval_harmful") is not p1  # other θ
    m2.head.weight.data.fill_(3.0)
    assert cache.problem(m2, task, "attack", "eval_harmful") is p1  # the head does not matter
    with torch.no_grad():
        m1.extractor.weight[0, 0] += 1e-12  # changed in place after caching: a miss
    p_changed = cache.problem(m1, task, "attack", "eval_harmful")
    assert p_changed is not p1
    assert torch.equal(p_changed.a, probe_problem(m1, task, "attack", "eval_harmful").a)
    assert cache.problem(m2, _small_task(), "attack", "eval_harmful") is not p1  # other task object


def test_cache_fallback_is_read_not_written_and_entries_are_bounded() -> None:
    task = _small_task()
    ref = ProbeCache()
    p = ref.problem(linear_model(5), task, "primary", "eval_primary")
    trial = ProbeCache(fallback=ref, max_entries=2)
    assert trial.problem(linear_model(5), task, "primary", "eval_primary") is p
    assert len(trial) == 0 and len(ref) == 1
    for scale in (2.0, 3.0, 4.0):
        m = linear_model(5)
        with torch.no_grad():
            m.extractor.weight.mul_(scale)
        trial.problem(m, task, "attack", "eval_harmful")
    assert len(trial) == 2 and len(ref) == 1


def test_cache_does_not_keep_a_task_alive() -> None:
    import gc
    import weakref

    task, cache = _small_task(), ProbeCache()
    cache.problem(linear_model(5), task, "attack", "eval_harmful")
    alive = weakref.ref(task)
    del task
    gc.collect()
    assert alive() is None
    cache.problem(linear_model(5), _small_task(3), "attack", "eval_harmful")
    assert len(cache) == 1  # the dead task's entry was dropped


def test_factorization_is_shared_and_cached_results_equal_uncached_ones() -> None:
    task, cache = _small_task(), ProbeCache()
    model = linear_model(5)
    budget = AttackBudget(steps=15, optimizer="gd_exact")
    probe = ATTACKS.get("linear_probe")()
    cached = [probe(model, task, budget, seed=1, cache=cache) for _ in range(2)]
    plain = probe(model, task, budget, seed=1)
    prob = cache.problem(model, task, "attack", "eval_harmful")
    assert prob.factor() is prob.factor(None)
    assert prob.factor(1e-3) is not prob.factor() and prob.factor(1e-3).rank <= prob.factor().rank
    for res in cached:
        assert res.curve("norm_ratio") == plain.curve("norm_ratio")
        assert res.curve("loss") == plain.curve("loss")
        assert torch.equal(res.model.head.weight, plain.model.head.weight)
    closed = ATTACKS.get("closed_form_probe")()(model, task, AttackBudget(steps=1), seed=0, cache=cache)
    w = closed.model.head.weight.detach().T
    assert torch.equal(w, prob.factor().solve(prob.y))
    assert math.isfinite(cached[0].info["kappa_probe_hessian"]["kappa"])
