"""The precision floor of the stopping test: how small a gradient entry can be verified.

A gradient entry g_jk = Σᵢ x̃_ij·r_ik + l2·w_jk (r = ŵ ⊙ (s − onehot(y)), x̃ = [x, 1]) computed in
the working precision is off by its rounding, and a tolerance below that rounding can never be
verified: the fit would stop at the iteration limit (every float32 fit at tol = 1e-8). Two bounds
on it:

- the static one, 8·eps·Σᵢ ŵᵢ·|x̃_ij|, which needs nothing but X (|r| <= 1), and leaves out the
  logits' rounding (below), which offset features (x ≈ 1000 ± 50) make the larger part;
- the one at a point θ, 8·eps·(Σᵢ |x̃_ij|·|r_ik|·(1 + 2ζᵢ) + l2·|w_jk|), with
  ζᵢ = Σ_j |x̃_ij|·max_k |θ_jk|: the products' rounding (|r_ik|), and that of the residuals,
  whose logits are off by up to eps·ζᵢ, which moves r_ik by at most 2|r_ik|·eps·ζᵢ. Near an
  optimum most |r_ik| are far below 1: on raw wine and digits (large entries, confident
  predictions) this bound was 3 to 11,000 times below the static one in the median entry; where
  the predictions are not confident it can be above it, and the smaller of the two counts.

A float32 fit first stops at the static floor (`attainable_tolerance`), then continues from
there to the floor at the point it reached, until it meets the floor where it stops
(`minimize_to_floor`). A line search that fails with every entry within the floor at its point
has converged as far as float32 can tell; a fit that stops otherwise says so. A float64
fit stops at the static floor, which passes the default tol only for columns of mean size ~5e6.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._batch_cond import batch_cond
from .._linear import LogisticObjective, label_mask
from .._manual import while_loop
from .._rowsums import column_sums_by_chunks
from .._sparse_products import matmul, transpose_matmul
from ._loop import SolverOutput
from ._progress import print_lowered
from ._result import RUNNING, Status

# The gradient's entry for feature j is a weighted mean of x_ij·(s_ik − y_ik), |s − y| <= 1:
# rounding leaves it uncertain by a few eps·mean|x_j|. This multiple of that is the floor, and
# the same multiple of the bound at a point is that point's floor.
_FLOOR_FACTOR = 8.0


def attainable_tolerance(objective: LogisticObjective, tol: jax.Array) -> jax.Array:
    """Per-parameter tolerance [P]: max(tol, 8·eps·Σᵢ ŵᵢ·|x̃_ij|) for the entries of column j.

    Below this level a gradient entry may be rounding noise in the working precision, so a
    smaller tol could not always be verified. The floor is per column: one badly scaled column
    raises only its own parameters' tolerance.
    """
    scale = column_sums_by_chunks(
        lambda rows, weights: transpose_matmul(rows, weights, value_map=jnp.abs),
        objective.features,
        objective.weights,
        objective.row_chunk,
    )
    return jnp.maximum(jnp.asarray(tol, objective.dtype), static_floor(objective, scale))


def static_floor(objective: LogisticObjective, column_sums: jax.Array) -> jax.Array:
    """The static floor [P] from Σᵢ ŵᵢ·|x_ij| [d]: 8·eps times it (1 for the intercept).

    `objective` gives only the layout and dtype (the streamed fit passes its row-less one,
    with the column sums of its checking pass).
    """
    scale = column_sums.astype(objective.dtype)
    if objective.fit_intercept:
        scale = jnp.concatenate([scale, jnp.ones((1,), scale.dtype)])
    floor = _FLOOR_FACTOR * jnp.finfo(objective.dtype).eps * scale
    return jnp.repeat(floor, objective.num_free_classes)


def rounding_floor(
    objective: LogisticObjective, theta: jax.Array, log_probs: jax.Array | None = None
) -> jax.Array:
    """The floor at θ [P]: 8·eps·(Σᵢ |x̃_ij|·|r_ik|·(1 + 2ζᵢ) + l2·|w_jk|) (module docstring).

    Args:
        objective: the problem.
        theta: [P] the point.
        log_probs: [N, K] the log-probabilities there (`Evaluation.log_probs`), or None to
            compute them.

    Cost: two products with |X| ([N, d]·[d] and [d, N]·[N, Kf]) and O(N·K), and the logits
    when `log_probs` is None.
    """
    weights, intercept = objective.unpack(theta)
    if log_probs is None:
        log_probs = jax.nn.log_softmax(objective.logits(theta), axis=-1)
    probs = jnp.exp(log_probs)
    is_label = label_mask(objective)
    # |s − onehot(y)|: the label's 1 − s_y is the others' probabilities summed (no cancellation).
    others = jnp.sum(jnp.where(is_label, 0, probs), axis=1, keepdims=True)
    residual = objective.weights[:, None] * jnp.where(is_label, others, probs)
    residual = residual[:, int(objective.reference_class) :]
    largest = jnp.max(jnp.abs(weights), axis=1, initial=0)
    offset = jnp.max(jnp.abs(intercept), initial=0)

    def sums(rows, values):
        spread = matmul(rows, largest, value_map=jnp.abs) + offset
        values = values * (1 + 2 * spread)[:, None]
        return transpose_matmul(rows, values, value_map=jnp.abs), jnp.sum(values, axis=0)

    by_weight, by_intercept = column_sums_by_chunks(
        sums, objective.features, residual, objective.row_chunk
    )
    by_weight = by_weight + objective.l2 * jnp.abs(weights)
    floor = _FLOOR_FACTOR * jnp.finfo(objective.dtype).eps * objective.pack(by_weight, by_intercept)
    return floor.astype(objective.dtype)


Minimize = Callable[..., SolverOutput]
FloorAt = Callable[[Any, SolverOutput], jax.Array]


def minimize_to_floor(
    minimize: Minimize,
    objective: LogisticObjective,
    theta: jax.Array,
    tol: jax.Array,
    max_iter: jax.Array,
    *operands,
    static: jax.Array | None = None,
    floor_at: FloorAt | None = None,
    verbose: bool = False,
) -> SolverOutput:
    """Minimise to `tol`, or to the precision floor where that is above it.

    First to max(tol, static floor) (`attainable_tolerance`); then, as long as a run converged
    with some gradient entry above max(tol, min(static, the floor at the point reached))
    (`rounding_floor`) and iterations are left, on from that point to that tolerance: the floor
    moves with the point, and a run that converged to the floor where it started can end
    above the floor where it stopped. The last run's result is returned, with the counts of
    all; a run whose line search failed with every entry within max(tol, the floor at its
    point) is reported `CONVERGED` (the gradient is rounding there). The first run's point was
    returned before when the second did not converge, although the floor there showed it was
    not optimal (raw digits at C = 1e4 with `Newton`: 0.12 above the optimum, `CONVERGED`).
    The runs are rounds of one loop, so the solver is traced and compiled once; with
    `verbose`, at most three runs, each compiled. In float64 only the first run is made.

    Args:
        minimize: (objective, θ₀, tol [P], max_iter, *operands) -> `SolverOutput` whose
            evaluation is `objective.evaluate`'s; closes over no traced value.
        objective: the problem.
        theta: [P] starting point.
        tol: scalar tolerance asked for.
        max_iter: most iterations in all.
        *operands: more traced arguments of `minimize` (a preconditioner's setup).
        static: `attainable_tolerance(objective, tol)` when already computed (a path's fits
            share it: it does not depend on l2), or None.
        floor_at: (objective, output) -> the floor [P] at the output's point, for an
            objective that is not a `LogisticObjective` in memory (the streamed fit sums it
            chunk by chunk); None: `rounding_floor` from the output's log-probabilities.
        verbose: print a line when the fit goes on to a lower floor (at most three runs).

    Returns:
        The last run's `SolverOutput` (its status as above), with the counts of all runs.
    """
    tol = jnp.asarray(tol, objective.dtype)
    max_iter = jnp.asarray(max_iter, jnp.int32)
    floor_at = _floor_from_log_probs if floor_at is None else floor_at

    def bound(objective, output, static):
        return floor_at(objective, output)

    if static is None:
        static = attainable_tolerance(objective, tol)
    if jnp.finfo(objective.dtype).bits >= 64:
        # float64's static floor passes the default tol only for columns of mean size ~5e6:
        # its programs stay one run, without the second round's compilation (0.3 to 0.5 s).
        return minimize(objective, theta, static, max_iter, *operands)
    zero = jnp.zeros((), jnp.int32)
    # The first round replaces every field; only the evaluation's structure is needed.
    shapes = jax.eval_shape(
        lambda theta: objective.evaluate(theta, objective.predictor(theta)), theta
    )
    placeholder = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
    start = SolverOutput(theta, placeholder, zero, zero + RUNNING, zero)
    settings = (objective, tol, static, max_iter, operands)

    def round_(settings, state):
        objective, tol, static, max_iter, operands = settings
        kept, current, again = state
        left = jnp.where(again, max_iter - kept.n_iter, 0)  # none for a member that is done
        output = minimize(objective, kept.theta, current, left, *operands)
        grad = jnp.abs(output.evaluation.grad)
        n_iter = kept.n_iter + output.n_iter
        # A run that converged with some entry above tol met a floor, perhaps the static one.
        floored = (output.status == Status.CONVERGED) & (n_iter < max_iter)
        floored = floored & jnp.any(grad > tol)
        stalled = output.status == Status.LINE_SEARCH_FAILED
        point = batch_cond(again & (floored | stalled), bound, _static, objective, output, static)
        # A line search that failed with every entry within the floor at its point met the
        # rounding there (the static floor leaves out the logits' rounding, which offset
        # features make the larger part). Not so a run stopped at max_iter: it was still
        # making progress, which float32 could see (on raw breast cancer at C = 1e8, 0.13
        # above the optimum, where large |θ| made the floor at the point 40 times the static
        # one).
        settled = stalled & jnp.all(grad <= jnp.maximum(tol, point))
        status = jnp.where(settled, Status.CONVERGED, output.status).astype(output.status.dtype)
        output = output._replace(
            status=status,
            n_iter=n_iter,
            n_hessian_products=kept.n_hessian_products + output.n_hessian_products,
        )
        kept = jax.tree.map(lambda old, new: jnp.where(again, new, old), kept, output)
        lowered = jnp.maximum(tol, jnp.minimum(static, point))
        again = again & floored & jnp.any(grad > lowered)
        previous, current = current, jnp.where(again, lowered, current)
        if verbose:  # the next run's iterations start from the printer's output
            kept = kept._replace(n_iter=kept.n_iter + print_lowered(again, current, previous))
        return kept, current, again

    state = (start, static, jnp.ones((), bool))
    if verbose:
        # A host callback (the verbose lines) cannot sit in a loop whose predicate `vmap`
        # batches: with `verbose` the runs are calls, at most three, and the solver is compiled
        # for each.
        state = round_(settings, state)
        for _ in range(2):
            state = batch_cond(state[2], round_, lambda settings, state: state, settings, state)
    else:
        state = while_loop(lambda state: state[2], functools.partial(round_, settings), state)
    return state[0]


def _floor_from_log_probs(objective: LogisticObjective, output: SolverOutput) -> jax.Array:
    return rounding_floor(objective, output.theta, output.evaluation.log_probs)


def _static(objective, output, static):
    return static
