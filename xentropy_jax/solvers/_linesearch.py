"""Backtracking line search (Armijo), and the line-search step of the Newton solvers."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_int_range
from .._manual import while_loop
from .._objective import Objective
from ._loop import Iterate, StepResult


def check_line_search_options(sufficient_decrease: float, max_line_search: int) -> None:
    """Raise ValueError for an Armijo constant outside (0, 0.5) or fewer than one trial step."""
    if isinstance(sufficient_decrease, (bool, np.bool_)) or not (
        isinstance(sufficient_decrease, numbers.Real) and 0 < sufficient_decrease < 0.5
    ):
        raise ValueError(f"sufficient_decrease must be in (0, 0.5), got {sufficient_decrease!r}")
    check_int_range("max_line_search", max_line_search, 1)


class LineSearchResult(NamedTuple):
    """Outcome of `backtracking`.

    Attributes:
        scale: accepted step length t (the last one tried on failure).
        change: f(θ + t·Δ) − f(θ) at that t.
        success: whether t satisfies the Armijo condition.
        n_steps: trial lengths evaluated.
    """

    scale: jax.Array
    change: jax.Array
    success: jax.Array
    n_steps: jax.Array


def backtracking(
    change_at: Callable[[jax.Array], jax.Array],
    slope: jax.Array,
    *,
    sufficient_decrease: float = 1e-4,
    shrink: float = 0.5,
    max_steps: int = 30,
) -> LineSearchResult:
    """Largest t in {1, shrink, shrink², ...} with f(θ + tΔ) − f(θ) <= c·t·gᵀΔ.

    Args:
        change_at: t -> f(θ + t·Δ) − f(θ), computed accurately (`Objective.loss_change`).
        slope: gᵀΔ, the directional derivative at t = 0 (negative for a descent direction).
        sufficient_decrease: Armijo constant c in (0, 1/2).
        shrink: factor applied to t after each rejection.
        max_steps: trial lengths before giving up (t reaches shrink^(max_steps − 1)).

    Returns:
        A `LineSearchResult`; `success` is False when the direction is not one of descent or no
        trial decreased f enough (a non-finite change counts as a rejection). Each trial costs
        one call of `change_at`.
    """
    dtype = jnp.result_type(slope)
    descent = slope < 0

    def cond(state):
        n_steps, _, _, done = state
        return ~done & (n_steps < max_steps)

    def body(state):
        n_steps, scale, _, _ = state
        change = change_at(scale)
        accepted = jnp.isfinite(change) & (change <= sufficient_decrease * scale * slope)
        next_scale = jnp.where(accepted, scale, scale * shrink)
        return n_steps + 1, next_scale, change, accepted

    init = (jnp.zeros((), jnp.int32), jnp.ones((), dtype), jnp.zeros((), dtype), ~descent)
    n_steps, scale, change, done = while_loop(cond, body, init)
    success = done & descent
    return LineSearchResult(scale, change, success, n_steps)


def line_search_step(
    objective: Objective,
    point: Iterate,
    direction: jax.Array,
    curvature: jax.Array,
    n_products: jax.Array,
    *,
    sufficient_decrease: float,
    max_line_search: int,
) -> StepResult:
    """The line_search and update_gradient_hessian phases of a Newton-type step along Δ.

    One predictor η(Δ) per direction (for logistic regression, one GEMM for XΔ), then
    `backtracking` on f(θ + tΔ) − f(θ) from `Objective.loss_change` (O(N·K) per trial), and
    the evaluation at θ + tΔ, whose predictor is η(θ) + t·η(Δ) (no further product with X).

    Args:
        objective: the problem.
        point: the current iterate.
        direction: [P] the inner solve's direction Δ.
        curvature: ΔᵀHΔ (twice the model decrease), from the inner solve.
        n_products: the inner solve's Hessian products, passed through.
        sufficient_decrease: Armijo constant.
        max_line_search: most trial lengths.

    Returns:
        A `StepResult` whose report holds the step length ("step") and the decrement.
    """
    evaluation = point.evaluation
    slope = jnp.vdot(evaluation.grad, direction)
    direction_predictor = objective.predictor(direction)

    def change_at(scale):
        return objective.loss_change(point.theta, evaluation, direction, direction_predictor, scale)

    search = backtracking(
        change_at, slope, sufficient_decrease=sufficient_decrease, max_steps=max_line_search
    )
    scale = jnp.where(search.success, search.scale, 0)
    # A failed search keeps θ itself: θ + 0·Δ is NaN where Δ is (a non-finite Newton step).
    theta = jnp.where(
        search.success, keep_in_subspace(objective, point.theta + scale * direction), point.theta
    )
    predictor = jax.tree.map(
        lambda a, b: jnp.where(search.success, a + scale * b, a),
        point.predictor,
        direction_predictor,
    )
    decrement = 0.5 * curvature
    return StepResult(
        Iterate(theta, predictor, objective.evaluate(theta, predictor)),
        decrement=decrement,
        failed=~search.success,
        n_products=n_products,
        carry=(),
        report={"step": scale, "decrement": decrement},
    )


def keep_in_subspace(objective, theta: jax.Array) -> jax.Array:
    """θ projected by the objective's ``remove_class_shift``, when it has one.

    The directions lie in that subspace (the preconditioners project onto it), but θ + tΔ
    rounds entry by entry, and the rounding adds up along the complement, where no direction
    ever corrects it. With an l2 penalty the gradient there is l2 times the drift: a float32
    fit at l2 = 100 stopped LINE_SEARCH_FAILED with max|g| = 3.2e-7, all of it a common shift
    of the classes, above a tolerance of 7e-8. The projection never increases f and leaves
    the predictor right up to a per-row common shift of the logits, which changes no
    probability.
    """
    project = getattr(objective, "remove_class_shift", None)
    return theta if project is None else project(theta)
