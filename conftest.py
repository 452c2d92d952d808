"""Test configuration: float64 by default, as the maths is checked to the last digit.

Rank promotion raises, so that every broadcast in the package and the tests is explicit.

Tests marked ``subprocess`` (a notebook, an example or a script in a fresh Python process, each
tens of seconds) run first: under pytest-xdist, a worker that picks one up last would otherwise
keep the whole run waiting after the other worker has finished.

It sits at the root so that the package's doctests run under the same settings.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(items):
    """Move the long tests that start a fresh Python process to the front (a stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("subprocess") is None)
