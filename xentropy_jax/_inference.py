"""Statistical inference for an unpenalised multinomial logit fit: `logit_inference`.

Estimates are reported in the reference-class parametrisation of statistics packages
(statsmodels' `MNLogit`, Stata's `mlogit`): class 0 is the base, and the free parameters are

    θₘₗ = W[m, l] − W[m, 0]   (term m = feature 0..d−1, then the intercept; class l = 1..K−1),

an array `params` [d̃, K−1] (d̃ = d + 1 with an intercept). Any unpenalised fit maps to it,
since adding a common vector to every class's coefficients changes no probability; conversely
scikit-learn's centred `coef_` [K, d] is `coef_[k] = θ[:d, k−1] − mean over classes` (θ of
class 0 being zero). `cov_params` [P, P] indexes `params.ravel()` (term-major, P = d̃·(K−1)).

The model-based covariance is the inverse of the Hessian of −ℓ at the maximum-likelihood
estimate, ℓ(θ) = Σᵢ wᵢ log sᵢ,yᵢ (weights are frequency weights; nobs = Σᵢ wᵢ):

    H = Σᵢ wᵢ (x̃ᵢx̃ᵢᵀ) ⊗ (diag sᵢ − sᵢsᵢᵀ)[1:, 1:],   C = H⁻¹,

computed by a Cholesky factorisation of H and triangular solves (`method="dense"`), or, for
many parameters, vᵀH⁻¹v for requested coefficients by preconditioned CG on the matrix-free
product (`method="cg"`). The sandwich (HC0) covariance is H⁻¹(Σᵢ gᵢgᵢᵀ)H⁻¹ with the scores
gᵢ = wᵢ x̃ᵢ ⊗ (sᵢ − yᵢ)[1:]; the cluster-robust one sums the scores within each group first and
multiplies by G/(G−1)·(n−1)/(n−P), as statsmodels' `cov_type="cluster"`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from . import _inference_core as core
from ._buckets import fitted_rows, pad_rows, padded_rows
from ._checks import check_int_range, check_real
from ._rowsums import chunk_rows
from .solvers._result import FitResult, Status

COV_TYPES = ("nonrobust", "HC0", "cluster")

# method="auto" forms the dense Hessian while the number of parameters is at most this: its
# P × P Cholesky (O(P³)) and O(N·P²) assembly stay within seconds up to a few thousand.
DENSE_MAX_PARAMS = 4096


class InferenceError(ValueError):
    """The requested inference is undefined.

    Raised for penalised or non-optimal estimates, separation, a singular Hessian (collinear
    columns), or an option this method cannot provide.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> fit = xj.fit_logistic_regression(X, y, 3, l2=0.1)
        >>> try:
        ...     xj.logit_inference(fit, X, y, l2=0.1)
        ... except xj.InferenceError as error:
        ...     print(str(error)[:30])
        the fit is penalised (l2 = 0.1
    """


class InferenceWarning(UserWarning):
    """The inference was computed but may be unreliable.

    Issued for a non-converged, ill-conditioned or nearly separated fit, or CG short of its
    tolerance.

    Example:
        >>> import warnings
        >>> import xentropy_jax as xj
        >>> issubclass(xj.InferenceWarning, UserWarning)
        True
        >>> warnings.simplefilter("error", xj.InferenceWarning)  # make them fatal
        >>> warnings.resetwarnings()
    """


_erfc = np.vectorize(math.erfc, otypes=[float])


def _solve_triangular(lower: np.ndarray, rhs: np.ndarray, transpose: bool) -> np.ndarray:
    """L⁻¹·rhs (or L⁻ᵀ·rhs) for lower-triangular L: LAPACK's trsm through scipy when present."""
    try:
        from scipy.linalg import solve_triangular
    except ImportError:  # scipy is optional; a general solve gives the same numbers
        return np.linalg.solve(lower.T if transpose else lower, rhs)
    return solve_triangular(lower, rhs, lower=True, trans=1 if transpose else 0)


def _normal_quantile(alpha: float) -> float:
    """Φ⁻¹(1 − alpha/2), as −Φ⁻¹(alpha/2): 1 − alpha/2 rounds to 1 for alpha below 1e-16."""
    return -statistics.NormalDist().inv_cdf(alpha / 2)


def _two_sided_p(z: np.ndarray) -> np.ndarray:
    """2·(1 − Φ(|z|)) = erfc(|z|/√2), accurate in the far tail."""
    return _erfc(np.abs(z) / math.sqrt(2.0))


def _table_frame(columns: dict[str, np.ndarray], index: list[tuple[str, str]]):
    try:
        import pandas as pd
    except ImportError:
        return {
            "class": np.array([i[0] for i in index]),
            "term": np.array([i[1] for i in index]),
            **columns,
        }
    return pd.DataFrame(columns, index=pd.MultiIndex.from_tuples(index, names=["class", "term"]))


def _format_table(
    title_rows, terms, blocks, columns, alpha: float, first_column: str, value: str
) -> str:
    """A statsmodels-style table: the title rows, then one block per (name, column index).

    `columns` holds the value, std err, z, P>|z| and interval arrays [terms, blocks], each
    block one of their columns, each row one of the terms. The first column is 20 characters
    wide, or as wide as the longest term or block heading (names are never cut: two terms
    that share their first 20 characters kept the same label).
    """
    low, high = f"[{alpha / 2:.3f}", f"{1 - alpha / 2:.3f}]"
    headings = [f"{first_column}={name}" for name, _ in blocks]
    names = max([20, *(len(str(label)) + 1 for label in [*terms, *headings])])
    width = names + 64
    lines = ["=" * width]
    for left, right in title_rows:
        lines.append(f"{left:<{width // 2}}{right:>{width - width // 2}}" if right else left)
    for heading, (_, column) in zip(headings, blocks, strict=True):
        lines.append("=" * width)
        lines.append(
            f"{heading:<{names}}{value:>10}{'std err':>11}{'z':>10}{'P>|z|':>9}{low:>12}{high:>12}"
        )
        lines.append("-" * width)
        for row, term in enumerate(terms):
            coef, se, z, p, lo, hi = (array[row, column] for array in columns)
            if np.isnan(se):
                lines.append(f"{term:<{names}}{coef:>10.4f}{'(not computed)':>25}")
            else:
                lines.append(
                    f"{term:<{names}}{coef:>10.4f}{se:>11.4f}{z:>10.3f}{p:>9.3f}{lo:>12.4f}"
                    f"{hi:>12.4f}"
                )
    lines.append("=" * width)
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MarginalEffects:
    """Average marginal effects ∂P(y = k)/∂xⱼ averaged over the rows, with delta-method errors.

    Attributes:
        effects: [d, K] AMEⱼₖ = Σᵢ ŵᵢ sᵢₖ (Bⱼₖ − Σₗ Bⱼₗ sᵢₗ) for every class k (they sum to 0).
        bse: [d, K] standard errors √diag(J C Jᵀ), J = ∂AME/∂θ [d·K, P] in closed form (C the
            covariance of the chosen `cov_type`); with CG, NaN where not requested.
        zvalues, pvalues, conf_int_lower, conf_int_upper: [d, K].
        cov: [d·K, d·K] covariance of `effects.ravel()`, or None with `method="cg"`.
        alpha: level of the intervals.
        term_names, class_names: labels.
        cg_steps, cg_relative_residual: [d, K] per effect, the CG steps and achieved relative
            residual of its solve H·a = J_(j,k)ᵀ (CG only; −1 / NaN where not computed).
    """

    effects: np.ndarray
    bse: np.ndarray
    zvalues: np.ndarray
    pvalues: np.ndarray
    conf_int_lower: np.ndarray
    conf_int_upper: np.ndarray
    cov: np.ndarray | None
    alpha: float
    term_names: tuple[str, ...]
    class_names: tuple[str, ...]
    cg_steps: np.ndarray | None = None
    cg_relative_residual: np.ndarray | None = None

    def to_frame(self):
        """The table as a pandas DataFrame indexed by (class, term), or a dict of arrays."""
        index = [(c, t) for c in self.class_names for t in self.term_names]
        columns = {
            name: getattr(self, name).T.ravel()
            for name in ("effects", "bse", "zvalues", "pvalues", "conf_int_lower", "conf_int_upper")
        }
        return _table_frame(columns, index)

    def summary(self) -> str:
        """Text table of dy/dx per class (effect, std err, z, P>|z|, interval)."""
        title = [("Average marginal effects dP(y=k)/dx (delta-method standard errors)", "")]
        columns = (self.effects, self.bse, self.zvalues, self.pvalues)
        columns += (self.conf_int_lower, self.conf_int_upper)
        blocks = [(name, k) for k, name in enumerate(self.class_names)]
        return _format_table(title, self.term_names, blocks, columns, self.alpha, "P(y)", "dy/dx")


@dataclasses.dataclass(frozen=True)
class LogitInference:
    """Inference for an unpenalised multinomial logit in the reference-class parametrisation.

    Attributes:
        params: [d̃, K−1] θ: rows are the features then the intercept, columns classes 1..K−1,
            each relative to class 0 (see the module docstring for the map to `coef_`).
        bse: [d̃, K−1] standard errors (NaN only where a CG run was not asked for them).
        zvalues: [d̃, K−1] params / bse.
        pvalues: [d̃, K−1] two-sided normal p-values 2·(1 − Φ(|z|)).
        conf_int_lower, conf_int_upper: [d̃, K−1] params ∓ z_{1−α/2}·bse.
        cov_params: [P, P] covariance of `params.ravel()`, or None with `method="cg"`.
        cov_type: "nonrobust", "HC0" or "cluster".
        alpha: level of the intervals.
        llf: maximised log-likelihood ℓ(θ̂).
        llnull: log-likelihood of the intercept-only model, Σᵢ wᵢ log p̂_{yᵢ} with p̂ the
            weighted class frequencies.
        prsquared: McFadden's pseudo-R², 1 − llf/llnull.
        aic: −2·llf + 2·P.   bic: −2·llf + log(nobs)·P.
        nobs: Σᵢ wᵢ (the number of rows without weights).
        num_params: P = d̃·(K−1).
        converged: whether the fit reported convergence.
        method: "dense" or "cg".
        cg_steps, cg_relative_residual: [d̃, K−1] per coefficient (CG only; −1 / NaN where not
            computed).
        margins: `MarginalEffects` when requested, else None.
        term_names: d̃ labels ("x0", …, "intercept" unless given).
        class_names: K labels; class_names[0] is the reference.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> rng = np.random.default_rng(1)
        >>> X = rng.normal(size=(300, 2))
        >>> y = (X[:, 0] + rng.logistic(size=300) > 0).astype(int) + (X[:, 1] > 1)
        >>> fit = xj.fit_logistic_regression(X, y, 3, reference_class=True)
        >>> result = xj.logit_inference(fit, X, y, term_names=["a", "b"])
        >>> result.params.shape, result.cov_params.shape
        ((3, 2), (6, 6))
        >>> bool(np.allclose(result.bse.ravel(), np.sqrt(np.diag(result.cov_params))))
        True
        >>> bool(np.isclose(result.aic, -2 * result.llf + 2 * 6))
        True
    """

    params: np.ndarray
    bse: np.ndarray
    zvalues: np.ndarray
    pvalues: np.ndarray
    conf_int_lower: np.ndarray
    conf_int_upper: np.ndarray
    cov_params: np.ndarray | None
    cov_type: str
    alpha: float
    llf: float
    llnull: float
    prsquared: float
    aic: float
    bic: float
    nobs: float
    num_params: int
    converged: bool
    method: str
    cg_steps: np.ndarray | None
    cg_relative_residual: np.ndarray | None
    margins: MarginalEffects | None
    term_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def conf_int(self, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) [d̃, K−1] normal intervals at level 1 − alpha."""
        _check_alpha(alpha)
        half = _normal_quantile(alpha) * self.bse
        return self.params - half, self.params + half

    def to_frame(self):
        """The coefficient table as a pandas DataFrame, or without pandas a dict of 1-D arrays.

        The frame's index is (class, term); its columns are coef, std_err, z, p_value,
        ci_lower and ci_upper.
        """
        index = [(c, t) for c in self.class_names[1:] for t in self.term_names]
        columns = {
            "coef": self.params.T.ravel(),
            "std_err": self.bse.T.ravel(),
            "z": self.zvalues.T.ravel(),
            "p_value": self.pvalues.T.ravel(),
            "ci_lower": self.conf_int_lower.T.ravel(),
            "ci_upper": self.conf_int_upper.T.ravel(),
        }
        return _table_frame(columns, index)

    def summary(self) -> str:
        """A statsmodels-style text table: fit statistics, then one block per class 1..K−1."""
        title = [
            (f"Multinomial logit, reference class: {self.class_names[0]}", ""),
            (f"Observations: {_count(self.nobs)}", f"Log-likelihood: {self.llf:.6g}"),
            (f"Parameters: {self.num_params}", f"Null log-likelihood: {self.llnull:.6g}"),
            (f"Converged: {self.converged}", f"Pseudo R-squ. (McFadden): {self.prsquared:.4f}"),
            (
                f"Covariance: {self.cov_type} ({self.method})",
                f"AIC: {self.aic:.6g}   BIC: {self.bic:.6g}",
            ),
        ]
        columns = (self.params, self.bse, self.zvalues, self.pvalues)
        columns += (self.conf_int_lower, self.conf_int_upper)
        blocks = [(str(name), col) for col, name in enumerate(self.class_names[1:])]
        return _format_table(title, self.term_names, blocks, columns, self.alpha, "y", "coef")


def _count(value: float) -> str:
    """A whole number of observations in full (1234567), any other to 6 significant digits.

    Whole to rounding: a sum of weights such as 1234566.9999999995 prints as 1234567.
    """
    whole = round(value)
    return str(whole) if abs(value - whole) <= 1e-9 * max(abs(value), 1.0) else f"{value:.6g}"


def _check_alpha(alpha) -> None:
    if not (isinstance(alpha, numbers.Real) and 0 < alpha < 1):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def separated_error() -> InferenceError:
    """The error of inference from a fit that stopped on separable data (`Status.DIVERGED`)."""
    return InferenceError(
        "the fit stopped because the data are separable: the maximum-likelihood estimates "
        "are infinite and have no standard errors. " + Status.message(Status.DIVERGED)
    )


def not_converged_warning(status: int) -> None:
    """The `InferenceWarning` for estimates from a fit that stopped short of convergence."""
    warnings.warn(
        "the fit did not converge (" + Status.message(status) + "); the standard errors "
        "are those of the last iterate",
        InferenceWarning,
        stacklevel=3,
    )


def _params_from(fit, fit_intercept: bool) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """(W [d, K], b [K], converged, status) from a FitResult or a (W, b) pair."""
    if isinstance(fit, FitResult):
        weights, intercept = fit.params
        if np.ndim(weights) != 2:
            raise ValueError(
                "inference needs one fit, not a batch of fits: index one out of the batch "
                "(jax.tree.map(lambda a: a[i], fit)) and call it once per fit"
            )
        return np.asarray(weights), np.asarray(intercept), bool(fit.converged), int(fit.status)
    try:
        weights, intercept = fit
    except (TypeError, ValueError) as error:
        raise TypeError("fit must be a FitResult or a pair (W [d, K], b [K])") from error
    return np.asarray(weights), np.asarray(intercept), True, None


def _validate(weights, intercept, X, labels, sample_weight):
    if weights.ndim != 2 or weights.shape[1] < 2:
        raise ValueError(f"W must be [d, K] with K >= 2, got shape {weights.shape}")
    d, k = weights.shape
    if intercept.shape != (k,):
        raise ValueError(f"b must have shape ({k},), got {intercept.shape}")
    if d == 0:
        raise ValueError("X has no feature columns (an intercept-only model is not supported)")
    if not (np.all(np.isfinite(weights)) and np.all(np.isfinite(intercept))):
        raise InferenceError("the estimates are not finite: there is nothing to infer from")
    if hasattr(X, "tocsr") or (hasattr(X, "todense") and hasattr(X, "indices")):
        raise TypeError(
            f"logit_inference needs dense X, got {type(X).__name__}: pass X.toarray() (SciPy "
            "sparse) or X.todense() (BCOO). The fit accepts sparse X; the inference does not."
        )
    for name, value in (("params", weights), ("params", intercept), ("X", X)):
        check_real(name, value)
    check_real("sample_weight", sample_weight)
    if np.ndim(X) != 2 or np.shape(X)[1] != d:
        raise ValueError(f"X must be [n_samples, {d}] to match W, got shape {np.shape(X)}")
    n = np.shape(X)[0]
    if n == 0:
        raise ValueError("X has no rows: there is nothing to infer from")
    if not np.all(np.isfinite(np.asarray(X))):
        raise ValueError("X contains NaN or infinity")
    label_values = np.asarray(labels)
    if label_values.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {label_values.shape}")
    if not np.issubdtype(label_values.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {label_values.dtype}")
    if label_values.min() < 0 or label_values.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=float)
        if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"sample_weight must be [{n}] finite, >= 0, not all zero")


def _group_codes(groups, n: int) -> np.ndarray:
    """[n] int codes 0..G−1 of cluster labels: any hashable values, None and tuples included.

    Raises:
        ValueError: ``groups`` that are not n labels.
    """
    try:
        values = np.asarray(groups)
    except ValueError:  # ragged labels, such as tuples of different lengths
        values = None
    if values is not None and values.dtype.kind in "US" and not isinstance(groups, np.ndarray):
        # np.asarray writes [1, "1"] as ["1", "1"]: labels of other types than str stay apart.
        kind = str if values.dtype.kind == "U" else bytes
        if not all(isinstance(item, kind) for item in groups):
            values = None
    if values is not None and values.ndim == 1 and values.dtype != object:
        if values.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {values.shape}")
        return np.unique(values, return_inverse=True)[1].reshape(-1)
    try:
        items = list(groups)
    except TypeError as error:
        raise ValueError(f"groups must be {n} cluster labels, got {groups!r}") from error
    if len(items) != n:
        raise ValueError(f"groups must have {n} labels, got {len(items)}")
    codes: dict = {}
    try:
        return np.asarray([codes.setdefault(item, len(codes)) for item in items], np.int64)
    except TypeError as error:  # an unhashable label (a list, an array)
        raise ValueError(f"groups must be hashable cluster labels: {error}") from error


def _subset_mask(subset, shape, name="subset", of="params", dims="[d̃, K−1]") -> np.ndarray:
    """Boolean mask of `shape` from "all", a boolean mask of that shape or flat indices."""
    if isinstance(subset, str):
        if subset != "all":
            raise ValueError(
                f"{name} must be 'all', a boolean mask or flat indices, got {subset!r}"
            )
        return np.ones(shape, bool)
    values = np.asarray(subset)
    if values.size == 0 and values.ndim == 1:  # [] is float to NumPy: no index at all
        values = values.astype(np.intp)
    if values.dtype == bool:
        if values.shape != shape:
            raise ValueError(f"a boolean {name} must have the shape of {of} {shape}")
        return values
    if not np.issubdtype(values.dtype, np.integer) or values.ndim != 1:
        raise ValueError(
            f"{name} must be 'all', a boolean mask {dims} or flat indices into {of}.ravel()"
        )
    size = int(np.prod(shape))
    if values.size and (values.min() < -size or values.max() >= size):
        raise ValueError(f"{name} indices must lie in [-{size}, {size})")
    mask = np.zeros(size, bool)
    mask[values] = True
    return mask.reshape(shape)


def _singular_line(eps: float, size: int) -> float:
    """The pivot² (eigenvalue) of a correlation-form matrix [size, size] that is 0 to rounding.

    10·eps·√size: its entries carry rounding of a few eps, whose spectral norm grows as
    √size. Above it the inverse has digits; near it few (1.6% off in float32 at 62·eps, a
    correlation of 1 − 4e-6). It was 10·eps·size, which in float32 refused offset columns of
    singular-value ratio 2.7e-3 at P = 279 (pivot² 1.8e-4 below 3.3e-4) whose standard errors
    came out 1e-3 from float64's.
    """
    return 10 * eps * math.sqrt(size)


def _ill_conditioned_line(eps: float, size: int) -> float:
    """The pivot² below which the dense path warns: 1000·eps·√size (100 × `_singular_line`).

    The standard errors' rounding is at most about eps·√size / pivot² of themselves (float32:
    6e-5 where that is 1e-4, 1.6e-2 where it is 3.7e-2, 1e-3 where it is 1.1e-2), so below
    the line they may be off by 1e-3 or more. It was 1e4·eps·size, which every float32
    correlation matrix of P ≥ 840 parameters falls below (its pivots² are at most 1):
    independent standard-normal columns at P = 287 and 909 were warned with standard errors
    within 6e-6 of float64's.
    """
    return 1000 * eps * math.sqrt(size)


def _null_eigenvalues(values: np.ndarray, eps: float) -> np.ndarray:
    """Which eigenvalues of a Jacobi-scaled (unit-diagonal) Gram matrix are zero to rounding."""
    if values.size == 0:
        return np.zeros(0, bool)
    return values < 100 * eps * len(values) * max(values.max(), 1.0)


# Quasi-separation (a class never seen where some column is non-zero, say) leaves the estimates
# finite but drifting with the fit's tolerance: −ℓ keeps falling, ever more slowly, along a
# direction where the curvature that gives the standard errors is only small. The check moves
# each suspect coefficient both ways along its profile direction H⁻¹eⱼ/√(H⁻¹)ⱼⱼ (the other
# coefficients at their most likely values), by _FLAT_STEP model standard errors t or less, so
# that no logit moves by more than _FLAT_LOGITS (far along a direction only near the drift's,
# any finite fit rises steeply), and flags it where −ℓ rises by less than _FLAT_FRACTION of the
# quadratic model's t²/2 on either side. Suspects: the _FLAT_CANDIDATES coefficients with the
# largest standard error per unit of their column's RMS, if above _FLAT_SPREAD (a fit with
# thousands of rows has none). On 155 `make_classification` fits (25 to 2,000 rows, K = 2 to
# 10), the 133 whose estimates stay put as tol tightens rose by at least 0.47 of t²/2; the 22
# whose estimates drift rose by less than 0.007 (float64 and float32).
_FLAT_STEP = 4.0
_FLAT_FRACTION = 1 / 8
_FLAT_CANDIDATES = 16
_FLAT_LOGITS = 30.0
_FLAT_SPREAD = 1.0


def _flat_coefficients(solve, model_variances, column_rms, column_max, loss_changes):
    """[(j, rise, expected)]: coefficients along whose profile −ℓ rises by under 1/8 of expected."""
    num_params = len(model_variances)
    kf = num_params // len(column_rms)
    spread = np.sqrt(model_variances) * np.repeat(column_rms, kf)
    suspects = np.argsort(-spread, kind="stable")[:_FLAT_CANDIDATES]
    suspects = suspects[spread[suspects] > _FLAT_SPREAD]
    if not suspects.size:
        return []
    profiles = solve(np.eye(num_params)[:, suspects]).T / np.sqrt(model_variances[suspects, None])
    # A bound on how far one unit of each profile moves any row's logits (the reference class's
    # stays 0, so a difference of two logits moves at most twice as far).
    reach = 2 * np.abs(profiles.reshape(len(suspects), -1, kf)).max(axis=2) @ column_max
    steps = np.minimum(_FLAT_STEP, _FLAT_LOGITS / np.maximum(reach, np.finfo(float).tiny))
    # Zero moves up to _FLAT_CANDIDATES: one compiled program whatever the number of suspects.
    moves = np.zeros((_FLAT_CANDIDATES, num_params))
    moves[: len(suspects)] = steps[:, None] * profiles
    rises = np.asarray(loss_changes(np.concatenate([moves, -moves])), dtype=float)
    rises = rises.reshape(2, -1).min(axis=0)[: len(suspects)]
    expected = steps**2 / 2
    return [
        (int(j), float(r), float(e))
        for j, r, e in zip(suspects, rises, expected, strict=True)
        if r < _FLAT_FRACTION * e
    ]


def _finite(values) -> bool:
    return all(np.all(np.isfinite(value)) for value in values)


def _check_finite_sums(sums, dtype, *, meat=None) -> None:
    """Raise InferenceError where the sums the standard errors need overflowed the data's dtype.

    The parameters and data are finite (validated), so a non-finite sum is an overflow: the
    frequency weights are too large for the dtype (the fit divides them by their largest, the
    sums cannot: nobs and the standard errors depend on their scale). ``meat``: the dense
    sandwich's sum of squared scores, which overflows first; the CG path never forms it.
    """
    meat_only = meat is not None and _finite(sums) and not _finite([meat])
    if _finite(sums) and not meat_only:
        return
    remedies = [
        "divide sample_weight by a constant c (nobs then falls by c, nonrobust and HC0 "
        "standard errors grow by √c, cluster-robust ones do not change)"
    ]
    if np.dtype(dtype) != np.float64:
        remedies.insert(0, "use float64 data (jax_enable_x64)")
    if meat_only:
        remedies.insert(0, "use method='cg', which does not form the sum of squared scores")
    raise InferenceError(
        f"the weighted sums of the log-likelihood overflow {np.dtype(dtype).name}: "
        f"sample_weight is too large for them: {'; or '.join(remedies)}"
    )


def _warn_infinite_likelihood(llf: float, mass, dtype) -> None:
    """The log-likelihood's sum may overflow where the curvature's still fit: say so, go on."""
    if _finite([llf, mass]):
        return
    warnings.warn(
        f"the weighted log-likelihood overflows {np.dtype(dtype).name} (sample_weight too "
        "large for it): llf, llnull and the statistics built on them (pseudo R², AIC, BIC) "
        "are not finite; the estimates and standard errors are unaffected",
        InferenceWarning,
        stacklevel=3,
    )


_SINGULAR = (
    "the Hessian of the log-likelihood is singular, so the estimates have no standard errors: "
)
_SEPARABLE = (
    "the Hessian is singular although the columns are not collinear: the data are "
    "(quasi-)separable, some estimates are infinite (the likelihood keeps increasing as they "
    "grow); drop the separating columns, merge classes, or use a penalised fit (which has no "
    "classical standard errors)"
)


def _diagnose_singular(features, weights, fit_intercept, term_names, eps) -> str:
    """Name collinear columns when the weighted Gram is singular; otherwise blame separation."""
    return _collinear_columns(features, weights, fit_intercept, term_names, eps) or _SEPARABLE


def _collinear_columns(features, weights, fit_intercept, term_names, eps) -> str | None:
    """The columns that make the weighted Gram of [X, 1] singular, said in words; else None."""
    # In float64 whatever the data's dtype, so that columns collinear only to the rounding of
    # float32 data (which computes the Hessian) are told from exactly collinear ones.
    extended = np.asarray(features, dtype=float)
    if fit_intercept:
        extended = np.concatenate([extended, np.ones_like(extended[:, :1])], axis=1)
    gram = extended.T @ (weights[:, None] * extended)
    scale = 1 / np.sqrt(np.maximum(np.diag(gram), np.finfo(float).tiny))
    values, vectors = np.linalg.eigh(gram * scale[:, None] * scale[None, :])
    null = _null_eigenvalues(values, eps)
    if null.any():

        def involved(null):
            return np.flatnonzero(np.abs(vectors[:, null]).max(axis=1) > 1e-3)

        def rank(null):
            return f"rank {int((~null).sum())} < {len(values)}"

        names = [term_names[i] for i in involved(null)]
        exact = _null_eigenvalues(values, np.finfo(float).eps)
        if eps > np.finfo(float).eps and null.sum() > exact.sum():
            if not exact.any():
                return (
                    f"the columns {names} are collinear to float32 precision (the weighted "
                    f"design matrix has {rank(null)} at float32 rounding, full rank in "
                    "float64): fit and infer on float64 data (jax_enable_x64), or drop or "
                    "combine them"
                )
            exact_names = [term_names[i] for i in involved(exact)]
            others = [name for name in names if name not in exact_names] or names
            return (
                f"the columns {exact_names} are collinear (the weighted design matrix has "
                f"{rank(exact)}), and {others} collinear to float32 precision ({rank(null)} at "
                "float32 rounding): drop or combine the former, and fit and infer on float64 "
                "data (jax_enable_x64)"
            )
        return (
            f"the columns {names} are collinear (the weighted design matrix has {rank(null)}): "
            "drop or combine them"
        )
    return None


def logit_inference(
    fit: FitResult | tuple[ArrayLike, ArrayLike],
    X: ArrayLike,
    labels: ArrayLike,
    *,
    sample_weight: ArrayLike | None = None,
    fit_intercept: bool = True,
    l2: float = 0.0,
    cov_type: str = "nonrobust",
    groups: ArrayLike | None = None,
    alpha: float = 0.05,
    marginal_effects: bool = False,
    method: str = "auto",
    subset: str | ArrayLike | None = None,
    margins_subset: str | ArrayLike | None = None,
    cg_rtol: float | None = None,
    cg_max_steps: int | None = None,
    term_names: Sequence[str] | None = None,
    class_names: Sequence | None = None,
    check_optimum: bool = True,
) -> LogitInference:
    """Standard errors, tests, intervals and fit statistics of an unpenalised multinomial logit.

    Args:
        fit: a `FitResult` of `fit_logistic_regression` with `l2=0` (any `reference_class`),
            or its parameters (W [d, K], b [K]).
        X: [N, d] dense features the model was fitted on (float64 with x64 enabled computes
            in float64, anything else in float32). Sparse X raises a `TypeError`.
        labels: [N] integer labels in [0, K).
        sample_weight: [N] frequency weights (nobs = Σw; a row of weight w counts as w rows
            for every `cov_type`) or None.
        fit_intercept: whether the fit had an intercept (b is then a free parameter).
        l2: the fit's L2 strength. Anything but 0 raises: the inverse of a penalised Hessian is
            not the sampling covariance of the estimates (they are biased towards 0), and this
            function does not print numbers that look like standard errors when they are not.
        cov_type: "nonrobust" (H⁻¹), "HC0" (sandwich H⁻¹MH⁻¹) or "cluster" (needs `groups`).
        groups: [N] cluster labels (any hashable values) for `cov_type="cluster"`; groups
            whose rows all have weight 0 do not count.
        alpha: the intervals have level 1 − alpha.
        marginal_effects: also compute average marginal effects with delta-method errors.
            The effects themselves cost one O(N·d·K) pass; their errors need the Jacobian
            J = ∂AME/∂θ (O(N·r·d̃·K²/2) flops for r features) and, with CG, one solve
            H·a = J_(j,k)ᵀ per requested effect (see `margins_subset`).
        method: "dense" (Hessian [P, P] in row chunks, Cholesky; O(N·P² + P³) time,
            O(P² + chunk·P) memory), "cg" (preconditioned CG per requested coefficient, about
            (CG steps + 1)·2 GEMMs over X each, no P × P matrix) or "auto" (dense while
            P <= DENSE_MAX_PARAMS = 4096).
        subset: with CG, which coefficients get standard errors: "all", a boolean mask
            [d̃, K−1] or flat indices into `params.ravel()`; required with CG (the cost is
            per coefficient). With "dense", every coefficient is computed anyway.
        margins_subset: with CG and `marginal_effects`, which effects get standard errors:
            "all", a boolean mask [d, K] or flat indices into `margins.effects.ravel()`
            (feature-major). Default: every class of each feature that has a coefficient in
            `subset` (so `subset="all"` gives d·K solves, about as many as the P coefficients).
            The Jacobian is formed only for the features involved. With "dense", every effect
            is computed anyway.
        cg_rtol: relative residual of each CG solve (default 1e-10 in float64, 1e-5 in
            float32). The variance vᵀH⁻¹v is then exact to about rtol·κ(M⁻¹H) relative.
        cg_max_steps: most CG iterations per coefficient (default max(P, 100)).
        term_names: d names of the features (an "intercept" row is appended).
        class_names: K names of the classes (default 0..K−1).
        check_optimum: raise when θ is farther than 0.1 standard error from the maximum of
            the likelihood (the Newton decrement gᵀH⁻¹g > 0.01): the covariance would describe
            another point.

    Returns:
        A `LogitInference` (with `.summary()` and `.to_frame()`).

    Raises:
        InferenceError: a penalised fit (`l2 > 0`), a fit stopped by separation (status
            DIVERGED), estimates not at the maximum (`check_optimum`), a singular Hessian
            (collinear columns or separation; the message says which), a cluster covariance
            with nobs <= P.
        ValueError, TypeError: bad shapes, values or options, no rows, fewer than 2 groups
            with positive weight.

    Warns:
        InferenceWarning: the fit did not converge, the Hessian is ill-conditioned, or the
            data are (quasi-)separated: the likelihood is flat along some coefficient's profile
            (it falls by less than 1/8 of what the standard errors predict up to 4 of them
            away; dense path, see docs/inference.md), or rows are fitted with probability
            above 1 − 1e-8 for their label.

    Example:
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(200, 2))
        >>> y = (X @ np.array([1.0, -1.0]) + rng.logistic(size=200) > 0).astype(int)
        >>> fit = xj.fit_logistic_regression(X, y, 2, reference_class=True, solver="newton")
        >>> inference = xj.logit_inference(fit, X, y)
        >>> inference.params.shape, inference.bse.shape  # [d + 1, K - 1]
        ((3, 1), (3, 1))
        >>> bool(np.all(inference.bse > 0)) and bool(inference.pvalues[0, 0] < 1e-3)
        True
        >>> print(inference.summary().splitlines()[1])
        Multinomial logit, reference class: 0
    """
    if not (isinstance(cov_type, str) and cov_type in COV_TYPES):
        raise ValueError(f"cov_type must be one of {COV_TYPES}, got {cov_type!r}")
    if method not in ("auto", "dense", "cg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'cg', got {method!r}")
    _check_alpha(alpha)
    if not (np.ndim(l2) == 0 and float(l2) == 0.0):
        raise InferenceError(
            f"the fit is penalised (l2 = {l2!r}): the penalised Hessian's inverse is not the "
            "covariance of the estimates (they are shrunk towards zero, and the usual tests "
            "and intervals do not hold). Refit with l2=0 (penalty=None) for standard errors"
        )
    if cov_type == "cluster" and groups is None:
        raise ValueError("cov_type='cluster' needs groups")
    weights, intercept, converged, status = _params_from(fit, fit_intercept)
    _validate(weights, intercept, X, labels, sample_weight)
    if status == Status.DIVERGED:
        raise separated_error()
    if not converged:
        not_converged_warning(status)
    d, num_classes = weights.shape
    kf = num_classes - 1
    num_terms = d + int(fit_intercept)
    num_params = num_terms * kf
    if method == "auto":
        method = "dense" if num_params <= DENSE_MAX_PARAMS else "cg"
    if cg_rtol is not None:
        check_real("cg_rtol", cg_rtol)
        if not (np.ndim(cg_rtol) == 0 and 0 < float(cg_rtol) < 1):
            raise ValueError(f"cg_rtol must be a number in (0, 1), got {cg_rtol!r}")
    if cg_max_steps is not None:
        check_int_range("cg_max_steps", cg_max_steps, 1)
    if method == "cg" and subset is None:
        raise InferenceError(
            f"with {num_params} parameters the standard errors come from one CG solve per "
            "coefficient: pass subset= (a mask or indices of params.ravel()), or subset='all'"
        )
    term_names = tuple(f"x{j}" for j in range(d)) if term_names is None else tuple(term_names)
    if len(term_names) != d:
        raise ValueError(f"term_names must have {d} entries, got {len(term_names)}")
    term_names = term_names + (("intercept",) if fit_intercept else ())
    class_names = tuple(
        str(c) for c in (range(num_classes) if class_names is None else class_names)
    )
    if len(class_names) != num_classes:
        raise ValueError(f"class_names must have {num_classes} entries")
    effect_mask = None
    if margins_subset is not None:
        if not marginal_effects:
            raise ValueError("margins_subset is given but marginal_effects is False")
        effect_mask = _subset_mask(
            margins_subset, (d, num_classes), "margins_subset", "the marginal effects", "[d, K]"
        )

    unpadded = np.asarray(X)
    wide = jax.config.jax_enable_x64 and unpadded.dtype == np.float64
    dtype = np.dtype(np.float64 if wide else np.float32)
    unpadded = unpadded.astype(dtype, copy=False)
    eps = float(np.finfo(dtype).eps)
    n = unpadded.shape[0]
    row_weights = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    if groups is not None:
        group_index = _group_codes(groups, n)
        num_groups = int(group_index.max()) + 1
    else:
        num_groups, group_index = 1, np.zeros(n, np.int32)
    # Zero-weight rows up to a bucket, and empty clusters up to one (`_buckets`): every sum
    # is weighted, so nearby row and cluster counts share the compiled sums and change nothing.
    num_groups = padded_rows(num_groups) if cov_type == "cluster" else 1
    configuration = ("inference", d, dtype.str, num_classes, bool(fit_intercept), method)
    configuration += (cov_type, num_groups, marginal_effects)
    features, labels_j, weights_j, groups_j = (
        jnp.asarray(a)
        for a in pad_rows(
            fitted_rows(n, configuration),
            unpadded,
            np.asarray(labels).astype(np.int32),
            row_weights.astype(dtype),
            group_index.astype(np.int32),
        )
    )
    # The reference-class θ: every unpenalised fit maps to it without changing a probability.
    free_weights = (weights - weights[:, :1])[:, 1:]
    free_intercept = (intercept - intercept[:1])[1:]
    parts = [free_weights.reshape(-1)] + ([free_intercept] if fit_intercept else [])
    theta = jnp.asarray(np.concatenate(parts), dtype)
    nobs = float(row_weights.sum())
    if cov_type == "cluster":
        # Groups whose rows all have weight 0 are no clusters (as if those rows were dropped).
        group_mass = np.bincount(group_index, weights=row_weights, minlength=num_groups)
        clusters = int(np.count_nonzero(group_mass > 0))
        if clusters < 2:
            raise ValueError("cov_type='cluster' needs at least 2 groups with positive weight")
        if not nobs > num_params:
            raise InferenceError(
                f"the cluster correction G/(G−1)·(nobs−1)/(nobs−P) needs nobs = Σw = {nobs:g} "
                f"> P = {num_params} parameters. sample_weight are frequency weights (a row of "
                "weight w counts as w observations): weights normalised to sum to 1 understate "
                "nobs"
            )
        correction = clusters / (clusters - 1) * (nobs - 1) / (nobs - num_params)

    static = dict(num_classes=num_classes, fit_intercept=bool(fit_intercept))
    width = max(num_params, core.pair_width(d, num_classes, bool(fit_intercept)))
    itemsize = jnp.dtype(dtype).itemsize
    margin_args = (features, labels_j, weights_j, theta)
    margin_parts = None
    flat = []
    if method == "dense":
        sums = core.dense_sums(
            features,
            labels_j,
            weights_j,
            groups_j,
            theta,
            cov_type=cov_type,
            num_groups=num_groups,
            chunk=chunk_rows(width, itemsize=itemsize),
            **static,
        )
        sums = jax.tree.map(lambda a: np.asarray(a, dtype=float), sums)
        _check_finite_sums([sums["grad"], sums["hessian"]], dtype, meat=sums.get("meat"))
        llf = -float(sums["loss"])
        mass, saturated = sums["mass"], sums["saturated"]
        _warn_infinite_likelihood(llf, mass, dtype)
        hessian = sums["hessian"]
        scale = 1 / np.sqrt(np.maximum(np.diag(hessian), np.finfo(float).tiny))
        scaled = hessian * scale[:, None] * scale[None, :]
        try:
            factor = np.linalg.cholesky(scaled)
            pivot = float(np.min(np.diag(factor)) ** 2)
        except np.linalg.LinAlgError:
            pivot = 0.0
        if not pivot > _singular_line(eps, num_params):
            raise InferenceError(
                _SINGULAR
                + _diagnose_singular(unpadded, row_weights, fit_intercept, term_names, eps)
            )
        # Rounding can lift the pivot of an exactly singular Hessian above `_singular_line` (columns
        # with offsets and different scales): a small one is checked for columns that float64
        # finds collinear in the Gram of [X, 1], and refused for them only; a float32 design of
        # full rank (a year-like column beside the intercept) keeps its standard errors, with a
        # warning where their rounding may reach 1e-3 (`_ill_conditioned_line`).
        if pivot < 1e4 * eps * num_params:
            exact = np.finfo(np.float64).eps
            collinear = _collinear_columns(unpadded, row_weights, fit_intercept, term_names, exact)
            if collinear is not None:
                raise InferenceError(_SINGULAR + collinear)
        if pivot < _ill_conditioned_line(eps, num_params):
            warnings.warn(
                f"the Hessian is ill-conditioned (smallest Cholesky pivot² {pivot:.2e} of its "
                "correlation form): nearly collinear columns or near-separation; the standard "
                f"errors may be off by up to about {eps * math.sqrt(num_params) / pivot:.0e} "
                "of themselves from rounding",
                InferenceWarning,
                stacklevel=2,
            )

        def solve(rhs):  # H⁻¹·rhs = D·L⁻ᵀ·L⁻¹·D·rhs with D·H·D = L·Lᵀ: two triangular solves
            inner = _solve_triangular(factor, scale[:, None] * rhs, transpose=False)
            return scale[:, None] * _solve_triangular(factor, inner, transpose=True)

        grad = sums["grad"]
        decrement = float(grad @ solve(grad[:, None])[:, 0])
        if cov_type == "nonrobust":
            cov = solve(np.eye(num_params))
        else:
            cov = solve(solve(sums["meat"]).T)
        cov = 0.5 * (cov + cov.T)
        if cov_type == "cluster":
            cov *= correction
        variances = np.diag(cov)
        cov_params, steps, relative = cov, None, None
        if decrement <= 0.01:  # (otherwise the estimates are refused below)
            model_variances = variances
            if cov_type != "nonrobust":
                model_variances = np.diag(solve(np.eye(num_params)))
            rms, reach = (np.asarray(a, float) for a in core.column_scales(features, weights_j))
            flat = _flat_coefficients(
                solve,
                model_variances,
                np.concatenate([rms, [1.0]]) if fit_intercept else rms,
                np.concatenate([reach, [1.0]]) if fit_intercept else reach,
                lambda moves: core.loss_changes(
                    features,
                    labels_j,
                    weights_j,
                    theta,
                    jnp.asarray(moves, dtype),
                    chunk=chunk_rows(
                        max(d + 1, 2 * _FLAT_CANDIDATES * num_classes), itemsize=itemsize
                    ),
                    **static,
                ),
            )
    else:
        mask = _subset_mask(subset, (num_terms, kf))
        wanted = np.flatnonzero(mask.reshape(-1))
        margin_rows = np.zeros((0, num_params))
        if marginal_effects:
            if effect_mask is None:  # every class of the features with a coefficient asked for
                effect_mask = np.zeros((d, num_classes), bool)
                effect_mask[mask[:d].any(axis=1)] = True
            effects_wanted = np.flatnonzero(effect_mask.reshape(-1))
            selected = np.unique(effects_wanted // num_classes)
            # The Jacobian rows of the requested effects only (a placeholder feature when none).
            chosen = selected if selected.size else np.zeros(1, int)
            effects, jac = core.margin_sums(
                *margin_args,
                jnp.asarray(chosen, jnp.int32),
                chunk=chunk_rows(
                    core.margin_width(d, num_classes, bool(fit_intercept), chosen.size),
                    itemsize=itemsize,
                ),
                **static,
            )
            place = np.searchsorted(selected, effects_wanted // num_classes)
            margin_rows = np.asarray(jac, float)[place * num_classes + effects_wanted % num_classes]
            effects = np.asarray(effects, float)
        directions = np.zeros((len(margin_rows) + 1, num_params))
        directions[:-1] = margin_rows
        llf, grad, mass, saturated = core.value_grad_mass(
            features,
            labels_j,
            weights_j,
            theta,
            chunk=chunk_rows(num_params, itemsize=itemsize),
            **static,
        )
        llf, mass, grad = -float(llf), np.asarray(mass, float), np.asarray(grad, float)
        _check_finite_sums([grad], dtype)
        _warn_infinite_likelihood(llf, mass, dtype)
        directions[-1] = grad
        rtol = (1e-10 if dtype == jnp.float64 else 1e-5) if cg_rtol is None else float(cg_rtol)
        max_steps = max(num_params, 100) if cg_max_steps is None else int(cg_max_steps)
        results = core.cg_variances(
            features,
            labels_j,
            weights_j,
            groups_j,
            theta,
            jnp.asarray(wanted, jnp.int32),
            jnp.asarray(directions, dtype),
            jnp.asarray(rtol, dtype),
            cov_type=cov_type,
            num_groups=num_groups,
            max_steps=max_steps,
            preconditioner="kronecker" if d <= 4000 else "diagonal",
            batch=8,
            **static,
        )
        *results, gram_eigenvalues = results
        model, values, n_steps, achieved = (np.array(a, dtype=float) for a in results)
        _check_finite_sums([model, values], dtype)
        gram_eigenvalues = np.asarray(gram_eigenvalues, float)
        if _null_eigenvalues(gram_eigenvalues, eps).any():
            # Columns that float64 finds collinear are refused; below float64, so is a Gram
            # that the data's precision does not resolve (the dense path's pivot line), and
            # anything else is only ill-conditioned: offset columns of singular-value ratio
            # 2.7e-3 had been refused in float32 where the dense path's errors were 1e-3 off.
            exact = np.finfo(np.float64).eps
            diagnosis_args = (unpadded, row_weights, fit_intercept, term_names)
            collinear = _collinear_columns(*diagnosis_args, exact)
            smallest = float(np.min(gram_eigenvalues))
            unresolved = eps <= exact or smallest <= _singular_line(eps, num_terms)
            if collinear is None and unresolved:
                collinear = _diagnose_singular(*diagnosis_args, eps)
            if collinear is not None:
                raise InferenceError(_SINGULAR + collinear)
            warnings.warn(
                f"the Gram matrix of the columns is ill-conditioned (smallest eigenvalue "
                f"{smallest:.2e} of its correlation form): nearly collinear "
                "columns; the standard errors carry few correct digits",
                InferenceWarning,
                stacklevel=2,
            )
        if cov_type == "cluster":
            values *= correction
        # The distance to the optimum is the model-based quadratic form gᵀH⁻¹g.
        decrement = float(model[-1])
        if np.any(achieved[:-1] > max(rtol, 1e3 * eps)):
            warnings.warn(
                f"CG reached a relative residual of only {achieved[:-1].max():.2e} for some "
                f"coefficients or marginal effects within {max_steps} steps (asked "
                f"{rtol:.0e}); raise cg_max_steps, unless columns are collinear (beyond 4000 "
                "features this path does not check; method='dense' does)",
                InferenceWarning,
                stacklevel=2,
            )
        split = wanted.size
        variances, steps, relative = _scatter(
            wanted, num_params, values[:split], n_steps[:split], achieved[:split]
        )
        cov_params = None
        steps, relative = steps.reshape(num_terms, kf), relative.reshape(num_terms, kf)
        if not np.all(np.isfinite(values[:-1])) or np.any(variances[wanted] <= 0):
            raise InferenceError(
                "CG gave non-positive or non-finite variances: the Hessian is (nearly) singular "
                "(collinear columns or separable data)"
            )
        if marginal_effects:
            margin_parts = (effects,) + tuple(
                part.reshape(d, num_classes)
                for part in _scatter(
                    effects_wanted,
                    d * num_classes,
                    np.maximum(values[split:-1], 0),
                    n_steps[split:-1],
                    achieved[split:-1],
                )
            )

    if flat:
        names = ", ".join(
            f"{class_names[1 + j % kf]}:{term_names[j // kf]} ({rise:.2g}, {expected:.2g})"
            for j, rise, expected in flat
        )
        warnings.warn(
            f"the log-likelihood is flat away from the estimates of {names}: moved along each "
            f"one's profile (the others at their most likely values) by up to {_FLAT_STEP:g} "
            f"standard errors or a logit change of {_FLAT_LOGITS:g}, it falls by less than "
            f"{_FLAT_FRACTION:.3g} of what its standard error says (fall, expected). This is "
            "(quasi-)separation: the maximum-likelihood estimates are infinite (the fit stops "
            "where its tolerance says) and these standard errors are meaningless; drop "
            "the separating columns, merge classes, or use a penalised fit",
            InferenceWarning,
            stacklevel=2,
        )
    elif int(saturated) > 0:
        warnings.warn(
            f"{int(saturated)} rows are fitted with probability above 1 - 1e-8 for their "
            "label: if the estimates are large this is (quasi-)separation, where the true "
            "maximum-likelihood estimates are infinite and these standard errors are "
            "meaningless; check the largest coefficients",
            InferenceWarning,
            stacklevel=2,
        )
    if check_optimum and not decrement <= 0.01:
        raise InferenceError(
            f"the estimates are not at the maximum of the likelihood (Newton decrement "
            f"gᵀH⁻¹g = {decrement:.3g}, i.e. about {math.sqrt(max(decrement, 0)):.3g} standard "
            "errors away): a penalised or unfinished fit, or X, labels or weights differ from "
            "those of the fit. Refit with l2=0 to convergence"
        )

    params = np.asarray(theta, dtype=float).reshape(num_terms, kf)
    bse = np.sqrt(variances).reshape(num_terms, kf)
    zvalues = params / bse
    pvalues = _two_sided_p(zvalues)
    half = _normal_quantile(alpha) * bse
    freq = mass / mass.sum()
    llnull = float(np.sum(mass[mass > 0] * np.log(freq[mass > 0])))
    margins = None
    if marginal_effects and margin_parts is None:
        margins = _dense_margins(
            margin_args, static, cov_params, alpha, term_names[:d], class_names
        )
    elif marginal_effects:
        effects, margin_variances, margin_steps, margin_relative = margin_parts
        margins = _margin_table(
            effects,
            np.sqrt(margin_variances),
            None,
            alpha,
            term_names[:d],
            class_names,
            margin_steps,
            margin_relative,
        )
    return LogitInference(
        params=params,
        bse=bse,
        zvalues=zvalues,
        pvalues=pvalues,
        conf_int_lower=params - half,
        conf_int_upper=params + half,
        cov_params=cov_params,
        cov_type=cov_type,
        alpha=float(alpha),
        llf=llf,
        llnull=llnull,
        prsquared=1 - llf / llnull if llnull != 0 else float("nan"),
        aic=-2 * llf + 2 * num_params,
        bic=-2 * llf + math.log(nobs) * num_params,
        nobs=nobs,
        num_params=num_params,
        converged=converged,
        method=method,
        cg_steps=steps,
        cg_relative_residual=relative,
        margins=margins,
        term_names=term_names,
        class_names=class_names,
    )


def _scatter(indices, size, values, steps, relative):
    """Full-length (variances, CG steps, residuals): NaN / −1 where not computed."""
    full_values, full_steps = np.full(size, np.nan), np.full(size, -1)
    full_relative = np.full(size, np.nan)
    full_values[indices], full_steps[indices], full_relative[indices] = values, steps, relative
    return full_values, full_steps, full_relative


def _dense_margins(margin_args, static, cov, alpha, names, class_names):
    """Effects and their delta-method covariance J C Jᵀ from the dense covariance C."""
    features = margin_args[0]
    d = features.shape[1]
    width = core.margin_width(d, static["num_classes"], static["fit_intercept"], d)
    effects, jac = core.margin_sums(
        *margin_args,
        chunk=chunk_rows(width, itemsize=jnp.dtype(features.dtype).itemsize),
        **static,
    )
    effects, jac = np.asarray(effects, float), np.asarray(jac, float)
    margin_cov = jac @ cov @ jac.T
    margin_cov = 0.5 * (margin_cov + margin_cov.T)
    bse = np.sqrt(np.maximum(np.diag(margin_cov), 0)).reshape(effects.shape)
    return _margin_table(effects, bse, margin_cov, alpha, names, class_names)


def _margin_table(effects, bse, cov, alpha, names, class_names, steps=None, relative=None):
    zvalues = effects / bse
    half = _normal_quantile(alpha) * bse
    return MarginalEffects(
        effects=effects,
        bse=bse,
        zvalues=zvalues,
        pvalues=_two_sided_p(zvalues),
        conf_int_lower=effects - half,
        conf_int_upper=effects + half,
        cov=cov,
        alpha=float(alpha),
        term_names=tuple(names),
        class_names=tuple(class_names),
        cg_steps=steps,
        cg_relative_residual=relative,
    )
