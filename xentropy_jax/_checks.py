"""Helpers of the input checks at the public boundary, shared by every module."""

from __future__ import annotations

from typing import Any

import jax


def is_concrete(*values: Any) -> bool:
    """Whether no leaf of `values` is a tracer: checks on values run only outside `jit`."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))
