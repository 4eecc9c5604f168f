"""Helpers of the in-process CLI tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

TINY = {
    "task_config": {"dim": 5, "n": 48},
    "seeds": [1],
    "methods": [
        "identity",
        {"key": "condition_number", "overrides": {"steps": 10}},
        {"key": "imma", "overrides": {"steps": 5}},
    ],
    "attacks": [{"key": "gd_exact", "optimizer": "gd_exact", "steps": 10}],
}
"""A seconds-long synthetic experiment: 3 methods × 1 seed."""


def write_tiny(folder: Path, **changes: object) -> Path:
    """``folder/tiny.yaml``: :data:`TINY` with ``changes``."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → hex); ``{}`` when it does not exist."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    """Exit code 2, nothing on stdout, exactly one ``immunekit: error:`` line holding every needle."""
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("immunekit: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert out == "", out
    return lines[0]
