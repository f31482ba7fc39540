"""Named registries (rules, model presets, tasks, data sets, layer types): one small class.

A registry is a dict that refuses to register a name twice (a plug-in that silently replaced a
built-in would change what a run computes without a word) and that answers an unknown name with
the names it knows. It imports nothing of sdfa, so every module may use it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``{name: object}`` of one ``kind`` ("rule", "model", ...)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name``; without ``obj``, a decorator that does so.

        Raises:
            ValueError: ``name`` is already registered.
        """
        if obj is None:
            return lambda target: self.register(name, target)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name; got {name!r}")
        if name in self:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({self[name]!r}); "
                "choose another name"
            )
        self[name] = obj
        return obj

    def lookup(self, name: str) -> T:
        """The object registered as ``name``, or a ValueError listing the known names."""
        if name not in self:
            raise ValueError(self.unknown(name))
        return self[name]

    def unknown(self, name) -> str:
        """The message for an unknown ``name``: the closest match and every known name."""
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted(self))
        return f"unknown {self.kind} {name!r}{hint}; available {self.kind}s: {known}"
