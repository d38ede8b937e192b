"""A small named registry: the one extension mechanism behind quantizers, estimators,
cost formulas and hardware profiles.

It rejects duplicates and wrong types at registration and suggests the nearest name on
a lookup miss. It owns nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from stefx.errors import RecipeError, did_you_mean

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    >>> r = Registry("thing")
    >>> _ = r.add("clipped", object())
    >>> r.get("clippd")
    Traceback (most recent call last):
    ...
    stefx.errors.RecipeError: unknown thing 'clippd' (did you mean 'clipped'?); registered: clipped
    """

    def __init__(self, what: str, check: Callable[[object], bool] | None = None) -> None:
        self.what = what
        self._check = check
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.what} name must be a non-empty string, got {name!r}")
        if self._check is not None and not self._check(item):
            raise TypeError(f"cannot register {item!r} as {self.what} {name!r}: wrong type")
        if name in self._items and not replace:
            raise ValueError(
                f"{self.what} {name!r} is already registered; pass replace=True to override it"
            )
        self._items[name] = item
        return item

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def deco(item: T) -> T:
            return self.add(name, item, replace=replace)

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise RecipeError(
                f"unknown {self.what} {name!r}{did_you_mean(name, self._items)}; "
                f"registered: {', '.join(sorted(self._items))}"
            ) from None

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
