"""Contract suite for every registered attack × optimizer (DESIGN §2 "Attack", §6 contract tier).

Parametrized from ``ATTACKS.names()`` and ``OPTIMIZERS``: the input model is never mutated, probes
leave the extractor untouched, one record per step with 1-based indices, cumulative counters,
budget caps that name the stopping dimension and are never exceeded, seeded determinism, and the
harm-curve convention (eval at step 0, every ``eval_every`` steps and the last step).
``closed_form_probe`` ignores the optimizer, so it is run once; ``gd_exact`` (exact line search) is
implemented by ``linear_probe`` only, and every torch-loop attack rejects it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from immunekit.attacks import ATTACKS, OPTIMIZERS, SCHEDULES, AttackBudget, AttackResult
from immunekit.config import load_config
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset, Task
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.task_scores import task_score
from immunekit.models.base import ImmunizableModel, linear_model

F64 = torch.float64
CLOSED_FORM = {"closed_form_probe"}  # attacks that solve in one step, whatever the optimizer
MATH_PROBES = {"linear_probe", "closed_form_probe"}  # closed-form maths: norm_ratio recorded
PROBES = MATH_PROBES | {"head_reset_probe"}  # attacks that never move the extractor
META = {"worst_case", "attacker_search"}  # run other attacks; their own contract is below
# causal LMs on token splits only: their contract is tests/attacks/test_lm_sft.py (copy, steps, harm curve)
LANGUAGE = {"lm_finetune", "lm_lora", "lm_head_probe"}
NAMES = [n for n in ATTACKS.names() if n not in META | LANGUAGE]
LOOP = [n for n in NAMES if n not in MATH_PROBES]  # torch training loop (_loop.py)
STOCHASTIC = {"sgd", "sgd_momentum", "adam", "adamw"}


def _optimizers(name: str) -> tuple[str, ...]:
    if name in CLOSED_FORM:
        return (OPTIMIZERS[0],)
    return OPTIMIZERS if name in MATH_PROBES else tuple(o for o in OPTIMIZERS if o != "gd_exact")


CASES = [(name, opt) for name in NAMES for opt in _optimizers(name)]


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


def test_registry_lists_the_attacks() -> None:
    assert {"linear_probe", "closed_form_probe"} <= set(ATTACKS.names())
    assert set(LOOP) == {"head_reset_probe", "full_finetune", "partial_finetune", "relearn", "lora"}
    assert set(OPTIMIZERS) == {"gd_exact", "gd", "sgd", "sgd_momentum", "adam", "adamw"}
    assert SCHEDULES == ("constant", "cosine")


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
    assert isinstance(res.model, type(model))
    if name not in PROBES:  # probes replace the head (bias-free); the others keep every tensor
        assert res.model.state_dict().keys() == before.keys()
    if name in PROBES:
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
        assert (r.norm_ratio is not None) == (name in MATH_PROBES)
        assert (r.accuracy is None) == (loss == "mse")
        assert r.tokens == 0  # tabular inputs


@pytest.mark.parametrize(("name", "opt"), CASES)
def test_the_returned_head_is_the_final_probe(name: str, opt: str) -> None:
    # with loss_on="split" (the loop attacks; the probes always record it), the loss in the last
    # record is the training MSE of the returned model on the rows it trained on last (the attack
    # split; relearn's seeded subset of it).
    task = _task()
    model = _linear(task.input_dim)
    budget = _budget(opt)
    kw = {"loss_on": "split"} if name in LOOP else {}
    if name == "relearn":
        kw["subset_size"] = 20
    res = ATTACKS.get(name)(**kw)(model, task, budget, seed=0)
    rows = torch.tensor(res.info["subset_rows"]) if name == "relearn" else torch.arange(len(task.attack))
    x, y = task.attack.x[rows], task.attack.y[rows]
    if name == "relearn":
        assert len(rows) == 20 and len(set(rows.tolist())) == 20
    with torch.no_grad():
        pred = res.model(x)
    mse = float(((pred - y.reshape(pred.shape)) ** 2).mean())
    assert mse == pytest.approx(res.records[-1].loss, rel=1e-10, abs=1e-12)


def _per_step_examples(name: str, opt: str, task: Task) -> int:
    return 16 if (opt in STOCHASTIC and name not in CLOSED_FORM) else len(task.attack)


ITERATIVE = [(n, o) for n, o in CASES if n not in CLOSED_FORM]
LOOP_CASES = [(n, o) for n, o in CASES if n in LOOP]


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


@pytest.mark.parametrize(("name", "opt"), ITERATIVE)
def test_max_flops_uses_the_whole_budget(name: str, opt: str) -> None:
    """With max_flops = 4 × (cost of one step) the attacker is entitled to exactly 4 steps.

    (An earlier probe tested the gd_exact cost whatever the optimizer and stopped the others early.)
    """
    task = _task()
    model = _linear(task.input_dim)
    per = _attack(name, _budget(opt), model, task).records[0].flops
    res = _attack(name, _budget(opt, max_flops=4 * per), model, task)
    assert res.stopped_by == "flops"
    assert len(res.records) == 4
    assert res.records[-1].flops == 4 * per


@pytest.mark.parametrize(("name", "opt"), CASES)
def test_same_seed_gives_identical_curves(name: str, opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    a = _attack(name, _budget(opt, eval_every=4), model, task, seed=3)
    b = _attack(name, _budget(opt, eval_every=4), model, task, seed=3)
    assert _curves(a) == _curves(b)
    assert a.harm_curve() == b.harm_curve()
    assert a.stopped_by == b.stopped_by
    _assert_state_equal(_snapshot(a.model), _snapshot(b.model))


@pytest.mark.parametrize("name", ["linear_probe", *LOOP])
@pytest.mark.parametrize("opt", sorted(STOCHASTIC))
def test_different_seeds_give_different_stochastic_curves(name: str, opt: str) -> None:
    task = _task()
    model = _linear(task.input_dim)
    a = _attack(name, _budget(opt), model, task, seed=3)
    b = _attack(name, _budget(opt), model, task, seed=4)
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


# ---------------------------------------------------------------------------------------------
# Harm curve, optimizers, configs, tokens, and what each attack may move
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eval_every", [0, 5])
@pytest.mark.parametrize(("name", "opt"), CASES)
def test_harm_curve_at_step_zero_every_period_and_the_last_step(name: str, opt: str, eval_every: int) -> None:
    from immunekit.metrics.task_scores import task_score

    task = _task("ce")
    model = TinyMLP(task.input_dim)
    res = _attack(name, _budget(opt, eval_every=eval_every), model, task)
    last = res.records[-1].step
    expected = sorted({0, last, *(range(eval_every, last + 1, eval_every) if eval_every else ())})
    assert [s for s, _ in res.harm_curve()] == expected
    for r in [res.initial, *res.records]:
        assert (r.eval is not None) == (r.step in expected)
        if r.eval is not None:
            assert {"harm", "utility"} <= set(r.eval)
            assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in (r.eval["harm"], r.eval["utility"]))
    with torch.no_grad():
        harm = task_score(res.model(task.eval_harmful.x), task.eval_harmful.y, "ce")
        utility = task_score(res.model(task.eval_primary.x), task.eval_primary.y, "ce")
    assert res.records[-1].eval == pytest.approx({**res.records[-1].eval, "harm": harm, "utility": utility})


@pytest.mark.parametrize("name", LOOP)
def test_loop_attacks_reject_gd_exact_naming_the_alternatives(name: str) -> None:
    task = _task()
    with pytest.raises(ConfigError, match=r"'gd_exact'.*linear_probe.*'adamw'"):
        _attack(name, _budget("gd_exact"), _linear(task.input_dim), task)


@pytest.mark.parametrize("name", NAMES)
def test_configs_round_trip(name: str) -> None:
    import dataclasses

    attack = ATTACKS.get(name)()
    cfg = attack.config if hasattr(attack, "config") else attack.inner.config
    data = dataclasses.asdict(cfg)
    assert load_config(type(cfg), data, where="attack") == cfg
    assert ATTACKS.get(name)(**data).__dict__.keys() == attack.__dict__.keys()


@pytest.mark.parametrize("name", LOOP)
def test_a_missing_optional_split_is_a_data_error_naming_task_and_split(name: str) -> None:
    task = _task()
    with pytest.raises(DataError, match=r"gaussian_spectra.*'attack_cross'"):
        ATTACKS.get(name)(split="attack_cross")(_linear(task.input_dim), task, _budget("sgd"), seed=0)


class _BagOfTokens(ImmunizableModel):
    """Token-id inputs (N, L): embedding, mean over the sequence, linear head."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.extractor = nn.Embedding(vocab, dim, dtype=F64)
        self.head = nn.Linear(dim, 1, dtype=F64)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x).mean(1)


def _token_task(n: int = 40, length: int = 5) -> Task:
    g = torch.Generator().manual_seed(0)

    def ds(prefix: str) -> Dataset:
        x = torch.randint(0, 11, (n, length), generator=g)
        return Dataset(x, (x.sum(1) % 7).to(F64), tuple(f"{prefix}:{i}" for i in range(n)))

    return Task(
        name="tokens",
        version="test",
        loss="mse",
        primary=ds("p"),
        harmful=ds("h"),
        attack=ds("a"),
        eval_primary=ds("ep"),
        eval_harmful=ds("eh"),
    )


@pytest.mark.parametrize("name", sorted(set(LOOP) - {"lora"}))
def test_max_tokens_counts_sequence_tokens_and_stops_exactly(name: str) -> None:
    task, model = _token_task(), _BagOfTokens()
    budget = _budget("sgd", max_tokens=3 * 16 * 5 + 7)  # 16 rows × 5 tokens per step: room for 3 steps
    res = _attack(name, budget, model, task)
    assert res.stopped_by == "tokens"
    assert [r.tokens for r in res.records] == [80, 160, 240]
    assert all(r.tokens <= budget.max_tokens for r in res.records)


def _two_block_mlp(d_in: int) -> ImmunizableModel:
    class TwoBlocks(ImmunizableModel):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(4)
            self.extractor = nn.Sequential(
                nn.Linear(d_in, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 4, dtype=F64), nn.Tanh()
            )
            self.head = nn.Linear(4, 1, dtype=F64)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=F64))

    return TwoBlocks()


@pytest.mark.parametrize("opt", ["gd", "sgd", "adamw"])
def test_partial_finetune_leaves_earlier_blocks_untouched(opt: str) -> None:
    task = _task()
    model = _two_block_mlp(task.input_dim)
    res = ATTACKS.get("partial_finetune")(blocks=1)(model, task, _budget(opt), seed=0)
    _assert_state_equal(_snapshot(res.model.extractor[0]), _snapshot(model.extractor[0]))
    assert not torch.equal(res.model.extractor[2].weight, model.extractor[2].weight)
    assert not torch.equal(res.model.head.weight, model.head.weight)
    assert all(p.requires_grad for p in res.model.parameters())  # flags restored on the copy
    both = ATTACKS.get("partial_finetune")(blocks=2)(model, task, _budget(opt), seed=0)
    assert not torch.equal(both.model.extractor[0].weight, model.extractor[0].weight)


def test_relearn_records_both_phases_against_one_budget() -> None:
    task = _task()
    model = _linear(task.input_dim)
    res = ATTACKS.get("relearn")(warmup_steps_benign=4, subset_size=20)(model, task, _budget("sgd"), seed=0)
    assert [(p["name"], p["split"], p["first_step"], p["last_step"]) for p in res.info["phases"]] == [
        ("benign", "primary", 1, 4),
        ("relearn", "attack", 5, 12),
    ]
    assert [p["rows"] for p in res.info["phases"]] == [len(task.primary), 20]
    assert [r.step for r in res.records] == list(range(1, 13))
    assert res.records[-1].examples == 12 * 16
    # a cap inside the benign phase stops there and names the dimension
    capped = ATTACKS.get("relearn")(warmup_steps_benign=4)(
        model, task, _budget("sgd", max_examples=50), seed=0
    )
    assert capped.stopped_by == "examples" and len(capped.records) == 3
    assert [p["last_step"] for p in capped.info["phases"]] == [3]


@pytest.mark.parametrize("name", sorted(META))
def test_meta_attacks_leave_the_input_alone_and_report_a_harm_curve(name: str) -> None:
    # worst_case and attacker_search run other attacks: the contract they add is that the input is
    # never mutated, the result is seeded, and its harm curve ends at the harm of the returned model.
    task = gaussian_spectra(dim=6, n=64, cond_primary=10.0, cond_harmful=30.0, seed=5, evaluation_splits=True)
    model = _linear(task.input_dim)
    before = _snapshot(model)
    attack = ATTACKS.get(name)() if name == "worst_case" else ATTACKS.get(name)(n_trials=3, steps=4)
    budget = _budget("adam", steps=4)
    res = attack(model, task, budget, seed=3)
    again = attack(model, task, budget, seed=3)
    for k, v in _snapshot(model).items():
        assert torch.equal(v, before[k]), k
    curve = res.harm_curve()
    assert len(curve) >= 2 and curve == again.harm_curve()
    with torch.no_grad():
        pred = res.model(task.eval_harmful.x)
    assert curve[-1][1] == pytest.approx(task_score(pred, task.eval_harmful.y, task.loss), abs=1e-12)


# ---------------------------------------------------------------- unroll ≡ __call__ (DESIGN §2 "Attack")

UNROLL = [n for n in NAMES if ATTACKS.get(n).supports_unroll]
UNROLL_CASES = [(n, o) for n in UNROLL for o in _optimizers(n)]


def test_the_torch_loop_attacks_unroll() -> None:
    assert set(UNROLL) == {"head_reset_probe", "full_finetune", "partial_finetune", "relearn"}
    for name in sorted(set(NAMES) - set(UNROLL)):  # the others say so, naming those that can
        task = _task()
        with pytest.raises(ConfigError, match="cannot be unrolled"):
            ATTACKS.get(name)().unroll(TinyMLP(task.input_dim), task, _budget("adam"), seed=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize(("name", "opt"), UNROLL_CASES)
def test_unroll_without_graph_equals_call(name: str, opt: str, loss: str, kind: str) -> None:
    task = _task(loss)
    model = MODELS[kind](task.input_dim)
    before = _snapshot(model)
    budget = _budget(opt, eval_every=5, warmup_steps=2, schedule="cosine")
    attack = ATTACKS.get(name)()
    res = attack(model, task, budget, seed=3)
    unrolled, theta = attack.unroll(model, task, budget, seed=3, create_graph=False)

    _assert_state_equal(_snapshot(model), before)
    _assert_state_equal(_snapshot(unrolled.model), _snapshot(res.model))
    named = dict(res.model.named_parameters())
    assert theta and all(torch.equal(t, named[k]) for k, t in theta.items())
    assert _curves(unrolled) == _curves(res)
    assert [r.eval for r in unrolled.records] == [r.eval for r in res.records]
    assert unrolled.stopped_by == res.stopped_by
    assert unrolled.info == res.info


def test_unroll_with_graph_differentiates_the_attack_outcome() -> None:
    # d(final harm loss)/dθ0 of a 3-step Adam attack, checked against a central difference
    task = _task("ce")
    model = TinyMLP(task.input_dim)
    budget = _budget("adam", steps=3, lr=0.05)
    attack = ATTACKS.get("full_finetune")()
    x, y = task.eval_harmful.x, task.eval_harmful.y.to(F64).reshape(-1, 1)

    def outcome(w: torch.Tensor) -> torch.Tensor:
        _, theta = attack.unroll(
            model, task, budget, seed=0, theta={"extractor.0.weight": w}, create_graph=True
        )
        pred = torch.func.functional_call(model, theta, (x,))
        return ((pred - y) ** 2).mean()

    w0 = model.extractor[0].weight.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(outcome(w0), w0)
    d = torch.randn(w0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    h = 1e-6
    numeric = (
        float(outcome(w0.detach() + h * d).detach()) - float(outcome(w0.detach() - h * d).detach())
    ) / (2 * h)
    assert float((grad * d).sum()) == pytest.approx(numeric, rel=1e-6, abs=1e-10)
    with pytest.raises(ConfigError, match="not parameters"):
        attack.unroll(model, task, budget, seed=0, theta={"nope": w0})
