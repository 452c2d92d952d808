"""Second-order optax transformations: against dense solves, Newton steps, unbiasedness, optax."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xentropy_jax as xj
from xentropy_jax import CGStatus


def mlp(params, inputs):
    return jnp.tanh(inputs @ params["w1"] + params["b1"][None, :]) @ params["w2"]


def linear(params, inputs):
    return inputs @ params["W"] + params["b"][None, :]


def mlp_problem(dtype=jnp.float64, n=24, d=4, hidden=5, k=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = {
        "w1": jax.random.normal(keys[0], (d, hidden), dtype),
        "b1": 0.1 * jax.random.normal(keys[1], (hidden,), dtype),
        "w2": jax.random.normal(keys[2], (hidden, k), dtype),
    }
    inputs = jax.random.normal(keys[3], (n, d), dtype)
    labels = jnp.arange(n) % k
    return params, inputs, labels


def dense_ggn(logits_fn, params, inputs):
    """G = Σᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ / N from explicit Jacobians, [P, P]."""
    flat, unravel = ravel_pytree(params)
    jacobian = jax.jacobian(lambda f: logits_fn(unravel(f), inputs))(flat)
    hessians = xj.softmax_cross_entropy_hessian(logits_fn(params, inputs))
    return jnp.einsum("nkp,nkl,nlq->pq", jacobian, hessians, jacobian) / inputs.shape[0]


def test_gauss_newton_direction_is_the_damped_gauss_newton_solution():
    params, inputs, labels = mlp_problem()
    damping = 0.3
    optimizer = xj.gauss_newton(
        initial_damping=damping, max_cg_steps=200, cg_rtol=1e-12, warm_start_decay=0.0
    )

    @jax.jit
    def step(params):
        grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
        updates, state = optimizer.update(
            grad, optimizer.init(params), params, logits_fn=mlp, inputs=inputs
        )
        return grad, updates, state, dense_ggn(mlp, params, inputs)

    grad, updates, state, dense = step(params)
    expected = -jnp.linalg.solve(dense + damping * jnp.eye(dense.shape[0]), ravel_pytree(grad)[0])
    np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-8, atol=1e-12)
    assert int(state.cg_status) == CGStatus.CONVERGED and bool(state.accepted)
    np.testing.assert_allclose(ravel_pytree(state.direction)[0], expected, rtol=1e-8, atol=1e-12)
    # Without value_fn the damping stays, and ρ is not measured.
    assert float(state.damping) == damping and float(state.ratio) == 0.0


def test_undamped_full_batch_step_on_a_linear_model_is_one_newton_step():
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(60, 4)))
    labels = jnp.asarray(rng.integers(0, 3, 60))
    zero = {"W": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    optimizer = xj.gauss_newton(
        initial_damping=0.0, max_cg_steps=100, cg_rtol=1e-12, warm_start_decay=0.0
    )

    def loss_fn(params):
        return xj.mean_cross_entropy(linear, params, inputs, labels)

    @jax.jit
    def step(params):
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(
            grad,
            optimizer.init(params),
            params,
            logits_fn=linear,
            inputs=inputs,
            value_fn=loss_fn,
            value=loss,
        )
        flat, unravel = ravel_pytree(params)
        hessian = jax.hessian(lambda f: loss_fn(unravel(f)))(flat)
        return optax.apply_updates(params, updates), state, hessian, ravel_pytree(grad)[0]

    stepped, state, hessian, grad = step(zero)
    # The package's own Newton solver (explicit Hessian), one iteration from zero.
    newton = xj.fit_logistic_regression(
        np.asarray(inputs), np.asarray(labels), 3, solver=xj.Newton(), max_iter=1, throw=False
    )
    np.testing.assert_allclose(stepped["W"], newton.params[0], atol=1e-10)
    np.testing.assert_allclose(stepped["b"], newton.params[1], atol=1e-10)
    # And the minimum-norm Newton step from the dense Hessian (singular: class shifts).
    np.testing.assert_allclose(
        ravel_pytree(stepped)[0], -np.linalg.pinv(np.asarray(hessian)) @ grad, atol=1e-10
    )
    assert bool(state.accepted) and float(state.ratio) > 0.5


def lm_setup(value_fn_offset=None, initial_damping=1.0):
    params, inputs, labels = mlp_problem()
    optimizer = xj.gauss_newton(initial_damping=initial_damping, max_cg_steps=10)

    def loss_fn(p):
        loss = xj.mean_cross_entropy(mlp, p, inputs, labels)
        if value_fn_offset is None:
            return loss
        # A loss that punishes moving: every proposed step looks bad.
        pairs = zip(jax.tree.leaves(p), value_fn_offset, strict=True)
        distance = sum(jnp.sum((a - b) ** 2) for a, b in pairs)
        return loss + 1e3 * distance

    @jax.jit
    def step(params, state):
        grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
        updates, state = optimizer.update(
            grad, state, params, logits_fn=mlp, inputs=inputs, value_fn=loss_fn
        )
        return optax.apply_updates(params, updates), state, updates

    return params, optimizer, step, loss_fn


def test_levenberg_marquardt_rule_lowers_damping_after_good_steps_and_rejects_bad_ones():
    params, optimizer, step, loss_fn = lm_setup(initial_damping=1.0)
    state = optimizer.init(params)
    losses = [float(loss_fn(params))]
    for _ in range(4):
        params, state, _ = step(params, state)
        losses.append(float(loss_fn(params)))
        assert bool(state.accepted)
        if float(state.ratio) > 0.75:
            assert float(state.damping) < 1.0
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert int(state.count) == 4 and 1 <= int(state.cg_steps) <= 10

    start, _, _, _ = lm_setup()
    params, optimizer, step, _ = lm_setup(value_fn_offset=jax.tree.leaves(start))
    state = optimizer.init(params)
    new_params, state, updates = step(params, state)
    assert not bool(state.accepted) and float(state.ratio) < 0.25
    np.testing.assert_allclose(float(state.damping), 1.5)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    chex.assert_trees_all_equal(new_params, params)


def test_gnb_estimate_of_sophia_g_is_unbiased_for_the_ggn_diagonal():
    params, inputs, _ = mlp_problem(n=16, hidden=4)
    transform = xj.scale_by_sophia_g(b2=0.0, update_interval=1)
    state = transform.init(params)
    grad = jax.tree.map(jnp.ones_like, params)

    def estimate(seed):
        keyed = state._replace(key=jax.random.key_data(jax.random.key(seed)))
        _, new_state = transform.update(grad, keyed, params, logits_fn=mlp, inputs=inputs)
        return ravel_pytree(new_state.hessian)[0]

    num = 4000
    samples = jax.jit(jax.vmap(estimate))(jnp.arange(num))
    exact = ravel_pytree(xj.ggn_diagonal(mlp, params, inputs))[0]
    np.testing.assert_allclose(exact, jnp.diag(dense_ggn(mlp, params, inputs)), rtol=1e-10)
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(num)
    z = np.asarray((mean - exact) / stderr)
    # Unbiased: every coordinate within 4.5 standard errors (P ≈ 43 coordinates, fixed seed),
    # and the z-scores centred; a biased estimate (say, without the batch-size factor) fails.
    assert np.max(np.abs(z)) < 4.5, z
    assert abs(np.mean(z)) < 4.5 / np.sqrt(z.size)
    assert not np.allclose(mean / inputs.shape[0], exact, rtol=0.5)


@pytest.mark.parametrize("estimator", ["exact", "bartlett"])
def test_sophia_g_update_is_the_clipped_preconditioned_average(estimator):
    params, inputs, labels = mlp_problem()
    b1, gamma, lr = 0.9, 0.05, 0.1
    optimizer = xj.sophia_g(lr, b1=b1, b2=0.0, gamma=gamma, estimator=estimator)
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
    updates, state = jax.jit(
        lambda g, s, p: optimizer.update(g, s, p, logits_fn=mlp, inputs=inputs)
    )(grad, optimizer.init(params), params)
    hessian = state[0].hessian
    if estimator == "exact":
        chex.assert_trees_all_close(hessian, xj.ggn_diagonal(mlp, params, inputs), rtol=1e-10)
    expected = jax.tree.map(
        lambda g, h: -lr * jnp.clip((1 - b1) * g / jnp.maximum(gamma * h, 1e-12), -1, 1),
        grad,
        hessian,
    )
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) <= lr


def test_curvature_is_refreshed_every_k_steps_only():
    params, inputs, labels = mlp_problem()
    transform = xj.scale_by_sophia_g(b2=0.5, update_interval=3)
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
    update = jax.jit(lambda s: transform.update(grad, s, params, logits_fn=mlp, inputs=inputs)[1])
    state = transform.init(params)
    hessians = []
    for _ in range(7):
        state = update(state)
        hessians.append(ravel_pytree(state.hessian)[0])
    changed = [not np.array_equal(a, b) for a, b in zip(hessians, hessians[1:], strict=False)]
    # Refreshes at steps 0, 3, 6: the average changes going into steps 3 and 6 only.
    assert changed == [False, False, True, False, False, True]


@pytest.mark.parametrize("name", ["sophia", "diagonal"])
def test_a_refresh_on_a_batch_of_no_weight_is_skipped(name):
    # Such a batch has no curvature: averaged in, its estimate 0 shrank the average by the decay
    # and counted as a refresh in the bias correction (gauss_newton leaves λ alone there).
    params, inputs, labels = mlp_problem()
    transform = (
        xj.scale_by_sophia_g(b2=0.5, update_interval=1, bias_correction=True)
        if name == "sophia"
        else xj.scale_by_ggn_diagonal(decay=0.5)
    )
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)

    @jax.jit
    def update(state, weight, mass):
        options = dict(logits_fn=mlp, inputs=inputs, sample_weight=weight, label_mass=mass)
        return transform.update(grad, state, params, **options)

    ones = jnp.ones(inputs.shape[0])
    first, state = update(transform.init(params), ones, 1.0)
    for weight, mass in ((0 * ones, 1.0), (ones, 0.0), (ones, 0 * ones)):
        again, skipped = update(state, weight, mass)
        assert int(skipped.num_refreshes) == int(state.num_refreshes) == 1
        average = skipped.hessian if name == "sophia" else skipped.diagonal
        previous = state.hessian if name == "sophia" else state.diagonal
        chex.assert_trees_all_equal(average, previous)
        if name == "diagonal":  # the same division as the step before
            chex.assert_trees_all_close(again, first, rtol=1e-12)
    _, refreshed = update(state, ones.at[0].set(0.0), 1.0)
    assert int(refreshed.num_refreshes) == 2
    # Skipped before any refresh: the average 0 is not bias-corrected into 0/0 = NaN.
    empty, start = update(transform.init(params), 0 * ones, 1.0)
    assert int(start.num_refreshes) == 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(empty))
    if name == "diagonal":  # D = 0: g / λ
        chex.assert_trees_all_close(empty, jax.tree.map(lambda g: g / 1e-3, grad), rtol=1e-12)
    # NaN weights (unchecked under `jit`) are not taken for an empty batch: they show.
    _, poisoned = update(state, jnp.full_like(ones, jnp.nan), 1.0)
    average = poisoned.hessian if name == "sophia" else poisoned.diagonal
    assert not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(average))


def test_scale_by_ggn_diagonal_divides_by_the_damped_diagonal():
    params, inputs, labels = mlp_problem()
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
    transform = xj.scale_by_ggn_diagonal(damping=0.1, power=0.5)
    updates, state = transform.update(
        grad, transform.init(params), params, logits_fn=mlp, inputs=inputs
    )
    diagonal = xj.ggn_diagonal(mlp, params, inputs)
    expected = jax.tree.map(lambda g, h: g / jnp.sqrt(h + 0.1), grad, diagonal)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)
    # With decay, the bias correction makes the first average the estimate itself.
    averaged = xj.scale_by_ggn_diagonal(damping=0.1, decay=0.9)
    updates, _ = averaged.update(grad, averaged.init(params), params, logits_fn=mlp, inputs=inputs)
    expected = jax.tree.map(lambda g, h: g / (h + 0.1), grad, diagonal)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_a_negative_hutchinson_estimate_does_not_turn_the_step_uphill(power):
    # Hutchinson's estimate of diag(G) >= 0 is unbiased but can be negative; the scale uses
    # max(D, 0) + λ, so each update keeps the gradient's sign and stays finite (before: 833 of
    # 2,410 entries uphill with p = 1, NaN with p = ½, on a digits MLP).
    params, inputs, labels = mlp_problem(n=48, d=6, hidden=8, k=4)
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
    transform = xj.scale_by_ggn_diagonal(damping=1e-6, power=power, estimator="hutchinson")
    updates, state = transform.update(
        grad, transform.init(params), params, logits_fn=mlp, inputs=inputs
    )
    assert min(float(jnp.min(d)) for d in jax.tree.leaves(state.diagonal)) < 0
    for g, u in zip(jax.tree.leaves(grad), jax.tree.leaves(updates), strict=True):
        assert bool(jnp.all(jnp.isfinite(u))) and bool(jnp.all(g * u >= 0))


# factory, its hyperparameters, and the one changed between steps.
FACTORIES = {
    "gauss_newton": (xj.gauss_newton, {"initial_damping": 0.5, "max_cg_steps": 5}, "max_cg_steps"),
    "sophia_g": (xj.sophia_g, {"learning_rate": 0.05, "update_interval": 2}, "learning_rate"),
    "scale_by_ggn_diagonal": (
        xj.scale_by_ggn_diagonal,
        {"damping": 0.1, "estimator": "bartlett"},
        "damping",
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_composes_with_chain_and_inject_hyperparams_without_recompiling(name):
    factory, hyperparams, changed = FACTORIES[name]
    chex.clear_trace_counter()
    params, inputs, labels = mlp_problem(dtype=jnp.float32)
    optimizer = optax.chain(
        optax.clip_by_global_norm(10.0),
        optax.inject_hyperparams(factory)(**hyperparams),
        optax.scale(-0.3) if name == "scale_by_ggn_diagonal" else optax.identity(),
    )

    def loss_fn(p):
        return xj.mean_cross_entropy(mlp, p, inputs, labels)

    # Donated, as training loops do: gauss_newton's state held the injected initial damping's
    # own buffer twice, and donation failed ("donate the same buffer twice").
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    @chex.assert_max_traces(n=1)
    def step(params, state):
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(
            grad, state, params, logits_fn=mlp, inputs=inputs, value_fn=loss_fn, value=loss
        )
        return optax.apply_updates(params, updates), state, loss

    state = optimizer.init(params)
    losses = []
    for i in range(6):
        if i == 3:
            # Change a hyperparameter between steps: a new value, not a new compilation.
            injected = state[1].hyperparams
            old = injected[changed]
            injected[changed] = old // 2 if jnp.issubdtype(old.dtype, jnp.integer) else old * 0.5
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    if name == "gauss_newton":
        damping = optax.tree.get(state, "damping")
        assert damping.shape == () and float(damping) > 0
        assert int(optax.tree.get(state, "cg_steps")) <= 2  # max_cg_steps halved from 5


def test_multisteps_accumulates_micro_batches_then_applies_one_preconditioned_step():
    params, inputs, labels = mlp_problem()
    inner = optax.chain(xj.scale_by_ggn_diagonal(damping=0.1), optax.scale(-0.3))
    multi = optax.MultiSteps(inner, every_k_schedule=2)
    grad_fn = jax.grad(lambda p, x, y: xj.mean_cross_entropy(mlp, p, x, y))
    halves = [slice(0, 12), slice(12, 24)]
    grads = [grad_fn(params, inputs[h], labels[h]) for h in halves]
    state = multi.init(params)
    first, state = multi.update(grads[0], state, params, logits_fn=mlp, inputs=inputs)
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(first))
    second, state = multi.update(grads[1], state, params, logits_fn=mlp, inputs=inputs)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    expected, _ = inner.update(mean, inner.init(params), params, logits_fn=mlp, inputs=inputs)
    # optax keeps a running mean of the micro-batch gradients rather than the sum formed here:
    # agreement to the rounding of that accumulation.
    chex.assert_trees_all_close(second, expected, rtol=1e-6, atol=1e-12)
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(second))


def test_float32_gauss_newton_training_without_x64_dtypes():
    params, inputs, labels = mlp_problem(dtype=jnp.float32, n=64)
    optimizer = xj.gauss_newton()

    def loss_fn(p):
        return xj.mean_cross_entropy(mlp, p, inputs, labels)

    @jax.jit
    def step(params, state):
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(
            grad, state, params, logits_fn=mlp, inputs=inputs, value_fn=loss_fn, value=loss
        )
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    start = float(loss_fn(params))
    for _ in range(10):
        params, state = step(params, state)
    assert state.damping.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.direction))
    assert float(loss_fn(params)) < 0.5 * start


def test_gauss_newton_state_holds_no_nan_for_debug_nans():
    # `ratio` was NaN from init and at every step without value_fn: jax_debug_nans stopped
    # jit(init) and every step of a training loop holding the state, also a step compiled
    # before the check was turned on.
    params, inputs, labels = mlp_problem()
    optimizer = xj.gauss_newton()

    @jax.jit
    def step(params, state):
        grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
        updates, state = optimizer.update(grad, state, params, logits_fn=mlp, inputs=inputs)
        return optax.apply_updates(params, updates), state

    expected = step(params, optimizer.init(params))
    with jax.debug_nans(True):
        state = jax.jit(optimizer.init)(params)
        result = step(params, state)
    assert state.ratio == 0.0 and result[1].ratio == 0.0  # nothing measured
    chex.assert_trees_all_equal(result, expected)


def test_missing_extra_arguments_and_bad_hyperparameters_raise():
    params, inputs, _ = mlp_problem()
    grad = jax.tree.map(jnp.ones_like, params)
    for transform in (xj.gauss_newton(), xj.scale_by_sophia_g(), xj.scale_by_ggn_diagonal()):
        state = transform.init(params)
        with pytest.raises(ValueError, match="logits_fn"):
            transform.update(grad, state, params)
        with pytest.raises(ValueError, match="params"):
            transform.update(grad, state, logits_fn=mlp, inputs=inputs)
    with pytest.raises(ValueError, match="initial_damping"):
        xj.gauss_newton(initial_damping=-1.0)
    with pytest.raises(ValueError, match="damping_decrease"):
        xj.gauss_newton(damping_decrease=0.0)
    with pytest.raises(ValueError, match="estimator"):
        xj.sophia_g(estimator="hessian")
    with pytest.raises(ValueError, match="gamma"):
        xj.scale_by_sophia_g(gamma=0.0)
    with pytest.raises(ValueError, match="update_interval"):
        xj.scale_by_ggn_diagonal(update_interval=0)
    # Values that the docstrings exclude and that made every update NaN, a zero step, or a
    # failure at the first update instead of here.
    for factory, bad in [
        (xj.scale_by_ggn_diagonal, {"decay": 1.0}),
        (xj.scale_by_sophia_g, {"b1": 1.0, "bias_correction": True}),
        (xj.scale_by_sophia_g, {"b2": 1.0, "bias_correction": True}),
        (xj.sophia_g, {"learning_rate": 0.1, "b1": 1.0}),
        (xj.gauss_newton, {"initial_damping": np.inf}),
        (xj.gauss_newton, {"max_cg_steps": 2.5}),
        (xj.scale_by_ggn_diagonal, {"update_interval": 2.5}),
        (xj.gauss_newton, {"min_damping": 10.0, "max_damping": 1.0}),
        (xj.gauss_newton, {"lower_ratio": 0.9, "upper_ratio": 0.1}),
    ]:
        with pytest.raises(ValueError, match="|".join(k for k in bad if k != "bias_correction")):
            factory(**bad)
    xj.scale_by_sophia_g(clip_threshold=np.inf)  # no clipping: a valid bound
    # Accepted silently ("1" read as 1.0, "yes" as true), or failing at init inside JAX.
    for factory, bad in [
        (xj.gauss_newton, {"initial_damping": "1"}),
        (xj.scale_by_ggn_diagonal, {"damping": True}),
        (xj.sophia_g, {"bias_correction": "yes"}),
    ]:
        with pytest.raises(TypeError, match=next(iter(bad))):
            factory(**bad)
    for factory in (xj.sophia_g, xj.scale_by_ggn_diagonal):
        # A whole float passed the check and failed inside JAX at `init`.
        for seed in (1.5, 2.0):
            with pytest.raises(TypeError, match="seed must be an integer"):
                factory(seed=seed)
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63"):
            factory(seed=2**64)  # was "seed must be a number"
        assert factory(seed=np.int64(3)).init(params) is not None
        # A typed key was refused with NumPy's "cannot interpret"; it is the state's key now.
        key = jax.random.key(3)
        state = factory(seed=key).init(params)
        assert np.array_equal(optax.tree.get(state, "key"), jax.random.key_data(key))
        assert np.array_equal(
            optax.tree.get(state, "key"), optax.tree.get(factory(seed=3).init(params), "key")
        )
        for bad in (jax.random.split(key), jax.random.key(3, impl="rbg")):
            with pytest.raises(TypeError, match="single key of the default implementation"):
                factory(seed=bad)


def _linear(params, inputs):
    return inputs @ params["W"] + params["b"][None, :]


def _linear_problem(n=20, d=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    params = {"W": jnp.asarray(0.5 * rng.normal(size=(d, k))), "b": jnp.asarray(rng.normal(size=k))}
    grad = {"W": jnp.asarray(rng.normal(size=(d, k))), "b": jnp.asarray(rng.normal(size=k))}
    # The GGN diagonal of the mean cross-entropy of a linear model, in NumPy float64:
    # D_W[j, k] = Σᵢ x_ij² s_ik (1 − s_ik) / N and D_b[k] = Σᵢ s_ik (1 − s_ik) / N.
    logits = X @ np.asarray(params["W"]) + np.asarray(params["b"])
    s = np.exp(logits - logits.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    curvature = s * (1 - s)
    diagonal = {"W": (X**2).T @ curvature / n, "b": curvature.mean(axis=0)}
    return params, jnp.asarray(X), grad, diagonal


# Sophia-G with the exact diagonal, bias-corrected, never clipped.
_CORRECTED_SOPHIA = dict(
    b1=0.9, b2=0.8, gamma=0.05, clip_threshold=np.inf, estimator="exact", bias_correction=True
)


def _run_corrected_sophia(transform, steps, interval_changes=None):
    """Steps of ``transform`` (``_CORRECTED_SOPHIA``) checked against g / max(γD, ε).

    With a fixed gradient g and fixed parameters, the corrected averages are exactly
    m / (1 − b₁ᵗ) = g and h / (1 − b₂ⁿ) = D (n refreshes so far), so every update is
    g / max(γD, ε). ``interval_changes`` maps a step to the injected update_interval from it on.
    """
    params, X, grad, diagonal = _linear_problem()
    gamma = _CORRECTED_SOPHIA["gamma"]
    update = jax.jit(lambda s: transform.update(grad, s, params, logits_fn=_linear, inputs=X))
    state = transform.init(params)
    expected = {
        key: np.asarray(grad[key]) / np.maximum(gamma * diagonal[key], 1e-12) for key in grad
    }
    for step in range(steps):
        if interval_changes and step in interval_changes:
            state.hyperparams["update_interval"] = jnp.asarray(interval_changes[step])
        updates, state = update(state)
        for key in grad:
            np.testing.assert_allclose(updates[key], expected[key], rtol=1e-9)
    return state


def test_sophia_g_bias_correction_counts_refreshes_every_k_steps():
    # Refreshes at steps 0, k, 2k, …
    _run_corrected_sophia(xj.scale_by_sophia_g(update_interval=2, **_CORRECTED_SOPHIA), 5)


def test_sophia_g_bias_correction_counts_refreshes_when_the_interval_changes():
    # An injected update_interval that changes: the count of refreshes was inferred as
    # ⌊t / k⌋ + 1 with the current k, 21 instead of 3 (intervals 10 then 1), and the
    # corrected h, hence every update, came out 6.4 times off.
    transform = optax.inject_hyperparams(
        xj.scale_by_sophia_g, static_args=("estimator", "bias_correction")
    )(update_interval=10, **_CORRECTED_SOPHIA)
    state = _run_corrected_sophia(transform, 24, {12: 1, 21: 3})  # 10 → 1 → 3
    assert int(state.inner_state.num_refreshes) == 2 + 9 + 1


def test_diagonal_transformations_check_weights_at_every_eager_call():
    # From the second eager call on the refresh runs compiled, where the weights are traced:
    # a negative or NaN weight gave a NaN update and a NaN average instead of the ValueError
    # of the first call (and of gauss_newton's every call).
    params, X, grad, _ = _linear_problem()
    for transform in (xj.scale_by_sophia_g(update_interval=1), xj.scale_by_ggn_diagonal()):
        state = transform.init(params)
        n = X.shape[0]
        for weight, message in (
            (jnp.ones(n), None),
            (-jnp.ones(n), "non-negative"),
            (jnp.full(n, jnp.nan), "finite"),
        ):
            call = functools.partial(
                transform.update, grad, state, params, logits_fn=_linear, inputs=X
            )
            if message is None:
                updates, state = call(sample_weight=weight)
                assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))
                continue
            with pytest.raises(ValueError, match=message):
                call(sample_weight=weight)
            with pytest.raises(ValueError, match="label_mass must be " + message):
                call(label_mass=weight)
        updates, _ = transform.update(
            grad, state, params, logits_fn=_linear, inputs=X, sample_weight=jnp.ones(n)
        )
        assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))


def test_sophia_g_clips_at_the_given_threshold():
    # One step, b₂ = 0: u = clip((1 − b₁)·g / max(γD, ε), −c, c), for c other than 1.
    params, X, grad, diagonal = _linear_problem()
    b1, gamma = 0.9, 0.05
    for threshold in (0.05, 3.0, np.inf):
        transform = xj.scale_by_sophia_g(
            b1=b1, b2=0.0, gamma=gamma, clip_threshold=threshold, estimator="exact"
        )
        updates, _ = transform.update(
            grad, transform.init(params), params, logits_fn=_linear, inputs=X
        )
        for key in grad:
            ratio = (1 - b1) * np.asarray(grad[key]) / np.maximum(gamma * diagonal[key], 1e-12)
            assert np.abs(ratio).max() > 3.0  # the thresholds below bind
            expected = np.clip(ratio, -threshold, threshold)
            np.testing.assert_allclose(updates[key], expected, rtol=1e-9)


def test_a_group_of_parameters_under_multi_transform_gets_its_ggn_block():
    # optax.masked hands the transformation MaskedNode leaves for the other group: the model
    # raised a TypeError from its `@`; now a ValueError names the logits_fn to pass, and that
    # logits_fn gives the damped GGN step of the group's block.
    params, inputs, labels = mlp_problem()
    grad = jax.grad(lambda p: xj.mean_cross_entropy(mlp, p, inputs, labels))(params)
    groups = {"w1": "frozen", "b1": "frozen", "w2": "gn"}
    newton = functools.partial(xj.gauss_newton, initial_damping=0.3, max_cg_steps=200)
    for transformation in (newton(), xj.scale_by_ggn_diagonal(), xj.sophia_g()):
        optimizer = optax.multi_transform(
            {"gn": transformation, "frozen": optax.set_to_zero()}, groups
        )
        with pytest.raises(ValueError, match="MaskedNode") as caught:
            optimizer.update(grad, optimizer.init(params), params, logits_fn=mlp, inputs=inputs)
        assert isinstance(caught.value.__cause__, TypeError)

    def loss(p):
        return xj.mean_cross_entropy(mlp, p, inputs, labels)

    # value_fn, called on the same masked params, failed with the model's bare TypeError.
    optimizer = optax.multi_transform({"gn": newton(), "frozen": optax.set_to_zero()}, groups)
    with pytest.raises(ValueError, match="value_fn failed.*MaskedNode") as caught:
        optimizer.update(
            grad,
            optimizer.init(params),
            params,
            logits_fn=lambda p, x: mlp({**params, "w2": p["w2"]}, x),
            inputs=inputs,
            value_fn=loss,
        )
    assert isinstance(caught.value.__cause__, TypeError)
    _, state = optimizer.update(
        grad,
        optimizer.init(params),
        params,
        logits_fn=lambda p, x: mlp({**params, "w2": p["w2"]}, x),
        inputs=inputs,
        value_fn=lambda p: loss({**params, "w2": p["w2"]}),
    )
    assert bool(state.inner_states["gn"].inner_state.accepted)

    optimizer = optax.multi_transform(
        {"gn": newton(cg_rtol=1e-12), "frozen": optax.set_to_zero()}, groups
    )
    updates, _ = optimizer.update(
        grad,
        optimizer.init(params),
        params,
        logits_fn=lambda p, x: mlp({**params, "w2": p["w2"]}, x),
        inputs=inputs,
    )
    block = dense_ggn(lambda w2, x: mlp({**params, "w2": w2}, x), params["w2"], inputs)
    expected = jnp.linalg.solve(block + 0.3 * jnp.eye(block.shape[0]), -grad["w2"].ravel())
    np.testing.assert_allclose(updates["w2"].ravel(), expected, rtol=1e-8, atol=1e-12)
    assert not jnp.any(updates["w1"]) and not jnp.any(updates["b1"])


def test_integer_leaves_and_empty_trees_of_parameters():
    params, inputs, labels = mlp_problem()
    params = {**params, "step": jnp.asarray(3, jnp.int32)}

    def model(p, x):
        return mlp(p, x)

    grad = jax.grad(lambda p: xj.mean_cross_entropy(model, p, inputs, labels), allow_int=True)(
        params
    )
    assert grad["step"].dtype == jax.dtypes.float0
    transformations = (xj.gauss_newton(), xj.scale_by_ggn_diagonal(), xj.sophia_g())
    for transformation in transformations:
        # gauss_newton cast the float0 gradient first ("invalid literal for int()"), Sophia
        # failed in optax's moment: all three now name the integer leaf.
        with pytest.raises(TypeError, match="every leaf of params must be floating"):
            transformation.update(
                grad, transformation.init(params), params, logits_fn=model, inputs=inputs
            )
    # No parameters: empty updates (gauss_newton's CG and Hutchinson's vmap raised).
    for transformation in (*transformations, xj.scale_by_ggn_diagonal(estimator="hutchinson")):
        for empty in ({}, {"a": None}):
            updates, _ = transformation.update(
                empty, transformation.init(empty), empty, logits_fn=lambda p, x: x, inputs=inputs
            )
            assert jax.tree.structure(updates) == jax.tree.structure(empty)


def test_an_empty_group_under_multi_transform_does_not_call_the_model():
    # Every parameter in the other group: the second-order group's params are MaskedNodes.
    # Sophia and the diagonal scaling ran the model on them and raised; gauss_newton did not.
    params = {"w": jnp.ones((2, 3))}
    grads = jax.tree.map(jnp.ones_like, params)
    inputs = jnp.ones((4, 2))

    def model(p, x):
        return x @ p["w"]

    for second in (
        xj.gauss_newton(),
        xj.scale_by_sophia_g(),
        xj.sophia_g(),
        xj.scale_by_ggn_diagonal(),
    ):
        optimizer = optax.multi_transform(
            {"second": second, "adam": optax.adam(0.1)}, {"w": "adam"}
        )
        adam = optax.adam(0.1)
        updates, _ = optimizer.update(
            grads, optimizer.init(params), params, logits_fn=model, inputs=inputs
        )
        expected, _ = adam.update(grads, adam.init(params), params)
        np.testing.assert_array_equal(updates["w"], expected["w"])


def test_gauss_newton_ratio_is_zero_where_no_descent_step_was_measured():
    # A zero gradient after a step: the warm start is no descent direction, nothing is
    # measured, and the state documents ρ = 0 there (it held −actual, a division by −1).
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(32, 3)))
    y = jnp.asarray(rng.integers(0, 3, 32))

    def model(W, x):
        return x @ W

    def value(W):
        return xj.mean_cross_entropy(model, W, X, y)

    optimizer = xj.gauss_newton(max_cg_steps=1)
    W = jnp.zeros((3, 3))
    state = optimizer.init(W)
    loss, grad = jax.value_and_grad(value)(W)
    updates, state = optimizer.update(
        grad, state, W, logits_fn=model, inputs=X, value_fn=value, value=loss
    )
    assert state.accepted and 0 < state.ratio
    W = optax.apply_updates(W, updates)
    updates, state = optimizer.update(
        jnp.zeros_like(W), state, W, logits_fn=model, inputs=X, value_fn=value, value=value(W)
    )
    assert not state.accepted and state.ratio == 0
    np.testing.assert_array_equal(updates, 0)
    # ... and λ stays as it was: it grew 1.5× per zero gradient (a batch of zero weights),
    # towards max_damping, after which steps resumed at g / 1e8.
    damping = float(state.damping)
    for _ in range(3):
        updates, state = optimizer.update(
            jnp.zeros_like(W), state, W, logits_fn=model, inputs=X, value_fn=value
        )
    assert float(state.damping) == damping
