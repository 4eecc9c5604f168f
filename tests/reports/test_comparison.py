"""Method comparison (summary.md / summary.html) from per-model evaluation records: JSON only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from immunekit.reports import ReportError, write_report
from immunekit.reports.comparison import (
    SEARCH_COLUMN,
    comparison_rows,
    find_evaluations,
    load_comparison,
    method_rows,
    model_identity,
    render_comparison_html,
    render_comparison_markdown,
    write_comparison,
)

CONFIG = {
    "attacks": [{"key": "linear_probe"}, {"key": "closed_form_probe"}],
    "budget": {"steps": 10, "optimizer": "adam", "lr": 0.01},
    "seeds": [0, 1, 2],
    "thresholds": {"harm": 0.5, "slowdown": 2.0},
    "search": None,
}


def status(s: str) -> dict[str, Any]:
    return {"status": s, "value": None, "threshold": None, "detail": ""}


def record(
    verdict: str, probe_holds: bool | None, *, method: str | None = None, kappa: float | None = None
) -> dict[str, Any]:
    """A minimal evaluation record: the Adam linear probe holds (or not), the closed-form probe breaks it."""
    per = {
        "linear_probe": {"holds": probe_holds, "strong": probe_holds, "min_ratio": 5.0, "max_harm": 0.31},
        "closed_form_probe": {"holds": False, "strong": False, "min_ratio": 1.0, "max_harm": 0.98},
        "in_domain:closed_form_probe": {"holds": False, "min_ratio": 1.0, "max_harm": 0.97},
    }
    rec: dict[str, Any] = {
        "schema_version": 1,
        "kind": "evaluation",
        "config": json.loads(json.dumps(CONFIG)),
        "task": {"name": "gaussian_spectra"},
        "seeds": [0, 1, 2],
        "budget": CONFIG["budget"],
        "thresholds": CONFIG["thresholds"],
        "verdict": {"verdict": verdict, "reasons": []},
        "conditions": {
            "resistance_strong": status("FAIL"),
            "resistance_weak": status("FAIL"),
            "stability": status("PASS"),
            "generalization_in_domain": status("FAIL"),
            "generalization_cross_domain": status("NOT-RUN"),
            "trainability": status("PASS"),
        },
        "groups": {"resistance": ["linear_probe", "closed_form_probe"], "in_domain": ["x"]},
        "attacks": {  # sorted keys, as results.json stores them
            "closed_form_probe": {"group": "resistance"},
            "in_domain:closed_form_probe": {"group": "in_domain"},
            "linear_probe": {"group": "resistance"},
        },
        "per_attack": per,
        "statement": {"text": f"statement of {method or 'unknown'}"},
        "kappa": None if kappa is None else {"kappa_ratio_harmful": kappa, "kappa_ratio_primary": 1.5},
    }
    if method is not None:
        rec["checkpoint"] = {"path": f"{method}.safetensors", "metadata": {"method": method, "seed": 7}}
    return rec


def write(root: Path, rel: str, rec: dict[str, Any]) -> Path:
    (root / rel).mkdir(parents=True, exist_ok=True)
    path = root / rel / "results.json"
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    root = tmp_path / "cmp"
    write(root, "0-1/cond--seed1", record("NOT IMMUNIZED", True, kappa=1.2e5))
    write(root, "0-1/cond--seed2", record("NOT IMMUNIZED", False))
    write(root, "zz", record("INCONCLUSIVE", None, method="opt_kappa"))
    (root / "other").mkdir()
    (root / "other" / "results.json").write_text('{"kind": "something else"}')  # skipped
    return root


def test_rows_one_per_model_with_conditions_attacks_and_kappa(out: Path) -> None:
    items = load_comparison(out)
    assert [rel for rel, _ in items] == ["0-1/cond--seed1", "0-1/cond--seed2", "zz"]
    rows = comparison_rows(items)
    assert [(r["method"], r["seed"], r["cell"]) for r in rows] == [
        ("cond", 1, "0-1"),
        ("cond", 2, "0-1"),
        ("opt_kappa", 7, ""),  # from the checkpoint metadata, not the folder name
    ]
    assert [r["verdict"] for r in rows] == ["NOT IMMUNIZED", "NOT IMMUNIZED", "INCONCLUSIVE"]
    assert rows[0]["conditions"]["stability"] == "PASS"
    assert rows[0]["conditions"]["generalization_cross_domain"] == "NOT-RUN"
    assert list(rows[0]["attacks"]) == ["linear_probe", "closed_form_probe"]  # grid order, not in_domain
    assert rows[0]["attacks"]["linear_probe"] == {
        "immunity": "holds",
        "strength": "strong",
        "min_ratio": 5.0,
        "max_harm": 0.31,
        "setting": None,
    }
    assert [r["attacks"]["linear_probe"]["immunity"] for r in rows] == [
        "holds",
        "does not hold",
        "not tested",
    ]
    assert {r["attacks"]["closed_form_probe"]["immunity"] for r in rows} == {"does not hold"}
    assert rows[0]["kappa_ratio_harmful"] == 1.2e5 and rows[1]["kappa_ratio_harmful"] is None
    assert rows[2]["statement"] == "statement of opt_kappa"


def test_method_rows_count_seeds_the_immunity_holds_for(out: Path) -> None:
    rows = comparison_rows(load_comparison(out))
    table = method_rows(rows, ["linear_probe", "closed_form_probe"])
    assert table[0] == ["0-1", "cond", "2", "NOT IMMUNIZED 2", "holds 1 of 2", "holds 0 of 2"]
    assert table[1][4] == "not tested"  # opt_kappa: the probe broke neither model


def test_markdown_and_html_show_each_attacker_column(out: Path) -> None:
    items = load_comparison(out)
    md = render_comparison_markdown(items)
    assert "| 0-1/cond--seed1 | 0-1 | cond | 1 | NOT IMMUNIZED | FAIL | FAIL | PASS |" in md
    assert "does not hold; min t* ratio 1, max harm 0.98" in md
    assert "holds (strong); min t* ratio 5, max harm 0.31" in md
    assert "- **zz** (INCONCLUSIVE): statement of opt_kappa" in md
    page = render_comparison_html(items)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert not re.search(r"""(src|href)=["']https?:""", page)  # self-contained
    assert '<span class="badge does-not-hold ">does not hold</span>' in page
    assert '<span class="badge INCONCLUSIVE ">INCONCLUSIVE</span>' in page
    assert 'href="0-1/cond--seed1/report.html"' in page


def test_model_identity_falls_back_to_the_folder_name() -> None:
    assert model_identity("opt_kappa--seed3", {}) == {"method": "opt_kappa", "seed": 3, "cell": ""}
    assert model_identity("plain", {}) == {"method": "plain", "seed": None, "cell": ""}


def test_write_report_rebuilds_the_summary_of_a_comparison_folder(out: Path) -> None:
    md = write_report(out)
    assert md == out / "summary.md" and (out / "summary.html").is_file()
    assert not (out / "report.md").exists()
    assert md.read_text() == render_comparison_markdown(load_comparison(out))


def test_mixed_configurations_are_refused(out: Path) -> None:
    rec = record("NOT IMMUNIZED", True)
    rec["config"]["budget"]["steps"] = 20
    write(out, "0-1/cond--seed3", rec)
    with pytest.raises(
        ReportError, match=r"cond--seed3 was evaluated with different budget .*refusing to mix"
    ):
        write_comparison(out)


def test_a_folder_without_evaluations_is_refused(tmp_path: Path) -> None:
    assert find_evaluations(tmp_path) == []
    with pytest.raises(ReportError, match="no evaluation records"):
        write_comparison(tmp_path)


def test_search_choices_share_one_column_with_the_chosen_setting() -> None:
    # each model's search picks its own settings: one column, the choice written in the cell
    def rec(chosen: str, holds: bool) -> dict:
        entry = {"holds": holds, "strong": False, "min_ratio": 2.0 if holds else 1.0, "max_harm": 0.7}
        return {
            "groups": {"resistance": ["linear_probe"], "search": [f"search:{chosen}"]},
            "per_attack": {"linear_probe": entry, f"search:{chosen}": entry},
            "verdict": {"verdict": "NOT IMMUNIZED"},
        }

    items = [
        ("a--seed1", rec("full_finetune[lr=0.03]", True)),
        ("b--seed1", rec("linear_probe[lr=0.1]", False)),
    ]
    rows = comparison_rows(items)
    assert list(rows[0]["attacks"]) == ["linear_probe", SEARCH_COLUMN]
    assert [r["attacks"][SEARCH_COLUMN]["setting"] for r in rows] == [
        "full_finetune[lr=0.03]",
        "linear_probe[lr=0.1]",
    ]
    assert [r["attacks"][SEARCH_COLUMN]["immunity"] for r in rows] == ["holds", "does not hold"]
