"""The `SeparationWarning`: unpenalised fits on quasi-separated data, and fits that are not.

The premise checked first: on quasi-separated data the converged coefficients grow as tol
shrinks (no finite optimum exists), while on data with an optimum they settle.
"""

import inspect
import warnings

import jax
import numpy as np
import pytest
import scipy.sparse
from sklearn.datasets import load_iris, make_classification

import xentropy_jax as xj
from xentropy_jax.sklearn import LogisticRegression
from xentropy_jax.solvers._separation import (
    MAX_LP_ENTRIES,
    along_fit_checked,
    lp_entries,
    quasi_separation,
    separation_along_fit,
)

SOLVERS = ["newton", "newton-cg", "trust-region"]


def _quasi_binary(num_rows=300, tied=40, seed=0):
    """Class 1 exactly where x₀ > 0, both classes at x₀ = 0; x₁ is noise."""
    rng = np.random.default_rng(seed)
    first, second = rng.normal(size=num_rows), rng.normal(size=num_rows)
    labels = (first > 0).astype(int)
    first[:tied] = 0.0
    labels[:tied] = rng.integers(0, 2, tied)
    return np.c_[first, second], labels


def _indicator(num_rows=400, seed=0):
    """Three classes, noise columns, and an indicator that is 1 on ten rows of class 2 only."""
    rng = np.random.default_rng(seed)
    features, labels = rng.normal(size=(num_rows, 4)), rng.integers(0, 3, num_rows)
    indicator = np.zeros(num_rows)
    indicator[np.flatnonzero(labels == 2)[:10]] = 1.0
    return np.c_[features, indicator], labels


def _finite(num_rows=500, seed=0):
    """A strong effect (logit 4·x₀) with a far outlier row: an optimum exists, rows saturate."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_rows, 3))
    probability = 1 / (1 + np.exp(-4 * features[:, 0]))
    labels = (rng.random(num_rows) < probability).astype(int)
    features[0, 0], labels[0] = 30.0, 1
    return features, labels


def _clusters(num_rows, num_classes, class_sep, seed):
    """Four columns, three informative, one Gaussian cluster per class, no flipped labels."""
    return make_classification(
        n_samples=num_rows,
        n_features=4,
        n_informative=3,
        n_redundant=0,
        n_classes=num_classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        flip_y=0.0,
        random_state=seed,
    )


def _fit(X, y, num_classes, **options):
    """(result, the package's warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = xj.fit_logistic_regression(X, y, num_classes, **options)
    ours = [w for w in caught if w.category.__module__.startswith("xentropy_jax")]
    return result, ours


def _categories(caught):
    return [w.category for w in caught]


def test_the_premise_quasi_separated_coefficients_grow_as_tol_shrinks():
    X, y = _quasi_binary()
    sizes = [
        float(np.max(np.abs(_fit(X, y, 2, tol=tol)[0].params[0]))) for tol in (1e-4, 1e-8, 1e-12)
    ]
    assert sizes[1] > 2 * sizes[0] and sizes[2] > 1.5 * sizes[1], sizes
    X, y = _finite()
    sizes = [float(np.max(np.abs(_fit(X, y, 2, tol=tol)[0].params[0]))) for tol in (1e-4, 1e-12)]
    np.testing.assert_allclose(sizes[0], sizes[1], rtol=1e-3)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("tol", [1e-4, 1e-8])
def test_quasi_separated_fits_converge_with_the_warning(solver, tol):
    X, y = _quasi_binary()
    result, caught = _fit(X, y, 2, solver=solver, tol=tol)
    assert bool(result.converged)
    assert _categories(caught) == [xj.SeparationWarning]
    message = str(caught[0].message)
    # Δ = e₀ for class 1 raises every row with x₀ ≠ 0: 260 of them.
    assert "columns [0]" in message and "260 of 300 rows" in message and "set l2 > 0" in message


def test_the_warning_points_at_the_callers_line():
    X, y = _quasi_binary()
    with pytest.warns(xj.SeparationWarning) as caught:
        xj.fit_logistic_regression(X, y, 2)
        line = inspect.currentframe().f_lineno - 1
    [warning] = [w for w in caught if w.category is xj.SeparationWarning]
    assert (warning.filename, warning.lineno) == (__file__, line)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("solver", ["newton", "newton-cg"])
def test_iris_unpenalised_is_quasi_separated_in_either_precision(dtype, solver):
    # Setosa is separated from the other two, which overlap: float32's own Hessian rounds the
    # curvature along the separation away, which is why the check runs in float64.
    X, y = load_iris(return_X_y=True)
    _, caught = _fit(X.astype(dtype), y, 3, solver=solver)
    assert _categories(caught) == [xj.SeparationWarning]
    _, caught = _fit(X.astype(dtype), y, 3, solver=solver, reference_class=True)
    assert _categories(caught) == [xj.SeparationWarning]


def test_a_class_absent_from_a_level_of_an_indicator_is_found():
    # Only the margins against the absent class rise along Δ (the other classes' stay): a
    # check of each row's label against its runner-up alone saw no rise, at any tol.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(600, 2)), rng.integers(0, 3, 600)
    level = np.zeros(600)
    level[np.flatnonzero(y != 2)[:40]] = 1.0
    result, caught = _fit(np.c_[X, level], y, 3)
    assert bool(result.converged) and _categories(caught) == [xj.SeparationWarning]
    assert "columns [2]" in str(caught[0].message) and "40 of 600 rows" in str(caught[0].message)


@pytest.mark.parametrize("tol", [1e-4, 1e-8, 1e-12])
def test_the_decision_does_not_depend_on_tol(tol):
    # A level seen once, in class 2: its row's probability reached only 1 − tol/ŵ at loose tol.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(2000, 3)), rng.integers(0, 3, 2000)
    rare = np.zeros(2000)
    rare[np.flatnonzero(y == 2)[0]] = 1.0
    _, caught = _fit(np.c_[X, rare], y, 3, tol=tol)
    assert _categories(caught) == [xj.SeparationWarning]


@pytest.mark.parametrize("tol", [1e-8, 1e-10])
def test_separations_that_a_newton_step_misses_are_found(tol):
    # Two directions still moving (|W| 31 and 39 at these tols), and a one-row class outside
    # the others' hull: the Newton step at the returned point lowered some margin by 0.2 of
    # its largest rise, and a check built on it stayed silent.
    X, y = _clusters(250, 4, class_sep=1.6, seed=124)
    result, caught = _fit(X, y, 4, tol=tol)
    assert bool(result.converged) and _categories(caught) == [xj.SeparationWarning]
    rng = np.random.default_rng(0)
    rng.integers(0, 3, 50)
    X, y = rng.normal(size=(60, 2)), np.r_[rng.integers(0, 2, 59), 2]
    X[-1] = [5.0, 5.0]
    result, caught = _fit(X, y, 3, tol=tol)
    assert bool(result.converged) and _categories(caught) == [xj.SeparationWarning]
    # Class 2 falls on the other rows and rises on its own: every row gains some margin.
    assert "60 of 60 rows" in str(caught[0].message)


@pytest.mark.parametrize("sparse", [False, True])
def test_an_indicator_of_one_class_is_named(sparse):
    X, y = _indicator()
    result, caught = _fit(scipy.sparse.csr_matrix(X) if sparse else X, y, 3)
    assert bool(result.converged) and _categories(caught) == [xj.SeparationWarning]
    assert "columns [4]" in str(caught[0].message)


def test_rows_of_zero_weight_are_left_out():
    X, y = _indicator()
    weights = np.ones(len(y))
    # Rows of classes 0 and 1 where the indicator is 1 keep every class present at both of its
    # levels; at weight 0, class 0 is absent where it is 1.
    X[0, 4], y[0], weights[0] = 1.0, 0, 0.0
    X[1, 4], y[1] = 1.0, 1
    _, caught = _fit(X, y, 3, sample_weight=weights)
    assert _categories(caught) == [xj.SeparationWarning]
    weights[0] = 1.0
    _, caught = _fit(X, y, 3, sample_weight=weights)
    assert caught == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fits_with_an_optimum_are_not_warned(dtype):
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(500, 5)), rng.integers(0, 4, 500)
    for features, labels, classes in [(X, y, 4), (*_finite(), 2)]:
        for solver in SOLVERS:
            result, caught = _fit(features.astype(dtype), labels, classes, solver=solver)
            assert bool(result.converged) and caught == [], (solver, caught)
    # Nearly separated, but one row of each class on the wrong side, by 2e-2 or 1e-3: the
    # optimum exists (|W| 141 at every tol); a check by the Newton step warned on the latter.
    for offset in (0.02, 0.001):
        first = np.r_[np.linspace(-1, -0.01, 50), np.linspace(0.01, 1, 50), offset, -offset]
        labels = np.r_[np.zeros(50), np.ones(50), 0, 1].astype(int)
        result, caught = _fit(first[:, None].astype(dtype), labels, 2)
        assert bool(result.converged) and caught == [], offset
    # Three overlapping classes with large coefficients (12.6 at every tol).
    X, y = _clusters(200, 3, class_sep=1.0, seed=5)
    result, caught = _fit(X.astype(dtype), y, 3)
    assert bool(result.converged) and caught == []


def test_penalised_and_completely_separated_fits_are_not_warned():
    X, y = _quasi_binary()
    result, caught = _fit(X, y, 2, l2=1e-3)
    assert bool(result.converged) and caught == []
    separable = (X[:, 0] > 0).astype(int)
    result, caught = _fit(X[40:], separable[40:], 2, throw=False)
    assert int(result.status) == xj.Status.DIVERGED and caught == []


def test_the_estimator_words_the_warning_for_its_options_at_the_callers_line():
    X, y = load_iris(return_X_y=True)
    with pytest.warns(xj.SeparationWarning, match="no penalty") as caught:
        LogisticRegression(penalty=None).fit(X, y)
    [warning] = [w for w in caught if w.category is xj.SeparationWarning]
    assert warning.filename == __file__, warning.filename
    message = str(warning.message)
    assert "l2 = 0" not in message and "l2 > 0" not in message and "finite C" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LogisticRegression(C=1.0).fit(X, y)  # penalised: nothing to warn of


def test_a_fit_that_separation_keeps_from_converging_is_told_why():
    # Classes 0 and 2 are separated; float32 newton-cg runs to its iteration limit on them.
    X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]], np.float32)
    y = np.array([0, 0, 1, 2, 2, 0])
    result, caught = _fit(X, y, 3, max_iter=3, throw=False)
    assert int(result.status) == xj.Status.MAX_ITER
    assert _categories(caught) == [xj.SeparationWarning]
    assert "why the fit did not converge" in str(caught[0].message)
    with pytest.warns(xj.SeparationWarning), pytest.raises(xj.FitError):
        xj.fit_logistic_regression(X, y, 3, max_iter=3)


def test_a_class_without_rows_is_left_to_its_own_warning():
    # Its intercept has no finite optimum either, which the fit warns of (and the estimator's
    # folds fit silently): the separation check leaves such classes out.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 3)), rng.integers(0, 3, 300)
    _, caught = _fit(X, y, 4)
    assert xj.SeparationWarning not in _categories(caught)
    X, y = _quasi_binary()
    _, caught = _fit(X, y, 3)
    assert xj.SeparationWarning in _categories(caught)


# Beyond the linear program's size: the check reads the fit's coefficients (`separation_along_fit`).


def _setosa_like(num_rows=1500, seed=0):
    """Ten columns, three classes: class 0 alone where x₀ > 3.5 (a gap), classes 1 and 2 overlap."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, num_rows)
    features = rng.normal(size=(num_rows, 10))
    first = np.abs(features[:, 0])
    features[:, 0] = np.where(labels == 0, first + 4.0, np.minimum(features[:, 0], 3.0))
    features[:, 1] += 0.8 * (labels == 2)
    return features, labels


def _levels(num_rows=3000, seed=1):
    """Two 5-level factors (indicators of levels 1-4) and two numbers; no class 2 at level 0."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(0, 5, (num_rows, 2))
    numbers = rng.normal(size=(num_rows, 2))
    labels = (numbers @ rng.normal(size=(2, 3)) + 0.5 * rng.normal(size=(num_rows, 3))).argmax(1)
    absent = (levels[:, 0] == 0) & (labels == 2)
    labels[absent] = rng.integers(0, 2, np.count_nonzero(absent))
    indicators = [np.eye(5)[levels[:, j]][:, 1:] for j in range(2)]
    return np.hstack([*indicators, numbers]), labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sparse", [False, True])
def test_fits_too_large_for_the_linear_program_are_read_off_their_coefficients(dtype, sparse):
    # (The check on the first ran on iris's size only: these converged silently.)
    level_zero_rows = None
    cases = [(_setosa_like(), "[0, intercept]"), (_levels(), "[0, 1, 2, 3, intercept]")]
    for (X, y), columns in cases:
        assert lp_entries(len(X), X.shape[1] + 1, 3) > MAX_LP_ENTRIES
        features = scipy.sparse.csr_matrix(X.astype(dtype)) if sparse else X.astype(dtype)
        result, caught = _fit(features, y, 3)
        assert bool(result.converged) and _categories(caught) == [xj.SeparationWarning]
        message = str(caught[0].message)
        assert f"columns {columns}" in message, message
        level_zero_rows = np.count_nonzero(X[:, :4].sum(axis=1) == 0)
    # Δ lowers class 2 where the first factor is at level 0: those rows' margins over it rise.
    assert f"{level_zero_rows} of 3000 rows" in message


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fits_too_large_for_the_linear_program_with_an_optimum_are_not_warned(dtype):
    rng = np.random.default_rng(2)
    heavy = rng.standard_t(2, size=(3000, 10))  # many rows at margins of 10 to 900
    logits = heavy @ rng.normal(size=(10, 3))
    heavy_labels = (logits + rng.gumbel(size=logits.shape)).argmax(1)
    strong, strong_labels = _finite(num_rows=9000)
    X, y = make_classification(
        n_samples=3000,
        n_features=8,
        n_informative=6,
        n_redundant=0,
        n_classes=4,
        class_sep=2.0,
        random_state=0,
    )
    cases = [(heavy, heavy_labels, 3), (strong, strong_labels, 2), (X, y, 4)]
    for features, labels, classes in cases:
        assert lp_entries(len(features), features.shape[1] + 1, classes) > MAX_LP_ENTRIES
        result, caught = _fit(features.astype(dtype), labels, classes)
        assert bool(result.converged) and caught == [], caught


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_coefficients_tell_what_the_linear_program_does_at_the_default_tol(dtype):
    # The examples above, small enough for both checks; neither warns where the other does not.
    X, y = load_iris(return_X_y=True)
    rng = np.random.default_rng(0)
    cases = [(*_quasi_binary(), 2), (*_indicator(), 3), (X, y, 3), (*_finite(), 2)]
    cases.append((rng.normal(size=(500, 5)), rng.integers(0, 4, 500), 4))
    for features, labels, classes in cases:
        result, _ = _fit(features.astype(dtype), labels, classes)
        exact = quasi_separation(features.astype(float), labels, classes, True)
        read = separation_along_fit(features.astype(float), labels, classes, True, result.params)
        assert (exact is None) == (read is None), (exact, read)
        if exact is not None:
            assert read.rows == exact.rows and read.num_rows == exact.num_rows


def test_fits_beyond_both_checks_are_not_checked():
    X, y = _setosa_like()
    assert not along_fit_checked(30_000, 20 + 1, 30)  # d̃(K − 1) = 609 > MAX_NULL_SIZE
    assert along_fit_checked(len(X), X.shape[1] + 1, 3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("xentropy_jax.solvers._fit.along_fit_checked", lambda *shape: False)
        result, caught = _fit(X, y, 3)
    assert bool(result.converged) and caught == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coefficients_of_unbounded_size_are_certified_row_by_row(dtype):
    # One entry of 1e10 in a noise column: its row rose by 2.8e8 along the projected fit and
    # hid falls of 0.06 on other rows from the test relative to the largest rise (warned).
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3000, 10))
    y = (X @ (2 * rng.normal(size=(10, 3))) + rng.gumbel(size=(3000, 3))).argmax(1)
    X[0, 5] = 1e10
    assert lp_entries(len(X), 11, 3) > MAX_LP_ENTRIES and quasi_separation(X, y, 3, True) is None
    _, caught = _fit(X.astype(dtype), y, 3, throw=False)
    assert xj.SeparationWarning not in _categories(caught)
    # Fifty rows of the lone class 1e-9 inside the others' side: an optimum exists (|W| settles
    # at 2,638); the projection certified it before the rows' own bound.
    X, y = _setosa_like(3000)
    X[np.flatnonzero(y == 0)[:50], 0] = 3.0 - 1e-9
    assert quasi_separation(X, y, 3, True) is None
    _, caught = _fit(X, y, 3, throw=False)
    assert xj.SeparationWarning not in _categories(caught)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_raised_pairs_that_keep_small_margins_do_not_hide_the_separation(dtype):
    # Ties at x₀ = 0 and class 1 exactly where x₀ > 0: rows with |x₀| < 3e-4 keep margins below
    # 2.5 at any tol, and counted as unchanged they took x₀'s direction out of the null space.
    X, y = _quasi_binary(num_rows=20_000, tied=1000)
    _, caught = _fit(X.astype(dtype), y, 2)
    assert _categories(caught) == [xj.SeparationWarning]
    # In float32 the factor's fit stops at coefficients near 12 at any tol.
    for seed in (2, 7, 8):
        X, y = _levels(4000, seed)
        _, caught = _fit(X.astype(dtype), y, 3)
        assert _categories(caught) == [xj.SeparationWarning], seed


def test_a_subnormal_float32_l2_is_not_taken_for_a_penalty():
    # l2 = 1e-42 is positive to NumPy but subnormal in float32, 0 to XLA's CPU backend: the fit
    # was compiled as penalised and reported separable data CONVERGED after 19 iterations,
    # where the l2 = 0 fit it ran reports DIVERGED.
    X, y = load_iris(return_X_y=True)
    X, y = X.astype(np.float32), (y == 0).astype(int)
    with jax.enable_x64(False):
        statuses = [
            int(xj.fit_logistic_regression(X, y, 2, l2=l2, throw=False).status)
            for l2 in (0.0, 1e-42)
        ]
    assert statuses == [xj.Status.DIVERGED, xj.Status.DIVERGED]
