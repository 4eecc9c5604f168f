"""The deep vision renderer: report.md and probe_curves.png from a results.json alone."""

from __future__ import annotations

import ast
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

import immunekit.reports.deep_vision as rdv
from immunekit.reports import ReportError, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def summary(values: list[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else 0.0,
        "ci_low": min(present) if present else None,
        "ci_high": max(present) if present else None,
        "n": len(present),
        "values": values,
        "censored": len(values) - len(present),
    }


def method(i: float, ii: float, acc: float, probe: list[float], diverged: int = 0) -> dict[str, Any]:
    rir = i / ii
    return {
        "defense": "x",
        "overrides": {},
        "seeds": [1, 2],
        "metrics": {
            "kappa_ratio_harmful": summary([i, i * 1.1]),
            "kappa_ratio_primary": summary([ii, ii]),
            "rir_theta0": summary([rir, rir * 1.1]),
            "rir_band_low": summary([rir, rir]),
            "rir_band_high": summary([rir, rir]),
            "primary_test_accuracy": summary([acc, acc]),
            "kappa_ratio_harmful_full": summary([i, i]),
            "kappa_ratio_primary_full": summary([ii, ii]),
            "rir_full": summary([rir, rir]),
            "probe_harmful_accuracy_final": summary([probe[-1], probe[-1]]),
            "full_finetune_harmful_accuracy": summary([0.8, 0.82]),
            "partial_finetune_harmful_accuracy": summary([0.7, None]),
        },
        "threshold_sensitive_seeds": 0,
        "probe_curve": {
            "epoch": list(range(len(probe))),
            "harmful_test_accuracy": [summary([v, v + 0.01]) for v in probe],
            "lr": [0.01, 0.01],
            "loss_rose_seeds": diverged,
            "nonfinite_seeds": 0,
            "seeds_with_curve": 2,
            "attack": "head_reset_probe",
            "loss": "cross-entropy",
        },
        "probe_curve_own_lr": {},
    }


def results() -> dict[str, Any]:
    checks = {
        "method": "condition_number",
        "available": True,
        "i_above_one": {"passed": True, "value": 4.4, "threshold": 1.0},
        "ii_at_most_one": {"passed": True, "value": 0.56, "threshold": 1.0},
        "highest_rir_theta0": {
            "passed": True,
            "per_cut": {"centre": {"value": 7.9, "others": {"rill_only": 1.2}}},
        },
        "not_threshold_sensitive": {"passed": True, "flagged_seeds": 0, "band_spread_max": 1.0},
        "highest_rir_outside_band": {"passed": True},
        "primary_accuracy_kept": {
            "passed": True,
            "value": 0.9905,
            "reference": 0.9916,
            "drop": 0.0011,
            "max_drop": 0.01,
        },
        "probe_below_theta0_every_epoch": {
            "passed": False,
            "epochs_not_below": [2],
            "value": [0.1, 0.5, 0.8],
            "reference": [0.1, 0.6, 0.7],
        },
        "passed": False,
    }
    backbone = {
        "setting": {
            "primary": "mnist",
            "harmful": "fashion_mnist",
            "normalization": "mnist",
            "description": "small HF ResNet",
            "paper_architecture": "resnet18",
        },
        "theta0": {"source": "train_theta0('resnet')", "test_accuracy": 0.9916},
        "probe_lr": {
            "lr": 0.01,
            "source": "selected on θ_0",
            "rule": "largest stable",
            "grid": [{"lr": 0.01, "stable": True}],
        },
        "reference": "identity",
        "methods": {
            "identity": method(1.0, 1.0, 0.9916, [0.1, 0.6, 0.7]),
            "condition_number": method(4.4, 0.56, 0.9905, [0.1, 0.5, 0.8]),
            "rill_only": method(2.0, 1.8, 0.985, [0.1, 0.55, 0.72], diverged=1),
        },
        "checks": checks,
    }
    return {
        "schema_version": 1,
        "kind": "deep_vision",
        "experiment": "deep_vision",
        "run_id": "deep_vision-test",
        "created_at": "2026-12-07T00:00:00Z",
        "seeds": [1, 2],
        "config": {"rir": {"groups": 20, "per_group": 100}, "card": True, "methods": ["identity"]},
        "config_sha256": "abc",
        "provenance": {"immunekit": "0.1.0", "git_sha": "deadbeef", "device": "cpu"},
        "paper": {
            "source": "Zheng et al., table3_deep",
            "label": "ImageNet → Cars / Country211, ResNet18 / ViT-B/16: other data and scale",
            "columns": ["i", "ii", "rir_theta0", "primary_acc"],
            "init_accuracy": {"resnet18": 68.24, "vit": 81.78},
            "rows": {"cars": {"resnet18": {"condition_number": [2.386, 0.699, 3.467, 62.36]}}},
        },
        "backbones": {"resnet": backbone, "vit": copy.deepcopy(backbone)},
        "cards": {
            "resnet": {
                "method": "condition_number",
                "seed": 1,
                "report": "cards/resnet/report.md",
                "html": "cards/resnet/report.html",
                "verdict": "NOT IMMUNIZED",
                "per_attack": {"linear_probe": "PASS", "partial_finetune": "FAIL"},
            }
        },
    }


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_write_report_dispatches_on_kind_and_writes_markdown_and_png(tmp_path: Path) -> None:
    write(tmp_path, results())
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text(encoding="utf-8")
    assert "## resnet" in text and "## vit" in text
    assert "other data and scale" in text and "2.386" in text and "68.24" in text
    assert "(i) ↑" in text and text.index("(i) ↑") < text.index("(ii) ↓") < text.index("RIR_θ0 ↑")
    assert "mean over 20 groups × 100 training rows" in text
    assert "[report.md](cards/resnet/report.md)" in text and "NOT IMMUNIZED" in text
    assert "holds against ['linear_probe'], broken by ['partial_finetune']" in text
    assert "Report card: none" in text  # vit has no card
    assert "![Harmful test accuracy" in text and "(probe_curves.png)" in text
    png = tmp_path / rdv.PROBE_FIGURE
    assert png.read_bytes()[:8] == PNG


def test_table3_cells_show_mean_and_std_and_checks_name_failures(tmp_path: Path) -> None:
    text = rdv.render_deep_vision(results(), {})
    row = next(line for line in text.splitlines() if line.startswith("| Ours (condition number)"))
    assert "4.62 ± 0.311" in row  # (i): mean of 4.4 and 4.84, sample std
    assert "99.05 ± 0" in row  # D_P accuracy in %
    assert "70 (1 censored)" in row  # partial fine-tuning: one seed missing
    assert (
        "| harmful probe accuracy below θ_0's at every epoch (θ_0's lr) | **NO** | epochs not below: [2]"
        in text
    )
    assert "**not all hold**" in text
    assert (
        "| loss rose (unstable lr) | 0/2 | 0/2 | 1/2 |" in text
        and "| non-finite loss | 0/2 | 0/2 | 0/2 |" in text
    )
    assert "No figure was rendered" in text


def test_a_backbone_without_a_paper_counterpart_says_so(tmp_path: Path) -> None:
    data = results()
    data["backbones"]["resnet"]["setting"]["paper_architecture"] = None
    assert "no counterpart of this backbone" in rdv.render_deep_vision(data, {})


def test_missing_checks_are_reported_not_invented() -> None:
    data = results()
    data["backbones"]["resnet"]["checks"] = {
        "available": False,
        "reason": "method 'condition_number' is not in this run",
    }
    assert "Not evaluated: method 'condition_number' is not in this run" in rdv.render_deep_vision(data, {})


def test_broken_records_raise_a_report_error(tmp_path: Path) -> None:
    data = results()
    del data["backbones"]
    with pytest.raises(ReportError, match="missing key"):
        rdv.write_deep_vision_report(write(tmp_path, data))
    with pytest.raises(ReportError, match="not a deep vision record"):
        rdv.load_deep_vision(write(tmp_path, {"kind": "evaluation"}))


def test_the_renderer_imports_no_torch_and_no_other_immunekit_layer() -> None:
    tree = ast.parse(Path(rdv.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "torch" for n in names)
    assert all(n.startswith("immunekit.reports") for n in names if n.startswith("immunekit"))


def test_rows_follow_the_runs_method_order_not_the_sorted_json_keys() -> None:
    data = results()
    b = data["backbones"]["resnet"]
    b["methods"] = dict(sorted(b["methods"].items()))  # as json.dump(sort_keys=True) leaves them
    b["method_order"] = ["identity", "rill_only", "condition_number"]
    lines = [line for line in rdv.render_deep_vision(data, {}).splitlines() if line.startswith("| ")]
    first_table = lines[1:4]  # after the header row
    assert [row.split(" | ")[0] for row in first_table] == [
        "| Init θ_0 (identity)",
        "| R_ill only",
        "| Ours (condition number)",
    ]


def test_failed_seeds_are_counted_and_named() -> None:
    data = results()
    m = data["backbones"]["resnet"]["methods"]["rill_only"]
    m["failed_seeds"] = [
        {"seed": 2, "stage": "defense", "error": "NumericalError", "message": "non-finite loss"}
    ]
    text = rdv.render_deep_vision(data, {})
    row = next(line for line in text.splitlines() if line.startswith("| R_ill only"))
    assert row.endswith("| 1/2 |")
    assert "R_ill only, seed 2: the defense failed (NumericalError: non-finite loss)" in text
