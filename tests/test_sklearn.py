"""The scikit-learn estimator: API conventions, validation, warnings, dtypes, meta-estimators."""

import importlib
import sys
import warnings
from unittest import SkipTest

import jax
import numpy as np
import pytest
from scipy.special import expit

pytest.importorskip("sklearn")

import scipy.sparse  # noqa: E402
import sklearn  # noqa: E402
from sklearn.datasets import load_iris, load_wine, make_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import xentropy_jax.sklearn as xsk  # noqa: E402
from xentropy_jax.sklearn import LogisticRegression  # noqa: E402
from xentropy_jax.solvers import Status  # noqa: E402

SOLVERS = ["newton", "newton-cg", "trust-region"]


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.fixture(scope="module")
def binary(iris):
    X, y = iris
    keep = y > 0  # versicolor vs virginica: overlapping classes
    return X[keep], y[keep]


class _SolverReachedError(Exception):
    pass


@pytest.fixture
def core_calls(monkeypatch):
    """Replace the solver by a recorder that stops the fit: inspect what would be solved."""
    calls = []

    def record(X, labels, num_classes, **kwargs):
        calls.append(dict(X=np.asarray(X), labels=np.asarray(labels), K=num_classes, **kwargs))
        raise _SolverReachedError

    monkeypatch.setattr(xsk, "fit_logistic_regression", record)
    return calls


# scikit-learn's estimator checks, one test each, so that pytest-xdist spreads them over the
# workers. Only the array-API checks may skip (they need SCIPY_ARRAY_API in the environment).
@parametrize_with_checks([LogisticRegression()])
def test_scikit_learn_estimator_checks(estimator, check):
    try:
        check(estimator)
    except SkipTest as skip:
        assert "array_api" in str(check) or "array API" in str(skip), (check, skip)
        raise


_X_OK = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [3.0, 0.0]])
_Y_OK = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    "X, y, sample_weight, match",
    [
        (np.where(_X_OK > 2, np.nan, _X_OK), _Y_OK, None, "NaN"),
        (np.where(_X_OK > 2, np.inf, _X_OK), _Y_OK, None, "infinity"),
        (_X_OK, np.zeros(4), None, "at least 2 classes"),
        (_X_OK, _Y_OK[:3], None, "inconsistent numbers of samples"),
        (_X_OK, _Y_OK, np.array([1.0, -1.0, 1.0, 1.0]), "Negative values"),
        (_X_OK, _Y_OK, np.ones(5), "sample_weight.shape"),
        (_X_OK, _Y_OK, np.zeros(4), "at least one non-zero"),
        (_X_OK, np.array([0.5, 1.5, 0.25, 1.0]), None, "Unknown label type"),
        (_X_OK[:0], _Y_OK[:0], None, "0 sample"),
        (_X_OK[:, 0], _Y_OK, None, "Expected 2D array"),
        (_X_OK + 1j, _Y_OK, None, "Complex data"),
    ],
)
def test_bad_input_raises_before_solving(core_calls, X, y, sample_weight, match):
    with pytest.raises(ValueError, match=match):
        LogisticRegression().fit(X, y, sample_weight=sample_weight)
    assert not core_calls


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_class_weight_must_be_finite_and_non_negative(core_calls, bad):
    with pytest.raises(ValueError, match="class_weight must be finite and >= 0") as info:
        LogisticRegression(class_weight={0: 1.0, 1: bad}).fit(_X_OK, _Y_OK)
    assert "l2" not in str(info.value) and "zero total weight" not in str(info.value)
    assert not core_calls


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(C=0.0), "C"),
        (dict(C=-1.0), "C"),
        (dict(C="1"), "C"),
        (dict(penalty="l3"), "penalty"),
        (dict(l1_ratio=2.0), "l1_ratio"),
        (dict(n_jobs="2"), "n_jobs"),
        (dict(solver="liblinear"), "solver"),
        (dict(tol=-1e-3), "tol"),
        (dict(max_iter=-1), "max_iter"),
        (dict(class_weight="even"), "class_weight"),
        (dict(fit_intercept="yes"), "fit_intercept"),
        (dict(warm_start=None), "warm_start"),
    ],
)
def test_bad_parameters_raise_before_solving(core_calls, params, name):
    with pytest.raises(ValueError, match=f"The '{name}' parameter"):
        LogisticRegression(**params).fit(_X_OK, _Y_OK)
    assert not core_calls


def test_class_weight_with_unknown_label_raises(core_calls):
    with pytest.raises(ValueError, match="class"):
        LogisticRegression(class_weight={0: 1.0, 7: 2.0}).fit(_X_OK, _Y_OK)
    assert not core_calls


def test_what_the_solver_is_asked(core_calls, iris):
    X, y = iris
    sample_weight = np.linspace(0.5, 2.0, y.size)
    with pytest.raises(_SolverReachedError):
        LogisticRegression(C=0.5, class_weight={0: 3.0}).fit(X, y, sample_weight=sample_weight)
    (call,) = core_calls
    weights = sample_weight * np.where(y == 0, 3.0, 1.0)
    n = y.size
    # Zero-weight padding rows may follow the data; they change nothing in the objective.
    np.testing.assert_array_equal(call["X"][:n], X)
    assert not np.any(call["X"][n:]) and not np.any(call["sample_weight"][n:])
    np.testing.assert_allclose(call["sample_weight"][:n], weights, rtol=1e-15)
    np.testing.assert_allclose(call["l2"], 1.0 / (0.5 * weights.sum()), rtol=1e-15)
    assert call["K"] == 3 and not call["reference_class"] and call["fit_intercept"]
    assert call["solver"] == "newton"  # (4 + 1) * 3 parameters: "auto" picks newton

    core_calls.clear()
    with pytest.raises(_SolverReachedError):
        LogisticRegression(penalty=None, C=0.5).fit(X, y)
    assert core_calls[0]["l2"] == 0.0 and core_calls[0]["reference_class"]

    core_calls.clear()
    with pytest.raises(_SolverReachedError):
        LogisticRegression().fit(X, np.where(y == 0, "a", "b"))
    assert core_calls[0]["K"] == 2 and core_calls[0]["reference_class"]


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("over", [False, True])
def test_auto_solver_rule(core_calls, n_classes, over):
    # Largest n_features with (n_features + 1) * free_classes <= the threshold, or one more.
    free_classes = n_classes - 1 if n_classes == 2 else n_classes
    n_features = xsk.AUTO_NEWTON_MAX_PARAMETERS // free_classes - 1 + int(over)
    X = np.random.default_rng(0).normal(size=(2 * n_classes, n_features))
    y = np.arange(2 * n_classes) % n_classes
    with pytest.raises(_SolverReachedError):
        LogisticRegression(solver="auto").fit(X, y)
    assert core_calls[0]["solver"] == ("newton-cg" if over else "newton")
    # In float32 always Newton-CG: Newton stalled at max_iter on raw data (docs/estimator.md).
    with pytest.raises(_SolverReachedError):
        LogisticRegression(solver="auto").fit(X.astype(np.float32), y)
    assert core_calls[1]["solver"] == "newton-cg"
    # Sparse X: Newton-CG keeps it sparse, where Newton's Hessian densified it.
    with pytest.raises(_SolverReachedError):
        LogisticRegression(solver="auto").fit(scipy.sparse.csr_matrix(X), y)
    assert core_calls[2]["solver"] == "newton-cg"


def test_auto_fits_float32_data_with_an_offset_column():
    # A column of mean 1e4 and standard deviation 1: "auto" picked Newton, which stopped at
    # max_iter (ConvergenceWarning) 1.1e-2 above the optimum in float32.
    X, y = make_classification(
        400,
        6,
        n_informative=4,
        n_redundant=0,
        n_classes=3,
        flip_y=0.15,
        class_sep=0.7,
        random_state=1,
    )
    X[:, 0] += 1e4
    X32 = X.astype(np.float32)
    centred = X32.astype(np.float64)
    centred[:, 0] -= 1e4  # the same objective, well conditioned
    reference = SklearnLogisticRegression(tol=1e-12, max_iter=10_000).fit(centred, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = LogisticRegression().fit(X32, y)
    assert ours.solver_ == "newton-cg"

    def objective(model, X):  # scikit-learn's, divided by C·n
        probabilities = model.predict_proba(X).astype(np.float64)
        penalty = np.sum(model.coef_.astype(np.float64) ** 2) / (2 * len(y))
        return -np.mean(np.log(probabilities[np.arange(len(y)), y])) + penalty

    expected = objective(reference, centred)
    assert abs(objective(ours, X32) - expected) < 1e-5 * expected


@pytest.mark.parametrize("solver", ["newton-cg", "trust-region"])
def test_many_features_use_the_diagonal_preconditioner(core_calls, monkeypatch, solver):
    monkeypatch.setattr(xsk, "KRONECKER_MAX_FEATURES", 3)
    X = np.random.default_rng(0).normal(size=(8, 4))
    y = np.arange(8) % 3
    with pytest.raises(_SolverReachedError):
        LogisticRegression(solver=solver).fit(X, y)
    configuration = core_calls[0]["solver"]
    assert configuration.preconditioner == "diagonal"
    assert (
        type(configuration).__name__
        == {"newton-cg": "NewtonCG", "trust-region": "TrustRegion"}[solver]
    )
    with pytest.raises(_SolverReachedError):
        LogisticRegression(solver=solver).fit(X[:, :3], y)
    assert core_calls[1]["solver"] == solver


def test_diagonal_preconditioner_reaches_the_same_optimum(monkeypatch):
    X, y = load_iris(return_X_y=True)
    kronecker = LogisticRegression(solver="newton-cg").fit(X, y)
    monkeypatch.setattr(xsk, "KRONECKER_MAX_FEATURES", 2)
    diagonal = LogisticRegression(solver="newton-cg").fit(X, y)
    np.testing.assert_allclose(diagonal.coef_, kronecker.coef_, rtol=1e-6, atol=1e-8)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.base", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "xentropy_jax.sklearn")
    with pytest.raises(ImportError, match=r"xentropy_jax\[sklearn\]"):
        importlib.import_module("xentropy_jax.sklearn")


def test_unfitted_raises():
    with pytest.raises(NotFittedError):
        LogisticRegression().predict_proba(_X_OK)


def test_convergence_warning_names_the_status(iris):
    X, y = iris
    with pytest.warns(ConvergenceWarning) as record:
        clf = LogisticRegression(max_iter=1, solver="newton-cg").fit(X, y)
    assert any(Status.message(Status.MAX_ITER) in str(w.message) for w in record)
    assert clf.n_iter_.shape == (1,) and clf.n_iter_.dtype == np.int32 and clf.n_iter_[0] == 1


def test_separable_unpenalised_data_warns():
    X = np.array([[-2.0], [-1.0], [-0.5], [0.5], [1.0], [2.0]])
    y = np.array([0, 0, 0, 1, 1, 1])
    for solver in SOLVERS:
        with pytest.warns(ConvergenceWarning, match="linearly separable") as record:
            LogisticRegression(penalty=None, solver=solver).fit(X, y)
        assert record[0].filename == __file__  # attributed to the caller's line


def test_overflowing_features_raise():
    rng = np.random.default_rng(0)
    X = (1e30 * rng.normal(size=(40, 3))).astype(np.float32)  # finite, but X @ W overflows
    with pytest.raises(ValueError, match="non-finite"):
        LogisticRegression().fit(X, np.arange(40) % 2)


def test_binary_convention_with_string_labels(binary):
    X, y = binary
    labels = np.where(y == 1, "versicolor", "virginica")
    clf = LogisticRegression().fit(X, labels)
    assert list(clf.classes_) == ["versicolor", "virginica"]
    assert clf.coef_.shape == (1, 4) and clf.intercept_.shape == (1,)
    scores = clf.decision_function(X)
    assert scores.shape == (y.size,)
    np.testing.assert_allclose(scores, X @ clf.coef_[0] + clf.intercept_[0], rtol=1e-12)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba[:, 1], expit(scores), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(clf.predict_log_proba(X), np.log(proba), rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), np.where(scores > 0, "virginica", "versicolor"))
    np.testing.assert_array_equal(clf.predict(X[:1]), clf.predict(X)[:1])
    assert clf.score(X, labels) > 0.9


def test_multiclass_shapes_and_predictions(iris):
    X, y = iris
    labels = np.array(["setosa", "versicolor", "virginica"], dtype=object)[y]
    clf = LogisticRegression(C=10.0).fit(X, labels)
    assert clf.coef_.shape == (3, 4) and clf.intercept_.shape == (3,)
    assert clf.n_features_in_ == 4
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[np.argmax(proba, axis=1)])
    # scikit-learn's symmetric convention: intercepts (and penalised coefficients) sum to 0.
    assert abs(clf.intercept_.sum()) < 1e-12
    np.testing.assert_allclose(clf.coef_.sum(axis=0), 0.0, atol=1e-8)


def test_dataframe_feature_names(iris):
    pd = pytest.importorskip("pandas")
    X, y = iris
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    clf = LogisticRegression().fit(frame, y)
    np.testing.assert_array_equal(clf.feature_names_in_, ["a", "b", "c", "d"])
    with pytest.warns(UserWarning, match="feature names"):
        clf.predict(X)


def test_scikit_learns_solver_names_and_max_iter_0(iris):
    # Code and grids written for scikit-learn (solver="lbfgs", the default there) raised.
    X, y = iris
    auto = LogisticRegression().fit(X, y)
    for name, ran in (("lbfgs", "newton"), ("sag", "newton"), ("saga", "newton")):
        model = LogisticRegression(solver=name).fit(X, y)
        assert model.solver_ == ran and model.get_params()["solver"] == name
        np.testing.assert_array_equal(model.coef_, auto.coef_)
    cholesky = LogisticRegression(solver="newton-cholesky").fit(X, y)
    assert cholesky.solver_ == "newton"
    np.testing.assert_array_equal(cholesky.coef_, auto.coef_)
    wide = np.repeat(X, 20, axis=1)  # 80 features: "auto" resolves to newton-cg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # only which solver ran matters
        assert LogisticRegression(solver="lbfgs", max_iter=3).fit(wide, y).solver_ == "newton-cg"
    with pytest.warns(ConvergenceWarning):  # as scikit-learn: the starting point
        start = LogisticRegression(max_iter=0).fit(X, y)
    assert start.n_iter_[0] == 0 and not np.any(start.coef_)


def test_a_class_that_the_weights_empty_is_fitted_as_scikit_learn_does(iris):
    # A zero class_weight, or a bootstrap sample that misses a rare class (BaggingClassifier
    # passes its draws as sample_weight): scikit-learn fits, and so do we now (it raised).
    from sklearn.ensemble import BaggingClassifier

    X, y = iris
    options = dict(class_weight={0: 0.0, 1: 1.0, 2: 1.0})
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the estimator fits it without a warning ...
        ours = LogisticRegression(**options).fit(X, y)
    # ... through a per-thread switch, not a process-wide filter that threads could leak.
    assert warnings.filters == filters
    from xentropy_jax import fit_logistic_regression

    with pytest.warns(UserWarning, match="classes without samples"):
        fit_logistic_regression(X, y, 3, sample_weight=(y > 0).astype(float), l2=1e-2)
    theirs = SklearnLogisticRegression(solver="newton-cg", tol=1e-10, **options).fit(X, y)
    assert ours.predict_proba(X)[:, 0].max() < 1e-6
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-5)
    rng = np.random.default_rng(0)
    rare = np.concatenate([np.zeros(60, int), np.ones(30, int), np.full(4, 2)])
    features = rng.normal(size=(rare.size, 3)) + rare[:, None]

    def bagged(labels):  # (ours, scikit-learn's) bagged probabilities
        return [
            BaggingClassifier(model, n_estimators=10, max_samples=0.5, random_state=0)
            .fit(features, labels)
            .predict_proba(features)
            for model in (
                LogisticRegression(),
                SklearnLogisticRegression(solver="newton-cg", tol=1e-10),
            )
        ]

    # The empty class's probability in a bag is ~tol, its solver's or ours.
    np.testing.assert_allclose(*bagged(rare), atol=1e-5)
    # Two classes, one of them rare: a bag that misses it was refused ("needs a positive total
    # weight on at least 2 classes"), where scikit-learn fits it.
    np.testing.assert_allclose(*bagged((rare == 2).astype(int)), atol=1e-5)
    one_class = LogisticRegression().fit(_X_OK, _Y_OK, sample_weight=[1.0, 0.0, 1.0, 0.0])
    assert one_class.predict_proba(_X_OK)[:, 1].max() < 1e-6
    # "balanced" gave such a class an infinite weight (1 / its weighted count) and raised
    # ("class_weight must be finite", with NumPy's divide-by-zero warning): its weight is moot.
    weights = (y > 0).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balanced = LogisticRegression(class_weight="balanced").fit(X, y, sample_weight=weights)
    assert balanced.predict_proba(X)[:, 0].max() < 1e-6
    counts = np.bincount(y, weights=weights)[1:]
    rows = weights * np.concatenate([[0.0], counts.sum() / (3 * counts)])[y]
    np.testing.assert_allclose(balanced.coef_, LogisticRegression().fit(X, y, rows).coef_)
    model = LogisticRegression(class_weight="balanced")
    bagging = BaggingClassifier(model, n_estimators=10, max_samples=0.5, random_state=0)
    probabilities = bagging.fit(features, rare).predict_proba(features)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_integer_weights_equal_repeated_rows(solver):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 5))
    y = rng.integers(0, 3, size=20)
    counts = rng.integers(0, 4, size=20)
    counts[:3] = 1  # every class keeps some weight
    y[:3] = [0, 1, 2]
    weighted = LogisticRegression(solver=solver).fit(X, y, sample_weight=counts)
    repeated = LogisticRegression(solver=solver).fit(X.repeat(counts, 0), y.repeat(counts))
    np.testing.assert_allclose(weighted.coef_, repeated.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        weighted.predict_proba(X), repeated.predict_proba(X), rtol=1e-9, atol=1e-12
    )
    # Weights times c are C times c, as in scikit-learn (docs/estimator.md said "nothing").
    scaled = LogisticRegression(solver=solver, tol=1e-12).fit(X, y, sample_weight=10 * counts)
    raised = LogisticRegression(solver=solver, C=10.0, tol=1e-12).fit(X, y, sample_weight=counts)
    np.testing.assert_allclose(scaled.coef_, raised.coef_, rtol=1e-8)
    assert np.abs(scaled.coef_ - weighted.coef_).max() > 1e-2


def test_warm_start_resumes_from_previous_fit(iris):
    X, y = iris
    cold = LogisticRegression(C=100.0).fit(X, y)
    warm = LogisticRegression(C=100.0, warm_start=True, max_iter=2)
    with pytest.warns(ConvergenceWarning):
        warm.fit(X, y)
    warm.set_params(max_iter=100).fit(X, y)
    np.testing.assert_allclose(warm.coef_, cold.coef_, rtol=1e-7)
    assert warm.n_iter_[0] < cold.n_iter_[0]
    again = warm.fit(X, y)  # already at the optimum
    assert again.n_iter_[0] <= 1


def test_sparsify_and_densify_as_scikit_learn(iris, binary):
    with pytest.raises(NotFittedError, match="before sparsifying"):
        LogisticRegression().sparsify()
    with pytest.raises(NotFittedError, match="before densifying"):
        LogisticRegression().densify()
    for X, y in (iris, binary):
        clf = LogisticRegression(warm_start=True).fit(X, y)
        dense = clf.coef_.copy()
        scores, proba = clf.decision_function(X), clf.predict_proba(X)
        assert clf.sparsify() is clf and isinstance(clf.coef_, scipy.sparse.csr_matrix)
        np.testing.assert_array_equal(clf.coef_.toarray(), dense)
        for features in (X, scipy.sparse.csr_matrix(X)):  # dense and sparse rows
            sparse_scores = clf.decision_function(features)
            assert type(sparse_scores) is np.ndarray and sparse_scores.shape == scores.shape
            np.testing.assert_allclose(sparse_scores, scores, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(clf.predict_proba(X), proba, rtol=1e-12, atol=1e-15)
        clf.fit(X, y)  # a warm start reads the sparse coefficients
        assert type(clf.coef_) is np.ndarray and clf.n_iter_[0] <= 1
        np.testing.assert_allclose(clf.coef_, dense, rtol=1e-7)
        dense = clf.coef_.copy()
        clf.sparsify()
        assert clf.densify() is clf and type(clf.coef_) is np.ndarray
        np.testing.assert_array_equal(clf.coef_, dense)
        assert clf.densify().coef_ is clf.coef_  # a no-op on dense coefficients
    if "sparse_interface" in sklearn.get_config():  # scikit-learn 1.9 on
        with sklearn.config_context(sparse_interface="sparray"):
            assert isinstance(clf.sparsify().coef_, scipy.sparse.csr_array)
    unpenalised = LogisticRegression(penalty=None).fit(iris[0][:, :1], iris[1])
    expected = unpenalised.inference(iris[0][:, :1], iris[1]).bse
    sparse_bse = unpenalised.sparsify().inference(iris[0][:, :1], iris[1]).bse
    np.testing.assert_allclose(sparse_bse, expected, rtol=1e-12)


def test_float32_in_float32_out_and_global_flag_untouched(iris):
    X, y = iris
    assert jax.config.jax_enable_x64  # tests run with x64 on
    fit64 = LogisticRegression().fit(X, y)
    with warnings.catch_warnings():
        # The default tol is raised to float32's gradient resolution: no spurious warning.
        warnings.simplefilter("error", ConvergenceWarning)
        fit32 = LogisticRegression().fit(X.astype(np.float32), y)
        unscaled = load_wine().data.astype(np.float32)  # features up to ~1,700
        LogisticRegression(solver="newton-cg").fit(unscaled, load_wine().target)
    assert jax.config.jax_enable_x64
    assert fit64.coef_.dtype == np.float64 and fit32.coef_.dtype == np.float32
    assert fit32.predict_proba(X.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(fit32.coef_, fit64.coef_, rtol=1e-4, atol=1e-5)


def test_float64_fit_with_x64_disabled_globally(iris):
    X, y = iris
    reference = LogisticRegression().fit(X, y)
    with jax.enable_x64(False):
        clf = LogisticRegression().fit(X, y)
        assert not jax.config.jax_enable_x64
    assert clf.coef_.dtype == np.float64
    np.testing.assert_allclose(clf.coef_, reference.coef_, rtol=1e-12)


def test_pipeline_and_grid_search_match_scikit_learn():
    X, y = make_classification(
        n_samples=240, n_features=6, n_informative=4, n_classes=3, random_state=0
    )
    grid = {"logisticregression__C": [0.01, 0.3, 10.0]}
    ours = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression()), grid, cv=3)
    theirs = GridSearchCV(
        make_pipeline(
            StandardScaler(),
            SklearnLogisticRegression(solver="newton-cholesky", tol=1e-10, max_iter=1000),
        ),
        grid,
        cv=3,
    )
    ours.fit(X, y)
    theirs.fit(X, y)
    np.testing.assert_allclose(
        ours.cv_results_["mean_test_score"], theirs.cv_results_["mean_test_score"]
    )
    assert ours.best_params_ == theirs.best_params_
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-6)
