"""The report card (reports.card) from a hand-made evaluation record: Markdown, HTML, plots, dispatch."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from immunekit.reports import card, write_report
from immunekit.reports.schema import ReportError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def band(values: list[float]) -> dict[str, Any]:
    return {
        "steps": [0, 10, 20],
        "mean": values,
        "ci_low": [v - 0.05 for v in values],
        "ci_high": [v + 0.05 for v in values],
    }


def entry(group: str, imm: list[float], ref: list[float]) -> dict[str, Any]:
    summ = {"mean": imm[-1], "ci_low": imm[-1] - 0.1, "ci_high": imm[-1] + 0.1, "n": 3}
    diff = {"mean": imm[-1] - ref[-1], "ci_low": -0.5, "ci_high": -0.1, "n": 3}
    return {
        "group": group,
        "name": "linear_probe",
        "eval_split": "eval_primary" if group == "benign" else "eval_harmful",
        "bands": {"immunized": band(imm), "reference": band(ref)},
        "summary": {
            "final_harm": {
                "immunized": summ,
                "reference": {"mean": ref[-1], "ci_low": ref[-1] - 0.1, "ci_high": ref[-1] + 0.1, "n": 3},
                "difference": diff,
            }
        },
    }


def make_record() -> dict[str, Any]:
    conds = {
        "resistance_strong": {"status": "FAIL", "value": 0.9, "threshold": 0.5, "detail": "max harm 0.9 > φ"},
        "resistance_weak": {"status": "PASS", "value": 2.5, "threshold": 2.0, "detail": "ratio 2.5"},
        "resistance": {"status": "PASS", "value": "weak", "threshold": "φ", "detail": "weak"},
        "stability": {"status": "PASS", "value": -0.01, "threshold": -0.02, "detail": "ok"},
        "generalization_in_domain": {"status": "PASS", "value": "weak", "threshold": "", "detail": "weak"},
        "generalization_cross_domain": {
            "status": "NOT-RUN",
            "value": None,
            "threshold": None,
            "detail": "none",
        },
        "trainability": {
            "status": "INCONCLUSIVE",
            "value": None,
            "threshold": 10,
            "detail": "x",
            "target": 0.8,
        },
    }
    return {
        "schema_version": 1,
        "kind": "evaluation",
        "run_id": "evaluate-toy-1",
        "created_at": "2026-01-01T00:00:00Z",
        "seeds": [0, 1, 2],
        "config_sha256": "ab" * 32,
        "provenance": {"immunekit": "0.1.0", "git_sha": "deadbeef", "git_dirty": True, "python": "3.12"},
        "task": {"name": "toy <task>", "version": "1", "loss": "mse"},
        "model": {"class": "LinearModel", "parameters": 42, "source": "m.safetensors"},
        "reference": {"class": "LinearModel", "parameters": 42, "source": "θ_0"},
        "thresholds": {"harm": 0.5, "slowdown": 2.0},
        "budget": {"steps": 20, "optimizer": "adam"},
        "attacks": {
            "linear_probe": entry("resistance", [-3.0, 0.3, 0.6], [0.0, 0.7, 0.9]),
            "closed_form_probe": entry("resistance", [0.0, 0.9, 0.9], [0.0, 0.9, 0.9]),
            "in_domain:linear_probe": entry("in_domain", [0.0, 0.2, 0.4], [0.0, 0.7, 0.9]),
            "benign:linear_probe": entry("benign", [0.0, 0.5, 0.9], [0.0, 0.8, 0.9]),
        },
        "per_attack": {
            "linear_probe": {"holds": True, "min_ratio": 2.0},
            "closed_form_probe": {"holds": False, "min_ratio": 1.0},
            "in_domain:linear_probe": {"holds": True, "min_ratio": None},
        },
        "search": {
            "chosen": {"attack": "linear_probe", "overrides": {}, "budget.lr": 0.3},
            "trials": [
                {"number": 0, "value": 0.2},
                {"number": 1, "value": 0.6},
                {"number": 2, "value": None},
            ],
            "cumulative_best": [0.2, 0.6, 0.6],
            "objective": "harm on val_harmful",
        },
        "conditions": conds,
        "gates": {"safe_at_release": {"status": "PASS", "detail": "ok"}},
        "verdict": {"verdict": "INCONCLUSIVE", "reasons": ["trainability is INCONCLUSIVE"]},
        "statement": {
            "text": "The immunity holds against linear_probe. It does not hold against closed_form_probe."
        },
        "kappa": {"rir": 12.5, "log_rir": 2.5257, "kappa_ratio_harmful": 10.0, "kappa_ratio_primary": 0.8},
    }


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.table: str | None = None
        self.rows: dict[str, list[list[str]]] = {}
        self._row: list[str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self.table = a.get("id") or ""
            self.rows[self.table] = []
        elif tag == "tr":
            self._row = []
        elif tag == "td":
            self._cell = ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row and self.table is not None:
            self.rows[self.table].append(self._row)
            self._row = None


def parse(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    return p


def test_html_embeds_every_plot_as_png_and_lists_every_condition(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rec = make_record()
    (tmp_path / "results.json").write_text(json.dumps(rec))
    md, page = card.write_card(tmp_path)
    doc = parse(page.read_text(encoding="utf-8"))
    expected = card.figure_ids(rec)
    assert expected == [
        "harm_linear_probe",
        "harm_closed_form_probe",
        "harm_in_domain_linear_probe",
        "benign_benign_linear_probe",
        "search_cumulative_best",
    ]
    found = {img["id"]: img["src"] for img in doc.imgs}
    assert sorted(found) == sorted(f"fig-{f}" for f in expected)
    for src in found.values():
        assert src is not None and src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    rows = doc.rows["conditions"]
    assert [r[0] for r in rows] == [label for _, label in card.CONDITION_ORDER]
    assert [r[1] for r in rows] == ["FAIL", "PASS", "PASS", "PASS", "NOT-RUN", "INCONCLUSIVE"]
    assert ["RIR = (i)/(ii)", "12.5"] in doc.rows["kappa"]
    assert ["learning rate", "0.3"] in doc.rows["search"] and ["optimizer", "adam"] in doc.rows["search"]
    assert not any(r[0] == "overrides" for r in doc.rows["search"])
    prov = dict((r[0], r[1]) for r in doc.rows["provenance"])
    assert prov["git"] == "deadbeef (uncommitted changes)" and prov["seeds"] == "0, 1, 2"
    assert prov["config sha256"] == "ab" * 32
    html_text = page.read_text(encoding="utf-8")
    assert "toy &lt;task&gt;" in html_text and "toy <task>" not in html_text  # escaped
    assert "does not hold against closed_form_probe" in html_text
    for f in expected:
        assert (tmp_path / f"card_{f}.png").read_bytes().startswith(PNG_MAGIC)
        assert f"](card_{f}.png)" in md.read_text(encoding="utf-8")


def test_markdown_has_verdict_table_and_statement() -> None:
    text = card.render_card_markdown(make_record(), {})
    assert "**Overall verdict: INCONCLUSIVE**" in text
    assert "| Generalization (cross-domain) | NOT-RUN |" in text
    assert "> The immunity holds against linear_probe." in text
    assert "Plots skipped" in text
    resistance = text.split("### Resistance")[1].split("###")[0]
    assert (
        "| linear_probe | holds | recorded as holding (older rules) | 0.6 [0.5, 0.7] | 0.9 [0.8, 1] "
        "| -0.3 [-0.5, -0.1] | 2 |" in resistance
    )


def test_without_matplotlib_the_report_says_plots_were_skipped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(card, "_matplotlib_available", lambda: False)
    (tmp_path / "results.json").write_text(json.dumps(make_record()))
    md, page = card.write_card(tmp_path)
    doc = parse(page.read_text(encoding="utf-8"))
    assert doc.imgs == [] and "Plots skipped" in page.read_text(encoding="utf-8")
    assert "Plots skipped" in md.read_text(encoding="utf-8") and not list(tmp_path.glob("*.png"))


def test_write_report_dispatches_evaluation_records(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(card, "_matplotlib_available", lambda: False)
    (tmp_path / "results.json").write_text(json.dumps(make_record()))
    assert write_report(tmp_path) == tmp_path / "report.md"
    assert (tmp_path / "report.html").is_file()


def test_invalid_records_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="not an evaluation record"):
        card.validate_evaluation({"kind": "run"})
    rec = make_record()
    del rec["conditions"]
    with pytest.raises(ReportError, match="'conditions' is missing"):
        card.validate_evaluation(rec, "x.json")
    with pytest.raises(ReportError, match="no such results file"):
        card.load_evaluation(tmp_path)


def headless_chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with ``args`` (a throw-away profile under ``tmp_path``); its stdout."""
    profile = tmp_path / "profile"
    try:
        out = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *args,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return out.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "results.json").write_text(json.dumps(make_record()))
    _, page = card.write_card(tmp_path)
    shot = tmp_path / "x.png"
    headless_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri())
    assert shot.stat().st_size > 1000 and shot.read_bytes().startswith(PNG_MAGIC)


def _current(rec: dict[str, Any]) -> dict[str, Any]:
    from immunekit.metrics import conditions

    rec = json.loads(json.dumps(rec))
    rec["rules_version"] = conditions.RULES_VERSION
    rec["verdict"]["rules"] = [list(r) for r in conditions.VERDICT_RULES]
    return rec


def test_cards_written_by_older_rules_say_so(tmp_path: Path, monkeypatch) -> None:
    """Issue 9: `immunekit report DIR` rebuilds an old card with a note that it predates the fix."""
    monkeypatch.setattr(card, "_matplotlib_available", lambda: False)
    (tmp_path / "results.json").write_text(json.dumps(make_record()))  # no rules_version: version 1
    md, page = card.write_card(tmp_path)
    assert "written by verdict rules version 1" in md.read_text(encoding="utf-8")
    assert 'id="stale-rules"' in page.read_text(encoding="utf-8")


def test_current_cards_write_the_verdict_rule_and_no_stale_note() -> None:
    rec = _current(make_record())
    text = card.render_card_markdown(rec, {})
    assert "How the verdict is decided" in text and "| INVALID | a gate fails" in text
    assert "verdict rules version" not in text
    page = card.render_card_html(rec, {})
    assert 'id="verdict-rules"' in page and "stale-rules" not in page
    assert '<span class="badge INVALID ">INVALID</span>' in page


def test_undecided_attacks_are_named_so() -> None:
    rec = _current(make_record())
    rec["per_attack"]["linear_probe"] = {"status": "INCONCLUSIVE", "holds": None, "min_ratio": None}
    text = card.render_card_markdown(rec, {})
    resistance = text.split("### Resistance")[1].split("###")[0]
    assert "| linear_probe | undecided | the evaluation grid is too coarse" in resistance
