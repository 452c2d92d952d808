"""Bad input at the public boundary: a clear exception naming the argument, or the right answer.

Each case here used to give a wrong number silently or fail deep inside JAX with words that
named no argument of ours.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from jax.experimental import sparse

import xentropy_jax as xj
from xentropy_jax._linear import logistic_objective

X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
Y = np.array([0, 0, 1, 2, 2, 0])


def test_complex_input_is_refused_not_cast_to_real():
    fits = (xj.fit_logistic_regression, xj.fit_logistic_regression_streamed)
    for fit in fits:  # X·1j was fitted as zeros, X + 5j as X
        with pytest.raises(TypeError, match="X must be real"):
            fit(X + 5j, Y, 3, l2=0.1)
    with pytest.raises(TypeError, match="sample_weight must be real"):
        xj.fit_logistic_regression(X, Y, 3, l2=0.1, sample_weight=np.ones(6) * 1j)
    with pytest.raises(TypeError, match="sample_weight must be real"):
        xj.fit_logistic_regression_streamed(X, Y, 3, l2=0.1, sample_weight=np.ones(6) + 1j)
    with pytest.raises(TypeError, match="l2_values must be real"):
        xj.fit_regularization_path(X, Y, 3, [1 + 1j])
    with pytest.raises(TypeError, match="rtol must be real"):
        xj.cg(lambda v: v, jnp.ones(3), rtol=1e-5 + 1j)
    with pytest.raises(TypeError, match="X must be real"):
        xj.logit_inference((np.zeros((1, 3)), np.zeros(3)), X + 1j, Y)
    with pytest.raises(TypeError, match="damping must be real"):
        xj.ggn_vp(lambda w, x: x @ w, jnp.zeros((1, 3)), X, jnp.ones((1, 3)), damping=1j)


def test_strings_none_and_truthy_flags_are_refused_by_name():
    cases = [
        (TypeError, "l2 must be a real number, got None", dict(l2=None)),
        (TypeError, "tol must be a real number, got None", dict(tol=None)),
        (TypeError, "l2 must be a real number or array, got the string", dict(l2="0.1")),
        (ValueError, "max_iter must be an integer", dict(max_iter="5")),
        (ValueError, "max_iter must be an integer", dict(max_iter=True)),  # ran as 1
        (TypeError, "fit_intercept must be True or False", dict(fit_intercept="no")),
        (TypeError, "reference_class must be True or False", dict(reference_class="no")),
        (TypeError, "verbose must be True or False", dict(verbose="no")),
        (ValueError, "init must be a pair", dict(init=np.zeros((1, 3)))),
    ]
    for error, message, options in cases:
        with pytest.raises(error, match=message):
            xj.fit_logistic_regression(X, Y, 3, **options)
    with pytest.raises(TypeError, match="X must be numeric, got dtype object"):
        xj.fit_logistic_regression(X.astype(object), Y, 3)
    with pytest.raises(TypeError, match="l2_values must be numeric"):
        xj.fit_regularization_path(X, Y, 3, ["1", "0.1"])
    with pytest.raises(TypeError, match="l2 must be a real number, got None"):
        xj.fit_logistic_regression_streamed(X, Y, 3, l2=None)
    with pytest.raises(TypeError, match="throw must be True or False"):
        xj.fit_regularization_path(X, Y, 3, [0.1], throw="no")
    with pytest.raises(TypeError, match="rtol must be a real number or array"):
        xj.cg(lambda v: v, jnp.ones(3), rtol="1e-5")
    with pytest.raises(TypeError, match="rtol must be a non-negative number, got None"):
        xj.cg(lambda v: v, jnp.ones(3), rtol=None)


def test_boolean_arrays_integer_flags_and_exact_numbers_are_still_taken():
    # The first version of the checks refused them: a 0-d boolean array is a bool, verbose=0
    # is scikit-learn's style, and Fraction / Decimal are real numbers.
    import decimal
    import fractions

    reference = xj.fit_logistic_regression(X, Y, 3, l2=0.1, fit_intercept=False)
    for flag in (jnp.bool_(False), np.array(False), 0):
        result = xj.fit_logistic_regression(X, Y, 3, l2=0.1, fit_intercept=flag, verbose=0)
        np.testing.assert_array_equal(result.params[0], reference.params[0])
    penalised = xj.fit_logistic_regression(X, Y, 3, l2=0.1)
    for l2 in (fractions.Fraction(1, 10), decimal.Decimal("0.1")):
        result = xj.fit_logistic_regression(X, Y, 3, l2=l2, throw=1)
        np.testing.assert_array_equal(result.params[0], penalised.params[0])
    for flag in (2, 0.0, "no"):
        with pytest.raises(TypeError, match="fit_intercept must be True or False"):
            xj.fit_logistic_regression(X, Y, 3, fit_intercept=flag)


def test_a_solver_class_is_refused_before_tracing():
    with pytest.raises(TypeError, match=r"an instance such as NewtonCG\(\)"):
        xj.fit_logistic_regression(X, Y, 3, solver=xj.NewtonCG)


def test_loop_bounds_beyond_int32_or_fractional_are_refused():
    # Beyond int32 they escaped as JAX's OverflowError naming an internal argument.
    with pytest.raises(ValueError, match=r"max_steps must be an integer in \[0, 2\*\*31 - 1\]"):
        xj.cg(lambda v: v, jnp.ones(3), max_steps=10**10)
    with pytest.raises(ValueError, match="max_cg_steps must be an integer in"):
        xj.gauss_newton(max_cg_steps=2**40)
    for bad in (10**10, 2.5, True):  # 2.5 was accepted
        with pytest.raises(ValueError, match="max_line_search must be an integer"):
            xj.Newton(max_line_search=bad)
    for bad in ("0.1", np.array([0.1, 0.2])):
        with pytest.raises(ValueError, match="sufficient_decrease must be in"):
            xj.NewtonCG(sufficient_decrease=bad)
    inference = dict(method="cg", subset="all")
    fit = (np.zeros((1, 3)), np.zeros(3))
    for options, message in [
        (dict(cg_max_steps=0), "cg_max_steps must be an integer"),
        (dict(cg_max_steps=2.5), "cg_max_steps must be an integer"),
        (dict(cg_rtol=-1.0), r"cg_rtol must be a number in \(0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            xj.logit_inference(fit, X, Y, **inference, **options)


def test_l2_that_overflows_the_working_precision_is_refused():
    # Finite in float64, inf in the float32 fit: NON_FINITE blamed X, the path said INVALID_L2.
    features = X.astype(np.float32)
    with pytest.raises(ValueError, match="l2 = 1e\\+39 overflows float32"):
        xj.fit_logistic_regression(features, Y, 3, l2=1e39)
    with pytest.raises(ValueError, match="overflows float32"):
        xj.fit_regularization_path(features, Y, 3, [1.0, 1e39])
    with pytest.raises(ValueError, match="overflows float32"):
        xj.fit_logistic_regression_streamed(features, Y, 3, l2=1e39)


def test_streamed_fit_without_feature_columns_is_refused():
    with pytest.raises(ValueError, match="X has no feature columns"):
        xj.fit_logistic_regression_streamed(X[:, :0], Y, 3, l2=0.1)


@pytest.mark.parametrize("labels", [np.array([0, 2**32 + 1]), np.array([0, 2**63], np.uint64)])
def test_integer_labels_beyond_int32_give_nan_not_a_wrapped_class(labels):
    with jax.enable_x64(False):
        logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]], jnp.float32)
        losses = xj.softmax_cross_entropy_with_integer_labels(logits, labels)
        # The linear head checks concrete labels, and names the label given.
        with pytest.raises(ValueError, match=f"got \\[{labels[1]}\\]"):
            xj.linear_softmax_cross_entropy(jnp.eye(2, dtype=jnp.float32), logits, labels)
    # 2**32 + 1 was read as class 1.
    assert np.isfinite(losses[0]) and np.isnan(losses[1])


def test_curvature_of_integer_labels_beyond_int32_is_nan():
    # mean_cross_entropy and hessian_vp cast host labels with jnp.asarray first, which wraps
    # 2**32 + 1 into class 1 with 64-bit mode off: a plausible loss and product.
    inputs, params = jnp.array([[1.0, 2.0], [0.5, -1.0]], jnp.float32), jnp.zeros((2, 3))

    def linear(w, x):
        return x @ w

    labels = np.array([0, 2**32 + 1])
    with jax.enable_x64(False):
        loss = xj.mean_cross_entropy(linear, params, inputs, labels)
        product = xj.hessian_vp(linear, params, inputs, labels, jnp.ones_like(params))
        objective = logistic_objective(inputs, labels, 3)
    assert np.isnan(loss) and np.all(np.isnan(product))
    assert int(objective.labels[1]) == -1


def test_linear_head_integer_bias_is_a_type_error():
    with pytest.raises(TypeError, match="bias must be a floating array"):
        xj.linear_softmax_cross_entropy(
            jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.array([0, 1]), bias=jnp.zeros(5, jnp.int32)
        )


def test_ggn_operator_names_mismatched_tangents():
    operator = xj.ggn_operator(lambda w, x: x @ w, jnp.zeros((1, 3)), jnp.asarray(X))
    for tangent in (jnp.ones((2, 3)), (jnp.ones((1, 3)),)):
        with pytest.raises(ValueError, match="tangents must match params leaf by leaf"):
            operator(tangent)
    with pytest.raises(TypeError, match="damping must be a non-negative number, got None"):
        xj.ggn_operator(lambda w, x: x @ w, jnp.zeros((1, 3)), X, damping=None)


def test_optax_updates_that_do_not_match_params_are_named():
    params = jnp.zeros((1, 3))
    for transform in (xj.gauss_newton(), xj.scale_by_sophia_g(), xj.scale_by_ggn_diagonal()):
        state = transform.init(params)
        with pytest.raises(ValueError, match="updates \\(gradients\\) must match params"):
            transform.update(
                jnp.ones((2, 3)), state, params, logits_fn=lambda w, x: x @ w, inputs=X
            )


@pytest.mark.parametrize("solver", [xj.NewtonCG(preconditioner="none"), xj.TrustRegion()])
def test_solver_minimize_takes_theta_in_the_objectives_dtype(solver):
    objective = logistic_objective(X, Y, 3, l2=0.1)
    size = objective.num_params
    for bad in (jnp.zeros(size, int), {"theta": jnp.zeros(size)}):
        # An integer θ failed converting inf (TrustRegion: an OverflowError), a dict inside
        # jnp.asarray ("entry not a 2- or 3- tuple").
        with pytest.raises(TypeError, match="theta must be a floating"):
            solver.minimize(objective, bad, tol=1e-6, max_iter=10)
    # A float32 start for a float64 objective failed inside while_loop (TrustRegion: its own
    # radius carry took θ₀'s dtype), and a list had no dtype there.
    reference = solver.minimize(objective, jnp.zeros(size), tol=1e-8, max_iter=50)
    for start in (jnp.zeros(size, jnp.float32), [0.0] * size):
        output = solver.minimize(objective, start, tol=1e-8, max_iter=50)
        assert output.theta.dtype == objective.dtype
        np.testing.assert_allclose(output.theta, reference.theta, atol=1e-12)


def test_estimator_devices_must_be_devices_or_ids():
    from xentropy_jax.sklearn import LogisticRegression

    features = np.random.default_rng(0).normal(size=(30, 2))
    with pytest.raises(TypeError, match="devices must list jax devices"):
        LogisticRegression(devices=["cpu"]).fit(features, np.arange(30) % 3)


def test_every_scipy_and_bcoo_layout_fits_as_csr():
    rng = np.random.default_rng(3)
    features = sp.random(40, 6, density=0.3, format="csr", random_state=3)
    labels = rng.integers(0, 3, 40)
    reference = xj.fit_logistic_regression(features, labels, 3, l2=0.1, tol=1e-10).params[0]
    dense = features.toarray()
    layouts = [features.asformat(f) for f in ("dok", "lil", "dia", "bsr", "csc", "coo")]
    layouts += [sparse.BCOO.fromdense(dense, n_batch=1), sparse.BCOO.fromdense(dense, n_dense=1)]
    for layout in layouts:  # DOK, LIL and batched/dense-dimension BCOOs failed inside
        params = xj.fit_logistic_regression(layout, labels, 3, l2=0.1, tol=1e-10).params[0]
        np.testing.assert_allclose(params, reference, atol=1e-12)
    # DIA stores slots outside the matrix, which scipy ignores: a NaN there is no NaN of X.
    diagonal = sp.dia_matrix((np.array([[np.nan, 1.0, 2.0, 3.0]]), [1]), shape=(4, 4))
    result = xj.fit_logistic_regression(diagonal, np.array([0, 1, 0, 1]), 2, l2=0.1)
    assert result.converged


def test_estimators_name_a_bcoo_instead_of_failing_inside_jax():
    # scikit-learn's checks failed on it with JAX's NotImplementedError ("sparse rule for ne").
    from xentropy_jax.sklearn import LogisticRegression

    features = sp.random(40, 6, density=0.3, format="csr", random_state=0)
    labels = np.arange(40) % 3
    bcoo = sparse.BCOO.from_scipy_sparse(features)
    with pytest.raises(TypeError, match="not a BCOO"):
        LogisticRegression().fit(bcoo, labels)
    fitted = LogisticRegression().fit(features, labels)
    with pytest.raises(TypeError, match="not a BCOO"):
        fitted.predict(bcoo)
    # The conversion the message gives fits the same model.
    converted = sp.coo_matrix((np.asarray(bcoo.data), np.asarray(bcoo.indices).T), bcoo.shape)
    np.testing.assert_array_equal(LogisticRegression().fit(converted, labels).coef_, fitted.coef_)


def test_columns_too_small_for_their_squares_are_warned_of_without_a_penalty():
    # A float32 column of 1.6e-19 (a charge in coulombs): the Gram's and the Hessian's
    # diagonals underflowed to 0, and the unpenalised fit returned its coefficients as 0,
    # CONVERGED, 23% above the optimum's objective, dense and sparse, with no word.
    rng = np.random.default_rng(19)
    charge, other = rng.normal(size=400), rng.normal(size=400)
    labels = np.argmax(np.outer(charge, [0.0, 2.0, 1.0]) + rng.gumbel(size=(400, 3)), axis=1)
    unit = np.c_[charge, other]
    reference = xj.fit_logistic_regression(unit, labels, 3, tol=1e-10).params[0]
    # Penalised, a column of 1e-19 is as good as absent: the fit without it is the reference.
    penalised = xj.fit_logistic_regression(unit[:, 1:], labels, 3, l2=1e-3, tol=1e-10).params[0]
    for dtype, small, fine in ((np.float32, 1.6e-19, 1e-15), (np.float64, 1e-160, 1e-149)):
        scaled = (unit * [small, 1.0]).astype(dtype)
        match = f"columns 0 .* too small for {dtype.__name__}"
        for layout in (scaled, sp.csr_matrix(scaled), sparse.BCOO.fromdense(scaled)):
            with pytest.warns(UserWarning, match=match):
                xj.fit_logistic_regression(layout, labels, 3)
        with pytest.warns(UserWarning, match=match):
            xj.fit_regularization_path(scaled, labels, 3, [1e-2, 0.0])
        with pytest.warns(UserWarning, match=match):
            xj.fit_logistic_regression_streamed(scaled, labels, 3, chunk_rows=128)
        # With a penalty the optimum holds such coefficients near 0, which the fit finds.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = xj.fit_logistic_regression(scaled, labels, 3, l2=1e-3, tol=1e-10)
            xj.fit_regularization_path(scaled, labels, 3, [1e-2, 1e-3])

            # A traced l2 is not known to be 0: silent, as the collinearity warning.
            def loss(l2, features=scaled):
                return xj.fit_logistic_regression(features, labels, 3, l2=l2).loss

            jax.vmap(loss)(jnp.asarray([1e-2, 1e-3], dtype))
        np.testing.assert_allclose(result.params[0][1], penalised[0], rtol=1e-4)
        # Above the limit the unpenalised fit is the unit-scale fit, rescaled.
        result = xj.fit_logistic_regression((unit * [fine, 1.0]).astype(dtype), labels, 3)
        weights = np.asarray(result.params[0], np.float64) * [[fine], [1.0]]
        np.testing.assert_allclose(weights, reference, rtol=1e-3 if dtype == np.float32 else 1e-6)
    # An all-zero column is no such column (its coefficients are 0 at any scale).
    zero = np.c_[unit, np.zeros(400)].astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert xj.fit_logistic_regression(zero, labels, 3, throw=False).converged
    assert not [warning for warning in caught if "too small" in str(warning.message)]


def test_a_bcsr_is_named_at_the_boundary():
    # It failed inside JAX: "sparse rule for slice is not implemented".
    features = np.random.default_rng(0).normal(size=(50, 3))
    bcsr = sparse.BCSR.fromdense(features)
    with pytest.raises(TypeError, match=r"X is a BCSR: .*\.to_bcoo\(\)"):
        xj.fit_logistic_regression(bcsr, np.arange(50) % 3, 3, l2=1e-2)
    converted = xj.fit_logistic_regression(bcsr.to_bcoo(), np.arange(50) % 3, 3, l2=1e-2)
    assert converted.converged
    from xentropy_jax.sklearn import LogisticRegression

    with pytest.raises(TypeError, match="not a BCSR"):
        LogisticRegression().fit(bcsr, np.arange(50) % 3)
