"""Fixtures of the in-process CLI tests: run ``main``, a finished results folder, no trials."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _cli_helpers import write_tiny

from immunekit.cli.main import main


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``cli("run", ...)`` → ``(exit code, stdout, stderr)`` of ``immunekit.cli.main.main``."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse: --help, usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def no_trials(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if any trial starts in this process (the CLI tests run with --workers 1)."""
    import immunekit.experiments.linear as linear

    started: list[str] = []

    def refuse(cfg: object, method: object, seed: int, task: object) -> None:
        started.append(f"{getattr(method, 'key', method)}--seed{seed}")
        raise AssertionError(f"a trial started: {started[-1]}")

    monkeypatch.setattr(linear, "immunize_and_measure", refuse)
    return started


@pytest.fixture(scope="session")
def finished_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``immunekit run synthetic`` folder of the tiny config (made once per session)."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "results"
    code = main(
        [
            "run",
            "synthetic",
            "--config",
            str(write_tiny(root)),
            "--out",
            str(out),
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    return out


@pytest.fixture
def results_dir(finished_results: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`finished_results` (a test may try to write into it)."""
    out = tmp_path / "results"
    shutil.copytree(finished_results, out)
    return out
