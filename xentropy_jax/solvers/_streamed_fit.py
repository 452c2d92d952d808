"""`fit_logistic_regression_streamed`: the same fit, with the rows read chunk by chunk."""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._streamed import RowChunks, StreamedLogisticObjective
from ._convergence import max_abs
from ._fit import _FLOOR_FACTOR, _resolve_solver
from ._loop import Solver
from ._result import FitError, FitResult, Status


def _scan(source: RowChunks, num_classes: int, fit_intercept: bool) -> tuple[float, np.ndarray]:
    """One pass on the host: the input checks, the total weight and Σᵢ ŵᵢ·|x_ij| per column.

    The column sums give the precision floor of the tolerance (`attainable_tolerance`).
    """
    dtype = source.dtype
    limit = np.sqrt(np.finfo(dtype).max) / 1e3
    total, scale = 0.0, np.zeros(source.num_features)
    mass = np.zeros(num_classes)
    for index in range(source.num_chunks):
        X, labels, weights = source.rows(index)
        start = index * source.chunk_rows
        raw = np.asarray(source.X[start : start + source.chunk_rows])
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"X contains NaN or infinity (in rows {start} onwards)")
        if np.max(np.abs(raw), initial=0) > limit:
            raise ValueError(
                f"X has entries beyond {limit:.3g} (rows {start} onwards): their squares overflow "
                f"{dtype.name}. Scale the features, or fit in float64."
            )
        raw_labels = np.asarray(source.labels[start : start + source.chunk_rows])
        if not np.issubdtype(raw_labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {raw_labels.dtype}")
        if raw_labels.min() < 0 or raw_labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) (rows {start} onwards)")
        if source.weights is not None:
            raw_weights = np.asarray(source.weights[start : start + source.chunk_rows], float)
            if not np.all(np.isfinite(raw_weights) & (raw_weights >= 0)):
                raise ValueError("sample_weight must be finite and >= 0")
        weights = weights.astype(np.float64)
        total += float(weights.sum())
        scale += np.abs(X).T.astype(np.float64) @ weights
        mass += np.bincount(labels, weights=weights, minlength=num_classes)
    if not total > 0:
        raise ValueError("sample_weight sums to zero")
    if fit_intercept and np.any(mass <= 0):
        raise ValueError(
            f"classes {np.flatnonzero(mass <= 0).tolist()} have no samples: their intercepts "
            "have no finite optimum"
        )
    return total, scale / total


@functools.partial(
    jax.jit,
    static_argnames=("source", "num_classes", "fit_intercept", "reference_class", "solver"),
)
def _fit_streamed(
    l2,
    total_weight,
    column_scale,
    tol,
    max_iter,
    *,
    source,
    num_classes,
    fit_intercept,
    reference_class,
    solver,
) -> FitResult:
    objective = StreamedLogisticObjective(
        l2=jnp.asarray(l2, source.dtype),
        total_weight=jnp.asarray(total_weight, source.dtype),
        source=source,
        num_classes=num_classes,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
    )
    layout = objective._layout
    # The per-parameter floor of `attainable_tolerance`, from the scan's column sums.
    scale = column_scale.astype(source.dtype)
    if fit_intercept:
        scale = jnp.concatenate([scale, jnp.ones((1,), scale.dtype)])
    floor = jnp.repeat(_FLOOR_FACTOR * jnp.finfo(source.dtype).eps * scale, layout.num_free_classes)
    output = solver.minimize(
        objective,
        jnp.zeros((objective.num_params,), source.dtype),
        tol=jnp.maximum(jnp.asarray(tol, source.dtype), floor),
        max_iter=max_iter,
    )
    weights, intercept = layout.expand(output.theta)
    if not reference_class:
        intercept = intercept - jnp.mean(intercept)
        centred = weights - jnp.mean(weights, axis=1, keepdims=True)
        weights = jnp.where(objective.l2 == 0, centred, weights)
    return FitResult(
        params=(weights, intercept),
        loss=output.evaluation.loss,
        converged=output.status == Status.CONVERGED,
        n_iter=output.n_iter,
        grad_norm=max_abs(output.evaluation.grad),
        status=output.status,
        n_hessian_products=output.n_hessian_products,
    )


def fit_logistic_regression_streamed(
    X: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
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

    X (and labels, sample_weight) may be anything sliceable by rows, such as a memory-mapped
    array (``np.load("X.npy", mmap_mode="r")``), an HDF5 or a zarr dataset. The solver runs as
    one compiled program; each pass over the data reads the chunks one after another from the
    host (a `jax.pure_callback`), so memory holds one chunk of rows and a few parameter vectors,
    never X. The probabilities are recomputed chunk by chunk at every pass: one pass for the
    loss and gradient, one per Hessian product (CG step), one per line-search trial, plus the
    preconditioner's (see `StreamedLogisticObjective`). Before that, one pass on the host
    checks the data (NaN, labels, weights) and sums what the precision floor of `tol` needs.

    The objective, the solvers and the result are those of `fit_logistic_regression` (same
    optimum, to rounding); collinear columns with l2 = 0 are not projected to the
    minimum-norm optimum here.

    Args:
        X: [N, d] features, sliceable by rows (float64 stays float64 with x64 on).
        labels: [N] integer labels in [0, num_classes), sliceable by rows.
        num_classes: K >= 2.
        chunk_rows: rows per chunk (the last chunk is padded with zero-weight rows).
        sample_weight: [N] weights >= 0 or None.
        l2: L2 strength on W, as `fit_logistic_regression`.
        fit_intercept: fit the unpenalised intercept.
        reference_class: fix class 0's column and intercept at zero.
        solver: "newton", "newton-cg", "trust-region" or a solver configuration.
        tol: as `fit_logistic_regression` (raised per parameter to its rounding level).
        max_iter: most outer iterations.
        verbose: print the number of passes over the data at the end.
        throw: raise `FitError` when the fit does not converge.

    Returns:
        A `FitResult`.

    Raises:
        ValueError, TypeError: bad input, found by the checking pass.
        FitError: `throw=True` and the fit did not converge.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> rng = np.random.default_rng(0)
        >>> X, y = rng.normal(size=(1000, 3)), rng.integers(0, 3, 1000)
        >>> whole = xj.fit_logistic_regression(X, y, 3, l2=0.01)
        >>> chunked = xj.fit_logistic_regression_streamed(X, y, 3, l2=0.01, chunk_rows=300)
        >>> bool(np.allclose(chunked.params[0], whole.params[0], atol=1e-5))
        True
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if np.ndim(X) != 2 or len(labels) != X.shape[0]:
        raise ValueError("X must be 2-D [N, d] and labels [N]")
    if sample_weight is not None and len(sample_weight) != X.shape[0]:
        raise ValueError("sample_weight must have one value per row of X")
    if not (isinstance(chunk_rows, numbers.Integral) and chunk_rows >= 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if not (np.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be finite and >= 0, got {l2!r}")
    x64 = jax.config.jax_enable_x64 and np.dtype(X.dtype) == np.float64
    source = RowChunks.of(X, labels, sample_weight, chunk_rows, np.float64 if x64 else np.float32)
    total, column_scale = _scan(source, int(num_classes), bool(fit_intercept))
    reads = source.reads
    result = _fit_streamed(
        l2,
        total,
        column_scale,
        tol,
        max_iter,
        source=source,
        num_classes=int(num_classes),
        fit_intercept=bool(fit_intercept),
        reference_class=bool(reference_class),
        solver=_resolve_solver(solver),
    )
    status = int(result.status)
    if verbose:
        passes = (source.reads - reads) / source.num_chunks
        print(
            f"{int(result.n_iter)} iterations, {int(result.n_hessian_products)} Hessian products, "
            f"{passes:g} passes over {source.num_chunks} chunks of {source.chunk_rows} rows "
            f"(plus the checking pass); status {Status(status).name}"
        )
    if throw and status != Status.CONVERGED:
        raise FitError(result)
    return result
