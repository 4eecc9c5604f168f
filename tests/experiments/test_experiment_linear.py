"""The linear experiment runner: trials on disk, resume, refusal to mix configs, aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from immunekit.config import read_yaml
from immunekit.data import TASKS
from immunekit.errors import ConfigError
from immunekit.experiments import default_config_path
from immunekit.experiments.io import read_json
from immunekit.experiments.linear import (
    build_config,
    kappa_pair,
    model_path,
    run_linear_experiment,
    summarise,
    trial_path,
)
from immunekit.metrics import rir
from immunekit.models.checkpoint import load_checkpoint, read_checkpoint_info
from immunekit.spectral import covariance


def tiny_config(**changes: object) -> dict:
    data = read_yaml(default_config_path("synthetic"))
    data.update(
        task_config={"dim": 6, "n": 64, "cond_primary": 50.0, "cond_harmful": 5.0},
        seeds=[1, 2],
        methods=["identity", "condition_number"],
        attacks=[{"key": "gd_exact", "optimizer": "gd_exact", "steps": 20}],
    )
    data.update(changes)
    return data


def test_run_writes_results_and_one_record_per_trial(tmp_path: Path) -> None:
    cfg = build_config(tiny_config())
    results = run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == [
        "condition_number--seed1.json",
        "condition_number--seed2.json",
        "identity--seed1.json",
        "identity--seed2.json",
    ]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["seeds"] == [1, 2]
    ident = results["methods"]["identity"]["metrics"]
    assert ident["rir"]["values"] == [1.0, 1.0]
    cn = results["methods"]["condition_number"]["metrics"]
    assert cn["rir"]["mean"] > 1.0
    assert len(results["methods"]["condition_number"]["curves"]["harmful.gd_exact"]["norm_ratio"]) <= 21
    assert on_disk["provenance"]["torch"]
    assert on_disk["config_sha256"] == results["config_sha256"]


def test_resume_skips_finished_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = build_config(tiny_config())
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    before = {p.name: p.read_text() for p in (tmp_path / "trials").iterdir()}
    import immunekit.experiments.linear as linear

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished trial was recomputed")

    monkeypatch.setattr(linear, "run_trial", fail)
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert {p.name: p.read_text() for p in (tmp_path / "trials").iterdir()} == before


def test_partial_run_completes_only_missing_trials(tmp_path: Path) -> None:
    cfg = build_config(tiny_config())
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    victim = trial_path(tmp_path, "condition_number", 2)
    kept = trial_path(tmp_path, "identity", 1).read_text()
    victim.unlink()  # as if the run was killed before this trial finished
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert victim.exists()
    assert trial_path(tmp_path, "identity", 1).read_text() == kept


def test_refuses_to_mix_configs(tmp_path: Path) -> None:
    run_linear_experiment(build_config(tiny_config()), tmp_path, progress=False, workers=1)
    other = build_config(tiny_config(epsilon=0.2))
    with pytest.raises(ConfigError, match="different configuration"):
        run_linear_experiment(other, tmp_path, progress=False, workers=1)


def test_unknown_keys_and_names_suggest_fixes() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epsilon'"):
        build_config(tiny_config(epsilom=0.1))
    with pytest.raises(ConfigError, match="did you mean 'condition_number'"):
        build_config(tiny_config(methods=["condition_numbr"]))
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        build_config(tiny_config(seeds=[1, 1]))


def test_summarise_censors_none() -> None:
    s = summarise("steps_to_epsilon.harmful.gd", [10, None, 14])
    assert s["censored"] == 1 and s["n"] == 2 and s["mean"] == 12.0 and s["direction"] == "higher"
    assert summarise("rir", [None, None])["mean"] is None


def _comparable(record: dict) -> dict:
    metrics = {k: v for k, v in record["metrics"].items() if not k.endswith("_seconds")}  # wall times
    return {"metrics": metrics, "curves": record["curves"], "verdict": record["verdict"]}


def test_process_pool_gives_the_inline_records(tmp_path: Path) -> None:
    cfg = build_config(tiny_config(methods=["condition_number", "imma"], seeds=[3]))
    run_linear_experiment(cfg, tmp_path / "inline", progress=False, executor="local", workers=1)
    run_linear_experiment(cfg, tmp_path / "process", progress=False, executor="local", workers=2)
    for name in ("condition_number--seed3.json", "imma--seed3.json"):
        a = json.loads((tmp_path / "inline" / "trials" / name).read_text())
        b = json.loads((tmp_path / "process" / "trials" / name).read_text())
        assert _comparable(a) == _comparable(b)


def test_unknown_executor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown executor 'ray2'"):
        run_linear_experiment(build_config(tiny_config()), tmp_path, executor="ray2")


def test_save_models_writes_loadable_checkpoints_with_the_task(tmp_path: Path) -> None:
    cfg = build_config(tiny_config())
    results = run_linear_experiment(cfg, tmp_path, progress=False, workers=1, save_models=True)
    method = "condition_number"
    assert method in results["methods"]
    seed = cfg.seeds[0]
    path = model_path(tmp_path / "models", method, seed)
    info = read_checkpoint_info(path)
    assert info.metadata["task"] == cfg.task
    assert info.metadata["task_config"]["seed"] == seed
    assert info.metadata["method"] == method
    # the saved model is the one the trial measured: its κ pair gives the recorded RIR
    model = load_checkpoint(path)
    task = TASKS.get(cfg.task)(**info.metadata["task_config"])
    k_h, k_p = covariance(task.harmful.x), covariance(task.primary.x)
    ref = kappa_pair(torch.eye(task.input_dim, dtype=torch.float64), k_h, k_p)
    got = rir(ref, kappa_pair(model.theta, k_h, k_p)).log_rir
    trial = read_json(trial_path(tmp_path, method, seed))
    assert got == pytest.approx(trial["metrics"]["log_rir"], rel=1e-9, abs=1e-9)


def test_save_models_refuses_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local executor"):
        run_linear_experiment(
            build_config(tiny_config()), tmp_path, executor="ray", save_models=True, progress=False
        )
    assert not (tmp_path / "trials").exists()
