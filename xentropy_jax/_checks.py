"""Helpers of the input checks at the public boundary, shared by every module."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_concrete(*values: Any) -> bool:
    """Whether no leaf of `values` is a tracer: checks on values run only outside `jit`."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def python_float(value: Any) -> Any:
    """A concrete scalar as a Python float, whatever its type; anything else unchanged.

    The fits take l2 and tol this way, so that ``np.float32(0.1)`` or a 0-d jax array reuses
    the program compiled for the same Python float instead of compiling another.
    """
    return float(value) if is_concrete(value) and np.ndim(value) == 0 else value


def python_int(value: Any) -> Any:
    """A concrete integer scalar (NumPy's or a 0-d jax array) as a Python int; else unchanged.

    As `python_float`, for `max_iter`: ``np.int64(100)`` reuses the program of ``100``.
    Booleans and floats stay as they are, for the checks to judge.
    """
    if isinstance(value, bool) or not (is_concrete(value) and np.ndim(value) == 0):
        return value
    if np.issubdtype(np.result_type(value), np.integer):
        return int(value)
    return value
