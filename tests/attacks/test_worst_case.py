"""WorstCase (strongest member of a grid) and the Optuna attacker search, on tiny synthetic tasks."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.attacks.worst_case import (
    AttackerSearch,
    SearchConfig,
    WorstCase,
    member_key,
    redact,
    score,
    search_attacker,
)
from immunekit.data.synthetic import gaussian_spectra
from immunekit.data.task import Dataset
from immunekit.errors import ConfigError, DataError
from immunekit.metrics.task_scores import task_score
from immunekit.models.base import linear_model

pytest.importorskip("optuna")

DIM = 6
WEAK = ("linear_probe", {}, AttackBudget(steps=3, optimizer="sgd", lr=1e-3))
MID = ("linear_probe", {}, AttackBudget(steps=10, optimizer="adam", lr=1e-2))
STRONG = ("linear_probe", {}, AttackBudget(steps=30, optimizer="gd_exact"))
SPACE = {
    "attacks": ["linear_probe"],
    "optimizers": ["sgd", "adam"],
    "lr_min": 1e-3,
    "lr_max": 1.0,
    "steps": 8,
}


@pytest.fixture(scope="module")
def task():
    return gaussian_spectra(dim=DIM, n=96, seed=0, evaluation_splits=True)


def _harm(name, config, budget, task, split="eval_harmful", seed=0):
    """Harm recomputed independently: the attacked model's task score on ``split``."""
    res = ATTACKS.get(name)(**config)(linear_model(DIM), task, budget, seed=seed)
    data = getattr(task, split)
    return task_score(res.model(data.x), data.y, task.loss)


def test_worst_case_picks_the_member_with_the_highest_final_harm(task):
    model = linear_model(DIM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = WorstCase([WEAK, MID, STRONG])(model, task, AttackBudget(steps=1), seed=0)
    members = res.info["members"]
    harms = {k: _harm(*s, task) for k, s in zip(members, [WEAK, MID, STRONG], strict=True)}
    assert [members[k]["final_harm"] for k in members] == pytest.approx(list(harms.values()), abs=1e-12)
    assert res.info["chosen"]["key"] == max(harms, key=harms.get) == member_key(*STRONG)
    assert score(res.model, task.eval_harmful, task.loss) == pytest.approx(max(harms.values()), abs=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_utility_floor_skips_members_that_destroy_utility(task):
    free = WorstCase([WEAK, MID, STRONG])(linear_model(DIM), task, AttackBudget(steps=1), seed=0)
    members = free.info["members"]
    strong, mid = members[member_key(*STRONG)], members[member_key(*MID)]
    floor = (strong["final_utility"] + mid["final_utility"]) / 2
    assert strong["final_utility"] < floor <= mid["final_utility"]  # the floor separates them
    res = WorstCase([WEAK, MID, STRONG], utility_floor=floor)(
        linear_model(DIM), task, AttackBudget(steps=1), seed=0
    )
    assert res.info["chosen"]["key"] == member_key(*MID)
    assert res.info["chosen"]["meets_floor"] and not res.info["members"][member_key(*STRONG)]["meets_floor"]
    assert res.info["chosen"]["final_utility"] >= floor


def test_worst_case_uses_the_call_budget_for_members_without_one_and_keys_are_unique(task):
    call = AttackBudget(steps=2, optimizer="sgd", lr=0.01)
    settings = [
        ("linear_probe", {}, None),
        {"attack": "linear_probe", "budget": {"steps": 2, "optimizer": "sgd", "lr": 0.01}},
        ("linear_probe", AttackBudget(steps=4, optimizer="sgd", lr=0.01)),
    ]
    res = WorstCase(settings)(linear_model(DIM), task, call, seed=0)
    key = "linear_probe[sgd,lr=0.01,steps=2,batch=32]"
    assert list(res.info["members"]) == [key, key + "#2", key.replace("steps=2", "steps=4")]
    assert [m["steps"] for m in res.info["members"].values()] == [2, 2, 4]
    first, second = (res.info["members"][k] for k in (key, key + "#2"))
    assert first["final_harm"] == second["final_harm"]  # same settings, same seed


def test_worst_case_rejects_unknown_attacks_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'linear_probe'"):
        WorstCase([("linear_prob", {}, None)])


def _grid_values(task, grid, seed):
    budgets = [
        AttackBudget(steps=8, lr=g["lr"], optimizer=g["optimizer"], batch_size=g["batch_size"]) for g in grid
    ]
    return [_harm("linear_probe", {}, b, task, "val_harmful", seed=seed) for b in budgets]


GRID = [
    {"attack": "linear_probe", "optimizer": "sgd", "lr": 1e-3, "batch_size": 32},
    {"attack": "linear_probe", "optimizer": "adam", "lr": 0.05, "batch_size": 16},
    {"attack": "linear_probe", "optimizer": "sgd", "lr": 0.2, "batch_size": 64},
]


def test_search_is_never_weaker_than_the_best_grid_setting_on_validation(task):
    found = search_attacker(linear_model(DIM), task, n_trials=6, grid=GRID, seed=3, **SPACE)
    fixed = _grid_values(task, GRID, seed=3)
    assert [t["value"] for t in found.trials[:3]] == pytest.approx(fixed, abs=1e-12)
    assert [t["enqueued"] for t in found.trials] == [True] * 3 + [False] * 3
    assert found.best_value >= max(fixed)
    assert (
        found.cumulative_best == sorted(found.cumulative_best)
        and found.cumulative_best[-1] == found.best_value
    )


def test_search_reports_the_chosen_settings_on_eval_harmful_not_on_validation(task):
    found = search_attacker(linear_model(DIM), task, n_trials=4, seed=1, **SPACE)
    best = max((t for t in found.trials if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert found.chosen["params"] == best["params"] and found.best_value == best["value"]
    model = found.result.model
    assert found.eval_harm == task_score(model(task.eval_harmful.x), task.eval_harmful.y, task.loss)
    assert found.best_value == pytest.approx(score(model, task.val_harmful, task.loss), abs=1e-12)
    assert found.eval_harm != found.best_value  # two different splits
    assert found.to_dict()["reported_split"] == "eval_harmful"


def test_search_is_reproducible_with_the_same_seed(task):
    a = search_attacker(linear_model(DIM), task, n_trials=5, seed=7, **SPACE)
    b = search_attacker(linear_model(DIM), task, n_trials=5, seed=7, **SPACE)
    c = search_attacker(linear_model(DIM), task, n_trials=5, seed=8, **SPACE)
    assert a.trials == b.trials and a.chosen == b.chosen and a.eval_harm == b.eval_harm
    assert [t["params"] for t in a.trials] != [t["params"] for t in c.trials]


def test_sqlite_storage_resumes_an_interrupted_study(task, tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    first = search_attacker(linear_model(DIM), task, n_trials=3, seed=0, storage=storage, **SPACE)
    again = search_attacker(linear_model(DIM), task, n_trials=5, seed=0, storage=storage, **SPACE)
    assert len(first.trials) == 3 and len(again.trials) == 5
    assert again.trials[:3] == first.trials
    assert again.storage == storage


def test_attacker_search_as_an_attack_returns_the_rerun_with_the_summary(task):
    search = AttackerSearch(SearchConfig(n_trials=2, **SPACE))
    res = search(linear_model(DIM), task, AttackBudget(), seed=0)
    assert res.info["search"]["chosen"]["attack"] == "linear_probe"
    assert res.info["search"]["eval_harm"] == score(res.model, task.eval_harmful, task.loss)


def test_missing_validation_split_names_the_fix():
    plain = gaussian_spectra(dim=4, n=32, seed=0)
    with pytest.raises(DataError, match=r"val_harmful.*evaluation_splits=True"):
        search_attacker(linear_model(4), plain, n_trials=1, **SPACE)


def test_unknown_attack_in_the_space_is_rejected_before_any_trial(task):
    with pytest.raises(ConfigError, match="did you mean 'linear_probe'"):
        search_attacker(linear_model(DIM), task, **{**SPACE, "attacks": ["linear_prob"]})


def test_grid_settings_outside_the_space_are_rejected():
    with pytest.raises(ConfigError, match=r"lr=10\.0 lies outside the search space"):
        AttackerSearch(grid=[{**GRID[0], "lr": 10.0}], **SPACE)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"n_trials": 0}, "n_trials"),
        ({"lr_min": 1.0, "lr_max": 0.1}, "lr range"),
        ({"optimizers": ["adamm"]}, "did you mean 'adam'"),
        ({"split": "eval_harmful"}, "split"),
        ({"steps_max": 2}, "steps_max"),
    ],
)
def test_search_config_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SearchConfig(**{**SPACE, **overrides})


def test_missing_optuna_gives_an_install_hint(task, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` raise ImportError
    with pytest.raises(ConfigError, match=r"immunekit\[tune\]"):
        search_attacker(linear_model(DIM), task, n_trials=1, **SPACE)


def test_storage_passwords_are_redacted():
    assert redact("postgresql://bob:secret@db:5432/s") == "postgresql://bob:***@db:5432/s"
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


def test_when_no_member_meets_the_floor_the_strongest_is_reported_and_flagged(task, caplog):
    res = WorstCase([WEAK, STRONG], utility_floor=2.0)(linear_model(DIM), task, AttackBudget(steps=1), seed=0)
    assert res.info["chosen"]["key"] == member_key(*STRONG) and not res.info["chosen"]["meets_floor"]
    assert "no member keeps utility" in caplog.text


# ---------------------------------------------------------------------------------------------
# issue 9, item 8c: WorstCase selects on val_harmful and reports on eval_harmful
# ---------------------------------------------------------------------------------------------


def _with_validation(task, y):
    """The task with val_harmful's targets replaced by ``y`` (same rows and ids)."""
    val = task.val_harmful
    return dataclasses.replace(task, val_harmful=Dataset(val.x, y, val.ids))


def test_worst_case_selects_on_val_harmful_and_reports_eval_harmful(task):
    # negated validation targets: the strongest attacker on eval_harmful is the weakest on val_harmful
    flipped = _with_validation(task, -task.val_harmful.y)
    res = WorstCase([WEAK, MID, STRONG])(linear_model(DIM), flipped, AttackBudget(steps=1), seed=0)
    members = res.info["members"]
    keys = [member_key(*s) for s in (WEAK, MID, STRONG)]
    val = [_harm(*s, flipped, "val_harmful") for s in (WEAK, MID, STRONG)]
    held = [_harm(*s, flipped) for s in (WEAK, MID, STRONG)]
    assert [members[k]["selection_harm"] for k in keys] == pytest.approx(val, abs=1e-12)
    assert [members[k]["final_harm"] for k in keys] == pytest.approx(held, abs=1e-12)
    assert max(val) == val[0] and max(held) == held[2]  # the two splits disagree
    assert res.info["chosen"]["key"] == keys[0]  # chosen on val_harmful ...
    assert res.info["chosen"]["final_harm"] == pytest.approx(held[0], abs=1e-12)  # ... reported on eval
    assert res.info["selection_split"] == "val_harmful" and res.info["eval_split"] == "eval_harmful"
    assert res.info["selected_on_reported_split"] is False


def test_worst_case_without_val_harmful_selects_on_the_reported_split_and_says_so(caplog):
    plain = gaussian_spectra(dim=DIM, n=96, seed=0)
    assert plain.val_harmful is None
    res = WorstCase([WEAK, STRONG])(linear_model(DIM), plain, AttackBudget(steps=1), seed=0)
    assert res.info["selection_split"] == "eval_harmful" and res.info["selected_on_reported_split"] is True
    assert res.info["chosen"]["key"] == member_key(*STRONG)
    assert "selected on the same split" in caplog.text and "optimistic for the attacker" in caplog.text
    caplog.clear()
    with_val = gaussian_spectra(dim=DIM, n=96, seed=0, evaluation_splits=True)
    WorstCase([WEAK, STRONG])(linear_model(DIM), with_val, AttackBudget(steps=1), seed=0)
    assert "optimistic" not in caplog.text


# ---------------------------------------------------------------------------------------------
# issue 9, item 6: the search runs every grid setting exactly, so it is never weaker than the grid
# ---------------------------------------------------------------------------------------------

SPACE_X = {**SPACE, "optimizers": ["sgd", "adam", "sgd_momentum"]}
ON_POINT = ("linear_probe", {}, AttackBudget(steps=8, optimizer="sgd", lr=0.05, batch_size=32))
MOMENTUM = ("linear_probe", {}, AttackBudget(steps=8, optimizer="sgd_momentum", lr=0.05, momentum=0.5))
EXACT_GRID = [
    ON_POINT,  # a point of the space with the template's other fields: TPE learns from it
    ("linear_probe", {}, AttackBudget(steps=8, optimizer="sgd", lr=0.05, batch_size=32, warmup_steps=4)),
    ("linear_probe", {}, AttackBudget(steps=8, optimizer="adam", lr=0.05, batch_size=16, schedule="cosine")),
    MOMENTUM,
    ("linear_probe", {}, AttackBudget(steps=8, optimizer="adam", lr=0.05, batch_size=64, eval_every=2)),
    ("linear_probe", {}, AttackBudget(steps=8, optimizer="sgd", lr=0.2, batch_size=64, max_examples=3 * 64)),
    ("linear_probe", {"init": "normal"}, AttackBudget(steps=8, optimizer="adam", lr=0.05, batch_size=32)),
    ("linear_probe", {}, AttackBudget(steps=30, optimizer="gd_exact")),  # lr None: outside the space
    ("full_finetune", {"reset_head": True}, AttackBudget(steps=8, optimizer="sgd", lr=0.05, batch_size=32)),
]


def test_every_grid_setting_runs_exactly_and_the_search_is_never_weaker_than_any(task, caplog):
    caplog.set_level("INFO", logger="immunekit.attacks.worst_case")
    found = search_attacker(linear_model(DIM), task, n_trials=2, grid=EXACT_GRID, seed=3, **SPACE_X)
    direct = [_harm(*s, task, "val_harmful", seed=3) for s in EXACT_GRID]
    assert [g["value"] for g in found.grid] == pytest.approx(direct, abs=1e-12)
    assert all(found.best_value >= v for v in direct)
    assert found.grid_best_value == max(direct)
    # n_trials raised to the grid size, and said so
    assert found.n_trials_requested == 2 and found.n_trials_effective == len(EXACT_GRID)
    assert "n_trials raised from 2 to 9" in caplog.text
    assert len(found.trials) == 9 and all(t["enqueued"] for t in found.trials)
    assert [g["state"] for g in found.grid] == ["COMPLETE"] * 9
    assert [g["budget"] for g in found.grid] == [dataclasses.asdict(b) for _, _, b in EXACT_GRID]
    # points of the space: ON_POINT, and the eval_every=2 member (evaluations move no weight)
    assert [g["in_space"] for g in found.grid] == [
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    first = found.trials[found.grid[0]["trial"]]
    assert first["params"] == {"attack": "linear_probe", "optimizer": "sgd", "lr": 0.05, "batch_size": 32,
                               "schedule": "constant"}  # fmt: skip
    assert all(found.trials[g["trial"]]["params"] == {} for g in found.grid if not g["in_space"])
    # the template's momentum (0.9), as the former enqueueing used, is a different attacker: the
    # exact-budget check above can tell them apart
    swapped = dataclasses.replace(MOMENTUM[2], momentum=0.9)
    assert abs(_harm("linear_probe", {}, swapped, task, "val_harmful", seed=3) - direct[3]) > 1e-6
    assert found.to_dict()["n_trials_effective"] == 9 and "grid setting" in found.to_dict()["guarantee"]


def test_fewer_trials_than_grid_points_still_run_every_point(task):
    found = search_attacker(linear_model(DIM), task, n_trials=1, grid=GRID, seed=3, **SPACE)
    assert [t["enqueued"] for t in found.trials] == [True] * 3
    assert [t["value"] for t in found.trials] == pytest.approx(_grid_values(task, GRID, seed=3), abs=1e-12)
    assert found.best_value == max(t["value"] for t in found.trials)


def test_a_grid_setting_chosen_as_best_is_rerun_exactly(task):
    strong = ("linear_probe", {}, AttackBudget(steps=30, optimizer="gd_exact", eval_every=5))
    found = search_attacker(linear_model(DIM), task, n_trials=1, grid=[WEAK, strong], seed=0, **SPACE)
    assert found.n_trials_effective == 2 and found.chosen["grid"] == member_key(*strong)
    assert found.chosen["budget"] == dataclasses.asdict(strong[2])
    assert score(found.result.model, task.val_harmful, task.loss) == found.best_value
    assert [s for s, _ in found.result.harm_curve()] == [0, 5, 10, 15, 20, 25, 30]  # its own eval_every
    assert found.eval_harm == score(found.result.model, task.eval_harmful, task.loss)


def test_a_resumed_study_runs_only_the_grid_settings_it_has_not_finished(task, tmp_path):
    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    grid = [ON_POINT, MOMENTUM, ON_POINT]  # a setting listed twice runs once
    first = search_attacker(
        linear_model(DIM), task, n_trials=3, grid=grid, seed=0, storage=storage, **SPACE_X
    )
    assert [t["enqueued"] for t in first.trials] == [True, True, False]
    assert first.grid[0]["trial"] == first.grid[2]["trial"] == 0
    again = search_attacker(
        linear_model(DIM), task, n_trials=4, grid=grid, seed=0, storage=storage, **SPACE_X
    )
    assert again.trials[:3] == first.trials and len(again.trials) == 4 and not again.trials[3]["enqueued"]
    more = [*grid, WEAK]
    third = search_attacker(
        linear_model(DIM), task, n_trials=4, grid=more, seed=0, storage=storage, **SPACE_X
    )
    assert third.n_trials_effective == 5 and third.trials[4]["grid"]["key"] == member_key(*WEAK)
    assert third.grid[3]["value"] == pytest.approx(_harm(*WEAK, task, "val_harmful"), abs=1e-12)


def test_grid_settings_that_cannot_be_trials_are_rejected_with_the_reason():
    search = AttackerSearch(**SPACE)
    b = AttackBudget(steps=8, optimizer="sgd", lr=0.05)
    assert search.outside_space(("linear_probe", AttackBudget(steps=30, optimizer="gd_exact"))) is None
    assert search.outside_space(("full_finetune", {"reset_head": True}, b)) is None
    assert "val_harmful" in search.outside_space(("linear_probe", {"split": "val_harmful"}, b))
    assert "did you mean 'linear_probe'" in search.outside_space(("linear_prob", b))
    assert "lies outside the search space" in search.outside_space({**GRID[0], "lr": 10.0})
    with pytest.raises(ConfigError, match="val_harmful"):
        AttackerSearch(grid=[("linear_probe", {"split": "val_harmful"}, b)], **SPACE)
