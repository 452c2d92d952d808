"""`fit_regularization_path`: warm-started fits over a grid of L2 strengths, one compiled scan.

Along the path the data, the compiled solver and the preconditioner's once-per-fit setup (the
eigenbasis of the feature Gram, which does not depend on l2) are shared by every value, and each
fit starts from the previous optimum, so that the later fits take a few Newton iterations each.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._checks import check_flag, check_real, python_float, python_int
from .._linear import logistic_objective
from .._manual import scan
from .._precision import full_precision
from . import _preconditioners
from ._fit import (
    Solver,
    _initial_theta,
    _input_status,
    _is_concrete,
    _resolve_solver,
    _validate,
    centred_input,
    finalize,
    fit_inputs,
    known_positive,
    shifted_init,
    unshifted,
    wants_transposed_copy,
)
from ._floor import attainable_tolerance, minimize_to_floor
from ._newton_cg import NewtonCG
from ._result import FitError, FitResult, Status
from ._trust_region import TrustRegion

# Whether a caller has promised that every l2 it traces is > 0 (`positive_l2_promised`).
_POSITIVE_L2_PROMISED = contextvars.ContextVar("positive_l2_promised", default=False)


@contextlib.contextmanager
def positive_l2_promised(promised: bool = True):
    """Paths traced inside take traced l2 values as known > 0 (`LogisticObjective.penalised`).

    For callers that vectorise paths over l2 values they hold concretely (the cross-validated
    estimator's splits, each with its own penalty): without the promise a traced l2 may be 0,
    and such fits are compiled as unpenalised, which leaves float32 columns of large mean
    uncentred (`centred_input`). A false promise of l2 = 0 would compile an unpenalised fit's
    data as penalised: only promise what was checked (`known_positive` on the concrete values).
    """
    token = _POSITIVE_L2_PROMISED.set(promised)
    try:
        yield
    finally:
        _POSITIVE_L2_PROMISED.reset(token)


# The arguments of `_path` that are compile-time constants: one program per combination.
PATH_STATIC_ARGNAMES = (
    "num_classes",
    "fit_intercept",
    "reference_class",
    "penalised",
    "transposed_copy",
    "solver",
)


@functools.partial(jax.jit, static_argnames=PATH_STATIC_ARGNAMES)
@full_precision
def _path(
    X,
    labels,
    sample_weight,
    l2_values,
    init,
    tol,
    max_iter,
    *,
    num_classes,
    fit_intercept,
    reference_class,
    penalised,
    solver,
    transposed_copy=False,
) -> FitResult:
    build = functools.partial(
        logistic_objective,
        labels=labels,
        num_classes=num_classes,
        sample_weight=sample_weight,
        l2=l2_values[0],
        fit_intercept=fit_intercept,
        reference_class=reference_class,
        penalised=penalised,
        transposed_copy=transposed_copy,
    )
    objective, shift = centred_input(build(X), build)  # as `_fit` does
    # Under `jit` each value is judged on its own: a NaN or negative l2 marks only its fit
    # INVALID_L2 (no iteration), not the whole path; bad labels, weights or tol mark every fit.
    valid_l2 = jnp.isfinite(l2_values) & (l2_values >= 0)
    # Only the package's CG solvers take a precomputed `basis`; the Solver protocol has none.
    extra = {}
    if isinstance(solver, NewtonCG | TrustRegion):
        # The basis serves every value of the path: the weakest valid penalty decides it.
        weakest = jnp.min(jnp.where(valid_l2, l2_values, jnp.inf))
        weakest = jnp.where(jnp.any(valid_l2), weakest, 0).astype(objective.dtype)
        weakest = dataclasses.replace(objective, l2=weakest)
        extra["basis"] = _preconditioners.setup_basis(solver.preconditioner, weakest)
    common = _input_status(objective, sample_weight, jnp.zeros((), l2_values.dtype), tol)
    static = attainable_tolerance(objective, tol)  # does not depend on l2: once for every fit

    def minimize(problem, start, tol, max_iter, extra):
        return solver.minimize(problem, start, tol=tol, max_iter=max_iter, **extra)

    def step(carry, inputs):
        optima, log_l2s = carry  # the last three optima and their log(l2), newest last
        l2, valid = inputs
        # INVALID_L2 ranks above INVALID_TOL and below the rest, as in `_input_status`.
        fine = (common == Status.CONVERGED) | (common == Status.INVALID_TOL)
        invalid = jnp.where(~valid & fine, Status.INVALID_L2, common).astype(jnp.int32)
        iterations = jnp.where(invalid == Status.CONVERGED, max_iter, 0).astype(jnp.int32)
        problem = dataclasses.replace(objective, l2=l2.astype(objective.dtype))
        log_l2 = jnp.log(jnp.maximum(problem.l2, jnp.finfo(problem.dtype).tiny))
        # Predictor: the optimum moves smoothly with log(l2). Candidate starts are the last
        # optimum and its linear and quadratic extrapolations (`extrapolations`); the fit
        # starts from the one with the smallest objective at the new l2.
        candidates = jnp.stack([optima[-1], *extrapolations(optima, log_l2s, log_l2)])
        candidates = jnp.where(problem.l2 > 0, candidates, optima[-1:])  # never towards l2 = 0
        values = jax.lax.map(problem.value, candidates)  # one [N, K] of logits at a time
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        start = candidates[jnp.argmin(values)]
        output = minimize_to_floor(minimize, problem, start, tol, iterations, extra, static=static)
        result = finalize(problem, output, invalid)
        # A skipped value leaves the history as it was: the next fit predicts from valid ones.
        optima = jnp.where(valid, jnp.concatenate([optima[1:], output.theta[None]]), optima)
        log_l2s = jnp.where(valid, jnp.concatenate([log_l2s[1:], log_l2[None]]), log_l2s)
        return (optima, log_l2s), result

    theta = _initial_theta(objective, shifted_init(init, shift))
    history = jnp.full((3,), -jnp.inf, objective.dtype)
    _, results = scan(step, (jnp.stack([theta] * 3), history), (l2_values, valid_l2))
    return unshifted(results, shift)


# Extrapolate no further than this many times the last step in log(l2).
_MAX_REACH = 2.0


def extrapolations(
    points: jax.Array, nodes: jax.Array, node: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Linear and quadratic extrapolations to `node` of `points` [3, P] given at `nodes` [3].

    Lagrange's formula through the last two points and through all three. An extrapolation
    that lacks its points (a node still -inf or repeated) or would reach further than
    `_MAX_REACH` times the last step returns the last point instead.
    """
    points, nodes, node = jnp.asarray(points), jnp.asarray(nodes), jnp.asarray(node)
    t0, t1, t2 = nodes[0], nodes[1], nodes[2]

    def ratio(numerator, denominator):
        return numerator / jnp.where(denominator != 0, denominator, 1)

    reach = ratio(node - t2, t2 - t1)
    near = jnp.isfinite(nodes[1:]).all() & (t1 != t2) & (reach >= 0) & (reach <= _MAX_REACH)
    linear = jnp.where(near, points[2] + reach * (points[2] - points[1]), points[2])
    weights = jnp.stack(
        [
            ratio((node - t1) * (node - t2), (t0 - t1) * (t0 - t2)),
            ratio((node - t0) * (node - t2), (t1 - t0) * (t1 - t2)),
            ratio((node - t0) * (node - t1), (t2 - t0) * (t2 - t1)),
        ]
    )
    near = near & jnp.isfinite(t0) & (t0 != t1) & (t0 != t2)
    quadratic = jnp.where(near, weights @ points, points[2])
    return linear, quadratic


@jax.custom_jvp
def _not_differentiable(arrays):
    """The identity, whose derivative raises: the path's warm-started fits have no rule.

    Differentiating the scan of solver iterations crashed in forward mode (a recursion, or a
    shape error inside JAX) or gave NaN tangents in float32; reverse mode failed inside JAX.
    """
    return arrays


@_not_differentiable.defjvp
def _not_differentiable_jvp(primals, tangents):
    raise TypeError(
        "fit_regularization_path is not differentiable (its warm-started fits are not): "
        "differentiate fit_logistic_regression, jax.vmap-ped over the l2 values, whose "
        "implicit derivatives hold at every value."
    )


def fit_regularization_path(
    X: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    l2_values: ArrayLike,
    *,
    sample_weight: ArrayLike | None = None,
    fit_intercept: bool = True,
    reference_class: bool = False,
    solver: str | Solver = "newton-cg",
    tol: float = 1e-8,
    max_iter: int = 100,
    init: tuple[ArrayLike, ArrayLike] | None = None,
    throw: bool = True,
) -> FitResult:
    """Fit the model at every L2 strength of a grid, each fit warm-started from the previous.

    For l2 in `l2_values`, in the order given, minimises the objective of
    `fit_logistic_regression`, f(W, b) = Σᵢ wᵢ·CE(xᵢW + b, yᵢ)/Σᵢ wᵢ + (l2/2)·‖W‖², starting
    from the previous value's optimum (from `init` or zeros for the first) or, when that has a
    larger objective, from its linear or quadratic extrapolation in log(l2) through the two or
    three previous optima (a predictor step; three extra objective values per fit). Give the values
    from the strongest penalty to the weakest (decreasing l2, increasing scikit-learn C): the
    optimum then moves little from one to the next. The whole path is one compiled `lax.scan`
    (repeat calls with the same shapes and number of values do not recompile; it works under
    `jax.vmap`, for example over cross-validation folds given as sample weights), the data are
    converted once, and the preconditioner's once-per-fit setup (the feature Gram's eigenbasis)
    is computed once for the whole path.

    Args:
        X: [N, d] features, dense or sparse (scipy.sparse or BCOO), as `fit_logistic_regression`.
        labels: [N] integer labels in [0, num_classes).
        num_classes: K >= 2 (static).
        l2_values: [L] L2 strengths >= 0 (scikit-learn's C is `l2 = 1/(C·Σᵢ wᵢ)`; for K = 2
            that is scikit-learn's binary model with `reference_class=True`, and at 2C with
            the symmetric default).
        sample_weight: [N] weights >= 0, or None for ones.
        fit_intercept: fit the unpenalised intercept b (static).
        reference_class: fix class 0's column of W and intercept at zero (static).
        solver: as `fit_logistic_regression`.
        tol: convergence tolerance of every fit (max|g| and half the squared Newton decrement).
        max_iter: most outer iterations of each fit.
        init: warm start (W [d, K], b [K]) of the first fit; None starts from zeros.
        throw: raise `FitError` (with the first fit that failed) when a fit did not converge
            (only with concrete results, outside `jit`/`vmap`).

    Returns:
        A `FitResult` whose every field has a leading axis [L]: params (W [L, d, K],
        b [L, K]), loss, converged, n_iter, grad_norm, status, n_hessian_products. Under
        `jit`, a NaN, infinite or negative l2 gives its own fit the status INVALID_L2 (no
        iteration), and the other values are fitted as if it were not there.

    Raises:
        ValueError: as `fit_logistic_regression`, and for `l2_values` that are not a non-empty
            1-D array of finite values >= 0.
        TypeError: non-integer labels; differentiation (`jax.grad`, `jax.jvp`, ...) with
            respect to X, the weights, `l2_values` or `init`: the path has no derivatives, the
            vmapped `fit_logistic_regression` has.
        FitError: `throw=True` and a fit of the path stopped without converging.

    Example:
        Each point of the path is the optimum an independent fit reaches:

        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> path = xj.fit_regularization_path(X, y, 3, [1.0, 0.1, 0.01], tol=1e-8)
        >>> path.params[0].shape, bool(path.converged.all())
        ((3, 1, 3), True)
        >>> single = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-8)
        >>> bool(np.allclose(path.params[0][1], single.params[0], atol=1e-6))
        True
    """
    config = _resolve_solver(solver)
    if np.ndim(l2_values) != 1 or np.shape(l2_values)[0] < 1:
        raise ValueError(
            f"l2_values must be a non-empty 1-D array, got shape {np.shape(l2_values)}"
        )
    check_real("l2_values", l2_values)
    tol, max_iter = python_float(tol, "tol"), python_int(max_iter)  # one program for every type
    fit_intercept = check_flag("fit_intercept", fit_intercept)
    reference_class = check_flag("reference_class", reference_class)
    throw = check_flag("throw", throw)
    _validate(X, labels, num_classes, sample_weight, l2_values, fit_intercept, tol, max_iter, init)
    features, labels, weights, init = fit_inputs(X, labels, sample_weight, init)
    l2_values = jnp.asarray(l2_values).astype(features.dtype)
    features, weights, l2_values, init = _not_differentiable((features, weights, l2_values, init))
    results = _path(
        features,
        labels,
        weights,
        l2_values,
        init,
        tol,
        max_iter,
        num_classes=int(num_classes),
        fit_intercept=bool(fit_intercept),
        reference_class=bool(reference_class),
        penalised=_POSITIVE_L2_PROMISED.get() or known_positive(l2_values, features.dtype),
        transposed_copy=wants_transposed_copy(features),
        solver=config,
    )
    if throw and _is_concrete(results.status):
        failed = np.flatnonzero(np.asarray(results.status) != Status.CONVERGED)
        if failed.size:
            raise FitError(jax.tree.map(lambda leaf: leaf[failed[0]], results))
    return results
