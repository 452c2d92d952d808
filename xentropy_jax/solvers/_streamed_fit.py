"""`fit_logistic_regression_streamed`: the same fit, with the rows read chunk by chunk."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._checks import check_flag, check_real, python_float, python_int
from .._checks import is_concrete as _is_concrete
from .._linear import centring_shift
from .._precision import full_precision
from .._streamed import (
    IteratedChunks,
    RowChunks,
    StreamedLogisticObjective,
    _ChunkSource,
    hold,
    is_chunk_iterable,
    release,
)
from ._collinear import (
    MAX_PROJECTED_COLUMNS,
    centred_collinear_columns,
    collinear_columns_of_gram,
    point_kept,
    point_sums,
    project_minimum_norm,
)
from ._convergence import max_abs
from ._fit import (
    _resolve_solver,
    check_l2_fits,
    check_tol_and_max_iter,
    fits_centred,
    known_positive,
    setting_status,
    square_limit,
    symmetric_params,
    warn_collinear_columns,
    warn_empty_classes,
    warn_small_columns,
)
from ._floor import minimize_to_floor, rounding_floor, static_floor
from ._loop import Solver, SolverOutput
from ._result import FitError, FitResult, Status
from ._sharding import with_auto_axes
from ._sparse_input import is_scipy_sparse


def _scan(
    source: _ChunkSource, num_classes: int, fit_intercept: bool, gram: bool
) -> tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One pass on the host: the input checks, the total weight and Σᵢ ŵᵢ·|x_ij| per column.

    The column sums give the precision floor of the tolerance (`attainable_tolerance`). With
    `gram`, also X̃ᵀ·diag(1[w > 0])·X̃ in float64, for the names of collinear columns. With an
    intercept, the centring of the Kronecker preconditioner's basis (`centring_shift`: the
    weighted column means, from Σᵢ ŵᵢ·(xᵢ − x_r) and its squares in float64, x_r the first
    chunk's row of largest weight, so that a constant column's mean is its value exactly), and
    those of the columns whose mean dominates their spread (`newton`, the diagonal
    preconditioner; `centring_shift` with `dominant`).
    """
    # The weights are summed as w·2^(1−e), e the exponent of the largest so far (the sums
    # rescaled exactly when it grows): a sum of weights that overflows is fitted, as in
    # `fit_logistic_regression`, and the fit reads them scaled the same way (`weight_shift`).
    exponent, total, scale, weighted, products = None, 0.0, None, np.zeros(num_classes, bool), None
    largest, largest_rows, peaks = 0.0, "", 0.0
    reference, deviation, square = None, None, None
    for start, X, labels, weights in source.checked():
        dtype = source.dtype
        rows = f"rows {start} to {start + len(labels) - 1}"
        if not jnp.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
            raise TypeError(f"X must be real and numeric, got dtype {X.dtype} ({rows})")
        if X.ndim != 2 or X.shape[1] < 1:
            # It failed inside the compiled scan ("carry input and carry output must have
            # equal types"), as an intercept-only model did in the in-memory fit.
            raise ValueError(
                f"X has no feature columns (an intercept-only model is not supported) ({rows})"
            )
        if not np.all(np.isfinite(X)):
            raise ValueError(f"X contains NaN or infinity (in {rows})")
        # Checked against the fit's dtype once every chunk has told its own (a float32 chunk
        # read before a float64 one was held to float32's limit, and refused), and at once
        # against the widest dtype the fit may take, before the sums below overflow.
        column_peaks = np.max(np.abs(X), axis=0, initial=0).astype(np.float64)
        peaks = np.maximum(peaks, column_peaks)
        here = float(np.max(column_peaks, initial=0))
        if here > largest:
            largest, largest_rows = here, rows
        widest = np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)
        if here > square_limit(widest):
            _refuse_range(here, rows, widest)
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype} ({rows})")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) ({rows})")
        if weights is None:
            weights = np.ones(len(labels))
        try:  # strings and objects were converted by NumPy (the in-memory fit refuses them)
            check_real("sample_weight", weights)
        except TypeError as error:
            raise TypeError(f"{error} ({rows})") from None
        weights = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(weights) & (weights >= 0)):
            raise ValueError(f"sample_weight must be finite and >= 0 ({rows})")
        X = X.astype(dtype, copy=False)
        peak = weights.max(initial=0.0)
        if peak > 0 and (exponent is None or np.frexp(peak)[1] > exponent):
            grown, exponent = exponent, int(np.frexp(peak)[1])
            if grown is not None:
                total, scale = np.ldexp(total, grown - exponent), np.ldexp(scale, grown - exponent)
                if deviation is not None:
                    deviation = np.ldexp(deviation, grown - exponent)
                    square = np.ldexp(square, grown - exponent)
        scaled = weights if exponent is None else np.ldexp(weights, 1 - exponent)
        total += float(scaled.sum())
        rows = X.astype(np.float64)  # once per chunk, for every sum below
        part = np.abs(rows).T @ scaled
        scale = part if scale is None else scale + part
        if fit_intercept and len(labels):
            if reference is None:
                reference = rows[int(np.argmax(weights))]
            deviations = rows - reference
            shifted, squares = deviations.T @ scaled, np.square(deviations).T @ scaled
            deviation = shifted if deviation is None else deviation + shifted
            square = squares if square is None else square + squares
        weighted |= np.bincount(labels[weights > 0], minlength=num_classes) > 0
        if gram and source.num_features + int(fit_intercept) <= MAX_PROJECTED_COLUMNS:
            kept = rows[weights > 0]
            if fit_intercept:
                kept = np.concatenate([kept, np.ones((len(kept), 1))], axis=1)
            products = kept.T @ kept if products is None else products + kept.T @ kept
    if largest > square_limit(source.dtype):
        _refuse_range(largest, largest_rows, source.dtype)
    if gram:  # l2 may be 0 (see `warn_small_columns`)
        warn_small_columns(np.atleast_1d(peaks), source.dtype, stacklevel=4)
    if not total > 0:
        raise ValueError("sample_weight sums to zero")
    # The largest weight read in the fit is in [1, 2): the sum cannot overflow, nor every
    # weight be subnormal (XLA's CPU backend flushes those to zero; a tiny weight beside a
    # large one still counts as 0, as in `fit_logistic_regression`).
    source.weight_shift = 1 - exponent
    if fit_intercept:
        warn_empty_classes(np.flatnonzero(~weighted), stacklevel=4)
    means = None
    if reference is not None:
        moments = (reference, deviation / total, square / total, source.dtype)
        means = (centring_shift(*moments), centring_shift(*moments, dominant=True))
    return total, scale / total, products, means


def _refuse_range(largest: float, rows: str, dtype: np.dtype) -> None:
    """Raise the ValueError for entries whose squares overflow `dtype` (float64 as the remedy)."""
    raise ValueError(
        f"X has entries beyond {square_limit(dtype):.3g} ({rows}, up to {largest:.3g}): their "
        f"squares overflow {dtype.name}. Scale the features"
        + (", or fit in float64." if dtype != np.float64 else ".")
    )


@functools.partial(
    jax.jit,
    static_argnames=("chunks", "num_classes", "fit_intercept", "reference_class", "solver"),
)
@full_precision
def _fit_streamed(
    l2,
    total_weight,
    column_scale,
    means,
    tol,
    max_iter,
    token,
    *,
    chunks,
    num_classes,
    fit_intercept,
    reference_class,
    solver,
) -> FitResult:
    # One program per `ChunkLayout`: the data object itself comes in through `token`.
    objective = StreamedLogisticObjective(
        l2=jnp.asarray(l2, chunks.dtype),
        total_weight=jnp.asarray(total_weight, chunks.dtype),
        token=jnp.asarray(token, jnp.int32),
        shift=None if means is None else jnp.asarray(means[0], chunks.dtype),
        dominant_shift=None if means is None else jnp.asarray(means[1], chunks.dtype),
        chunks=chunks,
        num_classes=num_classes,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
    )
    layout = objective._layout
    # The per-parameter floor of `attainable_tolerance`, from the scan's column sums.
    floor = static_floor(layout, column_scale)
    # The data were checked on the host; l2 and tol traced by a caller's `jit` are checked here,
    # as `fit_logistic_regression` does (a negative tol reported CONVERGED).
    invalid = setting_status(l2, tol, chunks.dtype)

    def minimize(objective, theta, tol, max_iter):
        return solver.minimize(objective, theta, tol=tol, max_iter=max_iter)

    output = minimize_to_floor(
        minimize,
        objective,
        jnp.zeros((objective.num_params,), chunks.dtype),
        tol,
        jnp.where(invalid == Status.CONVERGED, max_iter, 0),
        static=jnp.maximum(jnp.asarray(tol, chunks.dtype), floor),
        floor_at=_rounding_floor,
    )
    status = jnp.where(invalid == Status.CONVERGED, output.status, invalid)
    # With l2 = 0 and collinear columns, the optimum of least norm (two more passes: the Gram,
    # then the test that the projection keeps the point).
    rows = chunks.num_features + int(fit_intercept)
    theta = project_minimum_norm(
        lambda data: data.feature_gram(),
        rows,
        objective.num_rows,
        objective.l2,
        output.theta,
        _keeps_the_point,
        objective,
        transposable=False,
    )
    weights, intercept = symmetric_params(*layout.expand(theta), objective.l2, reference_class)
    return FitResult(
        params=(weights, intercept),
        loss=output.evaluation.loss,
        converged=status == Status.CONVERGED,
        n_iter=output.n_iter,
        grad_norm=max_abs(output.evaluation.grad),
        status=status,
        n_hessian_products=output.n_hessian_products,
    )


def _keeps_the_point(
    removed: jax.Array, gram: jax.Array, theta: jax.Array, objective: StreamedLogisticObjective
) -> jax.Array:
    """The in-memory fit's test of its final projection (`minimum_norm`), chunk by chunk.

    Removing `removed` keeps θ if it moves the logits by no more than their rounding and the
    objective by no more than its own: one pass for Σ w‖X̃·removed‖², f(θ) and f(θ − removed).
    Used only with l2 = 0, so the sums carry no penalty.
    """
    zero = jnp.zeros((), objective.dtype)
    sums = objective._sum_over_chunks(
        lambda chunk: point_sums(chunk, theta, removed), (zero, zero, zero)
    )
    return point_kept(sums, gram, theta)


def _rounding_floor(objective: StreamedLogisticObjective, output: SolverOutput) -> jax.Array:
    """`rounding_floor` at the output's point, summed chunk by chunk: one more pass.

    Each chunk's part is the in-memory bound of its rows (their weights already divided by the
    total, no penalty); the penalty's part, 8·eps·l2·|w_jk|, is the bound of the row-less
    objective that carries l2 (`_layout`), added once.
    """
    theta = output.theta
    floor = objective._sum_over_chunks(
        lambda chunk: rounding_floor(chunk, theta), jnp.zeros_like(theta)
    )
    return floor + rounding_floor(objective._layout, theta)


def fit_logistic_regression_streamed(
    X: ArrayLike | Callable[[], Iterator[tuple]] | Iterable[tuple],
    labels: ArrayLike | None = None,
    num_classes: int | None = None,
    *,
    chunk_rows: int = 65_536,
    sample_weight: ArrayLike | None = None,
    l2: float = 0.0,
    fit_intercept: bool = True,
    reference_class: bool = False,
    solver: str | Solver = "newton-cg",
    tol: float = 1e-8,
    max_iter: int = 100,
    verbose: bool = False,
    throw: bool = True,
) -> FitResult:
    """`fit_logistic_regression` with the rows read in chunks: data larger than memory.

    The rows come in one of two forms:

    * X (and labels, sample_weight) sliceable by rows, such as a memory-mapped array
      (``np.load("X.npy", mmap_mode="r")``), an HDF5 or a zarr dataset, a SciPy CSR matrix, read
      `chunk_rows` rows at a time;
    * X a source of chunks, each a tuple (X_c [m_c, d], labels_c [m_c]) or (X_c, labels_c,
      weights_c), with labels and sample_weight left out: a function that returns a fresh
      iterator over the chunks each time it is called (a generator function, or e.g.
      ``lambda: ((np.load(f"X{i}.npy", mmap_mode="r"), np.load(f"y{i}.npy")) for i in
      range(n))``), or an iterable that starts over when iterated again (a list). A one-shot
      generator is refused (`TypeError`): every pass needs the chunks again. Chunks may have
      different lengths; each is padded to the longest with zero-weight rows, so one program is
      compiled (`chunk_rows` does not apply). Sparse chunks (SciPy, BCOO) are densified one by
      one. Every pass must give the same chunks: their shapes
      are checked at each pass, their values only in the checking pass.

    The solver runs as one compiled program, compiled once per chunk layout (not per data
    object); each pass over the data reads the chunks one after another from the host (a
    `jax.pure_callback`), so memory holds one chunk of rows and a few parameter vectors, never
    X. Called under a caller's `jit` or `vmap` (traced), it keeps the data referenced for the
    life of the process, since the caller's program may run again later.
    It is not differentiable (the reads are callbacks; `jax.grad` through it fails): derivatives
    through a fit need `fit_logistic_regression`.
    The probabilities are recomputed chunk by chunk at every pass: one pass for the loss and
    gradient, one per Hessian product (CG step), one per line-search trial, plus the
    preconditioner's (see `StreamedLogisticObjective`). Before that, one pass on
    the host checks every chunk (finite X, x² within range, integer labels in [0, K), finite
    weights >= 0) and sums what the precision floor of `tol` needs. A float32 fit that stops at
    that floor with some entry above the floor at its point (`rounding_floor`, one more pass)
    goes on from there, as in memory (`minimize_to_floor`).

    The objective, the solvers and the result are those of `fit_logistic_regression` (same
    optimum, to rounding). With l2 = 0 and exactly collinear columns of X̃ = [X, 1], the result
    is the optimum of least norm, as in memory (two more passes: the Gram X̃ᵀŴX̃, and the test
    that the projection keeps the point), and a
    `CollinearityWarning` names the columns (the checking pass sums X̃ᵀX̃ on the host).

    Args:
        X: [N, d] features sliceable by rows (float64 stays float64 with x64 on), or a source
            of chunks as above (fitted in float64 with x64 on if any chunk is float64).
        labels: [N] integer labels in [0, num_classes), sliceable by rows; None with chunks.
        num_classes: K >= 2.
        chunk_rows: rows per chunk of a sliceable X (the last chunk is padded with zero-weight
            rows).
        sample_weight: [N] weights >= 0 or None; None with chunks (they carry their weights).
        l2: L2 strength on W, as `fit_logistic_regression`.
        fit_intercept: fit the unpenalised intercept.
        reference_class: fix class 0's column and intercept at zero.
        solver: "newton", "newton-cg", "trust-region" or a solver configuration.
        tol: as `fit_logistic_regression` (raised per parameter to its rounding level).
        max_iter: most outer iterations.
        verbose: print the number of passes over the data at the end.
        throw: raise `FitError` when the fit does not converge. Inside a caller's `jit` (the
            chunks are still read on the host) the status is traced: check it there, as
            neither `throw` nor `verbose` can.

    Returns:
        A `FitResult`.

    Raises:
        ValueError, TypeError: bad input, found by the checking pass (the message names the
            rows), a one-shot iterator, or chunks that change between passes.
        FitError: `throw=True` and the fit did not converge.

    Warns:
        CollinearityWarning: l2 = 0 and columns of X (with the intercept) are exactly collinear.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(1000, 3)), rng.integers(0, 3, 1000)
        >>> whole = xj.fit_logistic_regression(X, y, 3, l2=0.01)
        >>> chunked = xj.fit_logistic_regression_streamed(X, y, 3, l2=0.01, chunk_rows=300)
        >>> bool(np.allclose(chunked.params[0], whole.params[0], atol=1e-5))
        True
        >>> def chunks():  # a fresh iterator per pass; the last chunk is shorter
        ...     for start in range(0, 1000, 300):
        ...         yield X[start : start + 300], y[start : start + 300]
        >>> iterated = xj.fit_logistic_regression_streamed(chunks, num_classes=3, l2=0.01)
        >>> bool(np.allclose(iterated.params[0], whole.params[0], atol=1e-5))
        True
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        hint = ""
        if labels is not None and isinstance(labels, numbers.Integral):
            hint = " (with chunks, pass it by keyword: num_classes=K)"
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}{hint}")
    if not (isinstance(chunk_rows, numbers.Integral) and chunk_rows >= 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    l2, tol, max_iter = python_float(l2, "l2"), python_float(tol, "tol"), python_int(max_iter)
    check_tol_and_max_iter(tol, max_iter)
    if _is_concrete(l2) and not (np.ndim(l2) == 0 and np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite scalar >= 0, got {l2!r}")
    fit_intercept = check_flag("fit_intercept", fit_intercept)
    reference_class = check_flag("reference_class", reference_class)
    verbose, throw = check_flag("verbose", verbose), check_flag("throw", throw)
    x64 = bool(jax.config.jax_enable_x64)
    if labels is not None and isinstance(X, (list, tuple)):
        # Rows as nested lists (which the in-memory fit takes), not chunks: labels are given.
        try:
            rows = np.asarray(X)
        except ValueError:  # ragged: chunks after all, refused below
            rows = None
        if rows is not None and rows.ndim == 2 and rows.dtype.kind in "biuf":
            X = rows
    if is_chunk_iterable(X):
        if labels is not None or sample_weight is not None:
            raise ValueError(
                "X is given as chunks: the labels and weights come in the chunks, "
                "(X_c, labels_c) or (X_c, labels_c, weights_c); leave labels and sample_weight "
                "out"
            )
        source = IteratedChunks(X, x64)
    else:
        if labels is None or np.ndim(X) != 2 or len(labels) != X.shape[0]:
            raise ValueError(
                "X must be 2-D [N, d] and labels [N], or X a source of chunks (a function "
                "returning an iterator of (X_c, labels_c) tuples, or a list of them)"
            )
        if X.shape[0] == 0:
            raise ValueError("X has no rows")
        if np.ndim(labels) != 1:  # [N, 1] failed in NumPy ("object too deep")
            raise ValueError(f"labels must have shape ({X.shape[0]},), got {np.shape(labels)}")
        if sample_weight is not None and np.shape(sample_weight) != (X.shape[0],):
            raise ValueError(
                f"sample_weight must have shape ({X.shape[0]},), got {np.shape(sample_weight)}"
            )
        if is_scipy_sparse(X) and X.format not in ("csr", "csc", "lil", "dok"):
            X = X.tocsr()  # COO, DIA and BSR matrices cannot be sliced by rows
        # A DataFrame has no single dtype: its first row's says what its values convert to.
        x_dtype = X.dtype if hasattr(X, "dtype") else np.asarray(X[:1]).dtype
        dtype = np.float64 if x64 and np.dtype(x_dtype) == np.float64 else np.float32
        # JAX arrays sharded over Explicit mesh axes are sliced on Auto ones, as the in-memory
        # fit takes them (slicing them raised a ShardingTypeError from inside JAX).
        X, labels = with_auto_axes(X), with_auto_axes(labels)
        if sample_weight is not None:
            sample_weight = with_auto_axes(sample_weight)
        source = RowChunks(X, labels, sample_weight, chunk_rows, dtype)

    # The Gram for naming collinear columns is summed in the checking pass when it can matter.
    # (A traced l2, as under a caller's `jit`, may be 0 but cannot be known to be: no warning.)
    # In the fit's dtype (l2 = 1e-50 is 0 in float32), which iterated chunks tell only once
    # read: until then the narrowest, float32, decides whether the Gram is summed.
    def is_zero(dtype: np.dtype) -> bool:
        return _is_concrete(l2) and not known_positive(l2, dtype)

    unpenalised = is_zero(getattr(source, "dtype", None) or np.float32)
    total, column_scale, gram, means = _scan(
        source, int(num_classes), bool(fit_intercept), unpenalised
    )
    check_l2_fits(l2, source.dtype)
    if gram is not None and is_zero(source.dtype):
        if fits_centred(_resolve_solver(solver), source.dtype, source.num_features, fit_intercept):
            columns, rank, _ = centred_collinear_columns(gram, source.dtype)
        else:
            columns, rank = collinear_columns_of_gram(gram.astype(source.dtype))
        warn_collinear_columns(
            columns, rank, source.num_features, bool(fit_intercept), source.dtype, stacklevel=3
        )
    token = hold(source)
    try:
        result = _fit_streamed(
            l2,
            total,
            column_scale,
            means,
            tol,
            max_iter,
            token,
            chunks=source.layout,
            num_classes=int(num_classes),
            fit_intercept=bool(fit_intercept),
            reference_class=bool(reference_class),
            solver=_resolve_solver(solver),
        )
        if not _is_concrete(result.status):
            # Under a caller's `jit` or `vmap`: status is traced, and the caller's program may
            # run any number of times later, so its source stays held.
            return result
        jax.block_until_ready(result)  # the reads are over
    except BaseException as error:
        release(token)
        if source.failure is not None and source.failure is not error:
            raise source.failure from error  # a chunk's own error, not XLA's wrapper of it
        raise
    release(token)
    status = int(result.status)
    if verbose:
        passes = source.reads / source.num_chunks
        print(
            f"{int(result.n_iter)} iterations, {int(result.n_hessian_products)} Hessian products, "
            f"{passes:g} passes over {source.num_chunks} chunks of {source.chunk_rows} rows "
            f"(plus the checking pass); status {Status(status).name}"
        )
    if throw and status != Status.CONVERGED:
        raise FitError(result)
    return result
