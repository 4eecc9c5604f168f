from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from immunekit.reports import SCHEMA_VERSION, ReportError, load_results, validate_results

from .conftest import dump


def test_load_from_file_and_dir(results_dir: Path, results: dict[str, Any]) -> None:
    assert load_results(results_dir / "results.json") == results
    assert load_results(results_dir) == results
    assert load_results(str(results_dir)) == results


def test_report_error_is_value_error() -> None:
    assert issubclass(ReportError, ValueError)
    assert SCHEMA_VERSION == 1


def test_wrong_schema_version_names_file_key_and_fix(tmp_path: Path, results: dict[str, Any]) -> None:
    results["schema_version"] = 2
    path = dump(results, tmp_path)
    with pytest.raises(ReportError) as info:
        load_results(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "schema_version" in msg and "2" in msg and "1" in msg
    assert "immunekit run" in msg


def test_missing_schema_version(tmp_path: Path, results: dict[str, Any]) -> None:
    del results["schema_version"]
    with pytest.raises(ReportError, match=r"schema_version.*immunekit run"):
        load_results(dump(results, tmp_path))


def test_missing_methods_raises(tmp_path: Path, results: dict[str, Any]) -> None:
    del results["methods"]
    path = dump(results, tmp_path)
    with pytest.raises(ReportError, match="'methods'") as info:
        load_results(path)
    assert str(path) in str(info.value) and "immunekit run" in str(info.value)


def test_methods_not_a_mapping(tmp_path: Path, results: dict[str, Any]) -> None:
    results["methods"] = ["condition_number"]
    with pytest.raises(ReportError, match="'methods' is a list"):
        load_results(dump(results, tmp_path))


def test_method_without_metrics(tmp_path: Path, results: dict[str, Any]) -> None:
    del results["methods"]["identity"]["metrics"]
    with pytest.raises(ReportError, match=r"methods\.identity\.metrics"):
        load_results(dump(results, tmp_path))


def test_metric_entry_not_a_mapping(results: dict[str, Any]) -> None:
    results["methods"]["identity"]["metrics"]["rir"] = 1.0
    with pytest.raises(ReportError, match=r"methods\.identity\.metrics\.rir"):
        validate_results(results, source="x.json")


def test_attacks_wrong_type(results: dict[str, Any]) -> None:
    results["attacks"] = {"gd_exact": {}}
    with pytest.raises(ReportError, match="'attacks'"):
        validate_results(results)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="immunekit run") as info:
        load_results(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    with pytest.raises(ReportError, match=r"results\.json"):
        load_results(tmp_path)  # a folder without results.json


def test_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"schema_version": 1, "methods": {', encoding="utf-8")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_results(path)


def test_top_level_not_object(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(ReportError, match="top level is a list"):
        load_results(path)


def test_censored_null_values_load(results_dir: Path) -> None:
    record = load_results(results_dir)
    steps = record["methods"]["condition_number"]["metrics"]["steps_to_epsilon.harmful.gd_exact"]
    assert steps["values"] == [None, None] and steps["mean"] is None and steps["censored"] == 2
