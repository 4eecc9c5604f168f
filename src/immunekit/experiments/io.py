"""Atomic JSON writes: a crash never leaves a half-written record behind (:mod:`immunekit._atomic`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from immunekit._atomic import atomic_write_text


def _clean(value: Any) -> Any:
    """Replace NaN/Inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def as_stored(data: Any) -> Any:
    """``data`` as :func:`atomic_write_json` then :func:`read_json` would give it back (no file)."""
    return json.loads(json.dumps(_clean(data), sort_keys=True, allow_nan=False))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as sorted-key JSON atomically (NaN/Inf become null)."""
    return atomic_write_text(path, json.dumps(_clean(data), indent=1, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
