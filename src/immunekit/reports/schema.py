"""The ``results.json`` record (schema version 1, see ``docs/results-schema.md``) and its loader.

The reports layer reads JSON only: no torch, no model, no other immunekit layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

from immunekit._versions import SCHEMA_VERSION

RESULTS_FILENAME = "results.json"
RERUN_HINT = "rerun `immunekit run <experiment>` to regenerate it"


class ReportError(ValueError):
    """A results file cannot be reported: missing, not JSON, wrong schema version or missing keys.

    The message names the file, the offending key and the fix.
    """


class MetricSummary(TypedDict):
    """One metric of one method, aggregated over seeds (``values`` in the order of ``seeds``)."""

    mean: float | None
    std: float | None
    n: int
    values: list[float | None]
    censored: int
    direction: Literal["higher", "lower"] | None
    unit: NotRequired[str | None]


class VerdictEntry(TypedDict):
    """Definition 3.1 verdict for one seed."""

    seed: int
    a: bool
    b: bool
    c: bool
    immunized: bool
    threshold_a_min_ratio_harmful: float
    threshold_b_max_ratio_primary: float
    threshold_c_max_relative_loss_increase: float
    primary_loss_reference: NotRequired[float | None]
    primary_loss_immunized: NotRequired[float | None]


class Curve(TypedDict):
    """An attack curve of the first seed; index = step (0 = initial state, norm ratio 1)."""

    norm_ratio: list[float | None]
    loss: NotRequired[list[float | None]]


class MethodRecord(TypedDict):
    """Everything measured for one method; ``curves`` keys are ``"<harmful|primary>.<attack key>"``."""

    metrics: dict[str, MetricSummary]
    verdict: NotRequired[list[VerdictEntry]]
    curves: NotRequired[dict[str, Curve]]
    defense_info: NotRequired[dict[str, Any]]


class AttackSpec(TypedDict):
    """One attacker setting, in display order."""

    key: str
    optimizer: str
    steps: int
    lr: float | None
    batch_size: NotRequired[int | None]


class PaperTable(TypedDict, total=False):
    """The paper's numbers for the experiment; may be empty or partial.

    Single-cell runs use ``columns``/``rows``; grid runs (MNIST pairs) use ``table2`` (mean RIR per
    method), ``fig2`` (per method a 10×10 ln-RIR matrix, rows harmful digit h, columns primary digit p,
    diagonal unused) and ``fig2_success_counts_text``.
    """

    source: str
    columns: list[str]
    rows: dict[str, list[float | None]]
    table2: dict[str, float]
    fig2: dict[str, Any]
    fig2_success_counts_text: str


class GridSpec(TypedDict, total=False):
    """Layout of a grid run.

    Example: ``{"kind": "digit_pairs", "rows": "harmful", "cols": "primary", "size": 10}``.
    """

    kind: str
    rows: str
    cols: str
    size: int


class CellMethodRecord(TypedDict):
    """One method on one grid cell: metric summaries over seeds and the per-seed verdicts."""

    metrics: dict[str, MetricSummary]
    verdict: NotRequired[list[VerdictEntry]]


class CellRecord(TypedDict):
    """One ordered digit pair of a grid run; keyed ``"<primary>-<harmful>"`` in ``cells``."""

    primary: int
    harmful: int
    methods: dict[str, CellMethodRecord]


class Provenance(TypedDict, total=False):
    """Software versions, code state and the command that produced the record."""

    immunekit: str
    git_sha: str | None
    git_dirty: bool | None
    python: str
    platform: str
    torch: str
    numpy: str
    pandas: str
    device: str
    dtype: str
    command: str
    task_version: str
    task_info: dict[str, Any]


class ResultsRecord(TypedDict):
    """The whole ``results.json`` (schema version 1)."""

    schema_version: int
    experiment: str
    run_id: str
    created_at: str
    seeds: list[int]
    config: dict[str, Any]
    config_sha256: str
    provenance: Provenance
    paper: PaperTable
    attacks: list[AttackSpec]
    epsilon: float
    methods: dict[str, MethodRecord]
    trials: NotRequired[list[str]]
    # grid runs only; ``methods[m]["metrics"]`` then summarize across cells (values = per-cell means)
    grid: NotRequired[GridSpec]
    cells: NotRequired[dict[str, CellRecord]]


def resolve_results_path(path_or_dir: str | Path) -> Path:
    """``results.json`` inside ``path_or_dir`` when it is a folder, else ``path_or_dir`` itself."""
    path = Path(path_or_dir)
    return path / RESULTS_FILENAME if path.is_dir() else path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` and check the keys the report needs.

    Args:
        path: the ``results.json`` file, or the run folder that holds it.

    Returns:
        The record as a plain dict (structure: :class:`ResultsRecord`).

    Raises:
        ReportError: the file is missing or is not JSON, ``schema_version`` differs from
            :data:`SCHEMA_VERSION`, ``methods`` is not a mapping, or a method lacks ``metrics``.

    """
    file = resolve_results_path(path)
    if not file.is_file():
        raise ReportError(
            f"{file}: no such results file; run `immunekit run <experiment>` first "
            f"and pass its output folder or its {RESULTS_FILENAME}"
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(
            f"{file}: not valid JSON ({exc}); the file is truncated or corrupt, {RERUN_HINT}"
        ) from exc
    validate_results(data, source=str(file))
    return data


def validate_results(data: Any, source: str = "<results>") -> None:
    """Check the essentials of a results record (schema version, methods, metrics).

    Args:
        data: the decoded JSON.
        source: the file name used in error messages.

    Raises:
        ReportError: naming ``source``, the bad key and the fix.

    """
    if not isinstance(data, Mapping):
        raise ReportError(
            f"{source}: top level is a {type(data).__name__}, expected a JSON object; "
            f"this is not a results.json, {RERUN_HINT}"
        )
    _check_version(data, source)
    methods = data.get("methods")
    if methods is None:
        raise ReportError(
            f"{source}: missing key 'methods' (the per-method results); the run did not "
            f"finish or this is not a results.json, {RERUN_HINT}"
        )
    if not isinstance(methods, Mapping):
        raise ReportError(
            f"{source}: key 'methods' is a {type(methods).__name__}, expected an object "
            f"mapping method name to its results; {RERUN_HINT}"
        )
    for name, record in methods.items():
        _check_method(name, record, source)
    _check_optional_types(data, source)


def _check_version(data: Mapping[str, Any], source: str) -> None:
    version = data.get("schema_version")
    if version is None:
        raise ReportError(
            f"{source}: missing key 'schema_version'; expected {SCHEMA_VERSION}. "
            f"The file was not written by `immunekit run`; {RERUN_HINT}"
        )
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{source}: key 'schema_version' is {version!r}, but this immunekit reads "
            f"schema_version {SCHEMA_VERSION}; {RERUN_HINT} with this immunekit version, "
            f"or report it with the immunekit version that wrote it"
        )


def _check_method(name: str, record: Any, source: str) -> None:
    where = f"methods.{name}"
    if not isinstance(record, Mapping):
        raise ReportError(
            f"{source}: key '{where}' is a {type(record).__name__}, expected an object; {RERUN_HINT}"
        )
    metrics = record.get("metrics")
    if metrics is None:
        raise ReportError(
            f"{source}: key '{where}.metrics' is missing; every method needs its metrics, {RERUN_HINT}"
        )
    if not isinstance(metrics, Mapping):
        raise ReportError(
            f"{source}: key '{where}.metrics' is a {type(metrics).__name__}, expected an "
            f"object mapping metric name to its summary; {RERUN_HINT}"
        )
    for metric, summary in metrics.items():
        if not isinstance(summary, Mapping):
            raise ReportError(
                f"{source}: key '{where}.metrics.{metric}' is a {type(summary).__name__}, "
                f"expected an object with mean/std/values; {RERUN_HINT}"
            )


def _check_optional_types(data: Mapping[str, Any], source: str) -> None:
    expected: dict[str, tuple[type, ...]] = {
        "attacks": (list,),
        "paper": (Mapping,),
        "seeds": (list,),
        "provenance": (Mapping,),
        "grid": (Mapping,),
        "cells": (Mapping,),
    }
    for key, types in expected.items():
        value = data.get(key)
        if value is not None and not isinstance(value, types):
            raise ReportError(
                f"{source}: key '{key}' is a {type(value).__name__}, expected "
                f"{'a list' if types == (list,) else 'an object'}; {RERUN_HINT}"
            )
