"""Helpers of the input checks at the public boundary, shared by every module."""

from __future__ import annotations

import decimal
import numbers
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse


def is_concrete(*values: Any) -> bool:
    """Whether no leaf of `values` is a tracer: checks on values run only outside `jit`."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def concrete_value(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array where it is known before the program is built, else None.

    Known: a concrete array, or the tracer of eager autodiff (``jax.grad``, ``jax.jvp`` outside
    ``jit``), whose primal is concrete. Unknown: under ``jit`` or ``vmap``.
    """
    if is_concrete(value):
        return np.asarray(value)
    try:
        return np.asarray(jax.extend.core.concrete_or_error(None, value))
    except jax.errors.ConcretizationTypeError:
        return None


def dtype_of(value: Any) -> np.dtype:
    """The dtype of an array (NumPy, jax, scipy.sparse, a tracer) or of what NumPy makes of it."""
    dtype = getattr(value, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(value).dtype


def check_real(name: str, value: Any) -> None:
    """Raise TypeError unless `value` (None passes) is real and numeric: no strings, no complex.

    A complex value was cast to real further on, and its imaginary part dropped silently.
    """
    if value is None:
        return
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, np.generic):
        return  # Python numbers, Fraction, Decimal (NumPy makes object arrays of the last two)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number or array, got the string {value!r}")
    if isinstance(value, sparse.JAXSparse) and not isinstance(value, sparse.BCOO):
        # A BCSR failed deep inside JAX ("sparse rule for slice is not implemented").
        raise TypeError(
            f"{name} is a {type(value).__name__}: sparse input is a "
            "jax.experimental.sparse.BCOO or a SciPy sparse matrix (convert it with .to_bcoo())"
        )
    dtype = dtype_of(value)
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(
            f"{name} must be real, got dtype {dtype}: its imaginary part would be dropped silently"
        )
    # jnp.issubdtype knows bfloat16 (and JAX's other extended floats), which NumPy calls no number.
    if not (jnp.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)):
        raise TypeError(f"{name} must be numeric, got dtype {dtype}")


def python_float(value: Any, name: str) -> Any:
    """A concrete scalar as a Python float, whatever its type; anything else unchanged.

    The fits take l2 and tol this way, so that ``np.float32(0.1)`` or a 0-d jax array reuses
    the program compiled for the same Python float instead of compiling another.

    Raises:
        TypeError: `value` (called `name`) is None, a string, complex or not numeric.
    """
    if value is None:
        raise TypeError(f"{name} must be a real number, got None")
    check_real(name, value)
    return float(value) if is_concrete(value) and np.ndim(value) == 0 else value


def python_int(value: Any) -> Any:
    """A concrete integer scalar (NumPy's or a 0-d jax array) as a Python int; else unchanged.

    As `python_float`, for `max_iter`: ``np.int64(100)`` reuses the program of ``100``.
    Booleans, floats and strings stay as they are, for the checks to judge.
    """
    if isinstance(value, (bool, str, bytes)) or not (is_concrete(value) and np.ndim(value) == 0):
        return value
    if np.issubdtype(np.result_type(value), np.integer):
        return int(value)
    return value


def check_flag(name: str, value: Any) -> bool:
    """`value` as a bool: a bool (Python's, NumPy's, a 0-d boolean array) or the integer 0 or 1.

    Anything else raises TypeError: a string such as "no" is truthy, and taken as a flag it
    turned the option on.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):  # verbose=1, as scikit-learn's
        return bool(value)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.dtype(dtype) == np.bool_ and np.ndim(value) == 0:
        if is_concrete(value):
            return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_int_range(name: str, value: Any, low: int, high: int = 2**31 - 1) -> int:
    """`value` as a Python int in [low, high], else ValueError (int32 loop bounds by default).

    Beyond int32, a bound passed into a compiled loop escaped as JAX's OverflowError naming an
    internal argument; a float such as 2.5 was truncated silently.
    """
    integer = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not (integer and low <= value <= high):
        bound = "2**31 - 1" if high == 2**31 - 1 else high
        raise ValueError(f"{name} must be an integer in [{low}, {bound}], got {value!r}")
    return int(value)
