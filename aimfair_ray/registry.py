"""One registry for the named pieces of a sort (datasets, sweep kinds): ``add`` registers a piece under its
name, ``pick`` returns it or refuses an unknown name in one line that lists the known ones."""

from __future__ import annotations

from typing import Generic, TypeVar

from aimfair_ray import AimfairError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A ``dict`` of name -> piece; ``unknown`` is the refusal's format, with ``{name}`` and ``{names}``."""

    def __init__(self, unknown: str):
        super().__init__()
        self.unknown = unknown

    def add(self, name: str, piece: T) -> T:
        self[name] = piece
        return piece

    def pick(self, name: str) -> T:
        if name not in self:
            raise AimfairError(self.unknown.format(name=repr(name), names=", ".join(self)))
        return self[name]
