"""Quiet by default: facts such as a singular K are INFO lines (-v) and recorded in results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _cli_helpers import write_tiny


@pytest.mark.parametrize("verbosity", [[], ["-v"]])
def test_rank_deficiency_is_info_and_recorded(tmp_path: Path, verbosity: list[str]) -> None:
    # 8 rows per domain, a quarter held out: 6 training rows of 8 features, K_P and K_H of rank 6
    config = write_tiny(tmp_path, task_config={"dim": 8, "n": 8}, methods=["identity"])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "immunekit.cli.main",
            *verbosity,
            "run",
            "synthetic",
            "--config",
            str(config),
            "--out",
            "res",
            "--no-progress",
            "--no-report",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    said = [line for line in out.stderr.splitlines() if "has rank" in line]
    if verbosity:
        assert len(said) == 2 and all(line.startswith("INFO immunekit.experiments.linear: ") for line in said)
        assert "K_P has rank 6 of 8" in said[0] and "rank_deficiency" in said[0]
    else:
        assert said == [] and "WARNING" not in out.stderr and out.stderr.strip() == "", out.stderr
    assert "results: res/results.json" in out.stdout
    recorded = json.loads((tmp_path / "res" / "results.json").read_text())["rank_deficiency"]
    assert [(e["matrix"], e["rank"], e["dim"]) for e in recorded] == [("K_P", 6, 8), ("K_H", 6, 8)]
    assert all({"rtol", "gap", "sigma_last_kept", "sigma_first_dropped"} <= set(e) for e in recorded)
