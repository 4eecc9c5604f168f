"""Ctrl-C during a sweep: the pool stops within 2 s, finished records are intact, and it says what it kept."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from immunekit.experiments.sweep import SweepInterrupted, Trial, run_sweep, trial_file

QUICK, SLOW = 0.2, 60.0


def sleepy_job(payload: dict[str, Any]) -> dict[str, Any]:
    """A trial that sleeps (module level: the pool's spawned workers import it)."""
    time.sleep(payload["sleep"])
    return {"i": payload["i"], "slept": payload["sleep"]}


def _sleepy_trials(n_quick: int, n_slow: int) -> list[Trial]:
    sleeps = [QUICK] * n_quick + [SLOW] * n_slow
    return [
        Trial(key=f"trials/t{i}", config_sha="s", payload={"i": i, "sleep": s}) for i, s in enumerate(sleeps)
    ]


def _interrupt_when(
    root: Path, n_files: int, fired: dict[str, float], deadline: float = 120.0
) -> threading.Thread:
    """A thread that sends SIGINT to this process once ``n_files`` records exist under ``root``."""

    def watch() -> None:
        stop = time.monotonic() + deadline
        while time.monotonic() < stop:
            if len(list(root.glob("trials/*.json"))) >= n_files:
                fired["at"] = time.monotonic()
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler, reason="SIGINT is not Python's default"
)
@pytest.mark.parametrize(("workers", "n_quick", "n_slow"), [(2, 2, 4), (1, 2, 2)])
def test_ctrl_c_stops_within_2_s_and_keeps_finished_trials(
    tmp_path: Path, workers: int, n_quick: int, n_slow: int
) -> None:
    root = tmp_path / "out"
    trials = _sleepy_trials(n_quick, n_slow)
    children_before = set(multiprocessing.active_children())  # earlier tests' processes are not ours
    fired: dict[str, float] = {}
    watcher = _interrupt_when(root, n_quick, fired)
    with pytest.raises(SweepInterrupted) as caught:
        run_sweep(trials, sleepy_job, root, workers=workers, progress=False)
    elapsed = time.monotonic() - fired["at"]
    watcher.join(5)
    assert elapsed < 2.0, f"stopped {elapsed:.2f} s after Ctrl-C"
    assert isinstance(caught.value, KeyboardInterrupt)
    err = caught.value
    assert (err.kept, err.total, err.folder) == (n_quick, len(trials), root / "trials")
    assert f"{n_quick} of {len(trials)} trials finished and are kept in {root / 'trials'}" in str(err)
    assert "rerun the same command" in str(err)
    # the finished records are intact, nothing else was written (no temporary files)
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == [f"t{i}.json" for i in range(n_quick)]
    for t in trials[:n_quick]:
        record = json.loads(trial_file(root, t.key).read_text())
        assert record["i"] == t.payload["i"] and record["slept"] == QUICK
    # the pool's workers are gone: SIGKILLed at the latest; one busy in a system call (importing
    # torch from a loaded disk) may take a moment to die, so poll (active_children() reaps them)
    left = set(multiprocessing.active_children()) - children_before
    for _ in range(100):
        if not left:
            break
        time.sleep(0.05)
        left = set(multiprocessing.active_children()) - children_before
    assert left == set(), f"pool workers still alive 5 s after the interrupt: {left}"
    # a rerun resumes: the kept trials are loaded, not recomputed
    quick_only = [t for t in trials if t.payload["sleep"] == QUICK]
    records = run_sweep(quick_only, sleepy_job, root, workers=1, progress=False)
    assert [r["i"] for r in records.values()] == list(range(n_quick))
