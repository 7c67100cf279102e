"""A small named registry filled by decorators, kept in registration order (that order is the table order)."""
from __future__ import annotations

from dataclasses import dataclass, field
import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from mpbench.errors import UsageError, did_you_mean

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    description: str = ""
    citation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def import_plugins(modules: Iterable[str], group: str) -> None:
    """Import ``modules`` (they register themselves by decorator), then every entry point in ``group``."""
    for name in modules:
        importlib.import_module(name)
    for ep in entry_points(group=group):
        ep.load()


class Registry(Generic[T]):
    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str, description: str = "", citation: str = "", **extra: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            doc = description or (getattr(obj, "__doc__", None) or "").strip().splitlines()[0:1]
            desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._entries[name] = Entry(name, obj, desc, citation or getattr(obj, "citation", ""), extra)
            return obj

        return deco

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a plugin for their own duration)."""
        self._entries.pop(name, None)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._loader()

    def entry(self, name: str) -> Entry[T]:
        self._ensure_loaded()
        if name not in self._entries:
            raise UsageError(f"unknown {self.kind} {name!r}: {did_you_mean(name, self._entries)}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def __contains__(self, name: str) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def names(self) -> list[str]:
        self._ensure_loaded()
        return list(self._entries)

    def entries(self) -> Iterator[Entry[T]]:
        self._ensure_loaded()
        return iter(list(self._entries.values()))
