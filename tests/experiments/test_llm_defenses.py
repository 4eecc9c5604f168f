"""``immunekit run llm-defenses`` on a tiny random model and placeholder conversations.

The aligned θ0 is a tiny random Llama with the toy byte tokenizer and the task is built from
placeholders, so the whole pipeline (fits, saved models, one report card per defense and seed,
the safety-mix mitigation, the table) runs offline in seconds. No dataset text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from _lm_helpers import tiny_lm, toy_split, toy_task
from immunekit.data.task import Task
from immunekit.data.text_assets import PromptSet
from immunekit.data.token_split import TokenSplit
from immunekit.errors import ConfigError
from immunekit.experiments import llm_alignment, llm_defenses
from immunekit.experiments.llm_defenses import build_config, card_summary, defense_row
from immunekit.experiments.registry import RunContext, get_experiment


def _split(name: str, n: int, *, answers: bool = True) -> TokenSplit:
    return toy_split(name, n, "placeholder reply {i}", answers=answers)


def build_toy_task(cfg: Any, tokenizer: Any) -> Task:
    return toy_task(6, eval_primary=3, eval_harmful=3, val_harmful=3, answer="placeholder reply {i}")


@dataclass(frozen=True)
class FakeSplits:
    heldout: PromptSet

    def benign_heldout(self, n: int) -> PromptSet:
        return self.heldout.subset(list(range(n)), "benign_heldout")


@pytest.fixture
def tiny_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    model = tiny_lm(0)
    folder = model.save_pretrained_dir(tmp_path / "aligned")
    report = {"key": "tinykey", "gate": {"passed": True}}
    heldout = PromptSet(
        name="benign",
        prompts=tuple(f"placeholder benign request {i}" for i in range(100)),
        answers=None,
        categories=None,
        ids=tuple(f"benign:{i}" for i in range(100)),
        source="synthetic",
    )
    monkeypatch.setattr(llm_defenses, "align", lambda cfg: (model, report))
    monkeypatch.setattr(llm_defenses, "aligned_dir", lambda cfg: folder)
    monkeypatch.setattr(llm_defenses, "build_task", build_toy_task)
    monkeypatch.setattr(llm_defenses, "qi_splits", lambda seed=0: FakeSplits(heldout))
    monkeypatch.setattr(
        llm_alignment,
        "benign_answers",
        lambda base, prompts, acfg: [f"placeholder answer {i}" for i in range(len(prompts))],
    )
    return tmp_path


SMALL: dict[str, Any] = {
    "defenses": ["gradient_ascent", "lm_condition_number"],
    "defense_config": {
        "gradient_ascent": {"max_steps": 2, "lr": 1e-3},
        "lm_condition_number": {"max_steps": 2, "lr": 1e-3, "probe_rows": 2},
    },
    "attacks": ["lm_lora[lr=0.01]", "lm_lora[lr=0.01,rows=2]", "lm_head_probe[lr=0.01]"],
    "steps": 2,
    "batch_size": 2,
    "eval_every": 1,
    "benign": "lm_finetune[lr=0.01]",
    "safety_mix": [2],
    "benign_prompts": 3,
    "max_new_tokens": 2,
    "precision": "fp32",
    "micro_batch": 2,
}


def test_run_end_to_end_writes_cards_resumes_and_stores_no_text(tiny_world: Path) -> None:
    exp = get_experiment("llm-defenses")
    cfg = build_config(SMALL)
    ctx = RunContext(out=tiny_world / "out", progress=False, workers=1)
    results = exp.run(cfg, ctx)
    assert set(results["defenses"]) == {"gradient_ascent", "lm_condition_number"}
    for name, row in results["defenses"].items():
        assert (tiny_world / "out" / "models" / f"{name}--seed0" / "config.json").is_file()
        card = tiny_world / "out" / "cards" / name / "seed0"
        assert (card / "results.json").is_file() and (card / "report.md").is_file()
        record = json.loads((card / "results.json").read_text())
        assert record["reference"]["source"].endswith("aligned")
        summary = card_summary(record)
        # the worst case ignores the 10-shot setting (rows=2) and is the largest final harm
        full = {k: a for k, a in summary["attacks"].items() if a["rows"] is None}
        assert len(full) == 2 and len(summary["attacks"]) == 3
        assert summary["worst"]["immunized"]["final_harm"] == max(
            a["final"]["immunized"] for a in full.values()
        )
        assert row["worst_harm"]["mean"] == summary["worst"]["immunized"]["final_harm"]
        assert row["gap"]["mean"] == pytest.approx(
            summary["worst"]["reference"]["final_harm"] - summary["worst"]["immunized"]["final_harm"]
        )
        assert row["gap"]["ci95"] is None  # one seed: no interval, said so
        assert set(row["conditions"]) >= {"resistance_strong", "stability", "trainability"}
        assert 0.0 <= row["benign_refusal"]["mean"] <= 1.0 and row["perplexity"]["mean"] > 1.0
    # θ0 is attacked once per (setting, seed) and every card reuses those runs (same keys and shas)
    refs = sorted((tiny_world / "out" / "trials" / "reference").glob("*.json"))
    assert len(refs) == 3 + 1  # the grid and the benign recipe
    for name in results["defenses"]:
        card_rec = json.loads((tiny_world / "out" / "trials" / "card" / f"{name}--seed0.json").read_text())
        assert card_rec["reference_runs_shared"] == 4
        for ref in refs:
            stored = json.loads(ref.read_text())
            copy = json.loads(
                (tiny_world / "out" / "cards" / name / "seed0" / f"{stored['key']}.json").read_text()
            )
            assert copy["harm_curve"] == stored["record"]["harm_curve"]
    assert results["mitigation"]["2"]["train_rows"] == 4 + 2
    assert results["answer"]["text"]
    assert results["calibration"]["rows"]["RepNoise"][0] == 0.05
    text = "".join(p.read_text() for p in (tiny_world / "out" / "trials").rglob("*.json"))
    text += (tiny_world / "out" / "results.json").read_text()
    assert "placeholder" not in text  # scores and ids only
    files = sorted((tiny_world / "out" / "trials").rglob("*.json"))
    stamp = {f: f.stat().st_mtime_ns for f in files}
    again = exp.run(cfg, ctx)  # resumes: nothing refitted or re-attacked
    assert {f: f.stat().st_mtime_ns for f in files} == stamp
    assert again["defenses"]["gradient_ascent"]["gap"] == results["defenses"]["gradient_ascent"]["gap"]
    assert "gradient_ascent" in exp.summary(again)
    from immunekit.reports import write_report

    report = write_report(tiny_world / "out")
    md = report.read_text()
    assert "| gradient_ascent |" in md and "Calibration" in md and "safety-data mixing" in md
    assert "](cards/gradient_ascent/seed0/report.md)" in md  # links relative to the report
    assert (tiny_world / "out" / "harm_curves.png").stat().st_size > 1000
    assert "placeholder" not in md


def _card(
    seed: int, worst_i: float, worst_r: float, stab: str = "PASS", train: str = "PASS"
) -> dict[str, Any]:
    conditions = {k: "PASS" for k in llm_defenses.CONDITION_KEYS} | {"stability": stab, "trainability": train}
    return {
        "seed": seed,
        "card": f"c{seed}",
        "seconds": 1.0,
        "summary": {
            "verdict": "X",
            "conditions": conditions,
            "worst": {
                "immunized": {"attack": "a", "final_harm": worst_i},
                "reference": {"attack": "a", "final_harm": worst_r},
            },
            "perplexity": {"immunized": 2.0, "reference": 2.0},
        },
        "benign": {"immunized": {"refusal_rate": 0.0}, "reference": {"refusal_rate": 0.0}},
    }


def test_the_target_needs_the_gap_and_both_conditions() -> None:
    fits = [{"seconds": 1.0}] * 3
    ok = [_card(s, h, 0.95) for s, h in enumerate((0.4, 0.5, 0.3))]
    row = defense_row(ok, fits, 0.30)
    assert row["meets_target"] and row["gap"]["mean"] == pytest.approx(0.55)
    lo, hi = row["gap"]["ci95"]
    assert 0.45 - 1e-12 <= lo < 0.55 < hi <= 0.65 + 1e-12  # a bootstrap of the three seed gaps
    assert not defense_row([_card(s, 0.7, 0.95) for s in range(3)], fits, 0.30)[
        "meets_target"
    ]  # gap 25 points
    broken = [_card(0, 0.0, 0.95, stab="FAIL"), *ok[1:]]  # a model that resists by breaking
    assert not defense_row(broken, fits, 0.30)["meets_target"]
    slow = [*ok[:2], _card(2, 0.0, 0.95, train="INCONCLUSIVE")]
    assert not defense_row(slow, fits, 0.30)["meets_target"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"defenses": ["adversarial_los"]}, "did you mean"),
        ({"defenses": []}, "defenses must not be empty"),
        ({"defenses": ["gradient_ascent"], "defense_config": {"adversarial_loss": {}}}, "not in defenses"),
        ({"defense_config": {"gradient_ascent": {"alpha": 1.0}}}, "alpha"),
        ({"defense_config": {"adversarial_loss": {"alpha": 0.0}}}, "alpha must be > 0"),
        ({"attacks": ["linear_probe"]}, "does not attack a causal LM"),
        ({"attacks": ["lm_lora[rows=0]"]}, "rows"),
        ({"target_gap": 0.0}, "target_gap"),
        ({"eval_prompts": 400}, "eval_prompts"),
        ({"thresholds": {"phi": 0.5}}, "phi"),
    ],
)
def test_bad_settings_are_refused_by_name(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_a_safety_mix_larger_than_the_pool_is_refused_before_training(tiny_world: Path) -> None:
    exp = get_experiment("llm-defenses")
    cfg = build_config({**SMALL, "safety_mix": [7]})  # the toy harmful split has 6 questions
    with pytest.raises(ConfigError, match="safety_mix"):
        exp.run(cfg, RunContext(out=tiny_world / "out", progress=False, workers=1))
    assert not (tiny_world / "out" / "models").exists()


def test_overlapping_category_groups_are_refused() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        build_config({"category_groups": [["illegal", "harmful"], ["harmful"]]})


def test_the_command_line_flags_reach_the_config() -> None:
    from immunekit.cli.main import build_parser
    from immunekit.cli.run import resolve

    argv = ["run", "llm-defenses", "--attacks", "lm_lora[lr=1e-4,rows=10],lm_finetune"]
    argv += ["--defenses", "gradient_ascent,lm_condition_number", "--seeds", "0,1,2"]
    cfg = build_config(resolve(build_parser().parse_args(argv)))
    assert cfg.attacks == ("lm_lora[lr=1e-4,rows=10]", "lm_finetune")  # brackets kept together
    assert cfg.defenses == ("gradient_ascent", "lm_condition_number") and cfg.seeds == (0, 1, 2)
    assert cfg.specs()[0] == (
        "lm_lora",
        {"precision": "bf16", "max_new_tokens": 32, "micro_batch": 10, "rows": 10},
        {"lr": 1e-4},
    )


def test_the_attacker_search_runs_in_each_card_and_its_cumulative_best_is_reported(tiny_world: Path) -> None:
    from immunekit.reports import write_report

    exp = get_experiment("llm-defenses")
    small = {**SMALL, "defenses": ["gradient_ascent"], "search_trials": 4, "safety_mix": []}
    small["defense_config"] = {"gradient_ascent": SMALL["defense_config"]["gradient_ascent"]}
    cfg = build_config(small)
    results = exp.run(cfg, RunContext(out=tiny_world / "out", progress=False, workers=1))
    search = results["defenses"]["gradient_ascent"]["search"]["0"]
    best = search["cumulative_best"]
    assert len(best) == 4  # the 3 grid settings first, then TPE
    finite = [b for b in best if b is not None and b > float("-inf")]
    assert finite == sorted(finite) and search["best_value"] == finite[-1]
    write_report(tiny_world / "out")
    assert (tiny_world / "out" / "search_cumulative_best.png").is_file()


def test_the_search_scores_a_language_model_as_the_lm_attacks_do() -> None:
    from immunekit.attacks.lm_eval import answer_perplexity, judge_split
    from immunekit.attacks.worst_case import LM_SCORE_TOKENS, score
    from immunekit.metrics.judges import make_judge

    model = tiny_lm(1)
    prompts, answered = _split("vh", 3, answers=False), _split("ep", 3)
    judged = judge_split(model, prompts, make_judge("keyword"), max_new_tokens=LM_SCORE_TOKENS)
    assert score(model, prompts, "lm") == judged.summary.harmfulness_rate
    assert score(model, answered, "lm") == pytest.approx(1.0 / answer_perplexity(model, answered), rel=1e-12)


@pytest.mark.parametrize("name", ["llm-defenses", "llm-finetuning-attacks", "mlac-text"])
def test_the_cpu_only_experiments_refuse_another_device(name: str) -> None:
    exp = get_experiment(name)
    assert exp.resolve_device("auto") == "cpu" and exp.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="runs on the CPU in this version; use --device cpu"):
        exp.resolve_device("cuda:0")


def test_plot_labels_leave_out_the_run_wide_overrides() -> None:
    from immunekit.reports.llm_defenses import short_key

    key = "lm_lora[precision=bf16,max_new_tokens=32,micro_batch=10,rows=10,lr=0.0003,steps=5]"
    assert short_key(key) == "lm_lora[rows=10,lr=0.0003,steps=5]"
    assert short_key("lm_finetune[precision=bf16]") == "lm_finetune" and short_key("lm_lora") == "lm_lora"
