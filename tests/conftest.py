"""Shared fixtures: no network in tests, float64 helpers, and the in-process CLI fixtures."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _cli_helpers import write_tiny
from immunekit.cli.main import main


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny float64 matrices: one intra-op thread is fastest, and immune to a busy second core."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Fail any attempt to open an internet socket (tests are offline by contract).

    Tests marked ``assets`` may fetch pinned packages from the registry, so they are exempt.
    """
    if request.node.get_closest_marker("assets"):
        return

    def guard(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access in a test; tests must run offline")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)


def assets_selected(config: pytest.Config) -> bool:
    """True when the run asked for the asset tests (``pytest -m assets``), not just allowed them."""
    expr = str(config.getoption("markexpr") or "")
    return "assets" in expr and "not assets" not in expr


@pytest.fixture
def asset(request: pytest.FixtureRequest):
    """``asset(name)`` → the cached path of a pinned asset.

    When the asset cannot be had: a skip in a run that merely includes asset tests, a failure in
    ``pytest -m assets`` (asking for them and getting none must not pass). A sha256 mismatch
    always fails.
    """
    from immunekit import assets
    from immunekit.errors import AssetError

    def get(name: str):
        try:
            return assets.asset_path(name)
        except AssetError as exc:
            if "sha256 mismatch" in str(exc) or assets_selected(request.config):
                pytest.fail(f"asset {name!r} could not be loaded: {exc}")
            pytest.skip(f"asset {name!r} unavailable: {exc}")

    return get


# --- the in-process CLI (tests/cli) ---------------------------------------------------------------


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
