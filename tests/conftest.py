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
