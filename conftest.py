"""Test configuration: float64 by default, as the maths is checked to the last digit.

It sits at the root so that the package's doctests run under the same settings.
"""

import jax

jax.config.update("jax_enable_x64", True)
