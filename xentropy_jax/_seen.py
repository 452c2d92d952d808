"""`SeenBefore`: which functions were passed before, to compile only those that come back."""

from __future__ import annotations

import collections
import functools
from typing import Any

import jax


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
        if _holds_tracer(function):
            # A function closing over a trace's values (a lambda over a traced matrix) is traced
            # in place: recorded, it kept that trace alive (`jax.checking_leaks` reported it).
            return False
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


def _holds_tracer(function: Any, depth: int = 3) -> bool:
    """Whether a tracer sits in ``function``'s closure, bound object or partial arguments.

    Their pytree leaves are searched in turn, ``depth`` functions deep.
    """
    if isinstance(function, jax.core.Tracer):
        return True
    if depth == 0:
        return False
    parts: list = []
    if isinstance(function, functools.partial):
        parts += [function.func, *function.args, *function.keywords.values()]
    cells = getattr(function, "__closure__", None) or ()
    for cell in cells:
        try:
            parts.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    parts += [getattr(function, "__self__", None), *(getattr(function, "__defaults__", None) or ())]
    for part in parts:
        for leaf in jax.tree.leaves(part):
            if leaf is not function and _holds_tracer(leaf, depth - 1):
                return True
    return False
