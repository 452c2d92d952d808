"""check_convergence: the stopping rules shared by every solver, as one status code."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._linear import Evaluation, LogisticObjective
from ._result import RUNNING, Status


def separated(objective: LogisticObjective, free_logits: jax.Array) -> jax.Array:
    """Whether the current logits classify every weighted row strictly correctly.

    If they do, the current W is itself a separating direction: scaling it up drives the
    unpenalised loss to 0, so with l2 = 0 the maximum-likelihood estimate does not exist. This
    is a certificate, not a heuristic: on data that are not separable it can never hold.
    Cost: O(N·K).
    """
    logits = free_logits
    if objective.reference_class:
        logits = jnp.pad(logits, ((0, 0), (1, 0)))
    labels = objective.labels[:, None]
    label_logit = jnp.take_along_axis(logits, labels, axis=-1)[:, 0]
    is_label = jnp.arange(objective.num_classes)[None, :] == labels
    runner_up = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    margin_ok = (label_logit > runner_up) | (objective.weights <= 0)
    return jnp.all(margin_ok)


def status_code(
    objective: LogisticObjective,
    evaluation: Evaluation,
    free_logits: jax.Array,
    *,
    decrement: jax.Array,
    n_iter: jax.Array,
    max_iter: jax.Array,
    tol: jax.Array,
    step_failed: jax.Array,
) -> jax.Array:
    """The `Status` after an iteration, or RUNNING.

    Convergence is scikit-learn's `NewtonSolver.check_convergence`: max|g| <= tol and half the
    squared Newton decrement of the last step, ½·ΔᵀHΔ, <= tol. Order of precedence: non-finite
    values, a failed step, divergence (l2 = 0 and a separation certificate), convergence, the
    iteration limit. A step with no model decrease at all (ΔᵀHΔ = 0) while max|g| > tol
    also counts as failed. A decrease below the resolution of f (eps·|f|) does not: the line
    search measures f(θ + tΔ) − f(θ) to relative accuracy (`_linear.loss_change`), so such
    steps are still verified, and in float32 the last digits of nearly empty columns are
    reached only through them.
    """
    finite = jnp.isfinite(evaluation.loss) & jnp.all(jnp.isfinite(evaluation.grad))
    grad_small = jnp.all(jnp.abs(evaluation.grad) <= tol)
    converged = grad_small & (decrement <= jnp.max(tol, initial=0))
    diverged = (objective.l2 == 0) & separated(objective, free_logits)
    step_failed = step_failed | ((decrement <= 0) & ~grad_small)
    code = jnp.where(n_iter >= max_iter, Status.MAX_ITER, RUNNING)
    code = jnp.where(converged, Status.CONVERGED, code)
    code = jnp.where(diverged, Status.DIVERGED, code)
    code = jnp.where(step_failed, Status.LINE_SEARCH_FAILED, code)
    code = jnp.where(finite, code, Status.NON_FINITE)
    return code.astype(jnp.int32)
