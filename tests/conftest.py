"""Shared fixtures: no network in tests, float64 helpers."""

from __future__ import annotations

import socket

import pytest
import torch


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
    from immunekit.data import assets
    from immunekit.errors import AssetError

    def get(name: str):
        try:
            return assets.asset_path(name)
        except AssetError as exc:
            if "sha256 mismatch" in str(exc) or assets_selected(request.config):
                pytest.fail(f"asset {name!r} could not be loaded: {exc}")
            pytest.skip(f"asset {name!r} unavailable: {exc}")

    return get
