"""Matrix products at full precision in the package's compiled programs, on any backend.

JAX's default precision for a float32 matrix product depends on the backend: exact float32 on
CPUs, but on NVIDIA GPUs since Ampere the inputs are rounded to tensor-float-32 (10 bits of
mantissa; an H200 gave a 2048 x 2048 product 2.9e-4 relative error against 8.1e-7 at full
precision), and on TPUs to bfloat16 passes. A fit's gradient, line search and stopping test
need the working precision's own rounding: with tensor-float-32 products the README's float32
digits fit stopped with LINE_SEARCH_FAILED at max|gradient| = 1.1e-6 on an H200, and a float32
linear probe ended 13 times further from the float64 optimum (2.7e-7 against 2.1e-8).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

F = TypeVar("F", bound=Callable)

FULL_PRECISION = "highest"


def full_precision(function: F) -> F:
    """`function`, traced with every matrix product at full precision (``"highest"``).

    It sets `jax.default_matmul_precision` while `function` runs or is traced, whatever the
    caller's setting: products that pass an explicit `precision` keep it. Place it under
    `jax.jit` (``jax.jit(full_precision(f))``): the compiled program then holds the precision
    in each product.
    """

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision(FULL_PRECISION):
            return function(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def at_least_float32(*values) -> jnp.dtype:
    """The promoted type of ``values`` (arrays or dtypes), at least float32.

    Under JAX's standard promotion whatever the caller's ``jax_numpy_dtype_promotion``: in
    ``"strict"`` mode ``jnp.promote_types(float64, float32)`` raises, and every loss, CG solve
    and fit asked it of the caller's own consistent inputs.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(jnp.result_type(*values), jnp.float32)
