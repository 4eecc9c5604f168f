"""The experiment registry: every kind builds its packaged defaults, options belong to their experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from immunekit.config import read_yaml
from immunekit.errors import ConfigError
from immunekit.experiments import default_config_path, experiment_names
from immunekit.experiments.registry import EXPERIMENTS, OPTIONS, Experiment, RunContext, get_experiment


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_builds_its_packaged_defaults(name: str) -> None:
    experiment = get_experiment(name)
    assert isinstance(experiment, Experiment) and experiment.name == name
    assert default_config_path(name) == experiment.defaults_path() and experiment.defaults_path().is_file()
    cfg = experiment.build_config(read_yaml(experiment.defaults_path()))
    assert cfg is not None
    assert experiment.kind and experiment.help
    assert callable(type(experiment).job)


def test_dashes_and_underscores_name_the_same_experiment() -> None:
    assert type(get_experiment("house-prices")) is type(get_experiment("house_prices"))


def test_an_unknown_experiment_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mnist-pairs'"):
        get_experiment("mnist-pair")


def test_each_option_is_registered_with_an_experiment_and_a_config_path() -> None:
    assert set(OPTIONS) == set(EXPERIMENTS.names())
    flags = [o.flag for opts in OPTIONS.values() for o in opts]
    assert "--csv" in flags and "--pairs" in flags and "--backbone" in flags
    for opts in OPTIONS.values():
        for o in opts:
            assert o.flag.startswith("--") and o.path and o.help


def test_run_refuses_an_unwritable_out_before_building_trials(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    experiment = get_experiment("synthetic")
    cfg = experiment.build_config(read_yaml(experiment.defaults_path()))
    with pytest.raises(ConfigError, match="choose another --out"):
        experiment.run(cfg, RunContext(out=blocker / "sub", progress=False, workers=1))
    assert not (tmp_path / "file" / "sub").exists()


def test_linear_results_carry_their_kind(tmp_path: Path) -> None:
    experiment = get_experiment("synthetic")
    data = read_yaml(experiment.defaults_path())
    data.update(
        task_config={"dim": 5, "n": 48},
        seeds=[1],
        methods=["identity"],
        attacks=[{"key": "gd_exact", "optimizer": "gd_exact", "steps": 5}],
    )
    ctx = RunContext(out=tmp_path, progress=False, workers=1)
    results = experiment.run(experiment.build_config(data), ctx)
    assert results["kind"] == "linear"
    assert read_yaml(tmp_path / "results.json")["kind"] == "linear"


def test_a_two_process_launch_writes_once_and_matches_one_process(tmp_path: Path) -> None:
    """Under torchrun every process runs the trials; only rank 0 writes records, results and report."""
    pytest.importorskip("accelerate")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "task_config: {dim: 5, n: 48}\nseeds: [1]\nmethods: [identity, condition_number]\n"
        "attacks: [{key: gd_exact, optimizer: gd_exact, steps: 5}]\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["run", "synthetic", "--config", str(config), "--no-progress", "--no-report"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "immunekit.cli.main", *common, "--out", str(tmp_path / "two")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("results: ") == 1  # rank 1 prints nothing
    one = subprocess.run(
        [sys.executable, "-m", "immunekit.cli.main", *common, "--out", str(tmp_path / "one"),
         "--workers", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for trial in ("identity--seed1.json", "condition_number--seed1.json"):
        a = json.loads((tmp_path / "two" / "trials" / trial).read_text())
        b = json.loads((tmp_path / "one" / "trials" / trial).read_text())
        timing = {k for k in a["metrics"] if k.endswith("_seconds")}
        assert timing and set(a["metrics"]) == set(b["metrics"]) and a["verdict"] == b["verdict"]
        assert {k: v for k, v in a["metrics"].items() if k not in timing} == {
            k: v for k, v in b["metrics"].items() if k not in timing
        }
    assert json.loads((tmp_path / "two" / "results.json").read_text())["kind"] == "linear"
