"""GGN and Hessian products of a model against explicit matrices (jax.jacfwd, jax.hessian)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import nested_jaxprs
from jax.flatten_util import ravel_pytree

import xentropy_jax as xj

N, D, H, K = 7, 3, 4, 5  # distinct sizes, so an [N, K, K] array is recognisable in a jaxpr


def mlp(params, inputs):
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"][None, :])
    return hidden @ params["w2"] + params["b2"][None, :]


def linear(params, inputs):
    return inputs @ params["w"] + params["b"][None, :]


def make_problem(model, dtype=jnp.float64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 8)
    inputs = jax.random.normal(keys[0], (N, D), dtype)
    if model is mlp:
        params = {
            "w1": jax.random.normal(keys[1], (D, H), dtype),
            "b1": jax.random.normal(keys[2], (H,), dtype),
            "w2": jax.random.normal(keys[3], (H, K), dtype),
            "b2": jax.random.normal(keys[4], (K,), dtype),
        }
    else:
        params = {
            "w": jax.random.normal(keys[1], (D, K), dtype),
            "b": jax.random.normal(keys[2], (K,), dtype),
        }
    labels = jax.random.randint(keys[5], (N,), 0, K)
    return params, inputs, labels


def naive_row_loss(logits, labels):
    """m·logsumexp(z) − yᵀz with log-softmax written out: an independent reference."""
    shifted = logits - jnp.max(logits)
    log_probs = shifted - jnp.log(jnp.sum(jnp.exp(shifted)))
    return -jnp.sum(labels * log_probs)


def coefficients(weights, mass):
    weights = np.ones(N) if weights is None else np.asarray(weights, float)
    return weights * mass / weights.sum()


# The references below are jitted (the model static): one compilation each, instead of one per
# primitive of eager jax.jacfwd and jax.hessian (seconds per test on a 2-core machine).


@functools.partial(jax.jit, static_argnums=0)
def model_jacobian_and_loss_hessians(model, params, inputs):
    """J [N, K, P] from jax.jacfwd, and Hᵢ [N, K, K] from jax.hessian of the naive loss."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacfwd(lambda theta: model(unravel(theta), inputs))(flat)  # [N, K, P]
    logits = model(params, inputs)
    unit = jnp.zeros(K).at[0].set(1.0)  # the loss Hessian does not depend on the label
    hessians = jax.vmap(jax.hessian(naive_row_loss), (0, None))(logits, unit)
    return jacobian, hessians


def explicit_ggn(model, params, inputs, weights=None, mass=1.0):
    """Σᵢ cᵢ Jᵢᵀ Hᵢ Jᵢ with J from jax.jacfwd and Hᵢ from jax.hessian of the naive loss."""
    jacobian, hessians = model_jacobian_and_loss_hessians(model, params, inputs)
    c = coefficients(weights, mass)
    return jnp.einsum("n,nkp,nkl,nlq->pq", c, jacobian, hessians, jacobian)


@functools.partial(jax.jit, static_argnums=0)
def naive_objective_hessian(model, params, inputs, labels_dense, c):
    flat, unravel = ravel_pytree(params)

    def objective(theta):
        logits = model(unravel(theta), inputs)
        return jnp.sum(c * jax.vmap(naive_row_loss)(logits, labels_dense))

    return jax.hessian(objective)(flat)


def explicit_hessian(model, params, inputs, labels_dense, weights=None):
    return naive_objective_hessian(model, params, inputs, labels_dense, coefficients(weights, 1.0))


def random_tangents(params, seed=1):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


def flat(tree):
    return ravel_pytree(tree)[0]


WEIGHTS = np.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.25, 1.5])


@pytest.mark.parametrize("model", [mlp, linear])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("mass", [1.0, 1.7])
def test_ggn_vp_is_jt_h_j(model, weights, mass):
    params, inputs, _ = make_problem(model)
    tangents = random_tangents(params)
    expected = explicit_ggn(model, params, inputs, weights, mass) @ flat(tangents)
    got = xj.ggn_vp(model, params, inputs, tangents, sample_weight=weights, label_mass=mass)
    np.testing.assert_allclose(flat(got), expected, rtol=1e-12, atol=1e-13)


def test_per_example_label_mass():
    params, inputs, _ = make_problem(mlp)
    tangents = random_tangents(params)
    mass = np.linspace(0.5, 2.0, N)
    flat_params, unravel = ravel_pytree(params)
    expected = sum(
        explicit_ggn(mlp, params, inputs, np.eye(N)[i] * 1.0, mass[i]) / N for i in range(N)
    )
    got = xj.ggn_vp(mlp, params, inputs, tangents, label_mass=mass)
    np.testing.assert_allclose(flat(got), expected @ flat(tangents), rtol=1e-12, atol=1e-13)


def test_operator_applies_many_vectors_and_damping_adds_lambda_v():
    params, inputs, _ = make_problem(mlp)
    ggn = explicit_ggn(mlp, params, inputs)
    flat_params, unravel = ravel_pytree(params)
    vectors = jax.random.normal(jax.random.key(3), (4, flat_params.size))
    damping = 0.37
    plain = xj.ggn_operator(mlp, params, inputs)
    damped = xj.ggn_operator(mlp, params, inputs, damping=damping)
    batch = jax.vmap(unravel)(vectors)
    plain_out = jax.vmap(lambda v: flat(plain(v)))(batch)
    damped_out = jax.vmap(lambda v: flat(damped(v)))(batch)
    np.testing.assert_allclose(plain_out, vectors @ ggn.T, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(damped_out - plain_out, damping * vectors, rtol=1e-12, atol=1e-13)


def test_ggn_is_symmetric_psd_with_model_null_space():
    params, inputs, _ = make_problem(mlp)
    flat_params, unravel = ravel_pytree(params)
    operator = xj.ggn_operator(mlp, params, inputs)
    matrix = jax.vmap(lambda e: flat(operator(unravel(e))))(jnp.eye(flat_params.size))
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-13)
    assert np.linalg.eigvalsh(matrix).min() > -1e-12
    # Adding the same constant to every logit leaves the loss unchanged: b2 along 1 is null.
    null = jax.tree.map(jnp.zeros_like, params)
    null["b2"] = jnp.ones(K)
    np.testing.assert_allclose(flat(operator(null)), 0.0, atol=1e-13)


def test_ggn_equals_fisher_summed_over_all_labels():
    params, inputs, _ = make_problem(mlp)
    flat_params, unravel = ravel_pytree(params)
    probs = jax.nn.softmax(mlp(params, inputs))

    def example_loss(theta, i, label):
        logits = mlp(unravel(theta), inputs[i : i + 1])[0]
        return naive_row_loss(logits, jax.nn.one_hot(label, K))

    fisher = jnp.zeros((flat_params.size, flat_params.size))
    for i in range(N):
        for label in range(K):
            g = jax.grad(example_loss)(flat_params, i, label)
            fisher += probs[i, label] * jnp.outer(g, g) / N
    operator = xj.ggn_operator(mlp, params, inputs)
    ggn = jax.vmap(lambda e: flat(operator(unravel(e))))(jnp.eye(flat_params.size))
    np.testing.assert_allclose(ggn, fisher, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("soft", [False, True])
def test_hessian_vp_matches_jax_hessian_of_naive_loss(weights, soft):
    params, inputs, labels = make_problem(mlp)
    dense = jax.nn.one_hot(labels, K)
    if soft:  # soft labels of mass 1.3, so the residual m·s − y is not the one-hot one
        dense = 1.3 * jax.nn.softmax(jax.random.normal(jax.random.key(7), (N, K)))
    tangents = random_tangents(params)
    expected = explicit_hessian(mlp, params, inputs, dense, weights) @ flat(tangents)
    got = xj.hessian_vp(
        mlp, params, inputs, dense if soft else labels, tangents, sample_weight=weights
    )
    np.testing.assert_allclose(flat(got), expected, rtol=1e-11, atol=1e-13)
    # The MLP has curvature of its own: the test above would see it if it were dropped.
    ggn = xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=weights, label_mass=dense.sum(-1))
    assert np.abs(flat(ggn) - expected).max() > 1e-3


@pytest.mark.parametrize("soft", [False, True])
def test_linear_model_ggn_equals_hessian(soft):
    params, inputs, labels = make_problem(linear)
    mass = 1.0
    if soft:
        labels = 2.5 * jax.nn.softmax(jax.random.normal(jax.random.key(8), (N, K)))
        mass = labels.sum(-1)
    flat_params, unravel = ravel_pytree(params)
    basis = jax.vmap(unravel)(jnp.eye(flat_params.size))
    ggn = jax.vmap(lambda e: flat(xj.ggn_vp(linear, params, inputs, e, label_mass=mass)))(basis)
    hessian = jax.vmap(lambda e: flat(xj.hessian_vp(linear, params, inputs, labels, e)))(basis)
    np.testing.assert_allclose(ggn, hessian, rtol=1e-12, atol=1e-13)
    dense = labels if soft else jax.nn.one_hot(labels, K)
    np.testing.assert_allclose(ggn, explicit_hessian(linear, params, inputs, dense), atol=1e-12)


def test_products_are_differentiable_in_params_and_inputs():
    # The probabilities were computed from stop_gradient(logits): d/dθ of vᵀ G(θ) v lost how s
    # moves with θ (exactly 0 for a linear model, 0.61 off for this MLP).
    params, inputs, _ = make_problem(mlp)
    tangents = random_tangents(params)
    v = flat(tangents)

    def ours(p, x):
        return flat(xj.ggn_vp(mlp, p, x, tangents, sample_weight=WEIGHTS)) @ v

    def reference(p, x):
        jacobian, hessians = model_jacobian_and_loss_hessians(mlp, p, x)
        c = coefficients(WEIGHTS, 1.0)
        return jnp.einsum("n,nkp,nkl,nlq,p,q->", c, jacobian, hessians, jacobian, v, v)

    for argnum in (0, 1):
        got = jax.jit(jax.grad(ours, argnum))(params, inputs)
        expected = jax.grad(reference, argnum)(params, inputs)
        np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-11, atol=1e-14)


def test_mean_cross_entropy_is_the_weighted_mean():
    params, inputs, labels = make_problem(mlp)
    rows = jax.vmap(naive_row_loss)(mlp(params, inputs), jax.nn.one_hot(labels, K))
    got = xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=WEIGHTS)
    np.testing.assert_allclose(got, np.sum(WEIGHTS * rows) / WEIGHTS.sum(), rtol=1e-13)
    np.testing.assert_allclose(xj.mean_cross_entropy(mlp, params, inputs, labels), rows.mean())


def test_masked_examples_are_dropped_and_weights_are_scale_free():
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    mask = np.array([True, False, True, True, False, True, True])
    masked = xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=mask)
    subset = xj.ggn_vp(mlp, params, inputs[mask], tangents)
    np.testing.assert_allclose(flat(masked), flat(subset), rtol=1e-12, atol=1e-14)
    hess_masked = xj.hessian_vp(mlp, params, inputs, labels, tangents, sample_weight=mask)
    hess_subset = xj.hessian_vp(mlp, params, inputs[mask], labels[mask], tangents)
    np.testing.assert_allclose(flat(hess_masked), flat(hess_subset), rtol=1e-12, atol=1e-14)
    once = xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=WEIGHTS)
    thrice = xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=3 * WEIGHTS)
    np.testing.assert_allclose(flat(once), flat(thrice), rtol=1e-12)

    # All-zero weights: the empty mean, 0, with a zero derivative in both modes (the overflow
    # guard's √max first gave a NaN gradient there, and a forward derivative of ln K).
    def loss(weights):
        return xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=weights)

    zeros = jnp.zeros_like(jnp.asarray(WEIGHTS))
    np.testing.assert_array_equal(jax.grad(loss)(zeros), 0)
    np.testing.assert_array_equal(jax.jacfwd(loss)(zeros), 0)
    # Weights whose sum overflows: w / Σw with Σw = inf made every weight, and the product, 0.
    huge = WEIGHTS / WEIGHTS.max() * 0.9 * np.finfo(np.float64).max
    scaled = xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=huge)
    np.testing.assert_allclose(flat(once), flat(scaled), rtol=1e-12)
    np.testing.assert_allclose(
        xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=huge),
        xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=WEIGHTS),
        rtol=1e-12,
    )


@pytest.mark.parametrize("pad", [-1, -100, K])
def test_rows_of_weight_zero_may_carry_padding_labels(pad):
    # Padding rows masked by weight 0 with a padding label made the objective, its gradient and
    # the Hessian products NaN (0 · NaN); they now count for nothing, as the rows left out do.
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    mask = np.array([True, False, True, True, False, True, True])
    padded = jnp.where(jnp.asarray(mask), labels, pad)
    soft = jnp.where(jnp.asarray(mask)[:, None], jax.nn.one_hot(labels, K), jnp.nan)

    def objective(p, targets, subset=False):
        if subset:
            return xj.mean_cross_entropy(mlp, p, inputs[mask], targets[mask])
        return xj.mean_cross_entropy(mlp, p, inputs, targets, sample_weight=mask)

    expected = objective(params, labels, subset=True)
    expected_grad = flat(jax.grad(objective)(params, labels, True))
    expected_product = flat(xj.hessian_vp(mlp, params, inputs[mask], labels[mask], tangents))
    for targets in (padded, soft):
        np.testing.assert_allclose(objective(params, targets), expected, rtol=1e-13)
        grad = jax.jit(jax.grad(objective))(params, targets)
        np.testing.assert_allclose(flat(grad), expected_grad, rtol=1e-12, atol=1e-14)
        product = xj.hessian_vp(mlp, params, inputs, targets, tangents, sample_weight=mask)
        np.testing.assert_allclose(flat(product), expected_product, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("soft", [False, True])
def test_derivatives_in_a_zero_weight_keep_its_label(soft):
    # Every zero-weight row's label was replaced by class 0 (soft: zeros) inside the
    # differentiated function: the value stayed, but d/dw_i at w_i = 0 was the replacement's
    # loss (-0.19 or -0.58 where the row's own is 0.31). Only padding labels are replaced now.
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    targets = jax.nn.one_hot(labels, K) if soft else labels
    weights = jnp.asarray([1.0, 2.0, 0.0, 1.0, 0.0, 0.5, 1.0])

    def naive(w, p=params):
        z = mlp(p, inputs)
        losses = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, labels[:, None], -1)[:, 0]
        return jnp.sum(w * losses) / jnp.sum(w)

    def ours(w):
        return xj.mean_cross_entropy(mlp, params, inputs, targets, sample_weight=w)

    np.testing.assert_allclose(jax.grad(ours)(weights), jax.grad(naive)(weights), rtol=1e-12)

    def curvature(w, objective):
        grad = jax.grad(lambda p: objective(w, p))
        return jnp.vdot(flat(tangents), flat(jax.jvp(grad, (params,), (tangents,))[1]))

    def ours_curvature(w):
        product = xj.hessian_vp(mlp, params, inputs, targets, tangents, sample_weight=w)
        return jnp.vdot(flat(tangents), flat(product))

    np.testing.assert_allclose(
        jax.grad(ours_curvature)(weights),
        jax.grad(curvature)(weights, naive),
        rtol=1e-10,
        atol=1e-13,
    )


def test_zero_total_weight_gives_zero_not_nan():
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    zeros = jnp.zeros(N)
    for product in (
        jax.jit(lambda w: xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=w)),
        jax.jit(lambda w: xj.hessian_vp(mlp, params, inputs, labels, tangents, sample_weight=w)),
    ):
        np.testing.assert_array_equal(flat(product(zeros)), 0.0)
    assert xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=zeros) == 0.0


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_invalid_weight_under_jit_gives_nan_not_zero(bad):
    # Eagerly such weights raise; under jit a NaN counted as a zero total (a loss, gradient
    # and products of exactly 0, which looked converged) and a negative weight gave plausible
    # numbers. Now every one comes out NaN.
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    weights = jnp.ones(N).at[3].set(bad)
    with pytest.raises(ValueError, match="sample_weight"):
        xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=weights)

    def loss(p, w):
        return xj.mean_cross_entropy(mlp, p, inputs, labels, sample_weight=w)

    results = jax.jit(
        lambda w: (
            loss(params, w),
            jax.grad(loss)(params, w),
            xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=w),
            xj.hessian_vp(mlp, params, inputs, labels, tangents, sample_weight=w),
            xj.ggn_diagonal(mlp, params, inputs, sample_weight=w),
        )
    )(weights)
    for leaf in jax.tree.leaves(results):
        assert np.all(np.isnan(leaf))


@pytest.mark.parametrize("bad", [-1.0, np.nan, np.inf])
def test_invalid_damping_under_jit_gives_nan_products(bad):
    # Eagerly it raises; under jit a negative damping gave an indefinite operator, silently.
    params, inputs, _ = make_problem(mlp)
    tangents = random_tangents(params)
    with pytest.raises(ValueError, match="damping"):
        xj.ggn_vp(mlp, params, inputs, tangents, damping=bad)
    product = jax.jit(lambda d: xj.ggn_vp(mlp, params, inputs, tangents, damping=d))(bad)
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(product))
    valid = jax.jit(lambda d: xj.ggn_vp(mlp, params, inputs, tangents, damping=d))(0.5)
    eager = xj.ggn_vp(mlp, params, inputs, tangents, damping=0.5)
    np.testing.assert_allclose(flat(valid), flat(eager), rtol=1e-12)


def test_masked_class_with_minus_inf_logit_has_no_curvature():
    params, inputs, _ = make_problem(linear)
    tangents = random_tangents(params)

    def masked_model(p, x):
        return linear(p, x).at[:, 0].set(-jnp.inf)

    got = xj.ggn_vp(masked_model, params, inputs, tangents)
    assert np.all(np.isfinite(flat(got)))
    np.testing.assert_array_equal(got["w"][:, 0], 0.0)
    # Equal to the model without that class at all.
    reduced = {"w": params["w"][:, 1:], "b": params["b"][1:]}
    expected = xj.ggn_vp(
        linear, reduced, inputs, {"w": tangents["w"][:, 1:], "b": tangents["b"][1:]}
    )
    np.testing.assert_allclose(got["w"][:, 1:], expected["w"], rtol=1e-12, atol=1e-14)


def all_avals(jaxpr):
    """Every variable type in a jaxpr and in all the jaxprs nested in its equations."""
    for inner in nested_jaxprs(jaxpr):
        for var in list(inner.invars) + list(inner.constvars):
            yield var.aval
        for eqn in inner.eqns:
            for var in eqn.outvars:
                yield var.aval


def test_no_k_by_k_or_p_by_p_array_in_the_products():
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    num_params = flat(params).size
    products = {
        "ggn_vp": lambda: xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=WEIGHTS),
        "operator": lambda: xj.ggn_operator(mlp, params, inputs, damping=0.1)(tangents),
        "hessian_vp": lambda: xj.hessian_vp(mlp, params, inputs, labels, tangents),
        "hutchinson": lambda: xj.ggn_diagonal_hutchinson(mlp, params, inputs, jax.random.key(0)),
        "bartlett": lambda: xj.ggn_diagonal_bartlett(mlp, params, inputs, jax.random.key(0)),
    }

    def shapes_of(fn):
        jaxpr = jax.make_jaxpr(fn)()
        return [tuple(a.shape) for a in all_avals(jaxpr.jaxpr) if hasattr(a, "shape")]

    for name, product in products.items():
        shapes = shapes_of(product)
        assert (N, K) in shapes, name  # the walk does see the logits-sized arrays
        assert not [s for s in shapes if s.count(K) >= 2], name
        assert not [s for s in shapes if s.count(num_params) >= 2], name
    # Control: the same walk finds the [N, K, K] Hessians of a product that forms them.
    explicit = jax.jit(lambda z: xj.softmax_cross_entropy_hessian(z))
    assert (N, K, K) in shapes_of(lambda: explicit(mlp(params, inputs)))


def _same_to_rounding(actual, expected):
    """Equal to 1e-13 relative, or 1e-13 of the largest entry: jit and eager may round apart."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-13, atol=1e-13 * np.abs(expected).max())


def test_jit_vmap_and_operator_as_argument():
    # Compiled at XLA's backend optimisation level 3 (users' default), an entry 1e-4 of the
    # largest differed from eager by 5e-13 of itself, and with the older CPU emitter (the test
    # processes' fast compilation) one 4e-4 of the largest by 1.1e-12 of itself, 4e-16 of the
    # largest: equality is to the vector's rounding.
    params, inputs, labels = make_problem(mlp)
    flat_params, unravel = ravel_pytree(params)
    vectors = jax.random.normal(jax.random.key(5), (3, flat_params.size))
    batch = jax.vmap(unravel)(vectors)
    eager = [flat(xj.ggn_vp(mlp, params, inputs, unravel(v))) for v in vectors]
    jitted = jax.jit(jax.vmap(lambda v: xj.ggn_vp(mlp, params, inputs, v)))(batch)
    _same_to_rounding(jax.vmap(flat)(jitted), np.stack(eager))

    # The operator is a pytree: one compiled apply serves every vector (a CG loop's need).
    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(operator, v):
        return operator(v)

    operator = xj.ggn_operator(mlp, params, inputs, damping=0.5)
    for v, expected in zip(vectors, eager, strict=True):
        _same_to_rounding(flat(apply(operator, unravel(v))), expected + 0.5 * v)
    # Operators built anew (one per outer step of a training loop) have the same structure:
    # each eager build used to carry a new jaxpr, and a jitted solver compiled again each step.
    for step in range(1, 4):
        moved = jax.tree.map(lambda p, step=step: p * (1 + 0.1 * step), params)
        fresh = xj.ggn_operator(mlp, moved, inputs, damping=0.5)
        assert jax.tree.structure(fresh) == jax.tree.structure(operator)
        _same_to_rounding(
            flat(apply(fresh, batch_first(batch))),
            flat(xj.ggn_vp(mlp, moved, inputs, batch_first(batch), damping=0.5)),
        )

    # vmap over weight vectors and over the Hessian product's tangents.
    weight_sets = jnp.stack([jnp.ones(N), jnp.asarray(WEIGHTS)])
    per_weights = jax.vmap(
        lambda w: flat(xj.ggn_vp(mlp, params, inputs, batch_first(batch), sample_weight=w))
    )(weight_sets)
    _same_to_rounding(per_weights[0], eager[0])
    hess = jax.jit(jax.vmap(lambda v: xj.hessian_vp(mlp, params, inputs, labels, v)))(batch)
    _same_to_rounding(
        flat(jax.tree.map(lambda x: x[1], hess)),
        flat(xj.hessian_vp(mlp, params, inputs, labels, unravel(vectors[1]))),
    )


def batch_first(batch):
    return jax.tree.map(lambda x: x[0], batch)


def test_float32_products_match_float64():
    params64, inputs64, labels = make_problem(mlp)
    params32, inputs32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params64, inputs64))
    tangents64 = random_tangents(params64)
    tangents32 = jax.tree.map(lambda x: x.astype(jnp.float32), tangents64)
    weights = WEIGHTS.astype(np.float64)  # float64 weights must not upcast float32 products
    for fn in (
        lambda p, x, v: xj.ggn_vp(mlp, p, x, v, sample_weight=weights, damping=np.float64(0.1)),
        lambda p, x, v: xj.hessian_vp(mlp, p, x, labels, v, sample_weight=weights),
    ):
        got = jax.jit(fn)(params32, inputs32, tangents32)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
        expected = fn(params64, inputs64, tangents64)
        np.testing.assert_allclose(flat(got), flat(expected), rtol=2e-4, atol=2e-5)


def test_float32_batched_products_compile_right():
    """``jit(vmap)`` of Gauss-Newton and Hessian products over tangents, float32, against float64.

    The batch shares the probabilities, which then broadcast against batched tangents: jax 0.10's
    CPU backend compiled the loss-Hessian step of that form into a wrong XNNPACK fusion (Gauss-
    Newton products 65% off, Hessian products 42%, Hutchinson's 64-probe diagonal 30%) until the
    step took its row sums as a contraction. Sizes as small as the other tests' do not trigger it.
    """
    rows, features, hidden, classes = 128, 64, 6, 10
    keys = jax.random.split(jax.random.key(0), 5)
    inputs = jax.random.normal(keys[0], (rows, features))
    params = {
        "w1": 0.2 * jax.random.normal(keys[1], (features, hidden)),
        "b1": jnp.zeros(hidden),
        "w2": 0.5 * jax.random.normal(keys[2], (hidden, classes)),
        "b2": jnp.zeros(classes),
    }
    labels = jax.random.randint(keys[3], (rows,), 0, classes)
    batch = jax.tree.map(lambda x: jax.random.normal(keys[4], (64, *x.shape)), params)
    cast = functools.partial(jax.tree.map, lambda x: x.astype(jnp.float32))
    for product in (
        lambda p, x, v: xj.ggn_vp(mlp, p, x, v),
        lambda p, x, v: xj.hessian_vp(mlp, p, x, labels, v),
    ):
        batched = jax.vmap(product, in_axes=(None, None, 0))
        got = jax.jit(batched)(cast(params), cast(inputs), cast(batch))
        expected = batched(params, inputs, batch)
        scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
        np.testing.assert_allclose(flat(got), flat(expected), rtol=0, atol=2e-6 * scale)
    estimate = functools.partial(
        xj.ggn_diagonal_hutchinson, mlp, inputs=cast(inputs), key=keys[4], num_samples=64
    )
    eager = estimate(cast(params))  # op by op: nothing fused
    np.testing.assert_allclose(flat(jax.jit(estimate)(cast(params))), flat(eager), rtol=1e-5)


def test_bad_input_raises_clear_errors():
    params, inputs, labels = make_problem(mlp)
    tangents = random_tangents(params)
    with pytest.raises(ValueError, match="non-negative"):
        xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=-np.ones(N))
    with pytest.raises(ValueError, match="shape"):
        xj.ggn_vp(mlp, params, inputs, tangents, sample_weight=np.ones(N + 1))
    with pytest.raises(ValueError, match="finite"):
        xj.ggn_vp(mlp, params, inputs, tangents, label_mass=np.nan)
    for damping in (-1.0, np.inf, np.nan):  # an infinite damping gave infinite products
        with pytest.raises(ValueError, match="damping must be a finite non-negative"):
            xj.ggn_operator(mlp, params, inputs, damping=damping)
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        xj.ggn_vp(lambda p, x: mlp(p, x)[0], params, inputs, tangents)
    with pytest.raises(ValueError, match="tree structure"):
        xj.ggn_vp(mlp, params, inputs, {"w1": tangents["w1"]})
    # The message names the leaf that differs by its path in the tree.
    with pytest.raises(ValueError, match=r"match params leaf by leaf.*differ in leaves 'b1'"):
        xj.hessian_vp(mlp, params, inputs, labels, jax.tree.map(lambda t: t[..., :1], tangents))
    with pytest.raises(ValueError, match="labels"):
        xj.hessian_vp(mlp, params, inputs, labels[:3], tangents)
    with pytest.raises(TypeError, match="floating"):
        xj.ggn_vp(mlp, {**params, "b2": jnp.ones(K, int)}, inputs, tangents)
    # These failed inside broadcasting, or gave NaN with no error (K = 0).
    with pytest.raises(ValueError, match="damping must be a scalar"):
        xj.ggn_operator(mlp, params, inputs, damping=np.ones(2))
    with pytest.raises(ValueError, match="no classes"):
        xj.mean_cross_entropy(lambda p, x: mlp(p, x)[:, :0], params, inputs, labels)


def test_python_number_leaves_in_params_and_tangents():
    # A Python float leaf (a scalar temperature, say) made chex fail with AttributeError.
    params, inputs, _ = make_problem(linear)

    def scaled(p, x):
        return linear(p, x) * p["scale"]

    with_float = {**params, "scale": 0.5}
    with_array = {**params, "scale": jnp.asarray(0.5)}
    tangents = {**random_tangents(params), "scale": 1.0}
    got = xj.ggn_vp(scaled, with_float, inputs, tangents)
    expected = xj.ggn_vp(scaled, with_array, inputs, {**tangents, "scale": jnp.asarray(1.0)})
    np.testing.assert_allclose(flat(got), flat(expected), rtol=1e-13)


def test_float16_model_with_a_large_total_weight():
    # The coefficients wᵢmᵢ/Σw were computed in the logits' dtype: in float16, Σw = 70,000 is
    # inf, and the loss, its gradient and every product came out 0.
    params, inputs, _ = make_problem(linear)
    weights = np.full(N, 10_000.0)
    labels = jnp.arange(N) % K
    tangents = random_tangents(params)
    results = {}
    for dtype in (jnp.float16, jnp.float32):

        def model(params, inputs, dtype=dtype):
            return linear(params, inputs).astype(dtype)

        loss = xj.mean_cross_entropy(model, params, inputs, labels, sample_weight=weights)
        product = xj.ggn_vp(model, params, inputs, tangents, sample_weight=weights)
        results[dtype] = float(loss), flat(product)
    (half_loss, half_product), (loss, product) = results[jnp.float16], results[jnp.float32]
    np.testing.assert_allclose(half_loss, loss, rtol=2e-3)
    np.testing.assert_allclose(half_product, product, rtol=0, atol=5e-3 * np.abs(product).max())


def test_a_zero_weight_row_of_masked_classes_counts_for_nothing():
    # Its label sits on a −inf logit: loss +inf, and 0 · inf made the objective NaN.
    rng = np.random.default_rng(0)
    X, W = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(3, 5)))
    mask = jnp.zeros((4, 5)).at[3].set(-jnp.inf)
    labels, weights = jnp.array([0, 1, 2, 0]), jnp.array([1.0, 1.0, 1.0, 0.0])

    def masked(W, inputs):
        return inputs[0] @ W + inputs[1]

    value = xj.mean_cross_entropy(masked, W, (X, mask), labels, sample_weight=weights)
    expected = xj.mean_cross_entropy(masked, W, (X[:3], mask[:3]), labels[:3])
    np.testing.assert_allclose(value, expected, rtol=1e-14)
    grad = jax.grad(xj.mean_cross_entropy, argnums=1)(
        masked, W, (X, mask), labels, sample_weight=weights
    )
    expected_grad = jax.grad(xj.mean_cross_entropy, argnums=1)(
        masked, W, (X[:3], mask[:3]), labels[:3]
    )
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["sample_weight", "label_mass"])
def test_complex_weights_and_masses_are_refused(name):
    # The imaginary part was dropped silently (under jit without even NumPy's ComplexWarning).
    params, inputs, labels = make_problem(mlp)
    value = jnp.full(labels.shape[0], 1 + 1j)
    with pytest.raises(TypeError, match=f"{name} must be real"):
        xj.ggn_vp(mlp, params, inputs, params, **{name: value})
    with pytest.raises(TypeError, match=f"{name} must be real"):
        xj.ggn_diagonal(mlp, params, inputs, **{name: value})
    if name == "sample_weight":
        with pytest.raises(TypeError, match="sample_weight must be real"):
            xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=value)


def test_weights_given_as_a_list_of_tracers_still_work():
    # The check for complex weights read the list on the host: TracerArrayConversionError.
    params, inputs, labels = make_problem(mlp)
    n = labels.shape[0]

    def objective(a, b):
        weights = [a if i % 2 else b for i in range(n)]
        return xj.mean_cross_entropy(mlp, params, inputs, labels, sample_weight=weights)

    expected = xj.mean_cross_entropy(
        mlp,
        params,
        inputs,
        labels,
        sample_weight=jnp.array([2.0 if i % 2 else 1.0 for i in range(n)]),
    )
    np.testing.assert_allclose(jax.jit(objective)(2.0, 1.0), expected, rtol=1e-14)
