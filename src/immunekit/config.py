"""Frozen config dataclasses and strict loading (unknown keys raise with a suggestion).

Precedence is ``--set key=value`` > YAML file > dataclass defaults, decided on whether a value was
*given*, never on its truthiness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from immunekit.errors import ConfigError
from immunekit.registry import did_you_mean

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return load_config(tp, value, where=where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def load_config(cls: type[C], data: Mapping[str, Any] | None, *, where: str = "") -> C:
    """Build the frozen dataclass ``cls`` from ``data``, strictly.

    Args:
        cls: a dataclass type whose fields all have defaults.
        data: mapping of field name to value; ``None`` means all defaults.
        where: dotted path used in error messages (e.g. ``"defense"``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key (with a did-you-mean suggestion) or a wrongly typed value.

    Example:
        >>> @dataclasses.dataclass(frozen=True, kw_only=True)
        ... class Budget:
        ...     steps: int = 10
        >>> load_config(Budget, {"steps": 3})
        Budget(steps=3)
        >>> load_config(Budget, {"stepz": 3}, where="budget")
        Traceback (most recent call last):
        ...
        immunekit.errors.ConfigError: budget.stepz: unknown key; did you mean 'steps'?

    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key{did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where + ': ' if where else ''}{exc}") from None


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise unless ``value`` is an int (not a bool) ``>= minimum``; the message names ``name`` and the bound.

    Example:
        >>> check_int("epochs", 0)
        Traceback (most recent call last):
        ...
        immunekit.errors.ConfigError: epochs=0 is invalid; use an integer >= 1

    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {minimum}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON view of a (nested) config dataclass; tuples become lists."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a resolved config (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars.

    Raises:
        ConfigError: an item without ``=``, an empty key part (``a..b``), a value that is not
            valid YAML, or a key set both as a value and as a section (``a=1`` and ``a.b=2``).

    Example:
        >>> parse_set(["defense.steps=5", "seeds=[0, 1]"])
        {'defense': {'steps': 5}, 'seeds': [0, 1]}

    """
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}; e.g. --set defense.steps=100")
        key, raw = item.split("=", 1)
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(
                f"--set {item!r}: the key {key.strip()!r} has an empty part; write dotted keys like "
                "defenses.condition_number.steps=50"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"--set {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(exc)}); quote it "
                "or fix the brackets, e.g. --set seeds=[1,2]"
            ) from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])} was already set to a value, so it "
                    "cannot also take sub-keys; drop one of the two --set options"
                )
            node = child
        node[parts[-1]] = value
    return out


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what the YAML parser objected to, and where (1-based line and column)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``override`` into ``base`` (override wins where a key is given)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Raises:
        ConfigError: the file is missing, unreadable, not valid YAML or not a mapping at the top
            level; the one-line message names the file, the problem and the fix.

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "bad.yaml"
        >>> _ = bad.write_text("seeds: [1, 2")
        >>> read_yaml(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        immunekit.errors.ConfigError: ...bad.yaml is not valid YAML (... at line 1, column 13); fix...

    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"config file {str(path)!r} cannot be read as UTF-8 text ({reason}); pass a YAML file"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not valid YAML ({_yaml_problem(exc)}); fix the file, e.g. check the indentation "
            "and the brackets there"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of config keys at the top level (e.g. 'seeds: [1, 2]'), "
            f"got a {type(data).__name__}; write one key: value per line"
        )
    return data
