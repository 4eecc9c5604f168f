"""The Python API a newcomer meets: one default budget, immunize(), evaluate(out=...) writing the card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import immunekit as ik
from immunekit.attacks import ATTACKS, AttackBudget
from immunekit.cli.evaluate import _shared_inputs
from immunekit.cli.main import build_parser
from immunekit.data.synthetic import gaussian_spectra
from immunekit.defenses import DEFENSES
from immunekit.errors import ConfigError
from immunekit.experiments.evaluate import DEFAULT_BUDGET


def test_the_api_and_the_cli_share_one_default_budget() -> None:
    args = build_parser().parse_args(["evaluate", "--model", "m.safetensors"])
    assert _shared_inputs(args)["budget"] == AttackBudget() == DEFAULT_BUDGET
    assert (AttackBudget().optimizer, AttackBudget().lr, AttackBudget().eval_every) == ("adam", 0.01, 10)


@pytest.mark.parametrize("attack", ["full_finetune", "linear_probe", "lora", "closed_form_probe"])
def test_the_default_budget_runs_every_attack(attack: str) -> None:
    """AttackBudget() must not lead into an error (gd_exact with full_finetune did)."""
    if attack == "lora":
        pytest.importorskip("peft")
    task = gaussian_spectra(dim=4, n=64, seed=0)
    budget = dataclasses.replace(AttackBudget(), steps=20)
    res = ATTACKS.get(attack)()(ik.linear_model(4), task, budget, seed=0)
    if attack == "closed_form_probe":
        assert [r.step for r in res.records] == [1]
    else:  # 20 steps, held out every 10 (eval_every of the default budget)
        assert len(res.records) == 20 and [r.step for r in res.records if r.eval] == [10, 20]


def test_immunize_is_the_registered_defense() -> None:
    task = gaussian_spectra(dim=5, n=64, cond_primary=20.0, cond_harmful=10.0, seed=1)
    model = ik.linear_model(5)
    ours = ik.immunize(model, task, "condition_number", steps=5, seed=2)
    direct = DEFENSES.get("condition_number")(steps=5).fit(model, task, seed=2)
    assert torch.equal(ours.theta, direct.theta)
    assert not torch.equal(ours.theta, model.theta)  # immunized, and the input left alone
    assert torch.equal(model.theta, torch.eye(5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        ik.immunize(model, task, "condition_number", stepz=5)
    with pytest.raises(ConfigError, match="condition_numbr"):
        ik.immunize(model, task, "condition_numbr")


def _small_eval(model: ik.ImmunizableModel, task: ik.Task, out: Path | None, **kw: object) -> dict:
    budget = AttackBudget(steps=20, eval_every=5)
    return ik.evaluate(
        model, task, attacks="linear_probe", budget=budget, seeds=(0, 1, 2), progress=False, out=out, **kw
    )


def test_evaluate_out_writes_results_and_the_card(tmp_path: Path) -> None:
    task = gaussian_spectra(dim=4, n=64, seed=0, evaluation_splits=True)
    record = _small_eval(ik.linear_model(4), task, tmp_path / "card", checkpoint={"path": "x"})
    for name in ("results.json", "report.md", "report.html"):
        assert (tmp_path / "card" / name).stat().st_size > 0
    assert record["checkpoint"] == {"path": "x"}
    assert record["verdict"]["verdict"] in (tmp_path / "card" / "report.md").read_text()
    assert record["provenance"]["device"] == "cpu" and record["provenance"]["dtype"] == "float64"
    _small_eval(ik.linear_model(4), task, tmp_path / "plain", report=False)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["results.json", "trials"]


def test_evaluate_refuses_an_unwritable_out_before_any_attack(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    calls = []
    monkeypatch.setattr("immunekit.experiments.evaluate_trials.run_trial", lambda *a, **k: calls.append(a))
    task = gaussian_spectra(dim=4, n=64, seed=0)
    with pytest.raises(ConfigError, match=r"file\.txt.*is a file, not a folder"):
        _small_eval(ik.linear_model(4), task, blocker / "out")
    assert calls == [] and blocker.read_text() == "not a folder"
