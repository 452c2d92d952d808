"""The package under JAX's strict dtype promotion (``jax_numpy_dtype_promotion="strict"``).

Strict mode refuses every implicit promotion, so that a program's dtypes are all explicit. The
package computed its own working dtypes with ``jnp.promote_types(dtype, float32)``, which strict
mode refuses for float64 and bfloat16, and mixed booleans, int32 and int64 labels, and half- and
single-precision arrays in a few products: with the caller's consistent inputs every loss, CG
solve, curvature product, optax step and fit raised ``TypePromotionError``. These tests trace
each call under strict mode (its dtypes are settled when it is traced, so nothing is compiled)
and check that it gives what standard mode gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentropy_jax as xj

RNG = np.random.default_rng(0)


def _calls(dtype) -> dict:
    """Public calls on inputs of one floating dtype (the fits' features at least float32)."""
    logits = jnp.asarray(RNG.normal(size=(6, 3)), dtype)
    labels = jnp.arange(6) % 3
    soft = jax.nn.softmax(logits)
    data = np.float32 if dtype == jnp.bfloat16 else dtype
    X, y = jnp.asarray(RNG.normal(size=(40, 2)), data), jnp.asarray(np.arange(40) % 3)
    inputs, W = X.astype(dtype), jnp.zeros((2, 3), dtype)
    params = {"w": W, "b": jnp.zeros((3,), dtype)}
    key = jax.random.key(0)
    hidden, head = logits[:, :2], jnp.asarray(RNG.normal(size=(2, 10)), dtype)

    def model(p, x):
        return x @ p["w"] + p["b"][None, :]

    def step(optimizer, **options):
        gradient = jax.tree.map(jnp.ones_like, params)
        state = optimizer.init(params)
        return optimizer.update(gradient, state, params, logits_fn=model, inputs=inputs, **options)

    def integer_loss(z):
        return xj.softmax_cross_entropy_with_integer_labels(z, labels).sum()

    calls = {
        "integer loss, gradient, Hessian": lambda: jax.hessian(integer_loss)(logits),
        "soft labels": lambda: jax.grad(lambda z: xj.softmax_cross_entropy(z, soft).sum())(logits),
        "safe": lambda: xj.safe_softmax_cross_entropy(logits, soft),
        "row mask": lambda: xj.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=labels > 0
        ),
        # The count of included classes was int32 beside float labels.
        "class mask and smoothing": lambda: xj.softmax_cross_entropy(
            logits, soft, where=logits > -1, label_smoothing=0.1
        ),
        "integer, class mask and smoothing": lambda: xj.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=logits > -1, label_smoothing=0.1
        ),
        "Hessian product": lambda: xj.softmax_cross_entropy_hvp(logits, logits),
        "cg": lambda: jax.grad(lambda b: xj.cg(lambda v: 2 * v, b).solution.sum())(logits[0]),
        "ggn_vp": lambda: xj.ggn_vp(model, params, inputs, params),
        "hessian_vp": lambda: xj.hessian_vp(model, params, inputs, y, params),
        "ggn_diagonal": lambda: xj.ggn_diagonal(model, params, inputs),
        "bartlett": lambda: xj.ggn_diagonal_bartlett(model, params, inputs, key=key, num_samples=2),
        "head": lambda: jax.grad(
            lambda w: xj.linear_softmax_cross_entropy(hidden, w, labels, vocab_chunk_size=4).sum()
        )(head),
        "gauss_newton": lambda: step(xj.gauss_newton()),
        "sophia_g": lambda: step(xj.sophia_g(update_interval=1)),
        "scale_by_ggn_diagonal": lambda: step(xj.scale_by_ggn_diagonal()),
    }
    if dtype != jnp.bfloat16:
        calls |= {
            "fit": lambda: xj.fit_logistic_regression(X, y, 3, l2=1e-2, solver="trust-region"),
            "fit, l2 = 0": lambda: xj.fit_logistic_regression(X, y, 3),
            "derivative of a fit": lambda: jax.grad(
                lambda l2: xj.fit_logistic_regression(X, y, 3, l2=l2).params[0].sum()
            )(jnp.asarray(1e-2, data)),
            "path": lambda: xj.fit_regularization_path(X, y, 3, jnp.asarray([1e-1, 1e-2], data)),
        }
    return calls


def _typed(leaf) -> tuple:
    return leaf.shape, leaf.dtype


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_strict_promotion_traces_what_standard_promotion_traces(dtype):
    for name, call in _calls(dtype).items():
        standard = jax.eval_shape(call)
        with jax.numpy_dtype_promotion("strict"):
            strict = jax.eval_shape(call)
        assert jax.tree.map(_typed, strict) == jax.tree.map(_typed, standard), name


def test_strict_promotion_runs_the_streamed_fit_and_inference():
    X, y = RNG.normal(size=(40, 2)), np.arange(40) % 3
    with jax.numpy_dtype_promotion("strict"):
        streamed = xj.fit_logistic_regression_streamed(X, y, 3)
        inference = xj.logit_inference(xj.fit_logistic_regression(X, y, 3), X, y)
    assert int(streamed.status) == xj.Status.CONVERGED
    assert np.all(np.isfinite(inference.bse))
