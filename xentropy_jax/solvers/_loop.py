"""The one loop every solver runs: setup, step, check_convergence, under `lax.while_loop`.

The phases follow scikit-learn's `NewtonSolver` (setup -> update_gradient_hessian ->
inner_solve -> line_search -> check_convergence -> finalize). The loop owns the iterate, the
counters, the status and the verbose output; a solver contributes only its step (a pure
function from the current point to the next, see `Step`), so `Newton`, `NewtonCG` and
`TrustRegion` are peers that differ in nothing else. Everything is written against the
`Objective` protocol: no solver knows which objective it minimises.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_real, is_concrete
from .._manual import while_loop
from .._objective import Evaluation, Objective
from ._convergence import status_code
from ._progress import Progress
from ._result import RUNNING


class Iterate(NamedTuple):
    """A point of the iteration: θ [P], its predictor η(θ) and the evaluation there."""

    theta: jax.Array
    predictor: Any
    evaluation: Evaluation


class StepResult(NamedTuple):
    """What a solver's step returns to the loop.

    Attributes:
        iterate: the next point (the same one when the step was rejected).
        decrement: ½ΔᵀHΔ of the step (the model decrease; half the squared Newton decrement
            when the inner solve is exact), tested against tol for convergence.
        failed: no acceptable step can be found from here (line search exhausted, trust
            region collapsed).
        n_products: Hessian products (or explicit Hessians) the step used.
        carry: the solver's own state for the next step (the trust radius), or ().
        report: values printed with `verbose`, by the names of the solver's progress fields.
    """

    iterate: Iterate
    decrement: jax.Array
    failed: jax.Array
    n_products: jax.Array
    carry: Any
    report: dict[str, jax.Array]


Step = Callable[[Iterate, Any], StepResult]


class SolverOutput(NamedTuple):
    """The final state of a run: θ [P], the evaluation there, iterations, status, products."""

    theta: jax.Array
    evaluation: Evaluation
    n_iter: jax.Array
    status: jax.Array
    n_hessian_products: jax.Array


class _State(NamedTuple):
    iterate: Iterate
    decrement: jax.Array
    n_iter: jax.Array
    n_hessian_products: jax.Array
    status: jax.Array
    carry: Any


def start(objective: Objective, theta: jax.Array) -> Iterate:
    """The setup phase: predictor, value and gradient at the initial point."""
    predictor = objective.predictor(theta)
    return Iterate(theta, predictor, objective.evaluate(theta, predictor))


def initial_theta(objective: Objective, theta: Any) -> jax.Array:
    """θ₀ as a floating [P] vector in the objective's dtype, else TypeError.

    The loop's carry is in the objective's dtype: a float32 θ₀ for a float64 objective failed
    inside `while_loop` ("carry input and carry output must have equal types"), and so did a
    solver's own carry built from θ₀'s dtype (`TrustRegion`'s radius).
    """
    try:
        array = jnp.asarray(theta)
    except (TypeError, ValueError):  # a dict or another pytree: "entry not a 2- or 3- tuple"
        raise TypeError(
            f"theta must be a floating [P] vector, got {type(theta).__name__}"
        ) from None
    if array.ndim != 1 or not jnp.issubdtype(array.dtype, jnp.floating):
        # An integer θ failed converting inf to its dtype.
        raise TypeError(
            f"theta must be a floating [P] vector, got {array.dtype} of shape {array.shape}"
        )
    return array.astype(objective.dtype)


def _check_arguments(objective: Objective, theta: jax.Array, tol: Any, max_iter: Any) -> None:
    """`run`'s errors, at the boundary: they came from inside the loop, naming no argument.

    None or a string failed in a NumPy ufunc, a tol or θ of another length in a broadcast or
    ``dot_general``, and an objective whose gradient was float64 where its `dtype` said float32
    in ``while_loop`` ("carry input and carry output must have equal types").
    """
    size = objective.num_params
    if theta.shape != (size,):
        raise ValueError(f"theta must have shape [P] = ({size},), got {theta.shape}")
    if tol is None:
        raise TypeError("tol must be a real number, got None")
    check_real("tol", tol)
    if np.ndim(tol) not in (0, 1) or (np.ndim(tol) == 1 and np.shape(tol)[0] not in (1, size)):
        raise ValueError(f"tol must be a scalar or have shape [P] = ({size},), got {np.shape(tol)}")
    if is_concrete(tol) and not np.all(np.asarray(tol) >= 0):
        raise ValueError(f"tol must be >= 0 (not NaN), got {tol!r}")
    if is_concrete(max_iter) and not (
        np.ndim(max_iter) == 0
        and isinstance(max_iter, numbers.Real | np.number | np.ndarray | jax.Array)
        and not isinstance(max_iter, bool | np.bool_)  # True ran as 1
        and jnp.issubdtype(jnp.result_type(max_iter), jnp.number)
        and not jnp.issubdtype(jnp.result_type(max_iter), jnp.complexfloating)
        and np.isfinite(max_iter)
        and float(max_iter) == int(max_iter)
        and int(max_iter) >= 0
    ):
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    # The gradient rides in the loop's carry; products are checked where they are used (CG
    # names an operator that widens its input), and `hessian` only by `Newton`, which calls it.
    evaluation = jax.eval_shape(lambda t: objective.evaluate(t, objective.predictor(t)), theta)
    grad = evaluation.grad
    # Of other shapes they failed inside the loop with JAX's "dot_general requires contracting
    # dimensions to have the same shape" or "cond_fun must return a boolean scalar".
    if jnp.shape(evaluation.loss) != () or grad.shape != (size,):
        raise ValueError(
            f"the objective's evaluate must give a scalar loss and a grad of shape [P] = "
            f"({size},), got shapes {jnp.shape(evaluation.loss)} and {grad.shape}"
        )
    if jnp.promote_types(grad.dtype, theta.dtype) != theta.dtype:  # narrower promotes
        raise TypeError(
            f"the objective's evaluate gives a {grad.dtype} grad where its dtype is "
            f"{theta.dtype}: its arrays and its dtype must agree (cast them, or report the "
            "dtype they give)"
        )


def run(
    objective: Objective,
    theta: jax.Array,
    step: Step,
    carry: Any,
    *,
    tol: jax.Array,
    max_iter: jax.Array,
    progress: Progress | None = None,
) -> SolverOutput:
    """Iterate `step` from θ until the status leaves RUNNING.

    Args:
        objective: what is minimised (the `Objective` protocol).
        theta: [P] initial point.
        step: (iterate, carry) -> `StepResult`, the solver's iteration.
        carry: the solver's initial own state.
        tol: scalar or [P] tolerance on |g| (and, by its largest value, on the decrement).
        max_iter: most iterations (traced).
        progress: prints a line per iteration when given (`verbose`).

    Returns:
        A `SolverOutput`. The status after iteration 0 is NON_FINITE, DIVERGED or MAX_ITER
        (max_iter = 0) when that already holds at θ; the loop runs while it is RUNNING.

    Raises:
        TypeError: θ is not a floating vector, `tol` is not a real number (None, a string),
            or the objective's `evaluate` gives a gradient of a wider dtype than its `dtype`.
        ValueError: θ is not of shape [P]; `tol` is neither a scalar nor [P]; a concrete `tol`
            with an entry that is negative or NaN, or a concrete `max_iter` that is not an
            integer >= 0 (a solver's `minimize` called directly; the fits check theirs before).
    """
    theta = initial_theta(objective, theta)
    _check_arguments(objective, theta, tol, max_iter)
    first = start(objective, theta)
    zero = jnp.zeros((), jnp.int32)
    decrement = jnp.asarray(jnp.inf, theta.dtype)
    status = status_code(
        first.evaluation,
        diverged=objective.diverged(first.evaluation, first.predictor),
        decrement=decrement,
        n_iter=zero,
        max_iter=max_iter,
        tol=jnp.zeros((), theta.dtype),
        step_failed=jnp.zeros((), bool),
    )
    n_iter = zero if progress is None else progress.start(first.evaluation)

    def cond(state: _State) -> jax.Array:
        return state.status == RUNNING

    def body(state: _State) -> _State:
        result = step(state.iterate, state.carry)
        point = result.iterate
        n_iter = state.n_iter + 1
        status = status_code(
            point.evaluation,
            diverged=objective.diverged(point.evaluation, point.predictor),
            decrement=result.decrement,
            n_iter=n_iter,
            max_iter=max_iter,
            tol=tol,
            step_failed=result.failed,
        )
        if progress is not None:
            progress.iteration(n_iter, point.evaluation, state.status == RUNNING, **result.report)
        return _State(
            point,
            result.decrement,
            n_iter,
            state.n_hessian_products + result.n_products,
            status,
            result.carry,
        )

    state = while_loop(cond, body, _State(first, decrement, n_iter, zero, status, carry))
    return SolverOutput(
        state.iterate.theta,
        state.iterate.evaluation,
        state.n_iter,
        state.status,
        state.n_hessian_products,
    )


@runtime_checkable
class Solver(Protocol):
    """Anything that minimises an `Objective`: `Newton`, `NewtonCG`, `TrustRegion` or a new one.

    A solver is a hashable configuration (it is a static argument of compiled fits) whose
    `minimize` runs from θ to a `SolverOutput`, usually by `run` with its own `Step`.
    """

    def minimize(
        self,
        objective: Objective,
        theta: jax.Array,
        *,
        tol: jax.Array,
        max_iter: jax.Array,
        verbose: bool = False,
    ) -> SolverOutput:
        """Minimise `objective` from θ [P]."""
        ...
