"""Strict name -> component registries.

Every pluggable component (aggregation rule, attack, defense, dataset, judge) is registered by a
decorator under a lower-case name. A duplicate name raises at import time; an unknown name raises with
the list of known names, so a typo in a config never silently runs something else.

Registries fill themselves lazily: the first lookup imports the package that holds the components
(``ray_fedit.aggregators`` for aggregators, ...), so callers never depend on import order.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$|^[a-z]$")


class RegistryError(KeyError):
    """A registry lookup or registration that breaks the rules."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


class Registry(Generic[T]):
    """A name -> component table.

    Args:
        kind: what the components are, used in messages ("aggregator").
        package: module imported before the first lookup so its components register themselves.
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loaded = package is None

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator that registers a component under ``name`` with optional metadata.

        Raises:
            RegistryError: if the name is not lower_snake_case or is already taken.
        """
        if not _NAME.match(name):
            raise RegistryError(f"{self.kind} name {name!r} must be lower_snake_case")

        def decorator(obj: T) -> T:
            if name in self._items:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered (by {self._items[name]!r})"
                )
            self._items[name] = obj
            self._meta[name] = dict(meta)
            return obj

        return decorator

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)  # type: ignore[arg-type]

    def get(self, name: str) -> T:
        """Return the component registered as ``name``.

        Raises:
            RegistryError: if no component has that name; the message lists the known names.
        """
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """Metadata given at registration (e.g. contract-test exemptions)."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


AGGREGATORS: Registry[Any] = Registry("aggregator", "ray_fedit.aggregators")
ATTACKS: Registry[Any] = Registry("attack", "ray_fedit.attacks")
DEFENSES: Registry[Any] = Registry("defense", "ray_fedit.defenses")
DATASETS: Registry[Any] = Registry("dataset", "ray_fedit.data")
JUDGES: Registry[Any] = Registry("judge", "ray_fedit.judges")
