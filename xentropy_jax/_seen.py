"""`Programs`: compiled programs for the functions that come back, a bounded number of them."""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax


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
        if any(_holds_tracer(part) for part in parts):
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


def tracing() -> bool:
    """Whether a JAX transformation (``jit``, ``grad``, ``vmap``, ...) is tracing the caller.

    The operators' arrays may be that trace's values even where no argument is a tracer (a
    bound method's object, a closure several functions deep): under a trace nothing is cached,
    and a solve is differentiable. Without the (internal) test, every call counts as traced.
    """
    return _trace_state_clean is None or not _trace_state_clean()


try:  # JAX has no public test of this
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover
    _trace_state_clean = None


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
        try:
            leaves = jax.tree.leaves(part)
        except Exception:  # a dict whose keys do not sort, say: looked at as one object
            leaves = [part]
        for leaf in leaves:
            if leaf is not function and _holds_tracer(leaf, depth - 1):
                return True
    return False
