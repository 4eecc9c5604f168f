"""The generic sweep runner: resume after a crash or a kill, refusal to mix, executors, Ray."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from test_experiment_grid import grid_config

from immunekit.errors import ConfigError
from immunekit.experiments import sweep
from immunekit.experiments.linear import build_config, run_linear_experiment
from immunekit.experiments.sweep import SHA_FIELD, Trial, run_sweep, trial_file

HERE = Path(__file__).resolve().parent
HAVE_RAY = importlib.util.find_spec("ray") is not None


def _loopback(address: object) -> bool:
    if not isinstance(address, tuple):
        return False
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's offline guard, except for loopback: a local Ray instance talks to itself."""
    connect, create_connection = socket.socket.connect, socket.create_connection

    def guarded_connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX or _loopback(address):
            return connect(self, address)
        raise RuntimeError("network access in a test; tests must run offline")

    def guarded_create(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if _loopback(address):
            return create_connection(address, *args, **kwargs)
        raise RuntimeError("network access in a test; tests must run offline")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create)


# ---------------------------------------------------------------------------------------------
# synthetic jobs (module level: pool and Ray workers import them)
# ---------------------------------------------------------------------------------------------


def marker_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Leave one marker file per call (so calls are counted across processes), then maybe fail."""
    i = payload["i"]
    Path(payload["calls"], f"{i}-{uuid.uuid4().hex}.mark").touch()
    if payload.get("kill_on") == i:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, no exception handlers
    if payload.get("fail_on") == i:
        raise RuntimeError(f"trial {i} crashed")
    return {"i": i, "square": i * i}


def marker_trials(calls: str | Path, n: int = 6, sha: str = "sha-a", **flags: int) -> list[Trial]:
    Path(calls).mkdir(parents=True, exist_ok=True)
    return [
        Trial(key=f"trials/t{i}", config_sha=sha, payload={"i": i, "calls": str(calls), **flags})
        for i in range(n)
    ]


def calls_per_trial(calls: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for p in calls.glob("*.mark"):
        i = int(p.name.split("-")[0])
        counts[i] = counts.get(i, 0) + 1
    return counts


def on_disk(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def spectrum_job(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    return {"seed": seed, "eigvals": torch.linalg.eigvalsh(a.T @ a).tolist()}


# ---------------------------------------------------------------------------------------------
# resume: a crash, a hard kill
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_crash_midway_then_rerun_finishes_without_recomputing(tmp_path: Path, workers: int) -> None:
    root, calls = tmp_path / "out", tmp_path / "calls"
    with pytest.raises(RuntimeError, match="trial 2 crashed"):
        run_sweep(marker_trials(calls, n=8, fail_on=2), marker_job, root, workers=workers, progress=False)
    first = calls_per_trial(calls)
    saved = {int(p.stem[1:]) for p in (root / "trials").glob("*.json")}
    assert 2 not in saved and saved >= {0, 1}
    assert saved == set(first) - {2}  # every trial that finished was written: nothing lost
    if workers == 1:
        assert set(first) == {0, 1, 2}  # in-process: stops at the crash

    records = run_sweep(marker_trials(calls, n=8), marker_job, root, workers=workers, progress=False)
    counts = calls_per_trial(calls)
    assert counts == {i: 2 if i == 2 else 1 for i in range(8)}  # only the crashed trial ran again
    assert list(records) == [f"trials/t{i}" for i in range(8)]
    assert [r["square"] for r in records.values()] == [i * i for i in range(8)]
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(f"t{i}.json" for i in range(8))
    assert all(r[SHA_FIELD] == "sha-a" for r in records.values())


def test_hard_kill_midway_then_rerun_finishes_without_recomputing(tmp_path: Path) -> None:
    root, calls = tmp_path / "out", tmp_path / "calls"
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "import torch; torch.set_num_threads(1)\n"
        "import test_sweep as t\n"
        f"t.run_sweep(t.marker_trials({str(calls)!r}, kill_on=3), t.marker_job, {str(root)!r}, "
        "workers=1, progress=False)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (root / "trials").glob("*.json")) == ["t0.json", "t1.json", "t2.json"]
    before = on_disk(root)

    records = run_sweep(marker_trials(calls), marker_job, root, workers=1, progress=False)
    assert calls_per_trial(calls) == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    after = on_disk(root)
    assert {k: after[k] for k in before} == before  # finished records untouched
    assert sorted(after) == [f"trials/t{i}.json" for i in range(6)]  # no duplicates, no temp files
    assert [r["i"] for r in records.values()] == list(range(6))


def test_progress_bar_counts_resumed_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calls = tmp_path / "calls"
    run_sweep(marker_trials(calls, n=5)[:2], marker_job, tmp_path / "out", workers=1, progress=False)
    run_sweep(marker_trials(calls, n=5), marker_job, tmp_path / "out", workers=1, desc="demo")
    err = capsys.readouterr().err
    assert "demo" in err and "5/5" in err and "trial" in err
    assert "0/5" not in err  # starts at the 2 resumed trials, not at zero


# ---------------------------------------------------------------------------------------------
# bad input: nothing runs, nothing is written
# ---------------------------------------------------------------------------------------------


def test_refuses_to_mix_configurations(tmp_path: Path) -> None:
    root, calls = tmp_path / "out", tmp_path / "calls"
    run_sweep(marker_trials(calls, n=3), marker_job, root, workers=1, progress=False)
    before = on_disk(root)
    with pytest.raises(ConfigError, match="different configuration; refusing to mix") as err:
        run_sweep(marker_trials(calls, n=4, sha="sha-b"), marker_job, root, workers=1, progress=False)
    assert "new --out directory" in str(err.value)
    assert on_disk(root) == before and calls_per_trial(calls) == {0: 1, 1: 1, 2: 1}


def test_unknown_executor_and_bad_options_are_refused(tmp_path: Path) -> None:
    trials = marker_trials(tmp_path / "calls", n=2)
    root = tmp_path / "out"
    with pytest.raises(ConfigError, match="unknown executor 'ray2'; did you mean 'ray'"):
        run_sweep(trials, marker_job, root, executor="ray2")
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        run_sweep(trials, marker_job, root, workers=0)
    with pytest.raises(ConfigError, match="needs the 'ray' executor"):
        run_sweep(trials, marker_job, root, workers=1, address="10.0.0.5:6379")
    with pytest.raises(ConfigError, match="unique; 'trials/t0' repeats"):
        run_sweep([*trials, trials[0]], marker_job, root, workers=1)
    with pytest.raises(ConfigError, match="relative path"):
        run_sweep([Trial(key="../escape", config_sha="s", payload=0)], marker_job, root, workers=1)
    assert not root.exists() and calls_per_trial(tmp_path / "calls") == {}
    assert sweep.EXECUTORS.names() == ["local", "ray"]


def test_ray_not_installed_gives_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "immunekit\[ray\]"'):
        run_sweep(marker_trials(tmp_path / "calls"), marker_job, tmp_path / "out", executor="ray")
    assert not (tmp_path / "out").exists() and calls_per_trial(tmp_path / "calls") == {}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'immunekit[ray]')")
@pytest.mark.parametrize("via", ["argument", "RAY_ADDRESS"])
def test_unreachable_ray_address_is_clear_and_leaves_results_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    import ray

    root, calls = tmp_path / "out", tmp_path / "calls"
    run_sweep(marker_trials(calls, n=6)[:2], marker_job, root, workers=1, progress=False)
    before = on_disk(root)
    address = f"127.0.0.1:{_closed_port()}"
    if via == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match="cannot reach the Ray cluster") as err:
        run_sweep(
            marker_trials(calls, n=6),
            marker_job,
            root,
            executor="ray",
            address=address if via == "argument" else None,
            progress=False,
        )
    assert address in str(err.value) and "--ray-address" in str(err.value)
    assert on_disk(root) == before and calls_per_trial(calls) == {0: 1, 1: 1}
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        run_sweep(marker_trials(calls), marker_job, root, executor="ray", address="nohost", progress=False)


# ---------------------------------------------------------------------------------------------
# executors agree
# ---------------------------------------------------------------------------------------------


def test_local_pool_gives_the_inline_records(tmp_path: Path) -> None:
    trials = [Trial(key=f"s{seed}", config_sha="x", payload=seed) for seed in (3, 1, 4, 5)]
    inline = run_sweep(trials, spectrum_job, tmp_path / "inline", workers=1, progress=False)
    pool = run_sweep(trials, spectrum_job, tmp_path / "pool", workers=2, progress=False)
    assert pool == inline
    assert list(pool) == ["s3", "s1", "s4", "s5"]  # trial order, whatever the completion order
    assert len({json.dumps(r["eigvals"]) for r in inline.values()}) == 4
    assert json.loads(trial_file(tmp_path / "pool", "s4").read_text()) == inline["s4"]


def _without_timings(record: dict[str, Any]) -> dict[str, Any]:
    """The record without what measures the machine rather than the method (seconds, peak memory)."""
    out = {k: v for k, v in record.items() if k != "resources"}
    out["metrics"] = {k: v for k, v in record["metrics"].items() if not k.endswith("_seconds")}
    return out


@pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install 'immunekit[ray]')")
def test_ray_executor_gives_the_local_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local instance started by the runner
    cfg = build_config(grid_config(pairs="0-1,3-2"))
    local = run_linear_experiment(cfg, tmp_path / "local", progress=False, executor="local", workers=1)
    remote = run_linear_experiment(cfg, tmp_path / "ray", progress=False, executor="ray", workers=2)
    assert not ray.is_initialized()  # the runner shut down the instance it started
    names = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*.json"))
    assert len(names) == 1 + 2 * 2 * 2  # results.json + 2 pairs × 2 seeds × 2 methods
    assert names == sorted(str(p.relative_to(tmp_path / "ray")) for p in (tmp_path / "ray").rglob("*.json"))
    for name in names:
        if name.startswith("trials"):
            a = json.loads((tmp_path / "local" / name).read_text())
            b = json.loads((tmp_path / "ray" / name).read_text())
            assert _without_timings(a) == _without_timings(b), name
    for cell in ("0-1", "3-2"):
        rir = [r["cells"][cell]["methods"]["condition_number"]["metrics"]["rir"] for r in (local, remote)]
        assert rir[0]["values"] == rir[1]["values"] and rir[0]["values"][0] > 1.0
