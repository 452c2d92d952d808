"""Exact collinearity of the features: detection, and the minimum-norm point of an unpenalised fit.

With l2 = 0, a vector v with X̃v = 0 on every weighted row (X̃ = [X, 1] with an intercept) moves
no logit: W + v⊗c has the objective of W for every c. The optimum is then a whole affine set; the
fit returns its point of least ‖θ‖₂, which is what the pseudo-inverse gives for a linear model.
Rank is decided on the Jacobi-scaled Gram S = D·A·D (A = X̃ᵀŴX̃, D = diag(A)^(-1/2)), so that a
column's scale does not decide whether it counts as collinear.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse

from .._batch_cond import batch_cond
from .._linear import LogisticObjective, feature_gram, sparse_feature_gram
from .._precision import full_precision
from ._linalg import eigh, jacobi_scaled, null_cutoff, solve
from ._sparse_input import is_scipy_sparse as scipy_sparse

# Above this many columns (intercept included) the O(d̃³) eigendecomposition is not done inside
# the fit: the unpenalised collinear case keeps the solver's own point (still an optimum).
MAX_PROJECTED_COLUMNS = 4096


def _scaled_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scale [d̃], eigenvalues [d̃] and eigenvectors [d̃, d̃] of D·A·D) of the Gram A."""
    scaled, scale = jacobi_scaled(gram)
    values, vectors = eigh(scaled)
    return scale, values, vectors


def minimum_norm(
    objective: LogisticObjective, theta: jax.Array, *, transposable: bool = True
) -> jax.Array:
    """θ with its components along the features' null space removed, when l2 = 0.

    Θ [d̃, Kf] (θ's rows are the features, then the intercept) becomes (I − P)·Θ with P the
    orthogonal projector onto null(X̃ᵀŴX̃): the same logits on every weighted row, so the same
    objective, and the least norm among all optima. With l2 > 0 the optimum is unique and θ is
    returned unchanged. Cost: one Gram (O(N·d̃²)) and two O(d̃³) factorisations, only when
    l2 = 0 (a branch) and d̃ <= MAX_PROJECTED_COLUMNS; nothing at all, not even in the
    compiled program, when the objective is statically `penalised`.

    `transposable`: True branches with `lax.cond`, linear in θ and transposable, as a
    projection of tangents needs; under `vmap` over l2 it becomes a select that computes the
    projection, Gram included, for every member. False (a fit's final point, never
    transposed) branches with `batch_cond`: a batch whose l2 are all positive, as a
    cross-validation's, skips it, and keeps the projection only if the objective does not rise
    beyond rounding either (`_keeps_the_point`: two more objective evaluations).
    """
    rows = objective.num_features + int(objective.fit_intercept)
    if objective.penalised:
        return theta
    accept = _moves_no_logit if transposable else _keeps_the_point
    return project_minimum_norm(
        feature_gram,
        rows,
        objective.features.shape[0],
        objective.l2,
        theta,
        accept,
        objective,
        transposable,
    )


def _moves_no_logit(
    removed: jax.Array, gram: jax.Array, theta: jax.Array, objective: LogisticObjective
) -> jax.Array:
    """Whether X̃·removed is rounding (`_within_logit_rounding`), measured with X itself.

    The rank is decided on the Gram, whose eigenvalues resolve singular values only down
    to √(d̃·eps) of the largest (7e-4 in float32): columns x and x + 1e-3·noise read as
    collinear, and removing the component the fit had put along them moved the logits and
    raised the objective by 0.9% (float32; 5.8% in float64 at a 1.4e-8 ratio) while the
    fit reported CONVERGED at the optimum's loss. X̃ itself resolves them to eps.
    """
    return _within_logit_rounding(_squared_logit_change(objective, removed), gram, theta)


def _keeps_the_point(
    removed: jax.Array, gram: jax.Array, theta: jax.Array, objective: LogisticObjective
) -> jax.Array:
    """`_moves_no_logit`, and the objective at a fit's point rises by no more than rounding.

    At a large ‖θ‖ (a nearly separable fit without a penalty) the logits' own rounding bound
    lets a component that is null only to float32 precision move them by units: raw breast
    cancer in float32 at l2 = 0 returned parameters whose objective was 3.9 beside a loss of
    0.012. Two objective evaluations (`point_kept`), only when l2 = 0.
    """
    return point_kept(point_sums(objective, theta, removed), gram, theta)


def point_sums(objective: LogisticObjective, theta: jax.Array, removed: jax.Array) -> tuple:
    """(Σᵢ wᵢ‖X̃ᵢ·removed‖², f(θ), f(θ − removed)) over the objective's rows, for `point_kept`.

    Each is a sum over the rows, so that a chunked objective adds them chunk by chunk (the
    streamed fit, whose chunks carry no penalty: it calls this only with l2 = 0).
    """
    return (
        _squared_logit_change(objective, removed),
        objective.value(theta),
        objective.value(theta - removed),
    )


def point_kept(sums: tuple, gram: jax.Array, theta: jax.Array) -> jax.Array:
    """Whether `point_sums` show a change of the logits and of the objective within rounding."""
    squared_change, before, after = sums
    return _within_logit_rounding(squared_change, gram, theta) & _within_objective_rounding(
        before, after
    )


def _squared_logit_change(objective: LogisticObjective, removed: jax.Array) -> jax.Array:
    """Σᵢ wᵢ‖X̃ᵢ·removed‖², over the objective's rows (weights as it holds them)."""
    return jnp.sum(objective.weights[:, None] * objective.predictor(removed) ** 2)


def _within_logit_rounding(squared_change: jax.Array, gram: jax.Array, theta: jax.Array):
    """Whether a weighted RMS logit change √`squared_change` is within the logits' rounding.

    The bound is _MOVE_FACTOR·eps·√trace(A)·‖θ‖, A = X̃ᵀŴX̃ (`gram`), a bound on the rounding
    of the logits X̃θ themselves.
    """
    size = jnp.sqrt(jnp.trace(gram)) * jnp.linalg.norm(theta)
    return jnp.sqrt(squared_change) <= _MOVE_FACTOR * jnp.finfo(theta.dtype).eps * size


def _within_objective_rounding(before: jax.Array, after: jax.Array) -> jax.Array:
    """Whether the objective rises from `before` to `after` by no more than 64·eps·(1 + |f|)."""
    rounding = _MOVE_FACTOR * jnp.finfo(before.dtype).eps * (1 + jnp.abs(before))
    return after <= before + rounding


# A removed component may move the weighted RMS logit by this many eps of √trace(A)·‖θ‖, and
# the objective by this many eps of 1 + |f|.
_MOVE_FACTOR = 64.0


def project_minimum_norm(
    gram,
    rows: int,
    num_rows: int,
    l2: jax.Array,
    theta: jax.Array,
    accept=None,
    data=(),
    transposable=True,
) -> jax.Array:
    """`minimum_norm` with the Gram X̃ᵀŴX̃ [rows, rows] of `num_rows` rows from `gram(data)`.

    Only when l2 = 0.

    For objectives whose Gram is not one matrix product, such as a sum over streamed chunks.
    ``accept(removed, gram, θ, data)``, when given, says whether removing ``removed`` [P] leaves
    the logits unchanged; if not, θ is kept as the solver left it (an optimum, not of least
    norm). `data` (a pytree: the objective) carries every traced array the two functions use;
    `transposable` as in `minimum_norm`.
    """
    if rows > MAX_PROJECTED_COLUMNS:
        return theta

    def project(theta, data):
        matrix = gram(data)
        scale, values, vectors = _scaled_eigh(matrix)
        largest = jnp.max(values, initial=0)
        block = theta.reshape(rows, -1)

        def removed_below(cutoff):
            # null(A) = D·null(S); its orthogonal projector N(NᵀN)⁻¹Nᵀ, with the non-null
            # columns of N zeroed and an identity in their place so that the Gram stays
            # invertible.
            null = values <= cutoff * largest
            basis = scale[:, None] * vectors * null[None, :].astype(vectors.dtype)
            normal = basis.T @ basis + jnp.diag(jnp.where(null, 0, 1).astype(basis.dtype))
            return (basis @ solve(normal, basis.T @ block)).reshape(-1)

        # The Gram's rounding, about √N·eps, can lift an exact null eigenvalue above d̃·eps (a
        # constant column beside the intercept, N = 300: 4.6e-15 against 3.2e-15), where the
        # solvers then kept different optima: first the directions below d̃·√N·eps, then, if
        # removing them moves the logits (columns that X resolves, such as x and x + 1e-7·z),
        # those below d̃·eps alone.
        loose = removed_below(null_cutoff(rows, num_rows, matrix.dtype))
        tight = removed_below(null_cutoff(rows, 1, matrix.dtype))
        if accept is None:
            return theta - tight
        kept = jnp.where(accept(tight, matrix, theta, data), theta - tight, theta)
        return jnp.where(accept(loose, matrix, theta, data), theta - loose, kept)

    branch = lax.cond if transposable else batch_cond
    return branch(l2 == 0, project, lambda theta, data: theta, theta, data)


@jax.jit
def _null_vectors(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    _, values, vectors = _scaled_eigh(gram)
    return vectors, values <= null_cutoff(gram.shape[0], 1, gram.dtype) * jnp.max(values, initial=0)


@full_precision
def collinear_columns(
    X: np.ndarray, sample_weight: np.ndarray | None, fit_intercept: bool
) -> tuple[list[int], int]:
    """The columns of X̃ = [X, 1] that take part in an exact linear dependence, and X̃'s rank.

    Rows of zero weight are left out. Computed in X's precision (float64 with 64-bit mode on).

    Returns:
        (columns, rank): the sorted column indices (d for the intercept) with a non-negligible
        entry in some null vector of the scaled Gram; rank is d̃ minus the number of null vectors.
    """
    with jax.ensure_compile_time_eval():  # concrete X, even inside a caller's `jit`
        features = X if isinstance(X, sparse.BCOO) else jnp.asarray(X)
        gram = _counted_gram(features, sample_weight, fit_intercept=bool(fit_intercept))
        return collinear_columns_of_gram(gram)


@functools.partial(jax.jit, static_argnames="fit_intercept")
def _counted_gram(features, sample_weight, *, fit_intercept: bool) -> jax.Array:
    """X̃ᵀ·diag(1[w > 0])·X̃ [d̃, d̃], one program (its six operations ran one by one, eagerly).

    A sparse X stays sparse (`sparse_feature_gram`).
    """
    weights = jnp.ones(features.shape[0], features.dtype)
    if sample_weight is not None:
        weights = (jnp.asarray(sample_weight) > 0).astype(features.dtype)
    if isinstance(features, sparse.BCOO):
        return sparse_feature_gram(features, weights, fit_intercept)
    if fit_intercept:
        features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
    return features.T @ (weights[:, None] * features)


def collinear_columns_of_gram(gram: jax.Array) -> tuple[list[int], int]:
    """`collinear_columns` from the Gram X̃ᵀ·diag(1[w > 0])·X̃ [d̃, d̃] (in X's precision)."""
    with jax.ensure_compile_time_eval():
        vectors, null = (np.asarray(a) for a in _null_vectors(jnp.asarray(gram)))
    threshold = np.sqrt(np.finfo(vectors.dtype).eps)
    involved = np.any(np.abs(vectors[:, null]) > threshold, axis=1)
    return np.flatnonzero(involved).tolist(), int(gram.shape[0] - np.count_nonzero(null))


# Above this many columns the float64 recheck of a lower-precision decision is skipped: it is an
# O(N·d̃²) product and an O(d̃³) eigendecomposition on the host.
MAX_RECHECKED_COLUMNS = 1024


def float64_counted_rows(X, sample_weight):
    """X's rows of positive weight in float64, dense or CSR (a BCOO never dense whole)."""
    if isinstance(X, sparse.BCOO):
        import scipy.sparse

        indices, data = np.asarray(X.indices), np.asarray(X.data, np.float64)
        kept = np.all(indices < np.asarray(X.shape), axis=1)  # out-of-range padding entries
        features = scipy.sparse.csr_matrix(
            (data[kept], (indices[kept, 0], indices[kept, 1])), shape=X.shape
        )
    else:
        features = np.asarray(X, np.float64)
    if sample_weight is not None:
        features = features[np.flatnonzero(np.asarray(sample_weight) > 0)]
    return features


def _jacobi_scale(gram: np.ndarray) -> np.ndarray:
    """diag(A)^(-1/2), 1 where the diagonal is 0 (all-zero columns)."""
    diagonal = np.diag(gram)
    return np.where(diagonal > 0, 1 / np.sqrt(np.where(diagonal > 0, diagonal, 1)), 1)


def _null_space(gram: np.ndarray) -> tuple:
    """(null [d̃] bool, eigenvectors, Jacobi scale, next eigenvalue) of the scaled Gram."""
    scale = _jacobi_scale(gram)
    values, vectors = np.linalg.eigh(gram * scale[:, None] * scale[None, :])
    null = values <= null_cutoff(gram.shape[0], 1, np.float64) * max(values.max(initial=0), 0)
    next_value = max(float(np.min(values[~null], initial=1.0)), np.finfo(np.float64).tiny)
    return null, vectors, scale, next_value


def _centred_names(gram, shift, rank, involved, threshold) -> np.ndarray:
    """The columns named by the centred Gram's null vectors, where its rank is X̃'s (`rank`).

    Beside a column close to constant the rounding of X̃'s Gram mixes that column, and the
    intercept, into the null vectors of other columns' exact dependence (amplified by m/σ):
    it named 1,000 + z beside make_classification's redundant columns. The centred Gram's null
    vectors name a feature by its own entry, and the intercept by its entry in X̃'s
    variables, b_c − μᵀw over the features named (x₃ = x₁ + x₂ + 5 involves it, x₃ = x₁ + x₂
    does not), Jacobi-scaled as in the Gram. Where the centred rank differs (a dependence
    exact to the data's rounding of magnitudes, such as x and x + 1 of a near-constant x,
    is a near one against the spreads), X̃'s own names (`involved`) stand.
    """
    change = _centring_change(shift)
    null, vectors, scale, _ = _null_space(change.T @ gram @ change)
    if gram.shape[0] - np.count_nonzero(null) != rank:
        return involved
    named = np.any(np.abs(vectors[:, null]) > threshold, axis=1)
    directions = scale[:, None] * vectors[:, null]
    kept = np.where(named[:-1, None], directions[:-1], 0)
    intercept = (directions[-1] - shift @ kept) / scale[-1]
    named[-1] = np.any(np.abs(intercept) > threshold)
    return named


def float64_counted_gram(X, sample_weight, fit_intercept: bool) -> tuple:
    """(rows, X̃ᵀX̃): `float64_counted_rows` and their Gram in float64 (intercept's row last)."""
    features = float64_counted_rows(X, sample_weight)
    gram = features.T @ features
    gram = gram.toarray() if scipy_sparse(gram) else np.asarray(gram)
    if not fit_intercept:
        return features, gram
    sums = np.asarray(features.sum(axis=0), np.float64).reshape(-1)
    count = np.array([[float(features.shape[0])]])
    return features, np.block([[gram, sums[:, None]], [sums[None, :], count]])


# A column counts as resolved by a fit in centred variables when its spread σ exceeds this many
# eps of its root mean square m (`centred_collinear_columns`).
RESOLVED_SPREAD = 1024.0


def centred_collinear_columns(gram: np.ndarray, dtype) -> tuple[list[int], int, np.ndarray]:
    """`collinear_columns_of_gram` in `dtype` for [X − 1·μᵀ, 1], from X̃ᵀX̃ in float64.

    The fits whose Kronecker preconditioner works in centred variables (below float64, dense
    X with an intercept; `centred_feature_gram`) resolve a column c + δ·z beside the
    intercept that the uncentred Gram in `dtype` counts as collinear with it (a scaled
    eigenvalue of order (δ/c)², below float32's eps for δ/c = 1e-4): they reach the float64
    optimum there, and the rank is decided on the centred Gram A_c = CᵀAC, C = [[I, 0], [−μᵀ,
    1]], which spans the same columns. It is formed here in float64 (its rounding about
    eps₆₄·(m/σ)² relative) and rounded to `dtype`. A column centres only where σ >
    `RESOLVED_SPREAD`·eps·m (1.2e-4 in float32): closer to constant, the fits' logits in the
    model's variables carry a rounding of about 2·eps·m/σ relative along it, and float32 fits
    stopped 1e-6 to 2e-6 above the optimum at σ/m = 3e-5 to 4e-5 and up to 2e-5 at 1e-5 to
    5e-6 (against 1e-9 at 1e-3 and 5e-8 at 1e-4), which the warning keeps saying. A constant
    column (σ = 0) stays uncentred, collinear with the intercept.

    Args:
        gram: [d + 1, d + 1] X̃ᵀX̃ of the counted rows in float64, the intercept's row last.
        dtype: the fit's precision.

    Returns:
        (columns, rank, shift): as `collinear_columns`, and μ [d] (0 for the columns left
        uncentred), for `float64_collinear_columns`.
    """
    count = gram[-1, -1]
    mean = gram[-1, :-1] / count
    square = np.diag(gram)[:-1] / count
    spread = np.sqrt(np.clip(square - mean**2, 0, None))
    resolved = spread > RESOLVED_SPREAD * np.finfo(dtype).eps * np.sqrt(square)
    shift = np.where(resolved, mean, 0.0)
    change = _centring_change(shift)
    return *collinear_columns_of_gram((change.T @ gram @ change).astype(dtype)), shift


def _centring_change(shift: np.ndarray) -> np.ndarray:
    """C = [[I, 0], [−μᵀ, 1]] [d + 1, d + 1]: X̃·C = [X − 1·μᵀ, 1]."""
    change = np.eye(shift.size + 1)
    change[-1, :-1] = -shift
    return change


def float64_collinear_columns(
    X: np.ndarray,
    sample_weight: np.ndarray | None,
    fit_intercept: bool,
    counted: tuple | None = None,
    shift: np.ndarray | None = None,
) -> tuple[list[int], int, np.ndarray, float]:
    """`collinear_columns` in float64 with NumPy, whatever the fit's precision, and how exactly.

    A float32 fit decides rank in float32, where nearly dependent columns count; this says
    whether they are dependent in float64 too (an all-zero or a duplicated column is). The
    Gram resolves singular values only down to √(d̃·eps) of the largest (4e-8 in float64 at
    d̃ = 7), so that columns x and x + 1e-9·z count as collinear there too. X itself tells
    them apart: the singular values of X̃·D·V (D the Jacobi scaling, so that X̃·D has columns
    of unit norm; V the null vectors) are the norms of X̃·D·v over the null space's
    directions: 5e-10 for that pair; 0 for a repeated column, a few eps for one computed as a
    sum of others.

    The null vectors come from the Gram, whose rounding (about d̃·√N·eps) turns them by up to
    that over the next eigenvalue λ₂, which adds up to d̃·√N·eps/√λ₂ to their images: offset
    columns beside the intercept (λ₂ small) gave 2e-15 for a repeated column. That bound is
    the fourth number: images below it are not resolved from 0. `counted`: the
    `float64_counted_gram` of X, where the caller has it. `shift` (with an intercept, from
    `centred_collinear_columns`): the columns are named from the Gram of [X − 1·μᵀ, 1] where
    it has the same rank (`_centred_names`); rank, dependences and resolution are X̃'s.

    Returns:
        (columns, rank, dependences, resolution): as `collinear_columns`, the singular values,
        one per null direction, largest first, and the bound on their rounding.
    """
    features, gram = counted or float64_counted_gram(X, sample_weight, fit_intercept)
    null, vectors, scale, next_value = _null_space(gram)
    threshold = np.sqrt(np.finfo(np.float64).eps)
    involved = np.any(np.abs(vectors[:, null]) > threshold, axis=1)
    directions = scale[:, None] * vectors[:, null]  # [d̃, nulls]
    rank = int(gram.shape[0] - np.count_nonzero(null))
    if shift is not None:
        involved = _centred_names(gram, shift, rank, involved, threshold)
    images = np.asarray(features @ directions[: features.shape[1]])  # X̃·D·V
    if fit_intercept:
        images = images + directions[-1]
    dependences = np.linalg.svd(images, compute_uv=False) if images.size else np.zeros(0)
    resolution = null_cutoff(gram.shape[0], features.shape[0], np.float64) / np.sqrt(next_value)
    return np.flatnonzero(involved).tolist(), rank, dependences, resolution
