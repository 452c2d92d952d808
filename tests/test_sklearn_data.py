"""The estimators on the data people bring: sparse input, scikit-learn 1.8 parameters, CV."""

import inspect
import warnings

import jax
import jax.monitoring
import numpy as np
import pytest

pytest.importorskip("sklearn")

import scipy.sparse  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression  # noqa: E402
from sklearn.linear_model import LogisticRegressionCV as SklearnLogisticRegressionCV  # noqa: E402
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import xentropy_jax as xj  # noqa: E402
import xentropy_jax.sklearn as sklearn_module  # noqa: E402
from xentropy_jax.sklearn import LogisticRegression, LogisticRegressionCV  # noqa: E402

# The comparisons with scikit-learn's LogisticRegressionCV attributes need its 1.9 parameters.
requires_scikit_learn_1_9 = pytest.mark.skipif(
    "use_legacy_attributes" not in SklearnLogisticRegressionCV().get_params(),
    reason="scikit-learn before 1.9 has neither l1_ratios' nor use_legacy_attributes' layouts",
)


@pytest.fixture(scope="module")
def text():
    rng = np.random.default_rng(0)
    X = scipy.sparse.random(120, 300, density=0.05, format="csr", random_state=0)
    y = np.asarray(X[:, :3].sum(axis=1)).ravel().argsort().argsort() * 3 // 120
    y = np.where(rng.uniform(size=120) < 0.1, (y + 1) % 3, y)
    return X, y


@pytest.fixture(scope="module")
def iris():
    X, y = load_iris(return_X_y=True)
    return StandardScaler().fit_transform(X), y


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_fit_equals_dense_fit(text, fmt):
    X, y = text
    sparse_model = LogisticRegression(C=10.0, tol=1e-12).fit(X.asformat(fmt), y)
    dense_model = LogisticRegression(C=10.0, tol=1e-12).fit(X.toarray(), y)
    # Both stop at max|g| <= tol = 1e-12; the smallest curvature is the penalty's,
    # l2 = 1/(C·N) = 1/1200 (empty columns have no other), so the two optima are only
    # determined to tol/l2 = 1.2e-9 (the preconditioners differ: Kronecker against diagonal).
    np.testing.assert_allclose(sparse_model.coef_, dense_model.coef_, rtol=0, atol=2e-9)
    np.testing.assert_allclose(sparse_model.intercept_, dense_model.intercept_, atol=2e-9)
    np.testing.assert_allclose(
        sparse_model.predict_proba(X), dense_model.predict_proba(X.toarray()), atol=1e-12
    )
    assert LogisticRegression().__sklearn_tags__().input_tags.sparse


def test_sparse_fit_matches_scikit_learn(text):
    X, y = text
    ours = LogisticRegression(C=10.0).fit(X, y)
    theirs = SklearnLogisticRegression(C=10.0, tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, atol=1e-5)


def test_float32_data_fit_matches_float64(iris):
    X, y = iris
    reference = LogisticRegression(C=1.0).fit(X, y)
    model = LogisticRegression(C=1.0).fit(X.astype(np.float32), y)
    assert model.coef_.dtype == np.float32
    np.testing.assert_allclose(model.coef_, reference.coef_, atol=5e-4)


def test_infinite_c_is_the_unpenalised_fit():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    X = rng.normal(size=(200, 2)) + y[:, None]  # overlapping classes: a finite optimum
    inf = LogisticRegression(C=np.inf).fit(X, y)
    none = LogisticRegression(penalty=None).fit(X, y)
    np.testing.assert_allclose(inf.coef_, none.coef_, atol=1e-9)
    theirs = SklearnLogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(inf.coef_, theirs.coef_, atol=1e-4)


def test_scikit_learns_other_parameters_are_accepted_and_change_nothing(iris):
    # scikit-learn 1.9's parameters for the L2 and unpenalised cases, and those only its
    # stochastic or liblinear solvers read: code written for it runs unchanged.
    X, y = iris
    plain = LogisticRegression().fit(X, y)
    options = dict(
        l1_ratio=0.0,
        n_jobs=2,
        penalty="deprecated",
        dual=False,
        intercept_scaling=5.0,
        random_state=0,
    )
    other = LogisticRegression(**options).fit(X, y)
    np.testing.assert_array_equal(other.coef_, plain.coef_)
    np.testing.assert_array_equal(other.intercept_, plain.intercept_)
    assert LogisticRegression(l1_ratio=None).fit(X, y).coef_.shape == plain.coef_.shape
    unpenalised = LogisticRegression(penalty="deprecated", C=np.inf).fit(X[50:], y[50:])
    none = LogisticRegression(penalty=None).fit(X[50:], y[50:])
    np.testing.assert_allclose(unpenalised.coef_, none.coef_, atol=1e-9)


def test_weights_and_c_beyond_range_name_themselves():
    # These blamed l2 (no parameter of the estimator), "non-finite values", or sample_weight
    # when the class weight had overflowed.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 3)), np.arange(60) % 3
    with pytest.raises(ValueError, match=r"C·Σ sample_weight = .* too small for float64"):
        LogisticRegression().fit(X, y, sample_weight=np.full(60, 1e-320))
    with pytest.raises(ValueError, match=r"C·Σ sample_weight = .* too small for float64"):
        LogisticRegression(C=1e-310).fit(X, y)
    with pytest.raises(ValueError, match=r"C·Σ sample_weight = .* too small for float32"):
        LogisticRegressionCV(Cs=[1e-30, 1.0], cv=3).fit(X.astype(np.float32), y)
    with pytest.raises(ValueError, match=r"class_weight times sample_weight exceeds .*\[0\]"):
        LogisticRegression(class_weight={0: 1e300}).fit(X.astype(np.float32), y)
    # Every weight finite, their sum not: l2 = 1/(C·Σw) read 0, and the fit was unpenalised.
    with pytest.raises(ValueError, match=r"Σ sample_weight overflows float64"):
        LogisticRegression(C=1e-307).fit(X, y, sample_weight=np.full(60, 1e307))
    with pytest.raises(ValueError, match=r"Σ sample_weight overflows float32"):
        LogisticRegression().fit(X.astype(np.float32), y, sample_weight=np.full(60, 3e37))
    # A training split whose rows all weigh 0 was told to raise C.
    from sklearn.model_selection import KFold

    weights = np.where(np.arange(60) < 40, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"at least one non-zero number \(in every training"):
        LogisticRegressionCV(Cs=3, cv=KFold(3)).fit(X, y, sample_weight=weights)


def test_collinearity_warning_names_the_estimators_options_at_the_callers_line():
    # It came from inside the package and said "l2 = 0 ... or set l2 > 0", which the estimator
    # has no parameter for.
    X, y = load_iris(return_X_y=True)
    with pytest.warns(xj.CollinearityWarning, match=r"\[0, 4\] .* and no penalty") as caught:
        LogisticRegression(C=np.inf).fit(np.c_[X, X[:, 0]], y)
    [warning] = [w for w in caught if w.category is xj.CollinearityWarning]
    assert warning.filename == __file__, warning.filename
    message = str(warning.message)
    assert "l2 = 0" not in message and "l2 > 0" not in message and "finite C" in message


def test_ignored_l1_ratio_and_c_warn_as_scikit_learn():
    # scikit-learn 1.9 fits these unpenalised and says what it ignores: C=np.inf with
    # l1_ratio=0.5 was refused here as elastic-net, and C beside penalty=None ignored silently.
    X, y = load_iris(return_X_y=True)
    X, y = X[50:], y[50:]
    none = LogisticRegression(penalty=None).fit(X, y)
    for options, message in [
        (dict(C=np.inf, l1_ratio=0.5), "l1_ratio parameter is only used when penalty is"),
        (dict(penalty=None, l1_ratio=0.5), "l1_ratio parameter is only used when penalty is"),
        (dict(penalty=None, C=0.01), "Setting penalty=None will ignore the C and l1_ratio"),
    ]:
        with pytest.warns(UserWarning, match=message):
            fitted = LogisticRegression(**options).fit(X, y)
        np.testing.assert_allclose(fitted.coef_, none.coef_, atol=1e-9)
        with pytest.warns(UserWarning, match=message):
            SklearnLogisticRegression(**options).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LogisticRegression(C=np.inf, l1_ratio=1.0).fit(X, y)  # no penalty: nothing ignored


@requires_scikit_learn_1_9
def test_every_parameter_of_scikit_learns_estimators_is_accepted():
    names = set(SklearnLogisticRegression().get_params())
    assert names <= set(LogisticRegression().get_params())
    assert set(SklearnLogisticRegressionCV().get_params()) <= set(
        LogisticRegressionCV().get_params()
    )
    # The parameters scikit-learn takes by position are taken by position here too.
    for ours, theirs in (
        (LogisticRegression, SklearnLogisticRegression),
        (LogisticRegressionCV, SklearnLogisticRegressionCV),
    ):
        assert _positional(ours) == _positional(theirs)
    assert LogisticRegression(None).penalty is None


def _positional(estimator: type) -> list[str]:
    """The names of the constructor's parameters that may be passed by position."""
    parameters = inspect.signature(estimator.__init__).parameters.values()
    return [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "self"]


_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: _compiles.append(event) if "backend_compile" in event else None
)


def _search_compiles(X, y, backend, clear=True):
    """cv_results_ of a GridSearchCV(n_jobs=2) run under `backend` and the programs compiled.

    `clear`: start from empty caches (else from what earlier calls compiled).
    """
    import joblib
    from sklearn.model_selection import GridSearchCV

    if clear:
        jax.clear_caches()
    _compiles.clear()
    search = GridSearchCV(LogisticRegression(), {"C": [0.1, 1.0, 10.0]}, cv=3, n_jobs=2)
    with joblib.parallel_backend(backend, n_jobs=2):
        search.fit(X, y)
    return search.cv_results_["mean_test_score"], len(_compiles)


def test_grid_search_with_threads_compiles_what_a_serial_search_does(iris):
    # Worker processes (joblib's default) compile every program again, and only the refit is
    # compiled here; worker threads share this process's compiled programs (JAX releases the
    # GIL while a program runs), as the serial search does. The documented recipe for
    # GridSearchCV(n_jobs) is the threading backend.
    X, y = iris
    serial, serial_compiles = _search_compiles(X, y, "sequential")
    assert serial_compiles > 0
    # After the serial search, the threads find every program compiled.
    threaded, threaded_compiles = _search_compiles(X, y, "threading", clear=False)
    np.testing.assert_array_equal(threaded, serial)
    assert threaded_compiles == 0
    # From empty caches, two threads that first call a program at the same moment may both
    # compile it (JAX does not hold one back for the other): at most twice each, never per fit.
    threaded, threaded_compiles = _search_compiles(X, y, "threading")
    np.testing.assert_array_equal(threaded, serial)
    assert serial_compiles <= threaded_compiles <= 2 * serial_compiles


@pytest.mark.parametrize(
    "estimator, params",
    [
        (LogisticRegression, dict(penalty="l1")),
        (LogisticRegression, dict(penalty="elasticnet")),
        (LogisticRegression, dict(l1_ratio=0.5)),
        (LogisticRegressionCV, dict(penalty="l1")),
        (LogisticRegressionCV, dict(l1_ratios=[0.0, 0.5])),
    ],
)
def test_l1_and_elastic_net_name_the_supported_options(iris, estimator, params):
    X, y = iris
    with pytest.raises(ValueError, match=r"Supported: the L2 penalty.*C=np.inf"):
        estimator(**params).fit(X, y)


@pytest.mark.parametrize("estimator", [LogisticRegression, LogisticRegressionCV])
def test_the_dual_formulation_is_refused(iris, estimator):
    X, y = iris
    with pytest.raises(ValueError, match="dual=True asks for the dual formulation"):
        estimator(dual=True).fit(X, y)


def test_cross_validation_picks_the_best_c_and_refits(iris):
    X, y = iris
    Cs = [0.01, 1.0, 100.0]
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    model = LogisticRegressionCV(Cs=Cs, cv=cv, scoring="neg_log_loss").fit(X, y)
    assert model.scores_.shape == (3, 1, 3)
    scores = model.scores_[:, 0]
    # Each score is that of an independent fit on the training rows.
    for fold, (train, test) in enumerate(cv.split(X, y)):
        for index, C in enumerate(Cs):
            alone = LogisticRegression(C=C).fit(X[train], y[train])
            expected = -log_loss(y[test], alone.predict_proba(X[test]), labels=[0, 1, 2])
            np.testing.assert_allclose(scores[fold, index], expected, rtol=1e-6)
    assert model.C_ == Cs[int(np.argmax(scores.mean(axis=0)))]
    refit = LogisticRegression(C=model.C_).fit(X, y)
    np.testing.assert_allclose(model.coef_, refit.coef_)
    # score() measures what the cross-validation did, as scikit-learn's does.
    expected = -log_loss(y, refit.predict_proba(X))
    np.testing.assert_allclose(model.score(X, y), expected, rtol=1e-12)
    np.testing.assert_allclose(
        model.score(X, y, sample_weight=np.arange(150.0)),
        -log_loss(y, refit.predict_proba(X), sample_weight=np.arange(150.0)),
        rtol=1e-12,
    )


def test_splits_one_after_the_other_equal_the_vectorised_splits(iris, monkeypatch):
    # On CPU the splits run one after the other; on accelerators, vectorised in one call.
    X, y = iris
    assert sklearn_module._splits_in_lockstep(X) == (jax.default_backend() != "cpu")
    Cs = [0.01, 1.0, 100.0]
    alone = LogisticRegressionCV(Cs=Cs, cv=3).fit(X, y)
    _compiles.clear()
    LogisticRegressionCV(Cs=Cs, cv=3).fit(X, y)
    assert not _compiles  # the splits share one program, compiled by the first search
    monkeypatch.setattr(sklearn_module, "_splits_in_lockstep", lambda X: True)
    together = LogisticRegressionCV(Cs=Cs, cv=3).fit(X, y)
    np.testing.assert_allclose(together.coefs_paths_, alone.coefs_paths_, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(together.scores_, alone.scores_, rtol=1e-9)
    np.testing.assert_array_equal(together.n_iter_, alone.n_iter_)
    assert together.C_ == alone.C_


def test_log_loss_scores_clip_probabilities_as_scikit_learn():
    # At C = 1e4 a float32 fold of raw iris holds a confidently wrong row whose probability is
    # below eps: unclipped, its log moved the fold's score by 9% from scikit-learn's.
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    model = LogisticRegressionCV(Cs=[1e4], cv=cv, scoring="neg_log_loss").fit(X, y)
    clipped_somewhere = False
    for fold, (train, test) in enumerate(cv.split(X, y)):
        alone = LogisticRegression(C=1e4).fit(X[train], y[train])
        probs = alone.predict_proba(X[test])
        expected = -log_loss(y[test], probs, labels=[0, 1, 2])
        # The fold's fit (warm-started along the path) and this one are two float32 fits of a
        # nearly separable problem: their held-out scores differ by up to 0.3%, well inside the
        # 9% that the clip makes.
        np.testing.assert_allclose(model.scores_[fold, 0, 0], expected, rtol=1e-2)
        picked = probs[np.arange(test.size), y[test]]
        clipped_somewhere |= bool(np.any(picked < np.finfo(np.float32).eps))
    assert clipped_somewhere


def test_cross_validation_scores_ignore_class_weight_and_report_unconverged_fits(iris):
    # class_weight shapes the fits, not the measure of their held-out predictions (as in
    # scikit-learn): it used to weight the scores too, and to move C_.
    X, y = iris
    weights = {0: 5.0, 1: 1.0, 2: 0.2}
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    model = LogisticRegressionCV(Cs=[1.0], cv=cv, class_weight=weights).fit(X, y)
    for fold, (train, test) in enumerate(cv.split(X, y)):
        alone = LogisticRegression(C=1.0, class_weight=weights).fit(X[train], y[train])
        np.testing.assert_allclose(model.scores_[fold, 0, 0], alone.score(X[test], y[test]))
    # Fits cut short were scored without a word.
    with pytest.warns(ConvergenceWarning, match=r"[1-6] of 6 cross-validation fits stopped"):
        LogisticRegressionCV(Cs=[1e-3, 1e3], cv=cv, max_iter=2, refit=False).fit(X, y)


def test_cross_validation_counts_repeated_training_rows_and_refuses_weightless_held_out_rows():
    # Bootstrap splits repeat training rows: scikit-learn fits X[train], each repeat counted.
    # Assigned into the split's weights, a repeat counted once (scores 0.05 to 0.24 off, C_
    # 10 where scikit-learn's is 1).
    rng = np.random.default_rng(2)
    X = rng.normal(size=(60, 3))
    y = (X[:, 0] + rng.normal(size=60) > 0).astype(int)
    splits = []
    for _ in range(3):
        train = rng.integers(0, 60, 60)
        splits.append((train, np.setdiff1d(np.arange(60), train)))
    Cs = [0.01, 0.1, 1.0, 10.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = LogisticRegressionCV(Cs=Cs, cv=splits, scoring="neg_log_loss", tol=1e-10)
        model.fit(X, y)
    for fold, (train, test) in enumerate(splits):
        for position, C in enumerate(Cs):
            alone = LogisticRegression(C=C, tol=1e-10).fit(X[train], y[train])
            expected = -log_loss(y[test], alone.predict_proba(X[test]))
            np.testing.assert_allclose(model.scores_[fold, 0, position], expected, rtol=1e-6)
    # Held-out rows of total weight 0: their score is undefined. It was NaN, and C_ the first
    # value (argmax of an all-NaN mean), where scikit-learn raises.
    weights = np.ones(60)
    weights[:20] = 0
    folds = [(np.arange(20, 60), np.arange(20)), (np.arange(40), np.arange(40, 60))]
    for scoring in (None, "neg_log_loss"):
        with pytest.raises(ValueError, match="split 0 have total sample weight 0"):
            LogisticRegressionCV(Cs=3, cv=folds, scoring=scoring).fit(X, y, sample_weight=weights)


def test_cross_validation_on_sparse_binary(text):
    X, y = text
    binary = y > 0
    model = LogisticRegressionCV(Cs=3, cv=2).fit(X[binary], y[binary])
    assert model.coef_.shape == (1, X.shape[1]) and model.scores_.shape == (2, 1, 3)
    assert jax.config.jax_enable_x64  # the global flag is left as it was


@pytest.mark.parametrize("estimator", [LogisticRegression, LogisticRegressionCV])
def test_both_estimators_refuse_a_nan_class_weight(estimator):
    X, y = load_iris(return_X_y=True)
    with pytest.raises(ValueError, match="class_weight must be finite and >= 0"):
        estimator(class_weight={0: 1.0, 1: np.nan, 2: 1.0}).fit(X, y)


def _layout(value):
    """The type, shape and dtype kind of an attribute (and the keys of a dict)."""
    if isinstance(value, dict):
        return "dict", [str(key) for key in value], [np.shape(v) for v in value.values()]
    return type(value).__name__, np.shape(value), np.asarray(value).dtype.kind


_CV_ATTRIBUTES = ("C_", "l1_ratio_", "l1_ratios_", "scores_", "coefs_paths_", "n_iter_", "Cs_")


@requires_scikit_learn_1_9
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("l1_ratios", [None, (0.0, 0.0)])
@pytest.mark.parametrize("refit", [True, False])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_cross_validation_attributes_are_scikit_learns(iris, legacy, l1_ratios, refit, n_classes):
    # The same attributes in the same layouts as scikit-learn 1.9 (whose use_legacy_attributes
    # picks between dictionaries keyed by class and arrays), with the same values: scikit-learn's
    # newton-cg at a tight tol is the reference (ours stop at tol = 1e-8: the log-losses agree
    # to 2e-7 at C = 100). refit=False keeps each split's own best C.
    X, y = iris
    keep = y >= 3 - n_classes  # two classes: versicolor and virginica, which overlap
    X, y = X[keep], np.array(["setosa", "versicolor", "virginica"])[y[keep]]
    options = dict(
        Cs=[0.01, 0.3, 100.0],
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="neg_log_loss",
        use_legacy_attributes=legacy,
        l1_ratios=l1_ratios,
        refit=refit,
    )
    theirs = SklearnLogisticRegressionCV(solver="newton-cg", tol=1e-10, **options).fit(X, y)
    ours = LogisticRegressionCV(**options).fit(X, y)
    for name in _CV_ATTRIBUTES:
        assert _layout(getattr(ours, name)) == _layout(getattr(theirs, name)), name
    if legacy:
        assert list(ours.scores_) == list(theirs.scores_)
        for key in ours.scores_:
            np.testing.assert_allclose(ours.scores_[key], theirs.scores_[key], rtol=1e-6)
            np.testing.assert_allclose(
                ours.coefs_paths_[key], theirs.coefs_paths_[key], rtol=1e-5, atol=1e-6
            )
        np.testing.assert_array_equal(ours.l1_ratio_, theirs.l1_ratio_)
    else:
        np.testing.assert_allclose(ours.scores_, theirs.scores_, rtol=1e-6)
        np.testing.assert_allclose(ours.coefs_paths_, theirs.coefs_paths_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.C_, theirs.C_)
    np.testing.assert_allclose(ours.coef_, theirs.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_, theirs.intercept_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.score(X, y), theirs.score(X, y), rtol=1e-6)


@requires_scikit_learn_1_9
@pytest.mark.parametrize(
    "scoring", ["roc_auc_ovr", "f1_macro", "neg_brier_score", "balanced", "accuracy", None]
)
def test_cross_validation_with_any_scorer_scores_as_scikit_learn(iris, scoring):
    # Names other than accuracy and neg_log_loss, and callables, go through scikit-learn's
    # scorers; those whose metric takes `labels` are given the classes, as scikit-learn does.
    from sklearn.metrics import balanced_accuracy_score, make_scorer

    if scoring == "balanced":
        scoring = make_scorer(balanced_accuracy_score)
    X, y = iris
    options = dict(
        Cs=[0.01, 0.3, 100.0],
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring=scoring,
        use_legacy_attributes=False,
    )
    theirs = SklearnLogisticRegressionCV(solver="newton-cg", tol=1e-10, **options).fit(X, y)
    ours = LogisticRegressionCV(**options).fit(X, y)
    np.testing.assert_allclose(ours.scores_, theirs.scores_, rtol=1e-6)
    assert ours.C_ == theirs.C_
    np.testing.assert_allclose(ours.score(X, y), theirs.score(X, y), rtol=1e-6)


def test_cross_validation_keeps_the_scorers_own_pos_label():
    # The scorer was rebuilt with labels and pos_label over the user's own: an F1 scorer of
    # class 1 scored class 2 in scores_ (and chose C by it), while score() used class 1.
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import f1_score, make_scorer

    X, y = load_breast_cancer(return_X_y=True)
    X, y = StandardScaler().fit_transform(X), y + 1  # classes {1, 2}
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    scorer = make_scorer(f1_score, pos_label=1)
    model = LogisticRegressionCV(Cs=[1e-3, 1.0], cv=cv, scoring=scorer, tol=1e-10).fit(X, y)
    train, test = next(cv.split(X, y))
    for column, C in enumerate([1e-3, 1.0]):
        fit = LogisticRegression(C=C, tol=1e-10).fit(X[train], y[train])
        np.testing.assert_allclose(model.scores_[0, 0, column], scorer(fit, X[test], y[test]))


def test_cross_validation_refuses_an_unknown_scorer_and_empty_l1_ratios(iris):
    X, y = iris
    with pytest.raises(ValueError, match="'nonsense' is not a valid scoring value"):
        LogisticRegressionCV(scoring="nonsense").fit(X, y)
    with pytest.raises(ValueError, match="l1_ratios must hold at least one value"):
        LogisticRegressionCV(l1_ratios=[]).fit(X, y)
    for ratios in ([np.nan], [-1.0]):  # both were fitted as L2
        with pytest.raises(ValueError, match=r"l1_ratio values must lie in \[0, 1\]"):
            LogisticRegressionCV(Cs=2, cv=3, l1_ratios=ratios).fit(X, y)


def test_cross_validation_inference_is_that_of_the_chosen_c(iris):
    # It read the inherited C = 1.0: an unpenalised choice raised "the fit is penalised".
    X, y = iris[0][::3, :1], iris[1][::3]
    chosen = LogisticRegressionCV(Cs=[np.inf], cv=3).fit(X, y)
    single = LogisticRegression(penalty=None).fit(X, y)
    np.testing.assert_allclose(chosen.inference(X, y).bse, single.inference(X, y).bse, rtol=1e-6)


def test_cross_validation_calls_a_plain_callable_scorer_without_weights(iris):
    # A scorer(estimator, X, y) that is not a scikit-learn scorer may not take sample_weight.
    X, y = iris
    calls = []

    def agreement(estimator, X_test, y_test):
        calls.append(len(y_test))
        return float(np.mean(estimator.predict(X_test) == y_test))

    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    weights = np.linspace(0.5, 1.5, y.size)
    model = LogisticRegressionCV(Cs=[0.1, 10.0], cv=cv, scoring=agreement)
    model.fit(X, y, sample_weight=weights)
    assert len(calls) == 3 * 2 and model.scores_.shape == (3, 1, 2)
    # Each score is the unweighted agreement of that split's fit, recomputed from its path.
    for fold, (_, test) in enumerate(cv.split(X, y)):
        for index in range(2):
            path = model.coefs_paths_[fold, 0, index]  # [K, d + 1], the intercept last
            predicted = np.argmax(X[test] @ path[:, :-1].T + path[:, -1], axis=1)
            assert model.scores_[fold, 0, index] == np.mean(predicted == y[test])


@requires_scikit_learn_1_9
def test_cross_validation_routes_metadata_as_scikit_learn(iris):
    # With metadata routing, fit(..., groups=...) reaches the splitter and a scorer's
    # requested sample_weight reaches the scorer; without it, extra parameters raise.
    import sklearn
    from sklearn.exceptions import UnsetMetadataPassedError
    from sklearn.metrics import accuracy_score, make_scorer
    from sklearn.model_selection import GroupKFold

    X, y = iris
    groups = np.arange(y.size) % 5
    weights = np.random.default_rng(0).uniform(0.1, 3.0, y.size)
    options = dict(Cs=[0.01, 0.3, 100.0], cv=GroupKFold(3), use_legacy_attributes=False)
    with pytest.raises(ValueError, match="enable_metadata_routing=True"):
        LogisticRegressionCV(**options).fit(X, y, groups=groups)
    with sklearn.config_context(enable_metadata_routing=True):
        fits = []
        for scoring in (None, make_scorer(accuracy_score).set_score_request(sample_weight=True)):
            weighted = {} if scoring is None else {"sample_weight": weights}
            theirs = SklearnLogisticRegressionCV(
                solver="newton-cg", tol=1e-10, scoring=scoring, **options
            ).fit(X, y, groups=groups, **weighted)
            ours = LogisticRegressionCV(scoring=scoring, **options)
            ours.fit(X, y, groups=groups, **weighted)
            np.testing.assert_allclose(ours.scores_, theirs.scores_, rtol=1e-12)
            assert ours.C_ == theirs.C_
            score = ours.score(X, y, **weighted)
            np.testing.assert_allclose(score, theirs.score(X, y, **weighted), rtol=1e-6)
            fits.append(ours)
        # The splits are GroupKFold's, and the second scorer weighed the held-out rows.
        assert not np.array_equal(fits[0].scores_, fits[1].scores_)
        with pytest.raises(ValueError, match="groups"):  # GroupKFold without its groups
            LogisticRegressionCV(**options).fit(X, y)
        with pytest.raises(UnsetMetadataPassedError):  # accuracy does not request weights
            LogisticRegressionCV(**options).fit(X, y, sample_weight=weights, groups=groups)
        with pytest.raises(TypeError, match="not routed to any object"):
            LogisticRegressionCV(**options).fit(X, y, unknown=groups, groups=groups)


@requires_scikit_learn_1_9
def test_cross_validation_keeps_the_order_of_cs_and_takes_an_infinite_c():
    # scikit-learn keeps Cs in the order given (ours sorted them) and takes np.inf, its
    # replacement for penalty=None (ours refused it).
    from sklearn.datasets import make_classification

    X, y = make_classification(
        300, 4, n_informative=3, n_redundant=0, n_classes=3, flip_y=0.2, random_state=0
    )
    Cs = [10.0, np.inf, 0.01, 1.0]
    options = dict(
        Cs=Cs,
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="neg_log_loss",
        use_legacy_attributes=False,
    )
    theirs = SklearnLogisticRegressionCV(solver="newton-cg", tol=1e-10, **options).fit(X, y)
    ours = LogisticRegressionCV(**options).fit(X, y)
    np.testing.assert_array_equal(ours.Cs_, Cs)
    np.testing.assert_allclose(ours.scores_, theirs.scores_, rtol=1e-6)
    assert ours.C_ == theirs.C_
    finite = np.isfinite(Cs)  # without a penalty the multinomial coefficients are unique only
    np.testing.assert_allclose(  # up to a shift over the classes
        ours.coefs_paths_[:, :, finite], theirs.coefs_paths_[:, :, finite], rtol=1e-5, atol=1e-8
    )
    assert ours.n_iter_.shape == theirs.n_iter_.shape == (3, 1, 4)
    with pytest.raises(ValueError, match="Cs must be > 0"):
        LogisticRegressionCV(Cs=[1.0, np.nan]).fit(X, y)


def test_cross_validation_warnings_point_at_the_callers_line(iris):
    # The refit's ConvergenceWarning was attributed to a line of xentropy_jax/sklearn.py.
    X, y = iris
    with pytest.warns(ConvergenceWarning) as record:
        LogisticRegressionCV(Cs=[1.0], cv=3, max_iter=1).fit(X, y)
    refits = [w for w in record if "LogisticRegression (" in str(w.message)]
    assert refits and all(w.filename == __file__ for w in record)


def test_float32_cross_validation_centres_columns_of_large_mean():
    # The refit centred a float32 column c + z beside the intercept (`centred_input`), but the
    # splits' paths, vmapped over traced l2 values, were compiled as possibly unpenalised and
    # left it: their coefficients at C = 1e3 were 4.1e-4 (of the largest) from the float64
    # fits' of the same data (raw wine: held-out log-losses 5.7e-4 apart, 2.4e-4 centred).
    rng = np.random.default_rng(0)
    base = rng.normal(size=(600, 5))
    y = np.argmax(base @ rng.normal(size=(5, 3)) + rng.gumbel(size=(600, 3)), axis=1)
    base[:, 3] += 1e4
    X = base.astype(np.float32)
    options = dict(Cs=[1.0, 1e3], cv=3, scoring="neg_log_loss", tol=1e-8)
    exact = LogisticRegressionCV(**options).fit(X.astype(np.float64), y).coefs_paths_
    with jax.enable_x64(False):
        fitted = LogisticRegressionCV(**options).fit(X, y).coefs_paths_
    assert np.abs(fitted - exact).max() < 1e-5 * np.abs(exact).max()
