"""The three solvers against scikit-learn and statsmodels, and their statuses, jit and vmap."""

import copy
import functools
import os
import pickle
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from _fresh import json_report
from sklearn.datasets import load_iris, make_classification
from sklearn.linear_model import LogisticRegression

from xentropy_jax import _linear, fit_logistic_regression_streamed
from xentropy_jax.solvers import (
    CollinearityWarning,
    FitError,
    Newton,
    NewtonCG,
    Status,
    TrustRegion,
    _floor,
    fit_logistic_regression,
    fit_regularization_path,
)
from xentropy_jax.solvers import _fit as fit_module

SOLVERS = ["newton", "newton-cg", "trust-region"]


@pytest.fixture(scope="module")
def multiclass():
    features, labels = make_classification(
        n_samples=300, n_features=6, n_informative=4, n_classes=3, random_state=0
    )
    sample_weight = np.random.default_rng(0).uniform(0.2, 2.0, labels.shape[0])
    return features, labels, sample_weight


def sklearn_fit(features, labels, sample_weight, C):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=1000)
        return model.fit(features, labels, sample_weight=sample_weight)


@pytest.mark.parametrize("solver", SOLVERS)
def test_multinomial_matches_sklearn(multiclass, solver):
    features, labels, sample_weight = multiclass
    C = 0.7
    reference = sklearn_fit(features, labels, sample_weight, C)
    result = fit_logistic_regression(
        features,
        labels,
        3,
        sample_weight=sample_weight,
        l2=1 / (C * sample_weight.sum()),
        solver=solver,
        tol=1e-10,
    )
    weights, intercept = result.params
    assert result.status == Status.CONVERGED and bool(result.converged)
    assert float(result.grad_norm) <= 1e-10
    np.testing.assert_allclose(weights.T, reference.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(intercept, reference.intercept_, rtol=1e-6, atol=1e-8)
    probs = jax.nn.softmax(features @ weights + intercept[None, :])
    np.testing.assert_allclose(probs, reference.predict_proba(features), atol=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_binary_reference_class_is_sklearn_binomial(solver):
    features, labels = load_iris(return_X_y=True)
    labels = (labels == 2).astype(int)
    sample_weight = np.linspace(0.5, 1.5, labels.shape[0])
    C = 2.0
    reference = sklearn_fit(features, labels, sample_weight, C)
    result = fit_logistic_regression(
        features,
        labels,
        2,
        sample_weight=sample_weight,
        l2=1 / (C * sample_weight.sum()),
        reference_class=True,
        solver=solver,
        tol=1e-10,
    )
    weights, intercept = result.params
    assert result.status == Status.CONVERGED
    np.testing.assert_array_equal(weights[:, 0], 0)
    np.testing.assert_array_equal(intercept[0], 0)
    np.testing.assert_allclose(weights[:, 1], reference.coef_[0], rtol=1e-6)
    np.testing.assert_allclose(intercept[1], reference.intercept_[0], rtol=1e-6)


@pytest.fixture(scope="module")
def overlapping():
    # Overlapping classes: the unpenalised maximum-likelihood estimate exists.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 3))
    logits = features @ np.array([[0.0, 1.0, -0.5], [0.0, -0.7, 0.4], [0.0, 0.3, 0.9]])
    logits = logits + np.array([0.0, 0.2, -0.3])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    return features, labels


@pytest.mark.parametrize("solver", SOLVERS)
def test_unpenalised_reference_class_matches_statsmodels(overlapping, solver):
    statsmodels = pytest.importorskip("statsmodels.api")
    features, labels = overlapping
    model = statsmodels.MNLogit(labels, statsmodels.add_constant(features))
    expected = model.fit(method="newton", tol=1e-12, maxiter=100, disp=False).params
    result = fit_logistic_regression(
        features,
        labels,
        3,
        sample_weight=np.ones(labels.shape[0]),
        reference_class=True,
        solver=solver,
        tol=1e-10,
    )
    weights, intercept = result.params
    assert result.status == Status.CONVERGED
    np.testing.assert_allclose(intercept[1:], expected[0], rtol=1e-6)
    np.testing.assert_allclose(weights[:, 1:], expected[1:], rtol=1e-6)


def test_unpenalised_without_reference_class_reaches_the_same_likelihood(overlapping):
    # The Hessian is singular (every class shift is free); the explicit Newton step removes the
    # known null space exactly, and the result is reported in the symmetric parametrisation.
    features, labels = overlapping
    sample_weight = np.ones(labels.shape[0])
    free = fit_logistic_regression(
        features, labels, 3, sample_weight=sample_weight, solver="newton", tol=1e-10
    )
    anchored = fit_logistic_regression(
        features, labels, 3, sample_weight=sample_weight, reference_class=True, tol=1e-10
    )
    assert free.status == Status.CONVERGED
    np.testing.assert_allclose(free.loss, anchored.loss, rtol=1e-12)
    weights, intercept = free.params
    np.testing.assert_allclose(jnp.sum(weights, axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(jnp.sum(intercept), 0, atol=1e-12)
    np.testing.assert_allclose(
        jax.nn.softmax(features @ weights + intercept[None, :]),
        jax.nn.softmax(features @ anchored.params[0] + anchored.params[1][None, :]),
        atol=1e-9,
    )


def test_an_l2_that_rounds_to_zero_is_fitted_as_no_penalty():
    # 1e-50 is 0 in float32: the fit compiled as penalised (l2 > 0 in Python) ran l2 = 0 and
    # reported CONVERGED on separable data, and the collinearity warning was skipped; so was
    # the streamed fit's. They now hold for the l2 that the fit runs.
    rng = np.random.default_rng(2)
    features = rng.normal(size=(60, 2)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    for fit in (fit_logistic_regression, fit_logistic_regression_streamed):
        result = fit(features, labels, 2, l2=1e-50, throw=False)
        assert result.status == Status.DIVERGED
        collinear = np.c_[features, features[:, :1]]
        with pytest.warns(CollinearityWarning, match=r"columns \[0, 2\]"):
            fit(collinear, rng.integers(0, 3, 60), 3, l2=1e-50, throw=False)
    path = fit_regularization_path(features, labels, 2, [1e-50], throw=False)
    assert path.status[0] == Status.DIVERGED


@pytest.mark.parametrize("solver", SOLVERS)
def test_separable_data_without_penalty_reports_divergence(solver):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(60, 2))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    result = fit_logistic_regression(
        features,
        labels,
        2,
        sample_weight=np.ones(60),
        reference_class=True,
        solver=solver,
        throw=False,
    )
    assert result.status == Status.DIVERGED and not bool(result.converged)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in result.params)
    assert np.isfinite(float(result.loss))
    with pytest.raises(FitError, match="separable") as info:
        fit_logistic_regression(
            features, labels, 2, sample_weight=np.ones(60), reference_class=True, solver=solver
        )
    assert info.value.result.status == Status.DIVERGED
    # It survives pickling (a worker process sends it to its parent) and copying, whole: it
    # was rebuilt from its message, which failed.
    for again in (pickle.loads(pickle.dumps(info.value)), copy.copy(info.value)):
        assert type(again) is FitError and str(again) == str(info.value)
        assert int(again.result.status) == Status.DIVERGED
    # The same data with a penalty have a unique optimum.
    penalised = fit_logistic_regression(
        features,
        labels,
        2,
        sample_weight=np.ones(60),
        l2=1e-2,
        reference_class=True,
        solver=solver,
    )
    assert penalised.status == Status.CONVERGED


def test_non_finite_values_are_reported_inside_jit():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(30, 3))
    features[4, 1] = np.nan
    labels = rng.integers(0, 3, 30)
    fit = jax.jit(
        lambda x: fit_logistic_regression(x, labels, 3, sample_weight=np.ones(30), l2=0.1)
    )
    result = fit(features)
    assert result.status == Status.NON_FINITE and not bool(result.converged)
    with pytest.raises(ValueError, match="NaN"):
        fit_logistic_regression(features, labels, 3, l2=0.1)


def test_iteration_limit_is_reported(multiclass):
    features, labels, sample_weight = multiclass
    result = fit_logistic_regression(
        features, labels, 3, sample_weight=sample_weight, l2=1e-3, max_iter=1, throw=False
    )
    assert result.status == Status.MAX_ITER and int(result.n_iter) == 1
    with pytest.raises(FitError, match="MAX_ITER"):
        fit_logistic_regression(
            features, labels, 3, sample_weight=sample_weight, l2=1e-3, max_iter=1
        )
    assert "max_iter" in Status.message(Status.MAX_ITER)


def test_warm_start_at_the_optimum_stops_at_once(multiclass):
    features, labels, sample_weight = multiclass
    kwargs = dict(sample_weight=sample_weight, l2=1e-2, tol=1e-10)
    cold = fit_logistic_regression(features, labels, 3, **kwargs)
    warm = fit_logistic_regression(features, labels, 3, init=cold.params, **kwargs)
    assert int(warm.n_iter) == 1 and warm.status == Status.CONVERGED
    np.testing.assert_allclose(warm.params[0], cold.params[0], atol=1e-10)


def test_repeat_calls_do_not_recompile(multiclass):
    features, labels, sample_weight = multiclass
    kwargs = dict(sample_weight=sample_weight, solver="trust-region", tol=1e-9)
    fit_logistic_regression(features, labels, 3, l2=1e-2, **kwargs)
    size = fit_module._fit._cache_size()
    rng = np.random.default_rng(4)
    # NumPy scalars and 0-d arrays as well as floats (np.float32 and jnp arrays compiled again).
    for l2 in (1e-3, 0.1, np.float32(0.05), np.float64(0.2), jnp.asarray(0.3)):
        fit_logistic_regression(
            features + rng.normal(size=features.shape), labels, 3, l2=l2, **kwargs
        )
    fit_logistic_regression(
        features,
        labels,
        3,
        l2=1e-2,
        max_iter=50,
        tol=1e-7,
        **{k: v for k, v in kwargs.items() if k != "tol"},
    )
    assert fit_module._fit._cache_size() == size


def test_core_traces_once_per_shape():
    # chex counts traces of the uncompiled core: new data, l2, tol and max_iter reuse it.
    core = jax.jit(
        chex.assert_max_traces(fit_module._fit.__wrapped__, n=1),
        static_argnames=fit_module.FIT_STATIC_ARGNAMES,
    )
    rng = np.random.default_rng(5)
    static = dict(
        num_classes=3,
        fit_intercept=True,
        reference_class=False,
        penalised=False,
        checked=False,
        solver=NewtonCG(),
        verbose=False,
    )
    for seed, l2 in ((0, 0.1), (1, 0.01)):
        rng = np.random.default_rng(seed)
        features, labels = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
        result = core(features, labels, np.ones(50), l2, None, 1e-8, 100, **static)
        assert result.status == Status.CONVERGED


@pytest.mark.parametrize("solver", SOLVERS)
def test_known_penalty_and_checked_input_leave_their_parts_out(multiclass, solver):
    """A concrete l2 > 0 and concrete input build a smaller program with the same fit.

    The unpenalised-only parts (separation certificate, minimum-norm `lax.cond`) and the
    in-jit input status are left out; a traced l2 (here under `jit`) keeps them.
    """
    features, labels, sample_weight = multiclass
    args = (features, labels, sample_weight, 0.05, None, 1e-10, 100)
    lean = dict(
        num_classes=3,
        fit_intercept=True,
        reference_class=False,
        solver=fit_module._resolve_solver(solver),
    )
    lean_text = fit_module._fit.lower(
        *args, **lean, penalised=True, checked=True, verbose=False
    ).as_text()
    general_text = fit_module._fit.lower(
        *args, **lean, penalised=False, checked=False, verbose=False
    ).as_text()
    # The minimum-norm projection's `lax.cond` is gone (solvers keep their own conds).
    assert lean_text.count("stablehlo.case") < general_text.count("stablehlo.case")
    assert len(lean_text) < 0.9 * len(general_text)
    direct = fit_logistic_regression(
        features, labels, 3, sample_weight=sample_weight, l2=0.05, solver=solver, tol=1e-10
    )
    traced = jax.jit(
        lambda l2: fit_logistic_regression(
            features, labels, 3, sample_weight=sample_weight, l2=l2, solver=solver, tol=1e-10
        )
    )(0.05)
    assert direct.status == traced.status == Status.CONVERGED
    # Both stop at |g| <= 1e-10: the optimum is determined to about tol / l2 = 2e-9.
    for ours, general in zip(direct.params, traced.params, strict=True):
        np.testing.assert_allclose(ours, general, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS)
def test_vmap_over_a_grid_of_penalties(multiclass, solver):
    features, labels, sample_weight = multiclass
    grid = jnp.asarray([1e-3, 1e-2, 1e-1])
    batched = jax.vmap(
        lambda l2: fit_logistic_regression(
            features, labels, 3, sample_weight=sample_weight, l2=l2, solver=solver, tol=1e-10
        )
    )(grid)
    assert batched.params[0].shape == (3, 6, 3)
    assert np.all(np.asarray(batched.status) == Status.CONVERGED)
    for index, l2 in enumerate(np.asarray(grid)):
        single = fit_logistic_regression(
            features,
            labels,
            3,
            sample_weight=sample_weight,
            l2=float(l2),
            solver=solver,
            tol=1e-10,
        )
        np.testing.assert_allclose(batched.params[0][index], single.params[0], atol=1e-9)
        np.testing.assert_allclose(batched.loss[index], single.loss, rtol=1e-12)


def test_float32_traced_penalty_fits_as_a_concrete_one():
    # A traced l2 (a vmapped grid, or a jit argument) might be 0, so it gets the program that
    # allows l2 = 0; the preconditioner's basis must still follow l2 > 0 at run time. With
    # the scaled basis kept, these float32 fits on digits / 16 stopped with LINE_SEARCH_FAILED
    # at l2 = 1e-2 and 1e-1 after 19-27 iterations, where a concrete l2 takes 5-8.
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    features = jnp.asarray(features / 16.0, jnp.float32)
    labels = jnp.asarray(labels)
    grid = [1e-3, 1e-2, 1e-1]

    def fit(l2):
        return fit_logistic_regression(features, labels, 10, l2=l2, throw=False)

    batched = jax.vmap(fit)(jnp.asarray(grid, jnp.float32))
    compiled = jax.jit(fit)
    for index, l2 in enumerate(grid):
        single = fit(l2)
        traced = compiled(jnp.float32(l2))
        assert single.status == Status.CONVERGED
        for result in (traced, jax.tree.map(lambda leaf, i=index: leaf[i], batched)):
            assert result.status == Status.CONVERGED
            assert int(result.n_iter) <= int(single.n_iter) + 1
            np.testing.assert_allclose(result.loss, single.loss, rtol=1e-6)


@pytest.mark.parametrize("solver", ["newton-cg", "trust-region"])
def test_float32_fits_on_raw_columns_of_very_different_scales(solver):
    # scikit-learn's breast cancer data as it comes (columns from 1e-3 to 4e3), float32: with
    # l2 below eps·trace(A)/2 the Kronecker preconditioner's basis is the scaled one, and its
    # diagonal stand-in for the penalty stopped these fits with LINE_SEARCH_FAILED or
    # MAX_ITER after 1,300 to 5,800 Hessian products; Newton converges in 8 iterations.
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    grid = [1e-3, 1e-2, 1e-1]
    single = [
        fit_logistic_regression(
            features.astype(np.float32), labels, 2, l2=l2, solver=solver, throw=False
        )
        for l2 in grid
    ]
    batched = jax.vmap(
        lambda l2: fit_logistic_regression(
            jnp.asarray(features, jnp.float32), labels, 2, l2=l2, solver=solver, throw=False
        )
    )(jnp.asarray(grid, jnp.float32))
    # The path (strongest penalty first, as it fits them) takes the same blocks at each value.
    path = fit_regularization_path(
        features.astype(np.float32), labels, 2, grid[::-1], solver=solver, throw=False
    )
    for index, l2 in enumerate(grid):
        reference = fit_logistic_regression(features, labels, 2, l2=l2, tol=1e-10)
        position = len(grid) - 1 - index
        along = jax.tree.map(lambda leaf, i=position: leaf[i], path)
        for result in (single[index], jax.tree.map(lambda leaf, i=index: leaf[i], batched), along):
            assert result.status == Status.CONVERGED
            assert int(result.n_hessian_products) <= 200
            np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-6)


def test_fit_inside_jit_that_closes_over_device_arrays(multiclass):
    # X as a concrete jax array captured by the caller's jit: the boundary checks still run
    # on it (they must not turn into tracers there), and the collinearity warning still comes.
    features, labels, _ = multiclass
    features, labels = jnp.asarray(features), jnp.asarray(labels)
    direct = fit_logistic_regression(features, labels, 3, l2=0.05, tol=1e-10)
    traced = jax.jit(
        lambda l2: fit_logistic_regression(features, labels, 3, l2=l2, tol=1e-10).loss
    )(0.05)
    np.testing.assert_allclose(traced, direct.loss, rtol=1e-12)
    # make_classification's two redundant columns make X collinear: with l2 = 0 it warns.
    with pytest.warns(CollinearityWarning) as eager:
        unpenalised = fit_logistic_regression(features, labels, 3, tol=1e-10)
    with pytest.warns(CollinearityWarning) as inside:
        loss = jax.jit(lambda: fit_logistic_regression(features, labels, 3, tol=1e-10).loss)()
    assert str(inside[0].message) == str(eager[0].message)
    np.testing.assert_allclose(loss, unpenalised.loss, rtol=1e-10)
    bad = features.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN"):
        jax.jit(lambda: fit_logistic_regression(bad, labels, 3).loss)()


def test_float32_fit_is_float32_and_accurate(multiclass):
    features, labels, sample_weight = multiclass
    C = 0.7
    reference = sklearn_fit(features, labels, sample_weight, C)
    result = fit_logistic_regression(
        features.astype(np.float32),
        labels,
        3,
        sample_weight=sample_weight,
        l2=1 / (C * sample_weight.sum()),
        tol=1e-5,
    )
    assert result.params[0].dtype == jnp.float32 and result.loss.dtype == jnp.float32
    np.testing.assert_allclose(result.params[0].T, reference.coef_, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("solver", ["newton", "newton-cg", "trust-region"])
def test_float32_strong_penalty_with_an_intercept_converges(solver):
    # θ + tΔ rounds entry by entry, and the rounding drifted W off its centred subspace (a
    # common shift of the classes), where no direction corrects it; the penalty turned the
    # drift into a gradient of 3.2e-7 above the tolerance of 7e-8, and the CG solvers stopped
    # LINE_SEARCH_FAILED (a FitError by default) on a right answer. θ is now kept centred.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(120, 3))
    labels = np.argmax(features @ rng.normal(size=(3, 3)) + rng.gumbel(size=(120, 3)), axis=1)
    features = 0.1 * features
    expected = fit_logistic_regression(features, labels, 3, l2=100.0, tol=1e-12)
    result = fit_logistic_regression(
        features.astype(np.float32), labels, 3, l2=100.0, solver=solver
    )
    assert int(result.status) == Status.CONVERGED
    np.testing.assert_allclose(result.params[0], expected.params[0], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(result.params[1], expected.params[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trust_region_warm_started_at_the_optimum_converges(multiclass, dtype):
    # Its first step from an optimum is rejected (the decrease is rounding), and the decrement
    # of the last accepted step (inf at first) was kept: LINE_SEARCH_FAILED, a FitError.
    features, labels, sample_weight = multiclass
    features = features.astype(dtype)
    first = fit_logistic_regression(features, labels, 3, l2=0.1, solver="trust-region")
    again = fit_logistic_regression(
        features, labels, 3, l2=0.1, solver="trust-region", init=first.params
    )
    assert int(again.status) == Status.CONVERGED and int(again.n_iter) == 1
    np.testing.assert_allclose(again.loss, first.loss, rtol=4 * np.finfo(dtype).eps)


def test_no_intercept(multiclass):
    features, labels, sample_weight = multiclass
    C = 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = LogisticRegression(
            C=C, fit_intercept=False, solver="newton-cholesky", tol=1e-12
        ).fit(features, labels, sample_weight=sample_weight)
    result = fit_logistic_regression(
        features,
        labels,
        3,
        sample_weight=sample_weight,
        l2=1 / (C * sample_weight.sum()),
        fit_intercept=False,
        tol=1e-10,
    )
    np.testing.assert_array_equal(result.params[1], 0)
    np.testing.assert_allclose(result.params[0].T, reference.coef_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(labels=np.array([0, 1, 3, 1])), ValueError, "labels must lie"),
        (dict(labels=np.array([0.0, 1.0, 2.0, 1.0])), TypeError, "integers"),
        (dict(sample_weight=np.array([1.0, -1.0, 1.0, 1.0])), ValueError, ">= 0"),
        (dict(sample_weight=np.ones(3)), ValueError, "shape"),
        (dict(l2=-1.0), ValueError, "l2"),
        (dict(solver="lbfgs"), ValueError, "solver"),
        (dict(num_classes=1), ValueError, "num_classes"),
        (dict(init=(np.zeros((3, 3)), np.zeros(3))), ValueError, "init"),
        (dict(X=np.zeros((4, 0))), ValueError, "no feature columns"),
        (dict(l2=np.array([0.1, 0.2])), ValueError, "l2 must be a scalar"),
        (dict(max_iter=-1), ValueError, "max_iter must be an integer in"),
        (dict(max_iter=2**31), ValueError, "max_iter must be an integer in"),
        (dict(tol=np.nan), ValueError, "tol must be a non-negative scalar"),
    ],
)
def test_bad_input_is_rejected_before_compiling(kwargs, error, match):
    arguments = dict(
        X=np.arange(8.0).reshape(4, 2), labels=np.array([0, 1, 2, 1]), num_classes=3, l2=0.1
    )
    arguments.update(kwargs)
    size = fit_module._fit._cache_size()
    with pytest.raises(error, match=match):
        fit_logistic_regression(**arguments)
    assert fit_module._fit._cache_size() == size


def test_solver_configurations_are_validated_and_hashable():
    with pytest.raises(ValueError, match="max_cg_iter"):
        NewtonCG(max_cg_iter=0)
    # On construction, as the docstring says (2.5 failed only inside the fit; NaN passed).
    with pytest.raises(ValueError, match="max_cg_iter must be an integer"):
        NewtonCG(max_cg_iter=2.5)
    with pytest.raises(ValueError, match="forcing_exponent must be finite"):
        TrustRegion(forcing_exponent=float("nan"))
    with pytest.raises(ValueError, match="preconditioner_mix"):
        TrustRegion(preconditioner_mix=0.0)
    with pytest.raises(ValueError, match="sufficient_decrease"):
        Newton(sufficient_decrease=0.7)
    assert hash(NewtonCG()) == hash(NewtonCG()) and NewtonCG() != NewtonCG(max_cg_iter=10)


def test_objective_value_is_reported(multiclass):
    features, labels, sample_weight = multiclass
    result = fit_logistic_regression(features, labels, 3, sample_weight=sample_weight, l2=0.05)
    objective = _linear.logistic_objective(
        features, labels, 3, sample_weight=sample_weight, l2=0.05
    )
    theta = objective.restrict(*result.params)
    np.testing.assert_allclose(result.loss, objective.value(theta), rtol=1e-12)


# The fields issue 5 asks for, in order; the solver's diagnostics may sit between them.
VERBOSE_FIELDS = {
    "newton": ["iter", "loss", "max|g|", "step", "time"],
    "newton-cg": ["iter", "loss", "max|g|", "cg", "step", "time"],
    "trust-region": ["iter", "loss", "max|g|", "cg", "radius", "time"],
}


def _parse_progress(line):
    tokens = line.split()
    assert len(tokens) % 2 == 0, line
    return list(zip(tokens[::2], tokens[1::2], strict=True))


@pytest.mark.parametrize("solver", SOLVERS)
def test_verbose_prints_one_timed_line_per_iteration(capsys, solver):
    rng = np.random.default_rng(6)
    features, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    result = fit_logistic_regression(features, labels, 3, l2=0.1, solver=solver, verbose=True)
    jax.effects_barrier()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == int(result.n_iter) + 1
    times, inner_products = [], 0
    for iteration, line in enumerate(lines):
        pairs = _parse_progress(line)
        names = [name for name, _ in pairs]
        expected = VERBOSE_FIELDS[solver] if iteration else ["iter", "loss", "max|g|", "time"]
        assert [name for name in names if name in expected] == expected, line
        assert names[-1] == "time", line
        values = dict(pairs)
        assert int(values["iter"]) == iteration
        assert values["time"].endswith("s")
        times.append(float(values["time"][:-1]))
        inner_products += int(values.get("cg", 0))
    assert times[0] == 0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    last = dict(_parse_progress(lines[-1]))
    np.testing.assert_allclose(float(last["loss"]), result.loss, rtol=1e-11)
    np.testing.assert_allclose(float(last["max|g|"]), result.grad_norm, rtol=1e-3)
    if solver != "newton":
        assert inner_products == int(result.n_hessian_products)


def test_verbose_under_vmap_prints_each_member_until_it_stops(capsys):
    # The loop runs while any member runs; a member that has stopped printed a line per extra
    # iteration of its frozen state.
    rng = np.random.default_rng(6)
    features, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    fit = jax.vmap(
        lambda l2: fit_logistic_regression(features, labels, 3, l2=l2, verbose=True),
    )
    result = fit(jnp.array([-1.0, 1e-3]))  # the first member stops at once: INVALID_L2
    jax.effects_barrier()
    lines = capsys.readouterr().out.strip().splitlines()
    assert list(result.n_iter) == [0, 6]
    assert [int(line.split()[1]) for line in lines] == [0, 0, 1, 2, 3, 4, 5, 6]


def test_host_callbacks_only_when_verbose():
    features, labels = np.zeros((5, 2)), np.arange(5) % 3
    static = dict(
        num_classes=3, fit_intercept=True, reference_class=False, penalised=False, checked=False
    )
    for solver in (Newton(), NewtonCG(), TrustRegion()):
        for verbose in (False, True):
            lowered = fit_module._fit.lower(
                features,
                labels,
                None,
                0.1,
                None,
                1e-8,
                100,
                solver=solver,
                verbose=verbose,
                **static,
            )
            assert ("callback" in lowered.as_text()) == verbose


# --- Collinear features without a penalty ----------------------------------------------------

CONFIGURATIONS = {
    "newton": Newton(),
    "newton-cg kronecker": NewtonCG(),
    "newton-cg diagonal": NewtonCG(preconditioner="diagonal"),
    "trust-region kronecker": TrustRegion(),
    "trust-region diagonal": TrustRegion(preconditioner="diagonal"),
}


def _collinear_problems():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 240)
    base = rng.normal(size=(240, 8)) + 0.3 * labels[:, None]
    repeated = np.hstack([base, base[:, :1]])  # column 8 repeats column 0
    groups = rng.integers(0, 3, 240)
    dummies = np.hstack([base[:, :4], np.eye(3)[groups]])  # dummies sum to the intercept
    return {
        "repeated column": (repeated, labels, [8], [0, 8]),
        "dummies and intercept": (dummies, labels, [6], [4, 5, 6, "intercept"]),
    }


def _minimum_norm_reference(features, labels, dropped, reference_class):
    """The optimum from the independent columns, lifted and projected as a pseudo-inverse."""
    keep = [j for j in range(features.shape[1]) if j not in dropped]
    reduced = fit_logistic_regression(
        features[:, keep], labels, 4, reference_class=reference_class, solver="newton", tol=1e-12
    )
    weights = np.zeros((features.shape[1], 4))
    weights[keep] = np.asarray(reduced.params[0])
    theta = np.vstack([weights, np.asarray(reduced.params[1])])  # [d̃, K]
    design = np.hstack([features, np.ones((features.shape[0], 1))])
    projector = np.linalg.pinv(design) @ design  # onto the row space: kills null(X̃)
    theta = projector @ theta
    if not reference_class:
        theta = theta - theta.mean(axis=1, keepdims=True)
    return float(reduced.loss), theta


@pytest.mark.parametrize(
    "problem, name, reference_class",
    [
        (problem, name, False)
        for problem in ("repeated column", "dummies and intercept")
        for name in CONFIGURATIONS
    ]
    + [("dummies and intercept", "newton-cg kronecker", True), ("repeated column", "newton", True)],
)
def test_collinear_unpenalised_fit_is_the_minimum_norm_optimum(problem, name, reference_class):
    features, labels, dropped, named = _collinear_problems()[problem]
    loss, theta = _minimum_norm_reference(features, labels, dropped, reference_class)
    with pytest.warns(CollinearityWarning) as record:
        result = fit_logistic_regression(
            features,
            labels,
            4,
            reference_class=reference_class,
            solver=CONFIGURATIONS[name],
            tol=1e-10,
        )
    assert result.status == Status.CONVERGED
    assert abs(float(result.loss) - loss) <= 1e-10 * loss
    fitted = np.vstack([np.asarray(result.params[0]), np.asarray(result.params[1])])
    if reference_class:
        fitted = fitted - fitted[:, :1]
        theta = theta - theta[:, :1]
    np.testing.assert_allclose(fitted, theta, atol=1e-6)
    message = str(record[0].message)
    assert f"[{', '.join(map(str, named))}]" in message and "minimum-norm" in message


def test_nearly_collinear_columns_keep_the_optimum_the_fit_found():
    # The Gram resolves singular values only down to √(d̃·eps): in float32 columns x and
    # x + 1e-3·noise read as collinear, and the minimum-norm projection removed the component
    # along them, moving the returned params to an objective 0.9% above the CONVERGED loss.
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=400), rng.normal(size=400)
    features = np.c_[x, x + 1e-3 * rng.normal(size=400), z].astype(np.float32)
    logits = np.c_[0 * x, 2 * x + 300 * (features[:, 1] - features[:, 0]), z]
    labels = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)
    expected = fit_logistic_regression(features.astype(np.float64), labels, 3, l2=0.0, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollinearityWarning)
        result = fit_logistic_regression(features, labels, 3, l2=0.0, solver="newton")
    objective = _linear.logistic_objective(features.astype(np.float64), labels, 3)
    theta = objective.restrict(*(jnp.asarray(p, jnp.float64) for p in result.params))
    attained = float(objective.value(theta))
    np.testing.assert_allclose(attained, float(expected.loss), rtol=1e-6)
    np.testing.assert_allclose(float(result.loss), attained, rtol=1e-6)


# A dense fit that works in uncentred variables below float64 (`fits_centred`).
_UNCENTRED = NewtonCG(preconditioner="ekfac")


def _near_constant_column(seed: int, offset: float, spread: float):
    """300 rows of four N(0, 1) columns and offset + spread·z, z informative, labels of 3."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(300, 4))
    labels = np.argmax(base @ rng.normal(size=(4, 3)) + rng.gumbel(size=(300, 3)), axis=1)
    z = rng.normal(size=300)
    labels = np.where(rng.uniform(size=300) < 0.3, 2 * (z > 0), labels)
    return np.c_[base, offset + spread * z].astype(np.float32), labels


def _gap_to_float64_optimum(features, labels, result) -> float:
    exact = _linear.logistic_objective(np.asarray(features, np.float64), labels, 3)
    optimum = fit_logistic_regression(np.asarray(features, np.float64), labels, 3, tol=1e-12)
    theta = exact.restrict(*(jnp.asarray(p, jnp.float64) for p in result.params))
    return float(exact.value(theta)) - float(optimum.loss)


@pytest.mark.parametrize("offset, spread", [(7.0, 1e-3), (100.0, 1e-2), (1.0, 1e-4)])
def test_float32_near_constant_column_beside_the_intercept_reaches_the_optimum(offset, spread):
    # float32's Gram rounds the scaled eigenvalue of offset + spread·z beside the intercept,
    # (spread/offset)² ≤ 1e-8, to 0, and the Kronecker preconditioner dropped that direction:
    # Newton-CG and the trust region ended 3e-2 to 6e-2 above the optimum after 200 to 1,400
    # products, CONVERGED or LINE_SEARCH_FAILED. Its basis is the centred Gram's now, in the
    # streamed fit too (which ended MAX_ITER or LINE_SEARCH_FAILED as far above; it reaches
    # the optimum's objective now, but its float32 gradient test may still end MAX_ITER there).
    # `newton` factorised the uncentred Hessian and stopped CONVERGED up to 1.5e-4 above
    # (100 + 1e-2·z, seed 0); it factorises the centred one now, and the diagonal
    # preconditioner is the centred Hessian's diagonal.
    diagonal = NewtonCG(preconditioner="diagonal")
    for seed in (0, 1):
        features, labels = _near_constant_column(seed, offset, spread)
        for solver in ("newton-cg", "trust-region", "newton", diagonal):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CollinearityWarning)
                result = fit_logistic_regression(features, labels, 3, solver=solver, throw=False)
            gap = _gap_to_float64_optimum(features, labels, result)
            assert result.status == Status.CONVERGED and gap < 2e-6, (solver, seed, gap)
            assert int(result.n_hessian_products) <= 60
    features, labels = _near_constant_column(0, offset, spread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollinearityWarning)
        streamed = fit_logistic_regression_streamed(
            features, labels, 3, chunk_rows=128, throw=False
        )
    assert _gap_to_float64_optimum(features, labels, streamed) < 2e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_column_constant_but_for_one_ulp_is_not_centred(dtype):
    # 7 beside the intercept, five rows one ulp above: centred, a column of one-ulp steps that
    # the logits in θ cannot resolve (CG proposed |W| ≈ 1e5 with b ≈ −7·W, and the fits
    # stopped at W = 0, LINE_SEARCH_FAILED); `centring_shift` leaves it uncentred, and the CG
    # solvers reach the explicit Newton solver's optimum.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(500, 2))
    labels = np.argmax(base @ rng.normal(size=(2, 3)) + rng.gumbel(size=(500, 3)), axis=1)
    column = np.full(500, 7.0, dtype)
    column[:5] = np.nextafter(dtype(7), dtype(8))
    features = np.c_[base.astype(dtype), column]
    _, shift = _linear.logistic_objective(features, labels, 3).centred_feature_gram()
    assert float(shift[2]) == 0.0 and float(shift[0]) != 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollinearityWarning)
        newton = fit_logistic_regression(features, labels, 3, solver="newton", throw=False)
        for solver in ("newton-cg", "trust-region"):
            result = fit_logistic_regression(features, labels, 3, solver=solver, throw=False)
            assert result.status == Status.CONVERGED, solver
            np.testing.assert_allclose(float(result.loss), float(newton.loss), rtol=1e-6)


@pytest.mark.parametrize("l2", [1e-4, 1e-2])
def test_float32_penalised_columns_of_large_mean_converge(l2):
    # Two float32 columns of mean 1e4: with l2 > 0 the class blocks of the centred basis had
    # the L2 term l2·CᵀC, whose μ·μᵀ (1e8) broke their Cholesky factorisation (NaN), and CG
    # stopped at once at W = 0 (LINE_SEARCH_FAILED). The term is the penalty's own l2·P now.
    rng = np.random.default_rng(1)
    base = rng.normal(size=(500, 3))
    labels = np.argmax(base @ rng.normal(size=(3, 3)) + rng.gumbel(size=(500, 3)), axis=1)
    features = (base + np.array([1e4, 0.0, 1e4])).astype(np.float32)
    exact = _linear.logistic_objective(features.astype(np.float64), labels, 3, l2=l2)
    centred = features.astype(np.float64) - features.astype(np.float64).mean(axis=0)
    optimum = fit_logistic_regression(centred, labels, 3, l2=l2, tol=1e-12)
    for solver in ("newton-cg", "trust-region"):
        result = fit_logistic_regression(features, labels, 3, l2=l2, solver=solver)
        theta = exact.restrict(*(jnp.asarray(p, jnp.float64) for p in result.params))
        assert float(exact.value(theta)) - float(optimum.loss) < 1e-5, solver


def test_float32_collinearity_warning_says_what_the_fit_may_miss_and_the_remedy_works():
    # The column 7 + 1e-3·z is collinear with the intercept to float32 precision (the rank
    # test of the uncentred Gram), which is what the EKFAC preconditioner works with. The
    # warning promised "the minimum-norm optimum"; it says the fit may stop above the optimum
    # and names centring, which lets every solver reach it, sparse input included.
    features, labels = _near_constant_column(1, 7.0, 1e-3)
    with pytest.warns(CollinearityWarning, match="to float32 precision") as caught:
        fit_logistic_regression(features, labels, 3, solver=_UNCENTRED, throw=False)
    message = str(caught[0].message)
    assert "above the float64 optimum" in message and "Centre or standardise" in message
    assert "minimum-norm optimum" not in message
    centred = features - features.mean(axis=0)
    for inputs in (centred, scipy.sparse.csr_matrix(centred)):
        for solver in ("newton-cg", "trust-region"):
            with warnings.catch_warnings():
                warnings.simplefilter("error", CollinearityWarning)
                result = fit_logistic_regression(inputs, labels, 3, solver=solver, throw=False)
            gap = _gap_to_float64_optimum(centred, labels, result)
            assert result.status == Status.CONVERGED and gap < 2e-6, (solver, gap)


def test_float32_column_that_centred_fits_resolve_is_not_called_collinear():
    # The CG solvers' Kronecker preconditioner and `newton`'s Hessian work in centred
    # variables below float64 and reach the optimum beside a column c + δ·z (see the test
    # above), where the rank of the uncentred float32 Gram called it collinear with the
    # intercept and warned that the fit may stop above the optimum: a false alarm for
    # 1,000 + z and 7 + 1e-3·z. The rank is
    # decided on the centred Gram for those fits, in memory, streamed and in the estimator;
    # closer to constant (δ/c below 1024·eps = 1.2e-4; 1e-6 to 2e-5 above the optimum at 4e-5
    # to 5e-6), the warning stays, and for an exact duplicate beside it names that pair alone.
    from xentropy_jax import fit_logistic_regression_streamed
    from xentropy_jax.sklearn import LogisticRegression as Estimator

    for offset, spread in ((7.0, 1e-3), (1000.0, 1.0), (1.0, 3e-4)):
        features, labels = _near_constant_column(0, offset, spread)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CollinearityWarning)
            for solver in ("newton-cg", "trust-region", "newton"):
                result = fit_logistic_regression(features, labels, 3, solver=solver)
                assert _gap_to_float64_optimum(features, labels, result) < 2e-6, solver
            fit_logistic_regression_streamed(features, labels, 3, chunk_rows=100, throw=False)
            Estimator(C=np.inf).fit(features, labels)
            Estimator(C=np.inf, solver="newton-cholesky").fit(features, labels)
        with pytest.warns(CollinearityWarning, match="to float32 precision"):
            fit_logistic_regression(features, labels, 3, solver=_UNCENTRED, throw=False)
        repeated = np.c_[features, features[:, 1]]
        with pytest.warns(CollinearityWarning, match=r"columns \[1, 5\] of X are exactly"):
            fit_logistic_regression(repeated, labels, 3, throw=False)
    # Beside a dependence of other columns the near-constant one is not named (in X̃'s own
    # variables the rounding that mixes it into the null vectors is m/σ larger: it named
    # 1,000 + z and the intercept beside make_classification's redundant columns); the
    # intercept is, where the dependence has a constant term.
    features, labels = _near_constant_column(0, 1000.0, 1.0)
    for constant, names in ((0.0, "0, 1, 5"), (5.0, "0, 1, 5, intercept")):
        dependent = np.c_[features, features[:, 0] + features[:, 1] + np.float32(constant)]
        with pytest.warns(CollinearityWarning, match=rf"columns \[{names}\] of X are exactly"):
            fit_logistic_regression(dependent, labels, 3, throw=False)
    # A near-constant column and itself plus 1: exact to the data's rounding of magnitudes
    # (near against the spreads, in the centred float64 Gram): X̃'s own Gram names them, the
    # intercept included (it said "to float32 precision" without it).
    features, labels = _near_constant_column(0, 7.0, 7e-2)
    shifted = np.c_[features, features[:, 4] + np.float32(1)]
    with pytest.warns(CollinearityWarning, match=r"columns \[4, 5, intercept\] of X are exactly"):
        fit_logistic_regression(shifted, labels, 3, throw=False)
    features, labels = _near_constant_column(0, 7.0, 3e-4)
    for fit in (fit_logistic_regression, fit_logistic_regression_streamed):
        with pytest.warns(CollinearityWarning, match=r"columns \[4, intercept\] .* float32"):
            fit(features, labels, 3, throw=False)
    constant = np.c_[features[:, :4], np.full(300, 7.0, np.float32)]
    with pytest.warns(CollinearityWarning, match=r"columns \[4, intercept\] of X are exactly"):
        fit_logistic_regression(constant, labels, 3, throw=False)


@pytest.mark.parametrize("solver", ["newton", "newton-cg", "trust-region"])
def test_the_returned_params_have_the_returned_loss_at_a_large_norm(solver):
    # Raw breast cancer in float32 without a penalty, nearly separable: two columns are null
    # only to float32 precision, and at the fit's large ‖θ‖ the logits' rounding bound let
    # the minimum-norm projection move them by units: params with an objective of 3.9
    # (newton) and about 11 beside a loss of 0.012 and 0.009.
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollinearityWarning)
        result = fit_logistic_regression(X.astype(np.float32), y, 2, solver=solver, throw=False)
    objective = _linear.logistic_objective(X.astype(np.float32).astype(np.float64), y, 2)
    theta = objective.restrict(*(jnp.asarray(p, jnp.float64) for p in result.params))
    np.testing.assert_allclose(float(objective.value(theta)), float(result.loss), rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_constant_column_beside_the_intercept_gives_the_minimum_norm_optimum(dtype):
    # Rank was decided at d̃·eps·λ_max of the scaled Gram, whose rounding grows as √N·eps: the
    # null eigenvalue of a constant column beside the intercept landed above it for most
    # constants at N = 1,000 (4.6e-15 against 3.2e-15 at N = 300, c = 3). Each solver then kept
    # its own optimum (the intercepts 50 times the minimum-norm ones).
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 5))
    logits = features @ rng.normal(size=(5, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (np.cumsum(probs, 1) > rng.uniform(size=(1000, 1))).argmax(1)
    features, atol = features.astype(dtype), (1e-7 if dtype == np.float64 else 2e-4)
    intercept = np.asarray(fit_logistic_regression(features, labels, 3, tol=1e-10).params[1])
    for constant in (0.3, 1.5, 3.0, 7.0, 30.0):
        with_constant = np.column_stack([features, np.full(1000, constant, dtype)])
        # The logits need b + c·w = b₀: the least-norm split is (b, w) = (1, c)·b₀/(1 + c²).
        expected = np.outer([constant, 1.0], intercept / (1 + constant**2))
        for solver in ("newton", "newton-cg", "trust-region"):
            with warnings.catch_warnings():
                # (The warning decides at d̃·eps alone, on its own Gram: it may stay silent in
                # such a borderline case; see docs/solvers.md.)
                warnings.simplefilter("ignore", CollinearityWarning)
                result = fit_logistic_regression(with_constant, labels, 3, solver=solver, tol=1e-10)
            fitted = np.vstack([np.asarray(result.params[0])[5], np.asarray(result.params[1])])
            np.testing.assert_allclose(fitted, expected, atol=atol, err_msg=f"{constant} {solver}")


def test_columns_that_x_resolves_keep_their_optimum_beside_the_looser_projection():
    # x and x + 1e-7·z: their scaled Gram eigenvalue is below d̃·√N·eps, but X resolves them
    # (the optimum's coefficients are ±3.9e6). Cut there in the preconditioner too, Newton-CG
    # reported CONVERGED 1.7e-2 above the optimum, with a false CollinearityWarning.
    rng = np.random.default_rng(1)
    x, z, others = rng.normal(size=1000), rng.normal(size=1000), rng.normal(size=(1000, 8))
    logits = 0.8 * x - 0.5 * z + 0.3 * others[:, 0]
    labels = (rng.uniform(size=1000) < 1 / (1 + np.exp(-logits))).astype(int)
    resolved = np.column_stack([x, z, others])
    nearly = np.column_stack([x, x + 1e-7 * z, others])
    reference = fit_logistic_regression(resolved, labels, 2, solver="newton", tol=1e-12)
    for solver in ("newton", "newton-cg"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", CollinearityWarning)
            result = fit_logistic_regression(nearly, labels, 2, solver=solver)
        assert result.status == Status.CONVERGED
        assert float(result.loss) - float(reference.loss) < 1e-9, solver


def test_collinearity_is_not_warned_with_a_penalty_or_independent_columns():
    features, labels, _, _ = _collinear_problems()["repeated column"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollinearityWarning)
        fit_logistic_regression(features, labels, 4, l2=1e-2)
        fit_logistic_regression(features[:, :8], labels, 4)


def test_collinearity_warning_names_the_precision_of_its_decision():
    # Below float64 the rank is decided in the data's precision, where nearly collinear columns
    # count: the message must not call them exactly collinear.
    features, labels, _, _ = _collinear_problems()["repeated column"]
    with pytest.warns(CollinearityWarning, match="are exactly collinear"):
        fit_logistic_regression(features, labels, 4, throw=False)
    # A repeated column is collinear in float64 too, and float32 data say so (they said "to
    # float32 precision", as for raw digits' all-zero columns).
    with pytest.warns(CollinearityWarning, match="are exactly collinear"):
        fit_logistic_regression(features.astype(np.float32), labels, 4, throw=False)
    # Nearly repeated: dependent in float32 only.
    nearly = features.copy()
    nearly[:, -1] += 1e-6 * np.random.default_rng(0).normal(size=len(nearly))
    with pytest.warns(CollinearityWarning, match="collinear to float32 precision") as record:
        fit_logistic_regression(nearly.astype(np.float32), labels, 4, throw=False)
    assert "fit float64 data" in str(record[0].message)


def test_collinearity_warning_tells_near_dependences_from_exact_ones():
    # float64 columns x and x + 1e-9·z: the Gram, which resolves singular values down to
    # √(d̃·eps) only, counts them as collinear, and the warning called them "exactly collinear"
    # with "the minimum-norm optimum", while newton returned a ±5e4 split short of the
    # optimum. X itself resolves them: the warning says "nearly" and gives the norm of the
    # unit-column combination, X̃·D's smallest singular value.
    features, labels, _, _ = _collinear_problems()["repeated column"]
    rng = np.random.default_rng(1)
    nearly = features.copy()
    nearly[:, -1] += 1e-9 * rng.normal(size=len(nearly))
    design = np.hstack([nearly, np.ones((len(nearly), 1))])
    smallest = np.linalg.svd(design / np.linalg.norm(design, axis=0), compute_uv=False)[-1]
    with pytest.warns(CollinearityWarning, match="are nearly collinear") as record:
        fit_logistic_regression(nearly, labels, 4, throw=False)
    message = str(record[0].message)
    assert "columns [0, 8]" in message and "minimum-norm" not in message
    reported = float(message.split("columns of norm ")[1].split(",")[0])
    np.testing.assert_allclose(reported, smallest, rtol=0.1)
    # Beside an exact dependence (column 9 = column 1 + column 2): one of each, counted.
    both = np.hstack([nearly, nearly[:, 1:2] + nearly[:, 2:3]])
    with pytest.warns(CollinearityWarning, match="1 dependence exact and 1 near"):
        fit_logistic_regression(both, labels, 4, throw=False)
    # Exact to the data's rounding, in float64 and float32: a computed sum, a repeated column,
    # and one far from 0 (beside the intercept the Gram's null vectors carry 2e-15 of rounding,
    # which read as a near dependence).
    exact = np.hstack([features, features[:, 1:2] + features[:, 2:3]])
    offset = features + 100 * np.arange(1, 10)
    for data in (exact, exact.astype(np.float32), features.astype(np.float32), offset):
        with pytest.warns(CollinearityWarning, match="are exactly collinear"):
            fit_logistic_regression(data, labels, 4, throw=False)
    # The estimator words the same facts in its own terms.
    from xentropy_jax.sklearn import LogisticRegression as Estimator

    with pytest.warns(CollinearityWarning, match="nearly collinear.*no penalty"):
        Estimator(C=np.inf).fit(nearly, labels)


def test_collinear_issue_reproduction_with_the_estimator():
    from xentropy_jax.sklearn import LogisticRegression as Estimator

    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 45))
    labels = rng.integers(0, 4, 500)
    features = np.hstack([features, features[:, :1]])
    with pytest.warns(CollinearityWarning, match=r"\[0, 45\]"):
        model = Estimator(penalty=None).fit(features, labels)
    reduced = Estimator(penalty=None).fit(features[:, :45], labels)
    np.testing.assert_allclose(model.coef_[:, 0], model.coef_[:, 45], atol=1e-7)
    np.testing.assert_allclose(2 * model.coef_[:, 0], reduced.coef_[:, 0], atol=1e-6)
    np.testing.assert_allclose(
        model.predict_proba(features), reduced.predict_proba(features[:, :45]), atol=1e-8
    )


# --- Bad input under jit: a status that names the cause --------------------------------------

INVALID = Status.INVALID_LABELS


@pytest.mark.parametrize(
    "change, status",
    [
        (dict(sample_weight=-np.ones(40)), Status.INVALID_WEIGHTS),
        (dict(sample_weight=np.where(np.arange(40) == 3, np.nan, 1.0)), Status.INVALID_WEIGHTS),
        (dict(l2=-0.1), Status.INVALID_L2),
        (dict(labels=np.where(np.arange(40) == 5, -1, np.arange(40) % 3)), Status.INVALID_LABELS),
        (dict(labels=np.where(np.arange(40) == 5, 3, np.arange(40) % 3)), Status.INVALID_LABELS),
        # int64 labels beyond int32 wrapped into range when cast (2**32 + 1 became class 1).
        (dict(labels=np.where(np.arange(40) == 5, 2**32 + 1, np.arange(40) % 3)), INVALID),
        (dict(labels=np.where(np.arange(40) == 5, 1 - 2**32, np.arange(40) % 3)), INVALID),
        (dict(sample_weight=np.zeros(40)), Status.ZERO_WEIGHT),
        (dict(sample_weight=np.full(40, 1e-320)), Status.ZERO_WEIGHT),
        (dict(tol=-1.0), Status.INVALID_TOL),
        (dict(tol=np.nan), Status.INVALID_TOL),
    ],
)
def test_bad_input_under_jit_reports_its_cause(change, status):
    rng = np.random.default_rng(5)
    arguments = dict(
        features=rng.normal(size=(40, 3)),
        labels=np.arange(40) % 3,
        sample_weight=np.ones(40),
        l2=0.1,
        tol=1e-8,
    )
    arguments.update(change)

    @jax.jit
    def fit(features, labels, sample_weight, l2, tol):
        return fit_logistic_regression(
            features, labels, 3, sample_weight=sample_weight, l2=l2, tol=tol, throw=False
        )

    result = fit(**arguments)
    assert Status(int(result.status)) == status
    assert int(result.n_iter) == 0 and not bool(result.converged)
    assert Status.message(status) != Status.message(Status.LINE_SEARCH_FAILED)


def test_a_class_without_samples_is_fitted_towards_probability_zero():
    # A cross-validation fold or a bootstrap sample that misses a rare class: the fit runs and
    # converges at its tolerance, the empty class's intercept falling as tol falls. Eagerly it
    # warns (it raised, and the estimator with it, which broke BaggingClassifier).
    rng = np.random.default_rng(7)
    features, labels = rng.normal(size=(100, 3)), rng.integers(0, 3, 100)
    with pytest.warns(UserWarning, match=r"classes without samples \(zero total weight\): \[3\]"):
        eager = fit_logistic_regression(features, labels, 4, l2=1e-2, tol=1e-12)
    fit = jax.jit(lambda y, tol: fit_logistic_regression(features, y, 4, l2=1e-2, tol=tol))
    loose, tight = fit(labels, 1e-6), fit(labels, 1e-12)
    np.testing.assert_allclose(eager.params[1], tight.params[1], rtol=1e-6)
    assert int(loose.status) == int(tight.status) == Status.CONVERGED
    assert float(tight.params[1][3]) < float(loose.params[1][3]) < -5
    three = fit_logistic_regression(features, labels, 3, l2=1e-2, tol=1e-12)

    def probabilities(result):
        weights, intercept = result.params
        return jax.nn.softmax(features @ weights + intercept[None, :])

    np.testing.assert_allclose(probabilities(tight)[:, :3], probabilities(three), atol=1e-7)
    assert float(jnp.max(probabilities(tight)[:, 3])) < 1e-7


def test_unpenalised_fit_under_jit_of_closed_over_features():
    # X closed over (concrete) inside a caller's jit, l2 = 0 (the default): the collinearity
    # check read a traced Gram on the host and raised TracerArrayConversionError.
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)), np.arange(40) % 3
    traced = jax.jit(lambda y: fit_logistic_regression(features, y, 3, throw=False))(labels)
    eager = fit_logistic_regression(features, labels, 3)
    assert int(traced.status) == Status.CONVERGED
    np.testing.assert_allclose(traced.params[0], eager.params[0], rtol=1e-6, atol=1e-9)
    # ... and the check still runs there, on the concrete X.
    twice = np.column_stack([features, features[:, 0]])
    with pytest.warns(CollinearityWarning, match="collinear"):
        jax.jit(lambda y: fit_logistic_regression(twice, y, 3, throw=False).loss)(labels)


def test_float_labels_raise_under_jit_too():
    # Inside jit float labels were cast to int32: NaN and −0.5 became class 0, 2.5 class 2.
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)), (np.arange(40) % 3).astype(np.float32)
    labels[5] = np.nan
    fit = jax.jit(lambda y: fit_logistic_regression(features, y, 3, l2=0.1, throw=False))
    with pytest.raises(TypeError, match="labels must be integers, got dtype float32"):
        fit(labels)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_whose_sum_overflows_fit_as_their_ratios(dtype):
    # w / Σw with Σw = inf made every weight 0: W = 0 reported CONVERGED, under jit too.
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)).astype(dtype), np.arange(40) % 3
    large = 0.9 * np.finfo(dtype).max
    reference = fit_logistic_regression(features, labels, 3, l2=0.1, tol=1e-7)
    weights = np.full(40, large)
    eager = fit_logistic_regression(features, labels, 3, l2=0.1, tol=1e-7, sample_weight=weights)
    traced = jax.jit(
        lambda w: fit_logistic_regression(features, labels, 3, l2=0.1, tol=1e-7, sample_weight=w)
    )(weights)
    path = fit_regularization_path(features, labels, 3, [0.1], tol=1e-7, sample_weight=weights)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    for params in (eager.params[0], traced.params[0], path.params[0][0]):
        np.testing.assert_allclose(params, reference.params[0], atol=atol)
    if dtype == np.float32:  # beyond float32 itself: a clear error, not inf weights
        with pytest.raises(ValueError, match="Rescale the weights"):
            fit_logistic_regression(features, labels, 3, sample_weight=np.full(40, 1e39))


def test_subnormal_weights_raise_outside_jit():
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)), np.arange(40) % 3
    with pytest.raises(ValueError, match="Rescale"):
        fit_logistic_regression(features, labels, 3, sample_weight=np.full(40, 1e-320))
    # float32 fits (x64 off, or float32 data) already lose 1e-40.
    with pytest.raises(ValueError, match="Rescale"):
        fit_logistic_regression(
            features.astype(np.float32), labels, 3, sample_weight=np.full(40, 1e-40)
        )
    # Each weight subnormal, their sum normal: the fit flushes every one to zero (under jit it
    # reports ZERO_WEIGHT); it stopped DIVERGED with W = 0 and a rank-0 collinearity warning.
    with pytest.raises(ValueError, match="Rescale"):
        fit_logistic_regression(
            features.astype(np.float32), labels, 3, sample_weight=np.full(40, 1e-39)
        )


def test_newton_refuses_a_hessian_that_cannot_fit_before_compiling(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("compiled")

    monkeypatch.setattr(fit_module, "_fit", never)
    features = np.random.default_rng(0).normal(size=(1000, 200))
    labels = np.arange(1000)
    with pytest.raises(ValueError, match="newton-cg") as info:
        fit_logistic_regression(features, labels, 1000, l2=0.1, solver="newton")
    assert "Hessian" in str(info.value) and "GiB" in str(info.value)


def test_features_whose_squares_overflow_raise():
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(40, 3)), np.arange(40) % 3
    features[0, 0] = 1e30
    with pytest.raises(ValueError, match="overflow"):
        fit_logistic_regression(features.astype(np.float32), labels, 3, l2=0.1)


# --- float32 without 64-bit mode, in a fresh process as a JAX/Colab user has it ---------------

FLOAT32_SCRIPT = """
import contextlib, io, json, warnings
import numpy as np
import jax
from sklearn.datasets import load_digits
import xentropy_jax as xj
from xentropy_jax.sklearn import LogisticRegression

assert not jax.config.jax_enable_x64
out = {}
X, y = load_digits(return_X_y=True)
result = xj.fit_logistic_regression(X, y, 10, l2=1e-3, solver="newton-cg")  # the README's call
weights = np.asarray(result.params[0])
out["digits"] = [int(result.n_iter), str(weights.dtype), weights.tolist()]
region = xj.fit_logistic_regression(X, y, 10, l2=1e-3, solver="trust-region")
out["digits_trust_region"] = [int(region.n_iter), int(region.n_hessian_products)]
out["digits_products"] = int(result.n_hessian_products)

rng = np.random.default_rng(0)
Xb = rng.normal(size=(600, 8))
yb = (Xb[:, 0] + Xb[:, 1] + rng.normal(size=600) > 0).astype(int) + (Xb[:, 2] > 0)
Xb[:, 3] *= 1e8
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = LogisticRegression().fit(Xb.astype(np.float32), yb)
out["scaled"] = [model.coef_.tolist(), [str(w.message) for w in caught]]
cg = xj.fit_logistic_regression(Xb, yb, 3, l2=1 / 600, throw=False)
out["scaled_cg"] = [int(cg.status), xj.Status.message(cg.status)]

huge = Xb[:, :3].astype(np.float32)
huge[0, 0] = 1e30
try:
    LogisticRegression().fit(huge, yb)
    out["huge"] = "no error"
except ValueError as error:
    out["huge"] = str(error)

printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    LogisticRegression(verbose=1).fit(Xb[:200, :3], yb[:200])
out["verbose"] = printed.getvalue().splitlines()[0]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def float32_process():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    completed = subprocess.run(
        [sys.executable, "-c", FLOAT32_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_float32_readme_fit_stops_at_the_precision_floor(float32_process):
    from sklearn.datasets import load_digits

    n_iter, dtype, weights = float32_process["digits"]
    # It ran into MAX_ITER (100) before the per-parameter floor, then took 17 to 21 iterations
    # on the scaled Kronecker basis with CG at its cap; A's own basis (l2 covers its float32
    # rounding here) with CG's per-entry stop takes 11 (forcing exponent 1/2) or 13 (1/4).
    assert dtype == "float32" and n_iter <= 15
    # The trust region's Steihaug-CG has the same per-entry stop: 15 iterations and 1,461
    # products without it, 13 and 341 (newton-cg's own path) with it.
    region_iter, region_products = float32_process["digits_trust_region"]
    assert region_iter <= 15 and region_products <= 1.2 * float32_process["digits_products"]
    features, labels = load_digits(return_X_y=True)
    reference = fit_logistic_regression(features, labels, 10, l2=1e-3, tol=1e-10)
    expected = np.asarray(reference.params[0])
    assert np.max(np.abs(np.asarray(weights) - expected)) <= 1e-3 * np.max(np.abs(expected))


@pytest.mark.subprocess
def test_float32_badly_scaled_column_is_fitted_or_says_so(float32_process):
    from xentropy_jax.sklearn import LogisticRegression as Estimator

    coef, messages = float32_process["scaled"]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 8))
    labels = (features[:, 0] + features[:, 1] + rng.normal(size=600) > 0).astype(int)
    labels = labels + (features[:, 2] > 0)
    features[:, 3] *= 1e8
    expected = Estimator().fit(features, labels).coef_
    assert not messages
    assert np.max(np.abs(np.asarray(coef) - expected)) <= 1e-4 * np.max(np.abs(expected))
    # The matrix-free solver cannot reach tol here in float32: it must say so, and what to do.
    status, message = float32_process["scaled_cg"]
    if status != Status.CONVERGED:
        assert "float64" in message and "standardise" in message


@pytest.mark.subprocess
def test_float32_features_of_1e30_raise(float32_process):
    assert "overflow" in float32_process["huge"]


@pytest.mark.subprocess
def test_verbose_prints_a_float64_loss_with_x64_off(float32_process):
    # The first line is the initial point, whose loss is log K: in float64, not float32.
    printed = float(float32_process["verbose"].split("loss")[1].split()[0])
    assert printed == float(f"{np.log(3):.12e}")
    assert printed != float(f"{float(np.float32(np.log(3))):.12e}")


@pytest.mark.parametrize("preconditioner", ["kronecker", "diagonal"])
def test_sums_over_x_take_it_by_row_chunks(preconditioner):
    # The Gram of the Kronecker preconditioner, the precision floor's column sums and the
    # Hessian diagonal hold copies as large as X in one call ([X, 1], ŵ ⊙ X̃, |X|, X ⊙ X kept
    # for the whole fit); by row chunks they do not. What stays is the solver's own [N, K]
    # per-row state (small next to X at d = 512, K = 4) and a few chunk-sized buffers (small
    # chunks here; 64 MiB ones by default, see below).
    num_features, chunk = 512, 4096
    num_rows = 30 * chunk + 5  # a ragged last chunk
    X = jax.ShapeDtypeStruct((num_rows, num_features), jnp.float32)
    labels = jax.ShapeDtypeStruct((num_rows,), jnp.int32)
    solver = fit_module._resolve_solver(NewtonCG(preconditioner=preconditioner))

    def temporaries(row_chunk):
        compiled = fit_module._fit.lower(
            X,
            labels,
            None,
            1e-3,
            None,
            1e-6,
            50,
            num_classes=4,
            fit_intercept=True,
            reference_class=False,
            penalised=True,
            checked=True,
            solver=solver,
            verbose=False,
            row_chunk=row_chunk,
        ).compile()
        return compiled.memory_analysis().temp_size_in_bytes / (num_rows * num_features * 4)

    assert temporaries(None) > 0.9 + temporaries(chunk)
    assert temporaries(chunk) < 0.5
    # The default: chunks of at most 64 MiB of [X, 1], only for X larger than one chunk.
    big = fit_module._row_chunk(jnp.zeros((70_000, num_features), jnp.float32))
    assert big * (num_features + 1) * 4 <= 2**26 and big >= 256
    assert fit_module._row_chunk(jnp.zeros((big, num_features), jnp.float32)) is None


def test_fits_hold_a_transposed_copy_of_a_dense_float64_x_only(monkeypatch):
    # Xᵀ is copied for the GEMMs over the rows only where it measured faster and costs at most
    # TRANSPOSED_COPY_MAX_BYTES: a dense float64 X on one CPU device.
    from jax.experimental import sparse

    dense = jnp.zeros((100, 3), jnp.float64)
    assert fit_module.wants_transposed_copy(dense)
    assert not fit_module.wants_transposed_copy(dense.astype(jnp.float32))
    assert not fit_module.wants_transposed_copy(sparse.BCOO.fromdense(dense))
    traced = []
    jax.jit(lambda x: traced.append(fit_module.wants_transposed_copy(x)) or x)(dense)
    assert traced == [False]
    monkeypatch.setattr(fit_module, "TRANSPOSED_COPY_MAX_BYTES", 100 * 3 * 8 - 1)
    assert not fit_module.wants_transposed_copy(dense)
    # The fit with the copy is the fit without it (the copy above the cap).
    X, y = make_classification(300, 6, n_informative=4, n_classes=3, random_state=0)
    without = fit_logistic_regression(X, y, 3, l2=1e-2, tol=1e-10)
    monkeypatch.undo()
    assert fit_module.wants_transposed_copy(jnp.asarray(X))
    copied = fit_logistic_regression(X, y, 3, l2=1e-2, tol=1e-10)
    for ours, expected in zip(copied.params, without.params, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_row_chunked_sums_equal_the_single_call():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(140_003, 3)) * np.array([1.0, 10.0, 0.1])
    y = (X[:, 0] + X[:, 1] / 10 + rng.normal(size=len(X)) > 0).astype(int) + (X[:, 2] > 0)
    weights = rng.uniform(0.5, 2.0, len(X))
    whole = _linear.logistic_objective(X, y, 3, sample_weight=weights, l2=1e-3)
    chunked = _linear.logistic_objective(X, y, 3, sample_weight=weights, l2=1e-3, row_chunk=65536)
    gram = np.asarray(_linear.feature_gram(whole))
    np.testing.assert_allclose(_linear.feature_gram(chunked), gram, rtol=1e-12, atol=0)
    design = np.c_[X, np.ones(len(X))]
    reference = design.T @ ((weights / weights.sum())[:, None] * design)
    np.testing.assert_allclose(gram, reference, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        _floor.attainable_tolerance(chunked, 0.0),
        _floor.attainable_tolerance(whole, 0.0),
        rtol=1e-12,
        atol=0,
    )
    theta = jnp.asarray(np.random.default_rng(6).normal(size=whole.num_params))
    evaluation = _linear.evaluate(whole, theta, whole.free_logits(theta))
    np.testing.assert_allclose(
        _linear.hessian_diagonal(chunked, evaluation),
        _linear.hessian_diagonal(whole, evaluation),
        rtol=1e-12,
        atol=0,
    )
    # A fit of this X (on one device, more rows than one chunk) takes the chunked sums.
    assert fit_module._row_chunk(jnp.asarray(X)) == 65536
    result = fit_logistic_regression(X, y, 3, sample_weight=weights, l2=1e-3, tol=1e-10)
    expected = LogisticRegression(C=1 / (1e-3 * weights.sum()), tol=1e-12, max_iter=1000)
    expected.fit(X, y, sample_weight=weights)
    scale = np.max(np.abs(expected.coef_))
    np.testing.assert_allclose(result.params[0].T, expected.coef_, rtol=0, atol=1e-6 * scale)


def test_default_forcing_reaches_the_same_optimum_with_fewer_products_on_many_classes():
    # CG's forcing η = min(0.5, ‖g‖^¼) (the default) against the classical ‖g‖^½ on Gaussian
    # class means with 100 classes: the same optimum, fewer Hessian products (65 against 82
    # when measured), for both solvers that share the rule.
    rng = np.random.default_rng(0)
    means = rng.normal(size=(100, 64)) * (2.0 / 8.0) ** 0.5
    y = rng.integers(0, 100, 4000)
    X = means[y] + rng.normal(size=(4000, 64))
    fit = functools.partial(fit_logistic_regression, X, y, 100, l2=1 / 4000, tol=1e-6)
    assert NewtonCG().forcing_exponent == TrustRegion().forcing_exponent == 0.25
    optimum = fit(tol=1e-10)
    for solver in (NewtonCG, TrustRegion):
        loose, classical = fit(solver=solver()), fit(solver=solver(forcing_exponent=0.5))
        for result in (loose, classical):
            assert result.converged
            # tol = 1e-6 bounds the objective's gap by about ½·ΔᵀHΔ <= tol.
            assert float(result.loss - optimum.loss) <= 1e-6
        assert loose.n_hessian_products < classical.n_hessian_products


def test_exactly_zero_gradient_converges_at_tol_zero():
    # The stopping rule is max|g| <= tol (scikit-learn's): with tol = 0 a point whose gradient
    # is exactly 0 has converged. Zero features and balanced labels: at θ = 0 every
    # probability is exactly 1/2, so the gradient is exactly 0 and θ = 0 is the optimum.
    features = np.zeros((8, 2))
    labels = np.arange(8) % 2
    result = fit_logistic_regression(features, labels, 2, l2=0.1, tol=0.0)
    assert result.status == Status.CONVERGED and bool(result.converged)
    assert float(result.grad_norm) == 0.0
    np.testing.assert_array_equal(result.params[0], 0.0)
    np.testing.assert_array_equal(result.params[1], 0.0)


def test_newton_decrement_is_half_the_model_curvature(capfd):
    # The convergence test uses ½ΔᵀHΔ (scikit-learn's NewtonSolver), reported per iteration.
    # One Newton step from θ = 0 on a binary problem without intercept: s = 1/2, so
    # g = Xᵀ(½ − y)/N, H = XᵀX/(4N) + l2·I and ½ΔᵀHΔ = ½·gᵀH⁻¹g (NumPy float64).
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    y = (rng.uniform(size=30) < 0.5).astype(int)
    l2 = 0.1
    fit_logistic_regression(
        X,
        y,
        2,
        l2=l2,
        fit_intercept=False,
        reference_class=True,
        solver="newton",
        verbose=True,
        max_iter=1,
        throw=False,
    )
    printed = re.findall(r"iter\s+1 .*decrement ([0-9.e+-]+)", capfd.readouterr().out)
    assert len(printed) == 1
    g = X.T @ (0.5 - y) / y.size
    H = 0.25 * X.T @ X / y.size + l2 * np.eye(3)
    expected = 0.5 * g @ np.linalg.solve(H, g)
    np.testing.assert_allclose(float(printed[0]), expected, rtol=2e-3)


# Both as users run them: a fresh process with 64-bit mode off (JAX's default), where the
# reviews found them; the second passed with 64-bit mode on.
FLOAT32_SOLVER_SCRIPT = """
import json, warnings
import numpy as np
from scipy.special import logsumexp
import xentropy_jax as xj

warnings.simplefilter("ignore")
report = {"constant": [], "trust": []}
for seed in (22, 29):
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(300, 3)), rng.integers(0, 3, 300)
    constant = np.hstack([X, np.full((300, 1), 3.0)]).astype(np.float32)
    for reference in (False, True):
        r = xj.fit_logistic_regression(
            constant, y, 3, solver="newton-cg", reference_class=reference, throw=False
        )
        o = xj.fit_logistic_regression(X.astype(np.float32), y, 3, reference_class=reference)
        W, b = (np.asarray(a, np.float64) for a in r.params)
        Z = constant.astype(np.float64) @ W + b
        loss = float(np.mean(logsumexp(Z, axis=1) - Z[np.arange(300), y]))
        report["constant"].append([int(r.status), loss, float(o.loss), float(np.abs(b).max())])
rng = np.random.default_rng(1)
X, y = rng.normal(size=(300, 4)), rng.integers(0, 3, 300)
for l2, scale in [(1e7, 1.0), (1e8, 1.0), (1e9, 1e-6)]:
    for solver in ("newton-cg", "trust-region"):
        r = xj.fit_logistic_regression(
            (X * scale).astype(np.float32), y, 3, l2=l2, solver=solver, throw=False
        )
        report["trust"].append([solver, int(r.status)])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def float32_solver_report():
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    return json_report(FLOAT32_SOLVER_SCRIPT, env)


@pytest.mark.subprocess
def test_float32_newton_cg_does_not_follow_a_constant_column_beside_the_intercept(
    float32_solver_report,
):
    # The scaled Gram's rounding left that exact dependence above the Kronecker preconditioner's
    # cutoff: CG moved ±1e4 along it on rounding decreases, and the fit returned intercepts of
    # 1e9 (loss 25 at the returned point), CONVERGED, on 33 of 60 such fits.
    for status, loss, reference, largest in float32_solver_report["constant"]:
        assert status == Status.CONVERGED and largest < 1
        np.testing.assert_allclose(loss, reference, rtol=1e-6)


@pytest.mark.subprocess
def test_trust_region_survives_rounding_negative_curvature(float32_solver_report):
    # Steihaug met pᵀHp < 0 from float32 rounding (H is PSD) and went to the boundary uphill;
    # its negative model decrease ended the fit LINE_SEARCH_FAILED where NewtonCG converged.
    for solver, status in float32_solver_report["trust"]:
        assert status == Status.CONVERGED, (solver, Status(status).name)


def test_a_failed_line_search_keeps_a_finite_point():
    # Newton's step is NaN where the features overflow (only jit lets such X through): the
    # failed search returned θ + 0·NaN, NaN parameters and NON_FINITE.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(100, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 100)
    features[3, 1] = 1e25
    for solver in (Newton(), NewtonCG(), TrustRegion()):
        result = jax.jit(
            lambda X, solver=solver: fit_logistic_regression(X, labels, 3, l2=0.1, solver=solver)
        )(features)
        assert int(result.status) == Status.LINE_SEARCH_FAILED, type(solver).__name__
        assert all(bool(jnp.all(jnp.isfinite(p))) for p in result.params)


def test_float32_fit_with_a_class_of_zero_weight_converges():
    # CG uncapped beyond P products (tried in review) took this fit from 17 iterations to
    # MAX_ITER; capped at P, as before, it converges.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1000, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 1000)
    result = fit_logistic_regression(
        features, labels, 3, sample_weight=(labels != 2).astype(float), throw=False
    )
    assert int(result.status) == Status.CONVERGED, Status(int(result.status)).name


def _offset_problem(seed: int, offset: float):
    """600 rows of five N(0, 1) columns, the fourth + offset (float32), labels of 3."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(600, 5))
    labels = np.argmax(base @ rng.normal(size=(5, 3)) + rng.gumbel(size=(600, 3)), axis=1)
    base[:, 3] += offset
    return base.astype(np.float32), labels


@pytest.mark.parametrize("solver", ["newton-cg", "newton", "trust-region"])
def test_float32_fits_centre_columns_of_large_mean(solver):
    # A float32 column c + z beside the intercept rounds its gradient entries to about
    # eps·c·Σ|r|, which the floor test accepted: at l2 = 1e-6 the fits stopped CONVERGED up
    # to 3e-5 above the optimum with c = 1e4 (and `newton` 1.2 to 1.6 above with c = 1e6).
    # The fits centre such columns (the same model in θ_c = (W, b + μᵀW)).
    for seed, offset, bound in ((0, 1e4, 1e-7), (1, 1e4, 1e-7), (0, 1e6, 2e-2)):
        features, labels = _offset_problem(seed, offset)
        exact = fit_logistic_regression(
            np.asarray(features, np.float64), labels, 3, l2=1e-6, solver="newton", tol=1e-13
        )
        with jax.enable_x64(False):
            result = fit_logistic_regression(features, labels, 3, l2=1e-6, solver=solver)
            path = fit_regularization_path(features, labels, 3, [1e-3, 1e-6], solver=solver)
            # A warm start from the float64 optimum (in the user's variables) starts near it.
            init = tuple(np.asarray(p, np.float32) for p in exact.params)
            warm = fit_logistic_regression(features, labels, 3, l2=1e-6, solver=solver, init=init)
        assert int(warm.n_iter) < int(result.n_iter) and result.params[0].dtype == jnp.float32
        last = jax.tree.map(lambda a: a[-1], path.params)
        exact_objective = _linear.logistic_objective(
            np.asarray(features, np.float64), labels, 3, l2=1e-6
        )
        for params in (result.params, last, warm.params):
            theta = exact_objective.restrict(*(jnp.asarray(p, jnp.float64) for p in params))
            gap = (float(exact_objective.value(theta)) - float(exact.loss)) / float(exact.loss)
            assert gap < bound, (seed, offset, gap)
