"""evaluate() as sweep trials: keys and shas, executors that keep the numbers, resume, refusal to mix."""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from immunekit.attacks import AttackBudget
from immunekit.data.synthetic import gaussian_spectra
from immunekit.errors import ConfigError
from immunekit.experiments import evaluate_trials
from immunekit.experiments.evaluate import default_reference, evaluate, resolve_settings
from immunekit.experiments.evaluate_trials import Inputs, Shipped, decode, encode, state_sha256
from immunekit.experiments.sweep import SweepInterrupted
from immunekit.models import ImmunizableModel, linear_model

BUDGET = AttackBudget(steps=10, optimizer="adam", lr=0.05, eval_every=5)
ATTACKS = ["linear_probe", "closed_form_probe"]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def task():
    return gaussian_spectra(dim=6, n=96, seed=0, evaluation_splits=True)


def squeezed(dim: int = 6) -> ImmunizableModel:
    m = linear_model(dim)
    with torch.no_grad():
        m.extractor.weight.copy_(torch.diag(torch.logspace(0, -2, dim, dtype=torch.float64)))
    return m


def small(task: Any, model: ImmunizableModel | None = None, **kw: Any) -> dict[str, Any]:
    kw = {"attacks": ATTACKS, "budget": BUDGET, "seeds": SEEDS, "progress": False, **kw}
    return evaluate(squeezed() if model is None else model, task, **kw)


def numbers(record: dict[str, Any]) -> str:
    """The record without timestamps, wall times, provenance and trial bookkeeping, as canonical JSON.

    Text, not objects: NaN (a diverged run's harm) compares equal to itself only as text.
    """
    out = {
        k: v for k, v in record.items() if k not in ("created_at", "run_id", "timing", "provenance", "trials")
    }
    out["metrics"] = {k: v for k, v in out["metrics"].items() if not k.endswith("_seconds")}
    out["attacks"] = {
        key: {f: v for f, v in e.items() if f not in ("seconds", "trials")}
        for key, e in out["attacks"].items()
    }
    return json.dumps(out, sort_keys=True, indent=0)


def trial_files(out: Path) -> list[Path]:
    return sorted((out / "trials").rglob("*.json"))


def test_a_pool_of_workers_gives_the_same_record_as_one_process(task, tmp_path: Path) -> None:
    dense = AttackBudget(steps=10, optimizer="adam", lr=0.05, eval_every=1)  # no refinement: one pool start
    serial = small(task, budget=dense)  # in this process, no file
    pooled = small(task, budget=dense, workers=2, out=tmp_path)  # a spawn pool, records under out/trials
    assert pooled["verdict"] == serial["verdict"] and pooled["verdict"]["verdict"] == "NOT IMMUNIZED"
    assert numbers(pooled) == numbers(serial)  # every curve, summary, condition and κ, bit for bit
    refined = sum("refined_until" in e for e in serial["attacks"].values())
    # 5 settings (2 grid, 2 in-domain, the benign recipe) and any refined re-runs, × 2 seeds × 2 models,
    # and the measurements
    count = (5 + refined) * len(SEEDS) * 2 + 1
    assert serial["trials"] == {
        "folder": None,
        "count": count,
        "reused": 0,
        "executor": "local",
        "workers": 1,
    }
    assert pooled["trials"] == {
        "folder": "trials",
        "count": count,
        "reused": 0,
        "executor": "local",
        "workers": 2,
    }
    assert len(trial_files(tmp_path)) == count


def test_an_interrupted_evaluation_recomputes_only_the_missing_trials(
    task, tmp_path: Path, monkeypatch
) -> None:
    real, calls = evaluate_trials.run_trial, []

    def counting(payload: Any, stop_at: int | None = 6) -> dict[str, Any]:
        calls.append(payload)
        if len(calls) == stop_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the sweep
        return real(payload)

    monkeypatch.setattr(evaluate_trials, "run_trial", counting)
    with pytest.raises(SweepInterrupted) as stopped:
        small(task, out=tmp_path)
    assert stopped.value.kept == 5 == len(trial_files(tmp_path)) and not (tmp_path / "results.json").exists()
    calls.clear()
    monkeypatch.setattr(evaluate_trials, "run_trial", lambda p: counting(p, None))
    resumed = small(task, out=tmp_path)
    assert resumed["trials"]["reused"] == 5 and len(calls) == resumed["trials"]["count"] - 5
    assert numbers(resumed) == numbers(small(task))  # as if never interrupted


def test_a_stored_trial_record_is_reused_not_recomputed(task, tmp_path: Path, monkeypatch) -> None:
    first = small(task, out=tmp_path)
    folder = first["attacks"]["linear_probe"]["trials"]
    path = tmp_path / folder / "immunized--seed1.json"
    stored = json.loads(path.read_text())
    assert stored["kind"] == "evaluation_trial" and stored["role"] == "immunized" and stored["seed"] == 1
    stored["harm_curve"][-1][1] = 0.123456789  # a number no attack run produced
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(evaluate_trials, "run_trial", lambda p: pytest.fail("no trial may run again"))
    again = small(task, out=tmp_path)
    assert again["trials"]["reused"] == again["trials"]["count"] == first["trials"]["count"]
    assert again["attacks"]["linear_probe"]["curves"]["immunized"][1][-1][1] == 0.123456789
    assert again["attacks"]["linear_probe"]["summary"]["final_harm"]["values"]["immunized"][1] == 0.123456789


def test_trials_of_another_model_are_refused_and_added_seeds_reuse_the_others(task, tmp_path: Path) -> None:
    first = small(task, out=tmp_path)
    before = sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*.json"))
    with pytest.raises(ConfigError, match="written by a different configuration; refusing to mix"):
        small(task, model=linear_model(6), attacks=["closed_form_probe[record_accuracy=false]"], out=tmp_path)
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.rglob("*.json")) == before  # refused before any run
    more = small(task, out=tmp_path, seeds=(0, 1, 2))
    assert 0 < more["trials"]["reused"] < more["trials"]["count"]
    assert more["trials"]["reused"] >= first["trials"]["count"] - 4  # all but refined re-runs, if any


def test_trial_keys_name_what_runs_and_shas_what_it_runs_on(task) -> None:
    model = squeezed()
    inputs = Inputs.of({"immunized": model, "reference": default_reference(model)}, task, "cpu")
    gd = resolve_settings(["linear_probe[optimizer=gd_exact,lr=null]"], BUDGET)[0]
    t = inputs.attack_trial(gd, "immunized", 1)
    assert re.fullmatch(
        r"trials/linear_probe\[optimizer=gd_exact,lr=null\]-[0-9a-f]{8}/immunized--seed1", t.key
    )
    in_domain = inputs.attack_trial(gd.with_split("attack_disjoint", "in_domain"), "reference", 0)
    assert in_domain.key.startswith("trials/in_domain/linear_probe[") and in_domain.key.endswith(
        "/reference--seed0"
    )
    dense = gd.with_budget(AttackBudget(**{**gd.to_dict()["budget"], "eval_dense_until": 5}))
    assert "--dense5-" in inputs.attack_trial(dense, "immunized", 1).key
    assert (
        len({inputs.attack_trial(gd, r, s).config_sha for r in ("immunized", "reference") for s in (0, 1)})
        == 4
    )
    same = Inputs.of({"immunized": copy.deepcopy(model), "reference": default_reference(model)}, task, "cpu")
    again = same.attack_trial(gd, "immunized", 1)
    assert (again.key, again.config_sha) == (t.key, t.config_sha)  # content, not identity, decides
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.extractor.weight[0, 0] += 1e-12
    other = Inputs.of({"immunized": nudged, "reference": default_reference(model)}, task, "cpu")
    assert other.attack_trial(gd, "immunized", 1).key == t.key
    assert other.attack_trial(gd, "immunized", 1).config_sha != t.config_sha
    assert (
        other.attack_trial(gd, "reference", 1).config_sha
        == inputs.attack_trial(gd, "reference", 1).config_sha
    )
    task2 = gaussian_spectra(dim=6, n=96, seed=1, evaluation_splits=True)
    moved = Inputs.of({"immunized": model, "reference": default_reference(model)}, task2, "cpu")
    assert moved.attack_trial(gd, "immunized", 1).config_sha != t.config_sha


def test_shipped_objects_are_pickled_once_and_arrive_intact() -> None:
    model = squeezed()
    shipped = Shipped(model, state_sha256(model), "the immunized model")
    assert shipped.get() is model and shipped.pack() is shipped.pack()  # made once per evaluation
    arrived = pickle.loads(pickle.dumps(shipped))
    received = arrived.get()
    assert received is not model and state_sha256(received) == shipped.sha256
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), received.state_dict().values(), strict=True)
    )
    assert pickle.loads(pickle.dumps(shipped)).get() is received  # unpickled once per process
    stored = json.loads(json.dumps(encode({"h": [(0, 0.5), (5, math.nan)], "x": [math.inf, -math.inf]})))
    back = decode(stored)
    assert back["h"][0] == [0, 0.5] and math.isnan(back["h"][1][1]) and back["x"] == [math.inf, -math.inf]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
        ({"executor": "rey"}, "did you mean 'ray'"),
        ({"workers": 2, "hook": True}, "cannot send the immunized model .* to worker processes"),
    ],
)
def test_bad_executor_options_are_refused_before_any_run(task, tmp_path: Path, kw: dict, match: str) -> None:
    model = squeezed()
    if kw.pop("hook", False):
        model.hook = lambda x: x  # a lambda cannot be pickled for a pool worker
    with pytest.raises(ConfigError, match=match):
        small(task, model=model, out=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_a_trial_record_holds_non_finite_harm_exactly(task, tmp_path: Path) -> None:
    blown = ["linear_probe[optimizer=sgd,lr=1.0e+200]"]  # overflows: harm and loss become NaN
    rec = small(task, model=linear_model(6), attacks=blown, seeds=(0,), out=tmp_path)
    assert math.isnan(
        rec["attacks"]["linear_probe[optimizer=sgd,lr=1e+200]"]["curves"]["immunized"][0][-1][1]
    )
    stored = "".join(p.read_text() for p in trial_files(tmp_path))
    assert '"__float__": "nan"' in stored and "NaN" not in stored  # valid JSON, read back as NaN
    assert numbers(rec) == numbers(small(task, model=linear_model(6), attacks=blown, seeds=(0,)))
    assert json.loads((tmp_path / "results.json").read_text())["verdict"] == json.loads(
        json.dumps(rec["verdict"])
    )


def test_exponent_numbers_in_a_spec_are_numbers() -> None:
    """YAML 1.1 reads ``5e-5`` (no dot) as text; a spec's lr written that way is still a number."""
    s = resolve_settings(["linear_probe[lr=5e-3,init=normal]"], BUDGET)[0]
    assert s.budget.lr == 5e-3 and isinstance(s.budget.lr, float)
    assert s.overrides["init"] == "normal" and s.key == "linear_probe[init=normal,lr=0.005]"
