"""Attack details of issue 9, item 8: FLOP caps, the meaning of lr, random streams, one eval step.

Each test starts from the issue's minimal input where it gives one; the maths is float64.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from _attack_models import perturbed_linear

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.base import eval_predictions, rng_streams, scheduled_lr, split_score, stream_seed
from immunekit.attacks.worst_case import score
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset
from immunekit.errors import ConfigError
from immunekit.metrics.task_scores import task_score
from immunekit.models.base import linear_model

F64 = torch.float64


@pytest.fixture(scope="module")
def task():
    return gaussian_spectra(dim=6, n=96, seed=0)  # the issue's task: 72 attack rows, D = 6, C = 1


_linear = perturbed_linear


# ---------------------------------------------------------------------------------------------
# (a) FLOP caps: a step whose cost fits the remaining cap runs, and the cap is never exceeded
# ---------------------------------------------------------------------------------------------


def test_the_issue_flop_cap_of_exactly_one_step_runs_that_step(task) -> None:
    # one sgd step = 2 products of 21 rows with the (6, 1) head, 2·21·6·1 FLOPs each = 504; the
    # former cost 2·21/72 · (2·72·6) rounded to 504.00000000000006 > 504 and ran 0 steps
    budget = AttackBudget(steps=50, optimizer="sgd", lr=1e-3, batch_size=21, max_flops=504)
    res = ATTACKS.get("linear_probe")()(linear_model(6), task, budget, seed=0)
    assert len(task.attack) == 72
    assert [r.flops for r in res.records] == [504.0]
    assert res.stopped_by == "flops"


@pytest.mark.parametrize(
    ("optimizer", "batch", "per_step"),
    [
        ("sgd", 21, 2 * 2 * 21 * 6),
        ("sgd", 35, 2 * 2 * 35 * 6),
        ("adam", 7, 2 * 2 * 7 * 6),
        ("gd", 21, 2 * 2 * 72 * 6),
        ("gd_exact", 21, 3 * 2 * 72 * 6),
    ],
)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_a_cap_of_k_steps_allows_exactly_k_steps(
    task, optimizer: str, batch: int, per_step: int, k: int
) -> None:
    lr = None if optimizer.startswith("gd") else 1e-3
    model = linear_model(6)
    for cap, expected in ((k * per_step, k), (k * per_step - 1, k - 1)):
        budget = AttackBudget(steps=50, optimizer=optimizer, lr=lr, batch_size=batch, max_flops=cap)  # type: ignore[arg-type]
        res = ATTACKS.get("linear_probe")()(model, task, budget, seed=0)
        assert len(res.records) == expected, (cap, [r.flops for r in res.records])
        assert res.stopped_by == "flops"
        assert [r.flops for r in res.records] == [float(per_step * t) for t in range(1, expected + 1)]
        assert all(r.flops <= cap for r in res.records)


def test_the_loop_keeps_the_counted_step_cost_so_a_cap_of_k_steps_allows_k(monkeypatch) -> None:
    # A counter that reports 1009 FLOPs for a batch of 21 rows: (1009/21)·21 = 1009.0000000000001,
    # so the former per-example rate made 3 steps cost more than 3·1009 and stopped after 2.
    import torch.utils.flop_counter as fc

    class Counter:
        def __init__(self, *a: object, **k: object) -> None: ...
        def __enter__(self) -> Counter:
            return self

        def __exit__(self, *exc: object) -> None: ...
        def get_total_flops(self) -> int:
            return 1009

    assert (1009 / 21) * 21 > 1009  # the rounding this guards against
    monkeypatch.setattr(fc, "FlopCounterMode", Counter)
    t = gaussian_spectra(dim=6, n=64, seed=5)
    budget = AttackBudget(steps=10, optimizer="sgd", lr=0.01, batch_size=21, max_flops=3 * 1009)
    res = ATTACKS.get("full_finetune")()(_linear(6), t, budget, seed=0)
    assert res.curve("flops") == [0.0, 1009.0, 2018.0, 3027.0]
    assert res.stopped_by == "flops"
    assert res.info["flops_per_example"] == [1009 / 21]


# ---------------------------------------------------------------------------------------------
# (b) lr multiplies the gradient of the mean loss, in the probe as in the torch loop
# ---------------------------------------------------------------------------------------------


def _old_default_gd(a: torch.Tensor, y: torch.Tensor, steps: int, budget: AttackBudget) -> list[torch.Tensor]:
    """The probe's gd before the change: w ← w − η_t·2Aᵀ(Aw − Y), η = 1/λ_max(2AᵀA) (summed loss)."""
    eta = 1.0 / float(torch.linalg.eigvalsh(2.0 * a.T @ a)[-1])
    w = torch.zeros(a.shape[1], y.shape[1], dtype=F64)
    out = [w]
    for t in range(1, steps + 1):
        w = w - scheduled_lr(eta, t, budget) * (2.0 * a.T @ (a @ w - y))
        out.append(w)
    return out


@pytest.mark.parametrize(
    "budget",
    [
        AttackBudget(steps=40, optimizer="gd", lr=None),
        AttackBudget(steps=40, optimizer="gd", lr=None, schedule="cosine", warmup_steps=5),
    ],
    ids=["constant", "cosine+warmup"],
)
def test_the_default_gd_trajectory_is_unchanged(task, budget: AttackBudget) -> None:
    a, y = task.attack.x.to(F64), task.attack.y.to(F64)[:, None]
    old = _old_default_gd(a, y, budget.steps, budget)
    res = ATTACKS.get("linear_probe")()(linear_model(6), task, budget, seed=0)
    w = res.model.head.weight.detach().T
    assert float((w - old[-1]).abs().max()) <= 1e-10 * float(old[-1].abs().max())
    w_star = torch.linalg.lstsq(a, y).solution
    ratios = [float(((wt - w_star) ** 2).sum() / (w_star**2).sum()) for wt in old]
    assert res.curve("norm_ratio") == pytest.approx(ratios, rel=1e-10, abs=1e-14)
    # the recorded lr is the same step in the mean-loss unit: N/λ_max(2AᵀA) = 72·η_old
    eta_old = 1.0 / float(torch.linalg.eigvalsh(2.0 * a.T @ a)[-1])
    assert res.info["lr"] == pytest.approx(72 * eta_old, rel=1e-12)


def test_an_explicit_gd_lr_multiplies_the_mean_loss_gradient(task) -> None:
    # one step from w_0 = 0: w_1 = η·(2/N)AᵀY; the former meaning gave η·2AᵀY, N = 72 times more
    a, y = task.attack.x.to(F64), task.attack.y.to(F64)[:, None]
    eta = 0.05
    res = ATTACKS.get("linear_probe")()(
        linear_model(6), task, AttackBudget(steps=1, optimizer="gd", lr=eta), seed=0
    )
    expected = eta * 2.0 / 72 * (a.T @ y)
    torch.testing.assert_close(res.model.head.weight.detach().T, expected, rtol=1e-13, atol=0.0)
    assert res.records[0].lr == eta
    assert res.records[0].grad_norm == pytest.approx(float((2.0 / 72 * (a.T @ y)).norm()), rel=1e-13)


def test_gd_with_an_explicit_lr_is_full_batch_sgd_and_the_torch_loop_gd(task) -> None:
    budget = AttackBudget(steps=12, optimizer="gd", lr=0.1)
    model = _linear(6)
    probe = ATTACKS.get("linear_probe")()(model, task, budget, seed=0)
    sgd = ATTACKS.get("linear_probe")()(
        model, task, AttackBudget(steps=12, optimizer="sgd", lr=0.1, batch_size=1000), seed=0
    )
    loop = ATTACKS.get("head_reset_probe")(head_init="zeros", loss_on="split")(model, task, budget, seed=0)
    for other in (sgd, loop):
        torch.testing.assert_close(other.model.head.weight, probe.model.head.weight, rtol=1e-11, atol=1e-14)
        assert other.curve("lr")[1:] == probe.curve("lr")[1:] == [0.1] * 12
        assert other.curve("grad_norm")[1:] == pytest.approx(probe.curve("grad_norm")[1:], rel=1e-10)


def test_gd_exact_records_its_step_in_the_mean_loss_unit(task) -> None:
    # exact line search along the summed gradient g: α = ‖g‖²/(2‖Ag‖²); recorded as N·α, the step
    # along the mean-loss gradient g/N (the iterate is the same)
    a, y = task.attack.x.to(F64), task.attack.y.to(F64)[:, None]
    res = ATTACKS.get("linear_probe")()(
        linear_model(6), task, AttackBudget(steps=1, optimizer="gd_exact"), seed=0
    )
    g = -2.0 * a.T @ y
    alpha = float(g.norm()) ** 2 / (2.0 * float((a @ g).norm()) ** 2)
    assert res.records[0].lr == pytest.approx(72 * alpha, rel=1e-12)
    torch.testing.assert_close(res.model.head.weight.detach().T, -alpha * g, rtol=1e-12, atol=0.0)


# ---------------------------------------------------------------------------------------------
# (d) one random stream per purpose
# ---------------------------------------------------------------------------------------------


def test_streams_are_deterministic_distinct_and_independent_of_the_others_requested() -> None:
    def draws(gens: tuple[torch.Generator, ...]) -> list[torch.Tensor]:
        return [torch.randperm(50, generator=g) for g in gens]

    a = draws(rng_streams(3, "init", "subset", "batches"))
    b = draws(rng_streams(3, "init", "subset", "batches"))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # deterministic
    assert not any(torch.equal(x, y) for x, y in itertools.combinations(a, 2))  # distinct
    assert torch.equal(draws(rng_streams(3, "batches"))[0], a[2])  # independent of the other names
    assert not torch.equal(draws(rng_streams(4, "batches"))[0], a[2])  # the seed matters
    seeds = {stream_seed(s, n) for s in range(-2, 50) for n in ("init", "subset", "batches")}
    assert len(seeds) == 52 * 3 and all(0 <= v < 2**63 for v in seeds)
    with pytest.raises(ConfigError, match="distinct"):
        rng_streams(0, "init", "init")


@pytest.mark.parametrize(
    ("name", "config", "optimizer"),
    [
        ("relearn", {"reset_head": True, "warmup_steps_benign": 3, "subset_size": 40}, "sgd"),
        ("head_reset_probe", {}, "sgd"),
        ("full_finetune", {"reset_head": True}, "adam"),
        ("linear_probe", {"init": "normal"}, "sgd"),
        ("lora", {}, "sgd"),
    ],
)
def test_no_two_draws_of_an_attack_run_start_from_the_same_generator_state(
    name: str, config: dict, optimizer: str, monkeypatch
) -> None:
    # One seed in two generators made the relearn subset and the first benign batch order the same
    # permutation (and a fresh head and the first batch order draws of one state).
    if name == "lora":
        pytest.importorskip("peft")
    states: list[bytes] = []
    for fn in ("randperm", "rand", "randn"):
        original = getattr(torch, fn)

        def spy(*args: object, _original=original, generator=None, **kwargs: object):  # type: ignore[no-untyped-def]
            if generator is not None:
                states.append(bytes(generator.get_state().numpy()))
            return _original(*args, generator=generator, **kwargs)

        monkeypatch.setattr(torch, fn, spy)
    t = gaussian_spectra(dim=6, n=96, seed=1)  # primary and attack splits both have 72 rows
    assert len(t.primary) == len(t.attack)
    budget = AttackBudget(steps=8, optimizer=optimizer, lr=0.01, batch_size=16)  # type: ignore[arg-type]
    ATTACKS.get(name)(**config)(_linear(6), t, budget, seed=0)
    assert len(states) >= 2
    assert len(set(states)) == len(states)


def test_relearn_draws_its_subset_from_the_subset_stream() -> None:
    t = gaussian_spectra(dim=6, n=96, seed=1)
    res = ATTACKS.get("relearn")(warmup_steps_benign=2, subset_size=20)(
        _linear(6), t, AttackBudget(steps=4, optimizer="sgd", lr=0.01, batch_size=8), seed=7
    )
    (subset,) = rng_streams(7, "subset")
    assert res.info["subset_rows"] == torch.randperm(72, generator=subset)[:20].sort().values.tolist()


# ---------------------------------------------------------------------------------------------
# (e) one evaluation step for the loop's harm curve and the worst-case scores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_the_loop_harm_curve_and_worst_case_score_are_the_same_evaluation(loss: str) -> None:
    t = gaussian_spectra(dim=6, n=96, seed=3, loss=loss)
    model = _linear(6)
    res = ATTACKS.get("full_finetune")()(model, t, AttackBudget(steps=5, optimizer="sgd", lr=0.05), seed=0)
    final = res.records[-1].eval
    assert final is not None
    assert final["harm"] == score(res.model, t.eval_harmful, loss)
    assert final["utility"] == score(res.model, t.eval_primary, loss)
    assert final["harm"] == split_score(res.model, t.eval_harmful.x, t.eval_harmful.y, loss)
    with torch.no_grad():
        direct = task_score(res.model(t.eval_harmful.x), t.eval_harmful.y, loss)  # type: ignore[arg-type]
    assert final["harm"] == direct


def test_the_evaluation_step_runs_in_eval_mode_without_a_graph_and_restores_the_flag() -> None:
    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 1, dtype=F64))
            self.seen: list[bool] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(self.training)
            return x @ self.w

    m = Probe().train()
    pred = eval_predictions(m, torch.eye(3, dtype=torch.float32))  # cast to the model's dtype
    assert m.seen == [False] and m.training and not pred.requires_grad and pred.dtype == F64
    huge = Dataset(torch.full((2, 3), 1e308, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    assert not torch.isfinite(eval_predictions(m, huge.x)).any()  # overflow: a diverged model
    assert score(m, huge, "mse") == float("-inf")  # ranked last by worst_case, never a crash


@pytest.mark.parametrize("name", ["linear_probe", "full_finetune"])
def test_dense_evaluation_window_sees_the_same_trajectory(task, name: str) -> None:
    """eval_dense_until adds evaluations, never changes a weight: the curve is the every-step one."""
    attack = ATTACKS.get(name)()
    base = AttackBudget(steps=20, optimizer="adam", lr=0.05, batch_size=16, eval_every=10)
    windowed = attack(_linear(6), task, dataclasses.replace(base, eval_dense_until=3), seed=1).harm_curve()
    every = dict(attack(_linear(6), task, dataclasses.replace(base, eval_every=1), seed=1).harm_curve())
    assert [s for s, _ in windowed] == [0, 1, 2, 3, 10, 20]
    assert windowed == [(s, every[s]) for s, _ in windowed]
