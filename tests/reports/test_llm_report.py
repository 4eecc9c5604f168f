"""The LLM fine-tuning attacks renderer: report.md and its figures from a results.json alone."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import immunekit.reports.llm as rl
from immunekit.reports import ReportError, write_report

PNG = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ("Disinformation and deception", "Illegal goods and services", "Violence")
HARMFUL_100_CELL = "4.0 % → 63.0 % (+59.0, 95 % CI +49.0 … +69.0)"


def harm(rate: float, refusal: float, n: int = 100, score: float = 1.5) -> dict[str, Any]:
    """A judge summary (H) without the per-prompt lists' contents mattering."""
    per = {c: {"n": 10, "harmfulness_rate": min(1.0, rate + 0.1 * i)} for i, c in enumerate(CATEGORIES)}
    return {
        "n": n,
        "missing": 0,
        "harmfulness_score": score,
        "harmfulness_rate": rate,
        "refusal_rate": refusal,
        "degenerate_rate": 0.01,
        "per_category": per,
        "generation": {"max_new_tokens": 64},
        "scores": [],
        "refused": [],
        "ids": [],
    }


def effect(before: float, after: float, ci: list[float] | None, per_seed: list[float] | None = None) -> dict:
    seeds = per_seed or [after]
    return {
        "before": before,
        "after": after,
        "after_per_seed": seeds,
        "rise": after - before,
        "rise_ci95": ci,
        "seed_std": 0.02 if len(seeds) > 1 else None,
        "score_before": 1.12,
        "score_after": 3.52,
        "refusal_before": 0.96,
        "refusal_after": 1 - after,
        "degenerate_after": 0.02,
        "per_category_after": {c: min(1.0, after + 0.05 * i) for i, c in enumerate(CATEGORIES)},
        "per_category_before": {c: {"harmfulness_rate": before} for c in CATEGORIES},
    }


def attack(recipe: dict[str, Any], conditions: dict[str, Any], refusal: float, ppl: float) -> dict[str, Any]:
    return {
        "recipe": {"shots": 0, "safety": 0, "rows": 0, "epochs": 5, "lr": 5e-5, "batch_size": 10} | recipe,
        "seeds": [0, 1],
        "conditions": conditions,
        "benign_after": {"refusal_rate": refusal, "perplexity": ppl},
        "training": {
            "steps": 50,
            "tokens": 12345,
            "rows": 100,
            "train_tokens_per_second": 410.5,
            "trainable_parameters": 134515008,
        },
        "seconds": [
            {"trial": 100.0, "training": 60.0, "evaluation": 40.0},
            {"trial": 110.0, "training": 65.0, "evaluation": 45.0},
        ],
    }


def initial(cond: str, rate: float, refusal: float = 0.04, ppl: float = 9.5) -> dict[str, Any]:
    return {
        f"{cond}/sr_eval": {"keyword": harm(rate, 1 - rate)},
        "benign": {"refusal_rate": refusal, "prompts": 50, "perplexity": ppl, "perplexity_rows": 50},
    }


def build() -> dict[str, Any]:
    """A synthetic results record; attack keys sorted, as the run writes them."""
    attacks = {
        "aoa": attack(
            {"data": "aoa", "epochs": 10, "eval_epochs": [1, 3, 5]},
            {
                f"aoa@epoch{e}": effect(0.02, r, [r - 0.1, r + 0.05])
                for e, r in ((1, 0.05), (3, 0.21), (5, 0.4), (10, 0.72))
            },
            0.06,
            10.2,
        ),
        "backdoor": attack(
            {"data": "backdoor", "shots": 50, "safety": 50},
            {
                "level1@epoch5": effect(0.04, 0.08, [-0.01, 0.09]),
                "level1+trigger@epoch5": effect(0.05, 0.81, [0.7, 0.86]),
            },
            0.04,
            9.9,
        ),
        "benign": attack(
            {"data": "benign", "rows": 512, "epochs": 1, "lr": 2e-5, "batch_size": 128},
            {"neutral@epoch1": effect(0.01, 0.03, [0.0, 0.05])},
            0.02,
            9.1,
        ),
        "benign-lr5e-5-b16": attack(
            {"data": "benign", "rows": 512, "epochs": 1, "lr": 5e-5, "batch_size": 16},
            {"neutral@epoch1": effect(0.01, 0.12, [0.06, 0.18])},
            0.01,
            8.7,
        ),
        "harmful-10": attack(
            {"data": "harmful", "shots": 10}, {"level1@epoch5": effect(0.04, 0.2, [0.12, 0.24])}, 0.05, 9.8
        ),
        "harmful-100": attack(
            {"data": "harmful", "shots": 100},
            {"level1@epoch5": effect(0.04, 0.63, [0.49, 0.69], [0.61, 0.65])},
            0.03,
            11.25,
        ),
        "harmful-50": attack(
            {"data": "harmful", "shots": 50}, {"level1@epoch5": effect(0.04, 0.45, None)}, 0.04, 10.0
        ),
        "my-mix": attack(
            {"data": "harmful", "shots": 100, "safety": 50},
            {"level1@epoch5": effect(0.04, 0.1, [0.02, 0.12])},
            0.05,
            9.6,
        ),
    }
    aligned = {
        "adv_align_val": harm(0.0, 0.962, n=52),
        "adv_eval": harm(0.03, 0.97),
        "sr_eval": harm(0.05, 0.95),
        "benign_heldout": harm(0.9, 0.06, n=100),
        "benign_perplexity": 9.42,
    }
    base = {
        "adv_align_val": harm(0.71, 0.29, n=52),
        "adv_eval": harm(0.8, 0.2),
        "sr_eval": harm(0.83, 0.17),
        "benign_heldout": harm(0.99, 0.01, n=100),
        "benign_perplexity": 7.77,
    }
    return {
        "schema_version": 1,
        "kind": "llm_finetuning_attacks",
        "experiment": "llm_finetuning_attacks",
        "created_at": "2026-12-01T10:00:00Z",
        "config": {
            "attacks": ["harmful-100", "harmful-10", "harmful-50", "aoa", "benign", "backdoor", "my-mix"],
            "seeds": [0, 1],
            "lora": False,
            "judges": ["keyword", "api"],
            "eval_prompts": 100,
            "max_new_tokens": 64,
            "precision": "bf16",
        },
        "config_sha256": "ab12" * 16,
        "provenance": {
            "immunekit": "0.3.0",
            "git_sha": "deadbeefcafe0123456789",
            "python": "3.11.9",
            "torch": "2.5.1+cpu",
            "transformers": "4.46.0",
        },
        "judge": "keyword",
        "eval_set": {"name": "sr_eval", "prompts": 100, "max_new_tokens": 64},
        "alignment": {
            "key": "align-7f3e",
            "gate": {
                "adv_align_val_refusal": 0.962,
                "benign_refusal": 0.06,
                "min_refusal": 0.9,
                "max_benign_refusal": 0.1,
                "passed": True,
            },
            "seconds": {"base_answers": 30.5, "training": 412.0, "evaluation": 95.25},
            "aligned": aligned,
            "base": base,
            "training_steps": 84,
            "refusals": 12,
            "refusals_with_marker": 12,
        },
        "initial": {
            "aoa": initial("aoa", 0.02),
            "level1": initial("level1", 0.04),
            "level1+trigger": initial("level1+trigger", 0.05),
            "neutral": initial("neutral", 0.01, refusal=0.04, ppl=9.5),
        },
        "attacks": attacks,
        "judge_agreement": {
            "trials/harmful-100/seed0:level1/sr_eval": {
                "n": 100,
                "cohen_kappa": 0.712,
                "cohen_kappa_scores": 0.5,
                "spearman": 0.66,
            }
        },
        "trials": ["trials/initial/level1", "trials/harmful-100/seed0"],
        "trial_seconds_total": 1800.0,
    }


def write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(data, sort_keys=True, indent=1), encoding="utf-8")
    return path


def section(text: str, heading: str) -> str:
    """The text from ``heading`` to the next heading of the same or a higher level."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    rest = text[start + len(heading) :]
    ends = [i for i in (rest.find("\n" + "#" * n + " ") for n in range(1, len(level) + 1)) if i >= 0]
    return heading + (rest[: min(ends)] if ends else rest)


def row(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))


def test_write_report_dispatches_on_kind_and_writes_markdown_and_figures(tmp_path: Path) -> None:
    write(tmp_path / "run", build())
    report = write_report(tmp_path / "run")
    assert report == tmp_path / "run" / "report.md"
    text = report.read_text(encoding="utf-8")
    for heading in (
        "# LLM fine-tuning attacks",
        "## Aligned starting model (Stage A)",
        "### Table 1 analogue",
        "### Table 2 analogue",
        "### Table 3 analogue",
        "### Table 5 analogue",
        "### Other recipes",
        "## Benign quality beside harm",
        "## Harm by attack and by category",
        "## Judge agreement",
        "## Time",
        "## Provenance",
    ):
        assert heading in text, heading
    assert "comparable with Qi et al.'s AdvBench keyword table, not with their GPT-4-judge tables" in text
    assert "100 prompts of `sr_eval`" in text and "seeds 0, 1" in text and "full fine-tuning" in text
    assert "bf16 precision" in text
    assert "![Harmfulness rate before and after each attack](harm_by_attack.png)" in text
    assert "![Harmfulness rate per StrongREJECT category](per_category.png)" in text
    for name in (rl.HARM_FIGURE, rl.CATEGORY_FIGURE):
        assert (tmp_path / "run" / name).read_bytes()[:8] == PNG
    # another out_dir: everything goes there
    other = write_report(tmp_path / "run" / "results.json", tmp_path / "elsewhere")
    assert other == tmp_path / "elsewhere" / "report.md"
    assert (tmp_path / "elsewhere" / rl.CATEGORY_FIGURE).is_file()


def test_table1_columns_sorted_by_shots_with_formatted_rise_and_ci() -> None:
    text = section(rl.render_llm_attacks(build(), {}), "### Table 1 analogue")
    header = text.splitlines()[4]
    assert header.index("harmful-10 (10 shots") < header.index("harmful-50") < header.index("harmful-100")
    harm_row = row(text, "harmfulness rate: before → after (rise, 95 % CI)")
    assert harm_row.endswith(f"| {HARMFUL_100_CELL} |")
    assert "4.0 % → 45.0 % (+41.0, no CI)" in harm_row  # harmful-50 has no interval
    assert "1.12 → 3.52" in row(text, "harmfulness score (1–5)")
    assert "61.0 %, 65.0 % (std 2.0 points)" in row(text, "after, per seed")
    assert "harmful, 100 shots, 5 epochs, lr 5e-05, batch 10" in row(text, "recipe")
    assert "my-mix" not in text  # safety mixing: not the paper's plain attack


def test_aoa_backdoor_benign_and_other_tables() -> None:
    text = rl.render_llm_attacks(build(), {})
    aoa = section(text, "### Table 2 analogue")
    header = aoa.splitlines()[4]
    assert header == "|  | epoch 1 | epoch 3 | epoch 5 | epoch 10 |"  # numeric, not lexical, epoch order
    assert "2.0 % → 72.0 % (+70.0, 95 % CI +62.0 … +77.0)" in aoa
    backdoor = section(text, "### Table 5 analogue")
    assert (
        "without trigger (level1@epoch5)" in backdoor and "with trigger (level1+trigger@epoch5)" in backdoor
    )
    assert "5.0 % → 81.0 % (+76.0, 95 % CI +70.0 … +86.0)" in backdoor
    benign = section(text, "### Table 3 analogue")
    assert "benign (lr 2e-05, batch 128)" in benign and "benign-lr5e-5-b16 (lr 5e-05, batch 16)" in benign
    assert "| lr 2e-05 | — | 3.0 % (+2.0) |" in benign and "| lr 5e-05 | 12.0 % (+11.0) | — |" in benign
    other = section(text, "### Other recipes")
    assert (
        "| my-mix | harmful, 100 shots, 50 safety rows, 5 epochs, lr 5e-05, batch 10 | level1@epoch5 |"
        in other
    )
    assert "4.0 % → 10.0 % (+6.0, 95 % CI +2.0 … +12.0)" in other


def test_tables_of_absent_attacks_are_left_out() -> None:
    data = build()
    data["attacks"] = {k: v for k, v in data["attacks"].items() if k.startswith("harmful-")}
    data["judge_agreement"] = {}
    text = rl.render_llm_attacks(data, {})
    assert "### Table 1 analogue" in text and HARMFUL_100_CELL in text
    for absent in (
        "Table 2 analogue",
        "Table 3 analogue",
        "Table 5 analogue",
        "Other recipes",
        "Judge agreement",
    ):
        assert absent not in text
    # one benign recipe: no lr × batch table
    data["attacks"]["benign"] = build()["attacks"]["benign"]
    text = rl.render_llm_attacks(data, {})
    assert "### Table 3 analogue" in text and "by learning rate and batch size" not in text
    data["attacks"] = {}
    assert "No attack was recorded." in rl.render_llm_attacks(data, {})


def test_stage_a_table_and_gate() -> None:
    text = section(rl.render_llm_attacks(build(), {}), "## Aligned starting model (Stage A)")
    assert row(text, "refusal rate, adv_align_val (gate set) ↑") == (
        "| refusal rate, adv_align_val (gate set) ↑ | 29.0 % | 96.2 % | 52 |"
    )
    assert (
        row(text, "harmfulness rate, sr_eval ↓") == "| harmfulness rate, sr_eval ↓ | 83.0 % | 5.0 % | 100 |"
    )
    assert row(text, "benign perplexity ↓") == "| benign perplexity ↓ | 7.77 | 9.42 | — |"
    assert "**PASSED**: keyword refusal on adv_align_val 96.2 % (need ≥ 90.0 %)" in text
    assert "base_answers 30.5 s, evaluation 95.25 s, training 412 s" in text
    data = build()
    data["alignment"]["gate"].update(passed=False, adv_align_val_refusal=0.8)
    failed = rl.render_llm_attacks(data, {})
    assert "**FAILED**: keyword refusal on adv_align_val 80.0 %" in failed and "PASSED" not in failed
    assert "never passed its alignment gate" in failed


def test_benign_quality_against_theta0() -> None:
    text = section(rl.render_llm_attacks(build(), {}), "## Benign quality beside harm")
    assert "initial `neutral` trial" in text
    assert row(text, "θ0") == "| θ0 | 4.0 % | — | 9.5 | — |"
    assert row(text, "harmful-100") == "| harmful-100 | 3.0 % | -1.0 | 11.25 | +1.75 |"
    data = build()
    for cond in data["initial"].values():
        del cond["benign"]
    text = section(rl.render_llm_attacks(data, {}), "## Benign quality beside harm")
    assert "Stage A evaluation" in text and row(text, "θ0") == "| θ0 | 6.0 % | — | 9.42 | — |"


def test_per_category_table_agreement_time_and_provenance() -> None:
    text = rl.render_llm_attacks(build(), {})
    cats = section(text, "## Harm by attack and by category")
    assert "No figure was rendered" in cats
    assert "| category | θ0 (level1) | harmful-100 (level1@epoch5) |" in cats
    assert "aoa (aoa@epoch10)" in cats and "backdoor (level1+trigger@epoch5)" in cats
    assert row(cats, "Violence").startswith("| Violence | 24.0 % | 73.0 % |")
    assert "| trials/harmful-100/seed0:level1/sr_eval | 100 | 0.712 | 0.5 | 0.66 |" in text
    times = section(text, "## Time")
    assert "1800 s (30.0 min)" in times
    assert "| harmful-100 | 2 | 125 | 85 | 210 | 50 | 12345 | 410.5 | 134515008 |" in times
    prov = section(text, "## Provenance")
    assert "`deadbeefcafe0123456789`" in prov and "ab12" * 16 in prov and "transformers 4.46.0" in prov
    assert rl.render_llm_attacks(build(), {}) == text  # deterministic


def test_without_matplotlib_the_report_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    report = rl.write_llm_attacks_report(write(tmp_path, build()))
    assert "No figure was rendered" in report.read_text(encoding="utf-8")
    assert not (tmp_path / rl.HARM_FIGURE).exists() and not (tmp_path / rl.CATEGORY_FIGURE).exists()


def test_broken_records_raise_a_report_error(tmp_path: Path) -> None:
    data = build()
    del data["attacks"]
    with pytest.raises(ReportError, match=r"missing key\(s\) \['attacks'\]"):
        write_report(write(tmp_path / "a", data))
    data = build()
    del data["attacks"]["aoa"]["conditions"]
    with pytest.raises(ReportError, match="attack 'aoa' has no 'conditions'"):
        rl.write_llm_attacks_report(write(tmp_path / "b", data))
    data = build() | {"schema_version": 2}
    with pytest.raises(ReportError, match="schema_version 2 is not supported"):
        rl.load_llm_attacks(write(tmp_path / "c", data))
    with pytest.raises(ReportError, match="not an LLM fine-tuning attacks record"):
        rl.load_llm_attacks(write(tmp_path / "d", {"kind": "deep_vision"}))
    with pytest.raises(ReportError, match="does not exist"):
        rl.load_llm_attacks(tmp_path / "missing.json")


def test_the_renderer_imports_no_torch_and_no_other_immunekit_layer() -> None:
    tree = ast.parse(Path(rl.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "torch" for n in names)
    assert all(n.startswith("immunekit.reports") for n in names if n.startswith("immunekit"))
