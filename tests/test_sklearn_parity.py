"""The estimator reaches scikit-learn's optimum and statsmodels' maximum likelihood."""

import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn import datasets  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from xentropy_jax.sklearn import LogisticRegression  # noqa: E402

SOLVERS = ["newton", "newton-cg", "trust-region"]
PROBA_ATOL = 1e-6
COEF_RTOL = 1e-5


def _load(name):
    loader = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[name]
    X, y = loader(return_X_y=True)
    if name == "digits":  # a subset keeps the test quick; K = 10, d = 64
        X, y = X[::3], y[::3]
    return StandardScaler().fit_transform(X), y


DATASETS = {name: _load(name) for name in ["iris", "wine", "breast_cancer", "digits"]}


_REFERENCES = {}


def _reference(X, y, sample_weight=None, **params):
    """scikit-learn's newton-cholesky, run far past its defaults; it must converge."""
    key = (X.tobytes(), y.tobytes(), None if sample_weight is None else sample_weight.tobytes())
    key += tuple(sorted((name, repr(value)) for name, value in params.items()))
    if key not in _REFERENCES:
        _REFERENCES[key] = _fit_reference(X, y, sample_weight, **params)
    return _REFERENCES[key]


def _fit_reference(X, y, sample_weight, **params):
    reference = SklearnLogisticRegression(solver="newton-cholesky", tol=1e-12, max_iter=500)
    reference.set_params(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        reference.fit(X, y, sample_weight=sample_weight)
    assert reference.n_iter_[0] < 500
    return reference


def _assert_same_model(ours, reference, X):
    assert ours.coef_.shape == reference.coef_.shape
    scale = np.max(np.abs(reference.coef_))
    np.testing.assert_allclose(ours.coef_, reference.coef_, rtol=COEF_RTOL, atol=COEF_RTOL * scale)
    np.testing.assert_allclose(
        ours.intercept_, reference.intercept_, rtol=COEF_RTOL, atol=COEF_RTOL * scale
    )
    np.testing.assert_allclose(ours.predict_proba(X), reference.predict_proba(X), atol=PROBA_ATOL)
    np.testing.assert_array_equal(ours.classes_, reference.classes_)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name", list(DATASETS))
def test_same_optimum_as_scikit_learn(name, solver):
    X, y = DATASETS[name]
    ours = LogisticRegression(C=0.5, solver=solver).fit(X, y)
    assert ours.n_iter_[0] >= 1
    _assert_same_model(ours, _reference(X, y, C=0.5), X)


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_optimum_with_sample_and_class_weights(solver):
    X, y = DATASETS["wine"]
    sample_weight = np.random.default_rng(0).uniform(0.2, 3.0, size=y.size)
    params = dict(C=2.0, class_weight="balanced")
    ours = LogisticRegression(solver=solver, **params).fit(X, y, sample_weight=sample_weight)
    _assert_same_model(ours, _reference(X, y, sample_weight, **params), X)

    X, y = DATASETS["breast_cancer"]
    params = dict(C=0.1, class_weight={0: 3.0, 1: 0.5})
    ours = LogisticRegression(solver=solver, **params).fit(X, y)
    _assert_same_model(ours, _reference(X, y, **params), X)


@pytest.mark.parametrize("solver", SOLVERS)
def test_same_optimum_without_intercept(solver):
    X, y = DATASETS["iris"]
    ours = LogisticRegression(solver=solver, fit_intercept=False).fit(X, y)
    np.testing.assert_array_equal(ours.intercept_, 0.0)
    _assert_same_model(ours, _reference(X, y, fit_intercept=False), X)


def _noisy_problem(n_classes, n_samples=400, n_features=3, seed=0):
    """Labels drawn from a softmax model: classes overlap, so the likelihood has a maximum."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_samples, n_features))
    logits = X @ rng.normal(size=(n_features, n_classes)) + rng.normal(size=n_classes)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    y = (rng.uniform(size=(n_samples, 1)) > np.cumsum(probs, axis=1)).sum(axis=1)
    return X, y


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n_classes", [2, 4])
def test_unpenalised_fit_is_statsmodels_maximum_likelihood(n_classes, solver):
    sm = pytest.importorskip("statsmodels.api")
    X, y = _noisy_problem(n_classes)
    ours = LogisticRegression(penalty=None, solver=solver).fit(X, y)

    mnlogit = sm.MNLogit(y, sm.add_constant(X)).fit(method="newton", maxiter=100, disp=0)
    assert mnlogit.mle_retvals["converged"]
    log_proba = ours.predict_log_proba(X)
    log_likelihood = log_proba[np.arange(y.size), y].sum()
    np.testing.assert_allclose(log_likelihood, mnlogit.llf, rtol=1e-10)
    np.testing.assert_allclose(
        ours.predict_proba(X), mnlogit.predict(sm.add_constant(X)), atol=1e-7
    )

    # statsmodels reports class k's parameters minus class 0's (rows: constant, features).
    coef = np.vstack([np.zeros((1, X.shape[1])), ours.coef_]) if n_classes == 2 else ours.coef_
    intercept = np.r_[0.0, ours.intercept_] if n_classes == 2 else ours.intercept_
    relative = np.vstack([intercept[1:] - intercept[0], (coef[1:] - coef[0]).T])
    np.testing.assert_allclose(relative, mnlogit.params, rtol=COEF_RTOL)

    # And scikit-learn's convention for the unpenalised fit (C=inf): coefficients centred.
    _assert_same_model(ours, _reference(X, y, C=np.inf), X)
