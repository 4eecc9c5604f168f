"""The mlac-text experiment on a tiny BERT and a synthetic aligned task (smoke profile, seconds, CPU)."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from immunekit.cli.main import build_parser
from immunekit.cli.run import resolve
from immunekit.config import read_yaml
from immunekit.data.discrim_text import DiscrimSplit, DiscrimText, build_task
from immunekit.errors import ConfigError
from immunekit.experiments import mlac_text as mt
from immunekit.experiments.evaluate import load_model
from immunekit.experiments.registry import RunContext, get_experiment
from immunekit.models.text_encoder import BertTextClassifier

SOURCE = "test-mlac-toy"
SIZES = {"defender_train": 48, "defender_val": 12, "attack_train": 24, "attack_val": 18, "attack_test": 18}
SEEDS = [0, 1, 2]
NS = [4, 8]


def toy_source(cfg: mt.MlacTextConfig) -> DiscrimText:
    """Aligned splits of 6-token rows: token 20 + scenario (4 classes), token 30 + gender (3 classes)."""
    gen = torch.Generator().manual_seed(cfg.data.split_seed)
    splits, offset = {}, 0
    for name, n in SIZES.items():
        scenario = torch.arange(n) % 4
        gender = torch.randint(0, 3, (n,), generator=gen)
        x = torch.randint(3, 20, (n, 6), generator=gen)
        x[:, 1] = 20 + scenario
        x[:, 2] = 30 + gender
        x[::3, 5] = -1  # some right padding
        ids = tuple(f"toy:{offset + i}" for i in range(n))
        offset += n
        splits[name] = DiscrimSplit(name=name, ids=ids, x=x, scenario=scenario, gender=gender)
    info = {"classes_primary": 4, "classes_harmful": 3}
    return DiscrimText(splits=splits, task=build_task(splits, version="toy-1", info=info), info=info)


if SOURCE not in mt.SOURCES:
    mt.SOURCES.register(SOURCE)(toy_source)

SMOKE: dict[str, Any] = {
    "profile": "smoke",
    "n_values": NS,
    "seeds": SEEDS,
    "encoder": "tiny",
    "tiny": {
        "vocab_size": 40,
        "max_position_embeddings": 16,
        "hidden_size": 16,
        "layers": 1,
        "heads": 2,
        "intermediate_size": 32,
    },
    "data": {"source": SOURCE},
    "defense": {
        "overrides": {"val_every": 1, "val_batches": 1, "inner_batch_sizes": [4], "outer_batch_size": 4}
    },
    "attack": {"batch_sizes": [2, 4]},
    "desired_probe": {"batch_size": 8, "feature_batch_size": 16},
    "n_boot": 200,
}


def smoke_config(**changes: Any) -> mt.MlacTextConfig:
    data = copy.deepcopy(SMOKE)
    data.update(changes)
    return get_experiment("mlac-text").build_config(data)


def run(out: Path, cfg: mt.MlacTextConfig | None = None) -> dict[str, Any]:
    experiment = get_experiment("mlac-text")
    return experiment.run(cfg or smoke_config(), RunContext(out=out, progress=False, workers=1))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("mlac_text")
    with torch.random.fork_rng(devices=[]):
        results = run(out)
    yield out, results


def test_the_run_produces_every_trial_and_model(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, results = smoke
    roles = list(mt.ROLES)
    expected = {f"trials/models/{r}--seed{s}" for r in roles for s in SEEDS}
    expected |= {f"trials/desired/{r}--seed{s}" for r in roles for s in SEEDS}
    expected |= {f"trials/attacks/{r}/n{n}--seed{s}" for r in roles for s in SEEDS for n in NS}
    assert set(results["trials"]) == expected
    assert all((out / f"{key}.json").is_file() for key in expected)
    assert {p.name for p in (out / "models").iterdir()} == {
        f"{r}--seed{s}.safetensors" for r in roles for s in SEEDS
    }
    assert json.loads((out / "results.json").read_text())["kind"] == mt.KIND
    from immunekit.attacks import base

    assert base.EVAL_BATCH_SIZE == 1024  # the trials' 64-row evaluation chunks were put back


def test_a_second_run_loads_every_record_without_recomputing(
    smoke: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, first = smoke

    def recomputed(payload: Any) -> dict[str, Any]:
        raise AssertionError(f"trial recomputed: {payload}")

    monkeypatch.setattr(mt.MlacText, "job", staticmethod(recomputed))
    again = run(out)
    assert again["cost"] == first["cost"] and again["desired"] == first["desired"]


def test_the_record_has_the_expected_keys_and_no_text(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, results = smoke
    assert {
        "schema_version", "kind", "roles", "n_values", "seeds", "config", "config_sha256", "resolved",
        "provenance", "data", "protocol", "baselines", "cost", "desired", "training", "trials",
    } <= set(results)  # fmt: skip
    for role in mt.ROLES:
        for n in NS:
            e = results["cost"][role][str(n)]
            assert {"test_accuracy", "val_accuracy", "chosen", "attack_choice", "gap", "recovery"} <= set(e)
            assert e["test_accuracy"]["n"] == len(SEEDS)
            assert all(c["attack"] in mt.ATTACK_NAMES for c in e["chosen"])
            assert (e["gap"] is None) == (role == "random")
    assert results["baselines"]["chance"] == pytest.approx(1 / 3)
    assert results["training"]["mlac"]["inner_steps"] == 1 and not results["training"]["random"]["trained"]
    attack = json.loads((out / "trials/attacks/mlac/n4--seed0.json").read_text())
    assert attack["chosen"]["lr"] > 0 and len(attack["reruns"]) == 2 and len(attack["rows"]) == 4
    # no token rows (the only "text" the toy data has) anywhere in the results or a trial record
    rows = {tuple(r) for s in toy_source(smoke_config()).splits.values() for r in s.x.tolist()}
    for path in [out / "results.json", *out.glob("trials/**/*.json")]:
        lists: list[Any] = []
        _walk(json.loads(path.read_text()), lists)
        assert not any(tuple(v) in rows for v in lists if all(isinstance(i, int) for i in v)), path


def _walk(node: Any, lists: list[Any]) -> None:
    if isinstance(node, dict):
        for v in node.values():
            _walk(v, lists)
    elif isinstance(node, list):
        lists.append(node)
        for v in node:
            _walk(v, lists)


def _summaries(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "mean" in node and "ci_low" in node:
            yield node
        for v in node.values():
            yield from _summaries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _summaries(v)


def test_ci_bounds_bracket_the_means(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke
    checked = 0
    for s in _summaries(results):
        if s["ci_low"] is not None:
            assert s["ci_low"] - 1e-12 <= s["mean"] <= s["ci_high"] + 1e-12, s
            checked += 1
    assert checked >= 2 * len(mt.ROLES) * len(NS)


def test_gap_and_recovery_follow_their_definitions(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, results = smoke
    cost = results["cost"]
    for n in map(str, NS):
        rand, pre = (
            cost["random"][n]["test_accuracy"]["values"],
            cost["pretrained"][n]["test_accuracy"]["values"],
        )
        mlac = cost["mlac"][n]["test_accuracy"]["values"]
        gap = cost["mlac"][n]["gap"]
        assert gap["values"] == pytest.approx([a - b for a, b in zip(mlac, rand, strict=True)])
        den = sum(pre) / 3 - sum(rand) / 3
        rec = cost["mlac"][n]["recovery"]
        if abs(den) > 1e-9:
            assert rec["value"] == pytest.approx(gap["mean"] / den)
        assert cost["pretrained"][n]["recovery"]["value"] in (None, pytest.approx(1.0))


def test_attack_pools_are_nested_over_n_and_shared_by_roles(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, _ = smoke
    small = json.loads((out / "trials/attacks/ac/n4--seed1.json").read_text())["rows"]
    large = json.loads((out / "trials/attacks/ac/n8--seed1.json").read_text())["rows"]
    other = json.loads((out / "trials/attacks/random/n4--seed1.json").read_text())["rows"]
    assert set(small) <= set(large) and small == other
    assert small != json.loads((out / "trials/attacks/ac/n4--seed2.json").read_text())["rows"]


def test_the_saved_mlac_model_loads_through_evaluate(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, _ = smoke
    model, meta = load_model(out / "models" / "mlac--seed0.safetensors")
    assert isinstance(model, BertTextClassifier) and model.head.out_features == 7
    assert meta["role"] == "mlac" and meta["preset"] == "mlac" and meta["desired_columns"] == 4
    assert meta["reference_model"] == "pretrained--seed0.safetensors"
    assert (out / "models" / meta["reference_model"]).is_file()  # beside the model: evaluate's default
    assert "task" not in meta  # a test source: only discrim-eval names a registered task


def test_the_report_renders_every_role(smoke: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from immunekit.reports import write_report

    out, _ = smoke
    report = write_report(out / "results.json", tmp_path)
    text = report.read_text()
    for name in ("Random", "Pretrained", "Desired-tuned", "AC", "MLAC", "chance", "majority"):
        assert name in text
    assert (tmp_path / "harmful_vs_n.png").is_file()
    summary = get_experiment("mlac-text").summary(json.loads((out / "results.json").read_text()))
    assert all(r in summary for r in mt.ROLES)


def test_row_caps_take_a_fixed_seeded_subset(tmp_path: Path) -> None:
    cfg = smoke_config(attack={"batch_sizes": [2, 4], "val_rows": 5, "test_rows": 6})
    data = toy_source(cfg)
    a, b = (mt.attack_task(cfg, data, mt.attack_rows(24, 4, s)) for s in (0, 1))
    assert len(a.eval_harmful) == 6 and len(a.val_harmful or ()) == 5 and len(a.attack) == 4
    assert a.eval_harmful.ids == b.eval_harmful.ids != data["attack_test"].ids[:6]
    assert a.eval_primary is a.eval_harmful  # only sizes the fresh head: C_h outputs
    with pytest.raises(ConfigError, match="exceeds the 18 rows of attack_test"):
        run(tmp_path / "out", smoke_config(attack={"test_rows": 19}))
    assert not (tmp_path / "out").exists()


def test_a_trial_is_reproducible_whatever_ran_before(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, _ = smoke
    stored = json.loads((out / "trials/attacks/pretrained/n8--seed1.json").read_text())
    payload = mt.AttackTrial(
        smoke_config(), "pretrained", 1, 8, str(out / "models/pretrained--seed1.safetensors")
    )
    torch.rand(7)  # move the global generator: dropout-free here, but the record must not care
    again = mt.run_trial(payload)
    assert again["reruns"] == stored["reruns"] and again["chosen"] == stored["chosen"]


def test_a_different_configuration_is_refused(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, _ = smoke
    with pytest.raises(ConfigError, match="different configuration"):
        run(out, smoke_config(attack={"batch_sizes": [2]}))


# --- configuration ------------------------------------------------------------------------------


def test_an_unknown_role_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown role 'mlca'; did you mean 'mlac'"):
        smoke_config(roles=["random", "mlca"])


@pytest.mark.parametrize("n", [0, -5])
def test_a_pool_size_below_one_is_refused(n: int) -> None:
    with pytest.raises(ConfigError, match="integer >= 1"):
        smoke_config(n_values=[n, 4])


def test_n_larger_than_the_attack_pool_is_refused_before_any_trial(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"n_values \[100\] exceed the attack pool: attack_train has 24 rows"
    ):
        run(tmp_path / "out", smoke_config(n_values=[4, 100]))
    assert not (tmp_path / "out").exists()


def test_profiles_fill_unset_settings_and_explicit_fields_win() -> None:
    cfg = mt.build_config({})
    assert cfg.resolved() == mt.PROFILE_SETTINGS["quick"]
    assert (cfg.setting("inner_steps"), cfg.setting("outer_steps"), cfg.setting("n_trials")) == (4, 2000, 15)
    faithful = mt.build_config({"profile": "faithful", "defense": {"inner_steps": 2}})
    assert faithful.setting("inner_steps") == 2 and faithful.setting("steps_max") == 1000
    mlac = mt.defense_config(faithful, "mlac")
    assert (mlac.inner_steps, mlac.outer_steps, mlac.lambda_lin, mlac.first_order) == (2, 5000, 1.0, False)
    assert mt.defense_config(faithful, "ac").inner_steps == 0


def test_first_order_samples_the_inner_lr() -> None:
    cfg = mt.build_config({"defense": {"first_order": True}})
    mlac = mt.defense_config(cfg, "mlac")
    assert mlac.first_order and mlac.inner_lr == "sample"
    with pytest.raises(ConfigError, match="inner_lr"):
        mt.build_config({"defense": {"first_order": True, "roles": {"mlac": {"inner_lr": "meta"}}}})


def test_cli_options_reach_the_config() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "mlac-text",
            "--inner-steps",
            "2",
            "--first-order",
            "--encoder",
            "tiny",
            "--roles",
            "random,mlac",
        ]
    )
    cfg = mt.build_config(resolve(args))
    assert (cfg.defense.inner_steps, cfg.defense.first_order, cfg.encoder) == (2, True, "tiny")
    assert cfg.roles == ("random", "mlac")
    bad = build_parser().parse_args(["run", "mlac-text", "--inner-steps", "four"])
    with pytest.raises(ConfigError, match="--inner-steps expects an integer"):
        resolve(bad)


def test_the_packaged_defaults_are_the_quick_protocol() -> None:
    experiment = get_experiment("mlac-text")
    cfg = experiment.build_config(read_yaml(experiment.defaults_path()))
    assert cfg.roles == mt.ROLES and cfg.n_values == (20, 50, 100, 200) and cfg.seeds == (0, 1, 2)
    search = mt.search_config(cfg, "x")
    assert (search.lr_min, search.lr_max, search.steps, search.steps_max) == (1e-5, 1e-2, 100, 500)
    assert search.batch_sizes == (12, 24, 48) and search.optimizers == ("adam",) and search.n_trials == 15
    assert search.attack_overrides == {"full_finetune": {"reset_head": True}}
    assert math.isclose(cfg.attack.lr_max, 1e-2)


def test_a_model_changed_after_its_trial_is_refused(
    smoke: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import shutil

    src, _ = smoke
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    role, seed = mt.ROLES[0], SEEDS[0]
    model = out / "models" / f"{role}--seed{seed}.safetensors"
    other = out / "models" / f"{mt.ROLES[1]}--seed{seed}.safetensors"
    shutil.copyfile(other, model)  # a valid checkpoint, but not the one this trial saved
    (out / "trials" / "desired" / f"{role}--seed{seed}.json").unlink()  # a trial that must load it
    with pytest.raises(ConfigError, match="differs from the one its trial saved"):
        run(out)
