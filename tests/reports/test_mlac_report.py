"""The MLAC text renderer: report.md and harmful_vs_n.png from a results.json alone."""

from __future__ import annotations

import ast
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

import immunekit.reports.mlac as rm
from immunekit.reports import ReportError, write_report

PNG = b"\x89PNG\r\n\x1a\n"
ROLES = ["random", "pretrained", "desired_tuned", "ac", "mlac"]
NS = [20, 50, 100, 200]
SEEDS = [0, 1, 2]
#: harmful test accuracy per role at n = 20 (rises by 2 points per step of n)
BASE = {"random": 0.40, "pretrained": 0.70, "desired_tuned": 0.66, "ac": 0.55, "mlac": 0.45}


def summary(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else (0.0 if present else None),
        "ci_low": min(present) if len(present) >= 3 else None,
        "ci_high": max(present) if len(present) >= 3 else None,
        "n": len(present),
        "values": values,
    }


def cell(role: str, k: int) -> dict[str, Any]:
    acc = BASE[role] + 0.02 * k
    test = [acc - 0.01, acc, acc + 0.01]
    rand = [BASE["random"] + 0.02 * k + d for d in (-0.01, 0.0, 0.01)]
    pre = BASE["pretrained"] - BASE["random"]
    gap = None if role == "random" else summary([a - b for a, b in zip(test, rand, strict=True)])
    return {
        "test_accuracy": summary(test),
        "val_accuracy": summary([acc + 0.03] * 3),
        "test_accuracy_search_rerun": summary(test),
        "oracle_test": summary([None, None, None]),
        "desired_after_attack": summary(
            [0.9, 0.91, 0.92] if role in ("desired_tuned", "ac", "mlac") else [None] * 3
        ),
        "chosen": [
            {
                "seed": s,
                "attack": "full_finetune" if s else "head_reset_probe",
                "lr": 3e-4,
                "steps": 200,
                "batch_size": 24,
                "optimizer": "adam",
                "trial": 4,
                "key": "k",
            }
            for s in SEEDS
        ],
        "attack_choice": {"full": 2, "probe": 1},
        "gap": gap,
        "recovery": None
        if gap is None
        else {"value": gap["mean"] / pre, "denominator": pre, "unstable": role == "ac"},
    }


def results() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "kind": "mlac_text",
        "experiment": "mlac_text",
        "run_id": "mlac_text-test",
        "created_at": "2026-01-01T00:00:00Z",
        "roles": ROLES,
        "n_values": NS,
        "seeds": SEEDS,
        "config": {"encoder": "minilm", "profile": "quick", "defense": {"first_order": True}},
        "config_sha256": "abc",
        "resolved": {"inner_steps": 4, "outer_steps": 2000},
        "provenance": {"immunekit": "0.1.0", "torch": "2.13", "device": "cpu"},
        "data": {
            "name": "discrim_gender",
            "version": "discrim-gender-1",
            "sizes": {"defender_train": 6510, "attack_train": 840},
            "classes_desired": 70,
            "classes_harmful": 3,
        },
        "protocol": {
            "attack_pool": "seeded n-row subset of attack_train",
            "search_objective": "accuracy on attack_val",
            "reported": "mean accuracy on attack_test over the re-runs of the chosen settings",
            "search_space": {
                "attacks": ["probe", "full"],
                "lr": [1e-5, 1e-2],
                "steps": [100, 500],
                "batch_sizes": [12, 24, 48],
                "n_trials": 15,
                "reruns": 5,
            },
            "notes": ["recovery r(n) is a ratio of means over seeds"],
        },
        "baselines": {
            "chance": 1 / 3,
            "majority": 0.3452,
            "majority_from_pool": {str(n): summary([0.33, 0.34, 0.33]) for n in NS},
        },
        "cost": {r: {str(n): cell(r, k) for k, n in enumerate(NS)} for r in ROLES},
        "desired": {
            r: {
                "own_head": summary(
                    [0.9, 0.92, 0.91] if r in ("desired_tuned", "ac", "mlac") else [0.01] * 3
                ),
                "own_head_trained": r in ("desired_tuned", "ac", "mlac"),
                "probe": summary([0.5, 0.6, 0.55] if r == "random" else [0.93, 0.95, 0.94]),
            }
            for r in ROLES
        },
        "training": {
            "random": {"trained": False},
            "pretrained": {"trained": False},
            "mlac": {
                "trained": True,
                "defense": "mlac",
                "preset": "mlac",
                "order": "first",
                "inner_steps": 4,
                "outer_steps": 2000,
                "loss_weights": {"lambda_good": 1.0, "lambda_lin": 1.0},
                "per_seed": [
                    {"seed": s, "best_step": 1500, "outer_steps_per_s": 0.03, "seconds_train": 62000}
                    for s in SEEDS
                ],
            },
        },
        "trial_seconds_total": 123.0,
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    return path


def test_write_report_dispatches_on_kind_and_writes_markdown_and_png(tmp_path: Path) -> None:
    write(tmp_path, results())
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text(encoding="utf-8")
    for name in ("Random", "Pretrained", "Desired-tuned", "AC", "MLAC"):
        assert f"| {name} |" in text
    assert "![Harmful accuracy against n](harmful_vs_n.png)" in text
    assert (tmp_path / rm.FIGURE).read_bytes()[:8] == PNG


def test_the_headline_table_shows_mean_and_interval_per_n_with_baselines() -> None:
    text = rm.render_mlac(results(), {})
    row = next(line for line in text.splitlines() if line.startswith("| MLAC | 45.0"))
    assert row == "| MLAC | 45.0 [44.0, 46.0] | 47.0 [46.0, 48.0] | 49.0 [48.0, 50.0] | 51.0 [50.0, 52.0] |"
    assert "| chance | 33.3 | 33.3 | 33.3 | 33.3 |" in text
    assert "| majority class of attack_test | 34.5 |" in text
    assert "No figure was rendered" in text


def test_gap_recovery_and_choices_are_shown_per_role_and_n() -> None:
    text = rm.render_mlac(results(), {})
    mlac20 = next(line for line in text.splitlines() if line.startswith("| MLAC | 20 |"))
    assert "+5.0 [+5.0, +5.0]" in mlac20  # Δ: 45 − 40 points on every seed
    assert "| 0.17 |" in mlac20  # r = 5 / 30
    assert "full ×2, probe ×1" in mlac20
    assert "0.50 (unstable)" in next(line for line in text.splitlines() if line.startswith("| AC | 20 |"))
    assert "0 (reference)" in next(line for line in text.splitlines() if line.startswith("| Random | 20 |"))
    assert "s0: probe, lr 3.00e-04, 200 steps, batch 24" in text


def test_desired_accuracy_marks_untrained_heads() -> None:
    text = rm.render_mlac(results(), {})
    rand = next(line for line in text.splitlines() if line.startswith("| Random | (untrained head)"))
    assert "55.0 [50.0, 60.0]" in rand
    mlac = next(line for line in text.splitlines() if line.startswith("| MLAC | 91.0"))
    assert mlac.count("91.0 [90.0, 92.0]") == 5  # own head, then after the attack at each n


def test_missing_values_render_as_dashes_and_two_seeds_as_std() -> None:
    data = results()
    data["cost"]["ac"]["50"]["test_accuracy"] = summary([None, None, None])
    data["cost"]["mlac"]["20"]["test_accuracy"] = summary([0.4, 0.5])
    text = rm.render_mlac(data, {})
    assert next(line for line in text.splitlines() if line.startswith("| AC | 55.0")).split(" | ")[2] == "—"
    assert "| MLAC | 45.0 ± 7.1 |" in text


def test_the_figure_needs_at_least_one_curve(tmp_path: Path) -> None:
    data = results()
    for role in ROLES:
        for n in NS:
            data["cost"][role][str(n)]["test_accuracy"] = summary([None] * 3)
    assert rm.harmful_figure(data) is None
    assert rm.plot_harmful_vs_n(data, tmp_path / "x.png") is None
    assert rm.harmful_figure(results()) is not None


def test_roles_follow_the_runs_order_not_the_sorted_json_keys() -> None:
    data = json.loads(json.dumps(results(), sort_keys=True))
    data["roles"] = ["mlac", "random"]
    lines = [line for line in rm.render_mlac(data, {}).splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:3]] == ["| MLAC", "| Random"]


def test_broken_records_raise_a_report_error(tmp_path: Path) -> None:
    data = results()
    del data["cost"]
    with pytest.raises(ReportError, match="missing key"):
        rm.write_mlac_report(write(tmp_path, data))
    with pytest.raises(ReportError, match="not an MLAC text record"):
        rm.load_mlac_text(write(tmp_path, {"kind": "evaluation"}))


def test_the_renderer_imports_no_torch_and_no_other_immunekit_layer() -> None:
    tree = ast.parse(Path(rm.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "torch" for n in names)
    assert all(n.startswith("immunekit.reports") for n in names if n.startswith("immunekit"))
