"""Test configuration: float64 by default, as the maths is checked to the last digit.

Rank promotion raises, so that every broadcast in the package and the tests is explicit.

It sits at the root so that the package's doctests run under the same settings.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
