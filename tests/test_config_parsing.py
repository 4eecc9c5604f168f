"""``--set`` and YAML files: every malformed input is a one-line ConfigError naming the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from immunekit.config import parse_set, read_yaml
from immunekit.errors import ConfigError


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["epsilon"], "--set expects key=value, got 'epsilon'"),
        (["seeds=[1, 2"], r"--set 'seeds=\[1, 2': the value '\[1, 2' is not valid YAML"),
        (["a..b=1"], "has an empty part"),
        (["=1"], "has an empty part"),
        (["a=1", "a.b=2"], "a was already set to a value"),
    ],
)
def test_bad_set_items_are_config_errors(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_set(items)
    assert "\n" not in str(err.value)


def test_set_values_are_yaml_and_keys_nest() -> None:
    assert parse_set(["a.b=1", "a.c=x", "d=[1, 2]", "e=null"]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
        "e": None,
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("seeds: [1, 2\n", r"is not valid YAML \(.* at line 2, column 1\); fix the file"),
        ("a: 1\n  b: 2\n", "is not valid YAML"),
        ("- 1\n- 2\n", "expected a YAML mapping of config keys at the top level .* got a list"),
        ("3\n", "got a int"),
        (b"\xff\xfe\x00bad", "cannot be read as UTF-8 text"),
        (None, "does not exist"),
        ("DIR", "is a folder"),
    ],
)
def test_bad_yaml_files_are_config_errors(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    path = tmp_path / "c.yaml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        read_yaml(path)
    assert "\n" not in str(err.value)


def test_an_empty_yaml_file_is_an_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# only a comment\n")
    assert read_yaml(path) == {}
