"""`product_dtype="float32"` (`NewtonCG`, `TrustRegion`): float32 Hessian products steering a
float64 fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from sklearn.datasets import make_classification

from xentropy_jax._linear import logistic_objective
from xentropy_jax.solvers import (
    NewtonCG,
    TrustRegion,
    fit_logistic_regression,
    fit_regularization_path,
)
from xentropy_jax.solvers._inner import product_objective

MIXED = NewtonCG(product_dtype="float32")


@pytest.fixture(scope="module")
def problem():
    X, y = make_classification(
        n_samples=600, n_features=12, n_informative=8, n_classes=5, random_state=1
    )
    # Columns of different scales, as raw features come.
    X = X * np.logspace(-1, 1, X.shape[1])
    return X, y, np.random.default_rng(0).uniform(0.5, 2.0, y.shape[0])


def _dots(fn, *args) -> list[str]:
    """The dtypes of the products (dot_general outputs) in the jaxpr of ``fn(*args)``."""
    text = str(jax.make_jaxpr(fn)(*args))
    lines = [line for line in text.splitlines() if "dot_general" in line]
    return [line.split("=")[0].split(":")[-1].strip() for line in lines]


@pytest.mark.parametrize(
    "config, preconditioner",
    [(NewtonCG, "kronecker"), (NewtonCG, "diagonal"), (TrustRegion, "kronecker")],
)
def test_same_float64_optimum_as_float64_products(problem, config, preconditioner):
    X, y, w = problem
    exact = config(preconditioner=preconditioner)
    mixed = config(preconditioner=preconditioner, product_dtype="float32")
    kwargs = dict(sample_weight=w, l2=1e-3, tol=1e-12)
    reference = fit_logistic_regression(X, y, 5, solver=exact, **kwargs)
    result = fit_logistic_regression(X, y, 5, solver=mixed, **kwargs)
    assert bool(result.converged) and result.params[0].dtype == jnp.float64
    assert float(result.grad_norm) <= 1e-12
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-13)
    for ours, theirs in zip(result.params, reference.params, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-8 * np.abs(theirs).max())


@pytest.mark.parametrize("config", [NewtonCG, TrustRegion])
def test_products_run_in_float32_and_nothing_else_does(problem, config):
    X, y, _ = problem
    X = jnp.asarray(X)

    def fit(solver):
        return lambda X: fit_logistic_regression(X, y, 5, l2=1e-3, solver=solver).params

    exact = _dots(fit(config()), X)
    mixed = _dots(fit(config(product_dtype="float32")), X)
    assert exact and all(dtype.startswith("f64") for dtype in exact)
    # The same program but for the Hessian product's two GEMMs, X·V [N, K] and Xᵀ·U [d, K], the
    # two row sums of its loss-Hessian step [N] between them, and the preconditioner's class
    # curvature B = Σ ŵ(diag s − ssᵀ) [K, K], which only steer CG: the logits, the gradient, the
    # line search (or the ratio test), CG's vectors and the preconditioner's once-per-fit
    # feature basis stay float64.
    assert [dtype.replace("f32", "f64") for dtype in mixed] == exact
    low = sorted(dtype for dtype in mixed if dtype.startswith("f32"))
    assert low == ["f32[12,5]", "f32[5,5]", "f32[600,5]", "f32[600]", "f32[600]"]


def test_no_effect_on_float32_data(problem):
    X, y, _ = problem
    X = X.astype(np.float32)
    objective = logistic_objective(jnp.asarray(X), jnp.asarray(y), 5, l2=1e-3)
    assert product_objective(objective, "float32") is None
    reference = fit_logistic_regression(X, y, 5, l2=1e-3, tol=1e-5)
    result = fit_logistic_regression(X, y, 5, l2=1e-3, tol=1e-5, solver=MIXED)
    for ours, theirs in zip(result.params, reference.params, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_float32_features_with_float64_accumulation(problem):
    # The documented recipe for float32 features: X cast to float64 (the gradient, the iterate
    # and the stopping test in float64), Hessian products in float32 (exact casts of the data).
    X, y, _ = problem
    X = X.astype(np.float32)
    kwargs = dict(l2=1e-3, tol=1e-10)
    exact = fit_logistic_regression(X.astype(np.float64), y, 5, **kwargs)
    mixed = fit_logistic_regression(X.astype(np.float64), y, 5, solver=MIXED, **kwargs)
    assert bool(mixed.converged) and mixed.params[0].dtype == jnp.float64
    np.testing.assert_allclose(mixed.loss, exact.loss, rtol=1e-13)
    # The float32 fit itself (float32 accumulation) is within 1e-6 of that optimum's objective.
    single = fit_logistic_regression(X, y, 5, l2=1e-3)
    assert single.params[0].dtype == jnp.float32
    objective = logistic_objective(jnp.asarray(X, jnp.float64), jnp.asarray(y), 5, l2=1e-3)
    theta = jnp.concatenate([jnp.ravel(p.astype(jnp.float64)) for p in single.params])
    np.testing.assert_allclose(objective.value(theta), exact.loss, rtol=1e-6)


def test_sparse_features(problem):
    X, y, _ = problem
    X = np.where(np.abs(X) > 1.0, X, 0.0)
    dense = fit_logistic_regression(X, y, 5, l2=1e-3, tol=1e-10)
    csr = scipy.sparse.csr_matrix(X)
    sparse = fit_logistic_regression(csr, y, 5, l2=1e-3, tol=1e-10, solver=MIXED)
    assert bool(sparse.converged)
    np.testing.assert_allclose(sparse.params[0], dense.params[0], atol=1e-8)


def test_path_and_vmap(problem):
    X, y, _ = problem
    l2_values = np.array([1e-1, 1e-2, 1e-3])
    path = fit_regularization_path(X, y, 5, l2_values, tol=1e-9, solver=MIXED)
    batched = jax.vmap(
        lambda l2: fit_logistic_regression(X, y, 5, l2=l2, tol=1e-9, solver=MIXED).params[0]
    )(jnp.asarray(l2_values))
    for index, l2 in enumerate(l2_values):
        single = fit_logistic_regression(X, y, 5, l2=l2, tol=1e-9).params[0]
        np.testing.assert_allclose(path.params[0][index], single, atol=1e-7)
        np.testing.assert_allclose(batched[index], single, atol=1e-7)


@pytest.mark.parametrize("config", [NewtonCG, TrustRegion])
def test_unknown_product_dtype_is_refused(config):
    with pytest.raises(ValueError, match="product_dtype must be None or 'float32'"):
        config(product_dtype="float16")


def test_an_objective_that_is_not_a_pytree_is_refused():
    class Opaque:
        dtype = jnp.float64

    with pytest.raises(TypeError, match="must be a pytree"):
        product_objective(Opaque(), "float32")


def test_estimators_pass_it_to_newton_cg(problem):
    from xentropy_jax.sklearn import LogisticRegression, LogisticRegressionCV

    X, y, w = problem
    kwargs = dict(C=10.0, solver="newton-cg", tol=1e-10)
    reference = LogisticRegression(**kwargs).fit(X, y, sample_weight=w)
    mixed = LogisticRegression(product_dtype="float32", **kwargs).fit(X, y, sample_weight=w)
    assert mixed.coef_.dtype == np.float64
    np.testing.assert_allclose(mixed.coef_, reference.coef_, atol=1e-6)
    np.testing.assert_allclose(mixed.intercept_, reference.intercept_, atol=1e-6)
    cv = dict(Cs=[0.1, 10.0], cv=3, solver="newton-cg", tol=1e-10)
    reference = LogisticRegressionCV(**cv).fit(X, y)
    mixed = LogisticRegressionCV(product_dtype="float32", **cv).fit(X, y)
    np.testing.assert_allclose(mixed.scores_, reference.scores_)
    np.testing.assert_allclose(mixed.coef_, reference.coef_, atol=1e-6)
    with pytest.raises(ValueError, match="product_dtype"):
        LogisticRegression(product_dtype="float16").fit(X, y)


def test_the_estimator_builds_the_mixed_solver():
    from xentropy_jax.sklearn import _core_solver

    assert _core_solver("newton-cg", 10) == "newton-cg"
    assert _core_solver("newton-cg", 10, "float32") == NewtonCG(product_dtype="float32")
    wide = NewtonCG(preconditioner="diagonal", product_dtype="float32")
    assert _core_solver("newton-cg", 5000, "float32") == wide
    assert _core_solver("newton", 10, "float32") == "newton"
    assert _core_solver("trust-region", 10) == "trust-region"
    assert _core_solver("trust-region", 10, "float32") == TrustRegion(product_dtype="float32")
    wide = TrustRegion(preconditioner="diagonal", product_dtype="float32")
    assert _core_solver("trust-region", 5000, "float32") == wide


def test_the_streamed_fit_keeps_its_own_products(problem):
    from xentropy_jax.solvers import fit_logistic_regression_streamed

    X, y, _ = problem
    reference = fit_logistic_regression_streamed(X, y, 5, l2=1e-3, tol=1e-10, chunk_rows=200)
    result = fit_logistic_regression_streamed(
        X, y, 5, l2=1e-3, tol=1e-10, chunk_rows=200, solver=MIXED
    )
    assert int(result.n_hessian_products) == int(reference.n_hessian_products)
    np.testing.assert_array_equal(result.params[0], reference.params[0])
