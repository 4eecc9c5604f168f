"""`pytest -m assets` fails when an asset cannot be loaded; a run that merely includes them skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/data/test_mnist.py::test_real_mnist_shapes_and_pair_counts"


@pytest.mark.parametrize(
    ("markexpr", "rc", "word"), [("assets", 1, "failed"), ("assets or not assets", 0, "skipped")]
)
def test_missing_asset_fails_only_when_assets_are_asked_for(
    tmp_path: Path, markexpr: str, rc: int, word: str
) -> None:
    env = {**os.environ, "IMMUNEKIT_CACHE": str(tmp_path), "IMMUNEKIT_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", markexpr, TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == rc, out.stdout[-2000:]
    assert f"1 {word}" in out.stdout
