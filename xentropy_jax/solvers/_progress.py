"""Verbose progress: one line per iteration, printed from the compiled loop, with wall time.

A `Progress` is built only when `verbose=True`; otherwise the loop holds no host callback.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback

from .._objective import Evaluation
from ._convergence import max_abs

_HEAD = "iter {iteration:3d}  loss {loss:.12e}  max|g| {grad_norm:.3e}"
_TIME = "  time {time:.4f}s"


class _Float64Bits(NamedTuple):
    bits: jax.Array


def _encode(value: jax.Array):
    """A float64 value as its two uint32 halves (exact whatever the host's x64 flag).

    The callback's arguments are placed on the host under the global flag: a float64 fit run
    with 64-bit types enabled only locally (as the estimator does) would print float32 values.
    """
    value = jnp.asarray(value)
    if value.dtype == jnp.float64:
        return _Float64Bits(lax.bitcast_convert_type(value, jnp.uint32))
    return value


def _decode(value) -> float | int | bool:
    if isinstance(value, _Float64Bits):
        return np.asarray(value.bits, np.uint32).view(np.float64).item()
    return np.asarray(value).item()


class Progress:
    """Prints iteration, loss, max|gradient|, the solver's own fields, then the elapsed time.

    The line of iteration 0 (the initial point) starts the clock when the compiled solve starts
    running, so the time excludes compilation. The clock lives on the host: the device does
    nothing for it, and one compiled function restarts it on every call. Under `vmap`, JAX
    calls the printer once per batch element, and a member that has stopped prints no more.

    Args:
        fields: format of the solver's fields for iterations >= 1, in order, e.g.
            "cg {cg:3d}  step {step:.3g}"; the values are passed to `iteration` by name.
    """

    def __init__(self, fields: str):
        self._first_line = _HEAD + _TIME
        self._line = f"{_HEAD}  {fields}{_TIME}"
        self._start: float | None = None

    def _print(self, iteration, running=True, **values) -> None:
        if not running:
            return  # a member of a `vmap` that stopped: the loop runs on for the others
        now = time.perf_counter()
        iteration = int(iteration)
        if iteration == 0 or self._start is None:
            self._start = now
        values = {name: _decode(value) for name, value in values.items()}
        template = self._first_line if iteration == 0 else self._line
        print(template.format(iteration=iteration, time=now - self._start, **values), flush=True)

    def start(self, evaluation: Evaluation) -> jax.Array:
        """Print the line of iteration 0 (loss and max|g| at the initial point).

        Returns:
            The iteration count 0 (int32) as the printer's output: the loop must start from it,
            so that this line comes first. A callback without outputs may be scheduled after
            the loop (XLA did), and an ordered one is refused on more than one device.
        """

        def first_line(loss, grad_norm):
            self._print(0, loss=loss, grad_norm=grad_norm)
            return np.zeros((), np.int32)

        return io_callback(
            first_line,
            jax.ShapeDtypeStruct((), jnp.int32),
            _encode(lax.stop_gradient(evaluation.loss)),
            _encode(lax.stop_gradient(max_abs(evaluation.grad))),
        )

    def iteration(
        self, n_iter: jax.Array, evaluation: Evaluation, running: jax.Array, **fields: jax.Array
    ) -> None:
        """Print the line of iteration `n_iter` at the new point, with the solver's `fields`.

        `running` is whether the loop was running before this iteration: under `vmap` the loop
        goes on while any member runs, and the lines of members that have stopped (whose state
        the loop keeps frozen) are not printed.
        """
        jax.debug.callback(
            self._print,
            n_iter,
            running,
            loss=_encode(evaluation.loss),
            grad_norm=_encode(max_abs(evaluation.grad)),
            **{name: _encode(value) for name, value in fields.items()},
        )


def print_lowered(going_on: jax.Array, tol: jax.Array, previous: jax.Array) -> jax.Array:
    """Print that the fit goes on to a lower tolerance (`minimize_to_floor`), if `going_on`.

    Returns:
        0 (int32), for the next run to depend on, so that the line comes before its lines.
    """

    def line(going_on, tol, previous):
        if _decode(going_on):
            print(
                f"the precision floor at this point is lower (largest tolerance "
                f"{_decode(previous):.3e} -> {_decode(tol):.3e}): going on",
                flush=True,
            )
        return np.zeros((), np.int32)

    return io_callback(
        line,
        jax.ShapeDtypeStruct((), jnp.int32),
        going_on,
        _encode(jnp.max(tol, initial=0)),
        _encode(jnp.max(previous, initial=0)),
    )
