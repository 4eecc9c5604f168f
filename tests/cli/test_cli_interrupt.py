"""Ctrl-C on ``immunekit run`` with a pool: exits within 2 s and says which trials were kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _cli_helpers import write_tiny

SLOW_DEFENSE = """
    import time

    from immunekit.defenses import DEFENSES
    from immunekit.defenses.identity import Identity


    @DEFENSES.register("slow")
    class Slow(Identity):
        name = "slow"

        def fit(self, model, task, *, seed):
            time.sleep(120)
            return super().fit(model, task, seed=seed)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")
@pytest.mark.parametrize("workers", ["2"])
def test_ctrl_c_with_a_pool_exits_fast_and_names_the_kept_trials(tmp_path: Path, workers: str) -> None:
    (tmp_path / "slowdefense.py").write_text(textwrap.dedent(SLOW_DEFENSE))
    config = write_tiny(tmp_path, methods=["identity", "slow"], seeds=[1, 2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "res"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "immunekit.cli.main",
            "--import",
            "slowdefense",
            "run",
            "synthetic",
            "--config",
            str(config),
            "--out",
            str(out),
            "--workers",
            workers,
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("trials/identity--seed*.json"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # both workers are inside a slow trial by now
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the driver and every worker get it
        _, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert elapsed < 2.0, f"exited {elapsed:.2f} s after Ctrl-C"
    lines = stderr.strip().splitlines()
    assert lines == [
        f"immunekit: interrupted; 2 of 4 trials finished and are kept in {out / 'trials'}; rerun the same "
        "command to resume (kept trials are not recomputed)"
    ], stderr  # no worker tracebacks
    kept = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert kept == ["identity--seed1.json", "identity--seed2.json"]
    for name in kept:
        assert json.loads((out / "trials" / name).read_text())["method"] == "identity"
