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
