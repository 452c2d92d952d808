"""GGN diagonals: exact against explicit matrices, estimators unbiased (fixed seeds)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import xentropy_jax as xj
from xentropy_jax._diagonals import _sqrt_factor_rows

N, D, H, K = 7, 3, 4, 5
WEIGHTS = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.5])
MASS = np.linspace(0.5, 2.0, N)


def mlp(params, inputs):
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"][None, :])
    return hidden @ params["w2"] + params["b2"][None, :]


def linear(params, inputs):
    return inputs @ params["w"] + params["b"][None, :]


def make_problem(model, dtype=jnp.float64):
    keys = jax.random.split(jax.random.key(0), 6)
    inputs = jax.random.normal(keys[0], (N, D), dtype)
    if model is mlp:
        shapes = {"w1": (D, H), "b1": (H,), "w2": (H, K), "b2": (K,)}
    else:
        shapes = {"w": (D, K), "b": (K,)}
    params = {
        name: jax.random.normal(k, shape, dtype)
        for k, (name, shape) in zip(keys[1:], shapes.items(), strict=False)
    }
    return params, inputs


def explicit_ggn_diagonal(model, params, inputs, weights=None, mass=1.0):
    """diag(Σᵢ cᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ) from the dense Jacobian of jax.jacfwd."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacfwd(lambda theta: model(unravel(theta), inputs))(flat)
    probs = jax.nn.softmax(model(params, inputs))
    hessians = jax.vmap(jnp.diag)(probs) - probs[:, :, None] * probs[:, None, :]
    weights = np.ones(N) if weights is None else weights
    c = weights * mass / weights.sum()
    return jnp.einsum("n,nkp,nkl,nlp->p", c, jacobian, hessians, jacobian)


def flat(tree):
    return ravel_pytree(tree)[0]


def test_square_root_factor_reproduces_the_loss_hessian():
    logits = jax.random.normal(jax.random.key(1), (3, K)).at[1, 2].set(-jnp.inf)
    rows = jax.vmap(_sqrt_factor_rows)(logits)
    np.testing.assert_allclose(
        jnp.einsum("nki,nkj->nij", rows, rows),
        xj.softmax_cross_entropy_hessian(logits),
        atol=1e-15,
    )


@pytest.mark.parametrize("model", [mlp, linear])
@pytest.mark.parametrize(
    ("weights", "mass", "chunk_size"),
    [(None, 1.0, None), (WEIGHTS, MASS, 3), (None, 2.0, 1)],
)
def test_exact_diagonal_matches_explicit_matrix(model, weights, mass, chunk_size):
    params, inputs = make_problem(model)
    got = xj.ggn_diagonal(
        model, params, inputs, sample_weight=weights, label_mass=mass, chunk_size=chunk_size
    )
    expected = explicit_ggn_diagonal(model, params, inputs, weights, mass)
    np.testing.assert_allclose(flat(got), expected, rtol=1e-12, atol=1e-15)


def test_exact_diagonal_is_differentiable():
    # The factor rows came from stop_gradient(logits): the derivative of diag(G) in the
    # parameters or inputs dropped how s moves (0.72 off for this MLP, 1.0 for a linear model).
    params, inputs = make_problem(mlp)
    probe = jax.random.normal(jax.random.key(3), flat(params).shape, jnp.float64)

    def ours(p, x):
        return flat(xj.ggn_diagonal(mlp, p, x, sample_weight=WEIGHTS)) @ probe

    def reference(p, x):
        return explicit_ggn_diagonal(mlp, p, x, WEIGHTS) @ probe

    for argnum in (0, 1):
        got = jax.grad(ours, argnum)(params, inputs)
        expected = jax.grad(reference, argnum)(params, inputs)
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_exact_diagonal_derivatives_in_the_weights(chunk_size):
    # Each example's rows were scaled by √cᵢ: with a weight of 0 (WEIGHTS has one), the
    # infinite derivative of √ at 0 made every derivative in the weights and the label mass
    # NaN. Second order too: d²/dw² and the mixed derivative in the weights and parameters.
    params, inputs = make_problem(mlp)
    probe = jax.random.normal(jax.random.key(3), flat(params).shape, jnp.float64)
    mass = jnp.asarray(np.where(WEIGHTS > 0, MASS, 0.0))

    def ours(w, m, p=params):
        diagonal = xj.ggn_diagonal(
            mlp, p, inputs, sample_weight=w, label_mass=m, chunk_size=chunk_size
        )
        return flat(diagonal) @ probe

    def reference(w, m, p=params):
        return explicit_ggn_diagonal(mlp, p, inputs, w, m) @ probe

    weights = jnp.asarray(WEIGHTS)
    got = jax.grad(ours, (0, 1))(weights, mass)
    expected = jax.grad(reference, (0, 1))(weights, mass)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    # Forward over forward: a second derivative in the weights that starts in reverse mode
    # (jax.hessian, jax.jacrev(jax.grad)) is still NaN at a zero weight.
    np.testing.assert_allclose(
        jax.jacfwd(jax.jacfwd(ours))(weights, mass),
        jax.jacfwd(jax.jacfwd(reference))(weights, mass),
        rtol=1e-10,
        atol=1e-14,
    )
    # With every weight positive, reverse mode too, whatever the chunk size: the last chunk's
    # padding rows (weight 0) made jax.hessian NaN where chunk_size did not divide N.
    positive, positive_mass = jnp.where(weights > 0, weights, 0.7), jnp.asarray(MASS)
    np.testing.assert_allclose(
        jax.hessian(ours)(positive, positive_mass),
        jax.hessian(reference)(positive, positive_mass),
        rtol=1e-10,
        atol=1e-14,
    )
    mixed = jax.grad(lambda p: jax.grad(ours)(weights, mass, p) @ weights)(params)
    expected_mixed = jax.grad(lambda p: jax.grad(reference)(weights, mass, p) @ weights)(params)
    np.testing.assert_allclose(flat(mixed), flat(expected_mixed), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_exact_diagonal_of_a_half_precision_model(dtype):
    # The float32 coefficient promoted the rows, and the model's VJP refused them (ValueError).
    params, inputs = make_problem(linear, jnp.float32)
    half = jax.tree.map(lambda x: x.astype(dtype), (params, inputs))
    got = xj.ggn_diagonal(linear, *half, sample_weight=WEIGHTS)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(got))
    expected = xj.ggn_diagonal(
        linear, *jax.tree.map(lambda x: x.astype(jnp.float32), half), sample_weight=WEIGHTS
    )
    np.testing.assert_allclose(
        flat(got).astype(np.float32), flat(expected), rtol=3e-2, atol=3e-2 * flat(expected).max()
    )


def test_exact_diagonal_is_the_diagonal_of_the_ggn_operator():
    params, inputs = make_problem(mlp)
    flat_params, unravel = ravel_pytree(params)
    operator = xj.ggn_operator(mlp, params, inputs, sample_weight=WEIGHTS)
    columns = jax.vmap(lambda e: flat(operator(unravel(e))))(jnp.eye(flat_params.size))
    got = jax.jit(lambda p: xj.ggn_diagonal(mlp, p, inputs, sample_weight=WEIGHTS))(params)
    np.testing.assert_allclose(flat(got), jnp.diag(columns), rtol=1e-12, atol=1e-15)


def assert_unbiased(draws, exact, num_sigmas=4.0):
    """The mean of independent draws is within a few standard errors of ``exact``, per entry."""
    mean = draws.mean(axis=0)
    standard_error = draws.std(axis=0, ddof=1) / np.sqrt(draws.shape[0])
    z_scores = np.abs(mean - exact) / np.maximum(standard_error, 1e-12)
    assert z_scores.max() < num_sigmas, (z_scores.max(), np.argmax(z_scores))
    # Not a vacuous pass: the draws do scatter, and their mean is informative.
    assert standard_error.max() > 0
    assert np.abs(mean - exact).max() < 0.1 * np.abs(exact).max()


@pytest.mark.parametrize("estimator", [xj.ggn_diagonal_hutchinson, xj.ggn_diagonal_bartlett])
def test_estimators_are_unbiased(estimator):
    params, inputs = make_problem(mlp)
    exact = explicit_ggn_diagonal(mlp, params, inputs, WEIGHTS, MASS)

    @jax.jit
    def draw(key):
        estimate = estimator(
            mlp, params, inputs, key, sample_weight=WEIGHTS, label_mass=MASS, num_samples=1
        )
        return flat(estimate)

    keys = jax.random.split(jax.random.key(42), 4000)
    draws = np.asarray(jax.lax.map(draw, keys, batch_size=500))
    assert_unbiased(draws, np.asarray(exact))


@pytest.mark.parametrize("estimator", [xj.ggn_diagonal_hutchinson, xj.ggn_diagonal_bartlett])
def test_num_samples_averages_independent_draws(estimator):
    params, inputs = make_problem(linear)
    key = jax.random.key(3)
    single = flat(jax.jit(lambda k: estimator(linear, params, inputs, k))(key))
    many = flat(jax.jit(lambda k: estimator(linear, params, inputs, k, num_samples=64))(key))
    exact = explicit_ggn_diagonal(linear, params, inputs)
    # Averaging 64 draws shrinks the error (with this seed, by far more than the margin).
    assert np.abs(many - exact).mean() < 0.5 * np.abs(single - exact).mean()
    if estimator is xj.ggn_diagonal_bartlett:
        assert np.all(many >= 0)


def test_bartlett_with_equal_weights_is_n_times_squared_mean_gradient():
    params, inputs = make_problem(mlp)
    key = jax.random.key(9)
    estimate = xj.ggn_diagonal_bartlett(mlp, params, inputs, key)
    # The same labels as the estimator draws: categorical of the logits under the split key.
    (sample_key,) = jax.random.split(key, 1)
    labels = jax.random.categorical(sample_key, mlp(params, inputs), axis=-1, mode="high")
    gradient = jax.grad(xj.mean_cross_entropy, argnums=1)(mlp, params, inputs, labels)
    np.testing.assert_allclose(flat(estimate), N * flat(gradient) ** 2, rtol=1e-12)


def test_float32_and_vmap_over_keys():
    params, inputs = make_problem(mlp)
    params32, inputs32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, inputs))
    exact = flat(xj.ggn_diagonal(mlp, params, inputs))
    got = jax.jit(lambda p, x: xj.ggn_diagonal(mlp, p, x, sample_weight=np.ones(N)))(
        params32, inputs32
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
    np.testing.assert_allclose(flat(got), exact, rtol=1e-4, atol=1e-6)
    keys = jax.random.split(jax.random.key(0), 2)
    for estimator in (xj.ggn_diagonal_hutchinson, xj.ggn_diagonal_bartlett):
        draws = jax.jit(jax.vmap(lambda k, e=estimator: e(mlp, params32, inputs32, k)))(keys)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(draws))
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(draws))
        assert not np.allclose(
            flat(jax.tree.map(lambda x: x[0], draws)), flat(jax.tree.map(lambda x: x[1], draws))
        )


def test_numpy_inputs_give_the_same_numbers():
    # Users pass NumPy arrays; the exact diagonal indexes its inputs by traced row numbers.
    params, inputs = make_problem(mlp)
    host = np.asarray(inputs)
    key = jax.random.key(3)
    tangent = jax.tree.map(jnp.ones_like, params)
    labels = np.arange(N) % K
    pairs = [
        (xj.ggn_diagonal(mlp, params, host, chunk_size=3), xj.ggn_diagonal(mlp, params, inputs)),
        (
            xj.ggn_diagonal_hutchinson(mlp, params, host, key),
            xj.ggn_diagonal_hutchinson(mlp, params, inputs, key),
        ),
        (
            xj.ggn_diagonal_bartlett(mlp, params, host, key),
            xj.ggn_diagonal_bartlett(mlp, params, inputs, key),
        ),
        (xj.ggn_vp(mlp, params, host, tangent), xj.ggn_vp(mlp, params, inputs, tangent)),
        (
            xj.hessian_vp(mlp, params, host, labels, tangent),
            xj.hessian_vp(mlp, params, inputs, jnp.asarray(labels), tangent),
        ),
    ]
    for got, expected in pairs:
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-12, atol=1e-15)


def test_bad_input_raises_clear_errors():
    params, inputs = make_problem(mlp)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="chunk_size"):
        xj.ggn_diagonal(mlp, params, inputs, chunk_size=0)
    with pytest.raises(ValueError, match="leading axis"):
        xj.ggn_diagonal(lambda p, x: mlp(p, x["a"]), params, {"a": inputs, "b": jnp.ones(3)})
    for estimator in (xj.ggn_diagonal_hutchinson, xj.ggn_diagonal_bartlett):
        with pytest.raises(ValueError, match="num_samples"):
            estimator(mlp, params, inputs, key, num_samples=0)
        with pytest.raises(ValueError, match="non-negative"):
            estimator(mlp, params, inputs, key, sample_weight=-np.ones(N))


def batch_normalised_mlp(params, inputs):
    """Standardises the hidden layer over the batch: a row's logits depend on every row."""
    hidden = inputs @ params["w1"] + params["b1"][None, :]
    centred = hidden - hidden.mean(axis=0, keepdims=True)
    normalised = centred / jnp.sqrt(jnp.mean(centred**2, axis=0, keepdims=True) + 1e-3)
    return jnp.tanh(normalised) @ params["w2"] + params["b2"][None, :]


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_exact_diagonal_refuses_models_that_mix_rows(dtype):
    # One example alone normalises to zero, so per-example passes see constant logits and gave
    # a diagonal of zeros for w1 and b1, with no error.
    params, inputs = make_problem(mlp, dtype)
    with pytest.raises(ValueError, match="row i of the logits"):
        xj.ggn_diagonal(batch_normalised_mlp, params, inputs)
    traced = jax.jit(lambda p, x: xj.ggn_diagonal(batch_normalised_mlp, p, x, chunk_size=2))
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(traced(params, inputs)))
    # Row-independent models pass the check in both precisions, eagerly and traced, and
    # under grad of the diagonal (the check takes no derivatives).
    assert np.isfinite(flat(xj.ggn_diagonal(mlp, params, inputs))).all()
    assert np.isfinite(flat(jax.jit(lambda p: xj.ggn_diagonal(mlp, p, inputs))(params))).all()
    slope = jax.grad(lambda p: flat(xj.ggn_diagonal(mlp, p, inputs)).sum())(params)
    assert np.isfinite(flat(slope)).all()


@pytest.mark.parametrize("order", ["causal", "anticausal"])
def test_exact_diagonal_refuses_models_whose_rows_read_earlier_or_later_rows(order):
    # A prefix sum over the batch (a causal model run on one sequence): row 0 of the logits
    # reads only row 0, so the check from the first row alone passed it, and the per-example
    # squares came out up to 40% off with no error. The reversed sum shows from the first row.
    params, inputs = make_problem(linear)

    def running(p, x):
        summed = jax.lax.cumsum(x, axis=0, reverse=order == "anticausal")
        return linear(p, summed)

    with pytest.raises(ValueError, match="first or last row"):
        xj.ggn_diagonal(running, params, inputs)
    traced = jax.jit(lambda p: xj.ggn_diagonal(running, p, inputs))(params)
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(traced))


def test_exact_diagonal_second_derivatives():
    # The diagonal runs a scan over chunks, where JAX takes a second derivative through the
    # losses' primal computation: jax.hessian of its sum was 0.65 off (entries up to 1.3).
    params, inputs = make_problem(linear)

    def reference(p):  # the closed form Σᵢ xᵢ² sᵢ(1 − sᵢ) / N by plain autodiff
        probs = jax.nn.softmax(linear(p, inputs))
        return {
            "w": jnp.einsum("nd,nk->dk", inputs**2, probs * (1 - probs)) / N,
            "b": jnp.mean(probs * (1 - probs), axis=0),
        }

    def total(diagonal):
        return lambda p: sum(jnp.sum(leaf) for leaf in jax.tree.leaves(diagonal(p)))

    ours = total(lambda p: xj.ggn_diagonal(linear, p, inputs, chunk_size=3))
    for derivative in (jax.hessian, lambda f: jax.jacrev(jax.jacrev(f))):
        got, expected = derivative(ours)(params), derivative(total(reference))(params)
        np.testing.assert_allclose(flat(got), flat(expected), atol=1e-13)


@pytest.mark.parametrize("case", ["masked class", "underflow"])
def test_exact_diagonal_derivatives_where_a_probability_is_zero(case):
    # √s of the square-root factor has an infinite slope at s = 0: a class masked by a -inf
    # logit, or one whose probability underflowed, made every derivative of the diagonal NaN.
    params, inputs = make_problem(linear)
    included = jnp.arange(K) < K - 1
    scale = 1.0 if case == "masked class" else 300.0

    def model(p, x):
        logits = scale * linear(p, x)
        return jnp.where(included, logits, -jnp.inf) if case == "masked class" else logits

    def reference(p):  # Σᵢ xᵢ² sᵢ(1 − sᵢ) / N, the softmax over the included classes only
        logits = jnp.where(included, model(p, inputs), 0)
        probs = jnp.where(included, jax.nn.softmax(logits, where=included), 0)
        # 1 − sₖ as the sum of the others: by subtraction it rounds at these margins.
        others = jnp.sum(jnp.where(jnp.eye(K, dtype=bool), 0, probs[:, None, :]), axis=-1)
        curvature = scale**2 * probs * others
        return {"w": jnp.einsum("nd,nk->dk", inputs**2, curvature) / N, "b": curvature.mean(0)}

    def total(diagonal):
        return lambda p: sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(diagonal(p)))

    ours = total(lambda p: xj.ggn_diagonal(model, p, inputs, chunk_size=3))
    if case == "underflow":
        assert float(jnp.min(jax.nn.softmax(model(params, inputs)))) == 0  # the premise
    for derivative in (jax.grad, jax.hessian, lambda f: jax.jacrev(jax.jacrev(f))):
        got, expected = derivative(ours)(params), derivative(total(reference))(params)
        assert np.all(np.isfinite(flat(got)))
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-9, atol=1e-12)


def test_row_check_allows_no_rounding_for_independent_rows():
    # The first check compared one example's logits with the batched ones, allowing √ε: a
    # linear model on float32 features near 1e4 (its intercept cancelling the offset) failed
    # it at chunk_size=1, and an elementwise bfloat16 model failed it eagerly.
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(64, 20)) * 3 + 1e4, jnp.float32)
    W = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
    params = {"w": W, "b": -(jnp.float32(1e4) * W.sum(0))}
    for chunk_size in (None, 5, 1):
        eager = xj.ggn_diagonal(linear, params, X, chunk_size=chunk_size)
        traced = jax.jit(lambda p, c=chunk_size: xj.ggn_diagonal(linear, p, X, chunk_size=c))
        assert np.isfinite(flat(eager)).all() and np.isfinite(flat(traced(params))).all()
    half = jnp.asarray(rng.normal(size=(32, 16)) + 30.0, jnp.bfloat16)
    weights = jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.bfloat16)

    def elementwise(p, x):
        return (x[:, :, None] * p["w"][None]).sum(1) + p["b"][None, :]

    diagonal = xj.ggn_diagonal(elementwise, {"w": weights, "b": jnp.zeros(4, jnp.bfloat16)}, half)
    assert np.isfinite(np.asarray(diagonal["w"], np.float32)).all()


def test_ggn_diagonal_refuses_a_model_that_closes_over_per_row_arrays():
    # The one-row call returned all N rows, and the first was taken: a diagonal 0.16 off.
    rng = np.random.default_rng(0)
    X, W = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(3, 4)))
    bias = jnp.asarray(rng.normal(size=(4, 4)))
    with pytest.raises(ValueError, match="through inputs"):
        xj.ggn_diagonal(lambda W, x: x @ W + bias, W, X)
    through_inputs = xj.ggn_diagonal(lambda W, inputs: inputs[0] @ W + inputs[1], W, (X, bias))
    exact = jax.hessian(
        lambda w: xj.mean_cross_entropy(lambda w, x: x @ w + bias, w, X, jnp.zeros(4, int))
    )(W).reshape(12, 12)
    np.testing.assert_allclose(through_inputs.ravel(), jnp.diag(exact), rtol=1e-12, atol=1e-15)


def test_bartlett_gives_rows_of_only_masked_classes_no_curvature():
    # The sampler drew class 0 for a row with every class at −inf, which added (Jᵀe₀)² to the
    # mean: the other rows have zero features here, so the exact diagonal is 0.
    X = jnp.zeros((4, 3)).at[2].set(jnp.array([1.0, -2.0, 0.5]))
    mask = jnp.zeros((4, 4)).at[2].set(-jnp.inf)
    W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))

    def masked(W, inputs):
        return inputs[0] @ W + inputs[1]

    np.testing.assert_array_equal(xj.ggn_diagonal(masked, W, (X, mask)), 0)
    estimate = xj.ggn_diagonal_bartlett(masked, W, (X, mask), jax.random.key(0), num_samples=64)
    np.testing.assert_array_equal(estimate, 0)


def test_bartlett_draws_with_the_high_range_sampler(monkeypatch):
    # The default ("low") Gumbel noise in float32 never draws classes of probability below
    # about 1e-7: a tail of 1,000 classes at margin 17 came out 10x low (a direct test needs
    # ~1e9 draws; this one checks the sampler asked for).
    modes = []
    categorical = jax.random.categorical

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return categorical(*args, **kwargs)

    monkeypatch.setattr(jax.random, "categorical", spy)
    params, inputs = make_problem(linear)
    xj.ggn_diagonal_bartlett(linear, params, inputs, jax.random.key(0), num_samples=2)
    assert modes and set(modes) == {"high"}
