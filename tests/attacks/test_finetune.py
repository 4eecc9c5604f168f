"""Torch-loop fine-tuning attacks (finetune.py, _loop.py): closed forms, behaviour, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _attack_models import perturbed_linear
from torch import nn

from immunekit.attacks import ATTACKS, AttackBudget, _loop, scheduled_lr
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel, linear_model

F64 = torch.float64


def _task(loss: str = "mse", n: int = 64, dim: int = 6) -> Task:
    return gaussian_spectra(dim=dim, n=n, cond_primary=10.0, cond_harmful=30.0, loss=loss, seed=5)


_linear = perturbed_linear


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["gd", "sgd"])
def test_one_full_batch_sgd_step_is_the_hand_computed_gradient_step(optimizer: str) -> None:
    # f(W, h) = (1/N)‖X Wᵀ hᵀ − y‖²: ∇_h = (2/N) rᵀ X Wᵀ, ∇_W = (2/N) hᵀ rᵀ X with r = X Wᵀ hᵀ − y.
    task = _task()
    model = _linear(task.input_dim)
    x, y = task.attack.x, task.attack.y[:, None]
    w, h = model.extractor.weight.detach().clone(), model.head.weight.detach().clone()
    n, lr = len(x), 0.05
    r = x @ w.T @ h.T - y
    grad_h = 2.0 / n * r.T @ x @ w.T
    grad_w = 2.0 / n * h.T @ r.T @ x
    budget = AttackBudget(steps=1, optimizer=optimizer, lr=lr, batch_size=1000)
    res = ATTACKS.get("full_finetune")()(model, task, budget, seed=0)
    assert torch.allclose(res.model.head.weight, h - lr * grad_h, rtol=0, atol=1e-12)
    assert torch.allclose(res.model.extractor.weight, w - lr * grad_w, rtol=0, atol=1e-12)
    grad_norm = math.sqrt(float((grad_h**2).sum() + (grad_w**2).sum()))
    assert res.records[0].grad_norm == pytest.approx(grad_norm, rel=1e-12)
    assert res.records[0].examples == n and res.records[0].lr == lr


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_schedule_values_equal_the_formula_and_are_recorded(warmup: int) -> None:
    steps, base = 10, 0.02
    budget = AttackBudget(steps=steps, optimizer="sgd", lr=base, schedule="cosine", warmup_steps=warmup)
    expected = [
        base * t / warmup
        if t <= warmup
        else base * 0.5 * (1 + math.cos(math.pi * (t - warmup - 1) / (steps - warmup)))
        for t in range(1, steps + 1)
    ]
    assert [scheduled_lr(base, t, budget) for t in range(1, steps + 1)] == pytest.approx(expected, rel=1e-15)
    task = _task()
    res = ATTACKS.get("full_finetune")()(_linear(task.input_dim), task, budget, seed=0)
    assert res.curve("lr")[1:] == pytest.approx(expected, rel=1e-15)
    assert res.curve("lr")[1] == (base / warmup if warmup else base)
    constant = AttackBudget(steps=steps, optimizer="sgd", lr=base, warmup_steps=warmup)
    assert [scheduled_lr(base, t, constant) for t in range(warmup + 1, steps + 1)] == [base] * (
        steps - warmup
    )


@pytest.mark.parametrize(("attack", "formula"), [("full_finetune", "full"), ("head_reset_probe", "head")])
def test_flops_of_linear_layers_equal_the_closed_form_count(attack: str, formula: str) -> None:
    # LinearModel: forward 2Bd² (extractor) + 2Bd (head); backward: head weight grad 2Bd, and for the
    # full fine-tune also the head input grad 2Bd and the extractor weight grad 2Bd² (x needs no grad).
    # The probe steps on cached frozen features: only the head's forward 2Bd and weight grad 2Bd.
    task, d, b = _task(), 6, 16
    per_step = {"full": 4 * b * d * d + 6 * b * d, "head": 4 * b * d}[formula]
    budget = AttackBudget(steps=3, optimizer="sgd", lr=0.01, batch_size=b)
    res = ATTACKS.get(attack)()(_linear(d), task, budget, seed=0)
    assert res.curve("flops") == [0.0, per_step, 2 * per_step, 3 * per_step]
    assert res.info["flops_method"] == _loop.FLOPS_COUNTED


def test_flops_fall_back_to_six_params_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.flop_counter as fc

    class Broken:
        def __init__(self, *a: object, **k: object) -> None:
            raise RuntimeError("no counter")

    monkeypatch.setattr(fc, "FlopCounterMode", Broken)
    task, d = _task(), 6
    res = ATTACKS.get("full_finetune")()(
        _linear(d), task, AttackBudget(steps=2, optimizer="sgd", batch_size=16), seed=0
    )
    assert res.info["flops_method"] == _loop.FLOPS_FALLBACK
    assert res.curve("flops") == [0.0, 6.0 * (d * d + d) * 16, 12.0 * (d * d + d) * 16]


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_head_reset_probe_from_zeros_equals_the_linear_probe(optimizer: str, schedule: str) -> None:
    # Full-batch steps on the same frozen features from w_0 = 0: torch.optim (head_reset_probe) and the
    # probe's written-out update rules must give the same iterates.
    task = _task()
    model = _linear(task.input_dim)
    budget = AttackBudget(
        steps=15,
        optimizer=optimizer,
        lr=0.05,
        batch_size=1000,
        schedule=schedule,
        warmup_steps=2,
        weight_decay=0.1 if optimizer == "adamw" else 0.0,
        momentum=0.8,
    )
    torch_loop = ATTACKS.get("head_reset_probe")(head_init="zeros", loss_on="split")(
        model, task, budget, seed=0
    )
    probe = ATTACKS.get("linear_probe")()(model, task, budget, seed=0)
    assert torch.allclose(torch_loop.model.head.weight, probe.model.head.weight, rtol=1e-10, atol=1e-13)
    assert torch_loop.curve("loss") == pytest.approx(probe.curve("loss"), rel=1e-10)
    assert torch_loop.curve("lr")[1:] == probe.curve("lr")[1:]


# ---------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_full_finetune_reduces_the_harmful_loss_and_raises_harm(optimizer: str) -> None:
    task = _task(n=128)
    model = _linear(task.input_dim)
    lr = 0.05 if optimizer == "sgd" else 0.02
    budget = AttackBudget(steps=60, optimizer=optimizer, lr=lr, batch_size=16, eval_every=20)
    res = ATTACKS.get("full_finetune")()(model, task, budget, seed=1)
    assert res.records[-1].loss < 0.5 * res.initial.loss
    curve = res.harm_curve()
    assert [s for s, _ in curve] == [0, 20, 40, 60]
    assert curve[-1][1] > curve[0][1] + 0.3  # R² on held-out harmful data
    assert res.records[-1].eval["loss"] < res.initial.eval["loss"]


def test_benign_finetuning_evaluates_on_eval_primary() -> None:
    task = _task()
    res = ATTACKS.get("full_finetune")(split="primary")(
        _linear(task.input_dim), task, AttackBudget(steps=20, optimizer="adam", lr=0.02), seed=0
    )
    assert res.info["eval_split"] == "eval_primary"
    assert res.records[-1].eval["harm"] == res.records[-1].eval["utility"]  # both on eval_primary
    assert res.records[-1].eval["utility"] > res.initial.eval["utility"]


def test_batch_loss_records_the_mini_batch_loss_before_the_step() -> None:
    task = _task()
    model = _linear(task.input_dim)
    budget = AttackBudget(steps=1, optimizer="sgd", lr=0.01, batch_size=1000)
    res = ATTACKS.get("full_finetune")(loss_on="batch")(model, task, budget, seed=0)
    with torch.no_grad():
        before = float(((model(task.attack.x) - task.attack.y[:, None]) ** 2).mean())
    assert res.records[0].loss == pytest.approx(before, rel=1e-14)
    assert res.initial.loss == pytest.approx(before, rel=1e-14)


def _three_class_task() -> Task:
    g = torch.Generator().manual_seed(0)

    def ds(prefix: str, n: int) -> Dataset:
        x = torch.randn(n, 4, generator=g, dtype=F64)
        return Dataset(x, x[:, :3].argmax(1), tuple(f"{prefix}:{i}" for i in range(n)))

    return Task(
        name="three",
        version="test",
        loss="ce",
        primary=ds("p", 60),
        harmful=ds("h", 60),
        attack=ds("a", 60),
        eval_primary=ds("ep", 30),
        eval_harmful=ds("eh", 30),
    )


def test_multiclass_heads_train_with_cross_entropy_and_score_accuracy() -> None:
    task = _three_class_task()
    budget = AttackBudget(steps=40, optimizer="adam", lr=0.05, batch_size=1000)
    res = ATTACKS.get("head_reset_probe")(loss_on="split")(linear_model(4), task, budget, seed=0)
    assert res.model.head.out_features == 3
    assert res.info["loss"] == "cross-entropy"
    with torch.no_grad():
        logits = res.model(task.attack.x)
    ce = float(nn.functional.cross_entropy(logits, task.attack.y))
    assert res.records[-1].loss == pytest.approx(ce, rel=1e-12)
    assert res.records[-1].accuracy > 0.8 and res.records[-1].eval["harm"] > 0.7


def test_binary_one_output_head_uses_squared_loss_on_01_targets() -> None:
    task = _task("ce")
    res = ATTACKS.get("full_finetune")(loss_on="split")(
        _linear(task.input_dim), task, AttackBudget(steps=3, optimizer="sgd"), seed=0
    )
    assert res.info["loss"].startswith("squared loss on 0/1 targets")
    with torch.no_grad():
        pred = res.model(task.attack.x)
    assert res.records[-1].loss == pytest.approx(float(((pred[:, 0] - task.attack.y) ** 2).mean()), rel=1e-12)


def test_reset_head_draws_a_seeded_head() -> None:
    task = _task()
    model = _linear(task.input_dim)
    budget = AttackBudget(steps=1, optimizer="sgd", lr=1e-12)
    a, b, c = (ATTACKS.get("full_finetune")(reset_head=True)(model, task, budget, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.model.head.weight, b.model.head.weight)
    assert not torch.equal(a.model.head.weight, c.model.head.weight)
    assert float(a.model.head.weight.detach().abs().max()) <= 1 / math.sqrt(task.input_dim) + 1e-9


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"optimizer": "rmsprop"}, "rmsprop"),
        ({"schedule": "linear"}, "'linear'"),
        ({"warmup_steps": 11}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"momentum": 1.0, "optimizer": "sgd_momentum"}, "momentum"),
        ({"weight_decay": 0.1, "optimizer": "adam"}, "adamw"),
        ({"weight_decay": -0.1, "optimizer": "adamw"}, "weight_decay"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"optimizer": "gd_exact", "schedule": "cosine"}, "gd_exact"),
    ],
)
def test_budget_rejects_bad_values(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        AttackBudget(**{"steps": 10, "optimizer": "sgd", **kw})


def test_gd_exact_is_rejected_by_full_finetune() -> None:
    task = _task()
    with pytest.raises(ConfigError, match=r"full_finetune.*'gd_exact'"):
        ATTACKS.get("full_finetune")()(
            _linear(task.input_dim), task, AttackBudget(steps=2, optimizer="gd_exact"), seed=0
        )


def test_bad_attack_configs_are_config_errors() -> None:
    task = _task()
    budget = AttackBudget(steps=5, optimizer="sgd")
    with pytest.raises(ConfigError, match="blocks"):
        ATTACKS.get("partial_finetune")(blocks=0)
    with pytest.raises(ConfigError, match="has 1 parameterised block"):
        ATTACKS.get("partial_finetune")(blocks=2)(_linear(task.input_dim), task, budget, seed=0)
    with pytest.raises(ConfigError, match="warmup_steps_benign=5"):
        ATTACKS.get("relearn")(warmup_steps_benign=5)(_linear(task.input_dim), task, budget, seed=0)
    with pytest.raises(ConfigError, match="split"):
        ATTACKS.get("full_finetune")(split="harmfull")
    with pytest.raises(ConfigError, match="loss_on"):
        ATTACKS.get("full_finetune")(loss_on="epoch")


def test_language_model_tasks_are_a_clear_config_error() -> None:
    t = _task()
    lm = Task(
        name="lm",
        version="test",
        loss="lm",
        primary=t.primary,
        harmful=t.harmful,
        attack=t.attack,
        eval_primary=t.eval_primary,
        eval_harmful=t.eval_harmful,
    )
    with pytest.raises(ConfigError, match="'lm'"):
        ATTACKS.get("full_finetune")()(
            _linear(t.input_dim), lm, AttackBudget(steps=2, optimizer="sgd"), seed=0
        )


def test_head_that_does_not_fit_the_targets_is_a_data_error() -> None:
    task = _three_class_task()
    with pytest.raises(DataError, match="one output"):
        ATTACKS.get("full_finetune")()(linear_model(4), task, AttackBudget(steps=2, optimizer="sgd"), seed=0)
    wide = linear_model(6)
    with pytest.raises(DataError, match="cannot take the inputs"):
        ATTACKS.get("full_finetune")()(wide, _task(dim=4), AttackBudget(steps=2, optimizer="sgd"), seed=0)


# ---------------------------------------------------------------------------------------------
# head_reset_probe: frozen eval-mode features, cached
# ---------------------------------------------------------------------------------------------


class _NormDropNet(ImmunizableModel):
    """Linear → BatchNorm → ReLU → Dropout(p): a trunk whose train mode differs from its eval mode."""

    def __init__(self, dim: int, p: float, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)  # test-only construction: the weights must be the same for every p
        self.extractor = nn.Sequential(nn.Linear(dim, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(p))
        self.head = nn.Linear(8, 1)
        with torch.no_grad():  # running statistics away from (0, 1), so eval mode is not train mode
            self.extractor[1].running_mean.fill_(0.3)
            self.extractor[1].running_var.fill_(2.0)
        self.double()


def _probe_budget() -> AttackBudget:
    return AttackBudget(steps=6, optimizer="adam", lr=0.05, batch_size=16, eval_every=3)


def test_head_reset_probe_never_moves_the_trunk_not_even_batch_norm_statistics() -> None:
    # In train mode a batch-norm layer updates its running statistics on every forward: the probe
    # used to move 3 buffers here (147 on EfficientNet-Lite0) while claiming a frozen extractor.
    task, model = _task(), _NormDropNet(6, p=0.5)
    res = ATTACKS.get("head_reset_probe")()(model, task, _probe_budget(), seed=0)
    before = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    after = {k: v for k, v in res.model.state_dict().items() if not k.startswith("head.")}
    assert before.keys() == after.keys() and len(before) == 7
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(res.model.head.weight, model.head.weight)  # the head did train
    assert res.info["features"] == {"mode": "eval", "dim": 8}


def test_head_reset_probe_trains_on_eval_mode_features_so_trunk_dropout_changes_nothing() -> None:
    # The same weights with dropout 0.5 and 0: eval mode ignores dropout, so the runs agree exactly;
    # the harm curve is that of head(Φ_eval) at every evaluation.
    task = _task()
    runs = [
        ATTACKS.get("head_reset_probe")()(_NormDropNet(6, p=p), task, _probe_budget(), seed=3)
        for p in (0.5, 0.0)
    ]
    assert torch.equal(runs[0].model.head.weight, runs[1].model.head.weight)
    assert runs[0].curve("loss") == runs[1].curve("loss")
    assert runs[0].harm_curve() == runs[1].harm_curve()
    model = runs[0].model.eval()
    with torch.no_grad():
        r2 = (
            1
            - ((model(task.eval_harmful.x)[:, 0] - task.eval_harmful.y) ** 2).sum()
            / ((task.eval_harmful.y - task.eval_harmful.y.mean()) ** 2).sum()
        )
    assert runs[0].harm_curve()[-1][1] == pytest.approx(float(r2), rel=1e-12)


def test_head_reset_probe_forwards_the_trunk_once_per_model_state_and_again_after_a_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from immunekit.attacks.finetune import HeadResetProbe
    from immunekit.attacks.linear_probe import ProbeCache

    monkeypatch.setattr(HeadResetProbe, "features_cache", ProbeCache(max_entries=2))
    task, model = _task(), _NormDropNet(6, p=0.0)
    calls: list[int] = []
    model.extractor.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    first = ATTACKS.get("head_reset_probe")()(model, task, _probe_budget(), seed=1)
    n_first = len(calls)
    assert sum(calls) == len(task.attack) + len(task.eval_harmful) + len(task.eval_primary)
    again = ATTACKS.get("head_reset_probe")()(model, task, _probe_budget(), seed=1)
    assert len(calls) == n_first  # cached: no trunk forward at all, and the same run
    assert torch.equal(again.model.head.weight, first.model.head.weight)
    assert again.curve("loss") == first.curve("loss") and again.info == first.info
    with torch.no_grad():
        model.extractor[0].weight.mul_(2.0)  # a changed trunk must not reuse stale features
    changed = ATTACKS.get("head_reset_probe")()(model, task, _probe_budget(), seed=1)
    assert len(calls) > n_first
    assert changed.curve("loss") != first.curve("loss")
