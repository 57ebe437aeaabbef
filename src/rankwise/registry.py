"""One registry type for everything rankwise looks up by name.

Adapter methods and initialisers, compression methods and compressed layer types, and the
loaders of folder formats are each a :class:`Registry`: names are validated the same way,
a second registration of a name raises, an unknown name raises a
:class:`~rankwise.errors.ConfigError` listing the valid ones, and tests can remove what
they added (:meth:`Registry.unregister`, or ``with registry.temporary(name, obj):``).
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rankwise.errors import ConfigError

T = TypeVar("T")
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in messages, e.g. "adapter method").

    ``plugins``: modules imported on the first lookup, so entries defined in a package's
    submodules register themselves before anyone lists or fetches them.
    """

    def __init__(self, kind: str, *, plugins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._plugins = plugins
        self._loaded = not plugins
        self._entries: dict[str, T] = {}

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._plugins:
                importlib.import_module(module)

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` as ``name``; a bad name or a name taken by another entry raises."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(
                f"{self.kind} name {name!r} is invalid; use letters, digits, '_', '.' or '-', "
                "starting with a letter"
            )
        if name in self._entries and self._entries[name] is not entry:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object."""
        return lambda entry: self.register(name, entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def temporary(self, name: str, entry: T) -> Iterator[T]:
        """Register ``entry`` for the duration of a ``with`` block (tests)."""
        self.register(name, entry)
        try:
            yield entry
        finally:
            self.unregister(name)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; ConfigError listing the valid names if unknown."""
        self._load()
        if name not in self._entries:
            raise ConfigError(
                f"{self.kind} {name!r} is not registered; valid: {', '.join(self.names()) or 'none'}"
            )
        return self._entries[name]

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


__all__ = ["Registry"]
