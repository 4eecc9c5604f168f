"""evaluate(): the report-card record on a tiny synthetic task (linear models, float64)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from immunekit.attacks import AttackBudget
from immunekit.data.synthetic import gaussian_spectra
from immunekit.errors import ConfigError, DataError
from immunekit.experiments.evaluate import default_reference, evaluate, parse_attack_list, resolve_settings
from immunekit.metrics.conditions import Thresholds
from immunekit.models import ImmunizableModel, linear_model

BUDGET = AttackBudget(steps=20, optimizer="adam", lr=0.05, eval_every=5)
SEEDS = (0, 1, 2)
TOP_LEVEL = {
    "schema_version", "kind", "rules_version", "run_id", "created_at", "provenance", "config",
    "config_sha256", "seeds", "model", "reference", "task", "thresholds", "budget", "attacks", "groups",
    "search", "conditions", "per_attack", "gates", "verdict", "statement", "kappa", "metrics", "timing",
    "trials",
}  # fmt: skip


@pytest.fixture(scope="module")
def task():
    return gaussian_spectra(dim=6, n=96, seed=0, evaluation_splits=True)


def squeezed(dim: int = 6) -> ImmunizableModel:
    """θ = diag(1 … 1e-2): slows gradient probes, cannot slow the closed-form probe."""
    m = linear_model(dim)
    with torch.no_grad():
        m.extractor.weight.copy_(torch.diag(torch.logspace(0, -2, dim, dtype=torch.float64)))
    return m


@pytest.fixture(scope="module")
def record(task):
    model = squeezed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = evaluate(
        model, task, attacks=["linear_probe", "closed_form_probe"], budget=BUDGET, seeds=SEEDS, progress=False
    )
    rec["_unchanged"] = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return rec


def test_record_layout_is_json_and_complete(record) -> None:
    assert record.pop("_unchanged") is True  # the input model is never modified
    assert set(record) == TOP_LEVEL
    assert record["kind"] == "evaluation" and record["seeds"] == list(SEEDS)
    assert len(record["config_sha256"]) == 64 and record["provenance"]["immunekit"]
    json.dumps(record, allow_nan=False)  # NaN/Inf-free
    assert record["groups"]["resistance"] == ["linear_probe", "closed_form_probe"]
    assert record["groups"]["in_domain"] == ["in_domain:linear_probe", "in_domain:closed_form_probe"]
    assert record["groups"]["benign"] == ["benign:linear_probe"]


def test_curves_per_seed_for_both_models_and_paired_summaries(record) -> None:
    entry = record["attacks"]["linear_probe"]
    for role in ("immunized", "reference"):
        assert len(entry["curves"][role]) == len(SEEDS)
        assert [p[0] for p in entry["curves"][role][0]] == [0, 5, 10, 15, 20]
        assert entry["bands"][role]["steps"] == [0, 5, 10, 15, 20]
    final = entry["summary"]["final_harm"]
    imm, ref = final["values"]["immunized"], final["values"]["reference"]
    assert final["immunized"]["n"] == 3 and final["immunized"]["ci_low"] <= final["immunized"]["mean"]
    assert final["difference"]["mean"] == pytest.approx(
        sum(a - b for a, b in zip(imm, ref, strict=True)) / 3, rel=1e-12
    )
    assert imm == [c[-1][1] for c in entry["curves"]["immunized"]]


def test_closed_form_probe_is_not_slowed_and_statement_says_so(record) -> None:
    cf = record["per_attack"]["closed_form_probe"]
    assert cf["valid"] and cf["min_ratio"] == 1.0 and cf["holds"] is False
    assert "closed_form_probe" in record["statement"]["does_not_hold_against"]
    assert record["conditions"]["resistance_weak"]["status"] == "FAIL"
    assert record["verdict"]["verdict"] == "NOT IMMUNIZED"


def test_gradient_probe_is_slowed_by_the_squeezed_extractor(record) -> None:
    lp = record["per_attack"]["linear_probe"]
    s = record["attacks"]["linear_probe"]["summary"]["final_harm"]["difference"]
    assert s["ci_high"] < 0  # the immunized model ends less harmful on every resample
    assert lp["holds"] is True


def test_conditions_gates_and_kappa(record) -> None:
    conds = record["conditions"]
    assert conds["generalization_cross_domain"]["status"] == "NOT-RUN"
    assert conds["generalization_in_domain"]["status"] in ("PASS", "FAIL")
    assert conds["stability"]["q_reference"] > 0.9  # the least-squares head on θ_0 = I
    assert record["gates"]["disjointness"]["status"] == "PASS"
    assert record["gates"]["attack_validity"]["status"] == "PASS"
    kappa = record["kappa"]
    assert kappa["kappa_ratio_harmful"] > 1.0  # θ squeezes the harmful features
    assert kappa["rank_rule"]["rule"] == "factor-svd-v1" and kappa["rank_harmful_reference"] == 6
    # full-rank features far from every cut: the band edges give the same RIR, not sensitive
    assert kappa["rir_band_low"] == pytest.approx(kappa["rir"], rel=1e-12)
    assert kappa["rir_band_high"] == pytest.approx(kappa["rir"], rel=1e-12)
    assert kappa["threshold_sensitive"] == 0.0
    assert record["metrics"]["attack_seconds"]["direction"] == "lower"
    assert record["thresholds"]["harm"] == 0.5 and record["thresholds"]["phi_rule"] == "default per task"


def test_identity_model_matches_its_reference(task) -> None:
    # every step evaluated (eval_every=1): equal t* on both models is a weak-resistance FAIL; at
    # the default Δt = 5 it would be INCONCLUSIVE (both cross φ somewhere in the same interval)
    rec = evaluate(
        linear_model(6),
        task,
        attacks=["linear_probe[eval_every=1]", "linear_probe"],
        budget=BUDGET,
        seeds=(0, 1),
        progress=False,
    )
    assert (
        rec["conditions"]["stability"]["value"] == 0.0 and rec["conditions"]["stability"]["status"] == "PASS"
    )
    assert (
        rec["conditions"]["trainability"]["value"] == 0
        and rec["conditions"]["trainability"]["status"] == "PASS"
    )
    assert rec["per_attack"]["linear_probe[eval_every=1]"]["min_ratio"] == 1.0
    assert rec["per_attack"]["linear_probe[eval_every=1]"]["status"] == "FAIL"
    # Δt = 5 left it undecided, so the same seeded attack was re-run evaluated at every step
    assert rec["attacks"]["linear_probe"]["refined_until"] == 5  # both cross φ by step 5
    assert rec["per_attack"]["linear_probe"]["status"] == "FAIL"
    dense = rec["attacks"]["linear_probe[eval_every=1]"]["curves"]["immunized"][0]
    refined = rec["attacks"]["linear_probe"]["curves"]["immunized"][0]
    assert refined == [p for p in dense if p[0] <= 5 or p[0] % 5 == 0]
    assert rec["conditions"]["resistance"]["status"] == "FAIL"
    assert rec["verdict"]["verdict"] == "NOT IMMUNIZED"
    assert rec["kappa"]["rir"] == pytest.approx(1.0, rel=1e-12)


def test_default_reference_is_identity_even_when_rectangular() -> None:
    ref = default_reference(linear_model(4, 3))
    assert torch.equal(ref.extractor.weight, torch.eye(3, 4, dtype=torch.float64))
    assert not ref.head.weight.any()


class _Mlp(ImmunizableModel):
    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Linear(6, 4, dtype=torch.float64), nn.Tanh())
        self.head = nn.Linear(4, 1, dtype=torch.float64)


def test_bad_input_is_refused_before_any_attack(task) -> None:
    with pytest.raises(ConfigError, match="pass reference="):
        evaluate(_Mlp(), task, attacks=["linear_probe"], budget=BUDGET, progress=False)
    no_val = gaussian_spectra(dim=6, n=96, seed=0)
    with pytest.raises(DataError, match=r"no validation split 'val_harmful'.*evaluation_splits=True"):
        evaluate(
            linear_model(6), no_val, attacks=["linear_probe"], budget=BUDGET, search=object(), progress=False
        )
    with pytest.raises(ConfigError, match="did you mean 'linear_probe'"):
        evaluate(linear_model(6), task, attacks=["lin_probe"], budget=BUDGET, progress=False)
    with pytest.raises(ConfigError, match="outside the range"):
        evaluate(
            linear_model(6), task, attacks=["linear_probe"], thresholds=Thresholds(harm=2.0), progress=False
        )
    with pytest.raises(ConfigError, match="distinct"):
        evaluate(linear_model(6), task, attacks=["linear_probe"], seeds=(0, 0), progress=False)


def test_attack_specs_route_budget_and_config_keys() -> None:
    specs = parse_attack_list("linear_probe[optimizer=gd_exact,lr=null,init=normal],closed_form_probe")
    s = resolve_settings(specs, BUDGET)
    assert s[0].key == "linear_probe[init=normal,optimizer=gd_exact,lr=null]"
    assert (s[0].budget.optimizer, s[0].budget.lr, s[0].overrides) == ("gd_exact", None, {"init": "normal"})
    assert s[1].budget == BUDGET
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_settings(["linear_probe", "linear_probe"], BUDGET)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        resolve_settings(["linear_probe[steps=0]"], BUDGET)


def test_search_adds_a_worst_case_entry_and_cumulative_best(task) -> None:
    pytest.importorskip("optuna")
    from immunekit.attacks.worst_case import SearchConfig

    search = SearchConfig(
        n_trials=3, steps=20, attacks=("linear_probe",), optimizers=("adam",), n_startup_trials=3
    )
    rec = evaluate(
        squeezed(), task, attacks=["linear_probe"], budget=BUDGET, seeds=(0, 1), search=search, progress=False
    )
    key = rec["search"]["attack_key"]
    assert key.startswith("search:linear_probe") and rec["groups"]["search"] == [key]
    assert len(rec["search"]["trials"]) == 3 and len(rec["search"]["cumulative_best"]) == 3
    best = rec["search"]["cumulative_best"]
    assert best == sorted(best)
    assert key in rec["per_attack"] and f"in_domain:{key}" in rec["per_attack"]


def test_full_finetune_attack_and_benign_recipe(task) -> None:
    rec = evaluate(
        squeezed(),
        task,
        attacks=["full_finetune"],
        budget=AttackBudget(steps=10, optimizer="adam", lr=0.05, eval_every=5),
        seeds=(0, 1),
        benign="full_finetune",
        progress=False,
    )
    entry = rec["attacks"]["full_finetune"]
    dense = entry.get("refined_until", 0)  # refined when Δt = 5 could not decide
    steps = [p[0] for p in entry["curves"]["immunized"][0]]
    assert steps == sorted({*range(0, 11, 5), *range(dense + 1)})
    assert rec["groups"]["benign"] == ["benign:full_finetune"]
    assert rec["conditions"]["trainability"]["recipe"] == "benign:full_finetune"
    assert rec["attacks"]["benign:full_finetune"]["split"] == "primary"


def test_search_is_never_weaker_than_the_fixed_attacks_it_covers(task) -> None:
    # Every fixed resistance setting is a trial of the search with its exact budget (n_trials is
    # raised to cover them, even with fewer trials than settings and settings outside the search
    # space), so its best validation harm is at least that of each of them, measured here directly.
    pytest.importorskip("optuna")
    from immunekit.attacks import ATTACKS
    from immunekit.attacks.worst_case import SearchConfig
    from immunekit.metrics.task_scores import task_score

    search = SearchConfig(
        n_trials=2, steps=20, attacks=("linear_probe",), optimizers=("adam", "sgd"), batch_sizes=(32,),
        lr_min=1e-3, lr_max=1.0, n_startup_trials=2,
    )  # fmt: skip
    fixed = [
        "linear_probe[optimizer=sgd,lr=0.3]",
        "linear_probe",
        "linear_probe[optimizer=gd_exact,lr=null]",
        "linear_probe[optimizer=sgd_momentum,lr=0.1,momentum=0.5,warmup_steps=5]",
    ]
    model = squeezed()
    rec = evaluate(model, task, attacks=fixed, budget=BUDGET, seeds=(0,), search=search, progress=False)
    assert rec["search"]["grid_skipped"] == {} and len(rec["search"]["grid"]) == 4
    assert rec["search"]["n_trials_effective"] >= 4 and rec["search"]["n_trials_requested"] == 2
    values = []
    for spec in fixed:
        s = resolve_settings([spec], BUDGET)[0]
        attacked = ATTACKS.get(s.name)(**s.overrides)(model, task, s.budget, seed=0).model
        with torch.no_grad():
            harm = task_score(attacked(task.val_harmful.x), task.val_harmful.y, task.loss)
        values.append(harm)
        assert rec["search"]["best_value"] >= harm - 1e-12
    assert [g["value"] for g in rec["search"]["grid"]] == pytest.approx(values, abs=1e-12, rel=0)


def scaled_identity(c: float, dim: int = 6) -> ImmunizableModel:
    """θ = c·I: no defense at all, only a change of units."""
    m = linear_model(dim)
    with torch.no_grad():
        m.extractor.weight.mul_(c)
    return m


@pytest.mark.parametrize("c", [1e-3, 1e3, 1e6])
@pytest.mark.parametrize("attacks", [["linear_probe"], ["linear_probe", "closed_form_probe"]])
def test_a_rescaled_identity_is_never_immunized(task, tmp_path, c: float, attacks: list[str]) -> None:
    """Issue 9: a plain rescaling of θ_0 = I must not receive IMMUNIZED, whatever the attack grid."""
    rec = evaluate(
        scaled_identity(c), task, attacks=attacks, budget=BUDGET, seeds=SEEDS, progress=False, out=tmp_path
    )
    assert rec["verdict"]["verdict"] != "IMMUNIZED"
    assert rec["verdict"]["rules_version"] == 2 and rec["verdict"]["rules"][0][0] == "INVALID"
    stored = json.loads((tmp_path / "results.json").read_text())  # non-finite values are written as null
    assert stored["verdict"] == json.loads(json.dumps(rec["verdict"]))


def test_diverged_attacks_are_retried_with_a_smaller_learning_rate(task) -> None:
    rec = evaluate(
        scaled_identity(1e6), task, attacks=["linear_probe"], budget=BUDGET, seeds=(0, 1), progress=False
    )
    first = rec["attacks"]["linear_probe"]
    assert all(first["degenerate"]["immunized"])  # Adam at lr 0.05 on features 1e6× larger diverges
    retries = [k for k, e in rec["attacks"].items() if e.get("backoff_of") == "linear_probe"]
    assert retries == ["linear_probe[lr=0.005]", "linear_probe[lr=0.0005]"]
    assert rec["groups"]["resistance"] == ["linear_probe", *retries]
    lp = rec["per_attack"]["linear_probe"]
    assert lp["status"] == "INCONCLUSIVE" and lp["degenerate_seeds"] == 2 and lp["max_harm"] is None
    assert first["summary"]["final_harm"]["excluded"]["immunized"] == 2  # no average over diverged runs
    assert rec["conditions"]["resistance_strong"]["status"] == "INCONCLUSIVE"
    assert "Undecided for linear_probe" in rec["statement"]["text"]


def test_stability_against_a_reference_that_fails_its_task_is_inconclusive() -> None:
    # primary targets independent of the inputs: no linear head beats the mean on held-out rows
    noise = gaussian_spectra(dim=6, n=96, seed=0, evaluation_splits=True)
    gen = torch.Generator().manual_seed(0)
    for split in ("primary", "eval_primary"):
        data = getattr(noise, split)
        data.y.copy_(torch.randn(data.y.shape, generator=gen, dtype=data.y.dtype))
    rec = evaluate(
        linear_model(6), noise, attacks=["closed_form_probe"], budget=BUDGET, seeds=(0,), progress=False
    )
    stab = rec["conditions"]["stability"]
    assert stab["q_reference"] <= 0.0 and stab["trivial"] == 0.0
    assert stab["status"] == "INCONCLUSIVE" and "vacuous" in stab["detail"]


def test_grid_refinement_re_runs_the_same_trajectory(task) -> None:
    """The refined run is the coarse run seen at every step: evaluating changes no weight."""
    from immunekit.attacks import ATTACKS

    rec = evaluate(linear_model(6), task, attacks=["linear_probe"], budget=BUDGET, seeds=(0,), progress=False)
    entry = rec["attacks"]["linear_probe"]
    window = entry["refined_until"]
    assert window == entry["budget"]["eval_dense_until"] and entry["budget"]["eval_every"] == 5
    coarse = ATTACKS.get("linear_probe")()(linear_model(6), task, BUDGET, seed=0).harm_curve()
    fine = dict(map(tuple, entry["curves"]["immunized"][0]))
    assert set(fine) == {*range(window + 1), *(s for s, _ in coarse)}
    assert [(s, fine[s]) for s, _ in coarse] == coarse


def test_without_refinement_an_undecided_comparison_stays_undecided(task) -> None:
    """refine=False: no dense re-run, the same coarse curves, the comparison left open, and recorded."""
    on = evaluate(linear_model(6), task, attacks=["linear_probe"], budget=BUDGET, seeds=(0,), progress=False)
    assert on["attacks"]["linear_probe"]["refined_until"] > 0  # this setting needs a refinement
    off = evaluate(
        linear_model(6),
        task,
        attacks=["linear_probe"],
        budget=BUDGET,
        seeds=(0,),
        progress=False,
        refine=False,
    )
    entry = off["attacks"]["linear_probe"]
    assert "refined_until" not in entry and entry["budget"]["eval_dense_until"] == 0
    assert all(s % 5 == 0 or s == BUDGET.steps for s, _ in entry["curves"]["immunized"][0])
    assert off["per_attack"]["linear_probe"]["weak"] == "INCONCLUSIVE"
    assert off["conditions"]["resistance_weak"]["status"] == "INCONCLUSIVE"
    assert off["config"]["refine"] is False and "refine" not in on["config"]


def test_kappa_of_linear_models_is_the_experiments_measurement(task) -> None:
    """One rank rule: the card's κ ratios equal the linear experiment's kappa_pair, to 1e-12."""
    from immunekit.experiments.evaluate import kappa_rir
    from immunekit.experiments.linear import kappa_pair
    from immunekit.metrics.rir import rir

    model = squeezed()
    card = kappa_rir(model, default_reference(model), task)
    ref = kappa_pair(torch.eye(6, dtype=torch.float64), task.harmful.x, task.primary.x)
    imm = kappa_pair(model.theta, task.harmful.x, task.primary.x)
    expected = rir(ref, imm)
    assert card["kappa_ratio_harmful"] == pytest.approx(expected.kappa_ratio_harmful, rel=1e-12)
    assert card["kappa_ratio_primary"] == pytest.approx(expected.kappa_ratio_primary, rel=1e-12)
    assert card["rank_rule"]["decided_on"].startswith("the data X")
