"""check_convergence: the stopping rules shared by every solver, as one status code."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._objective import Evaluation
from ._result import RUNNING, Status


def max_abs(vector: jax.Array) -> jax.Array:
    """max|v|, 0 for an empty vector (the gradient's size, as `FitResult.grad_norm`)."""
    return jnp.max(jnp.abs(vector), initial=0)


def status_code(
    evaluation: Evaluation,
    *,
    diverged: jax.Array,
    decrement: jax.Array,
    n_iter: jax.Array,
    max_iter: jax.Array,
    tol: jax.Array,
    step_failed: jax.Array,
) -> jax.Array:
    """The `Status` after an iteration, or RUNNING.

    Convergence is scikit-learn's `NewtonSolver.check_convergence`: max|g| <= tol and half the
    squared Newton decrement of the last step, ½·ΔᵀHΔ, <= tol (tol a scalar or one value per
    parameter). Order of precedence: non-finite values, a failed step (unless the point passes
    both tests), divergence (the objective's certificate, `Objective.diverged`), convergence,
    the iteration limit. A step
    with no model decrease at all (ΔᵀHΔ = 0) while max|g| > tol also counts as failed. A
    decrease below the resolution of f (eps·|f|) does not: the line search measures
    f(θ + tΔ) − f(θ) to relative accuracy (`Objective.loss_change`), so such steps are still
    verified, and in float32 the last digits of nearly empty columns are reached only through
    them.
    """
    finite = jnp.isfinite(evaluation.loss) & jnp.all(jnp.isfinite(evaluation.grad))
    grad_small = jnp.all(jnp.abs(evaluation.grad) <= tol)
    converged = grad_small & (decrement <= jnp.max(tol, initial=0))
    # A point that passes both tests has converged, even when no step could be taken from it
    # (a zero gradient leaves a zero direction, which no line search accepts).
    step_failed = (step_failed | ((decrement <= 0) & ~grad_small)) & ~converged
    code = jnp.where(n_iter >= max_iter, Status.MAX_ITER, RUNNING)
    code = jnp.where(converged, Status.CONVERGED, code)
    code = jnp.where(diverged, Status.DIVERGED, code)
    code = jnp.where(step_failed, Status.LINE_SEARCH_FAILED, code)
    code = jnp.where(finite, code, Status.NON_FINITE)
    return code.astype(jnp.int32)
