"""``immunekit config show``: the resolved config as YAML; the help's --set examples are valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from _cli_helpers import assert_one_line_error, digest, write_tiny
from immunekit.experiments.linear import config_keys


def _help_set_examples(cli) -> list[str]:
    """Every ``--set KEY=VALUE`` that ``immunekit run --help`` shows (option help and examples)."""
    code, out, _ = cli("run", "--help")
    assert code == 0
    text = " ".join(out.split())  # argparse wraps the option help across lines
    return sorted(set(re.findall(r"--set ([a-z][\w.]*=[^\s)]+)", text)))


def test_the_help_shows_set_examples(cli) -> None:
    examples = _help_set_examples(cli)
    assert "epsilon=0.05" in examples and "defenses.condition_number.steps=50" in examples


@pytest.mark.parametrize("experiment", ["house-prices", "mnist-pairs", "synthetic"])
def test_every_set_example_of_run_help_is_valid(cli, experiment: str) -> None:
    examples = _help_set_examples(cli)
    assert examples
    for item in examples:
        code, out, err = cli("config", "show", experiment, "--set", item)
        assert code == 0, (item, err)
        shown = yaml.safe_load(out)
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] == "defenses":  # merged into that method's overrides
            method = next(m for m in shown["methods"] if m["key"] == parts[1])
            assert method["overrides"][parts[2]] == yaml.safe_load(value)
        else:
            node = shown
            for part in parts:
                node = node[part]
            assert node == yaml.safe_load(value)


@pytest.mark.parametrize(
    ("argv", "check"),
    [
        (["synthetic"], {"experiment": "synthetic", "seeds": [1, 2]}),
        (["house-prices"], {"experiment": "house_prices", "paper_table": "table1_house_prices"}),
        (["mnist-pairs"], {"pairs": "all", "task_config": {"protocol": "reference"}}),
        (["synthetic", "--set", "epsilon=0.05", "--set", "seeds=[4]"], {"epsilon": 0.05, "seeds": [4]}),
        (["synthetic", "--set", "defenses.imma.steps=7"], {"imma.steps": 7}),
        (["synthetic", "--set", "verdict.min_ratio_harmful=3"], {"verdict": {"min_ratio_harmful": 3.0}}),
        (["synthetic", "--config", "TINY"], {"seeds": [1], "task_config": {"dim": 5, "n": 48}}),
        (["synthetic", "--config", "TINY", "--set", "defenses.imma.steps=2"], {"imma.steps": 2}),
    ],
)
def test_config_show_prints_the_resolved_config(cli, tmp_path: Path, argv: list[str], check: dict) -> None:
    argv = [str(write_tiny(tmp_path)) if a == "TINY" else a for a in argv]
    code, out, err = cli("config", "show", *argv)
    assert code == 0 and err == "", err
    shown = yaml.safe_load(out)
    assert set(shown) == set(config_keys()) - {"defenses"}  # every field, defenses merged into methods
    for key, value in check.items():
        if key.endswith(".steps"):
            method = next(m for m in shown["methods"] if m["key"] == key.split(".")[0])
            assert method["overrides"]["steps"] == value
        elif isinstance(value, dict):
            assert {k: shown[key][k] for k in value} == value
        else:
            assert shown[key] == value
    # the output is a complete config: fed back as --config it resolves to itself
    again = tmp_path / "shown.yaml"
    again.write_text(out)
    code, out2, err = cli("config", "show", argv[0], "--config", again)
    assert code == 0 and out2 == out, err


@pytest.mark.parametrize(
    ("command", "item"),
    [("config", "epsilom=0.1"), ("config", "nonsense=1"), ("run", "epsilom=0.1"), ("run", "foo.bar=1")],
)
def test_an_unknown_key_lists_every_top_level_key(
    cli, no_trials, results_dir: Path, tmp_path: Path, command: str, item: str
) -> None:
    before = digest(results_dir)
    if command == "config":
        code, out, err = cli("config", "show", "synthetic", "--set", item)
    else:
        args = ["--config", write_tiny(tmp_path), "--out", results_dir, "--workers", "1"]
        code, out, err = cli("run", "synthetic", *args, "--set", item)
    key = item.split("=")[0].split(".")[0]
    line = assert_one_line_error(code, out, err, f"unknown config key {key!r}")
    keys = line.split("the top-level keys are: ")[1].split(", ")
    assert keys == config_keys() and "defenses" in keys
    if key == "epsilom":
        assert "did you mean 'epsilon'" in line
    assert digest(results_dir) == before


def test_config_show_checks_defense_settings_and_budgets(cli) -> None:
    code, out, err = cli("config", "show", "house-prices", "--set", "defenses.condition_number.steps=-5")
    assert_one_line_error(code, out, err, "steps must be >= 1, got -5")
    code, out, err = cli("config", "show", "house-prices", "--set", "attacks=[{key: a, steps: 0}]")
    assert_one_line_error(code, out, err, "attacks[a]", "budget.steps")
