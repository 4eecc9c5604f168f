"""CLI smoke tests in a subprocess, on the tiny synthetic experiment."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml


def immunekit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "immunekit.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_explains_itself(tmp_path: Path) -> None:
    out = immunekit("run", "--help", cwd=tmp_path)
    assert out.returncode == 0
    for flag in ("--csv", "--seeds", "--out", "--config", "--set", "examples:", "--workers", "--ray-address"):
        assert flag in out.stdout
    assert "{local,ray}" in out.stdout and "RAY_ADDRESS" in out.stdout


def test_ls_lists_registries(tmp_path: Path) -> None:
    out = immunekit("ls", cwd=tmp_path)
    assert out.returncode == 0
    for name in (
        "condition_number",
        "rill_only",
        "opt_kappa",
        "imma",
        "identity",
        "linear_probe",
        "house_prices",
        "house-prices",
    ):
        assert name in out.stdout


def test_run_then_report(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "task_config": {"dim": 5, "n": 48},
                "seeds": [1],
                "methods": ["identity", "condition_number"],
                "attacks": [{"key": "gd_exact", "optimizer": "gd_exact", "steps": 10}],
            }
        )
    )
    out = immunekit(
        "run",
        "synthetic",
        "--config",
        str(cfg),
        "--out",
        "res",
        "--no-progress",
        "--workers",
        "1",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "condition_number" in out.stdout and "report:" in out.stdout
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(results["methods"]) == {"identity", "condition_number"}
    (tmp_path / "res" / "report.md").unlink()
    again = immunekit("report", "res", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "condition" in (tmp_path / "res" / "report.md").read_text()


def test_bad_input_gives_one_clear_error(tmp_path: Path) -> None:
    out = immunekit("run", "house-prizes", cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'house-prices'" in out.stderr
    out = immunekit("run", "synthetic", "--set", "epsilom=0.1", cwd=tmp_path)
    assert out.returncode == 2 and "did you mean 'epsilon'" in out.stderr
    out = immunekit("run", "house-prices", "--csv", "missing.csv", cwd=tmp_path)
    assert out.returncode == 2 and "missing.csv" in out.stderr
    out = immunekit("run", "synthetic", "--seeds", "1,x", cwd=tmp_path)
    assert out.returncode == 2 and "comma-separated integers" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_executor_options_fail_before_writing(tmp_path: Path) -> None:
    out = immunekit("run", "synthetic", "--executor", "inline", cwd=tmp_path)
    assert out.returncode == 2 and "invalid choice: 'inline'" in out.stderr
    out = immunekit("run", "synthetic", "--workers", "0", "--out", "res", cwd=tmp_path)
    assert out.returncode == 2 and "workers must be an integer >= 1, got 0" in out.stderr
    with socket.socket() as s:  # a loopback port with nothing listening once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    out = immunekit(
        "run", "synthetic", "--executor", "ray", "--ray-address", address, "--out", "res", cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    unreachable = "cannot reach the Ray cluster" in out.stderr and address in out.stderr
    assert unreachable or 'pip install "immunekit[ray]"' in out.stderr  # the latter without Ray
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "res").exists()
