"""Outcome of a fit: the result pytree, the status codes and the error raised on failure."""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax


class Status(enum.IntEnum):
    """How a solver stopped. `Status.message(code)` says what it means and what to do.

    Codes: CONVERGED (0), MAX_ITER (1), LINE_SEARCH_FAILED (2), NON_FINITE (3), DIVERGED (4),
    and, for input that only `jit` let through unchecked (outside `jit` the same input raises a
    `ValueError` before compiling): INVALID_LABELS (5), INVALID_WEIGHTS (6), ZERO_WEIGHT (7),
    INVALID_L2 (8), INVALID_TOL (9). With one of these the solver takes no iteration.
    `FitResult.status` holds the code as an int array; `Status(int(code))` names it.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, max_iter=1, throw=False)
        >>> xj.Status(int(result.status)).name
        'MAX_ITER'
        >>> xj.Status.message(result.status).startswith("Stopped at the iteration limit")
        True
    """

    CONVERGED = 0
    MAX_ITER = 1
    LINE_SEARCH_FAILED = 2
    NON_FINITE = 3
    DIVERGED = 4
    INVALID_LABELS = 5
    INVALID_WEIGHTS = 6
    ZERO_WEIGHT = 7
    INVALID_L2 = 8
    INVALID_TOL = 9

    @staticmethod
    def message(code: int) -> str:
        """A sentence describing the status `code` and the remedy."""
        return _MESSAGES[Status(int(code))]


# Internal marker while the loop runs; never returned.
RUNNING = -1

_MESSAGES = {
    Status.CONVERGED: "Converged: max|gradient| <= tol and the Newton decrement <= tol.",
    Status.MAX_ITER: (
        "Stopped at the iteration limit before max|gradient| <= tol: increase max_iter, loosen "
        "tol, or scale the features (standardising X usually helps)."
    ),
    Status.LINE_SEARCH_FAILED: (
        "The line search found no decrease along the Newton direction before the gradient "
        "reached its rounding level: the fit is not as accurate as tol asks, and the working "
        "precision cannot improve it. In float32 (JAX's default) this comes from badly scaled "
        "or nearly collinear features: standardise the columns, or fit in float64 "
        "(jax.config.update('jax_enable_x64', True) and float64 X); or increase the L2 penalty."
    ),
    Status.NON_FINITE: (
        "Non-finite values (NaN or inf) appeared in the loss or the gradient: check X, the "
        "sample weights and the initial parameters for NaN/inf, or scale the features."
    ),
    Status.DIVERGED: (
        "The data are linearly separable and there is no L2 penalty, so the maximum-likelihood "
        "estimate does not exist (the loss goes to 0 as the weights grow without bound): set "
        "l2 > 0 (penalty='l2' with a finite C)."
    ),
    Status.INVALID_LABELS: (
        "A label lies outside [0, num_classes) (a negative label such as -1, or one >= "
        "num_classes): map the labels to 0..K-1, or raise num_classes. No iteration was taken."
    ),
    Status.INVALID_WEIGHTS: (
        "A sample weight is negative, NaN or infinite: weights must be finite and >= 0. No "
        "iteration was taken."
    ),
    Status.ZERO_WEIGHT: (
        "The sample weights sum to zero, or to less than the smallest normal number of the "
        "working precision (subnormal weights such as 1e-320): the objective divides by their "
        "sum. Give some rows a positive weight, or rescale the weights (e.g. divide them by "
        "their maximum). No iteration was taken."
    ),
    Status.INVALID_L2: (
        "l2 is negative or not finite: the penalty (l2/2)·‖W‖² needs 0 <= l2 < inf. No "
        "iteration was taken."
    ),
    Status.INVALID_TOL: (
        "tol is negative or NaN: the stopping test max|gradient| <= tol needs tol >= 0. No "
        "iteration was taken."
    ),
}


class CollinearityWarning(UserWarning):
    """Warned when the features are exactly collinear and nothing is penalised (l2 = 0).

    The coefficients along the collinear directions are then not identified: every split of
    the effect between the dependent columns has the same objective. The fit returns the
    minimum-norm optimum (what a pseudo-inverse gives) and the warning names the columns.

    Example:
        >>> import warnings
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 1, 2, 1, 2, 0])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     result = xj.fit_logistic_regression(np.hstack([X, X]), y, 3, tol=1e-6)
        >>> [w.category.__name__ for w in caught if w.category.__module__.startswith("xentropy")]
        ['CollinearityWarning']
        >>> W = result.params[0]
        >>> bool(np.allclose(W[0], W[1]))  # the effect split evenly: the minimum norm
        True
    """


class SeparationWarning(UserWarning):
    """Warned when an unpenalised fit (l2 = 0) ran on quasi-separated data.

    Some change of the coefficients then raises a margin of some row (its label's logit over
    another class's) and lowers none, so no finite maximum-likelihood estimate exists: the loss
    keeps falling, ever more slowly, and the fit stops where the gradient test passes
    (CONVERGED), with the coefficients along that change large and growing as `tol` shrinks
    (the predicted probabilities settle), or at MAX_ITER or LINE_SEARCH_FAILED, which the
    warning then explains. Completely separated data (every row classified correctly) stop the
    fit instead (`Status.DIVERGED`). Decided by a linear program after the fit, up to
    N·(K − 1)·(d + 1) = 2¹⁵ entries, and beyond it (up to a Gram of N·(K − 1)·(d + 1)² = 2²⁷
    and (d + 1)(K − 1) = 512) by a certificate read off the fitted coefficients; classes
    without rows are left out.

    Example:
        Class 1 alone where x > 0, both classes at x = 0:

        >>> import warnings
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [0.0], [1.0], [2.0]])
        >>> y = np.array([0, 0, 0, 1, 1, 1])
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     result = xj.fit_logistic_regression(X, y, 2)
        >>> [w.category.__name__ for w in caught if w.category.__module__.startswith("xentropy")]
        ['SeparationWarning']
        >>> bool(result.converged), bool(abs(float(result.params[0][0, 1])) > 5)
        (True, True)
    """


class FitResult(NamedTuple):
    """The result of `fit_logistic_regression` (a pytree: batched under `vmap`).

    Attributes:
        params: (W [d, K], b [K]); b is zeros without an intercept, and the reference class's
            column and entry are zeros with `reference_class=True`.
        loss: scalar objective value at the fitted point: where the fit centred columns of X
            (below float64, docs/solvers.md#precision), that of the centred parameters, which
            the returned `params` round (b = b_c − μᵀW).
        converged: bool scalar, `status == Status.CONVERGED`.
        n_iter: int scalar, outer (Newton or trust-region) iterations taken.
        grad_norm: scalar max|gradient| at `params`, in the variables the fit ran in (below
            float64, with columns of X centred where the fit centres them, see
            docs/solvers.md#precision: the intercept's entries are the same, a centred
            column's is ∂f/∂Wⱼ − μⱼ·∂f/∂b, which equals ∂f/∂Wⱼ where ∂f/∂b = 0).
        status: int scalar, a `Status` code.
        n_hessian_products: int scalar, Hessian-vector products (or explicit Hessians) formed.

    Example:
        >>> import jax
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6)
        >>> bool(result.converged), bool(result.status == xj.Status.CONVERGED)
        (True, True)
        >>> bool(result.grad_norm <= 1e-6), bool(result.n_hessian_products >= result.n_iter)
        (True, True)
        >>> len(jax.tree.leaves(result))  # a pytree: W, b and six scalars
        8
    """

    params: tuple[jax.Array, jax.Array]
    loss: jax.Array
    converged: jax.Array
    n_iter: jax.Array
    grad_norm: jax.Array
    status: jax.Array
    n_hessian_products: jax.Array


class FitError(RuntimeError):
    """Raised by `fit_logistic_regression(..., throw=True)` when the fit did not converge.

    Attributes:
        result: the `FitResult`, so the last iterate is still available.

    Example:
        Classes that a line separates, without a penalty, have no maximum-likelihood estimate:

        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> separable = np.array([0, 0, 1, 2, 2, 1])
        >>> try:
        ...     xj.fit_logistic_regression(X, separable, 3)
        ... except xj.FitError as error:
        ...     print(xj.Status(int(error.result.status)).name)
        DIVERGED
    """

    def __init__(self, result: FitResult):
        self.result = result
        code = Status(int(result.status))
        super().__init__(
            f"{code.name} after {int(result.n_iter)} iterations "
            f"(max|gradient| = {float(result.grad_norm):.3e}). {Status.message(code)}"
        )

    def __reduce__(self):
        # Rebuilt from the result, not from the message (BaseException's default), so that it
        # crosses process boundaries (joblib, multiprocessing) and `copy` keeps it whole.
        return type(self), (self.result,)
