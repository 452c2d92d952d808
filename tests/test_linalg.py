"""The solvers' factorisations under vmap: the same numbers, and no batched LAPACK call on CPU.

A batched LAPACK call on the CPU can hang the program when another runs at the same time (see
`xentropy_jax/solvers/_linalg.py`); LogisticRegressionCV hung that way on digits.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_iris

import xentropy_jax as xj
from xentropy_jax._batch_cond import batch_cond
from xentropy_jax.solvers import _linalg

jax.config.update("jax_enable_x64", True)


def spd_batch(size=12, batch=3, seed=0):
    a = np.random.default_rng(seed).normal(size=(batch, size, size))
    return a @ a.transpose(0, 2, 1) + size * np.eye(size)


def lapack_operands(text):
    """(target, operand type) of every LAPACK custom call in lowered StableHLO text."""
    return re.findall(r"custom_call @(lapack_\w+)\(.*?\).*?: \((tensor<[^>]*>)", text)


def test_batched_results_equal_jax_numpy():
    matrices = spd_batch()
    rhs = np.random.default_rng(1).normal(size=(3, 12))
    ours = jax.vmap(
        lambda m, b: (
            _linalg.eigh(m),
            _linalg.cholesky(m),
            _linalg.solve(m, b),
            _linalg.cholesky_solve(_linalg.cholesky(m), b),
        )
    )(matrices, rhs)
    values, vectors = jnp.linalg.eigh(matrices)
    np.testing.assert_allclose(ours[0][0], values, rtol=1e-13)
    # Eigenvectors up to sign: compare the projectors.
    np.testing.assert_allclose(
        np.abs(np.einsum("bij,bij->bj", ours[0][1], vectors)), 1.0, rtol=1e-12
    )
    np.testing.assert_allclose(ours[1], jnp.linalg.cholesky(matrices), rtol=1e-13)
    exact = np.linalg.solve(matrices, rhs[..., None])[..., 0]
    np.testing.assert_allclose(ours[2], exact, rtol=1e-11)
    np.testing.assert_allclose(ours[3], exact, rtol=1e-11)


def test_nested_vmap_unbatched_arguments_and_forward_mode():
    matrices = spd_batch(size=6, batch=4).reshape(2, 2, 6, 6)
    nested = jax.vmap(jax.vmap(lambda m: _linalg.eigh(m)[0]))(matrices)
    np.testing.assert_allclose(nested, np.linalg.eigvalsh(matrices), rtol=1e-13)
    # One batched argument, one not.
    rhs = np.arange(6.0)
    mixed = jax.vmap(_linalg.solve, in_axes=(0, None))(matrices[0], rhs)
    np.testing.assert_allclose(mixed, np.linalg.solve(matrices[0], rhs[None, :, None])[..., 0])
    tangent = spd_batch(size=6, batch=1, seed=2)[0]
    ours = jax.jvp(lambda m: _linalg.eigh(m)[0], (matrices[0, 0],), (tangent,))
    reference = jax.jvp(lambda m: jnp.linalg.eigh(m)[0], (matrices[0, 0],), (tangent,))
    np.testing.assert_allclose(ours[1], reference[1], rtol=1e-10)


@pytest.mark.parametrize("solver", ["newton", "newton-cg", "trust-region"])
def test_vmapped_fits_factorise_one_matrix_at_a_time(solver):
    X, y = load_iris(return_X_y=True)
    folds = np.ones((3, X.shape[0]))
    folds[np.arange(3), np.arange(3)] = 0.0

    def fit(weights):
        return xj.fit_logistic_regression(
            X, y, 3, sample_weight=weights, l2=1e-2, solver=solver, tol=1e-10, throw=False
        ).params[0]

    text = jax.jit(jax.vmap(fit)).lower(folds).as_text()
    calls = lapack_operands(text)
    assert calls, "the fit is expected to factorise something (Gram, Hessian or curvature)"
    batched = [call for call in calls if call[1].count("x") > 2]
    assert not batched, batched
    fitted = jax.vmap(fit)(folds)
    for index in range(3):
        np.testing.assert_allclose(fitted[index], fit(folds[index]), rtol=1e-8, atol=1e-10)


def test_cross_validated_path_factorises_one_matrix_at_a_time():
    X, y = load_iris(return_X_y=True)
    folds = np.ones((3, X.shape[0]))
    l2s = np.array([[1e-1, 1e-2], [1e-1, 1e-2], [1e-1, 1e-2]])

    def path(weights, l2):
        return xj.fit_regularization_path(X, y, 3, l2, sample_weight=weights, throw=False)

    calls = lapack_operands(jax.jit(jax.vmap(path)).lower(folds, l2s).as_text())
    assert calls and not [call for call in calls if call[1].count("x") > 2], calls


def test_batch_cond_keeps_forward_mode_values_unbatched():
    # jax.jacfwd batches the tangents alone: the rule must return the unbatched value as
    # unbatched (it broadcast it, and jacfwd failed on "out_axes ... was batched"). Like every
    # custom_vmap, batch_cond has forward mode only.
    def function(x):
        return batch_cond(x > 0, lambda v: v**3, lambda v: -(v**2), x)

    second = jax.jacfwd(jax.jacfwd(function))
    assert second(2.0) == 12.0
    assert second(-2.0) == -2.0
    # Batched predicates still choose member by member.
    np.testing.assert_array_equal(jax.vmap(function)(jnp.array([2.0, -2.0])), [8.0, -4.0])
    np.testing.assert_array_equal(jax.vmap(second)(jnp.array([2.0, -2.0])), [12.0, -2.0])
