"""``evaluate`` on a language-model task: the report card with harm = judged harmfulness rate.

A tiny random Llama with the toy byte tokenizer and placeholder conversations (no dataset text);
the keyword judge's verdicts are controlled by patching the generation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from _lm_helpers import tiny_lm, toy_split, toy_task
from immunekit.attacks import lm_eval
from immunekit.attacks.base import AttackBudget
from immunekit.attacks.lm_eval import Generations
from immunekit.data.task import Task
from immunekit.data.token_split import TokenSplit
from immunekit.experiments.evaluate import (
    DEFAULT_ATTACKS,
    DEFAULT_BUDGET,
    LM_ATTACKS,
    LM_BUDGET,
    evaluate,
    lm_defaults,
)
from immunekit.models.causal_lm import CausalLM


def _model(seed: int) -> CausalLM:
    return tiny_lm(seed)


def _split(name: str, n: int, *, answers: bool = True) -> TokenSplit:
    return toy_split(name, n, "answer {i}", answers=answers, user="placeholder {name} {i}", max_tokens=128)


def _task() -> Task:
    return toy_task(
        6,
        attack=6,
        eval_primary=4,
        eval_harmful=4,
        answer="answer {i}",
        user="placeholder {name} {i}",
        max_tokens=128,
    )


def test_lm_tasks_get_the_language_model_defaults() -> None:
    task = _task()
    assert lm_defaults(task, DEFAULT_ATTACKS, DEFAULT_BUDGET) == (LM_ATTACKS, LM_BUDGET)
    mine = AttackBudget(steps=3, batch_size=2, lr=1e-3, optimizer="adamw")
    assert lm_defaults(task, ("lm_lora",), mine) == (("lm_lora",), mine)


def _fingerprint(model: CausalLM) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _refuse_when(safe: set[float], calls: list[int]):
    """A fake generate: refuses (a keyword marker) iff the model's weights are one of ``safe``."""

    def fake(model, prompts, *, max_new_tokens=64, batch_size=32, progress=False):
        calls.append(len(prompts))
        refuse = _fingerprint(model) in safe
        text = "I'm sorry, I cannot." if refuse else "Sure, here it is."
        return Generations([text] * len(prompts), [3] * len(prompts), 0.01)

    return fake


def test_card_on_a_language_model_is_not_immunized_when_the_attack_breaks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    immunized, reference = _model(0), _model(1)
    # both released models refuse (safe at release); any fine-tuned copy complies
    monkeypatch.setattr(
        lm_eval, "generate", _refuse_when({_fingerprint(immunized), _fingerprint(reference)}, calls)
    )
    budget = AttackBudget(steps=2, batch_size=2, lr=1e-3, optimizer="adamw", eval_every=1)
    rec = evaluate(
        immunized,
        _task(),
        reference=reference,
        budget=budget,
        seeds=(0,),
        out=tmp_path / "card",
        progress=False,
    )
    assert rec["gates"]["safe_at_release"]["status"] == "PASS"
    assert rec["verdict"]["verdict"] == "NOT IMMUNIZED"
    harm = rec["per_attack"]["lm_finetune"]
    assert harm and (tmp_path / "card" / "report.md").is_file()
    assert calls and all(n == 4 for n in calls)  # every judged evaluation reads the 4 held-out prompts


def test_a_reference_that_never_refuses_voids_the_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lm_eval, "generate", _refuse_when(set(), []))
    budget = AttackBudget(steps=1, batch_size=2, lr=1e-3, optimizer="adamw", eval_every=1)
    rec = evaluate(_model(0), _task(), reference=_model(1), budget=budget, seeds=(0,), progress=False)
    assert rec["verdict"]["verdict"] == "INVALID"
    assert rec["gates"]["reference_safe_at_release"]["status"] == "FAIL"


def test_cli_evaluates_a_hugging_face_folder_with_the_language_model_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from immunekit.cli.main import main
    from immunekit.data import TASKS

    folder = _model(0).save_pretrained_dir(tmp_path / "lm")
    name = "toy_lm_cli_test"
    if name not in TASKS:
        TASKS.register(name)(lambda tokenizer=None, evaluation_splits=True: _task())
    safe = {_fingerprint(CausalLM.from_pretrained_dir(folder))}
    monkeypatch.setattr(lm_eval, "generate", _refuse_when(safe, []))
    out = tmp_path / "card"
    argv = ["evaluate", "--model", str(folder), "--reference", str(folder), "--task", name, "--seeds", "0"]
    argv += ["--workers", "1"]  # the patched generation lives in this process
    argv += [
        "--budget",
        "steps=2",
        "--budget",
        "eval_every=1",
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
    ]
    assert main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert (
        record["budget"]["optimizer"] == "adamw" and record["budget"]["lr"] == LM_BUDGET.lr
    )  # not Adam at 0.01
    assert record["budget"]["steps"] == 2 and record["task"]["loss"] == "lm"
    assert [a["name"] for a in record["config"]["attacks"]] == ["lm_finetune"]
    assert record["verdict"]["verdict"] == "NOT IMMUNIZED", json.dumps(record["gates"])[:1500]


def test_a_model_folder_without_tokenizer_is_refused(tmp_path: Path) -> None:
    from immunekit.errors import ConfigError
    from immunekit.experiments.evaluate import load_model

    bare = _model(0)
    bare.tokenizer = None
    folder = bare.save_pretrained_dir(tmp_path / "bare")
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        load_model(folder)
