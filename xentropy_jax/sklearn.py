"""A scikit-learn classifier that fits multinomial logistic regression with Newton steps.

This is the only module of the package that imports scikit-learn (the optional ``sklearn``
extra). The estimator validates its input with scikit-learn's own helpers, folds class weights
into the sample weights, maps ``C`` to the L2 strength of the functional core and calls
:func:`xentropy_jax.fit_logistic_regression`; predictions are computed in NumPy.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils._param_validation import Interval, StrOptions
    from sklearn.utils.class_weight import compute_class_weight
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data
except ImportError as error:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "xentropy_jax.sklearn needs scikit-learn, an optional dependency: install it with "
        "`pip install 'xentropy_jax[sklearn]'`."
    ) from error

import jax
import numpy as np
from scipy.special import log_softmax, softmax

from .solvers import NewtonCG, Status, TrustRegion, fit_logistic_regression

__all__ = ["LogisticRegression"]

# "auto" uses the explicit-Hessian Newton solver while the number of free parameters
# (n_features + fit_intercept) * free classes is at most this. Forming the Hessian costs
# O(n_samples * parameters^2) per iteration against O(n_samples * parameters) per CG product:
# measured on two CPU cores (2,000 and 20,000 rows), Newton wins below ~100 parameters, the two
# are within noise up to ~200, and Newton-CG wins from ~200 on (5x at 650).
AUTO_NEWTON_MAX_PARAMETERS = 128

# Row counts up to this are padded with zero-weight rows to the next power of two (at least
# 32), so that fits on nearby shapes, as cross-validation folds or scikit-learn's checks produce,
# share one compiled solver; zero-weight rows change no sum of the objective. Beyond it the
# compilation is negligible next to the fit, and rows are never padded.
_PAD_MAX_ROWS = 4096


def _padded_rows(n_samples: int) -> int:
    """The row count a fit on ``n_samples`` rows is padded to."""
    if n_samples > _PAD_MAX_ROWS:
        return n_samples
    return max(32, 1 << (n_samples - 1).bit_length())


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


def _free_parameters(n_features: int, n_classes: int, fit_intercept: bool, reference: bool) -> int:
    """Number of free parameters of the multinomial model as the core fits it."""
    return (n_features + int(fit_intercept)) * (n_classes - int(reference))


def _resolve_solver(solver: str, n_parameters: int) -> str:
    """The concrete solver behind ``solver`` ("auto" picks by the number of parameters)."""
    if solver != "auto":
        return solver
    return "newton" if n_parameters <= AUTO_NEWTON_MAX_PARAMETERS else "newton-cg"


# The CG solvers' default Kronecker preconditioner forms and factorises the (d+1)×(d+1) feature
# Gram matrix once per fit; beyond this many features that costs more than it saves (and, for
# text-sized d, more memory than there is), so CG falls back to the Hessian diagonal.
KRONECKER_MAX_FEATURES = 4000


def _core_solver(solver: str, n_features: int) -> str | NewtonCG | TrustRegion:
    """The functional core's configuration for the concrete ``solver`` on ``n_features``."""
    if n_features <= KRONECKER_MAX_FEATURES or solver == "newton":
        return solver
    configuration = NewtonCG if solver == "newton-cg" else TrustRegion
    return configuration(preconditioner="diagonal")


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
    configuration; a repeat fit on the same shape does not recompile. Float64 input is fitted
    in float64 (64-bit JAX types are enabled for the duration of the fit only, thread-locally,
    the global ``jax_enable_x64`` flag is never changed); float32 input is fitted in float32.

    Args:
        C: Inverse of the L2 regularisation strength, > 0; ``np.inf`` means no penalty.
        penalty: ``"l2"`` or ``None`` (no penalty; ``C`` is then ignored).
        fit_intercept: Whether to fit the (unpenalised) intercept ``b``.
        class_weight: ``None``, ``"balanced"`` (``n_samples / (n_classes * counts)``, counts
            weighted by ``sample_weight``) or a dict ``{label: weight}``; multiplies the
            sample weights.
        solver: ``"newton"`` (explicit Hessian, Cholesky), ``"newton-cg"`` (matrix-free
            truncated Newton), ``"trust-region"`` (Steihaug-CG, as liblinear's TRON) or
            ``"auto"``: ``"newton"`` when ``(n_features + fit_intercept) * free_classes <=
            AUTO_NEWTON_MAX_PARAMETERS`` (128), otherwise ``"newton-cg"``; free_classes is
            ``n_classes`` for the penalised multinomial model and ``n_classes - 1`` for
            binary problems and ``penalty=None``.
        tol: Stop when the largest absolute gradient entry and half the squared Newton
            decrement are both at most ``tol``. The default is tight enough that weighting a
            sample by an integer equals repeating it to ~1e-9. ``tol`` is raised, per
            parameter, to its gradient entry's rounding level, ``8 * eps * mean|x_j|`` for
            column j (~1e-6 for standardised float32 features), below which convergence
            cannot be verified.
        max_iter: Maximum number of outer (Newton) iterations, >= 1.
        warm_start: Start from the previous ``coef_`` and ``intercept_`` when they fit the
            new problem (same classes and features).
        verbose: Print the solver's progress.

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
        "penalty": [StrOptions({"l2"}), None],
        "fit_intercept": ["boolean"],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "solver": [StrOptions({"auto", "newton", "newton-cg", "trust-region"})],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        *,
        C: float = 1.0,
        penalty: str | None = "l2",
        fit_intercept: bool = True,
        class_weight: dict | str | None = None,
        solver: str = "auto",
        tol: float = 1e-8,
        max_iter: int = 100,
        warm_start: bool = False,
        verbose: int = 0,
    ) -> None:
        self.C = C
        self.penalty = penalty
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None) -> LogisticRegression:
        """Fit the model to the optimum of the penalised objective.

        Args:
            X: [n_samples, n_features] finite real features (array, DataFrame, list).
            y: [n_samples] class labels of any type, at least two distinct classes.
            sample_weight: [n_samples] non-negative weights, not all zero; None means ones.

        Returns:
            The fitted estimator.

        Raises:
            ValueError: Bad parameters, NaN/inf or complex features, features whose squares
                overflow the precision, mismatched lengths, continuous targets, fewer than two
                classes (after weighting), negative, all-zero or subnormal sample weights, NaN
                or negative ``class_weight``; or a fit that produced non-finite values.
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], order="C")
        check_classification_targets(y)
        classes, labels = np.unique(y, return_inverse=True)
        if classes.size < 2:
            raise ValueError(
                "LogisticRegression needs samples of at least 2 classes in the data; got "
                f"1 class: {classes[0]!r}."
            )
        weights = _check_sample_weight(
            sample_weight, X, dtype=X.dtype, ensure_non_negative=True, copy=True
        )
        if self.class_weight is not None:
            per_class = compute_class_weight(
                self.class_weight, classes=classes, y=y, sample_weight=weights
            )
            _check_class_weight(per_class, classes)
            weights *= per_class[labels].astype(X.dtype)
        class_mass = np.bincount(labels, weights=weights, minlength=classes.size)
        if np.count_nonzero(class_mass > 0) < 2:
            raise ValueError(
                "LogisticRegression needs a positive total weight on at least 2 classes; only "
                f"class {classes[np.argmax(class_mass)]!r} has any weight after applying "
                "sample_weight and class_weight."
            )
        if np.any(class_mass <= 0):
            empty = classes[class_mass <= 0].tolist()
            raise ValueError(
                f"The classes {empty} have zero total weight after applying sample_weight and "
                "class_weight: their logits would diverge. Drop those samples or give the "
                "classes a positive weight."
            )

        n_classes = classes.size
        binary = n_classes == 2
        unpenalised = self.penalty is None or np.isinf(self.C)
        # Class 0 as reference gives scikit-learn's binomial model, and removes the Hessian's
        # null direction when nothing is penalised.
        reference = binary or unpenalised
        l2 = 0.0 if unpenalised else 1.0 / (float(self.C) * float(weights.sum()))
        solver = _resolve_solver(
            self.solver,
            _free_parameters(X.shape[1], n_classes, self.fit_intercept, reference),
        )
        init = self._warm_start_init(classes, X.shape[1], reference)

        n_rows = _padded_rows(X.shape[0])
        if n_rows > X.shape[0]:
            X = np.concatenate([X, np.zeros((n_rows - X.shape[0], X.shape[1]), X.dtype)])
            labels = np.concatenate([labels, np.zeros(n_rows - labels.size, labels.dtype)])
            weights = np.concatenate([weights, np.zeros(n_rows - weights.size, X.dtype)])

        # Float64 input is fitted in float64, float32 in float32, whatever the global flag.
        with jax.enable_x64(X.dtype == np.float64):
            result = fit_logistic_regression(
                X,
                labels.astype(np.int32),
                n_classes,
                sample_weight=weights,
                l2=l2,
                fit_intercept=self.fit_intercept,
                reference_class=reference,
                solver=_core_solver(solver, X.shape[1]),
                tol=self.tol,
                max_iter=self.max_iter,
                init=init,
                verbose=bool(self.verbose),
                throw=False,
            )
            coef = np.asarray(result.params[0], dtype=X.dtype).T  # [K, d]
            intercept = np.asarray(result.params[1], dtype=X.dtype)  # [K]
            status = int(result.status)
            n_iter = int(result.n_iter)
            converged = bool(result.converged)

        finite = np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))
        if status == Status.NON_FINITE or not finite:
            raise ValueError(f"The {solver} fit met non-finite values: {Status.message(status)}")
        if binary:
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        else:
            # scikit-learn's symmetric convention: centring over classes leaves every
            # prediction unchanged. The penalised optimum already has centred coefficients.
            if unpenalised:
                coef = coef - coef.mean(axis=0)
            intercept = intercept - intercept.mean()
        self.classes_ = classes
        self.coef_ = coef
        self.intercept_ = intercept if self.fit_intercept else np.zeros_like(intercept)
        self.n_iter_ = np.asarray([n_iter], dtype=np.int32)
        self.solver_ = solver
        if not converged:
            warnings.warn(
                f"LogisticRegression ({solver}) stopped without converging after {n_iter} "
                f"iterations: {Status.message(status)}",
                ConvergenceWarning,
                stacklevel=3,  # the caller of fit, past scikit-learn's fit wrapper
            )
        return self

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
        coef, intercept = self.coef_, self.intercept_
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
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

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
