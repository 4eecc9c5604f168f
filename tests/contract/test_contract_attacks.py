"""Contract suite for every registered attack × optimizer (DESIGN §2 "Attack", §6 contract tier).

Parametrized from ``ATTACKS.names()`` and ``OPTIMIZERS``: the input model is never mutated, probes
leave the extractor untouched, one record per step with 1-based indices, cumulative counters,
budget caps that name the stopping dimension and are never exceeded, and seeded determinism.
``closed_form_probe`` ignores the optimizer, so it is run once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from immunekit.attacks import ATTACKS, OPTIMIZERS, AttackBudget, AttackResult
from immunekit.config import load_config
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Task
from immunekit.errors import ConfigError, DataError
from immunekit.models.base import ImmunizableModel, linear_model

F64 = torch.float64
CLOSED_FORM = {"closed_form_probe"}  # attacks that solve in one step, whatever the optimizer
STOCHASTIC = {"sgd", "adam"}
CASES = [
    (name, opt)
    for name in ATTACKS.names()
    for opt in ((OPTIMIZERS[0],) if name in CLOSED_FORM else OPTIMIZERS)
]


class TinyMLP(ImmunizableModel):
    """Non-linear extractor: probes must work on any ImmunizableModel."""

    def __init__(self, d_in: int, d_hid: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.extractor = nn.Sequential(nn.Linear(d_in, d_hid, dtype=F64), nn.Tanh())
        self.head = nn.Linear(d_hid, 1, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))


def _task(loss: str = "mse") -> Task:
    # 48 attack rows; batch_size 16 below gives 3 batches per epoch.
    return gaussian_spectra(dim=6, n=64, cond_primary=10.0, cond_harmful=30.0, loss=loss, seed=5)


def _linear(d: int) -> ImmunizableModel:
    m = linear_model(d)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        m.extractor.weight.add_(0.2 * torch.randn(d, d, generator=g, dtype=F64))
        m.head.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    return m


MODELS = {"linear": _linear, "mlp": TinyMLP}


def _attack(
    name: str, budget: AttackBudget, model: ImmunizableModel, task: Task, seed: int = 0
) -> AttackResult:
    return ATTACKS.get(name)()(model, task, budget, seed=seed)


def _budget(opt: str, **kw: object) -> AttackBudget:
    lr = 1e-2 if opt in STOCHASTIC else None
    return AttackBudget(**{"steps": 12, "optimizer": opt, "batch_size": 16, "lr": lr, **kw})


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _curves(res: AttackResult) -> dict[str, list]:
    """Every recorded curve except wall time; NaN (initial grad norm, closed-form lr) as a string."""
    keys = ("step", "examples", "flops", "lr", "loss", "grad_norm", "norm_ratio", "accuracy")
    return {k: ["nan" if v != v else v for v in res.curve(k)] for k in keys}


def test_registry_lists_the_probes() -> None:
    assert {"linear_probe", "closed_form_probe"} <= set(ATTACKS.names())
    assert set(OPTIMIZERS) == {"gd_exact", "gd", "sgd", "adam"}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize(("name", "opt"), CASES)
def test_input_untouched_extractor_kept_one_record_per_step(
    name: str, opt: str, loss: str, kind: str
) -> None:
    task = _task(loss)
    model = MODELS[kind](task.input_dim)
    before = _snapshot(model)
    budget = _budget(opt)
    res = _attack(name, budget, model, task)

    _assert_state_equal(_snapshot(model), before)
    assert res.model is not model
    _assert_state_equal(_snapshot(res.model.extractor), _snapshot(model.extractor))
    assert res.model.head.weight.data_ptr() != model.head.weight.data_ptr()

    if res.stopped_by != "converged":
        assert res.stopped_by == "steps"
        assert len(res.records) == budget.steps
    assert len(res.records) >= 1
    assert [r.step for r in res.records] == list(range(1, len(res.records) + 1))
    assert res.initial.step == 0
    assert res.initial.examples == 0
    assert res.initial.flops == 0.0
    examples = [r.examples for r in [res.initial, *res.records]]
    flops = [r.flops for r in [res.initial, *res.records]]
    assert all(b >= a for a, b in itertools.pairwise(examples))
    assert all(b >= a for a, b in itertools.pairwise(flops))
    assert examples[-1] > 0
    for r in res.records:
        assert r.norm_ratio is not None
        assert (r.accuracy is None) == (loss == "mse")


@pytest.mark.parametrize(("name", "opt"), CASES)
def test_the_returned_head_is_the_final_probe(name: str, opt: str) -> None:
    # loss in the last record is the training MSE of the returned model's head on the attack split.
    task = _task()
    model = _linear(task.input_dim)
    res = _attack(name, _budget(opt), model, task)
    with torch.no_grad():
        pred = res.model(task.attack.x)
    mse = float(((pred - task.attack.y.reshape(pred.shape)) ** 2).mean())
    assert mse == pytest.approx(res.records[-1].loss, rel=1e-10, abs=1e-12)


def _per_step_examples(name: str, opt: str, task: Task) -> int:
    return 16 if (opt in STOCHASTIC and name not in CLOSED_FORM) else len(task.attack)


ITERATIVE = [(n, o) for n, o in CASES if n not in CLOSED_FORM]


@pytest.mark.parametrize(("name", "opt"), ITERATIVE)
def test_max_examples_stops_exactly_and_is_never_exceeded(name: str, opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    per = _per_step_examples(name, opt, task)
    cap = 3 * per + per // 2  # room for exactly 3 steps
    res = _attack(name, _budget(opt, max_examples=cap), model, task)
    assert res.stopped_by == "examples"
    assert len(res.records) == 3
    assert all(r.examples <= cap for r in res.records)
    # A cap below one step allows no step at all.
    res0 = _attack(name, _budget(opt, max_examples=per - 1), model, task)
    assert res0.stopped_by == "examples"
    assert res0.records == []


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_closed_form_respects_caps(name: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    res = _attack(name, _budget("gd_exact", max_examples=len(task.attack) - 1), model, task)
    assert res.stopped_by == "examples" and res.records == []
    res = _attack(name, _budget("gd_exact", max_flops=1.0), model, task)
    assert res.stopped_by == "flops" and res.records == []
    res = _attack(name, _budget("gd_exact", max_examples=len(task.attack)), model, task)
    assert res.stopped_by == "converged" and len(res.records) == 1


@pytest.mark.parametrize(("name", "opt"), ITERATIVE)
def test_max_flops_names_flops_and_is_never_exceeded(name: str, opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    free = _attack(name, _budget(opt), model, task)
    per = free.records[0].flops  # cost of one step
    cap = 5.5 * per
    res = _attack(name, _budget(opt, max_flops=cap), model, task)
    assert res.stopped_by == "flops"
    assert 1 <= len(res.records) <= 5
    assert all(r.flops <= cap for r in res.records)


@pytest.mark.parametrize(
    "opt",
    [
        "gd_exact",
        "gd",
        "sgd",
        "adam",
    ],
)
def test_max_flops_uses_the_whole_budget(opt: str) -> None:
    """With max_flops = 4 × (cost of one step) the attacker is entitled to exactly 4 steps.

    ``_ProbeRun._over_budget`` (attacks/linear_probe.py) tests ``flops + 3·flops_per_product``,
    the full-batch gd_exact cost, whatever the optimizer; gd steps cost 2 products and sgd/adam
    steps ``2·(batch/N)`` products, so those attackers stop early and get less than their budget.
    """
    task = _task()
    model = _linear(task.input_dim)
    per = _attack("linear_probe", _budget(opt), model, task).records[0].flops
    res = _attack("linear_probe", _budget(opt, max_flops=4 * per), model, task)
    assert res.stopped_by == "flops"
    assert len(res.records) == 4


@pytest.mark.parametrize(("name", "opt"), CASES)
def test_same_seed_gives_identical_curves(name: str, opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    a = _attack(name, _budget(opt), model, task, seed=3)
    b = _attack(name, _budget(opt), model, task, seed=3)
    assert _curves(a) == _curves(b)
    assert a.stopped_by == b.stopped_by
    assert torch.equal(a.model.head.weight, b.model.head.weight)


@pytest.mark.parametrize("opt", sorted(STOCHASTIC))
def test_different_seeds_give_different_stochastic_curves(opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    a = _attack("linear_probe", _budget(opt), model, task, seed=3)
    b = _attack("linear_probe", _budget(opt), model, task, seed=4)
    assert a.curve("loss") != b.curve("loss")
    assert not torch.equal(a.model.head.weight, b.model.head.weight)


@pytest.mark.parametrize("opt", ["gd_exact", "gd"])
def test_full_batch_optimizers_do_not_depend_on_the_seed(opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    a = _attack("linear_probe", _budget(opt), model, task, seed=3)
    b = _attack("linear_probe", _budget(opt), model, task, seed=4)
    assert a.curve("norm_ratio") == b.curve("norm_ratio")


def test_random_init_depends_on_the_seed_only() -> None:
    task = _task()
    model = _linear(task.input_dim)
    probe = ATTACKS.get("linear_probe")(init="normal")
    budget = _budget("gd_exact")
    a, b, c = (probe(model, task, budget, seed=s) for s in (1, 1, 2))
    assert a.curve("loss") == b.curve("loss")
    assert a.curve("loss") != c.curve("loss")


@pytest.mark.parametrize("steps", [0, -1])
def test_budget_rejects_non_positive_steps(steps: int) -> None:
    with pytest.raises(ConfigError, match="steps"):
        AttackBudget(steps=steps)


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_budget_rejects_non_positive_lr(lr: float) -> None:
    with pytest.raises(ConfigError, match="lr"):
        AttackBudget(steps=1, lr=lr)


def test_budget_rejects_unknown_optimizer() -> None:
    with pytest.raises(ConfigError, match="rmsprop"):
        AttackBudget(steps=1, optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(AttackBudget, {"steps": 1, "optimizer": "rmsprop"}, where="budget")


def test_budget_loading_is_strict() -> None:
    with pytest.raises(ConfigError, match=r"budget\.stepz: unknown key; did you mean 'steps'\?"):
        load_config(AttackBudget, {"stepz": 3}, where="budget")
    ok = load_config(AttackBudget, {"steps": 3, "optimizer": "sgd", "lr": 1}, where="budget")
    assert ok == AttackBudget(steps=3, optimizer="sgd", lr=1.0)


def test_wrong_input_dimension_is_a_clear_error() -> None:
    task = _task()
    with pytest.raises(DataError, match="inputs but task"):
        _attack("linear_probe", _budget("gd_exact"), _linear(task.input_dim + 2), task)
