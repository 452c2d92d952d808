"""Derivatives through a fit (implicit differentiation) against finite differences of refits."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse
from jax.test_util import check_grads

from xentropy_jax.solvers import CollinearityWarning, FitError, fit_logistic_regression
from xentropy_jax.solvers import _fit as fit_module

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 60, 4, 3
# The perturbed inputs: u = (l2, three sample weights, three entries of X).
WEIGHT_ROWS = np.array([3, 17, 41])
X_ROWS, X_COLUMNS = np.array([5, 30, 52]), np.array([2, 0, 3])
TOL = 1e-13
STEP = 1e-5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(NUM_ROWS, NUM_FEATURES))
    labels = rng.integers(0, NUM_CLASSES, NUM_ROWS)
    sample_weight = rng.uniform(0.5, 2.0, NUM_ROWS)
    return features, labels, sample_weight


def outputs(u, features, labels, sample_weight, *, solver="newton-cg", **options):
    """(W, b, loss) of a fit, flattened, at l2 = u[0] with weights and X entries moved by u."""
    sample_weight = jnp.asarray(sample_weight).at[WEIGHT_ROWS].add(u[1:4])
    features = jnp.asarray(features).at[X_ROWS, X_COLUMNS].add(u[4:7])
    result = fit_logistic_regression(
        features,
        labels,
        NUM_CLASSES,
        sample_weight=sample_weight,
        l2=u[0],
        tol=TOL,
        solver=solver,
        **options,
    )
    weights, intercept = result.params
    return jnp.concatenate([weights.ravel(), intercept, result.loss[None]])


def directional(u, direction, features, labels, sample_weight, *, solver, **options):
    """jax.jvp of `outputs` along `direction` in u.

    Not jitted on purpose: the fit inside is, and its derivative's compilation is then shared
    with every other forward-mode test of the same configuration (check_grads included).
    """
    function = functools.partial(
        outputs,
        features=features,
        labels=labels,
        sample_weight=sample_weight,
        solver=solver,
        **options,
    )
    return jax.jvp(function, (u,), (direction,))[1]


def jacobian(u, features, labels, sample_weight, **options):
    """[outputs, 7] column by column from `directional`."""
    columns = [
        directional(u, direction, features, labels, sample_weight, **options)
        for direction in np.eye(u.shape[0], dtype=u.dtype)
    ]
    return np.stack(columns, axis=1)


def finite_differences(function, u, indices=None):
    """Central differences of refits; one-sided (second order) in l2 at l2 = 0."""
    columns = []
    for index in range(u.shape[0]) if indices is None else indices:
        step = np.zeros_like(u)
        step[index] = STEP
        if index == 0 and u[0] == 0:
            column = (-3 * function(u) + 4 * function(u + step) - function(u + 2 * step)) / (
                2 * STEP
            )
        else:
            column = (function(u + step) - function(u - step)) / (2 * STEP)
        columns.append(column)
    return np.stack(columns, axis=1)


def base_point(l2):
    return np.array([l2, 0, 0, 0, 0, 0, 0], dtype=float)


CASES = {
    "penalised": dict(l2=0.1, reference_class=False, fit_intercept=True),
    "reference-class, no intercept": dict(l2=0.1, reference_class=True, fit_intercept=False),
    "unpenalised": dict(l2=0.0, reference_class=False, fit_intercept=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_jacobian_matches_finite_differences(data, case):
    l2, options = CASES[case]["l2"], dict(CASES[case])
    del options["l2"]
    u = base_point(l2)
    expected = finite_differences(lambda v: np.asarray(outputs(v, *data, **options)), u)
    actual = jacobian(u, *data, solver="newton-cg", **options)
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    # The returned parameters are the symmetric ones; so are their tangents.
    if not options["reference_class"]:
        num_weights = NUM_FEATURES * NUM_CLASSES
        intercept_dot = actual[num_weights : num_weights + NUM_CLASSES]
        np.testing.assert_allclose(intercept_dot.sum(axis=0), 0, atol=1e-10)
        if l2 == 0:
            weights_dot = actual[:num_weights].reshape(NUM_FEATURES, NUM_CLASSES, -1)
            np.testing.assert_allclose(weights_dot.sum(axis=1), 0, atol=1e-10)


@pytest.mark.parametrize("solver", ["newton", "trust-region"])
def test_solvers_give_the_same_derivatives(data, solver):
    options = dict(reference_class=False, fit_intercept=True)
    u = base_point(0.1)
    direction = np.random.default_rng(3).normal(size=u.shape)
    reference = directional(u, direction, *data, solver="newton-cg", **options)
    np.testing.assert_allclose(
        directional(u, direction, *data, solver=solver, **options),
        reference,
        rtol=1e-8,
        atol=1e-10,
    )


def test_jacrev_and_jacfwd_match_the_tangents(data):
    options = dict(solver="newton-cg", reference_class=False, fit_intercept=True)
    u = base_point(0.1)
    function = functools.partial(
        outputs, features=data[0], labels=data[1], sample_weight=data[2], **options
    )
    tangents = jacobian(u, *data, **options)
    np.testing.assert_allclose(jax.jacrev(function)(u), tangents, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(function)(u), tangents, rtol=1e-10, atol=1e-12)


def test_check_grads_forward_and_reverse(data):
    function = functools.partial(outputs, features=data[0], labels=data[1], sample_weight=data[2])
    # Fits at tol = 1e-13 are smooth far below the differences' step.
    check_grads(
        function,
        (base_point(0.1),),
        order=1,
        modes=("fwd", "rev"),
        eps=1e-5,
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("solver", ["newton", "newton-cg", "trust-region"])
def test_second_derivatives_in_l2(data, solver):
    # jax.hessian (forward over reverse, the tangents batched by jacfwd's vmap) recursed
    # without end in the factorisations' vmap rule; jvp of grad did not.
    features, labels, sample_weight = data

    def loss(l2):
        fit = fit_logistic_regression(
            features,
            labels,
            NUM_CLASSES,
            sample_weight=sample_weight,
            l2=l2,
            tol=TOL,
            solver=solver,
        )
        return fit.loss

    gradient = jax.grad(loss)
    l2, step = 0.1, 1e-4
    differences = (gradient(l2 + step) - gradient(l2 - step)) / (2 * step)
    forward = jax.jvp(gradient, (l2,), (1.0,))[1]
    np.testing.assert_allclose(jax.hessian(loss)(l2), differences, rtol=1e-6)
    np.testing.assert_allclose(jax.hessian(loss)(l2), forward, rtol=1e-12)
    np.testing.assert_allclose(jax.jacfwd(jax.jacfwd(loss))(l2), forward, rtol=1e-12)
    # Reverse over reverse: "Linearization failed" inside JAX while the implicit rule's
    # preconditioner (its factorisations' custom_vmap has no reverse mode) carried tangents.
    np.testing.assert_allclose(jax.jacrev(gradient)(l2), forward, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(gradient)(l2), forward, rtol=1e-12)


def test_second_derivatives_of_a_float32_fit(data):
    # In float32, jax.hessian failed with "vmap out_axes[0] ... output was batched": the
    # implicit rule differentiated its Kronecker preconditioner, whose batch_cond broadcast its
    # unbatched value when jacfwd batched the tangents alone (test_linalg tests batch_cond).
    features, labels, sample_weight = data

    def loss(l2, dtype):
        fit = fit_logistic_regression(
            features.astype(dtype),
            labels,
            NUM_CLASSES,
            sample_weight=sample_weight.astype(dtype),
            l2=l2,
            tol=1e-5 if dtype == np.float32 else TOL,
        )
        return fit.loss

    exact = jax.hessian(functools.partial(loss, dtype=np.float64))(0.1)
    f32 = functools.partial(loss, dtype=np.float32)
    l2 = np.float32(0.1)
    for second in (jax.hessian(f32), jax.jacrev(jax.grad(f32)), jax.jacfwd(jax.jacfwd(f32))):
        value = second(l2)
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, exact, rtol=1e-4)


def test_repeat_derivatives_do_not_retrace(data):
    function = functools.partial(outputs, features=data[0], labels=data[1], sample_weight=data[2])
    gradient = jax.grad(lambda u: jnp.sum(function(u)))
    first = gradient(base_point(0.1))
    size = fit_module._fit._cache_size()
    second = gradient(base_point(0.2))
    assert fit_module._fit._cache_size() == size
    assert not np.allclose(first, second)


def test_vmap_of_grad_over_l2_under_jit(data):
    """The motivating use: d(validation loss)/d(l2) on a grid of l2, one compiled call."""
    features, labels, sample_weight = data
    rng = np.random.default_rng(1)
    validation_features = rng.normal(size=(40, NUM_FEATURES))
    validation_labels = rng.integers(0, NUM_CLASSES, 40)

    def validation_loss(l2):
        weights, intercept = fit_logistic_regression(
            features, labels, NUM_CLASSES, sample_weight=sample_weight, l2=l2, tol=TOL
        ).params
        log_probs = jax.nn.log_softmax(validation_features @ weights + intercept[None, :])
        return -jnp.mean(jnp.take_along_axis(log_probs, validation_labels[:, None], axis=1))

    grid = jnp.array([0.03, 0.1, 0.3])
    gradients = jax.jit(jax.vmap(jax.grad(validation_loss)))(grid)
    expected = [
        (validation_loss(l2 + STEP) - validation_loss(l2 - STEP)) / (2 * STEP) for l2 in grid
    ]
    np.testing.assert_allclose(gradients, expected, rtol=1e-6, atol=1e-9)


def test_float32_agrees_with_float64(data):
    features, labels, sample_weight = data
    options = dict(solver="newton-cg", reference_class=False, fit_intercept=True)
    u = base_point(0.1)
    exact = jacobian(u, *data, **options)
    single = jacobian(
        u.astype(np.float32),
        features.astype(np.float32),
        labels,
        sample_weight.astype(np.float32),
        **options,
    )
    assert single.dtype == np.float32
    # Measured: 3e-6 of the largest entry (the fit's float32 floor, amplified by H⁻¹).
    np.testing.assert_allclose(single, exact, atol=1e-4 * np.max(np.abs(exact)))


def test_sparse_features(data):
    """Gradients with respect to a BCOO's stored values, the weights and l2, as for dense X."""
    features, labels, sample_weight = data
    options = dict(solver="newton-cg", reference_class=False, fit_intercept=True)
    dense = jacobian(base_point(0.1), *data, **options)
    contraction = np.random.default_rng(2).normal(size=dense.shape[0])
    stored = sparse.BCOO.fromdense(features)

    def scalar(values, weights, l2):
        matrix = sparse.BCOO((values, stored.indices), shape=stored.shape)
        result = fit_logistic_regression(
            matrix, labels, NUM_CLASSES, sample_weight=weights, l2=l2, tol=TOL
        )
        flat = jnp.concatenate([result.params[0].ravel(), result.params[1], result.loss[None]])
        return jnp.vdot(contraction, flat)

    grad_values, grad_weights, grad_l2 = jax.grad(scalar, argnums=(0, 1, 2))(
        stored.data, jnp.asarray(sample_weight), 0.1
    )
    expected = contraction @ dense
    grad_features = sparse.BCOO((grad_values, stored.indices), shape=stored.shape).todense()
    np.testing.assert_allclose(grad_l2, expected[0], rtol=1e-9)
    np.testing.assert_allclose(grad_weights[WEIGHT_ROWS], expected[1:4], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        grad_features[X_ROWS, X_COLUMNS], expected[4:7], rtol=1e-9, atol=1e-12
    )


def test_collinear_unpenalised_gives_the_minimum_norm_tangent(data):
    """l2 = 0 and column 3 = 2·column 0: the tangent of the minimum-norm optimum, never NaN."""
    features, labels, sample_weight = data
    collinear = features.copy()
    collinear[:, 3] = 2 * collinear[:, 0]
    options = dict(solver="newton-cg", reference_class=False, fit_intercept=True)
    u = base_point(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollinearityWarning)
        columns = [1, 2, 3]  # the sample weights: they keep the columns' dependence
        expected = finite_differences(
            lambda v: np.asarray(outputs(v, collinear, labels, sample_weight, **options)),
            u,
            columns,
        )
    tangents = jacobian(u, collinear, labels, sample_weight, **options)
    assert np.all(np.isfinite(tangents))
    np.testing.assert_allclose(tangents[:, columns], expected, rtol=1e-6, atol=1e-7)
    # Columns 0 and 3 share their coefficients as the minimum-norm point does (1 : 2).
    weights_dot = tangents[: NUM_FEATURES * NUM_CLASSES].reshape(NUM_FEATURES, NUM_CLASSES, -1)
    np.testing.assert_allclose(weights_dot[3], 2 * weights_dot[0], atol=1e-10)


def _dense_derivative_in_l2(features, num_classes, l2, weights, intercept):
    """dθ*/dl2 = −H⁺·∂g/∂l2 from the explicit float64 Hessian, class shifts of b removed."""
    features, weights, intercept = (
        np.asarray(a, np.float64) for a in (features, weights, intercept)
    )
    rows, columns = features.shape
    logits = features @ weights + intercept
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    augmented = np.column_stack([features, np.ones(rows)])
    curvature = np.einsum("nk,kl->nkl", probs, np.eye(num_classes)) - np.einsum(
        "nk,nl->nkl", probs, probs
    )
    size = (columns + 1) * num_classes
    hessian = np.einsum("nm,np,nkl->mkpl", augmented, augmented, curvature).reshape(size, size)
    hessian /= rows
    hessian[: columns * num_classes, : columns * num_classes] += l2 * np.eye(columns * num_classes)
    tangent = -np.linalg.lstsq(
        hessian, np.concatenate([weights.ravel(), np.zeros(num_classes)]), rcond=1e-13
    )[0]
    weights_dot, intercept_dot = tangent[:-num_classes], tangent[-num_classes:]
    return weights_dot.reshape(columns, num_classes), intercept_dot - intercept_dot.mean()


def test_columns_of_very_different_scales():
    # One α for the class-shift directions, set by the largest columns, left the small columns'
    # rows badly preconditioned: the solve hit its step limit and the derivative came out 70%
    # off (float64 and float32 alike) with no sign of it.
    rng = np.random.default_rng(1)
    rows, columns, num_classes, l2 = 400, 8, 4, 1e-4
    raw = rng.normal(size=(rows, columns))
    logits = raw @ rng.normal(size=(columns, num_classes))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    features = raw * 10.0 ** np.linspace(-3, 3, columns)

    def params(l2):
        return fit_logistic_regression(features, labels, num_classes, l2=l2, tol=1e-12).params

    weights, intercept = params(l2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        weights_dot, intercept_dot = jax.jacfwd(params)(l2)
    expected = _dense_derivative_in_l2(features, num_classes, l2, weights, intercept)
    for got, want in zip((weights_dot, intercept_dot), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * np.abs(want).max())


def test_a_solve_that_stops_short_warns(monkeypatch):
    # Not silently: a solve cut short (here by a step limit of 2) warns at run time, inside
    # `jit` too. A shape of its own, so that no compiled derivative is reused.
    from xentropy_jax.solvers import _implicit

    def short_cg(*args, **options):
        return _implicit_cg(*args, **{**options, "max_steps": 2})

    _implicit_cg = _implicit.plain_cg
    monkeypatch.setattr(_implicit, "plain_cg", short_cg)
    rng = np.random.default_rng(3)
    features, labels = rng.normal(size=(37, 5)), rng.integers(0, 3, 37)

    def weights(l2):
        return fit_logistic_regression(features, labels, 3, l2=l2).params[0]

    with pytest.warns(RuntimeWarning, match="implicit differentiation: .* MAX_STEPS after 2"):
        jax.block_until_ready(jax.jit(jax.jacfwd(weights))(1e-2))
        jax.effects_barrier()


@pytest.mark.parametrize("mode", ["jvp", "jacfwd"])
def test_a_failed_fit_raises_fit_error_in_forward_mode(mode):
    # Under jvp the status is concrete but the gradient norm carries a tangent: the error's
    # message failed on it (ConcretizationTypeError), where jax.grad raised FitError.
    rng = np.random.default_rng(4)
    features, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)

    def weights(l2):
        return fit_logistic_regression(features, labels, 3, l2=l2, max_iter=1).params[0]

    with pytest.raises(FitError, match="MAX_ITER after 1 iterations") as caught:
        if mode == "jvp":
            jax.jvp(weights, (0.5,), (1.0,))
        else:
            jax.jacfwd(weights)(0.5)
    assert np.isfinite(float(caught.value.result.grad_norm))


@pytest.mark.parametrize("solver", ["newton", "newton-cg"])
def test_float32_derivative_in_l2_beside_a_column_of_large_mean(solver):
    # Under eager `jax.grad` in l2 the fit was compiled as possibly unpenalised (l2 a tracer),
    # so a float32 column 1e4 + z was not centred: d‖W‖²/dl2 came out 7.8% (`newton`) and 2.7%
    # off, with the Hessian solve's warning. The primal l2 is concrete there: centred, 3e-6.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 5))
    labels = np.argmax(features @ rng.normal(size=(5, 3)) + rng.gumbel(size=(600, 3)), axis=1)
    features[:, 3] += 1e4
    features = features.astype(np.float32)

    def size(l2, X, tol):
        fit = fit_logistic_regression(X, labels, 3, l2=l2, solver=solver, tol=tol, throw=False)
        return jnp.sum(fit.params[0] ** 2)

    exact = float(jax.grad(size)(1e-3, features.astype(np.float64), 1e-12))
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        derivative = float(jax.grad(size)(1e-3, features, 1e-8))
    assert abs(derivative - exact) < 2e-5 * abs(exact)
