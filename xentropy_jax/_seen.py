"""`SeenBefore`: which functions were passed before, to compile only those that come back."""

from __future__ import annotations

import collections
from typing import Any


class SeenBefore:
    """A bounded record of hashable functions, most recent last.

    Compiling a program keyed by a function (a static argument of ``jax.jit``) pays off only
    when the same function comes back: a new function at every call (a lambda written in a
    loop) would compile every time and be kept alive, with its closure, by the program cache.
    ``SeenBefore()(f)`` is True from the second time ``f`` (or an equal function, such as the
    same bound method) is seen; unhashable functions are never recorded. The record holds the
    last ``size`` functions (so at most that many closures stay alive through it), where the
    program cache would hold every one.
    """

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._seen: collections.OrderedDict = collections.OrderedDict()

    def __call__(self, function: Any) -> bool:
        try:
            if function in self._seen:
                self._seen.move_to_end(function)
                return True
        except TypeError:  # not hashable
            return False
        self._seen[function] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False
