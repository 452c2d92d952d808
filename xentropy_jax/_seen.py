"""`Programs`: compiled programs for the functions that come back, a bounded number of them."""

from __future__ import annotations

import collections
import functools
import threading
import types
from collections.abc import Callable, Hashable
from typing import Any

import jax


class Programs:
    """A bounded, thread-safe record of compiled programs, keyed by static parts, most recent last.

    ``jax.jit`` with a function among its static arguments keeps every function it meets, with
    its closure and its compiled program, for the rest of the process: an operator built afresh
    at each outer step and used twice kept every step's matrix alive (1.3 MB each, 60 of 60 after
    60 steps). Here each key gets a program of its own, ``build(key)`` (a ``jax.jit`` of a
    function closing over the key), and only the last ``size`` keys are kept: an evicted
    program is dropped with its closure and executables.

    ``programs(key)`` is the key's program, or None: for a key that holds a function, the
    first time it is seen (compiling pays off only when the same function comes back, and a
    lambda written in a loop is new at every call) and while it closes over a tracer (recorded,
    it kept that trace alive); for an unhashable key, always. ``compile_first=True`` builds a
    program at a key's first sight (a pytree's structure, the same at every outer step).
    """

    def __init__(self, build: Callable[[Any], Callable], size: int = 16) -> None:
        self._build = build
        self._size = size
        self._programs: collections.OrderedDict = collections.OrderedDict()
        # Hashing and comparing keys runs Python code (a dataclass's __eq__), between which
        # another thread could evict the entry (a KeyError): one lock around each look-up.
        self._lock = threading.RLock()

    def __call__(self, key: Hashable, *, compile_first: bool = False) -> Callable | None:
        parts = key if isinstance(key, tuple) else (key,)
        if any(_holds_tracer(part) for part in parts):
            return None
        try:
            hash(key)
        except TypeError:
            return None
        with self._lock:
            if key in self._programs:
                self._programs.move_to_end(key)
                if self._programs[key] is None:
                    self._programs[key] = self._build(key)
            else:
                self._programs[key] = self._build(key) if compile_first else None
                if len(self._programs) > self._size:
                    self._programs.popitem(last=False)
            return self._programs[key]

    def keys(self) -> list:
        with self._lock:
            return list(self._programs)


def _holds_tracer(function: Any, depth: int = 6) -> bool:
    """Whether a tracer sits in ``function``'s closure, bound object, attributes or arguments.

    Their pytree leaves are searched in turn, ``depth`` levels deep (a bound method's matrix
    in its object's attribute, a closure over closures).
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
    if not isinstance(function, (type, types.ModuleType, types.FunctionType)):
        parts += list(getattr(function, "__dict__", {}).values())  # an object's attributes
    for part in parts:
        for leaf in jax.tree.leaves(part):
            if leaf is not function and _holds_tracer(leaf, depth - 1):
                return True
    return False
