"""`Programs`: compiled programs for the functions that come back, a bounded number of them."""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import types
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import jax
import numpy as np


class Programs:
    """A bounded, thread-safe record of compiled programs, keyed by static parts, most recent last.

    ``jax.jit`` with a function among its static arguments keeps every function it meets, with
    its closure and its compiled program, for the rest of the process: an operator built afresh
    at each outer step and used twice kept every step's matrix alive (1.3 MB each, 60 of 60 after
    60 steps). Here each key gets a program of its own, ``build(key)`` (a ``jax.jit`` of a
    function closing over the key), and only the last ``size`` programs are kept: an evicted
    program is dropped with its closure and executables.

    ``programs(key)`` is the key's program, or None: for a key seen for the first time
    (compiling pays off only when the same function comes back, and a lambda written in a loop
    is new at every call; first sightings have a record of their own, so that they do not
    evict programs), for a key that closes over a tracer (recorded, it kept that trace alive),
    and for an unhashable key. ``compile_first=True`` builds a program at a key's first sight
    (a pytree's structure, the same at every outer step).
    """

    def __init__(self, build: Callable[[Any], Callable], size: int = 16) -> None:
        self._build = build
        self._size = size
        self._programs: collections.OrderedDict = collections.OrderedDict()
        self._seen: collections.OrderedDict = collections.OrderedDict()
        # Hashing and comparing keys runs Python code (a dataclass's __eq__), between which
        # another thread could evict the entry (a KeyError): one lock around each look-up.
        self._lock = threading.RLock()

    def __call__(self, key: Hashable, *, compile_first: bool = False) -> Callable | None:
        parts = key if isinstance(key, tuple) else (key,)
        if holds_tracer(*parts):
            return None
        try:
            hash(key)
        except TypeError:
            return None
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
            if not compile_first and self._seen.pop(key, False) is False:
                _remember(self._seen, key, True, self._size)
                return None
            program = self._build(key)
            _remember(self._programs, key, program, self._size)
            return program

    def keys(self) -> list:
        """The keys recorded: seen once, then those with a program."""
        with self._lock:
            return [*self._seen, *self._programs]

    def __len__(self) -> int:
        """The number of programs kept."""
        return len(self._programs)


def _remember(record: collections.OrderedDict, key: Hashable, value: Any, size: int) -> None:
    record[key] = value
    if len(record) > size:
        record.popitem(last=False)


def holds_tracer(*values: Any, budget: int = 20_000) -> bool:
    """Whether a tracer sits in ``values`` or in what their functions and objects hold.

    Searched breadth first: pytree leaves and containers, a function's closure, bound object,
    partial arguments and defaults, an object's attributes (a bound method's matrix), up to
    ``budget`` objects (a larger structure is looked at in part, at bounded cost, and counts
    as holding none). With a budget of 2,000, an operator whose object also held a list of
    3,000 entries hid the matrix it differentiated: reverse mode failed inside
    ``lax.while_loop`` and forward mode returned CG's own wrong derivative. Counting a cut-off
    search as holding one instead made every eager call on such an object (a model of
    thousands of parameter leaves, say) skip `Programs` and compile again: 2 ms → 0.17 s an
    eager `cg`, 2 ms → 0.47 s a Sophia refresh. Whatever cannot be read (a proxy whose
    attributes raise) counts as holding none.
    """
    queue, seen = collections.deque(values), set()
    while queue and budget > 0:
        value = queue.popleft()
        budget -= 1
        if isinstance(value, jax.core.Tracer):
            return True
        if id(value) in seen or isinstance(value, (jax.Array, np.ndarray, str, bytes, int, float)):
            continue
        seen.add(id(value))
        try:
            queue.extend(itertools.islice(_held_by(value), budget))
        except Exception:  # an attribute that raises: no tracer to be seen there
            continue
    return False


def _held_by(value: Any) -> Iterable:
    """What ``value`` holds, one level down."""
    if isinstance(value, dict):
        return iter(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return iter(value)
    held: list = []
    if isinstance(value, functools.partial):
        held += [value.func, *value.args, *value.keywords.values()]
    for cell in getattr(value, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    held += [getattr(value, "__self__", None), *(getattr(value, "__defaults__", None) or ())]
    if not isinstance(value, (type, types.ModuleType, types.FunctionType)):
        held += list(getattr(value, "__dict__", {}).values())
        leaves = jax.tree.leaves(value)  # a registered pytree node without a __dict__
        if leaves != [value]:
            held += leaves
    return held
