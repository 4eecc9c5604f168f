"""One registry per kind of component; the registry key is the only place a method is named."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from immunekit.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return a "; did you mean 'x'?" suffix for the closest choice, or a list of valid names."""
    if not choices:
        return "; nothing can be set here"
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; choose one of {sorted(choices)}"


class Registry(Generic[T]):
    """A named collection of components of one kind (defenses, attacks, tasks, ...).

    Entries are registered eagerly with :meth:`register` or lazily with :meth:`register_lazy`
    (``"module:attr"``, imported on first :meth:`get`), so optional extras stay importable
    without their dependencies.

    Example:
        >>> reg: Registry[type] = Registry("widget")
        >>> @reg.register("box")
        ... class Box: ...
        >>> reg.get("box").__name__
        'Box'
        >>> reg.get("bx")
        Traceback (most recent call last):
        ...
        immunekit.errors.ConfigError: unknown widget 'bx'; did you mean 'box'?

    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; extra keywords are kept as metadata."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._lazy.pop(name, None)
            self._meta[name] = dict(meta)
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"package.module:attr"`` to be imported when ``name`` is first requested."""
        if ":" not in target:
            raise ConfigError(f"lazy target must look like 'module:attr', got {target!r}")
        self._lazy[name] = target

    def get(self, name: str) -> T:
        """Return the entry called ``name``; unknown names raise with a suggestion."""
        if name in self._items:
            return self._items[name]
        if name in self._lazy:
            module, attr = self._lazy[name].split(":")
            obj = getattr(importlib.import_module(module), attr)
            if name not in self._items:  # importing may have registered it already
                self._items[name] = obj
                self._meta.setdefault(name, {})
            return self._items[name]
        raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}")

    def meta(self, name: str) -> dict[str, Any]:
        """Metadata given at registration (e.g. direction and unit of a metric)."""
        self.get(name)
        return dict(self._meta.get(name, {}))

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy
