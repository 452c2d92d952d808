"""The logistic objective against autodiff of a naive formula written with log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import nested_jaxprs

import xentropy_jax
from xentropy_jax import _linear

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 40, 5, 4
SETTINGS = [
    pytest.param(
        fit_intercept, reference_class, id=f"intercept={fit_intercept}-ref={reference_class}"
    )
    for fit_intercept in (True, False)
    for reference_class in (False, True)
]


def make_problem(fit_intercept, reference_class, l2=0.3, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(NUM_ROWS, NUM_FEATURES))
    labels = rng.integers(0, NUM_CLASSES, NUM_ROWS)
    sample_weight = rng.uniform(0.1, 3.0, NUM_ROWS)
    sample_weight[:3] = 0.0  # zero weights must simply drop rows
    objective = _linear.logistic_objective(
        features,
        labels,
        NUM_CLASSES,
        sample_weight=sample_weight,
        l2=l2,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
    )
    theta = jnp.asarray(rng.normal(size=objective.num_params))
    return objective, theta, (features, labels, sample_weight, l2)


def naive_loss(weights, intercept, features, labels, sample_weight, l2):
    """The objective straight from its definition, on full (W [d, K], b [K])."""
    log_probs = jax.nn.log_softmax(features @ weights + intercept[None, :], axis=-1)
    per_row = -log_probs[jnp.arange(labels.shape[0]), labels]
    return jnp.sum(sample_weight * per_row) / jnp.sum(sample_weight) + 0.5 * l2 * jnp.sum(
        weights**2
    )


def naive_in_theta(objective, data):
    def loss(theta):
        weights, intercept = objective.expand(theta)
        return naive_loss(weights, intercept, *data)

    return loss


@pytest.mark.parametrize("fit_intercept, reference_class", SETTINGS)
def test_value_gradient_hessian_match_autodiff(fit_intercept, reference_class):
    objective, theta, data = make_problem(fit_intercept, reference_class)
    # The references jitted: one compilation each, instead of one per primitive of eager
    # autodiff (seconds per case on a 2-core machine); the maths is the same.
    naive = jax.jit(naive_in_theta(objective, data))
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    np.testing.assert_allclose(evaluation.loss, naive(theta), rtol=1e-13)
    np.testing.assert_allclose(objective.value(theta), naive(theta), rtol=1e-13)
    np.testing.assert_allclose(
        evaluation.grad, jax.jit(jax.grad(naive))(theta), rtol=1e-11, atol=1e-14
    )
    expected_hessian = jax.jit(jax.hessian(naive))(theta)
    np.testing.assert_allclose(
        _linear.hessian(objective, evaluation), expected_hessian, rtol=1e-11, atol=1e-14
    )
    np.testing.assert_allclose(
        _linear.hessian_diagonal(objective, evaluation),
        jnp.diag(expected_hessian),
        rtol=1e-11,
        atol=1e-14,
    )
    tangent = jnp.asarray(np.random.default_rng(1).normal(size=objective.num_params))
    np.testing.assert_allclose(
        _linear.hessian_vector_product(objective, evaluation, tangent),
        expected_hessian @ tangent,
        rtol=1e-11,
        atol=1e-14,
    )


@pytest.mark.parametrize("fit_intercept, reference_class", SETTINGS)
def test_gradient_hessian_product_closure(fit_intercept, reference_class):
    objective, theta, data = make_problem(fit_intercept, reference_class)
    loss, grad, hvp = _linear.gradient_hessian_product(objective, theta)
    naive = jax.jit(naive_in_theta(objective, data))
    np.testing.assert_allclose(loss, naive(theta), rtol=1e-13)
    np.testing.assert_allclose(grad, jax.jit(jax.grad(naive))(theta), rtol=1e-11, atol=1e-14)
    tangents = np.random.default_rng(2).normal(size=(3, objective.num_params))
    products = jnp.stack([hvp(jnp.asarray(t)) for t in tangents])
    # A symmetric positive semidefinite operator: uᵀHv = vᵀHu and vᵀHv >= 0.
    gram = tangents @ np.asarray(products).T
    np.testing.assert_allclose(gram, gram.T, rtol=1e-12)
    assert np.all(np.diag(gram) > 0)


def test_hessian_column_matches_gradient_difference():
    # As scikit-learn's test: column j of H ≈ (g(θ + εeⱼ) − g(θ − εeⱼ)) / 2ε.
    objective, theta, _ = make_problem(True, False, l2=0.05)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    matrix = _linear.hessian(objective, evaluation)
    epsilon = 1e-5
    for column in (0, 7, objective.num_params - 1):
        basis = jnp.zeros(objective.num_params).at[column].set(epsilon)
        plus = _linear.evaluate(objective, theta + basis, objective.free_logits(theta + basis))
        minus = _linear.evaluate(objective, theta - basis, objective.free_logits(theta - basis))
        difference = (plus.grad - minus.grad) / (2 * epsilon)
        np.testing.assert_allclose(matrix[:, column], difference, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("fit_intercept, reference_class", SETTINGS)
def test_hessian_is_the_gauss_newton_matrix(fit_intercept, reference_class):
    # For a linear model Newton = Gauss-Newton: H − l2·I_W = Jᵀ (diag(s) − ssᵀ) J.
    objective, theta, (_, _, sample_weight, _) = make_problem(fit_intercept, reference_class)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    tangent = jnp.asarray(np.random.default_rng(3).normal(size=objective.num_params))
    expected = xentropy_jax.ggn_vp(
        lambda params, _: objective.logits(params),
        theta,
        None,
        tangent,
        sample_weight=sample_weight,
    )
    tangent_weights, _ = objective.unpack(tangent)
    penalty_part = objective.pack(
        objective.l2 * tangent_weights, jnp.zeros(objective.num_free_classes)
    )
    if not fit_intercept:
        penalty_part = objective.l2 * tangent
    np.testing.assert_allclose(
        _linear.hessian_vector_product(objective, evaluation, tangent) - penalty_part,
        expected,
        rtol=1e-11,
        atol=1e-14,
    )


def test_singular_direction_and_reference_class():
    # Without a reference class, shifting every class's intercept by the same amount is a null
    # direction of H (the intercept is unpenalised); with l2 = 0 so is shifting a row of W.
    objective, theta, _ = make_problem(True, False, l2=0.0)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    shift = objective.pack(jnp.zeros((NUM_FEATURES, NUM_CLASSES)), jnp.ones(NUM_CLASSES))
    row_shift = objective.pack(
        jnp.zeros((NUM_FEATURES, NUM_CLASSES)).at[2].set(1.0), jnp.zeros(NUM_CLASSES)
    )
    for direction in (shift, row_shift):
        product = _linear.hessian_vector_product(objective, evaluation, direction)
        np.testing.assert_allclose(product, 0, atol=1e-14)
    # With a reference class and l2 = 0 the Hessian is positive definite.
    objective, theta, _ = make_problem(True, True, l2=0.0)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    assert np.linalg.eigvalsh(_linear.hessian(objective, evaluation)).min() > 1e-6


def test_expand_restrict_round_trip():
    objective, theta, _ = make_problem(True, True)
    weights, intercept = objective.expand(theta)
    assert weights.shape == (NUM_FEATURES, NUM_CLASSES) and intercept.shape == (NUM_CLASSES,)
    np.testing.assert_array_equal(weights[:, 0], 0)
    np.testing.assert_array_equal(intercept[0], 0)
    np.testing.assert_allclose(objective.restrict(weights, intercept), theta)
    # Shifting all classes equally is absorbed by the reference class.
    np.testing.assert_allclose(objective.restrict(weights + 1.5, intercept - 2.0), theta)


@pytest.mark.parametrize("scale", [1.0, 0.3, 1e-3, 1e-7])
def test_loss_change_is_accurate_for_tiny_steps(scale):
    objective, theta, _ = make_problem(True, False)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    step = jnp.asarray(np.random.default_rng(4).normal(size=objective.num_params))
    step_logits = objective.free_logits(step)
    change = _linear.loss_change(objective, theta, evaluation, step, step_logits, scale)
    if scale >= 0.3:
        np.testing.assert_allclose(
            change, objective.value(theta + scale * step) - objective.value(theta), rtol=1e-12
        )
    else:
        # Third-order Taylor: f(θ+tΔ) − f(θ) = t·gᵀΔ + t²/2·ΔᵀHΔ + O(t³), accurate to ~t²
        # relative, far below what the plain difference of two values can resolve at t = 1e-7.
        curvature = jnp.vdot(step, _linear.hessian_vector_product(objective, evaluation, step))
        taylor = scale * jnp.vdot(evaluation.grad, step) + 0.5 * scale**2 * curvature
        np.testing.assert_allclose(change, taylor, rtol=max(100 * scale**2, 1e-12))


def test_large_logit_steps_stay_finite():
    objective, theta, _ = make_problem(True, False)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    step = 200.0 * jnp.asarray(np.random.default_rng(5).normal(size=objective.num_params))
    change = _linear.loss_change(
        objective, theta, evaluation, step, objective.free_logits(step), 1.0
    )
    np.testing.assert_allclose(
        change, objective.value(theta + step) - objective.value(theta), rtol=1e-12
    )


# Logit moves per regime of `loss_change`, for rows whose logits are [label, 0, −1, −3] (the
# label in column 0, the reference class's column, when there is one): moves of a few units
# (the sum from the stored probabilities), every other class down by 9 (rows whose Σ nears −1,
# summed directly), a class 760 below the rest (a probability of 0) rising by 740, and moves of
# 750 (a sum that overflows: both recomputed from the log-probabilities).
LOSS_CHANGE_REGIMES = {
    "moderate": ([0.0, 0.0, -1.0, -3.0], [0.0, 1.5, -2.0, 0.7]),
    "sum_near_minus_one": ([-4.0, 0.0, -1.0, -3.0], [0.0, -9.0, -9.0, -9.0]),
    "probability_lost": ([0.0, 0.0, -1.0, -760.0], [0.0, 0.5, -0.25, 740.0]),
    "overflow": ([0.0, 0.0, -1.0, -3.0], [0.0, 750.0, -0.5, 0.25]),
}


def _regime_problem(regime, reference_class, dtype):
    """One `LOSS_CHANGE_REGIMES` problem: X the identity, so the logits are W itself."""
    logits, moves = (np.array(v) for v in LOSS_CHANGE_REGIMES[regime])
    rows = np.array([1.0, 0.5, -0.25, 2.0])[:, None]
    logits = logits[None, :] + (rows if regime == "probability_lost" else rows * logits[None, :])
    moves = np.tile(moves, (4, 1)) * np.array([1.0, 1.0, 0.75, 0.5])[:, None]
    if reference_class:  # class 0's logit and move are fixed at zero
        logits, moves = logits - logits[:, :1], moves - moves[:, :1]
    first = int(reference_class)
    num_rows, num_classes = logits.shape
    objective = _linear.logistic_objective(
        np.eye(num_rows, dtype=dtype),
        np.array([0, 1, 2, 0]),
        num_classes,
        l2=0.25,
        fit_intercept=False,
        reference_class=reference_class,
    )
    theta = objective.pack(jnp.asarray(logits[:, first:], dtype), jnp.zeros(0, dtype))
    step = objective.pack(jnp.asarray(moves[:, first:], dtype), jnp.zeros(0, dtype))
    return logits, moves, (objective, theta, step)


def _loss_change(objective, theta, step):
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    step_logits = objective.free_logits(step)
    return _linear.loss_change(objective, theta, evaluation, step, step_logits, 1.0)


@pytest.mark.parametrize("regime", list(LOSS_CHANGE_REGIMES))
@pytest.mark.parametrize("reference_class", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_loss_change_against_mpmath(regime, reference_class, dtype):
    """f(θ + tΔ) − f(θ) in each regime of its sums, against 160-bit arithmetic.

    X is the identity, so the logits are W itself and the reference sees exactly the logits the
    code sees (no rounding of a product with X).
    """
    import mpmath

    mpmath.mp.prec = 160
    logits, moves, (objective, theta, step) = _regime_problem(regime, reference_class, dtype)
    labels = np.asarray(objective.labels)
    num_rows = logits.shape[0]
    change = _loss_change(objective, theta, step)

    def logsumexp(values):
        peak = max(values)
        return peak + mpmath.log(mpmath.fsum(mpmath.exp(v - peak) for v in values))

    exact = mpmath.mpf(0)
    for row, label in zip(range(num_rows), labels, strict=True):
        z = [mpmath.mpf(float(v)) for v in np.asarray(logits[row], dtype)]
        u = [mpmath.mpf(float(v)) for v in np.asarray(moves[row], dtype)]
        moved = [a + b for a, b in zip(z, u, strict=True)]
        exact += (logsumexp(moved) - logsumexp(z) - u[label]) / num_rows
    w = [mpmath.mpf(float(v)) for v in np.asarray(theta, dtype)]
    v = [mpmath.mpf(float(x)) for x in np.asarray(step, dtype)]
    exact += mpmath.mpf(0.25) * mpmath.fsum(a * b + b * b / 2 for a, b in zip(w, v, strict=True))
    # Measured: exact in float64, within 0.75 eps in float32.
    np.testing.assert_allclose(float(change), float(exact), rtol=4 * float(jnp.finfo(dtype).eps))


@pytest.mark.parametrize(
    "regimes",
    [
        ("moderate", "moderate"),
        ("sum_near_minus_one", "sum_near_minus_one"),
        ("probability_lost", "overflow"),
        tuple(LOSS_CHANGE_REGIMES),
    ],
)
@pytest.mark.parametrize("reference_class", [False, True])
def test_loss_change_under_vmap_takes_each_problems_branch(regimes, reference_class):
    # A batch of problems (vmap over l2 values, over cross-validation folds) runs the costly
    # branches only when some problem needs them, and each problem gets its own regime's value.
    problems = [_regime_problem(r, reference_class, jnp.float64)[2] for r in regimes]
    batched = jax.vmap(_loss_change)(*jax.tree.map(lambda *a: jnp.stack(a), *problems))
    alone = [_loss_change(*problem) for problem in problems]
    np.testing.assert_allclose(batched, alone, rtol=2 * float(jnp.finfo(jnp.float64).eps))
    # Still a branch once batched: a `cond` on a batched predicate would become a select.
    jaxpr = jax.make_jaxpr(jax.vmap(_loss_change))(
        *jax.tree.map(lambda *a: jnp.stack(a), *problems)
    )
    primitives = {eqn.primitive.name for inner in nested_jaxprs(jaxpr.jaxpr) for eqn in inner.eqns}
    assert "cond" in primitives


def test_loss_change_without_rows_is_the_penalty_change():
    # No rows (an empty chunk of a streamed or sharded objective): only the penalty changes.
    objective = _linear.logistic_objective(np.zeros((0, 2)), np.zeros(0, int), 3, l2=0.5)
    theta = jnp.arange(objective.num_params, dtype=objective.dtype) / 10
    step = jnp.ones(objective.num_params, objective.dtype)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    change = _linear.loss_change(
        objective, theta, evaluation, step, objective.free_logits(step), 2.0
    )
    np.testing.assert_allclose(change, objective.value(theta + 2 * step) - objective.value(theta))


def test_transposed_copy_changes_no_value():
    # The copy of Xᵀ only changes the layout the GEMMs Xᵀ·U read: same value, gradient and
    # products (to rounding); a sparse X keeps none; float32 products drop it, float64 keep it.
    from jax.experimental import sparse

    from xentropy_jax.solvers import _inner

    _, theta, (features, labels, sample_weight, l2) = make_problem(True, False)
    settings = dict(sample_weight=sample_weight, l2=l2)
    plain = _linear.logistic_objective(features, labels, NUM_CLASSES, **settings)
    copied = _linear.logistic_objective(
        features, labels, NUM_CLASSES, transposed_copy=True, **settings
    )
    np.testing.assert_array_equal(copied.transposed_features, np.c_[features, np.ones(NUM_ROWS)].T)
    tangent = jnp.asarray(np.random.default_rng(7).normal(size=plain.num_params))
    for objective in (plain, copied):
        evaluation = jax.jit(objective.evaluate)(theta, objective.free_logits(theta))
        product = jax.jit(objective.hessian_product)(evaluation, tangent)
        if objective is plain:
            expected = evaluation, product
            continue
        np.testing.assert_allclose(evaluation.loss, expected[0].loss, rtol=1e-14)
        np.testing.assert_allclose(evaluation.grad, expected[0].grad, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(product, expected[1], rtol=1e-12, atol=1e-15)
    no_intercept = _linear.logistic_objective(
        features, labels, NUM_CLASSES, fit_intercept=False, transposed_copy=True, **settings
    )
    np.testing.assert_array_equal(no_intercept.transposed_features, features.T)
    bcoo = sparse.BCOO.fromdense(jnp.asarray(features))
    assert (
        _linear.logistic_objective(bcoo, labels, NUM_CLASSES, transposed_copy=True)
    ).transposed_features is None
    low = _inner.product_objective(copied, "float32")
    assert low.transposed_features is None and low.features.dtype == jnp.float32
    assert low.weights.dtype == jnp.float32 and low.l2.dtype == jnp.float32
    assert copied.astype(jnp.float64).transposed_features is not None


def test_float32_features_stay_float32():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(10, 3)).astype(np.float32)
    objective = _linear.logistic_objective(features, rng.integers(0, 3, 10), 3, l2=0.1)
    theta = jnp.zeros(objective.num_params, jnp.float32)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    assert evaluation.loss.dtype == jnp.float32 and evaluation.grad.dtype == jnp.float32
    np.testing.assert_allclose(evaluation.loss, np.log(3), rtol=1e-6)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_feature_gram_and_column_scales_against_numpy(fit_intercept):
    """X̃ᵀ·diag(ŵ)·X̃ and Σᵢ ŵᵢ|x_ij| (the float32 floor's scales) against explicit arrays."""
    from xentropy_jax.solvers._floor import _FLOOR_FACTOR, attainable_tolerance

    rng = np.random.default_rng(3)
    X, y, w = rng.normal(size=(40, 5)), rng.integers(0, 3, 40), rng.uniform(0.5, 2, 40)
    objective = _linear.logistic_objective(
        X, y, 3, sample_weight=w, l2=0.1, fit_intercept=fit_intercept
    )
    design = np.hstack([X, np.ones((40, 1))]) if fit_intercept else X
    normalised = w / w.sum()
    np.testing.assert_allclose(
        _linear.feature_gram(objective), design.T @ (normalised[:, None] * design), rtol=1e-13
    )
    scales = np.abs(design).T @ normalised
    floor = _FLOOR_FACTOR * np.finfo(np.float64).eps * np.repeat(scales, 3)
    np.testing.assert_allclose(attainable_tolerance(objective, 0.0), floor, rtol=1e-13)
