"""Explicit plugin registries.

Built-in plugins register themselves with a decorator when their module is imported by the registry's
``loader`` (an explicit list of modules, never a package scan); where the list maps each name to its module,
``get(name)`` imports only that one (``--method gguf`` never imports torch for the torch-based methods). Third parties register through the entry-point
group named by the registry (e.g. ``llmq.quantizers``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from llmq.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(
        self,
        kind: str,
        entry_point_group: str | None = None,
        builtin_modules: tuple[str, ...] | Mapping[str, str] = (),
    ):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtin_modules = builtin_modules
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for key in (name, *aliases):
                key = key.lower()
                if key in self._items and self._items[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
                self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        mods = (
            self.builtin_modules.values()
            if isinstance(self.builtin_modules, Mapping)
            else self.builtin_modules
        )
        for mod in mods:
            importlib.import_module(mod)
        if self.entry_point_group:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self.entry_point_group):
                obj = ep.load()
                if ep.name.lower() not in self._items:
                    self._items[ep.name.lower()] = obj

    def get(self, name: str) -> T:
        key = name.lower()
        if not self._loaded and isinstance(self.builtin_modules, Mapping) and key in self.builtin_modules:
            importlib.import_module(self.builtin_modules[key])
            if key in self._items:
                return self._items[key]
        self._load()
        try:
            return self._items[name.lower()]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise BadInput(f"unknown {self.kind} {name!r} (known: {known})") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
