"""The deep vision experiment on a tiny registered backbone and synthetic images (seconds, CPU)."""

from __future__ import annotations

import copy
import itertools
import json
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from immunekit.config import read_yaml
from immunekit.data.task import Task
from immunekit.defenses import DEFENSES
from immunekit.defenses.base import Defense
from immunekit.errors import ConfigError, NumericalError
from immunekit.experiments import deep_vision as dv
from immunekit.experiments.registry import RunContext, get_experiment
from immunekit.models.base import ImmunizableModel
from immunekit.models.checkpoint import MODELS, load_checkpoint, register_model

TINY = "tiny-test"
MODEL_KEY = "test_deep_vision_tiny"
SEEDS = [1, 2, 3]


class TinyNet(ImmunizableModel):
    """Conv (4 filters, 4×4 stride 4) → ReLU → Linear(196, 16) → ReLU, head Linear(16, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.extractor = nn.Sequential(
            nn.Conv2d(1, 4, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(196, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 10)

    def checkpoint_config(self) -> dict[str, Any]:
        return {}


if MODEL_KEY not in MODELS:
    register_model(MODEL_KEY)(TinyNet)


def tiny_theta0(
    cfg: dv.DeepVisionConfig, task: Any, progress: bool
) -> tuple[ImmunizableModel, dict[str, Any]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyNet()
    return model.eval(), {"source": "tiny test model, seeded init"}


class FailsOnSeedTwo(Defense):
    """A test defense: an unchanged copy, except that seed 2 'diverges' (NumericalError)."""

    name = "test_fails_on_seed_two"

    def fit(self, model: ImmunizableModel, task: Task, *, seed: int) -> ImmunizableModel:
        if seed == 2:
            raise NumericalError("test: non-finite loss at step 3; lower lr")
        self.history_, self.info_ = [], {}
        return copy.deepcopy(model)


if FailsOnSeedTwo.name not in DEFENSES:
    DEFENSES.register(FailsOnSeedTwo.name)(FailsOnSeedTwo)


if TINY not in dv.BACKBONES:
    dv.BACKBONES.register(TINY)(
        dv.Backbone(
            TINY,
            "synthetic_a",
            "synthetic_b",
            "unit",
            tiny_theta0,
            "tiny test backbone",
            folder=("L", 28, "unit"),
        )
    )


def tiny_config(**over: Any) -> dict[str, Any]:
    experiment = get_experiment("deep_vision")
    data = read_yaml(experiment.defaults_path())
    data.update(
        backbones=[TINY],
        seeds=SEEDS,
        methods=[
            "identity",
            {"key": "condition_number", "overrides": {"batch_size": 32}},
            {"key": "rill_only", "overrides": {"batch_size": 32}},
        ],
        data={"synthetic_rows": [300, 100, 100], "feature_batch_size": 128},
        rir={"groups": 4, "per_group": 10},
        probe={"epochs": 2, "batch_size": 32, "lr_grid": [1.0, 10.0, 100.0], "select_epochs": 2},
        finetune={"epochs": 0.25, "batch_size": 64},
        card=False,
    )
    data.update(over)
    return data


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMMUNEKIT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("deep_vision")
    experiment = get_experiment("deep_vision")
    results = experiment.run(
        experiment.build_config(tiny_config()), RunContext(out=out, workers=1, progress=False)
    )
    return out, results


def records(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    found = {}
    for path in (out / "trials" / TINY).glob("*.json"):
        rec = json.loads(path.read_text())
        found[(rec["method"], rec["seed"])] = rec
    return found


def test_results_json_has_the_schema(run: tuple[Path, dict[str, Any]]) -> None:
    out, results = run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["kind"] == results["kind"] == "deep_vision"
    for key in (
        "schema_version",
        "run_id",
        "config",
        "config_sha256",
        "provenance",
        "paper",
        "backbones",
        "trials",
    ):
        assert key in on_disk, key
    assert on_disk["paper"]["label"] == dv.PAPER_LABEL
    assert on_disk["config"]["backbones"] == [TINY]
    b = on_disk["backbones"][TINY]
    assert b["reference"] == "identity"
    assert set(b["methods"]) == {"identity", "condition_number", "rill_only"}
    cn = b["methods"]["condition_number"]
    for name in (*dv.TABLE3, "kappa_ratio_harmful_full", "rir_full", "probe_harmful_accuracy_final"):
        summary = cn["metrics"][name]
        assert set(summary) >= {"mean", "std", "ci_low", "ci_high", "n", "values"}, name
        assert summary["n"] == 3 and summary["ci_low"] <= summary["mean"] <= summary["ci_high"], name
    curve = cn["probe_curve"]
    assert curve["epoch"] == [0, 1, 2] and len(curve["harmful_test_accuracy"]) == 3
    checks = b["checks"]
    for name in (
        "i_above_one",
        "ii_at_most_one",
        "highest_rir_outside_band",
        "primary_accuracy_kept",
        "probe_below_theta0_every_epoch",
    ):
        assert isinstance(checks[name]["passed"], bool), name
    assert isinstance(checks["passed"], bool)
    assert len(on_disk["trials"]) == 9
    rec = records(out)[("condition_number", 1)]
    assert rec["seconds"]["trial"] > 0 and rec["seconds"]["defense"] > 0


def test_rerun_resumes_without_recomputing_a_trial(
    run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, results = run

    def fail(payload: Any) -> dict[str, Any]:
        raise AssertionError(f"trial recomputed: {payload.method} seed {payload.seed}")

    monkeypatch.setattr(dv.DeepVision, "job", staticmethod(fail))
    experiment = get_experiment("deep_vision")
    again = experiment.run(
        experiment.build_config(tiny_config()), RunContext(out=out, workers=1, progress=False)
    )
    a = results["backbones"][TINY]["methods"]["condition_number"]["metrics"]["rir_theta0"]
    b = again["backbones"][TINY]["methods"]["condition_number"]["metrics"]["rir_theta0"]
    assert a["values"] == b["values"]


def test_another_configuration_is_refused_in_the_same_folder(run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = run
    experiment = get_experiment("deep_vision")
    cfg = experiment.build_config(tiny_config(finetune={"epochs": 0.5, "batch_size": 64}))
    with pytest.raises(ConfigError, match="different configuration"):
        experiment.run(cfg, RunContext(out=out, workers=1, progress=False))


def test_table3_numbers_equal_a_hand_computation_from_the_records(run: tuple[Path, dict[str, Any]]) -> None:
    out, results = run
    recs = records(out)
    methods = results["backbones"][TINY]["methods"]
    for key in ("condition_number", "rill_only"):
        for name in dv.TABLE3:
            values = [recs[(key, s)]["metrics"][name] for s in SEEDS]
            summary = methods[key]["metrics"][name]
            assert summary["values"] == values
            assert summary["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert summary["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        # the full-data ratio: log κ differences to the same seed's θ_0 (identity) record
        full = []
        for s in SEEDS:
            mine, ref = recs[(key, s)]["metrics"], recs[("identity", s)]["metrics"]
            li = mine["log_kappa_harmful_full"] - ref["log_kappa_harmful_full"]
            lii = mine["log_kappa_primary_full"] - ref["log_kappa_primary_full"]
            full.append(math.exp(li - lii))
        assert methods[key]["metrics"]["rir_full"]["mean"] == pytest.approx(statistics.fmean(full), rel=1e-9)
        # RIR_θ0 is the mean of the per-group ratios, not mean(i) / mean(ii)
        rec = recs[(key, 1)]
        assert rec["metrics"]["rir_theta0"] == pytest.approx(
            statistics.fmean(rec["rir_groups"]["rir"]), rel=1e-12
        )
        epoch1 = [recs[(key, s)]["probe"]["harmful_test_accuracy"][1] for s in SEEDS]
        assert methods[key]["probe_curve"]["harmful_test_accuracy"][1]["mean"] == pytest.approx(
            statistics.fmean(epoch1)
        )


def test_identity_is_the_theta0_row_with_every_ratio_one(run: tuple[Path, dict[str, Any]]) -> None:
    _, results = run
    ident = results["backbones"][TINY]["methods"]["identity"]["metrics"]
    for name in ("kappa_ratio_harmful", "kappa_ratio_primary", "rir_theta0", "rir_full"):
        assert ident[name]["values"] == pytest.approx([1.0] * 3, rel=1e-12), name
    checks = results["backbones"][TINY]["checks"]
    assert checks["primary_accuracy_kept"]["reference"] == ident["primary_test_accuracy"]["mean"]


def test_probe_lr_is_chosen_once_on_theta0_and_used_by_every_method(run: tuple[Path, dict[str, Any]]) -> None:
    out, results = run
    choice = results["backbones"][TINY]["probe_lr"]
    grid = choice["grid"]
    assert [row["lr"] for row in grid] == [1.0, 10.0, 100.0]
    stable = [row["lr"] for row in grid if row["stable"]]
    assert stable and choice["lr"] == max(stable)
    for row in grid:  # the rule, re-checked from the recorded losses
        losses = row["train_loss"]
        assert row["stable"] == all(b < a for a, b in itertools.pairwise(losses))
    assert {rec["probe_lr"] for rec in records(out).values()} == {choice["lr"]}
    assert {rec["probe"]["lr"] for rec in records(out).values()} == {choice["lr"]}


def test_each_immunized_model_is_saved_and_loads(run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = run
    path = out / "models" / TINY / "condition_number--seed2.safetensors"
    model = load_checkpoint(path)
    assert isinstance(model, TinyNet)
    assert sorted(p.name for p in (out / "models" / TINY).iterdir()) == sorted(
        f"{m}--seed{s}.safetensors" for m in ("identity", "condition_number", "rill_only") for s in SEEDS
    )


def test_summary_is_a_plain_text_table3_led_by_i(run: tuple[Path, dict[str, Any]]) -> None:
    _, results = run
    text = get_experiment("deep_vision").summary(results)
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.index("(i)") < header.index("(ii)") < header.index("RIR_θ0") < header.index("D_P acc")
    assert "condition_number" in text and "done-when" in text


def test_without_identity_a_theta0_reference_trial_is_added(tmp_path: Path, cache: Path) -> None:
    experiment = get_experiment("deep_vision")
    data = tiny_config(
        seeds=[1],
        methods=[{"key": "condition_number", "overrides": {"batch_size": 32}}],
        finetune={"enabled": False},
        probe={"epochs": 1, "batch_size": 32, "lr_grid": [1.0, 10.0], "select_epochs": 2, "own_lr": False},
    )
    results = experiment.run(
        experiment.build_config(data), RunContext(out=tmp_path, workers=1, progress=False)
    )
    assert (tmp_path / "trials" / TINY / "theta0--seed1.json").is_file()
    b = results["backbones"][TINY]
    assert b["reference"] == "theta0" and list(b["methods"]) == ["theta0", "condition_number"]
    assert b["methods"]["theta0"]["metrics"]["rir_theta0"]["values"] == [pytest.approx(1.0)]
    assert not (tmp_path / "models" / TINY / "theta0--seed1.safetensors").exists()


def test_a_diverging_defense_is_a_failed_trial_not_a_crash(tmp_path: Path, cache: Path) -> None:
    experiment = get_experiment("deep_vision")
    data = tiny_config(
        methods=["identity", {"key": "flaky", "defense": FailsOnSeedTwo.name}],
        finetune={"enabled": False},
        probe={"epochs": 1, "batch_size": 32, "lr": 1.0},
        checks={"method": "flaky"},
    )
    results = experiment.run(
        experiment.build_config(data), RunContext(out=tmp_path, workers=1, progress=False)
    )
    flaky = results["backbones"][TINY]["methods"]["flaky"]
    assert [f["seed"] for f in flaky["failed_seeds"]] == [2]
    assert "non-finite loss at step 3" in flaky["failed_seeds"][0]["message"]
    rir = flaky["metrics"]["rir_theta0"]
    assert rir["values"] == [pytest.approx(1.0), None, pytest.approx(1.0)] and rir["n"] == 2
    assert rir["censored"] == 1
    checks = results["backbones"][TINY]["checks"]
    assert not checks["no_failed_seeds"]["passed"] and not checks["passed"]
    assert not (tmp_path / "models" / TINY / "flaky--seed2.safetensors").exists()
    assert "failed on seed(s) [2]" in experiment.summary(results)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"backbones": ["resnt"]}, "unknown backbone 'resnt'; did you mean 'resnet'"),
        ({"bakcbones": ["resnet"]}, "unknown config key 'bakcbones'; did you mean 'backbones'"),
        ({"probe": {"epochz": 3}}, "probe.epochz: unknown key; did you mean 'epochs'"),
        ({"methods": [{"key": "condition_number", "overrides": {"batch_size": 1}}]}, "batch_size"),
        ({"methods": [{"key": "theta0", "defense": "identity"}]}, "reserved"),
        ({"methods": ["conditon_number"]}, "did you mean 'condition_number'"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"primary_dir": "/nowhere"}, "give both folders"),
        ({"defenses": {"opt_kappa": {"lr": 0.1}}}, "no method 'opt_kappa' in this run"),
        ({"backbone_defenses": {"resnt": {}}}, "unknown backbone 'resnt'"),
        ({"probe": {"attack": "full_finetune"}}, "not a frozen-feature probe"),
        ({"rir": {"groups": 0}}, "rir.groups"),
    ],
)
def test_bad_configs_fail_with_the_value_and_the_fix(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_experiment("deep_vision").build_config(tiny_config(**over))


def test_a_harmful_batch_below_two_rows_names_the_method_and_backbone() -> None:
    bad = tiny_config(methods=[{"key": "rill_only", "overrides": {"batch_size": 1}}])
    with pytest.raises(ConfigError, match=r"rill_only.*tiny-test.*batch_size"):
        get_experiment("deep_vision").build_config(bad)


def test_backbone_names_take_dashes_or_underscores() -> None:
    cfg = get_experiment("deep_vision").build_config(
        tiny_config(backbones=["digit_cnn", "efficientnet-lite0"])
    )
    assert cfg.backbones == ("digit-cnn", "efficientnet-lite0")


def test_probe_stability_rule() -> None:
    assert dv.probe_is_stable([2.3, 2.0, 1.9])
    assert not dv.probe_is_stable([2.3, 2.0, 2.0])  # must decrease every epoch
    assert not dv.probe_is_stable([2.3, float("nan")]) and not dv.probe_is_stable([2.3, None])


def test_done_when_checks_read_the_means_and_name_failures() -> None:
    def summary(values: list[float]) -> dict[str, Any]:
        return dv.summarise("x", values)

    def method(i: float, ii: float, rir: float, acc: float, probe: list[float], diverged: int = 0) -> dict:
        return {
            "metrics": {
                "kappa_ratio_harmful": summary([i, i]),
                "kappa_ratio_primary": summary([ii, ii]),
                "rir_theta0": summary([rir, rir]),
                "rir_band_low": summary([rir, rir]),
                "rir_band_high": summary([rir, rir]),
                "rir_band_spread": summary([1.0, 1.0]),
                "primary_test_accuracy": summary([acc, acc]),
            },
            "threshold_sensitive_seeds": 0,
            "probe_curve": {
                "harmful_test_accuracy": [summary([v, v]) for v in probe],
                "nonfinite_seeds": diverged,
            },
        }

    cfg = dv.build_config(tiny_config())
    methods = {
        "identity": method(1.0, 1.0, 1.0, 0.99, [0.1, 0.6, 0.7]),
        "condition_number": method(2.0, 0.8, 2.5, 0.985, [0.1, 0.5, 0.6]),
        "rill_only": method(3.0, 2.0, 1.5, 0.97, [0.1, 0.55, 0.72]),
    }
    checks = dv.done_when_checks(cfg, methods, "identity")
    assert checks["passed"] and checks["probe_below_theta0_every_epoch"]["epochs_not_below"] == []
    # a threshold-sensitive rival's huge band-edge RIR is listed, not compared; a robust one counts
    methods["opt_kappa"] = method(5.0, 3.0, 1.2, 0.98, [0.1, 0.6, 0.7])
    methods["opt_kappa"]["metrics"]["rir_band_low"] = summary([1e24, 1e24])
    methods["opt_kappa"]["threshold_sensitive_seeds"] = 2
    checks = dv.done_when_checks(cfg, methods, "identity")
    assert checks["highest_rir_theta0"]["passed"]
    assert checks["highest_rir_theta0"]["excluded_at_band_edges"] == ["opt_kappa"]
    methods["opt_kappa"]["threshold_sensitive_seeds"] = 0
    assert not dv.done_when_checks(cfg, methods, "identity")["highest_rir_theta0"]["passed"]
    del methods["opt_kappa"]
    methods["condition_number"]["probe_curve"]["nonfinite_seeds"] = 1
    assert not dv.done_when_checks(cfg, methods, "identity")["probe_below_theta0_every_epoch"]["passed"]
    methods["condition_number"] = method(2.0, 1.2, 1.2, 0.97, [0.1, 0.55, 0.75])
    checks = dv.done_when_checks(cfg, methods, "identity")
    assert not checks["ii_at_most_one"]["passed"] and checks["ii_at_most_one"]["value"] == pytest.approx(1.2)
    assert not checks["highest_rir_theta0"]["passed"]
    assert not checks["primary_accuracy_kept"]["passed"]
    assert checks["primary_accuracy_kept"]["drop"] == pytest.approx(0.02)
    assert checks["probe_below_theta0_every_epoch"]["epochs_not_below"] == [2]
    assert not checks["passed"]


def image_folder(root: Path, seed: int, per_class: tuple[int, int] = (6, 2)) -> Path:
    """``root/{train,test}/<class>/<i>.png``: 10 classes of 28×28 grayscale images (class-dependent)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(28, 28, generator=gen) * 60 + c * 20).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i}.png")
    return root


def test_full_scale_reads_class_per_folder_images(tmp_path: Path, cache: Path) -> None:
    primary = image_folder(tmp_path / "primary", seed=0)
    harmful = image_folder(tmp_path / "harmful", seed=1)
    experiment = get_experiment("deep_vision")
    data = tiny_config(
        seeds=[1],
        methods=["identity", {"key": "condition_number", "overrides": {"batch_size": 16}}],
        rir={"groups": 2, "per_group": 5},
        probe={"epochs": 1, "batch_size": 16, "lr": 1.0},
        finetune={"enabled": False},
        primary_dir=str(primary),
        harmful_dir=str(harmful),
    )
    out = tmp_path / "out"
    results = experiment.run(experiment.build_config(data), RunContext(out=out, workers=1, progress=False))
    info = results["backbones"][TINY]["task"]["info"]
    assert info["source"] == "image_folder" and info["mode"] == "L" and info["size"] == 28
    assert "12 harmful training images held out" in info["val_harmful"]  # min(10000, 60 // 5)
    rec = json.loads((out / "trials" / TINY / "condition_number--seed1.json").read_text())
    assert rec["full_data"]["harmful_rows"] == 48 and rec["full_data"]["primary_rows"] == 60
    assert results["backbones"][TINY]["methods"]["identity"]["metrics"]["rir_theta0"]["values"] == [
        pytest.approx(1.0)
    ]


def test_full_scale_refuses_a_backbone_without_a_folder_setting(tmp_path: Path) -> None:
    cfg = get_experiment("deep_vision").build_config(
        tiny_config(backbones=["resnet"], primary_dir=str(tmp_path), harmful_dir=str(tmp_path))
    )
    with pytest.raises(ConfigError, match=r"theta0\.pretrained_dir"):
        dv.theta0_resnet(cfg, None, False)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.assets
def test_real_resnet_on_capped_mnist_and_fashion_mnist(tmp_path: Path) -> None:
    """A quick look on the real setting (rows capped: not a result), end to end with the card."""
    experiment = get_experiment("deep_vision")
    data = read_yaml(experiment.defaults_path())
    data.update(
        backbones=["resnet"],
        seeds=[1, 2],
        methods=["identity", "condition_number"],
        data={"max_train_rows": 3000, "max_eval_rows": 1000},
        finetune={"epochs": 0.5},
        card_options={"attacks": ["linear_probe"], "budget": {"steps": 20, "eval_every": 10}, "seeds": [0]},
    )
    results = experiment.run(
        experiment.build_config(data), RunContext(out=tmp_path, workers=1, progress=False)
    )
    b = results["backbones"]["resnet"]
    assert b["theta0"]["test_accuracy"] > 0.98
    assert b["methods"]["identity"]["metrics"]["primary_test_accuracy"]["mean"] > 0.98
    assert (tmp_path / "cards" / "resnet" / "report.md").is_file()
    assert results["cards"]["resnet"]["verdict"] is not None
