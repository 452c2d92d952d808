"""`fit_logistic_regression`: validation at the boundary, one compiled solve, finalize."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jax.typing import ArrayLike

from .._checks import (
    check_flag,
    check_int_range,
    check_real,
    concrete_value,
    python_float,
    python_int,
)
from .._checks import is_concrete as _is_concrete
from .._linear import (
    LogisticObjective,
    auto_preconditioner,
    feature_shift,
    logistic_objective,
)
from .._precision import full_precision
from .._rowsums import chunk_rows
from . import _preconditioners, _sparse_input
from ._collinear import (
    MAX_PROJECTED_COLUMNS,
    MAX_RECHECKED_COLUMNS,
    centred_collinear_columns,
    collinear_columns,
    float64_collinear_columns,
    float64_counted_gram,
    float64_counted_rows,
    minimum_norm,
)
from ._convergence import max_abs
from ._floor import minimize_to_floor
from ._implicit import minimize_implicit
from ._loop import Solver
from ._newton import Newton
from ._newton_cg import NewtonCG
from ._result import CollinearityWarning, FitError, FitResult, SeparationWarning, Status
from ._separation import (
    MAX_LP_ENTRIES,
    along_fit_checked,
    lp_entries,
    quasi_separation,
    separation_along_fit,
    separation_message,
)
from ._sharding import with_auto_axes
from ._trust_region import TrustRegion

SOLVERS: dict[str, type] = {"newton": Newton, "newton-cg": NewtonCG, "trust-region": TrustRegion}


def _resolve_solver(solver: str | Solver) -> Solver:
    if isinstance(solver, type):
        # The class passes the runtime Protocol check, then failed inside the traced fit.
        raise TypeError(
            f"solver must be a name or a solver configuration (an instance such as "
            f"{solver.__name__}()), got the class {solver.__name__}"
        )
    if not isinstance(solver, str) and isinstance(solver, Solver):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise ValueError(
        f"solver must be one of {sorted(SOLVERS)} or a solver configuration, got {solver!r}"
    )


def check_tol_and_max_iter(tol, max_iter) -> None:
    """Raise ValueError for a bad ``tol`` or ``max_iter``.

    A concrete ``tol`` must be a scalar >= 0 (NaN is not), ``max_iter`` an int32 >= 0.
    """
    # Beyond int32, JAX's own OverflowError named an argument path.
    check_int_range("max_iter", max_iter, 0)
    if _is_concrete(tol) and not (np.ndim(tol) == 0 and float(tol) >= 0):
        raise ValueError(f"tol must be a non-negative scalar, got {tol!r}")


def check_l2_fits(l2, dtype) -> None:
    """Raise ValueError for a concrete l2 (or grid) beyond the largest finite `dtype` number.

    Finite in float64, 1e39 became inf in a float32 fit, which then stopped NON_FINITE
    blaming X, or INVALID_L2 in a path.
    """
    if _is_concrete(l2) and np.max(np.asarray(l2, float), initial=0) > np.finfo(dtype).max:
        raise ValueError(
            f"l2 = {np.max(l2):.3g} overflows {np.dtype(dtype).name} (its largest finite number "
            f"is {np.finfo(dtype).max:.3g}): fit in float64, or use a smaller l2"
        )


def _validate(
    X, labels, num_classes, sample_weight, l2, fit_intercept, tol, max_iter, init
) -> bool:
    """Raise on bad input that is concrete here; whether labels, weights, l2 and tol all were.

    When they were (True), the in-`jit` input status (`_input_status`) can only say CONVERGED
    and is left out of the compiled fit.
    """
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    check_tol_and_max_iter(tol, max_iter)
    check_real("X", X)
    check_real("sample_weight", sample_weight)
    if init is not None and not (isinstance(init, (tuple, list)) and len(init) == 2):
        raise ValueError(
            "init must be a pair (W [n_features, num_classes], b [num_classes]), got a "
            f"{type(init).__name__}"
        )
    for part in init or ():
        check_real("init", part)
    if np.ndim(X) != 2:
        raise ValueError(f"X must be 2-D [n_samples, n_features], got shape {np.shape(X)}")
    num_rows, num_features = np.shape(X)
    if num_rows < 1:
        raise ValueError("X has no rows")
    if num_features < 1:
        # An intercept-only model failed with a shape error deep inside the solvers.
        raise ValueError("X has no feature columns (an intercept-only model is not supported)")
    if np.shape(labels) != (num_rows,):
        raise ValueError(f"labels must have shape ({num_rows},) to match X, got {np.shape(labels)}")
    if sample_weight is not None and np.shape(sample_weight) != (num_rows,):
        raise ValueError(
            f"sample_weight must have shape ({num_rows},) to match X, got {np.shape(sample_weight)}"
        )
    if init is not None:
        weights, intercept = init
        if np.shape(weights) != (num_features, num_classes) or np.shape(intercept) != (
            num_classes,
        ):
            raise ValueError(
                f"init must be (W [{num_features}, {num_classes}], b [{num_classes}]), got "
                f"shapes {np.shape(weights)} and {np.shape(intercept)}"
            )
    values = _sparse_input.stored_values(X) if _sparse_input.is_sparse(X) else X
    if _is_concrete(values):
        finite, largest = _finite_and_largest(values)
        if not finite:
            raise ValueError("X contains NaN or infinity")
        dtype = _working_dtype(X)
        if largest > square_limit(dtype):
            raise ValueError(
                f"X has entries up to {largest:.3g}: their squares (the Hessian needs x²) overflow "
                f"{dtype.__name__} (its largest finite number is {np.finfo(dtype).max:.3g}), "
                "so the fit would meet non-finite values. Scale the features (e.g. standardise "
                "the columns)" + (", or fit in float64." if dtype != np.float64 else ".")
            )
        if _is_concrete(l2) and not known_positive(l2, dtype):
            # Only where l2 is 0 (as the collinearity warning: a traced l2 is not known to
            # be): a penalty holds such a column's coefficients near 0, where its optimum is
            # (1e-11 relative at l2 = 1e-3, a column of 1e-19).
            warn_small_columns(_column_peaks(X, values, dtype), dtype, stacklevel=4)
    if _is_concrete(l2):
        l2_value = np.asarray(l2)
        if not (np.all(np.isfinite(l2_value)) and np.all(l2_value >= 0)):
            raise ValueError(f"l2 must be finite and >= 0, got {l2!r}")
        check_l2_fits(l2_value, _working_dtype(X))
    # The dtype is known even inside `jit`: float labels were cast there, a NaN label to class 0.
    label_dtype = labels.dtype if isinstance(labels, jax.Array) else np.asarray(labels).dtype
    if not np.issubdtype(label_dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {label_dtype}")
    # Labels and weights spread over several processes are not fetched: the same checks run
    # inside the compiled fit and report through `status` (`_input_status`).
    if _is_concrete(labels) and _addressable(labels):
        label_values = np.asarray(labels)
        if label_values.min() < 0 or label_values.max() >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in "
                f"[{label_values.min()}, {label_values.max()}]"
            )
    if sample_weight is not None and _is_concrete(sample_weight) and _addressable(sample_weight):
        weight_values = np.asarray(sample_weight, dtype=float)
        if not np.all(np.isfinite(weight_values)):
            raise ValueError("sample_weight contains NaN or infinity")
        if np.any(weight_values < 0):
            raise ValueError("sample_weight must be >= 0")
        if not weight_values.sum() > 0:
            raise ValueError("sample_weight sums to zero")
        with np.errstate(over="ignore"):
            working = np.asarray(sample_weight, dtype=_working_dtype(X))
        if not np.all(np.isfinite(working)):
            raise ValueError(
                f"sample_weight has entries up to {weight_values.max():.3g}, beyond "
                f"{working.dtype}'s largest finite number ({np.finfo(working.dtype).max:.3g}). "
                "Rescale the weights (e.g. divide them by their maximum): the fit depends "
                "only on their ratios."
            )
        tiny = np.finfo(working.dtype).tiny
        # XLA's CPU backend flushes subnormal numbers to zero: weights below `tiny` count as 0
        # inside the fit, however many of them sum to a normal number here.
        normal = np.where(working >= tiny, working, 0)
        with np.errstate(over="ignore"):  # an overflowing sum is fine: the fit scales first
            normal_sum = normal.sum(dtype=working.dtype)
        if not normal_sum >= tiny:
            raise ValueError(
                f"sample_weight sums to {weight_values.sum():.3g}, and its weights of at least "
                f"the smallest normal {working.dtype} number ({tiny:.3g}) to "
                f"{normal.sum(dtype=float):.3g}: the objective divides by this sum, and smaller "
                "(subnormal) weights count as zero. Rescale the weights (e.g. divide them by "
                "their maximum)."
            )
    weights_here = _is_concrete(labels, sample_weight) and _addressable(labels, sample_weight)
    if fit_intercept and weights_here:
        weight_values = np.ones(num_rows) if sample_weight is None else np.asarray(sample_weight)
        mass = np.bincount(np.asarray(labels), weights=weight_values, minlength=num_classes)
        warn_empty_classes(np.flatnonzero(mass <= 0), stacklevel=4)
    return weights_here and _is_concrete(l2) and _is_concrete(tol)


# The start of the warning for classes without samples.
EMPTY_CLASSES = "classes without samples"
# Set by `empty_classes_quietly`, per thread (and per asyncio task), unlike a warnings filter:
# `warnings.catch_warnings` is process-wide, and threads running fits at once (a threaded
# GridSearchCV) would undo or leak each other's filters.
_EMPTY_CLASSES_QUIET = contextvars.ContextVar("empty_classes_quiet", default=False)


@contextlib.contextmanager
def empty_classes_quietly():
    """Within it, in this thread, classes without samples are fitted without the warning."""
    token = _EMPTY_CLASSES_QUIET.set(True)
    try:
        yield
    finally:
        _EMPTY_CLASSES_QUIET.reset(token)


def warn_empty_classes(empty: np.ndarray, stacklevel: int) -> None:
    """Warn that classes `empty` have no samples, when there are any (fitting an intercept).

    Their intercepts have no finite optimum. The fit goes on, as it does under `jit` (and as a
    cross-validation fold or a bootstrap sample that misses a rare class needs): each such
    intercept falls until its gradient entry, the class's fitted probability mass, is within
    `tol`, and the class is predicted with probability ~tol.
    """
    if empty.size and not _EMPTY_CLASSES_QUIET.get():
        warnings.warn(
            f"{EMPTY_CLASSES} (zero total weight): {empty.tolist()}. Their intercepts have no "
            "finite optimum: the fit lowers them until their probability is within tol. Drop "
            "those classes or lower num_classes to leave them out.",
            UserWarning,
            stacklevel=stacklevel,
        )


def _addressable(*values) -> bool:
    """Whether every array is held entirely by this process (not one of several processes')."""
    return all(
        getattr(value, "is_fully_addressable", True) for value in values if value is not None
    )


@jax.jit
def _device_finite_and_largest(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.all(jnp.isfinite(values)), jnp.max(jnp.abs(values), initial=0)


def _finite_and_largest(values) -> tuple[bool, float]:
    """Whether every value is finite, and max|value|.

    A jax array is reduced where it lives (on its devices, shard by shard for rows sharded
    over a mesh) and only the two scalars come back: X is never gathered to the host.
    """
    if isinstance(values, jax.Array):
        # Evaluated now even inside a caller's `jit` that closes over X (a concrete array
        # there), where the jitted reduction would otherwise return tracers.
        with jax.ensure_compile_time_eval():
            finite, largest = _device_finite_and_largest(values)
        return bool(finite), float(largest)
    values = np.asarray(values)
    return bool(np.all(np.isfinite(values))), float(np.max(np.abs(values), initial=0))


@jax.jit
def _device_column_peaks(values: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(values), axis=0, initial=0)


def _column_peaks(X, values, dtype) -> np.ndarray:
    """The largest |xᵢⱼ| over the rows, per column [d], of a concrete X, dense or sparse.

    Sparse X: per column only where some stored value lies below `small_limit` (else none).
    """
    if _sparse_input.is_sparse(X):
        magnitudes = np.abs(np.asarray(values))
        small = np.any((magnitudes > 0) & (magnitudes < small_limit(dtype)))
        return _sparse_input.column_peaks(X) if small else np.zeros(0)
    if isinstance(values, jax.Array):
        with jax.ensure_compile_time_eval():  # as in `_finite_and_largest`
            return np.asarray(_device_column_peaks(values), np.float64)
    return np.max(np.abs(np.asarray(values)), axis=0, initial=0).astype(np.float64)


def small_limit(dtype) -> float:
    """The smallest max|xⱼ| of a column whose squares the fit's sums in `dtype` keep.

    √(tiny·2²³): the Gram's and the Hessian's diagonals Σᵢ ŵᵢ·xᵢⱼ²·(…) stay normal numbers
    with a margin of 2²³ for the weights ŵᵢ of about 1/N and the probabilities' factors.
    Below it they underflow, and XLA's CPU backend flushes subnormal numbers to zero
    (3.1e-16 in float32, 4.3e-151 in float64).
    """
    return float(np.sqrt(np.finfo(dtype).tiny * 2.0**23))


def warn_small_columns(peaks: np.ndarray, dtype, stacklevel: int) -> None:
    """Warn of the columns of X whose nonzero entries all lie below `small_limit`.

    An unpenalised fit leaves their coefficients at 0: a float32 column of 1.6e-19 (a charge
    in coulombs) was fitted so, 23% above the optimum's objective, reported CONVERGED with no
    word (its curvature had rounded to 0). A warning, not an error: a constant column
    standardised to rounding noise (6.8e-17) is such a column, and 0 its sensible coefficient.
    """
    small = np.flatnonzero((peaks > 0) & (peaks < small_limit(dtype)))
    if small.size:
        named = ", ".join(f"{j} (max |x| = {peaks[j]:.3g})" for j in small[:5])
        more = f" and {small.size - 5} more" if small.size > 5 else ""
        name = np.dtype(dtype).name
        warnings.warn(
            f"X's columns {named}{more} are too small for {name}: the fit's curvature needs "
            f"sums of x², which for columns below {small_limit(dtype):.3g} come near {name}'s "
            f"smallest normal number ({np.finfo(dtype).tiny:.3g}), lose their digits and then "
            "round to zero, and without a penalty the fit leaves their coefficients at 0, "
            "above the optimum where they carry information. Scale such columns up"
            + (", or fit in float64." if name != "float64" else "."),
            UserWarning,
            stacklevel=stacklevel,
        )


def square_limit(dtype) -> float:
    """The largest |x| whose square the fit's sums in `dtype` hold.

    The curvature needs x² (the Gram of the features): beyond this its sums overflow.
    """
    return float(np.sqrt(np.finfo(dtype).max) / 1e3)


def _working_dtype(X) -> type:
    """The floating type a fit on X runs in: float64 only with x64 on and float64 X."""
    dtype = X.dtype if hasattr(X, "dtype") else np.asarray(X).dtype
    if jax.config.jax_enable_x64 and dtype == np.float64:
        return np.float64
    return np.float32


def _check_explicit_hessian_fits(solver, X, num_classes, fit_intercept, reference_class) -> None:
    """Refuse `Newton` before compiling when its [P, P] Hessian cannot fit in memory.

    The explicit Hessian step holds the matrix, its Cholesky factor and the regularised copy
    (3·P² entries) plus two [N, P] products of rows and probabilities.
    """
    if not isinstance(solver, Newton):
        return
    num_rows, num_features = np.shape(X)
    params = (num_features + int(fit_intercept)) * (num_classes - int(reference_class))
    itemsize = np.dtype(_working_dtype(X)).itemsize
    needed = itemsize * (3.0 * params**2 + 2.0 * num_rows * params)
    available = _device_memory_bytes()
    if needed > available:
        raise ValueError(
            f"solver='newton' forms the explicit {params} x {params} Hessian (P = (d + "
            f"fit_intercept)·K = {params} parameters), about {needed / 2**30:.1f} GiB of "
            f"temporaries, more than the {available / 2**30:.1f} GiB of memory available: use "
            "solver='newton-cg' or 'trust-region' (matrix-free, O(N·P) memory)."
        )


def _device_memory_bytes() -> float:
    """Memory of the default device: its allocator limit, or the host's physical memory."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    try:
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def setting_status(l2, tol, dtype) -> jax.Array:
    """Inside `jit`: INVALID_L2 or INVALID_TOL for a bad l2 or tol, else CONVERGED (0)."""
    l2 = jnp.asarray(l2, dtype)
    bad_l2 = ~jnp.all(jnp.isfinite(l2) & (l2 >= 0))
    bad_tol = ~(jnp.asarray(tol, dtype) >= 0)  # NaN too; an infinite tol stops at once
    code = jnp.where(bad_tol, Status.INVALID_TOL, Status.CONVERGED)
    return jnp.where(bad_l2, Status.INVALID_L2, code).astype(jnp.int32)


def _input_status(objective: LogisticObjective, sample_weight, l2, tol) -> jax.Array:
    """Inside `jit`: the Status that names bad input, or CONVERGED (0) when the input is fine.

    The same checks as `_validate`, for values that were tracers there.
    """
    labels = objective.labels
    bad_labels = jnp.any((labels < 0) | (labels >= objective.num_classes))
    dtype = objective.dtype
    if sample_weight is None:
        bad_weights = jnp.zeros((), bool)
        zero_weight = jnp.zeros((), bool)
    else:
        raw = jnp.asarray(sample_weight, dtype)
        bad_weights = ~jnp.all(jnp.isfinite(raw) & (raw >= 0))
        zero_weight = ~(jnp.sum(raw) >= jnp.finfo(dtype).tiny)
    code = setting_status(l2, tol, dtype)
    code = jnp.where(zero_weight, Status.ZERO_WEIGHT, code)
    code = jnp.where(bad_weights, Status.INVALID_WEIGHTS, code)
    code = jnp.where(bad_labels, Status.INVALID_LABELS, code)
    return code.astype(jnp.int32)


def _initial_theta(objective: LogisticObjective, init) -> jax.Array:
    if init is None:
        return jnp.zeros((objective.num_params,), objective.dtype)
    weights, intercept = (jnp.asarray(x, objective.dtype) for x in init)
    if not objective.reference_class:
        # A common shift of every class changes no probability; the centred one has the
        # smallest penalty and keeps the gradient orthogonal to the singular direction.
        weights = weights - jnp.mean(weights, axis=1, keepdims=True)
        intercept = intercept - jnp.mean(intercept)
    if not objective.fit_intercept:
        intercept = jnp.zeros_like(intercept)
    return objective.restrict(weights, intercept)


# The arguments of `_fit` that are compile-time constants: one program per combination.
FIT_STATIC_ARGNAMES = (
    "num_classes",
    "fit_intercept",
    "reference_class",
    "penalised",
    "row_chunk",
    "transposed_copy",
    "checked",
    "solver",
    "verbose",
)


# The fits centre a dense X (`centred_input`) up to this size: the copy it makes.
CENTRED_COPY_MAX_BYTES = 2**26


def centred_input(
    objective: LogisticObjective, build
) -> tuple[LogisticObjective, jax.Array | None]:
    """The objective on X − 1·μᵀ and the shift μ [d], or the objective as it is and None.

    Below float64, on a dense X with an intercept, the columns whose mean dominates their
    spread, μⱼ² > 100·σⱼ² (`feature_shift` with `data`), are centred before the fit: the
    model is the same (θ_c = (W, b + μᵀW), the penalty on W unchanged), but the logits, the
    gradient and its rounding floor are computed from the centred values, which float32 holds
    to its own precision. Uncentred, a float32 column c + z beside the intercept has gradient
    entries rounded to about eps·c·Σ|r|, which the floor test accepts: fits stopped CONVERGED
    1.7e-6 to 1e-5 (c = 1e4, l2 = 1e-6), up to 2.2e-4 (1e5) and up to 1.6 (1e6, `newton`)
    above the optimum, relative.
    Only penalised fits (l2 > 0 known when the program is built, `LogisticObjective.penalised`)
    are centred: with l2 = 0 a dependence of the columns on the intercept leaves a set of
    optima, whose minimum-norm point in θ_c is not X's own (x and x + 1 of mean 100:
    coefficients ±7 became 0.1, 7 from the float64 fit's), and near such a dependence the fits
    moved far along it, where b = b_c − μᵀW loses the fit to its rounding (a one-hot set whose
    main category holds 99.5% of the rows: `newton` CONVERGED 1.5e-3 above the optimum, from
    LINE_SEARCH_FAILED 3.8e-5 above).

    Centring copies X: only an X of at most `CENTRED_COPY_MAX_BYTES` (one row chunk) is
    centred, and none that the fit sums by row chunks (`row_chunk`), which keep no copy of X.
    `build(X)` makes the objective of the same problem on another X.
    """
    features = objective.features
    if (
        objective.dtype == jnp.float64
        or not objective.penalised
        or isinstance(features, sparse.BCOO)
        or objective.row_chunk is not None
        or features.size * features.dtype.itemsize > CENTRED_COPY_MAX_BYTES
    ):
        return objective, None
    shift = feature_shift(objective, dominant=True, data=True)
    if shift is None:
        return objective, None
    return build(objective.features - shift[None, :]), shift


def _shift_of(shift: jax.Array, weights: jax.Array) -> jax.Array:
    """μᵀW [..., K] for W [..., d, K] (a path's params carry a leading axis)."""
    return jnp.einsum("d,...dk->...k", shift.astype(weights.dtype), weights)


def shifted_init(init, shift: jax.Array | None):
    """A warm start (W, b) in the centred variables: (W, b + μᵀW)."""
    if init is None or shift is None:
        return init
    weights, intercept = init
    return weights, intercept + _shift_of(shift, weights)


def unshifted(result: FitResult, shift: jax.Array | None) -> FitResult:
    """A fit of the centred variables (`centred_input`) in the user's: b = b_c − μᵀW."""
    if shift is None:
        return result
    weights, intercept = result.params
    return result._replace(params=(weights, intercept - _shift_of(shift, weights)))


@functools.partial(jax.jit, static_argnames=FIT_STATIC_ARGNAMES)
@full_precision
def _fit(
    X,
    labels,
    sample_weight,
    l2,
    init,
    tol,
    max_iter,
    *,
    num_classes,
    fit_intercept,
    reference_class,
    penalised,
    checked,
    solver,
    verbose,
    row_chunk=None,
    transposed_copy=False,
) -> FitResult:
    build = functools.partial(
        logistic_objective,
        labels=labels,
        num_classes=num_classes,
        sample_weight=sample_weight,
        l2=l2,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
        penalised=penalised,
        row_chunk=row_chunk,
        transposed_copy=transposed_copy,
    )
    objective, shift = centred_input(build(X), build)
    theta = _initial_theta(objective, shifted_init(init, shift))
    # Input checked at the boundary (concrete there): its status can only be CONVERGED.
    invalid = (
        jnp.asarray(Status.CONVERGED, jnp.int32)
        if checked
        else _input_status(objective, sample_weight, l2, tol)
    )

    def run(objective, theta, tol, max_iter, extra):
        return solver.minimize(
            objective, theta, tol=tol, max_iter=max_iter, verbose=verbose, **extra
        )

    def minimize(objective, theta, tol, max_iter):
        # The preconditioner's setup (a Gram's eigendecomposition) serves both of the runs.
        extra = {}
        if isinstance(solver, NewtonCG | TrustRegion):
            extra["basis"] = _preconditioners.setup_basis(solver.preconditioner, objective)
        return minimize_to_floor(run, objective, theta, tol, max_iter, extra, verbose=verbose)

    # Derivatives with respect to X, the weights and l2 by implicit differentiation.
    optimum, loss, output = minimize_implicit(
        minimize,
        objective,
        theta,
        tol,
        jnp.where(invalid == Status.CONVERGED, max_iter, 0).astype(jnp.int32),
    )
    return unshifted(finalize(objective, output, invalid, solution=(optimum, loss)), shift)


def symmetric_params(
    weights: jax.Array, intercept: jax.Array, l2: jax.Array, reference_class: bool
) -> tuple[jax.Array, jax.Array]:
    """(W, b) with the free common shift of every class taken out, as scikit-learn reports them.

    Without a reference class, adding one vector to every class's column changes no
    probability: the intercepts are centred over the classes, and so are the weights when
    l2 = 0 (with l2 > 0 the optimum is centred already, and left untouched).
    """
    if reference_class:
        return weights, intercept
    centred = weights - jnp.mean(weights, axis=1, keepdims=True)
    return jnp.where(l2 == 0, centred, weights), intercept - jnp.mean(intercept)


def finalize(
    objective: LogisticObjective,
    output,
    invalid: jax.Array,
    solution: tuple[jax.Array, jax.Array] | None = None,
) -> FitResult:
    """The `FitResult` of a solver's output (the finalize phase).

    Takes the minimum-norm point where collinear features leave a set of optima, and the
    symmetric parametrisation (as scikit-learn) where a class shift is free; `invalid` is the
    input status (`_input_status`), which overrides the solver's when the input was bad.
    `solution`, when given, is (θ, loss) already at the minimum-norm point (from
    `minimize_implicit`, carrying its derivatives) and replaces the output's.
    """
    status = jnp.where(invalid == Status.CONVERGED, output.status, invalid)
    if solution is None:
        solution = (
            minimum_norm(objective, output.theta, transposable=False),
            output.evaluation.loss,
        )
    theta, loss = solution
    weights, intercept = symmetric_params(
        *objective.expand(theta), objective.l2, objective.reference_class
    )
    evaluation = output.evaluation
    return FitResult(
        params=(weights, intercept),
        loss=loss,
        converged=status == Status.CONVERGED,
        n_iter=output.n_iter,
        grad_norm=max_abs(evaluation.grad),
        status=status,
        n_hessian_products=output.n_hessian_products,
    )


def as_features(X):
    """X in the working precision: a BCOO for sparse input (kept sparse), else a jax array.

    float64 only with 64-bit mode on and float64 X; anything else float32.
    """
    if _sparse_input.is_sparse(X) and _is_concrete(_sparse_input.stored_values(X)):
        x64 = jax.config.jax_enable_x64 and X.dtype == np.float64
        return _sparse_input.to_bcoo(X, np.float64 if x64 else np.float32)
    features = X if _sparse_input.is_sparse(X) else jnp.asarray(X)
    if not (jax.config.jax_enable_x64 and features.dtype == jnp.float64):
        features = features.astype(jnp.float32)
    return features


def fit_inputs(X, labels, sample_weight, init) -> tuple:
    """(features, labels, weights, init) as the compiled fits take them.

    X in the working precision (`as_features`), weights and `init` in X's, labels as int32
    when concrete (one program whatever the types given), and every array sharded over
    `Explicit` mesh axes moved to `Auto` ones (`with_auto_axes`); weights and `init` stay None
    when not given.
    """
    features = with_auto_axes(as_features(X))
    weights = sample_weight
    if weights is not None:
        weights = with_auto_axes(jnp.asarray(weights).astype(features.dtype))
    if init is not None:
        init = tuple(with_auto_axes(jnp.asarray(part).astype(features.dtype)) for part in init)
    labels = jnp.asarray(labels)
    if _is_concrete(labels) and _addressable(labels):
        # Range-checked at the boundary (`_validate`). Traced labels keep their type, so that
        # the check under `jit` sees values beyond int32.
        labels = labels.astype(jnp.int32)
    return features, with_auto_axes(labels), weights, init


def fit_logistic_regression(
    X: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    *,
    sample_weight: ArrayLike | None = None,
    l2: float | ArrayLike = 0.0,
    fit_intercept: bool = True,
    reference_class: bool = False,
    solver: str | Solver = "newton-cg",
    tol: float = 1e-8,
    max_iter: int = 100,
    init: tuple[ArrayLike, ArrayLike] | None = None,
    verbose: bool = False,
    throw: bool = True,
) -> FitResult:
    """Fit multinomial logistic regression to the exact optimum with Newton steps.

    Minimises f(W, b) = Σᵢ wᵢ·CE(xᵢW + b, yᵢ)/Σᵢ wᵢ + (l2/2)·‖W‖² (intercept unpenalised;
    scikit-learn's `C` is `l2 = 1/(C·Σᵢ wᵢ)`; for K = 2 scikit-learn fits one coefficient
    vector, which `reference_class=True` gives at that l2, as the estimator does, while the
    symmetric default equals scikit-learn's binary model at 2C). One compiled function per set
    of shapes and static options: repeat calls do not recompile, and the function works under
    `jax.vmap` (for example over a grid of `l2`) and `jax.jit`.

    The fit is differentiable: `jax.grad`, `jax.vjp`, `jax.jvp`, `jax.jacfwd` and `jax.jacrev`
    of anything computed from `params` and `loss` with respect to X (dense, or a BCOO's stored
    values), `sample_weight` and `l2` come from implicit differentiation of the optimality
    condition g(θ*; x) = ∇_θ f(θ*; x) = 0: θ̇ = −H⁻¹·(∂_x g)·ẋ, one matrix-free CG solve with
    the Hessian per tangent (per cotangent in reverse mode), never a derivative of the
    iterations; the loss's is ∂_x f·ẋ + gᵀθ̇. They are the derivatives of the optimality
    condition at the returned point, also when the fit did not converge (check `converged`);
    labels, `init`, `tol` and `max_iter` get none. See docs/solvers.md.

    Args:
        X: [N, d] features: an array, a scipy.sparse matrix/array (CSR, CSC, COO) or a
            `jax.experimental.sparse.BCOO`; sparse X stays sparse end to end (products with it
            are sparse-dense; only the "newton" solver's explicit Hessian densifies it, so use
            it only for small d; the "kronecker" preconditioner's d × d Gram is built block by
            block). float64 (with x64 enabled) fits in float64, anything else float32; below
            float64, with l2 > 0, the columns of a dense X (up to 64 MiB) whose mean dominates
            their spread are centred for the fit, and `params` are returned for X itself
            (docs/solvers.md#precision).
        labels: [N] integer labels in [0, num_classes).
        num_classes: K >= 2 (static).
        sample_weight: [N] weights >= 0 (class weights folded in), or None for ones.
        l2: L2 strength on W (traced), 0 for the unpenalised maximum-likelihood fit.
        fit_intercept: fit the unpenalised intercept b (static).
        reference_class: fix class 0's column of W and intercept at zero (static); the
            binomial model for K = 2, and statsmodels' `MNLogit` parametrisation.
        solver: "newton" (explicit Hessian, Cholesky: small (d + 1)·K), "newton-cg"
            (matrix-free, preconditioned CG) or "trust-region" (Steihaug-CG, TRON's rules), or a
            `Newton`/`NewtonCG`/`TrustRegion` configuration, or any other `Solver` (static).
        tol: stop when max|gradient| <= tol and half the squared Newton decrement <= tol; tol is
            first raised, per parameter, to a bound on its gradient entry's rounding: at most
            8·eps·Σᵢ ŵᵢ·|x_ij| (`attainable_tolerance`: ~1e-6 for standardised float32 data),
            and the fit goes on to the lower bound at the point it reached where that is below
            (`minimize_to_floor`, docs/solvers.md).
        max_iter: most outer iterations.
        init: warm start (W [d, K], b [K]); None starts from zeros.
        verbose: print one line per iteration: iteration, loss, max|g|, inner CG iterations
            ("cg"; not for "newton"), step length (line search) or trust radius, the solver's
            diagnostics, and the wall time since the solve started (compilation excluded).
            Iteration 0 is the initial point. Without it the loop holds no host callback.
        throw: raise `FitError` when the fit does not converge (only with concrete results,
            i.e. outside `jit`/`vmap`; the status field reports it in every case).

    Returns:
        A `FitResult`: params (W [d, K], b [K]) in the symmetric parametrisation without a
        reference class (b sums to zero, and so does every row of W when l2 = 0), or with the
        reference column/entry zero; loss, converged, n_iter, grad_norm, status,
        n_hessian_products.

    Raises:
        ValueError: bad shapes, NaN/inf in X or the weights, features whose squares overflow
            the working precision, labels out of range, negative, all-zero or subnormal weights
            or weights beyond the working precision, negative l2 or one beyond the working
            precision, an unknown solver, `solver="newton"` whose explicit Hessian exceeds
            the device's memory (checked before any compilation, where the inputs are
            concrete). Under `jit` the same problems are reported by `status` (INVALID_LABELS,
            INVALID_WEIGHTS, ZERO_WEIGHT, INVALID_L2, INVALID_TOL).
        TypeError: non-integer labels (also under `jit`: the dtype is known); complex,
            string or object arrays; None or a string for l2 or tol; a flag that is not a
            bool, 0 or 1; a solver class instead of an instance.
        FitError: `throw=True` and the fit stopped without converging.

    Warns:
        CollinearityWarning: l2 = 0 and columns of X (with the intercept) are exactly collinear;
            the fit returns the minimum-norm optimum.
        SeparationWarning: l2 = 0, the fit converged (or stopped at MAX_ITER or
            LINE_SEARCH_FAILED, which the warning then explains), and the data are
            quasi-separated: some change of the coefficients raises the margins of some rows
            and lowers none, so no finite optimum exists and the coefficients along it grow as
            tol shrinks (a linear program after the fit, up to N·(K − 1)·(d + 1) = 2¹⁵
            entries, and beyond it, up to N·(K − 1)·(d + 1)² = 2²⁷ and (d + 1)(K − 1) = 512,
            a certificate read off the fitted coefficients; `_separation`).
        UserWarning: classes without samples (zero total weight) while fitting an intercept.
            Their intercepts have no finite optimum; the fit goes on (as it does silently
            under `jit`): each falls until its gradient entry, the class's fitted probability
            mass, is within `tol` (about −10 at 1e-6, −20 at 1e-12), and the status is
            CONVERGED, the class predicted with probability ~tol. This is what a
            cross-validation fold or a bootstrap sample that misses a rare class needs, as
            in scikit-learn; it raised `ValueError` until it did.

    Example:
        At the optimum the gradient of f vanishes: the residuals softmax(XW + b) − onehot(y)
        average to zero over the rows (∂f/∂b), and Xᵀ(residuals)/N + l2·W = 0 (∂f/∂W):

        >>> import jax, jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6)
        >>> W, b = result.params
        >>> bool(result.converged), W.shape, b.shape
        (True, (1, 3), (3,))
        >>> residuals = jax.nn.softmax(X @ W + b[None, :]) - jax.nn.one_hot(y, 3)
        >>> bool(jnp.allclose(jnp.mean(residuals, axis=0), 0, atol=1e-5))
        True
        >>> bool(jnp.allclose(X.T @ residuals / len(y) + 0.1 * W, 0, atol=1e-5))
        True

        The derivative of the fitted weights in l2, against a central difference of refits
        (which float32 rounds to about 1e-3; float64 agrees to 1e-8):

        >>> def weights(l2):
        ...     return xj.fit_logistic_regression(X, y, 3, l2=l2, tol=1e-10).params[0]
        >>> derivative = jax.jacfwd(weights)(0.1)
        >>> difference = (weights(0.1 + 1e-4) - weights(0.1 - 1e-4)) / 2e-4
        >>> bool(jnp.allclose(derivative, difference, atol=2e-3))
        True
    """
    config = _resolve_solver(solver)
    if np.ndim(l2) != 0:
        # It failed inside the compiled fit ("Pred must be a scalar").
        raise ValueError(
            f"l2 must be a scalar, got shape {np.shape(l2)}; for a grid of values use "
            "fit_regularization_path or jax.vmap"
        )
    # Python scalars: a NumPy scalar reaches `jit` with a fixed type, and compiled its own program.
    l2, tol, max_iter = python_float(l2, "l2"), python_float(tol, "tol"), python_int(max_iter)
    fit_intercept = check_flag("fit_intercept", fit_intercept)
    reference_class = check_flag("reference_class", reference_class)
    verbose, throw = check_flag("verbose", verbose), check_flag("throw", throw)
    checked = _validate(
        X, labels, num_classes, sample_weight, l2, fit_intercept, tol, max_iter, init
    )
    _check_explicit_hessian_fits(config, X, num_classes, fit_intercept, reference_class)
    features, labels, weights, init = fit_inputs(X, labels, sample_weight, init)
    result = _fit(
        features,
        labels,
        weights,
        l2,
        init,
        tol,
        max_iter,
        num_classes=int(num_classes),
        fit_intercept=bool(fit_intercept),
        reference_class=bool(reference_class),
        # l2 known positive: the program leaves out what only l2 = 0 needs (smaller, faster
        # to compile); a traced l2 keeps it, as 0 is then possible.
        penalised=known_positive(l2, features.dtype),
        row_chunk=_row_chunk(features),
        transposed_copy=wants_transposed_copy(features),
        checked=checked,
        solver=config,
        verbose=bool(verbose),
    )
    if verbose and _is_concrete(result.status):
        # The lines come from host callbacks: let them all print before returning.
        jax.effects_barrier()
    if _is_concrete(X, l2, sample_weight) and not known_positive(l2, features.dtype):
        # X concrete, also when a caller's `jit` closed over it; its conversion (float64 NumPy
        # to float32 with 64-bit mode off) must then not be staged into that trace: the check
        # reads the Gram on the host, and raised TracerArrayConversionError on a tracer.
        with jax.ensure_compile_time_eval():
            concrete = features if _is_concrete(features) else as_features(X)
            # Weights moved off Explicit mesh axes as the features were (Explicit weights
            # beside Auto features stopped the Gram with a mesh error).
            if sample_weight is not None:
                sample_weight = with_auto_axes(jnp.asarray(sample_weight))
            dense = not isinstance(concrete, sparse.BCOO)
            centred = fits_centred(config, concrete.dtype, concrete.shape[1], fit_intercept, dense)
            _warn_collinear(concrete, sample_weight, fit_intercept, centred)
            # Not on rows that other processes hold (NumPy cannot read them here).
            if (
                _is_concrete(labels, result.status)
                and _addressable(concrete, labels, sample_weight)
                and _stopped_by_separation(result.status)
            ):
                _warn_separation(
                    concrete,
                    labels,
                    sample_weight,
                    num_classes,
                    fit_intercept,
                    result.status,
                    result.params,
                )
    if throw and _is_concrete(result.status) and int(result.status) != Status.CONVERGED:
        # Under `jax.jvp` or `jax.jacfwd` of a fit the status is concrete but the floating
        # fields carry tangents; the error reports (and keeps) their values without them.
        raise FitError(jax.lax.stop_gradient(result))
    return result


def known_positive(l2, dtype) -> bool:
    """Whether every l2 is known > 0 in ``dtype`` before tracing (`LogisticObjective.penalised`).

    In the fit's dtype, and normal: l2 = 1e-50 is 0 in float32 (and 1e-42 subnormal, 0 to
    XLA's CPU backend), and a float32 fit of separable data compiled as penalised reported
    CONVERGED (with no collinearity warning either) where the l2 = 0 fit it ran reports
    DIVERGED. Known also under eager ``jax.grad`` or ``jax.jvp`` in l2
    (`concrete_value`): there the fit was compiled as possibly unpenalised, and float32 columns
    of large mean were left uncentred (`centred_input`), which put the implicit derivative 9 to
    17% off with a warning from its Hessian solve.
    """
    value = concrete_value(l2)
    # At least the smallest normal number: XLA's CPU backend flushes a subnormal l2 to 0.
    return value is not None and bool(np.all(value.astype(dtype) >= np.finfo(dtype).tiny))


def _row_chunk(features) -> int | None:
    """`LogisticObjective.row_chunk` for these features: chunks for a dense X on one device.

    None for sparse, traced or row-sharded X (dynamic slices of sharded rows gather them), and
    when X fits in one chunk. Chunks hold at most 64 MiB of [X, 1].
    """
    if _one_device(features) is None:
        return None
    rows = chunk_rows(features.shape[1] + 1, itemsize=features.dtype.itemsize)
    return rows if features.shape[0] > rows else None


# A fit holds a transposed copy of X (`wants_transposed_copy`) up to this size.
TRANSPOSED_COPY_MAX_BYTES = 2**30


def wants_transposed_copy(features) -> bool:
    """Whether a fit also holds Xᵀ (`logistic_objective`'s ``transposed_copy``).

    For a dense float64 X on one CPU device, of at most `TRANSPOSED_COPY_MAX_BYTES`: there the
    GEMMs Xᵀ·U over the rows (the gradient's and one per Hessian product) ran up to twice as
    fast from the copy, and fits took 0.79 (the 20,000 × 128, K = 200 probe) to 0.96 (raw
    digits) of their time. Not for float32 (no faster), sparse, traced or sharded X, nor on
    accelerators, whose GEMMs read either layout.
    """
    device = _one_device(features)
    if device is None or device.platform != "cpu" or features.dtype != jnp.float64:
        return False
    return features.size * features.dtype.itemsize <= TRANSPOSED_COPY_MAX_BYTES


def _one_device(features):
    """The one device a dense, concrete X lives on; None for sparse, traced or sharded X."""
    if isinstance(features, sparse.BCOO | jax.core.Tracer):
        return None
    sharding = getattr(features, "sharding", None)
    if sharding is None or len(sharding.device_set) != 1:
        return None
    return next(iter(sharding.device_set))


def fits_centred(
    solver: Solver, dtype, num_features: int, fit_intercept: bool, dense: bool = True
) -> bool:
    """Whether the fit works in centred variables (`centred_feature_gram`, `feature_shift`).

    Below float64, on a dense X with an intercept: `Newton` (its Hessian), and Newton-CG and
    the trust region with the Kronecker preconditioner (what "auto" means for a dense X of up
    to 4,000 columns, `auto_preconditioner`) or the diagonal one (`centring_of`).
    """
    if not (fit_intercept and dense) or np.dtype(dtype) == np.float64:
        return False
    if isinstance(solver, Newton):
        return True
    if not isinstance(solver, NewtonCG | TrustRegion):
        return False
    kind = solver.preconditioner
    if kind == "auto":
        kind = auto_preconditioner(num_features, dense)
    return kind in ("kronecker", "diagonal")


def _warn_collinear(features, sample_weight, fit_intercept: bool, centred: bool) -> None:
    """Warn, naming the columns, when unpenalised features are collinear.

    `centred` (`fits_centred`): the rank is decided on the centred Gram, below float64
    (`centred_collinear_columns`), where a column close to constant beside the intercept is
    one the fit resolves.
    """
    num_columns = features.shape[1] + int(fit_intercept)
    if num_columns > MAX_PROJECTED_COLUMNS:
        return
    # A sparse X stays sparse: its Gram is built without a dense copy.
    columns, rank = collinear_columns(features, sample_weight, fit_intercept)
    exact = None
    near, dependence = 0, 0.0
    if columns and num_columns <= MAX_RECHECKED_COLUMNS:
        counted = float64_counted_gram(
            features if isinstance(features, sparse.BCOO) else np.asarray(features),
            None if sample_weight is None else np.asarray(sample_weight),
            fit_intercept,
        )
        shift = None
        if centred:
            columns, rank, shift = centred_collinear_columns(counted[1], features.dtype)
            if not columns:
                return
        # The same decision in float64, each dependence measured with X itself: a float32
        # decision is exact when float64 finds the same rank (all-zero or duplicated columns)
        # and then names its columns; a dependence beyond the rounding of the data (x and
        # x + 1e-9·z in float64) is only near, whatever the Gram says.
        columns64, rank64, dependences, resolution = float64_collinear_columns(
            None, None, fit_intercept, counted, shift
        )
        exact = rank64 == rank
        if exact:
            columns = columns64
            far = dependences > exact_dependence(num_columns, features.dtype) + resolution
            near, dependence = int(np.count_nonzero(far)), float(np.max(dependences, initial=0))
    warn_collinear_columns(
        columns,
        rank,
        features.shape[1],
        fit_intercept,
        features.dtype,
        stacklevel=4,
        exact=exact,
        near=near,
        dependence=dependence,
    )


# The statuses after which an unpenalised fit's data are checked for quasi-separation: it ends
# in CONVERGED (the gradient test passed far along it) or in one of these two.
_SEPARATION_STATUSES = (Status.CONVERGED, Status.MAX_ITER, Status.LINE_SEARCH_FAILED)


def _stopped_by_separation(status) -> bool:
    """Whether a concrete, unbatched status is one that quasi-separation can end a fit in."""
    return np.ndim(status) == 0 and int(status) in _SEPARATION_STATUSES


def _warn_separation(
    features, labels, sample_weight, num_classes: int, fit_intercept, status, params
) -> None:
    """Warn when an unpenalised fit's data are quasi-separated (`_separation`)."""
    kept = np.ones(features.shape[0], bool)
    if sample_weight is not None:
        kept = np.asarray(sample_weight) > 0
    columns = features.shape[1] + int(fit_intercept)
    num_rows = int(np.count_nonzero(kept))
    if lp_entries(num_rows, columns, num_classes) <= MAX_LP_ENTRIES:
        check = quasi_separation
    elif along_fit_checked(num_rows, columns, num_classes) and _is_concrete(params):
        check = functools.partial(separation_along_fit, params=params)
    else:
        return
    rows = float64_counted_rows(features, sample_weight)
    separation = check(rows, np.asarray(labels)[kept], num_classes, fit_intercept)
    if separation is None:
        return
    separation = separation._replace(converged=int(status) == Status.CONVERGED)
    notices = _FIT_NOTICES.get()
    if notices is not None:
        notices.append(separation)
        return
    # The caller's line: this function, then fit_logistic_regression, then the caller.
    warnings.warn(separation_message(separation), SeparationWarning, stacklevel=3)


def exact_dependence(num_columns: int, dtype) -> float:
    """The largest ‖X̃·D·v‖₂ (unit-norm columns, ‖v‖ = 1) of a dependence exact to X's rounding.

    d̃·eps of X's dtype: a column computed in that precision from up to d̃ others (a sum, a
    multiple) misses the exact combination by a few eps of its norm.
    """
    return num_columns * float(np.finfo(dtype).eps)


# Per thread and task: the estimator collects the warnings' facts and words them for its own
# parameters (C, penalty) at its caller's line (`fit_notices`).
_FIT_NOTICES = contextvars.ContextVar("fit_notices", default=None)


@contextlib.contextmanager
def fit_notices():
    """Within it, in this thread, collinear columns and separation are collected, not warned of.

    `warn_collinear_columns` appends its facts (a dict of the arguments of
    `collinear_message`), `_warn_separation` its `Separation`, to the list this yields.
    """
    notices: list = []
    token = _FIT_NOTICES.set(notices)
    try:
        yield notices
    finally:
        _FIT_NOTICES.reset(token)


def collinear_message(
    columns: list[int],
    rank: int,
    num_features: int,
    fit_intercept: bool,
    dtype: np.dtype,
    exact: bool | None = None,
    unpenalised: str = "l2 = 0",
    penalise: str = "set l2 > 0",
    near: int = 0,
    dependence: float = 0.0,
) -> str:
    """The `CollinearityWarning`'s text naming `columns` (index d is the intercept).

    Rank is decided in the fit's precision, `dtype`, on the Gram, which resolves singular
    values down to √(d̃·eps) only. In float64, and below it with `exact` True (float64 finds
    the same rank), the columns are exactly collinear but for `near` of the d̃ − rank
    dependences, which measured with X itself leave a combination of unit-norm columns of norm
    up to `dependence`, beyond X's rounding (x and x + 1e-9·z in float64): nearly collinear.
    Below float64 otherwise (`exact` False: float64 resolves them; None: not rechecked) the
    message says "collinear to float32 precision".
    `unpenalised` and `penalise` name the caller's options.
    """
    num_columns = num_features + int(fit_intercept)
    names = ["intercept" if column == num_features else str(column) for column in columns]
    intercept = " with the intercept" if fit_intercept else ""
    rank_text = f"rank {rank} of {num_columns} columns{intercept}"
    how = "exactly collinear"
    outcome = (
        "their coefficients are not identified, and the fit returns the minimum-norm optimum "
        "(as a pseudo-inverse)"
    )
    remedy = f"Drop redundant columns, or {penalise}."
    if np.finfo(dtype).bits < 64 and not exact:
        name = np.dtype(dtype).name
        how = f"collinear to {name} precision"
        outcome = (
            f"{name} resolves their coefficients along that combination to a few digits at "
            "best; where the data's rounding hides it, the fit drops that component (the "
            "minimum-norm point), which can leave the objective above the float64 optimum"
        )
        remedy = (
            f"Centre or standardise the columns, drop redundant ones, {penalise}, or fit "
            "float64 data (with jax_enable_x64), in whose precision they may be independent."
        )
    elif near:
        exactly = num_columns - rank - near
        how = "nearly collinear"
        if exactly:
            how = f"collinear, {exactly} dependence{'s' * (exactly > 1)} exact and {near} near"
        rank_text += (
            f"; a combination of unit-norm columns of norm {dependence:.1e}, above the rounding "
            f"of {np.dtype(dtype).name} data, below what the Newton systems resolve"
        )
        outcome = (
            "their coefficients are not identified, and the fit stops where the gradient test "
            "passes, which can lie far along the near dependence (large coefficients of "
            "opposite signs), short of the optimum, and differ between solvers"
        )
    return (
        f"The columns [{', '.join(names)}] of X are {how} ({rank_text}) and {unpenalised}: "
        f"{outcome}. {remedy}"
    )


def warn_collinear_columns(
    columns: list[int],
    rank: int,
    num_features: int,
    fit_intercept: bool,
    dtype: np.dtype,
    stacklevel: int,
    exact: bool | None = None,
    near: int = 0,
    dependence: float = 0.0,
) -> None:
    """The `CollinearityWarning` naming `columns` (index d is the intercept), if any."""
    if not columns:
        return
    facts = dict(columns=columns, rank=rank, num_features=num_features, fit_intercept=fit_intercept)
    facts.update(dtype=dtype, exact=exact, near=near, dependence=dependence)
    notices = _FIT_NOTICES.get()
    if notices is not None:
        notices.append(facts)
        return
    warnings.warn(collinear_message(**facts), CollinearityWarning, stacklevel=stacklevel)
