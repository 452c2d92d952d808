"""A scikit-learn classifier that fits multinomial logistic regression with Newton steps.

This is the only module of the package that imports scikit-learn (the optional ``sklearn``
extra). The estimator validates its input with scikit-learn's own helpers, folds class weights
into the sample weights, maps ``C`` to the L2 strength of the functional core and calls
:func:`xentropy_jax.fit_logistic_regression`; predictions are computed in NumPy.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import threading
import warnings
from collections import OrderedDict
from numbers import Integral, Real
from typing import NamedTuple

try:
    import sklearn
    from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import get_scorer, make_scorer
    from sklearn.model_selection import check_cv
    from sklearn.utils._param_validation import Interval, StrOptions
    from sklearn.utils.class_weight import compute_class_weight
    from sklearn.utils.metadata_routing import (
        MetadataRouter,
        MethodMapping,
        _raise_for_params,
        _routing_enabled,
        process_routing,
    )
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import (
        _check_method_params,
        _check_sample_weight,
        check_is_fitted,
        validate_data,
    )
except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "xentropy_jax.sklearn needs scikit-learn 1.7 or later, an optional dependency: "
        f"install it with `pip install 'xentropy_jax[sklearn]'` ({error})."
    ) from error

import jax
import numpy as np
import scipy.sparse
from jax.experimental import sparse as jax_sparse
from scipy.special import log_softmax, softmax

from ._buckets import fitted_rows, pad_rows
from .solvers import (
    CollinearityWarning,
    NewtonCG,
    SeparationWarning,
    Status,
    TrustRegion,
    fit_logistic_regression,
    fit_regularization_path,
)
from .solvers._fit import collinear_message, empty_classes_quietly, fit_notices, known_positive
from .solvers._path import positive_l2_promised
from .solvers._separation import Separation, separation_message
from .solvers._sharding import row_mesh, shard_rows
from .solvers._sparse_input import bucketed_size

__all__ = ["LogisticRegression", "LogisticRegressionCV"]

# "auto" uses the explicit-Hessian Newton solver while the number of free parameters
# (n_features + fit_intercept) * free classes is at most this. Forming the Hessian costs
# O(n_samples * parameters^2) per iteration against O(n_samples * parameters) per CG product:
# measured on two CPU cores (2,000 and 20,000 rows), Newton wins below ~100 parameters, the two
# are within noise up to ~200, and Newton-CG wins from ~200 on (5x at 650).
AUTO_NEWTON_MAX_PARAMETERS = 128

# The compiled programs (about 10 MB each) that JAX keeps in memory for the life of the
# process: when fits have needed more than this many distinct programs, JAX's in-memory
# caches are cleared before compiling the next one, so that a loop over many shapes cannot
# grow memory without bound.
_MAX_PROGRAMS = 8
_programs: OrderedDict[tuple, None] = OrderedDict()
_programs_lock = threading.Lock()


def _use_program(key: tuple) -> None:
    """Record that a fit runs the compiled program ``key``; keep at most _MAX_PROGRAMS.

    JAX offers no eviction of a single program, and a program hangs on through several of
    its internal caches, so past the bound every in-memory cache is cleared
    (``jax.clear_caches()``): other jitted functions recompile at their next call, or load
    from the persistent compilation cache when it is enabled.
    """
    with _programs_lock:
        if key in _programs:
            _programs.move_to_end(key)
            return
        if len(_programs) >= _MAX_PROGRAMS:
            jax.clear_caches()
            _programs.clear()
        _programs[key] = None


def _stored_bucket(X) -> int | None:
    """For the program key: None for dense X, else the padded count of its stored entries.

    A sparse fit's program depends on that count, padded to one of 32 sizes per power of two
    (`bucketed_size`): matrices of one shape with more or fewer non-zeros compile their own
    programs, and counted as one here, they grew memory past _MAX_PROGRAMS.
    """
    return bucketed_size(X.nnz) if scipy.sparse.issparse(X) else None


def _refuse_bcoo(X) -> None:
    """TypeError for a BCOO or BCSR, which scikit-learn's checks failed on inside JAX."""
    if isinstance(X, jax_sparse.JAXSparse) and not isinstance(X, jax_sparse.BCOO):
        raise TypeError(
            f"the estimators take dense arrays or scipy.sparse matrices, not a "
            f"{type(X).__name__} (scikit-learn cannot check one): convert it with "
            "scipy.sparse.csr_matrix((X.data, X.indices, X.indptr), X.shape)."
        )
    if isinstance(X, jax_sparse.BCOO):
        raise TypeError(
            "the estimators take dense arrays or scipy.sparse matrices, not a BCOO (scikit-learn "
            "cannot check one): pass scipy.sparse.coo_matrix((X.data, X.indices.T), X.shape), "
            "or fit it with xentropy_jax.fit_logistic_regression, which takes a BCOO."
        )


def _shard_rows(devices, X, labels: np.ndarray, weights: np.ndarray) -> tuple:
    """X, labels and weights with their rows split over `devices` (zero-weight rows padded)."""
    if scipy.sparse.issparse(X):
        raise ValueError("devices= splits dense X only; densify X or leave devices=None.")
    mesh = row_mesh(devices)
    extra = -X.shape[0] % mesh.size
    if extra:
        X = np.concatenate([X, np.zeros((extra, X.shape[1]), X.dtype)])
        labels = np.concatenate([labels, np.zeros(extra, labels.dtype)])
        weights = np.concatenate([weights, np.zeros(extra, weights.dtype)])
    with jax.enable_x64(X.dtype == np.float64):
        return shard_rows(mesh, X, labels, weights)


# Frames of this module between a user's call and `LogisticRegression.fit` (a refit inside
# `LogisticRegressionCV.fit`), for the warnings' stacklevel. Per thread: a process-wide
# `warnings.catch_warnings` would race with threads fitting at once (a threaded GridSearchCV).
_FRAMES_ABOVE_FIT = contextvars.ContextVar("frames_above_fit", default=0)


def _dense(array) -> np.ndarray:
    """``array`` as a dense ndarray: a scipy.sparse matrix or array is expanded."""
    return array.toarray() if scipy.sparse.issparse(array) else np.asarray(array)


class _FittedSetting(NamedTuple):
    """What `inference` reads of a fit: its C (inf without a penalty), intercept, class weights.

    Kept at fit time: parameters set after the fit (`set_params(C=np.inf)`) must not change the
    model whose standard errors are computed.
    """

    C: float
    fit_intercept: bool
    class_weight: object

    @classmethod
    def of(cls, C: float, fit_intercept, class_weight) -> _FittedSetting:
        weights = dict(class_weight) if isinstance(class_weight, dict) else class_weight
        return cls(float(C), bool(fit_intercept), weights)


def _class_weighted(
    weights: np.ndarray, class_weight, classes: np.ndarray, y: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    """``weights`` (in place) times the weight of each row's class, checked; None leaves them.

    ``positions`` are the rows' indices into ``classes``, the classes of the fit.
    """
    if class_weight is None:
        return weights
    with np.errstate(divide="ignore"):
        per_class = compute_class_weight(class_weight, classes=classes, y=y, sample_weight=weights)
    if isinstance(class_weight, str):  # "balanced": 1 / (a class's weighted count)
        # A class whose rows all weigh 0 (a bootstrap sample that misses it) got an infinite
        # weight; its rows weigh 0 whatever it is.
        counted = np.bincount(positions, weights=weights, minlength=len(classes)) > 0
        per_class = np.where(counted, per_class, 0.0)
    _check_class_weight(per_class, classes)
    product = weights.astype(np.float64) * per_class[positions]
    largest = np.finfo(weights.dtype).max
    if np.any(product > largest):  # (an overflow in the cast read as bad sample_weight)
        big = classes[np.unique(positions[product > largest])].tolist()
        raise ValueError(
            f"class_weight times sample_weight exceeds the largest {weights.dtype} number "
            f"({largest:.3g}) for the classes {big}: scale class_weight down (a fit depends "
            "only on the products C·class_weight·sample_weight)"
        )
    weights[:] = product
    return weights


def check_total_weight(total_weight, dtype) -> None:
    """A ValueError for a Σ sample_weight (per training split) of 0 or beyond `dtype`'s range.

    A sum that overflowed to inf made l2 = 1/(C·Σw) = 0, and the fit silently unpenalised; a
    split whose rows all weigh 0 was told to raise C.
    """
    total = np.asarray(total_weight, np.float64)
    if not np.all(total > 0):
        raise ValueError(
            "Sample weights must contain at least one non-zero number (in every training split "
            "of the cross-validation)."
        )
    if not np.all(total <= np.finfo(dtype).max):
        raise ValueError(
            f"Σ sample_weight overflows {np.dtype(dtype)} (its largest finite number is "
            f"{np.finfo(dtype).max:.3g}): divide sample_weight by a constant c and multiply C "
            "by c (a fit depends only on C·sample_weight)."
        )


def penalty_strength(C, total_weight, dtype):
    """l2 = 1/(C·Σw) of the core's objective; a ValueError where it is not a usable number.

    ``C·Σw`` of 6e-309 (weights of 1e-320, or ``C = 1e-310``) made l2 infinite or 1.7e308,
    and the fit then blamed l2, which no parameter of the estimator names, or "non-finite
    values". l2 must stay below √(largest number of the fit's dtype): 1e154 in float64, 1.8e19
    in float32.
    """
    check_total_weight(total_weight, dtype)
    product = np.asarray(C, np.float64) * np.asarray(total_weight, np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        l2 = 1.0 / product
    bound = np.sqrt(np.finfo(dtype).max)
    if not np.all(l2 <= bound):
        raise ValueError(
            f"C·Σ sample_weight = {float(np.min(product)):.3g} is too small for {np.dtype(dtype)}: "
            f"the L2 strength 1/(C·Σw) would exceed {bound:.2g}. Raise C or scale sample_weight "
            "up (a fit depends only on their product)."
        )
    return l2


def _check_class_weight(per_class: np.ndarray, classes: np.ndarray) -> None:
    """Raise ValueError, naming the classes, for a NaN, infinite or negative class weight."""
    per_class = np.asarray(per_class, dtype=float)
    bad = ~(np.isfinite(per_class) & (per_class >= 0))
    if np.any(bad):
        named = {classes[i].item(): per_class[i].item() for i in np.flatnonzero(bad)}
        raise ValueError(
            f"class_weight must be finite and >= 0 for every class, got {named}: a class "
            "weight multiplies the sample weights of its class."
        )


SUPPORTED_PENALTIES = 'the L2 penalty (penalty="l2", l1_ratio=0, C > 0) or none (C=np.inf)'


def _checked_ratios(l1_ratio) -> np.ndarray:
    """The values of ``l1_ratio`` (a number, values, or None) as a 1-D array, all in [0, 1]."""
    ratios = np.asarray([] if l1_ratio is None else l1_ratio, dtype=float).ravel()
    if not np.all((ratios >= 0) & (ratios <= 1)):  # NaN too
        raise ValueError(f"l1_ratio values must lie in [0, 1], got {l1_ratio!r}")
    return ratios


def check_penalty(penalty: str | None, l1_ratio, dual: bool = False) -> None:
    """Raise a ValueError naming the supported options for what the Newton solvers cannot fit.

    ``penalty="deprecated"`` is scikit-learn 1.8's default: the penalty then follows
    ``l1_ratio`` (a number, or the values of ``LogisticRegressionCV``'s ``l1_ratios``) and
    ``C``, as there. Any positive ``l1_ratio`` asks for an L1 or elastic-net penalty, and
    ``dual=True`` for liblinear's dual formulation.
    """
    ratios = _checked_ratios(l1_ratio)
    if penalty in ("l1", "elasticnet") or np.any(ratios > 0):
        raise ValueError(
            f"penalty={penalty!r} with l1_ratio={l1_ratio!r} asks for an L1 or elastic-net "
            f"penalty, which the Newton solvers cannot fit (the objective must be twice "
            f"differentiable). Supported: {SUPPORTED_PENALTIES}. For L1 or elastic-net use "
            "sklearn.linear_model.LogisticRegression(solver='saga')."
        )
    if dual:
        raise ValueError(
            "dual=True asks for the dual formulation, which only scikit-learn's liblinear "
            "solver has; the Newton solvers fit the primal objective (the same optimum). "
            "Leave dual=False."
        )


def fitted_penalty(penalty: str | None, l1_ratio, C: float, dual: bool = False) -> str | None:
    """The penalty fitted for these parameters, "l2" or None, warning as scikit-learn 1.9 does.

    ``C=np.inf`` fits no penalty whatever ``l1_ratio`` says, and ``penalty=None`` ignores ``C``
    and ``l1_ratio``: an ignored ``l1_ratio`` in (0, 1), or a ``C`` other than 1 beside
    ``penalty=None``, warns as there (``C=np.inf, l1_ratio=0.5`` was refused as elastic-net).
    ``"l2"``, the default here, stands where scikit-learn's default ``"deprecated"`` does: a
    positive ``l1_ratio`` with a finite ``C`` asks for L1 or elastic-net there, and raises
    here (`check_penalty`), as do ``"l1"`` and ``"elasticnet"``.
    """
    ratio = float(_checked_ratios(l1_ratio).sum())  # (one number, or none: 0)
    if penalty is None or (penalty in ("l2", "deprecated") and np.isinf(C)):
        check_penalty(None, 0.0, dual)
        if 0 < ratio < 1:
            warnings.warn(
                "l1_ratio parameter is only used when penalty is 'elasticnet'. Got (penalty=None)",
                UserWarning,
                stacklevel=3,
            )
        if penalty is None and C != 1.0:
            warnings.warn(
                "Setting penalty=None will ignore the C and l1_ratio parameters",
                UserWarning,
                stacklevel=3,
            )
        return None
    check_penalty(penalty, l1_ratio, dual)
    return "l2"


def _free_parameters(n_features: int, n_classes: int, fit_intercept: bool, reference: bool) -> int:
    """Number of free parameters of the multinomial model as the core fits it."""
    return (n_features + int(fit_intercept)) * (n_classes - int(reference))


# scikit-learn's solvers of the L2 or unpenalised objective, and the solver here that reaches
# the same optimum: code and grids written for scikit-learn keep working.
_SCIKIT_LEARN = {"newton-cholesky": "newton", "lbfgs": "auto", "sag": "auto", "saga": "auto"}


def _resolve_solver(solver: str, n_parameters: int, X) -> str:
    """The concrete solver behind ``solver`` ("auto": by the parameters, precision and format of X).

    In float32 "auto" always picks Newton-CG: the explicit Hessian's rounding (eps·‖H‖) swamps
    its small eigenvalues, which Newton's refinement of its steps (CG on matrix-free products)
    repairs only in part: on raw wine at C = 1e4 Newton converges 3.1e-4 above the optimum,
    Newton-CG 4.3e-7; on standardised iris, wine and breast cancer Newton-CG took 1.8 to
    2.9 ms a fit against Newton's 1.5 to 2.4 ms (before the refinement).
    """
    solver = _SCIKIT_LEARN.get(solver, solver)
    if solver != "auto":
        return solver
    small = n_parameters <= AUTO_NEWTON_MAX_PARAMETERS
    # Sparse X stays sparse with Newton-CG; "newton" forms its Hessian from a dense copy of X
    # (400,000 × 40 one-hot rows, 6 MiB as CSR: 11.9 s and 1.3 GiB against 3.5 s and 340 MiB).
    dense = not scipy.sparse.issparse(X)
    return "newton" if small and dense and X.dtype == np.float64 else "newton-cg"


# The CG solvers' default Kronecker preconditioner forms and factorises the (d+1)×(d+1) feature
# Gram matrix once per fit; beyond this many features that costs more than it saves (and, for
# text-sized d, more memory than there is), so CG falls back to the Hessian diagonal.
KRONECKER_MAX_FEATURES = 4000


def _core_solver(
    solver: str, n_features: int, product_dtype: str | None = None
) -> str | NewtonCG | TrustRegion:
    """The functional core's configuration for the concrete ``solver`` on ``n_features``.

    ``product_dtype`` reaches the Hessian products of the CG solvers (``"newton"`` forms the
    Hessian and ignores it).
    """
    wide = n_features > KRONECKER_MAX_FEATURES
    if solver == "newton" or (not wide and product_dtype is None):
        return solver
    preconditioner = "diagonal" if wide else "auto"
    config = NewtonCG if solver == "newton-cg" else TrustRegion
    return config(preconditioner=preconditioner, product_dtype=product_dtype)


def _sklearn_parameters(weights, intercept, binary: bool, fit_intercept: bool, centre=False):
    """scikit-learn's ``(coef_, intercept_)`` from the core's W [..., d, K] and b [..., K].

    Binary problems keep class 1's parameters relative to class 0's (``coef_`` [..., 1, d]);
    otherwise ``coef_`` is [..., K, d] and the intercept is centred over the classes, as is
    ``coef_`` with ``centre`` (the penalised optimum has centred coefficients already).
    """
    coef = np.swapaxes(weights, -1, -2)
    if binary:
        coef = coef[..., 1:, :] - coef[..., :1, :]
        intercept = intercept[..., 1:] - intercept[..., :1]
    else:
        if centre:
            coef = coef - coef.mean(axis=-2, keepdims=True)
        intercept = intercept - intercept.mean(axis=-1, keepdims=True)
    return coef, intercept if fit_intercept else np.zeros_like(intercept)


class LogisticRegression(ClassifierMixin, BaseEstimator):
    r"""Multinomial logistic regression fitted to the optimum with Newton-type steps.

    Minimises scikit-learn's penalised objective over ``W`` [n_features, n_classes] and
    ``b`` [n_classes]

    .. math::

        f(W, b) = \frac{\sum_i w_i \, \mathrm{CE}(x_i W + b, y_i)}{\sum_i w_i}
                  + \frac{\lVert W \rVert^2}{2 \, C \sum_i w_i},

    where ``w`` are the sample weights times the class weights and the intercept is not
    penalised, so that results agree with ``sklearn.linear_model.LogisticRegression`` at the
    same ``C``. Binary problems use scikit-learn's binomial model (class 0 is the reference,
    ``coef_`` has shape (1, n_features)). With ``penalty=None`` the multinomial model is fitted
    with class 0 as reference and the coefficients are returned centred over the classes.

    The fit is one compiled JAX function per (n_rows, n_features, n_classes) shape and
    configuration; a repeat fit on the same shape does not recompile. The rows are padded
    with zero-weight rows to one of four sizes per doubling (at most 25% extra beyond 1,024
    rows, the next power of two below), so that nearby row counts share one program (above
    1,024 rows the first row count of a configuration runs unpadded), and at most 8 programs
    are kept: a fit that needs a ninth clears JAX's in-memory caches
    (``jax.clear_caches()``). Float64 input is fitted
    in float64 (64-bit JAX types are enabled for the duration of the fit only, thread-locally,
    the global ``jax_enable_x64`` flag is never changed); float32 input is fitted in float32.

    Args:
        C: Inverse of the L2 regularisation strength, > 0; ``np.inf`` means no penalty
            (scikit-learn 1.8's replacement for ``penalty=None``).
        penalty: ``"l2"`` or ``None`` (no penalty; ``C`` is then ignored), or
            ``"deprecated"`` (scikit-learn 1.8's default: the penalty follows ``l1_ratio``
            and ``C``). ``"l1"`` and ``"elasticnet"`` are refused with an error naming the
            supported options.
        l1_ratio: ``0`` (or ``None``): the L2 penalty, as scikit-learn 1.8's default. Any
            positive value (L1 or elastic-net) with a finite ``C`` is refused with an error
            naming the supported options: the Newton solvers need a twice-differentiable
            objective. With ``C=np.inf`` or ``penalty=None`` it is ignored (with a warning
            for a value in (0, 1), as in scikit-learn 1.9).
        dual: ``False``, the primal objective. ``True`` (liblinear's dual formulation) is
            refused with an error.
        intercept_scaling: Accepted for compatibility with scikit-learn and ignored: only
            liblinear, which penalises its intercept, uses it there. The intercept here is
            never penalised.
        random_state: Accepted for compatibility with scikit-learn and ignored: the solvers
            are deterministic (scikit-learn uses it only for its stochastic and liblinear
            solvers).
        fit_intercept: Whether to fit the (unpenalised) intercept ``b``.
        class_weight: ``None``, ``"balanced"`` (``n_samples / (n_classes * counts)``, counts
            weighted by ``sample_weight``) or a dict ``{label: weight}``; multiplies the
            sample weights.
        solver: ``"newton"`` (explicit Hessian, Cholesky), ``"newton-cg"`` (matrix-free
            truncated Newton), ``"trust-region"`` (Steihaug-CG, as liblinear's TRON) or
            ``"auto"``: ``"newton"`` when the fit runs in float64 and ``(n_features +
            fit_intercept) * free_classes <= AUTO_NEWTON_MAX_PARAMETERS`` (128), otherwise
            ``"newton-cg"``; free_classes is ``n_classes`` for the penalised multinomial model
            and ``n_classes - 1`` for binary problems and ``penalty=None``. scikit-learn's
            names for solvers of the same objective run this package's: ``"newton-cholesky"``
            is ``"newton"``, and ``"lbfgs"``, ``"sag"`` and ``"saga"`` are ``"auto"`` (the same
            optimum, to the tolerance); ``solver_`` says what ran. ``"liblinear"``, which
            penalises the intercept, is refused.
        tol: Stop when the largest absolute gradient entry and half the squared Newton
            decrement are both at most ``tol``. The default is tight enough that weighting a
            sample by an integer equals repeating it to ~1e-9 on well-conditioned dense data
            (at weak penalties with sparse X, ~1e-6: pass a smaller ``tol``). ``tol`` is
            raised, per parameter, to its gradient entry's rounding level,
            ``8 * eps * mean|x_j|`` for column j (~1e-6 for standardised float32 features),
            below which convergence cannot be verified.
        max_iter: Maximum number of outer (Newton) iterations, >= 0 (0 returns the starting
            point, zeros or the warm start, with a ``ConvergenceWarning``, as scikit-learn).
        warm_start: Start from the previous ``coef_`` and ``intercept_`` when they fit the
            new problem (same classes and features).
        verbose: Print the solver's progress.
        n_jobs: Accepted for compatibility with scikit-learn and ignored: a fit is one
            compiled XLA program, which uses every core it is given. For
            ``GridSearchCV(n_jobs=...)``, run the search under
            ``joblib.parallel_backend("threading")``: worker threads share the compiled
            programs, worker processes compile them again (docs/estimator.md).
        devices: None (the default device), a number of devices (the first that many of
            ``jax.devices()``), or a list of devices or of device ids (``Device.id``; unlike
            jax's Device objects, ids can be cloned and pickled, as ``GridSearchCV`` and
            ``cross_val_score`` need): the rows are split over them (padded with
            zero-weight rows to a multiple of their number) and the parameters replicated;
            each gradient and Hessian product ends in one all-reduce of a (d + 1) × K block.
            The fit is the same as on one device, to rounding. Dense X only.
        product_dtype: None, or ``"float32"``: with the ``"newton-cg"`` solver (also when
            ``"auto"`` picks it) or ``"trust-region"`` and float64 input, CG's Hessian products
            run in float32 (mixed precision, ``NewtonCG(product_dtype="float32")``); the
            gradient, the line search or ratio test and the stopping test stay float64, so the
            fit reaches the same optimum. About twice as fast per product; pays with many
            classes at moderate ``tol``, costs products at tight ``tol`` on ill-conditioned
            data. Ignored by ``"newton"`` and for float32 input.

    Attributes:
        classes_: [n_classes] the class labels, sorted (any label type).
        coef_: [1, n_features] for binary problems, else [n_classes, n_features].
        intercept_: [1] for binary problems, else [n_classes].
        n_iter_: [1] int32, the number of Newton iterations run.
        solver_: The solver that ran (what ``"auto"`` resolved to).
        n_features_in_: Number of features seen in ``fit``.
        feature_names_in_: Feature names, when ``X`` had string column names.

    Example:
        >>> from sklearn.datasets import load_iris
        >>> from xentropy_jax.sklearn import LogisticRegression
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = LogisticRegression(C=10.0).fit(X, y)
        >>> clf.predict_proba(X[:2]).shape
        (2, 3)
    """

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="right")],
        "penalty": [StrOptions({"l2", "l1", "elasticnet", "deprecated"}), None],
        "l1_ratio": [Interval(Real, 0, 1, closed="both"), None],
        "dual": ["boolean"],
        "intercept_scaling": [Interval(Real, 0, None, closed="neither")],
        "random_state": ["random_state"],
        "fit_intercept": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "solver": [StrOptions({"auto", "newton", "newton-cg", "trust-region", *_SCIKIT_LEARN})],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "n_jobs": [Integral, None],
        "devices": [Interval(Integral, 1, None, closed="left"), list, tuple, None],
        "product_dtype": [StrOptions({"float32"}), None],
    }

    def __init__(
        self,
        penalty: str | None = "l2",
        *,
        C: float = 1.0,
        fit_intercept: bool = True,
        class_weight: dict | str | None = None,
        solver: str = "auto",
        tol: float = 1e-8,
        max_iter: int = 100,
        warm_start: bool = False,
        verbose: int = 0,
        l1_ratio: float | None = 0.0,
        n_jobs: int | None = None,
        devices: int | list | None = None,
        product_dtype: str | None = None,
        dual: bool = False,
        intercept_scaling: float = 1.0,
        random_state=None,
    ) -> None:
        self.C = C
        self.penalty = penalty
        self.dual = dual
        self.intercept_scaling = intercept_scaling
        self.random_state = random_state
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.verbose = verbose
        self.l1_ratio = l1_ratio
        self.n_jobs = n_jobs
        self.devices = devices
        self.product_dtype = product_dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None) -> LogisticRegression:
        """Fit the model to the optimum of the penalised objective.

        Args:
            X: [n_samples, n_features] finite real features (array, DataFrame, list, or a
                scipy.sparse CSR/CSC matrix, which is kept sparse).
            y: [n_samples] class labels of any type, at least two distinct classes.
            sample_weight: [n_samples] non-negative weights, not all zero; None means ones.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: Bad parameters (including an L1 or elastic-net penalty: ``penalty``
                in {"l1", "elasticnet"} or ``l1_ratio > 0``; ``dual=True``), NaN/inf or
                complex features, features whose squares overflow the precision, mismatched
                lengths, continuous targets, fewer than two classes, negative, all-zero
                (also after ``class_weight``) or subnormal sample weights, a sum of sample
                weights beyond the dtype's range, NaN or negative ``class_weight``; or a fit
                that produced non-finite values.
            TypeError: X is a jax BCOO (pass a scipy.sparse matrix; the message says how).
        """
        penalty = fitted_penalty(self.penalty, self.l1_ratio, self.C, self.dual)
        X, classes, labels, weights = self._fit_data(X, y, sample_weight)
        # A class whose weights are all 0 (a bootstrap sample of BaggingClassifier that misses
        # a rare class, binary problems included) is fitted towards probability 0, as
        # scikit-learn fits it; only weights that leave no class at all are refused.
        if not np.any(weights > 0):
            raise ValueError(
                "Sample weights must contain at least one non-zero number after applying "
                "class_weight."
            )

        n_classes = classes.size
        binary = n_classes == 2
        unpenalised = penalty is None  # (`fitted_penalty`: None for C = inf too)
        # Class 0 as reference gives scikit-learn's binomial model, and removes the Hessian's
        # null direction when nothing is penalised.
        reference = binary or unpenalised
        with np.errstate(over="ignore"):  # (an infinite sum is refused below)
            total_weight = np.sum(weights, dtype=np.float64)
        check_total_weight(total_weight, X.dtype)
        l2 = 0.0 if unpenalised else float(penalty_strength(self.C, total_weight, X.dtype))
        solver = _resolve_solver(
            self.solver,
            _free_parameters(X.shape[1], n_classes, self.fit_intercept, reference),
            X,
        )
        init = self._warm_start_init(classes, X.shape[1], reference)

        core_solver = _core_solver(solver, X.shape[1], self.product_dtype)
        configuration = (X.shape[1], X.dtype.str, _stored_bucket(X), n_classes)
        configuration += (bool(self.fit_intercept), reference, l2 > 0, core_solver)
        configuration += (bool(self.verbose), init is None, repr(self.devices))
        # Zero-weight rows up to a bucket: nearby row counts share the program (`_buckets`).
        X, labels, weights = pad_rows(fitted_rows(X.shape[0], configuration), X, labels, weights)

        labels = labels.astype(np.int32)
        if self.devices is not None:
            X, labels, weights = _shard_rows(self.devices, X, labels, weights)
        _use_program((X.shape[0], *configuration))
        # Float64 input is fitted in float64, float32 in float32, whatever the global flag.
        # A class that the weights empty (a bootstrap sample of BaggingClassifier, a zero
        # class_weight) is fitted towards probability 0, silently, as scikit-learn does.
        with (
            jax.enable_x64(X.dtype == np.float64),
            empty_classes_quietly(),
            fit_notices() as notices,
        ):
            result = fit_logistic_regression(
                X,
                labels,
                n_classes,
                sample_weight=weights,
                l2=l2,
                fit_intercept=self.fit_intercept,
                reference_class=reference,
                solver=core_solver,
                tol=self.tol,
                max_iter=self.max_iter,
                init=init,
                verbose=bool(self.verbose),
                throw=False,
            )
            fitted_weights = np.asarray(result.params[0], dtype=X.dtype)  # [d, K]
            intercept = np.asarray(result.params[1], dtype=X.dtype)  # [K]
            status = int(result.status)
            n_iter = int(result.n_iter)
            converged = bool(result.converged)

        finite = np.all(np.isfinite(fitted_weights)) and np.all(np.isfinite(intercept))
        if status == Status.NON_FINITE or not finite:
            raise ValueError(f"The {solver} fit met non-finite values: {Status.message(status)}")
        # scikit-learn's symmetric convention: centring over classes leaves every prediction
        # unchanged. The penalised optimum already has centred coefficients.
        self.coef_, self.intercept_ = _sklearn_parameters(
            fitted_weights, intercept, binary, self.fit_intercept, centre=unpenalised
        )
        self.classes_ = classes
        self.n_iter_ = np.asarray([n_iter], dtype=np.int32)
        self.solver_ = solver
        # For `inference`: no standard errors after separation, a warning short of convergence.
        self._fit_status = status
        # For `inference`: the fit's own setting, not parameters set after it.
        self._fitted_setting = _FittedSetting.of(
            np.inf if unpenalised else float(self.C), self.fit_intercept, self.class_weight
        )
        for facts in notices:  # at the caller's line, in the estimator's own terms
            options = dict(unpenalised="no penalty", penalise="use a finite C (penalty='l2')")
            if isinstance(facts, Separation):
                message, category = separation_message(facts, **options), SeparationWarning
            else:
                message, category = collinear_message(**facts, **options), CollinearityWarning
            warnings.warn(message, category, stacklevel=3 + _FRAMES_ABOVE_FIT.get())
        if not converged:
            warnings.warn(
                f"LogisticRegression ({solver}) stopped without converging after {n_iter} "
                f"iterations: {Status.message(status)}",
                ConvergenceWarning,
                # The caller of fit, past scikit-learn's fit wrapper (and past the frames of a
                # LogisticRegressionCV whose refit this is).
                stacklevel=3 + _FRAMES_ABOVE_FIT.get(),
            )
        return self

    def _fit_data(self, X, y, sample_weight) -> tuple:
        """Validated (X, classes, labels [n], weights [n]) of a fit, class weights folded in.

        Raises:
            ValueError: as :meth:`fit` for the data: fewer than two classes, bad sample weights,
                NaN, infinite or negative ``class_weight``.
        """
        _refuse_bcoo(X)
        X, y = validate_data(
            self, X, y, accept_sparse=["csr", "csc"], dtype=[np.float64, np.float32], order="C"
        )
        check_classification_targets(y)
        classes, labels = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data; got "
                f"1 class: {classes[0]!r}."
            )
        weights = _check_sample_weight(
            sample_weight, X, dtype=X.dtype, ensure_non_negative=True, copy=True
        )
        weights = _class_weighted(weights, self.class_weight, classes, y, labels)
        return X, classes, labels, weights

    def _warm_start_init(
        self, classes: np.ndarray, n_features: int, reference: bool
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(W [d, K], b [K]) from the previous fit when warm starting a compatible problem."""
        if not self.warm_start or not hasattr(self, "coef_"):
            return None
        previous = self.classes_
        if self.coef_.shape[1] != n_features or previous.shape != classes.shape:
            return None
        if np.any(previous != classes):
            return None
        coef, intercept = _dense(self.coef_), self.intercept_
        if coef.shape[0] == 1:  # binomial: class 0 is the reference
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        if reference:
            coef, intercept = coef - coef[:1], intercept - intercept[:1]
        return coef.T, intercept

    def decision_function(self, X) -> np.ndarray:
        """Logits ``X @ coef_.T + intercept_``.

        Args:
            X: [n_samples, n_features] features.

        Returns:
            [n_samples] for binary problems (the log-odds of ``classes_[1]``), else
            [n_samples, n_classes].
        """
        check_is_fitted(self)
        _refuse_bcoo(X)
        X = validate_data(
            self, X, accept_sparse=["csr", "csc"], dtype=[np.float64, np.float32], reset=False
        )
        scores = _dense(X @ self.coef_.T) + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def sparsify(self) -> LogisticRegression:
        """Store ``coef_`` as a scipy.sparse CSR matrix, as scikit-learn's ``sparsify`` does.

        Predictions are unchanged. An L2 or unpenalised fit has no zero coefficients, so this
        saves memory only where many coefficients are exactly zero. The intercept stays dense.
        A warm-started fit and :meth:`inference` read a sparse ``coef_`` as its dense values.

        Returns:
            The estimator, ``coef_`` a ``csr_matrix`` (a ``csr_array`` under scikit-learn's
            ``sparse_interface="sparray"`` configuration).
        """
        check_is_fitted(self, msg="Estimator, %(name)s, must be fitted before sparsifying.")
        sparray = sklearn.get_config().get("sparse_interface") == "sparray"
        csr = scipy.sparse.csr_array if sparray else scipy.sparse.csr_matrix
        self.coef_ = csr(self.coef_)
        return self

    def densify(self) -> LogisticRegression:
        """Store ``coef_`` as a dense ``numpy.ndarray`` again (a no-op when it is one).

        Returns:
            The estimator.
        """
        check_is_fitted(self, msg="Estimator, %(name)s, must be fitted before densifying.")
        self.coef_ = _dense(self.coef_)
        return self

    def _logits(self, X) -> np.ndarray:
        """[n_samples, n_classes] logits, with the binomial reference logit 0 prepended."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return np.stack([np.zeros_like(scores), scores], axis=1)
        return scores

    def predict(self, X) -> np.ndarray:
        """Most probable class label of each row: [n_samples] with the type of ``classes_``."""
        best = np.argmax(self._logits(X), axis=1)
        return self.classes_[best]

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``softmax(logits)``: [n_samples, n_classes], rows sum to 1."""
        return softmax(self._logits(X), axis=1)

    def predict_log_proba(self, X) -> np.ndarray:
        """Log class probabilities, computed stably as ``log_softmax(logits)``."""
        return log_softmax(self._logits(X), axis=1)

    def inference(
        self,
        X,
        y,
        sample_weight=None,
        *,
        cov_type: str = "nonrobust",
        groups=None,
        alpha: float = 0.05,
        marginal_effects: bool = False,
        method: str = "auto",
        subset=None,
        margins_subset=None,
    ):
        """Standard errors, tests and intervals of a ``penalty=None`` fit (statsmodels' MNLogit).

        Calls :func:`xentropy_jax.logit_inference` on ``coef_`` and ``intercept_`` with the
        data of the fit (the estimator keeps no copy of it). The estimates are reported in the
        reference-class parametrisation, class ``classes_[0]`` the base:
        ``params[j, k - 1] = coef_[k, j] - coef_[0, j]`` (and likewise the intercept, the
        last row) for the multinomial model; ``params[:, 0] = (coef_[0], intercept_[0])`` for a
        binary one. Sample and class weights act as frequency weights (nobs = their sum).

        Args:
            X: [n_samples, n_features] the features the model was fitted on.
            y: [n_samples] the labels it was fitted on.
            sample_weight: the sample weights of the fit, or None.
            cov_type: ``"nonrobust"``, ``"HC0"`` or ``"cluster"`` (with ``groups``).
            groups: [n_samples] cluster labels for ``cov_type="cluster"``.
            alpha: the intervals have level ``1 - alpha``.
            marginal_effects: also compute average marginal effects (``.margins``).
            method: ``"auto"``, ``"dense"`` or ``"cg"`` (see ``logit_inference``).
            subset: with ``"cg"``, the coefficients to compute (see ``logit_inference``).
            margins_subset: with ``"cg"``, the marginal effects whose standard errors are
                computed (see ``logit_inference``).

        Returns:
            A :class:`xentropy_jax.LogitInference`, with ``.summary()`` and ``.to_frame()``.

        Raises:
            InferenceError: a penalised fit (``penalty="l2"`` with finite ``C``): the penalised
                Hessian's inverse is not a covariance of the estimates; data that are not those
                of the fit; a singular Hessian (collinear columns, separation).

        Example:
            >>> from sklearn.datasets import load_iris
            >>> from xentropy_jax.sklearn import LogisticRegression
            >>> X, y = load_iris(return_X_y=True)
            >>> X = X[:, :1]  # sepal length: more features separate setosa
            >>> clf = LogisticRegression(penalty=None).fit(X, y)
            >>> result = clf.inference(X, y)
            >>> result.params.shape  # (features + intercept, classes - 1)
            (2, 2)
            >>> bool((result.bse > 0).all())
            True
        """
        from ._inference import logit_inference, not_converged_warning, separated_error

        check_is_fitted(self)
        status = getattr(self, "_fit_status", Status.CONVERGED)
        if status == Status.DIVERGED:
            # The coefficients alone read as a fit short of the maximum ("refit with l2=0").
            raise separated_error()
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], reset=False)
        position = np.searchsorted(self.classes_, y)
        position = np.minimum(position, self.classes_.size - 1)
        if np.any(self.classes_[position] != y):
            raise ValueError("y has labels that the estimator was not fitted on")
        setting = getattr(self, "_fitted_setting", None)
        if setting is None:  # (an estimator fitted before the setting was kept)
            C = self._fitted_c()
            C = np.inf if self.penalty is None else C
            setting = _FittedSetting.of(C, self.fit_intercept, self.class_weight)
        weights = _check_sample_weight(sample_weight, X, dtype=X.dtype, copy=True)
        weights = _class_weighted(weights, setting.class_weight, self.classes_, y, position)
        unpenalised = np.isinf(setting.C)
        l2 = 0.0 if unpenalised else 1.0 / (setting.C * float(weights.sum()))
        coef, intercept = _dense(self.coef_), self.intercept_
        if coef.shape[0] == 1:  # binomial: class 0 is the reference
            coef = np.concatenate([np.zeros_like(coef), coef])
            intercept = np.concatenate([np.zeros_like(intercept), intercept])
        names = getattr(self, "feature_names_in_", None)
        converged = status == Status.CONVERGED
        if not converged:  # the coefficients alone read as a converged fit
            not_converged_warning(status)
        with jax.enable_x64(X.dtype == np.float64):
            result = logit_inference(
                (coef.T, intercept),
                X,
                position.astype(np.int32),
                sample_weight=weights,
                fit_intercept=setting.fit_intercept,
                l2=l2,
                cov_type=cov_type,
                groups=groups,
                alpha=alpha,
                marginal_effects=marginal_effects,
                method=method,
                subset=subset,
                margins_subset=margins_subset,
                term_names=None if names is None else [str(n) for n in names],
                class_names=[str(c) for c in self.classes_],
            )
        return dataclasses.replace(result, converged=converged)

    def _fitted_c(self) -> float:
        """The ``C`` of the fitted coefficients (for :meth:`inference`)."""
        return float(self.C)

    def summary(self, X, y, sample_weight=None, **options) -> str:
        """The text table of :meth:`inference` (one block per class against ``classes_[0]``).

        Args:
            X: the features of the fit.
            y: the labels of the fit.
            sample_weight: the sample weights of the fit, or None.
            **options: passed to :meth:`inference` (``cov_type``, ``groups``, ``alpha``, ...).

        Returns:
            The summary as a string.
        """
        return self.inference(X, y, sample_weight, **options).summary()


def _cv_scorer(scoring, classes: np.ndarray):
    """How `LogisticRegressionCV` scores held-out rows: "accuracy", "neg_log_loss" or a scorer.

    The two names are computed in NumPy for every value of ``C`` at once; any other name or
    callable goes through scikit-learn's scorer, given the class labels (as scikit-learn's
    cross-validation gives them) where its metric takes ``labels``, because a held-out split
    may lack a class, and for two classes the larger as ``pos_label``; ``labels`` and
    ``pos_label`` set in the scorer itself are kept (they were overridden: an F1 scorer with
    ``pos_label=1`` scored class 2).

    Raises:
        ValueError: an unknown scorer name.
    """
    if scoring is None or scoring == "accuracy":
        return "accuracy"
    if scoring == "neg_log_loss":
        return "neg_log_loss"
    scorer = get_scorer(scoring)
    score_func = getattr(scorer, "_score_func", None)
    takes = inspect.signature(score_func).parameters if score_func is not None else {}
    if "labels" not in takes:
        return scorer
    options = {"labels": classes}
    if classes.size == 2 and "pos_label" in takes:
        options["pos_label"] = classes[-1]
    return make_scorer(
        score_func,
        greater_is_better=scorer._sign > 0,
        response_method=scorer._response_method,
        **{**options, **scorer._kwargs},  # what the scorer itself sets (`pos_label`) wins
    )


def _splits_in_lockstep(X) -> bool:
    """Whether `LogisticRegressionCV` fits all splits in one call vectorised over the splits.

    Vectorised, the splits advance in lockstep: every iteration runs for all of them until the
    slowest has converged. On CPU that cost more than it saved (2 cores, Cs=10, cv=5: 90.1 s
    against 62.7 s one split after the other at 20,000 × 64, K = 50, tol=1e-6; 3.03 s against
    2.51 s at 3,000 × 32, K = 10; equal within 0.01 s at 300 × 5 and 1,000 × 10, K = 3),
    so there the splits run one after the other. On accelerators, where one call of a
    small fit is bound by its kernel launches, they stay vectorised (not measured here). A
    vmapped sparse X would be traced: sparse splits always run one after the other.
    """
    return not scipy.sparse.issparse(X) and jax.default_backend() != "cpu"


def _held_out_scores(
    scorer: str, X, labels: np.ndarray, weights: np.ndarray, coefs, intercepts
) -> np.ndarray:
    """The weighted accuracy or mean log-likelihood of held-out rows, for every C at once.

    `coefs` [Cs, d, K] and `intercepts` [Cs, K] are one split's path (the core's parameters).
    """
    n_Cs, n_features, n_classes = coefs.shape
    logits = np.asarray(X @ coefs.transpose(1, 0, 2).reshape(n_features, -1))
    logits = logits.reshape(len(labels), n_Cs, n_classes) + intercepts
    if scorer == "accuracy":
        hits = np.argmax(logits, axis=2) == labels[:, None]
        return weights @ hits / weights.sum()
    # As scikit-learn's log_loss: probabilities clipped to [eps, 1 − eps] of their dtype, so
    # that one confidently wrong row cannot dominate a fold's score.
    eps = np.finfo(logits.dtype).eps
    probs = np.clip(softmax(logits, axis=2), eps, 1 - eps)
    picked = np.take_along_axis(probs, labels[:, None, None], axis=2)[..., 0]
    return weights @ np.log(picked) / weights.sum()


class LogisticRegressionCV(LogisticRegression):
    r"""Cross-validated choice of ``C`` along a warm-started regularisation path.

    For each cross-validation split, the penalised objective of :class:`LogisticRegression` is
    fitted at every value of ``Cs`` (smallest first) by
    :func:`xentropy_jax.fit_regularization_path`, each fit warm-started from the previous. All
    splits go through one compiled program: each split is the whole data set with its held-out
    rows at weight zero, so every split has the same shape (one compilation, no worker
    processes). On CPU the splits run one after the other; on accelerators, together,
    vectorised over the splits. The ``C`` with the best mean held-out score is kept, and the
    model is refitted on all the data at that ``C``.

    The parameters are scikit-learn 1.9's, and so are the fitted attributes, in the layout
    that ``use_legacy_attributes`` chooses there.

    Args:
        Cs: Number of values on the grid ``np.logspace(-4, 4, Cs)``, or the values of ``C``
            (each > 0; ``np.inf`` is the unpenalised fit, scikit-learn 1.8's replacement for
            ``penalty=None``), in any order: the paths are fitted from the smallest ``C``
            up, and the attributes keep the order given, as scikit-learn's.
        l1_ratios: None, or values that are all 0 (the L2 penalty; each gets its own entry of
            the ``l1_ratios`` axis of the attributes, as in scikit-learn). Positive values
            (L1 or elastic-net) are refused with an error naming the supported options.
        cv: Splitter, number of folds (stratified), or None for 5 stratified folds.
        penalty: ``"l2"``, or ``"deprecated"`` (scikit-learn 1.8's default: the penalty
            follows ``l1_ratios``). ``"l1"`` and ``"elasticnet"`` are refused.
        scoring: None or ``"accuracy"`` (the default measure of classifiers), or
            ``"neg_log_loss"``: both computed here for every ``C`` at once (as scikit-learn's
            ``log_loss``, probabilities are clipped to ``[eps, 1 − eps]``); or any other
            scorer name or callable ``scorer(estimator, X, y)``, called once per split and
            ``C`` (a metric that takes ``labels`` is given the classes, as in scikit-learn).
            Held-out rows are weighted by their sample weights, when given (a callable that
            is not a scikit-learn scorer is called without them). :meth:`score` uses the same
            scorer.
        refit: Refit on all the data at the ``C`` of the best mean score. Otherwise, as in
            scikit-learn, each split keeps its own best ``C``: ``C_`` is their mean, and the
            coefficients are the mean over the splits of each one's at its best ``C``.
        use_legacy_attributes: ``False`` (scikit-learn's default from 1.10): ``C_`` and
            ``l1_ratio_`` are numbers, ``scores_`` [n_splits, n_l1_ratios, n_Cs]. ``True``:
            scikit-learn's earlier layout, dictionaries keyed by class (below).
        fit_intercept, class_weight, solver, tol, max_iter, verbose, n_jobs, product_dtype,
            dual, intercept_scaling, random_state: as :class:`LogisticRegression`
            (``n_jobs`` is accepted and ignored: a fit already uses every core, and the
            splits share one compiled program; ``verbose`` prints the refit's iterations,
            not those of the splits' paths, which run as one compiled scan).

    Attributes:
        Cs_: [n_Cs] the values of ``C``, in the order given (``np.logspace`` order, increasing,
            for an integer ``Cs``).
        l1_ratios_: [n_l1_ratios] the values of ``l1_ratios``, or ``[None]``.
        C_: The chosen ``C`` (a float; legacy: [n_classes], or [1] for binary problems, the
            same value repeated).
        l1_ratio_: 0.0 (legacy: [n_classes] or [1], None for a refit without
            ``l1_ratios``).
        scores_: [n_splits, n_l1_ratios, n_Cs] held-out scores (legacy: a dict from each
            class, ``classes_[1]`` alone for binary problems, to the same [n_splits, n_Cs]
            array, [n_splits, n_Cs, n_l1_ratios] with ``l1_ratios``).
        coefs_paths_: [n_splits, n_l1_ratios, n_Cs, n_classes (1 if binary), n_features
            (+ 1 with the intercept last)] the coefficients along each split's path (legacy:
            a dict from class to [n_splits, n_Cs, (n_l1_ratios,) n_features (+ 1)]).
        n_iter_: [n_splits, n_l1_ratios, n_Cs] Newton iterations of each fit of the paths
            (legacy: [1, n_splits, n_Cs], [1, n_splits, n_Cs, n_l1_ratios] with
            ``l1_ratios``).
        coef_, intercept_, classes_, solver_, n_features_in_: as :class:`LogisticRegression`.

    Example:
        >>> from sklearn.datasets import load_iris
        >>> from xentropy_jax.sklearn import LogisticRegressionCV
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = LogisticRegressionCV(Cs=4, cv=3).fit(X, y)
        >>> clf.scores_.shape, clf.C_ in clf.Cs_
        ((3, 1, 4), True)
    """

    _parameter_constraints: dict = {
        key: value
        for key, value in LogisticRegression._parameter_constraints.items()
        if key not in ("C", "penalty", "l1_ratio", "warm_start", "devices")
    }
    _parameter_constraints.update(
        {
            "Cs": [Interval(Integral, 1, None, closed="left"), "array-like"],
            "l1_ratios": ["array-like", None],
            "cv": ["cv_object"],
            "penalty": [StrOptions({"l2", "l1", "elasticnet", "deprecated"})],
            "scoring": [str, callable, None],
            "refit": ["boolean"],
            "use_legacy_attributes": ["boolean"],
        }
    )

    def __init__(
        self,
        *,
        Cs: int | np.ndarray = 10,
        l1_ratios=None,
        fit_intercept: bool = True,
        cv=None,
        dual: bool = False,
        penalty: str = "l2",
        scoring=None,
        solver: str = "auto",
        tol: float = 1e-8,
        max_iter: int = 100,
        class_weight: dict | str | None = None,
        n_jobs: int | None = None,
        verbose: int = 0,
        refit: bool = True,
        intercept_scaling: float = 1.0,
        random_state=None,
        use_legacy_attributes: bool = False,
        product_dtype: str | None = None,
    ) -> None:
        self.Cs = Cs
        self.l1_ratios = l1_ratios
        self.fit_intercept = fit_intercept
        self.cv = cv
        self.dual = dual
        self.penalty = penalty
        self.scoring = scoring
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.refit = refit
        self.intercept_scaling = intercept_scaling
        self.random_state = random_state
        self.use_legacy_attributes = use_legacy_attributes
        self.product_dtype = product_dtype

    # Fixed settings of the parent estimator that this one does not expose.
    C = 1.0
    l1_ratio = 0.0
    warm_start = False
    devices = None

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, **params) -> LogisticRegressionCV:
        """Score every ``C`` by cross-validation, then refit at the best.

        Args:
            X: [n_samples, n_features] features, dense or scipy.sparse CSR/CSC.
            y: [n_samples] class labels, at least two classes.
            sample_weight: [n_samples] non-negative weights, or None for ones.
            **params: Metadata for the splitter (``groups`` for ``GroupKFold``) and the
                scorer, routed as in scikit-learn: only with
                ``sklearn.set_config(enable_metadata_routing=True)``. The held-out rows are
                then weighted only where the scorer requests ``sample_weight``
                (``make_scorer(...).set_score_request(sample_weight=True)``); a named
                ``scoring`` cannot request it, so ``sample_weight`` raises scikit-learn's
                ``UnsetMetadataPassedError`` there, as in scikit-learn.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: as :meth:`LogisticRegression.fit`, for values of ``Cs`` that are not
                positive (or NaN), for an empty ``l1_ratios`` or one with a positive value,
                for an unknown ``scoring`` name, and for ``**params`` without metadata
                routing.
        """
        _raise_for_params(params, self, "fit")
        check_penalty(self.penalty, self.l1_ratios, self.dual)
        if self.l1_ratios is not None and np.size(self.l1_ratios) == 0:
            raise ValueError("l1_ratios must hold at least one value (0 for the L2 penalty)")
        if isinstance(self.Cs, Integral):
            given = np.logspace(-4, 4, int(self.Cs))
        else:
            given = np.asarray(self.Cs, dtype=float).ravel()
        if given.size < 1 or not np.all(given > 0):  # NaN too
            raise ValueError(f"Cs must be > 0 (np.inf: no penalty), got {self.Cs!r}")
        # The paths run from the strongest penalty to the weakest (warm starts); the
        # attributes keep the order given, as scikit-learn's.
        order = np.argsort(given, kind="stable")
        grid, given_order = given[order], np.argsort(order)
        X, classes, labels, weights = self._fit_data(X, y, sample_weight)
        scorer = _cv_scorer(self.scoring, classes)
        if _routing_enabled():
            routed = process_routing(self, "fit", sample_weight=sample_weight, **params)
            split_params, score_params = routed.splitter.split, dict(routed.scorer.score)
        else:
            split_params = {}
            score_params = {} if sample_weight is None else {"sample_weight": sample_weight}
        # The held-out scores weigh rows by their sample weights only, as a scorer would: the
        # class weights shape the fits, not the measure of their predictions.
        score_weights = _check_sample_weight(score_params.get("sample_weight"), X, dtype=X.dtype)
        splits = list(check_cv(self.cv, labels, classifier=True).split(X, labels, **split_params))
        n_classes = classes.size
        reference = n_classes == 2
        solver = _resolve_solver(
            self.solver, _free_parameters(X.shape[1], n_classes, self.fit_intercept, reference), X
        )
        fold_weights = np.zeros((len(splits), X.shape[0]), X.dtype)
        for index, (train, _) in enumerate(splits):
            # Added, not assigned: a bootstrap split repeats training rows, and X[train] would
            # count each as often (an assignment counted it once: C_ came out 10 for 1).
            np.add.at(fold_weights[index], train, weights[train])
        l2 = penalty_strength(grid[None, :], fold_weights.sum(axis=1, keepdims=True), X.dtype)
        paths = self._fit_paths(X, labels, n_classes, reference, fold_weights, l2, solver)
        coefs = np.asarray(paths.params[0], dtype=X.dtype)  # [splits, Cs, d, K]
        intercepts = np.asarray(paths.params[1], dtype=X.dtype)  # [splits, Cs, K]
        statuses = np.asarray(paths.status)  # [splits, Cs]
        if np.any(statuses != Status.CONVERGED):
            failed = statuses != Status.CONVERGED
            first = statuses[failed].flat[0]
            warnings.warn(
                f"LogisticRegressionCV ({solver}): {np.count_nonzero(failed)} of "
                f"{statuses.size} cross-validation fits stopped without converging (the first: "
                f"{Status.message(int(first))}); scores_ and C_ rest on them.",
                ConvergenceWarning,
                stacklevel=3,  # the caller of fit, past scikit-learn's fit wrapper
            )
        # scikit-learn's parameters of every fit: [splits, Cs, rows, d] and [splits, Cs, rows].
        path_coefs, path_intercepts = _sklearn_parameters(
            coefs, intercepts, reference, self.fit_intercept
        )
        scores = np.empty((len(splits), grid.size))
        for index, (_, test) in enumerate(splits):
            if isinstance(scorer, str):
                if not score_weights[test].sum() > 0:  # as scikit-learn's own scorers
                    raise ValueError(
                        f"The held-out rows of split {index} have total sample weight 0, so "
                        "their score is undefined (it was NaN, and C_ came from the others by "
                        "chance): give every split's held-out rows a positive weight."
                    )
                scores[index] = _held_out_scores(
                    scorer,
                    X[test],
                    labels[test],
                    score_weights[test],
                    coefs[index],
                    intercepts[index],
                )
                continue
            options = _check_method_params(X, score_params, indices=test)
            if not _routing_enabled() and not hasattr(scorer, "_score_func"):
                options = {}  # a plain callable may not take the weights
            for position in range(grid.size):
                fitted = self._fitted_copy(
                    classes, path_coefs[index, position], path_intercepts[index, position]
                )
                scores[index, position] = scorer(fitted, X[test], classes[labels[test]], **options)
        scores, path_coefs, path_intercepts, n_iter = (
            part[:, given_order]
            for part in (scores, path_coefs, path_intercepts, np.asarray(paths.n_iter))
        )
        self.classes_ = classes
        self.Cs_ = given
        if self.refit:
            chosen = float(given[int(np.argmax(scores.mean(axis=0)))])
            refit = LogisticRegression(
                C=chosen,
                fit_intercept=self.fit_intercept,
                class_weight=self.class_weight,
                solver=self.solver,
                tol=self.tol,
                max_iter=self.max_iter,
                verbose=self.verbose,
                product_dtype=self.product_dtype,
            )
            # Its warnings point at the caller's line: past this fit and its wrapper.
            token = _FRAMES_ABOVE_FIT.set(2)
            try:
                model = refit.fit(X, y, sample_weight=sample_weight)
            finally:
                _FRAMES_ABOVE_FIT.reset(token)
            self.coef_, self.intercept_ = model.coef_, model.intercept_
            self._fit_status = model._fit_status  # for `inference`, as the refit's own
        else:
            # As scikit-learn: every split at its own best C.
            best = np.argmax(scores, axis=1)
            chosen = float(np.mean(given[best]))
            folds = np.arange(len(splits))
            self.coef_ = path_coefs[folds, best].mean(axis=0)
            self.intercept_ = path_intercepts[folds, best].mean(axis=0)
            chosen_statuses = statuses[folds, best]
            unconverged = chosen_statuses[chosen_statuses != Status.CONVERGED]
            self._fit_status = int(unconverged[0]) if unconverged.size else Status.CONVERGED
        self.solver_ = solver
        self._set_path_attributes(chosen, scores, path_coefs, path_intercepts, n_iter)
        C = float(np.ravel(self.C_)[0])
        self._fitted_setting = _FittedSetting.of(
            np.inf if self.penalty is None else C, self.fit_intercept, self.class_weight
        )
        return self

    def _fit_paths(self, X, labels, n_classes: int, reference: bool, fold_weights, l2, solver: str):
        """The regularisation path of every split, all splits through one compiled program.

        A split is the whole X with its held-out rows at weight 0 (`fold_weights`
        [splits, n_samples]); `l2` [splits, Cs] is each split's penalty per value of C. Every
        split has the same shapes, so the splits share one program (vectorised over a batch of
        one split). They run one after the other unless `_splits_in_lockstep` says otherwise.
        """
        # Built once, not in each split's trace of the lambda below.
        labels = labels.astype(np.int32)
        core_solver = _core_solver(solver, X.shape[1], self.product_dtype)
        configuration = ("path", X.shape[1], X.dtype.str, _stored_bucket(X), n_classes)
        # The vmapped paths' l2 values are traced: that every one is > 0 (so that float32
        # columns of large mean are centred, as in the refit) is promised from the values here.
        penalised = known_positive(l2, X.dtype)
        configuration += (bool(self.fit_intercept), reference, core_solver, l2.shape[1], penalised)
        configuration += (_splits_in_lockstep(X) and len(l2),)
        # Zero-weight rows up to a bucket: the outer folds of a nested cross-validation, whose
        # row counts differ by one, share the program (`_buckets`).
        X, labels, fold_weights = pad_rows(
            fitted_rows(X.shape[0], configuration), X, labels, fold_weights
        )
        _use_program((X.shape[0], *configuration))
        with jax.enable_x64(X.dtype == np.float64), positive_l2_promised(penalised):
            fit_path = jax.vmap(
                lambda w, l2_values: fit_regularization_path(
                    X,
                    labels,
                    n_classes,
                    l2_values,
                    sample_weight=w,
                    fit_intercept=self.fit_intercept,
                    reference_class=reference,
                    solver=core_solver,
                    tol=self.tol,
                    max_iter=self.max_iter,
                    throw=False,
                )
            )
            if _splits_in_lockstep(X):
                return fit_path(fold_weights, l2)
            paths = [
                fit_path(w[None], strength[None])
                for w, strength in zip(fold_weights, l2, strict=True)
            ]
            return jax.tree.map(lambda *leaves: np.concatenate(leaves), *paths)

    def _fitted_copy(self, classes, coef, intercept) -> LogisticRegression:
        """A fitted :class:`LogisticRegression` with these parameters, for a scorer."""
        model = LogisticRegression()
        model.classes_, model.coef_, model.intercept_ = classes, coef, intercept
        model.n_features_in_ = coef.shape[1]
        return model

    def _fitted_c(self) -> float:
        """The chosen ``C_``, not the unused ``C`` inherited from :class:`LogisticRegression`."""
        return float(np.ravel(self.C_)[0])

    def _set_path_attributes(self, chosen, scores, coefs, intercepts, n_iter) -> None:
        """``C_``, ``l1_ratio_``, ``l1_ratios_``, ``scores_``, ``coefs_paths_`` and ``n_iter_``.

        In scikit-learn's layout for ``use_legacy_attributes``, from ``scores`` and ``n_iter``
        [splits, Cs] and the paths' parameters [splits, Cs, rows, d] and [splits, Cs, rows].
        """
        ratios = None if self.l1_ratios is None else np.asarray(self.l1_ratios, float).ravel()
        self.l1_ratios_ = np.asarray([None]) if ratios is None else ratios
        n_ratios = self.l1_ratios_.size
        if self.fit_intercept:
            coefs = np.concatenate([coefs, intercepts[..., None]], axis=-1)
        n_iter = n_iter.astype(np.int32)
        if not self.use_legacy_attributes:
            self.C_ = chosen
            self.l1_ratio_ = 0.0
            self.scores_ = np.repeat(scores[:, None], n_ratios, axis=1)
            self.coefs_paths_ = np.repeat(coefs[:, None], n_ratios, axis=1)
            self.n_iter_ = np.repeat(n_iter[:, None], n_ratios, axis=1)
            return
        keys = self.classes_[1:] if self.classes_.size == 2 else self.classes_
        self.C_ = np.full(keys.size, chosen)
        # scikit-learn's quirk, kept: None from a refit without l1_ratios, else 0.0.
        self.l1_ratio_ = np.full(keys.size, None if ratios is None and self.refit else 0.0)
        if ratios is not None:  # the l1_ratios axis comes last in this layout
            scores = np.repeat(scores[..., None], n_ratios, axis=-1)
            coefs = np.repeat(coefs[:, :, None], n_ratios, axis=2)
            n_iter = np.repeat(n_iter[..., None], n_ratios, axis=-1)
        self.scores_ = {key: scores.copy() for key in keys}
        self.coefs_paths_ = {key: coefs[..., row, :] for row, key in enumerate(keys)}
        self.n_iter_ = n_iter[None]

    def score(self, X, y, sample_weight=None, **score_params) -> float:
        """The held-out measure of ``scoring`` on ``(X, y)`` (accuracy by default).

        Args:
            X: [n_samples, n_features] features.
            y: [n_samples] true labels.
            sample_weight: [n_samples] weights of the rows, or None.
            **score_params: Metadata for the scorer, routed as in :meth:`fit` (only with
                metadata routing enabled).

        Returns:
            The score, larger is better (``"neg_log_loss"`` is the negated log-loss).

        Raises:
            ValueError: ``**score_params`` without metadata routing.
        """
        _raise_for_params(score_params, self, "score")
        if _routing_enabled():
            routed = process_routing(self, "score", sample_weight=sample_weight, **score_params)
            options = routed.scorer.score
        else:
            options = {} if sample_weight is None else {"sample_weight": sample_weight}
        return self._get_scorer()(self, X, y, **options)

    def _get_scorer(self):
        """scikit-learn's scorer for ``scoring`` (accuracy when None)."""
        return get_scorer(self.scoring if self.scoring is not None else "accuracy")

    def get_metadata_routing(self) -> MetadataRouter:
        """How :meth:`fit` and :meth:`score` route metadata, as in scikit-learn.

        ``fit`` sends its parameters to the splitter's ``split`` and to the scorer; ``score``
        sends them to the scorer. Only used with ``enable_metadata_routing=True``.

        Returns:
            A ``sklearn.utils.metadata_routing.MetadataRouter``.
        """
        return (
            MetadataRouter(owner=self)
            .add_self_request(self)
            .add(
                splitter=self.cv,
                method_mapping=MethodMapping().add(caller="fit", callee="split"),
            )
            .add(
                scorer=self._get_scorer(),
                method_mapping=MethodMapping()
                .add(caller="score", callee="score")
                .add(caller="fit", callee="score"),
            )
        )
