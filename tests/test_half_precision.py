"""bfloat16 and float16 through curvature, CG and the optax transformations.

References are float64 closed forms evaluated on the same rounded inputs, never the package's
own float64 path. Each case failed before its fix: the products and diagonals lost the per-row
terms below float16's smallest normal number, sums and averages kept in bfloat16 stopped
growing, and half-precision dtypes were refused or sampled the wrong distribution.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import softmax

import xentropy_jax as xj

HALF = [jnp.bfloat16, jnp.float16]


def linear(W, X):
    return X @ W


def _f64(x):
    return np.asarray(x, np.float64)


def _random_linear_problem(dtype, n, d, k):
    """Normal X [n, d] and W [d, k] in ``dtype``, and the GGN diagonal of ``linear`` there.

    diag(G) = Σᵢ xᵢ² sᵢ(1 − sᵢ) / N, in float64 on the rounded inputs.
    """
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(n, d)), dtype)
    W = jnp.asarray(rng.normal(size=(d, k)), dtype)
    probs = softmax(_f64(X) @ _f64(W), axis=1)
    return X, W, (_f64(X) ** 2).T @ (probs * (1 - probs)) / n


def test_float16_ggn_products_keep_rows_below_the_smallest_normal():
    # Every row at margin 6 over N = 10⁵: each row's cᵢ(Hv)ᵢ ≈ 2.5e-8 is below float16's
    # smallest normal number (6.1e-5), and the product came out exactly 0.
    n, margin = 100_000, 6.0
    X = jnp.ones((n, 1), jnp.float16)
    W = jnp.array([[0.0, -margin]], jnp.float16)
    s = 1 / (1 + np.exp(margin))
    for scale in (1.0, 300.0):  # 300: the product ≈ 0.74, far above the per-row terms
        tangent = jnp.array([[0.0, scale]], jnp.float16)
        got = xj.ggn_vp(linear, W, X, tangent)
        assert got.dtype == jnp.float16
        np.testing.assert_allclose(_f64(got)[0], scale * s * (1 - s) * np.array([-1, 1]), rtol=2e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_ggn_diagonal_does_not_depend_on_chunks(dtype):
    # Summed chunk by chunk in bfloat16, the diagonal came out 0.49 to 0.55 of the truth with
    # chunk_size=1 (and 0.78 to 0.92 at the default chunk size of a larger model).
    X, W, exact = _random_linear_problem(dtype, 4000, 4, 3)
    for chunk_size in (1, 64):
        got = xj.ggn_diagonal(linear, W, X, chunk_size=chunk_size)
        assert got.dtype == dtype
        np.testing.assert_allclose(_f64(got), exact, rtol=2e-2)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_bartlett_samples_the_model_distribution(dtype):
    # Labels drawn with Gumbel noise in half precision came up 0.4 to 0.6 times as often as
    # their probability at margin 8, and the estimate was as biased.
    n, margin, samples = 1000, 8.0, 2000
    X = jnp.ones((n, 1), dtype)
    W = jnp.array([[0.0, -margin]], dtype)
    estimate = xj.ggn_diagonal_bartlett(linear, W, X, jax.random.key(0), num_samples=samples)
    s = 1 / (1 + np.exp(margin))
    # Per sample, N·ĝ² is N·s(1−s)·χ²₁-like: 4 standard errors of the mean are about 10%.
    np.testing.assert_allclose(_f64(estimate)[0], s * (1 - s), rtol=0.12)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 100.0])
def test_float16_cg_converges_on_a_finite_problem(scale):
    # The inner products summed in float16: ‖r‖² underflowed to 0 (CONVERGED after 2 steps at a
    # true residual of 0.35) or overflowed to inf (NON_FINITE at step 0).
    diagonal = jnp.asarray(np.linspace(1.0, 10.0, 20), jnp.float16)
    rhs = jnp.full(20, scale, jnp.float16)
    result = xj.cg(lambda v: diagonal * v, rhs, rtol=1e-2)
    assert int(result.status) == xj.CGStatus.CONVERGED
    residual = _f64(rhs) - _f64(diagonal) * _f64(result.solution)
    assert np.linalg.norm(residual) <= 2e-2 * np.linalg.norm(_f64(rhs))


def test_float16_sophia_leaves_unused_coordinates_at_zero():
    # ε = 1e-12 rounded to 0 in float16, and 0/0 made the unused feature's updates NaN.
    X = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.5, 0.0]], jnp.float16)
    W = jnp.zeros((2, 3), jnp.float16)
    labels = jnp.array([0, 1, 2])
    grad = jax.grad(lambda w: xj.mean_cross_entropy(linear, w, X, labels))(W)
    transform = xj.scale_by_sophia_g()
    updates, _ = transform.update(grad, transform.init(W), W, logits_fn=linear, inputs=X)
    assert updates.dtype == jnp.float16
    np.testing.assert_array_equal(_f64(updates)[1], 0.0)
    assert np.isfinite(_f64(updates)).all()


@pytest.mark.parametrize("dtype", HALF)
def test_curvature_averages_converge_in_half_precision(dtype):
    # At fixed parameters the estimate is constant, so the averages must reach it. Kept in
    # bfloat16, 0.99·h + 0.01·ĥ stopped moving at 0.65 of it.
    X, W, exact = _random_linear_problem(dtype, 64, 3, 4)
    sophia = xj.scale_by_sophia_g(estimator="exact", update_interval=1)
    diagonal = xj.scale_by_ggn_diagonal(estimator="exact", decay=0.99, power=1.0, damping=1e-30)
    ones = jnp.ones_like(W)

    def run(transform):
        def step(state, _):
            updates, state = transform.update(ones, state, W, logits_fn=linear, inputs=X)
            return state, updates

        return jax.jit(lambda s: jax.lax.scan(step, s, None, length=1000))(transform.init(W))

    state, _ = run(sophia)
    assert state.hessian.dtype == jnp.float32 and state.mu.dtype == dtype
    np.testing.assert_allclose(_f64(state.hessian), exact, rtol=2e-2)
    state, updates = run(diagonal)
    assert state.diagonal.dtype == jnp.float32 and updates.dtype == dtype
    np.testing.assert_allclose(1 / _f64(updates[-1]), exact, rtol=2e-2)


def test_bfloat16_is_taken_where_float16_is():
    # NumPy calls bfloat16 no number: every check refused it ("must be numeric") while it took
    # float16 in the same place.
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(100, 3)), jnp.bfloat16)
    labels = rng.integers(0, 3, 100)
    as_float32 = xj.fit_logistic_regression(_f64(X).astype(np.float32), labels, 3, l2=0.125)
    for options in (
        dict(),
        dict(sample_weight=jnp.ones(100, jnp.bfloat16)),
        dict(l2=jnp.bfloat16(0.125)),  # exact in bfloat16
    ):
        fit = xj.fit_logistic_regression(X, labels, 3, **{"l2": 0.125, **options})
        assert fit.params[0].dtype == as_float32.params[0].dtype
        np.testing.assert_allclose(fit.params[0], as_float32.params[0], rtol=1e-6, atol=1e-7)
    W = jnp.zeros((3, 3), jnp.bfloat16)
    damped = xj.ggn_vp(linear, W, X, W + 1, damping=jnp.bfloat16(0.5))
    np.testing.assert_allclose(_f64(damped - xj.ggn_vp(linear, W, X, W + 1)), 0.5, rtol=1e-2)
    solved = xj.cg(lambda v: 2 * v, jnp.ones(3), rtol=jnp.bfloat16(1e-2))
    np.testing.assert_allclose(solved.solution, 0.5)
    smoothed = xj.softmax_cross_entropy(
        jnp.zeros((1, 4)), jnp.eye(4)[:1], label_smoothing=jnp.bfloat16(0.25)
    )
    np.testing.assert_allclose(smoothed, np.log(4), rtol=1e-6)


def test_gauss_newton_takes_float32_gradients_of_bfloat16_parameters():
    # Mixed precision: gradients in float32 for bfloat16 parameters failed inside the GGN
    # operator ("tangents must match params").
    X = jax.random.normal(jax.random.key(0), (64, 3)).astype(jnp.bfloat16)
    labels = jnp.argmax(X, axis=-1)
    W = jnp.zeros((3, 3), jnp.bfloat16)
    grad = jax.grad(lambda w: xj.mean_cross_entropy(linear, w, X.astype(jnp.float32), labels))(
        W.astype(jnp.float32)
    )
    optimizer = xj.gauss_newton()
    mixed, state = optimizer.update(grad, optimizer.init(W), W, logits_fn=linear, inputs=X)
    assert mixed.dtype == jnp.float32 and state.direction.dtype == jnp.bfloat16
    same, _ = optimizer.update(
        grad.astype(jnp.bfloat16), optimizer.init(W), W, logits_fn=linear, inputs=X
    )
    np.testing.assert_array_equal(_f64(mixed), _f64(same))
    assert np.abs(_f64(mixed)).max() > 0


def test_float16_ggn_products_of_large_jacobians_stay_finite():
    # Lifting every float16 product's cotangents to a total of 2⁸ overflowed a model with
    # inputs of 1,000 (the product ≈ 250 came out inf); cotangents in range are left alone.
    X = jnp.array([[1000.0]], jnp.float16)
    W = jnp.zeros((1, 2), jnp.float16)
    got = xj.ggn_vp(linear, W, X, jnp.array([[1e-3, 0.0]], jnp.float16))
    # G = x² s(1 − s)·[[1, −1], [−1, 1]] / N with s = ½: (Gv)₀ = 1000² · ¼ · 1e-3.
    np.testing.assert_allclose(_f64(got)[0], [250.0, -250.0], rtol=2e-3)
    rng = np.random.default_rng(0)
    for scale in (1.0, 300.0, 3000.0):
        X64 = rng.normal(size=(8, 4)) * scale
        W64, V64 = rng.normal(size=(4, 3)) / scale, rng.normal(size=(4, 3)) / scale
        reference = xj.ggn_vp(linear, *(jnp.asarray(a, jnp.float32) for a in (W64, X64, V64)))
        half = xj.ggn_vp(linear, *(jnp.asarray(a, jnp.float16) for a in (W64, X64, V64)))
        np.testing.assert_allclose(_f64(half), _f64(reference), atol=4e-3 * np.abs(reference).max())


@pytest.mark.parametrize("dtype", HALF)
def test_injected_hyperparameters_in_half_precision(dtype):
    # optax.inject_hyperparams casts them to the parameters' dtype: bfloat16 ones were refused
    # as "not a number"; float16 rounds Sophia's ε = 1e-12 to 0, which is refused, with the
    # way out named.
    W = jnp.zeros((3, 3), dtype)
    for factory in (xj.scale_by_ggn_diagonal, xj.gauss_newton):
        optax.inject_hyperparams(factory)().init(W)
    if dtype == jnp.bfloat16:
        optax.inject_hyperparams(xj.sophia_g)(learning_rate=0.1).init(W)
    else:
        with pytest.raises(ValueError, match="hyperparam_dtype=jnp.float32"):
            optax.inject_hyperparams(xj.sophia_g)(learning_rate=0.1).init(W)
    optax.inject_hyperparams(xj.sophia_g, hyperparam_dtype=jnp.float32)(learning_rate=0.1).init(W)


def test_sophia_state_keeps_its_dtypes_with_float32_hyperparameters():
    # The float16 check's message advises hyperparam_dtype=jnp.float32; Sophia's gradient
    # moment then came back float32 from a float16 state, and a scan's carry changed type.
    X = jax.random.normal(jax.random.key(0), (32, 3))
    y = jnp.arange(32) % 4

    def linear(W, X):
        return X @ W.astype(jnp.float32)

    W = jnp.full((3, 4), 0.1, jnp.float16)
    optimizer = optax.inject_hyperparams(xj.sophia_g, hyperparam_dtype=jnp.float32)(
        learning_rate=0.1
    )

    def step(carry, _):
        W, state = carry
        grad = jax.grad(lambda W: xj.mean_cross_entropy(linear, W, X, y))(W)
        updates, state = optimizer.update(grad, state, W, logits_fn=linear, inputs=X)
        return (optax.apply_updates(W, updates), state), None

    state = optimizer.init(W)
    (W_after, after), _ = jax.lax.scan(step, (W, state), length=3)
    chex.assert_trees_all_equal_dtypes(after, state)
    assert W_after.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(W_after)))
