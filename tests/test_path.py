"""The regularisation path against independent fits; compile once; under vmap."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

import xentropy_jax as xj
from xentropy_jax.solvers import _path

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 80, 6, 3
L2_VALUES = np.array([1.0, 0.1, 0.01, 0.001])


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(NUM_ROWS, NUM_FEATURES))
    y = rng.integers(0, NUM_CLASSES, NUM_ROWS)
    return X, y


@pytest.mark.parametrize("solver", ["newton-cg", "newton"])
def test_path_matches_independent_fits(problem, solver):
    X, y = problem
    path = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, tol=1e-11, solver=solver)
    assert path.params[0].shape == (L2_VALUES.size, NUM_FEATURES, NUM_CLASSES)
    assert bool(np.all(path.converged))
    for index, l2 in enumerate(L2_VALUES):
        single = xj.fit_logistic_regression(X, y, NUM_CLASSES, l2=l2, tol=1e-11, solver=solver)
        np.testing.assert_allclose(path.params[0][index], single.params[0], atol=1e-8)
        np.testing.assert_allclose(path.params[1][index], single.params[1], atol=1e-8)
        np.testing.assert_allclose(path.loss[index], single.loss, rtol=1e-12)


def test_a_protocol_solver_with_a_preconditioner_attribute(problem):
    # The path passed `basis=` to any solver with a `preconditioner` attribute, which the
    # Solver protocol's `minimize` does not take.
    @dataclasses.dataclass(frozen=True)
    class Wrapped:
        preconditioner: str = "diagonal"

        def minimize(self, objective, theta, *, tol, max_iter, verbose=False):
            inner = xj.NewtonCG(preconditioner=self.preconditioner)
            return inner.minimize(objective, theta, tol=tol, max_iter=max_iter, verbose=verbose)

    X, y = problem
    path = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES[:2], tol=1e-10, solver=Wrapped())
    for index, l2 in enumerate(L2_VALUES[:2]):
        single = xj.fit_logistic_regression(X, y, NUM_CLASSES, l2=l2, tol=1e-10)
        np.testing.assert_allclose(path.params[0][index], single.params[0], atol=1e-8)


def test_warm_start_saves_iterations(problem):
    X, y = problem
    path = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, tol=1e-10)
    cold = [
        int(xj.fit_logistic_regression(X, y, NUM_CLASSES, l2=l2, tol=1e-10).n_iter)
        for l2 in L2_VALUES
    ]
    assert int(np.sum(path.n_iter)) < sum(cold)


def test_path_compiles_once_and_vmaps_over_folds(problem, monkeypatch):
    X, y = problem
    chex.clear_trace_counter()
    traced = jax.jit(
        chex.assert_max_traces(_path._path.__wrapped__, n=1),
        static_argnames=_path.PATH_STATIC_ARGNAMES,
    )
    monkeypatch.setattr(_path, "_path", traced)
    first = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES)
    xj.fit_regularization_path(X * 2, y, NUM_CLASSES, L2_VALUES / 3)
    monkeypatch.undo()  # a vmapped call is a new trace, by design
    # Two folds as sample weights: each vmapped path equals the path on its rows.
    folds = np.stack([np.arange(NUM_ROWS) % 2 == 0, np.arange(NUM_ROWS) % 2 == 1]).astype(float)
    batched = jax.vmap(
        lambda w: xj.fit_regularization_path(
            X, y, NUM_CLASSES, L2_VALUES, sample_weight=w, tol=1e-10, throw=False
        )
    )(folds)
    assert batched.params[0].shape == (2,) + first.params[0].shape
    for fold in range(2):
        rows = folds[fold] > 0
        alone = xj.fit_regularization_path(X[rows], y[rows], NUM_CLASSES, L2_VALUES, tol=1e-10)
        np.testing.assert_allclose(batched.params[0][fold], alone.params[0], atol=1e-7)


def test_float32_path_matches_float64(problem):
    X, y = problem
    reference = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, tol=1e-10)
    with jax.enable_x64(False):
        result = xj.fit_regularization_path(
            X.astype(np.float32), y, NUM_CLASSES, L2_VALUES, tol=1e-5
        )
        assert result.params[0].dtype == np.float32
    np.testing.assert_allclose(result.params[0], reference.params[0], atol=1e-4)
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-6)


@pytest.mark.parametrize("solver", ["newton", "newton-cg", "trust-region"])
def test_float32_path_in_increasing_order_on_raw_columns(solver):
    # From each optimum to a larger l2 the drift of θ off its centred subspace (rounding of
    # θ + tΔ, never corrected by a centred direction) ended fits MAX_ITER or LINE_SEARCH_FAILED
    # on raw wine, on answers within 2e-8 of the optimum.
    from sklearn.datasets import load_wine

    features, labels = load_wine(return_X_y=True)
    grid = np.logspace(-5, 1, 7)
    path = xj.fit_regularization_path(
        features.astype(np.float32), labels, 3, grid, solver=solver, throw=False
    )
    assert [xj.Status(int(s)).name for s in path.status] == ["CONVERGED"] * grid.size
    assert int(np.max(path.n_iter)) <= 30


def test_bad_path_arguments(problem):
    X, y = problem
    with pytest.raises(ValueError, match="1-D"):
        xj.fit_regularization_path(X, y, NUM_CLASSES, [[0.1]])
    with pytest.raises(ValueError, match="l2"):
        xj.fit_regularization_path(X, y, NUM_CLASSES, [0.1, -1.0])
    with pytest.raises(xj.FitError):
        xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, max_iter=1)
    # Under jit a NaN tol is reported for every value, with no iteration taken.
    traced = jax.jit(
        lambda tol: xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, tol=tol, throw=False)
    )(np.nan)
    assert np.all(np.asarray(traced.status) == xj.Status.INVALID_TOL)
    assert np.all(np.asarray(traced.n_iter) == 0)
    # A bad l2 among good ones marks its own fit only (it marked them all); the others are the
    # path of the good values alone, warm starts included.
    grid = np.array([L2_VALUES[0], np.nan, *L2_VALUES[1:], -1.0])
    run = jax.jit(
        lambda l2: xj.fit_regularization_path(X, y, NUM_CLASSES, l2, tol=1e-10, throw=False)
    )
    traced = run(grid)
    status = np.asarray(traced.status)
    assert status[1] == status[-1] == xj.Status.INVALID_L2
    assert traced.n_iter[1] == traced.n_iter[-1] == 0
    good = np.r_[0, 2 : grid.size - 1]
    assert np.all(status[good] == xj.Status.CONVERGED)
    alone = xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, tol=1e-10)
    np.testing.assert_allclose(traced.params[0][good], alone.params[0], atol=1e-8)
    # Bad labels still mark every fit, with the labels' status.
    bad = jax.jit(
        lambda y: xj.fit_regularization_path(X, y, NUM_CLASSES, L2_VALUES, throw=False).status
    )(np.where(np.arange(y.size) == 0, NUM_CLASSES, y))
    assert np.all(np.asarray(bad) == xj.Status.INVALID_LABELS)


def test_the_path_refuses_to_be_differentiated(problem):
    # Forward mode through the warm-started fits crashed inside JAX or, in float32, gave NaN
    # tangents; reverse mode failed inside JAX. Every mode now gets one clear error.
    X, y = problem

    def first_weights(scale, l2_values=L2_VALUES):
        path = xj.fit_regularization_path(X * scale, y, NUM_CLASSES, l2_values, throw=False)
        return path.params[0][0, 0, 0]

    for derivative in (
        jax.grad(first_weights),
        jax.jacfwd(first_weights),
        lambda s: jax.jvp(first_weights, (s,), (1.0,)),
        lambda s: jax.grad(lambda l2: first_weights(s, l2 * L2_VALUES))(1.0),
    ):
        with pytest.raises(TypeError, match="fit_regularization_path is not differentiable"):
            derivative(1.0)


def test_extrapolations_are_lagrange_and_fall_back_to_the_last_point():
    nodes = np.log(np.array([1.0, 0.3, 0.1]))
    node = np.log(0.03)
    # Points on a quadratic in log(l2): the quadratic extrapolation is exact, the linear one is
    # exact for the points' linear part.
    a, b, c = np.array([1.0, -2.0]), np.array([0.5, 3.0]), np.array([0.25, -1.0])
    quadratic_points = a + np.outer(nodes, b) + np.outer(nodes**2, c)
    linear, quadratic = _path.extrapolations(quadratic_points, nodes, node)
    np.testing.assert_allclose(quadratic, a + b * node + c * node**2, rtol=1e-12)
    linear_points = a + np.outer(nodes, b)
    linear, _ = _path.extrapolations(linear_points, nodes, node)
    np.testing.assert_allclose(linear, a + b * node, rtol=1e-12)
    # Too few previous values, or a step further than `_MAX_REACH` times the last or backwards:
    # the last point (the linear extrapolation needs only the last two values).
    for bad_nodes, bad_node, linear_usable in [
        (np.array([-np.inf, -np.inf, nodes[2]]), node, False),
        (np.array([-np.inf, nodes[1], nodes[2]]), node, True),
        (nodes, nodes[2] + 3 * (nodes[2] - nodes[1]), False),
        (nodes, nodes[1], False),
    ]:
        linear, quadratic = _path.extrapolations(quadratic_points, bad_nodes, bad_node)
        np.testing.assert_array_equal(quadratic, quadratic_points[2])
        if not linear_usable:
            np.testing.assert_array_equal(linear, quadratic_points[2])


def test_float64_path_through_zero_with_a_near_constant_column_keeps_its_cost():
    # A float64 path whose grid ends at l2 = 0 takes the scaled Kronecker basis, decided by
    # its weakest l2. Centred there, the column 7 + 7e-9·z (Jacobi-scaled by about 1e8) made
    # the penalised members' stand-in for l2·D²·P so poor that the path took 131 to 168
    # products per value where it takes 10 to 20; float64 fits are not centred.
    rng = np.random.default_rng(0)
    base, z = rng.normal(size=(1000, 5)), rng.normal(size=1000)
    logits = base[:, :3] @ rng.normal(size=(3, 3)) + z[:, None] * rng.normal(size=3)
    labels = np.argmax(logits + rng.gumbel(size=(1000, 3)), axis=1)
    features = np.column_stack([base, 7.0 + 7e-9 * z])
    path = xj.fit_regularization_path(features, labels, 3, np.array([1.0, 1e-2, 1e-4, 0.0]))
    assert np.all(np.asarray(path.status) == 0)
    assert np.all(np.asarray(path.n_hessian_products) <= 40)
