"""Spectral tests use small matrices: one intra-op thread avoids OpenMP oversubscription stalls.

On a shared 2-core machine, torch's default 2 threads make the hundreds of tiny matvecs of a
Lanczos run spin-wait (observed 1 s → 70 s under load); one thread is faster at these sizes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
