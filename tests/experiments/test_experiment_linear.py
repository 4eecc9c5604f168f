"""The linear experiment runner: trials on disk, resume, refusal to mix configs, aggregation."""

from __future__ import annotations

import json
import logging
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
    x_h, x_p = task.harmful.x, task.primary.x
    ref = kappa_pair(torch.eye(task.input_dim, dtype=torch.float64), x_h, x_p)
    got = rir(ref, kappa_pair(model.theta, x_h, x_p)).log_rir
    trial = read_json(trial_path(tmp_path, method, seed))
    assert got == pytest.approx(trial["metrics"]["log_rir"], rel=1e-9, abs=1e-9)


def test_save_models_refuses_ray(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="local executor"):
        run_linear_experiment(
            build_config(tiny_config()), tmp_path, executor="ray", save_models=True, progress=False
        )
    assert not (tmp_path / "trials").exists()


# ------------------------------------------------------------------ the rank rule and its band


def test_records_carry_the_rank_rule_and_the_band(tmp_path: Path) -> None:
    from immunekit.spectral import RANK_RULE, FactorSpectrum

    cfg = build_config(tiny_config(seeds=[1], methods=["identity", "condition_number", "whiten_primary"]))
    results = run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert results["rank_rule"]["rule"] == RANK_RULE
    assert results["rank_rule"]["band_multipliers"] == [0.01, 1.0, 100.0]
    trial = read_json(trial_path(tmp_path, "condition_number", 1))
    task = TASKS.get(cfg.task)(**cfg.task_config, seed=1)
    spec_p = FactorSpectrum.of(task.primary.x)
    rule = trial["rank_rule"]
    assert rule["rule"] == RANK_RULE and rule["primary"] == spec_p.describe()
    assert rule["band_rank_primary"] == [spec_p.scaled(m).rank for m in (0.01, 1.0, 100.0)]
    # the defense decided null(K) with the same rule on the same data
    assert trial["defense_info"]["rank_rule"]["primary"] == spec_p.describe()
    m = trial["metrics"]
    for name in ("kappa_ratio_harmful", "kappa_ratio_primary", "rir", "log_rir"):
        assert f"{name}_band_low" in m and f"{name}_band_high" in m
    # full-rank synthetic K: every cut gives the same κ, so the band is flat
    assert m["rir_band_low"] == pytest.approx(m["rir"], rel=1e-12)
    assert m["rir_band_spread"] == pytest.approx(1.0, rel=1e-12) and m["threshold_sensitive"] == 0.0
    # whiten_primary: κ(H_P) = 1, so (ii) = 1/κ(K_P)
    w = read_json(trial_path(tmp_path, "whiten_primary", 1))["metrics"]
    assert w["kappa_ratio_primary"] == pytest.approx(1 / spec_p.kappa().kappa, rel=1e-9)


def test_experiment_rank_rtol_reaches_the_defenses(tmp_path: Path) -> None:
    cfg = build_config(tiny_config(seeds=[1], rank_rtol=1e-9))
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    trial = read_json(trial_path(tmp_path, "condition_number", 1))
    assert trial["rank_rule"]["primary"]["rtol"] == 1e-9
    assert trial["defense_info"]["rank_rule"]["primary"]["rtol"] == 1e-9
    assert trial["defense_info"]["rank_rule"]["harmful"]["rtol"] == 1e-9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank_rtol": 0.0}, r"rank_rtol must be a relative threshold in \(0, 1\), got 0.0"),
        ({"rank_rtol": 1.5}, r"rank_rtol must be a relative threshold in \(0, 1\), got 1.5"),
        ({"band": 1.0}, "band factor must be a finite number > 1, got 1.0"),
        ({"band": 0.5}, "band factor must be a finite number > 1, got 0.5"),
        ({"rank_rtol": 0.05}, "rank_rtol × band must be < 1"),
    ],
)
def test_bad_rank_rule_settings_are_config_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(tiny_config(**change))


def test_a_directory_from_the_old_rank_rule_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = build_config(tiny_config(seeds=[1]))
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    path = trial_path(tmp_path, "condition_number", 1)
    record = read_json(path)
    del record["rank_rule"]  # as written before the rule was recorded
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="older rank rule") as err:
        run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert "factor-svd-v1" in str(err.value) and "new --out" in str(err.value)
    record["rank_rule"] = {"rule": "eigvalsh-k-v0"}
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="rank rule 'eigvalsh-k-v0'"):
        run_linear_experiment(cfg, tmp_path, progress=False, workers=1)


def test_a_directory_from_the_old_loss_rule_is_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = build_config(tiny_config(seeds=[1]))
    run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    path = trial_path(tmp_path, "condition_number", 1)
    record = read_json(path)
    assert record["loss_rule"] == "lossspec-v1"
    del record["loss_rule"]  # as written when binary defenses trained on BCE-with-logits
    path.write_text(json.dumps(record))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="older loss rule") as err:
        run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    assert "lossspec-v1" in str(err.value) and "new --out" in str(err.value)
    assert path.read_bytes() == before


# ------------------------------------------------------------------ quiet output, recorded facts


@pytest.mark.parametrize(("n", "deficient"), [(64, []), (8, ["K_H", "K_P"])])
def test_a_singular_k_is_an_info_line_and_a_recorded_fact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, n: int, deficient: list[str]
) -> None:
    # n = 8 rows per domain, a quarter held out: 6 training rows of 8 features, rank 6 of 8
    task_config = {"dim": 8, "n": n, "cond_primary": 50.0, "cond_harmful": 5.0}
    cfg = build_config(tiny_config(task_config=task_config, methods=["identity"], seeds=[1, 2]))
    with caplog.at_level(logging.DEBUG, logger="immunekit"):
        results = run_linear_experiment(cfg, tmp_path, progress=False, workers=1)
    said = [r for r in caplog.records if "has rank" in r.getMessage()]
    assert sorted(r.getMessage()[:3] for r in said) == deficient  # the first task's K_P and K_H
    assert all(r.levelno == logging.INFO for r in said)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    entries = results["rank_deficiency"]
    assert entries == read_json(tmp_path / "results.json")["rank_deficiency"]
    assert sorted({e["matrix"] for e in entries}) == deficient
    assert len(entries) == 2 * len(deficient)  # per seed: each seed draws its own rows
    for e in entries:
        assert e["cell"] is None and e["seed"] in (1, 2) and e["split"] in ("primary", "harmful")
        assert e["rank"] == 6 and e["dim"] == 8 and e["rows"] == 6
        assert 0 < e["rtol"] < 1 and e["sigma_last_kept"] > 0 and e["sigma_first_dropped"] == 0.0
        trial = read_json(trial_path(tmp_path, "identity", e["seed"]))
        assert {k: v for k, v in e.items() if k not in ("cell", "seed", "matrix", "split")} == trial[
            "rank_rule"
        ][e["split"]]


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", "cpu"), ("auto", "cpu"), ("cuda", None), ("tpu9", None)]
)
def test_device_is_recorded_or_refused_before_anything_is_written(
    tmp_path: Path, device: str, expected: str | None
) -> None:
    cfg = build_config(tiny_config(methods=["identity"], seeds=[1]))
    if expected is None:
        with pytest.raises(ConfigError, match=rf"--device '{device}'"):
            run_linear_experiment(cfg, tmp_path / "out", progress=False, workers=1, device=device)
        assert not (tmp_path / "out").exists()
        return
    results = run_linear_experiment(cfg, tmp_path / "out", progress=False, workers=1, device=device)
    assert results["provenance"]["device"] == expected
    assert results["provenance"]["device_requested"] == device
    assert results["provenance"]["dtype"] == "float64"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"methods": [{"key": "condition_number", "overrides": {"steps": -5}}]},
            "steps must be >= 1, got -5",
        ),
        ({"defenses": {"condition_number": {"steps": 0}}}, "steps must be >= 1, got 0"),
        ({"defenses": {"imma": {"steps": 3}}}, "no method 'imma' in this run"),
        ({"attacks": [{"key": "a", "optimizer": "adam", "steps": 0}]}, r"attacks\[a\]: budget.steps"),
        ({"seeds": [-1]}, "seeds must be integers >= 0, got -1"),
        ({"defensess": {}}, "did you mean 'defenses'"),
    ],
)
def test_bad_settings_fail_when_the_config_is_built(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(tiny_config(**change))


def test_a_defenses_section_sets_a_method_s_overrides() -> None:
    cfg = build_config(tiny_config(defenses={"condition_number": {"steps": 7}}))
    method = next(m for m in cfg.methods if m.key == "condition_number")
    assert method.overrides == {"steps": 7}
