"""Public pytree CG and Steihaug-CG: against dense solves, outcome codes, pytrees, jit/vmap."""

from __future__ import annotations

import functools

import chex
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

import xentropy_jax as xj
from xentropy_jax import CGStatus


def spd_matrix(n: int, condition: float, seed: int, dtype=np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigenvalues = np.geomspace(1.0, condition, n)
    return ((q * eigenvalues) @ q.T).astype(dtype)


def pytree_problem(matrix: np.ndarray, seed: int = 0):
    """A = matrix acting on the pytree {"w": [2, 3], "b": [n - 6]}; b a random pytree."""
    n = matrix.shape[0]
    template = {"w": jnp.zeros((2, 3), matrix.dtype), "b": jnp.zeros(n - 6, matrix.dtype)}
    _, unravel = ravel_pytree(template)
    a = jnp.asarray(matrix)

    def operator(tree):
        return unravel(a @ ravel_pytree(tree)[0])

    rhs_flat = jnp.asarray(np.random.default_rng(seed).normal(size=n).astype(matrix.dtype))
    return operator, unravel(rhs_flat), rhs_flat, unravel


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_cg_matches_dense_solve_on_a_pytree(dtype, tol):
    matrix = spd_matrix(10, 50.0, seed=1, dtype=dtype)
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix)
    result = jax.jit(lambda b: xj.cg(operator, b, rtol=tol, max_steps=50))(rhs)
    expected = np.linalg.solve(matrix.astype(np.float64), np.asarray(rhs_flat, np.float64))
    solution = np.asarray(ravel_pytree(result.solution)[0], np.float64)
    assert int(result.status) == CGStatus.CONVERGED
    assert jax.tree.structure(result.solution) == jax.tree.structure(rhs)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(result.solution))
    np.testing.assert_allclose(solution, expected, rtol=50 * tol, atol=50 * tol)
    # The recurrence's residual is the true residual b − A x.
    true_residual = rhs_flat - jnp.asarray(matrix) @ ravel_pytree(result.solution)[0]
    np.testing.assert_allclose(
        ravel_pytree(result.residual)[0], true_residual, atol=100 * tol * float(jnp.max(rhs_flat))
    )
    assert float(result.residual_norm) <= tol * float(jnp.linalg.norm(rhs_flat)) * 1.01
    assert 1 <= int(result.num_steps) <= 3 * matrix.shape[0]


def test_preconditioner_gives_the_same_solution_in_fewer_steps():
    rng = np.random.default_rng(3)
    scales = np.geomspace(1.0, 1e4, 12)
    matrix = spd_matrix(12, 3.0, seed=2) * np.sqrt(scales)[:, None] * np.sqrt(scales)[None, :]
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix, seed=int(rng.integers(100)))
    inverse_diagonal = unravel(jnp.asarray(1.0 / np.diag(matrix)))

    def jacobi(tree):
        return jax.tree.map(jnp.multiply, inverse_diagonal, tree)

    plain = xj.cg(operator, rhs, rtol=1e-10, max_steps=500)
    preconditioned = xj.cg(operator, rhs, rtol=1e-10, preconditioner=jacobi, max_steps=500)
    expected = np.linalg.solve(matrix, np.asarray(rhs_flat))
    for result in (plain, preconditioned):
        assert int(result.status) == CGStatus.CONVERGED
        np.testing.assert_allclose(ravel_pytree(result.solution)[0], expected, rtol=1e-6)
    assert int(preconditioned.num_steps) < int(plain.num_steps)


def test_step_limit_is_reported_not_taken_for_convergence():
    matrix = spd_matrix(10, 1e3, seed=4)
    operator, rhs, _, _ = pytree_problem(matrix)
    result = xj.cg(operator, rhs, rtol=1e-12, max_steps=3)
    assert int(result.status) == CGStatus.MAX_STEPS
    assert int(result.num_steps) == 3
    assert float(result.residual_norm) > 0


def test_zero_rhs_converges_in_zero_steps_and_warm_start_at_the_solution():
    matrix = spd_matrix(8, 10.0, seed=5)
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix)
    zero = xj.cg(operator, jax.tree.map(jnp.zeros_like, rhs))
    assert int(zero.status) == CGStatus.CONVERGED and int(zero.num_steps) == 0
    exact = unravel(jnp.asarray(np.linalg.solve(matrix, np.asarray(rhs_flat))))
    warm = xj.cg(operator, rhs, x0=exact, rtol=1e-8)
    assert int(warm.status) == CGStatus.CONVERGED and int(warm.num_steps) == 0
    # A warm start elsewhere still reaches the solution.
    elsewhere = xj.cg(operator, rhs, x0=jax.tree.map(jnp.ones_like, rhs), rtol=1e-12)
    np.testing.assert_allclose(
        ravel_pytree(elsewhere.solution)[0], ravel_pytree(exact)[0], rtol=1e-8
    )


def test_negative_curvature_stops_cg_at_the_previous_iterate():
    matrix = np.diag([1.0, 2.0, -1.0])

    def operator(v):
        return jnp.asarray(matrix) @ v

    first_direction_negative = xj.cg(operator, jnp.array([0.0, 0.0, 1.0]))
    assert int(first_direction_negative.status) == CGStatus.NEGATIVE_CURVATURE
    np.testing.assert_array_equal(first_direction_negative.solution, 0.0)
    later = xj.cg(operator, jnp.array([1.0, 1.0, 1.0]), rtol=1e-12)
    assert int(later.status) == CGStatus.NEGATIVE_CURVATURE
    assert int(later.num_steps) >= 1
    assert bool(jnp.all(jnp.isfinite(later.solution)))
    # The iterate it returns lowers the quadratic ½xᵀAx − bᵀx below its value at 0.
    x = later.solution
    assert float(0.5 * x @ (matrix @ x) - x.sum()) < 0


def test_non_finite_products_are_reported_and_the_last_finite_iterate_kept():
    matrix = jnp.asarray(spd_matrix(6, 10.0, seed=6))
    calls = {"n": 0}

    def operator(v):
        calls["n"] += 1
        return jnp.where(jnp.abs(v).sum() > 0, matrix @ v * jnp.nan, matrix @ v)

    result = xj.cg(operator, jnp.ones(6))
    assert int(result.status) == CGStatus.NON_FINITE
    assert bool(jnp.all(jnp.isfinite(result.solution)))
    nan_rhs = xj.cg(lambda v: matrix @ v, jnp.full(6, jnp.nan))
    assert int(nan_rhs.status) == CGStatus.NON_FINITE and int(nan_rhs.num_steps) == 0


def test_steihaug_inside_the_region_is_cg():
    matrix = spd_matrix(10, 20.0, seed=7)
    operator, rhs, rhs_flat, _ = pytree_problem(matrix)
    expected = np.linalg.solve(matrix, np.asarray(rhs_flat))
    result = xj.steihaug_cg(
        operator, rhs, radius=10 * np.linalg.norm(expected), rtol=1e-10, max_steps=50
    )
    assert int(result.status) == CGStatus.CONVERGED
    np.testing.assert_allclose(ravel_pytree(result.solution)[0], expected, rtol=1e-8)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_steihaug_stops_on_the_boundary_in_the_preconditioner_norm(preconditioned):
    matrix = spd_matrix(10, 100.0, seed=8)
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix)
    metric = np.diag(matrix) if preconditioned else np.ones(10)
    inverse = unravel(jnp.asarray(1.0 / metric))

    def precondition(tree):
        return jax.tree.map(jnp.multiply, inverse, tree)

    expected = np.linalg.solve(matrix, np.asarray(rhs_flat))
    radius = 0.3 * np.sqrt(expected @ (metric * expected))
    result = xj.steihaug_cg(
        operator, rhs, radius, preconditioner=precondition if preconditioned else None
    )
    x = np.asarray(ravel_pytree(result.solution)[0])
    assert int(result.status) == CGStatus.BOUNDARY
    np.testing.assert_allclose(np.sqrt(x @ (metric * x)), radius, rtol=1e-10)
    # A descent step of the model ½xᵀAx − bᵀx.
    assert 0.5 * x @ matrix @ x - x @ np.asarray(rhs_flat) < 0


def test_steihaug_follows_negative_curvature_to_the_boundary():
    matrix = np.diag([3.0, 1.0, -2.0])
    result = xj.steihaug_cg(lambda v: jnp.asarray(matrix) @ v, jnp.array([1.0, 0.5, 0.2]), 2.0)
    assert int(result.status) == CGStatus.NEGATIVE_CURVATURE
    np.testing.assert_allclose(float(jnp.linalg.norm(result.solution)), 2.0, rtol=1e-10)


def test_cg_with_ggn_operator_solves_the_damped_gauss_newton_system():
    def mlp(params, inputs):
        return jnp.tanh(inputs @ params["w1"]) @ params["w2"]

    key_w1, key_w2, key_x = jax.random.split(jax.random.key(0), 3)
    params = {
        "w1": jax.random.normal(key_w1, (4, 5), jnp.float64),
        "w2": jax.random.normal(key_w2, (5, 3), jnp.float64),
    }
    inputs = jax.random.normal(key_x, (20, 4), jnp.float64)
    damping = 0.1
    rhs = jax.tree.map(jnp.ones_like, params)

    @jax.jit
    def solve_and_dense(params):
        operator = xj.ggn_operator(mlp, params, inputs, damping=damping)
        result = xj.cg(operator, rhs, rtol=1e-12, max_steps=200)
        # Independent dense G = Σᵢ Jᵢᵀ Hᵢ Jᵢ / N from explicit Jacobians.
        flat, unravel = ravel_pytree(params)
        jacobian = jax.jacobian(lambda f: mlp(unravel(f), inputs))(flat)
        hessians = xj.softmax_cross_entropy_hessian(mlp(params, inputs))
        dense = jnp.einsum("nkp,nkl,nlq->pq", jacobian, hessians, jacobian) / inputs.shape[0]
        return result, dense

    result, dense = solve_and_dense(params)
    flat, _ = ravel_pytree(params)
    expected = jnp.linalg.solve(dense + damping * jnp.eye(flat.size), ravel_pytree(rhs)[0])
    assert int(result.status) == CGStatus.CONVERGED
    np.testing.assert_allclose(ravel_pytree(result.solution)[0], expected, rtol=1e-8)


def test_jit_vmap_and_traced_limits_do_not_recompile():
    matrix = jnp.asarray(spd_matrix(6, 30.0, seed=9))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(rhs, max_steps, rtol):
        return xj.cg(lambda v: matrix @ v, rhs, max_steps=max_steps, rtol=rtol)

    for steps in (1, 2, 4):
        result = solve(jnp.ones(6), steps, 1e-12)
        assert int(result.num_steps) == steps
    batched = jax.vmap(lambda b: xj.cg(lambda v: matrix @ v, b, rtol=1e-12))(jnp.eye(6))
    np.testing.assert_allclose(batched.solution, jnp.linalg.inv(matrix), rtol=1e-8, atol=1e-10)
    assert batched.status.shape == (6,)


@pytest.mark.parametrize(
    ("condition", "dtype", "rtol", "expected"),
    [
        (1e6, np.float64, 1e-10, CGStatus.CONVERGED),
        (1e10, np.float64, 1e-10, CGStatus.MAX_STEPS),
        (1e3, np.float32, 1e-9, CGStatus.MAX_STEPS),
    ],
)
def test_converged_holds_for_the_true_residual(condition, dtype, rtol, expected):
    # The recurrence's residual drifts from b − A x: cg said CONVERGED with residual_norm
    # 5.9e-11 where ‖b − A x‖ was 1.6e-5 (condition 1e10), and 1e-9 against 1e-4 in float32.
    matrix = spd_matrix(30, condition, seed=0, dtype=dtype)
    rhs = np.random.default_rng(1).normal(size=30).astype(dtype)
    target = rtol * np.linalg.norm(rhs.astype(np.float64))
    steps = 1000 if dtype == np.float64 else 500
    result = xj.cg(lambda v: jnp.asarray(matrix) @ v, jnp.asarray(rhs), rtol=rtol, max_steps=steps)
    assert int(result.status) == expected
    true = np.linalg.norm(rhs - matrix.astype(np.float64) @ np.asarray(result.solution, np.float64))
    if expected == CGStatus.CONVERGED:
        assert true <= 2 * target
    # Trusting the recurrence (the solvers' inner solves) stops early and says CONVERGED.
    trusted = xj.cg(
        lambda v: jnp.asarray(matrix) @ v,
        jnp.asarray(rhs),
        rtol=rtol,
        max_steps=steps,
        verify=False,
    )
    assert int(trusted.status) == CGStatus.CONVERGED


def test_eager_calls_compile_once():
    # Eagerly, the while loop traced and compiled its body at every call (0.4-0.5 s each for a
    # small network's Gauss-Newton operator). Same operator, or a new pytree operator of the
    # same structure: no new compilation.
    matrix = jnp.asarray(spd_matrix(6, 30.0, seed=9))

    def operator(v):
        return matrix @ v

    rhs_list = [jnp.ones(6), jnp.arange(6.0), jnp.ones(6)]
    scaled = [Partial(_matvec, matrix * s) for s in (1.0, 2.0, 3.0)]
    # A plain function is compiled from its second call on (a new lambda per call is not kept).
    for _ in range(2):
        xj.cg(operator, rhs_list[0], rtol=1e-10)
    before = len(_compiles)
    results = [xj.cg(operator, rhs, rtol=1e-10) for rhs in rhs_list[1:]]
    assert len(_compiles) == before
    trust = [xj.steihaug_cg(op, rhs_list[0], radius=1e3, rtol=1e-10) for op in scaled]
    assert len(_compiles) - before == 1  # the Partials share one program
    for rhs, result in zip(rhs_list[1:], results, strict=True):
        np.testing.assert_allclose(result.solution, np.linalg.solve(matrix, rhs), rtol=1e-8)
    for s, result in zip((1.0, 2.0, 3.0), trust, strict=True):
        np.testing.assert_allclose(
            result.solution, np.linalg.solve(s * matrix, np.ones(6)), rtol=1e-8
        )


def _matvec(matrix, v):
    return matrix @ v


_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: _compiles.append(event) if "backend_compile" in event else None
)


def test_per_entry_tolerances_stop_cg_once_every_entry_is_within_its_own():
    matrix = spd_matrix(30, 100.0, seed=4)
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix, seed=2)
    # Entries of different scales: a loose tolerance on "w", a tight one on "b".
    entry_tol = {"w": jnp.full((2, 3), 1e-2), "b": jnp.full(24, 1e-8)}
    result = xj.cg(operator, rhs, rtol=0.0, entry_tol=entry_tol, max_steps=200)
    exact = xj.cg(operator, rhs, rtol=1e-14, max_steps=200)
    assert int(result.status) == CGStatus.CONVERGED
    residual = rhs_flat - jnp.asarray(matrix) @ ravel_pytree(result.solution)[0]
    residual = unravel(residual)
    # The true residual meets each entry's tolerance (to the rounding of the recurrence) ...
    assert float(jnp.max(jnp.abs(residual["w"]))) <= 1.01e-2
    assert float(jnp.max(jnp.abs(residual["b"]))) <= 1e-8 * 1.01 + 1e-12
    # ... and CG stopped as soon as the recurrence's did, before the 2-norm target.
    assert bool(jnp.all(jnp.abs(result.residual["w"]) <= 1e-2))
    assert bool(jnp.all(jnp.abs(result.residual["b"]) <= 1e-8))
    assert int(result.num_steps) < int(exact.num_steps)
    # A tolerance met by every entry but one keeps CG running.
    tight = {"w": jnp.full((2, 3), 1e-2).at[0, 0].set(1e-13), "b": jnp.full(24, 1e-8)}
    later = xj.cg(operator, rhs, rtol=0.0, entry_tol=tight, max_steps=200)
    assert int(later.num_steps) > int(result.num_steps)
    with pytest.raises(ValueError, match="entry_tol"):
        xj.cg(operator, rhs, entry_tol={"w": -jnp.ones((2, 3)), "b": jnp.ones(24)})
    # Steihaug-CG stops by the same rule; inside a large region it is the same iteration as
    # CG's unverified one (verification may take further steps once the recurrence stops).
    inside = xj.steihaug_cg(operator, rhs, 1e6, rtol=0.0, entry_tol=entry_tol, max_steps=200)
    plain = xj.cg(operator, rhs, rtol=0.0, entry_tol=entry_tol, max_steps=200, verify=False)
    assert int(inside.status) == CGStatus.CONVERGED
    assert int(inside.num_steps) == int(plain.num_steps)
    np.testing.assert_allclose(
        ravel_pytree(inside.solution)[0], ravel_pytree(plain.solution)[0], rtol=1e-12
    )
    with pytest.raises(ValueError, match="entry_tol"):
        xj.steihaug_cg(operator, rhs, 1.0, entry_tol={"w": -jnp.ones((2, 3)), "b": jnp.ones(24)})


def test_bad_input_is_rejected_at_the_boundary():
    operator = lambda v: v  # noqa: E731
    with pytest.raises(TypeError, match="floating"):
        xj.cg(operator, jnp.arange(3))
    # Complex leaves solved, but reverse mode returned conjugated gradients.
    with pytest.raises(TypeError, match="real floating, got complex128"):
        xj.cg(operator, jnp.ones(2, jnp.complex128))
    # An operator or preconditioner that widens rhs's dtype failed inside the loop ("carry
    # input and carry output must have equal types"); a narrower one is promoted.
    matrix = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="the operator returned float64 for a float32 leaf"):
        xj.cg(lambda v: matrix @ v, jnp.ones(3, jnp.float32))
    with pytest.raises(ValueError, match="the preconditioner returned complex128"):
        xj.cg(lambda v: matrix @ v, jnp.ones(3), preconditioner=lambda v: v + 0j)
    narrow = xj.cg(lambda v: matrix.astype(jnp.float32) @ v.astype(jnp.float32), jnp.ones(3))
    np.testing.assert_allclose(narrow.solution, [1.0, 0.5, 1 / 3], rtol=1e-6)
    for max_steps in (-1, np.inf, np.nan, 2.5):  # inf and NaN failed converting to int
        with pytest.raises(ValueError, match=r"max_steps must be an integer in \[0, 2\*\*31 - 1\]"):
            xj.cg(operator, jnp.ones(3), max_steps=max_steps)
    with pytest.raises(ValueError, match="rtol"):
        xj.cg(operator, jnp.ones(3), rtol=-1.0)
    # Shapes, which failed deep inside the loop.
    with pytest.raises(ValueError, match=r"rtol must be a scalar, got shape \(2,\)"):
        xj.cg(operator, jnp.ones(3), rtol=jnp.full(2, 1e-5))
    with pytest.raises(ValueError, match=r"atol must be a scalar"):
        xj.cg(operator, jnp.ones(3), atol=np.zeros(3))
    with pytest.raises(ValueError, match="entry_tol must broadcast against rhs"):
        xj.cg(operator, jnp.ones(3), entry_tol=jnp.ones(4))
    with pytest.raises(ValueError, match="entry_tol must broadcast against rhs"):
        xj.cg(operator, {"a": jnp.ones(3)}, entry_tol={"b": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"radius must be a scalar"):
        xj.steihaug_cg(operator, jnp.ones(3), radius=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="x0"):
        xj.cg(operator, {"a": jnp.ones(3)}, x0=jnp.ones(3))
    with pytest.raises(ValueError, match="radius"):
        xj.steihaug_cg(operator, jnp.ones(3), radius=0.0)
    # Traced, a radius that is not positive is reported: -1 acted as 1, NaN as no region.
    traced = jax.jit(lambda radius: xj.steihaug_cg(operator, jnp.ones(3), radius))
    for radius in (-1.0, 0.0, np.nan):
        result = traced(radius)
        assert int(result.status) == CGStatus.INVALID_RADIUS
        assert int(result.num_steps) == 0
        assert not np.any(np.asarray(result.solution))
    assert int(traced(np.inf).status) == CGStatus.CONVERGED
    # An exact solve is CONVERGED whatever the (traced, unchecked) tolerance: with a NaN one the
    # zero residual's direction was 0, and pᵀAp = 0 ended it as NEGATIVE_CURVATURE.
    exact = jax.jit(lambda rtol: xj.cg(lambda v: 2.0 * v, jnp.ones(3), rtol=rtol))(np.nan)
    assert int(exact.status) == CGStatus.CONVERGED and int(exact.num_steps) == 1
    np.testing.assert_array_equal(exact.solution, 0.5)


class CGVariantsTest(chex.TestCase):
    """The same solves with and without `jax.jit` (chex variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_pytree_solve_matches_dense_solve(self):
        matrix = jnp.array([[5.0, 1.0, 0.5], [1.0, 4.0, 1.0], [0.5, 1.0, 3.0]])
        rhs = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}

        def operator(v):
            out = matrix @ jnp.concatenate([v["a"], v["b"]])
            return {"a": out[:2], "b": out[2:]}

        solve = self.variant(lambda b: xj.cg(operator, b, rtol=1e-12))
        result = solve(rhs)
        exact = jnp.linalg.solve(matrix, jnp.concatenate([rhs["a"], rhs["b"]]))
        got = jnp.concatenate([result.solution["a"], result.solution["b"]])
        np.testing.assert_allclose(got, exact, rtol=1e-10)
        assert int(result.status) == xj.CGStatus.CONVERGED

    @chex.variants(with_jit=True, without_jit=True)
    def test_steihaug_stops_on_the_boundary(self):
        matrix = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
        solve = self.variant(lambda b: xj.steihaug_cg(lambda v: matrix @ v, b, 0.1, rtol=1e-12))
        result = solve(jnp.ones(3))
        np.testing.assert_allclose(jnp.linalg.norm(result.solution), 0.1, rtol=1e-10)
        assert int(result.status) == xj.CGStatus.BOUNDARY


def test_derivatives_of_the_solution_are_those_of_the_exact_solve():
    # ẋ = A⁻¹(ḃ − Ȧx), by one more solve; reverse mode went through the while loop and failed.
    rng = np.random.default_rng(7)
    M = rng.normal(size=(6, 6))
    A, b, B = M @ M.T + np.eye(6), rng.normal(size=6), rng.normal(size=(3, 6))

    def through_cg(A, b):
        return jnp.sum(jnp.sin(xj.cg(lambda v: A @ v, b, rtol=1e-13).solution))

    def exact(A, b):
        return jnp.sum(jnp.sin(jnp.linalg.solve(A, b)))

    for ours, reference in [
        (jax.grad(through_cg, (0, 1))(A, b), jax.grad(exact, (0, 1))(A, b)),
        (jax.jit(jax.grad(through_cg, (0, 1)))(A, b), jax.grad(exact, (0, 1))(A, b)),
        (jax.jacfwd(through_cg, 1)(A, b), jax.jacfwd(exact, 1)(A, b)),
        (jax.hessian(through_cg, 1)(A, b), jax.hessian(exact, 1)(A, b)),
        (
            jax.vmap(jax.grad(through_cg, 1), (None, 0))(A, B),
            jax.vmap(jax.grad(exact, 1), (None, 0))(A, B),
        ),
    ]:
        chex.assert_trees_all_close(ours, reference, rtol=1e-9, atol=1e-12)

    # A pytree operator (a Partial over A), and the outcome kept beside the derivatives.
    def pytree_cg(A, b):
        def matvec(A, v):
            x = A @ jnp.concatenate([v["a"], v["b"]])
            return {"a": x[:3], "b": x[3:]}

        result = xj.cg(Partial(matvec, A), {"a": b[:3], "b": b[3:]}, rtol=1e-13)
        assert result.status.dtype == jnp.int32
        return jnp.sum(jnp.sin(jnp.concatenate([result.solution["a"], result.solution["b"]])))

    chex.assert_trees_all_close(
        jax.grad(pytree_cg, (0, 1))(A, b), jax.grad(exact, (0, 1))(A, b), rtol=1e-9, atol=1e-12
    )
    status = jax.jit(lambda b: xj.cg(lambda v: A @ v, b, rtol=1e-13).status)(b)
    assert CGStatus(int(status)) == CGStatus.CONVERGED


def test_derivatives_do_not_reuse_the_options_of_the_first_solve():
    # x0, atol, entry_tol and max_steps belong to b's system: reused for ẋ's, an atol gave a zero
    # gradient and a warm start one 3.5e3 off, while the solve itself was exact.
    rng = np.random.default_rng(8)
    M = rng.normal(size=(6, 6))
    A = jnp.asarray(M @ M.T + 0.5 * np.eye(6))
    b, c = jnp.asarray(10 * rng.normal(size=6)), jnp.asarray(1e-3 * rng.normal(size=6))
    exact = jax.grad(lambda b: c @ jnp.linalg.solve(A, b))(b)
    start = jnp.linalg.solve(A, b) + 1e-6
    for options in (
        {"atol": 1e-2, "rtol": 0.0},
        {"entry_tol": 1e-3, "rtol": 0.0},
        {"x0": start, "max_steps": 2, "rtol": 1e-12},
    ):

        def through_cg(b, options=options):
            return c @ xj.cg(lambda v: A @ v, b, **options).solution

        gradient = jax.grad(through_cg)(b)
        np.testing.assert_allclose(gradient, exact, rtol=1e-8, err_msg=str(options.keys()))


def test_derivatives_take_the_step_limit_the_solve_needed():
    # At condition 1e6 CG loses orthogonality in float64 and needs ~8× as many steps as
    # unknowns; ẋ's solve, held to the default (the number of unknowns), left the gradient
    # 0.2 off while b's own solve, given max_steps, converged.
    rng = np.random.default_rng(0)
    size = 60
    Q, _ = np.linalg.qr(rng.normal(size=(size, size)))
    A = jnp.asarray(Q @ np.diag(np.logspace(0, 6, size)) @ Q.T)
    A = (A + A.T) / 2
    b = jnp.asarray(rng.normal(size=size))
    exact = jax.grad(lambda b: jnp.sum(jnp.linalg.solve(A, b) ** 2))(b)

    def through_cg(b, steps):
        result = xj.cg(lambda v: A @ v, b, rtol=1e-9, max_steps=steps)
        return jnp.sum(result.solution**2), result.num_steps

    (_, num_steps), gradient = jax.value_and_grad(through_cg, has_aux=True)(b, 20 * size)
    assert num_steps > size  # the premise: b's solve needed more than the default
    np.testing.assert_allclose(gradient, exact, rtol=1e-7)
    traced = jax.jit(jax.grad(lambda b, steps: through_cg(b, steps)[0]))(b, 20 * size)
    np.testing.assert_allclose(traced, exact, rtol=1e-7)


def test_derivatives_with_respect_to_part_of_a_pytree_system():
    # A leaf of b, or a block of A, that does not depend on the differentiated values made ẋ's
    # right-hand side partly constant, and reverse mode failed with a bare AssertionError
    # inside JAX's `custom_linear_solve`. Python-float leaves failed on `.astype`.
    rng = np.random.default_rng(3)
    M = rng.normal(size=(3, 3))
    base = jnp.asarray(M @ M.T + np.eye(3))
    fixed = jnp.asarray([[2.0, 0.5], [0.5, 1.0]])

    def blocks(scale):
        return jax.scipy.linalg.block_diag(scale * base, fixed)

    def through_cg(a, scale):
        def operator(v):
            return {"a": scale * (base @ v["a"]), "c": fixed @ v["c"]}

        rhs = {"a": a, "c": jnp.array([1.0, -2.0])}
        return jnp.sum(jnp.sin(xj.cg(operator, rhs, rtol=1e-13).solution["a"]))

    def exact(a, scale):
        return jnp.sum(jnp.sin(jnp.linalg.solve(blocks(scale), jnp.r_[a, 1.0, -2.0])[:3]))

    a, scale = jnp.asarray(rng.normal(size=3)), 1.5
    for argnums in (0, 1, (0, 1)):
        chex.assert_trees_all_close(
            jax.grad(through_cg, argnums)(a, scale),
            jax.grad(exact, argnums)(a, scale),
            rtol=1e-9,
        )
    chex.assert_trees_all_close(
        jax.hessian(through_cg)(a, scale), jax.hessian(exact)(a, scale), rtol=1e-8, atol=1e-12
    )
    chex.assert_trees_all_close(
        jax.jit(jax.vmap(jax.grad(through_cg), (0, None)))(jnp.stack([a, 2 * a]), scale),
        jax.vmap(jax.grad(exact), (0, None))(jnp.stack([a, 2 * a]), scale),
        rtol=1e-9,
    )
    mixed = xj.cg(lambda v: jax.tree.map(lambda t: 2 * t, v), {"a": 1.0, "b": jnp.ones(2)})
    assert float(mixed.solution["a"]) == 0.5
    np.testing.assert_allclose(mixed.solution["b"], 0.5)
    gradient = jax.grad(lambda t: xj.cg(lambda v: 4 * v, t).solution)(3.0)
    assert float(gradient) == 0.25
    assert float(xj.cg(lambda v: 2 * v, 1.0, x0=0.0).solution) == 0.5  # x0 checked as arrays


def test_derivatives_reach_matrices_held_by_objects_and_deep_closures():
    # A tracer in a bound method's object, or five closures deep, went unseen: the solve ran
    # its while loop under grad (an error) and was recorded in the program cache (a leak).
    rng = np.random.default_rng(9)
    M = rng.normal(size=(4, 4))
    A0, b = jnp.asarray(M @ M.T + 4 * np.eye(4)), jnp.asarray(rng.normal(size=4))
    exact = jax.grad(lambda A: jnp.sum(jnp.linalg.solve(A, b)))(A0)

    class Operator:
        def __init__(self, A):
            self.A = A

        def matvec(self, v):
            return self.A @ v

    def nested(A):
        def f1(v):
            return A @ v

        def f2(v):
            return f1(v)

        def f3(v):
            return f2(v)

        def f4(v):
            return f3(v)

        return lambda v: f4(v)

    with jax.checking_leaks():
        for make in (lambda A: Operator(A).matvec, nested):

            def through_cg(A, make=make):
                return jnp.sum(xj.cg(make(A), b, rtol=1e-12).solution)

            gradient = jax.grad(through_cg)(A0)
            np.testing.assert_allclose(gradient, exact, rtol=1e-9, atol=1e-14)
            jax.jit(lambda A, make=make: xj.cg(make(A), b).solution)(A0)


def test_derivatives_reach_a_matrix_behind_a_large_structure():
    # An object holding a list of 3,000 entries beside its matrix: the search for tracers gave
    # up after 2,000 objects and counted none, so the solve took the eager path, without its
    # derivative rule: reverse mode failed inside lax.while_loop, and forward mode returned
    # the derivative of CG's iterations (off-diagonal entries 3x off at rtol 1e-3).
    A0, b = jnp.array([[4.0, 1.0], [1.0, 3.0]]), jnp.array([1.0, 2.0])
    exact = jax.grad(lambda A: jnp.sum(jnp.linalg.solve(A, b)))(A0)

    class System:
        def __init__(self, history, A):
            self.history, self.params = history, {"A": A}

        def matvec(self, v):
            return self.params["A"] @ v

    def through_cg(A):
        return jnp.sum(xj.cg(System(list(range(3000)), A).matvec, b, rtol=1e-3).solution)

    for derivative in (jax.grad, jax.jacfwd):
        np.testing.assert_allclose(derivative(through_cg)(A0), exact, rtol=1e-12)
    system = System(list(range(3000)), A0)  # eager: solved, not compiled into a program
    np.testing.assert_allclose(xj.cg(system.matvec, b).solution, jnp.linalg.solve(A0, b))


def test_derivatives_with_options_that_depend_on_the_differentiated_values():
    # A Jacobi preconditioner read from A, a warm start and tolerances computed from b: they
    # leaked their tracers out of the custom derivative (UnexpectedTracerError), and forward
    # mode had worked before it. The exact solution does not depend on them.
    rng = np.random.default_rng(10)
    M = rng.normal(size=(6, 6))
    A0, b0 = jnp.asarray(M @ M.T + 6 * np.eye(6)), jnp.asarray(rng.normal(size=6))

    def loss(A, b, solve):
        return jnp.sum(solve(A, b) ** 2)

    def exact(A, b):
        return jnp.linalg.solve(A, b)

    def jacobi(A, b):
        return xj.cg(lambda v: A @ v, b, preconditioner=lambda r: r / jnp.diag(A), rtol=1e-13)

    def warm(A, b):
        start, tolerance = b / jnp.diag(A), 1e-14 * jnp.linalg.norm(b)
        return xj.cg(lambda v: A @ v, b, x0=start, atol=tolerance, rtol=1e-13)

    for solve in (jacobi, warm):
        for ours, reference in [
            (
                jax.grad(loss, (0, 1))(A0, b0, lambda A, b, solve=solve: solve(A, b).solution),
                jax.grad(loss, (0, 1))(A0, b0, exact),
            ),
            (
                jax.jacfwd(lambda A, solve=solve: solve(A, b0).solution)(A0),
                jax.jacfwd(lambda A: exact(A, b0))(A0),
            ),
        ]:
            chex.assert_trees_all_close(ours, reference, rtol=1e-8, atol=1e-13)


def test_maps_of_the_wrong_shape_are_named():
    # An operator or preconditioner returning another shape failed inside the loop with JAX's
    # "dot_general requires contracting dimensions to have the same shape".
    b = jnp.ones(5)
    bad = [
        ("operator", dict(operator=lambda v: v[:4])),
        ("preconditioner", dict(operator=lambda v: 2 * v, preconditioner=lambda r: r[:3])),
        ("operator", dict(operator=lambda v: {"a": v})),
    ]
    for name, maps in bad:
        with pytest.raises(ValueError, match=f"the {name} must map rhs"):
            xj.cg(rhs=b, **maps)
        with pytest.raises(ValueError, match=f"the {name} must map rhs"):
            jax.jit(lambda b, maps=maps: xj.cg(rhs=b, **maps).solution)(b)
    with pytest.raises(ValueError, match="the operator must map rhs"):
        xj.steihaug_cg(lambda v: v[:4], b, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_solve_does_not_depend_on_the_scale_of_the_rhs(dtype):
    # A float32 b of 1e-19 had ‖b‖² and ‖r‖² underflow to 0, taken as an exact zero residual:
    # CONVERGED after one step 28% off (at 1e-20 and below: at x = 0), and b of 1e19 ended
    # NON_FINITE at step 0; Steihaug's radius² underflowed already at 1e-15 (x = 0, BOUNDARY).
    # Solved as b·2⁻ᵉ, every scale gives the unit solve's answer, tolerances and radius scaled.
    matrix = spd_matrix(8, 50.0, 0, dtype)
    operator, rhs, rhs_flat, unravel = pytree_problem(matrix)
    exact = np.linalg.solve(matrix.astype(np.float64), np.asarray(rhs_flat, np.float64))
    radius = 0.5 * np.linalg.norm(exact)
    extreme = 150 if dtype == np.float64 else 30
    with jax.enable_x64(dtype == np.float64):
        for scale in (10.0**-extreme, 1e-19, 1e-15, 1.0, 1e15, 1e19, 10.0**extreme):
            factor = dtype(scale)
            scaled = jax.tree.map(functools.partial(jnp.multiply, factor), rhs)
            result = xj.cg(operator, scaled, rtol=1e-5, atol=1e-6 * scale, max_steps=40)
            solution = ravel_pytree(result.solution)[0] / dtype(scale)
            assert int(result.status) == CGStatus.CONVERGED, scale
            np.testing.assert_allclose(solution, exact, rtol=1e-3 if dtype == np.float32 else 1e-8)
            assert 0 < float(result.residual_norm) / scale <= 1e-5 * np.linalg.norm(rhs_flat) * 2
            region = xj.steihaug_cg(operator, scaled, radius * scale)
            step = ravel_pytree(region.solution)[0] / dtype(scale)
            assert int(region.status) == CGStatus.BOUNDARY, scale
            np.testing.assert_allclose(np.linalg.norm(step), radius, rtol=1e-5)


def test_scaling_keeps_narrow_leaves_and_warm_starts():
    # b is scaled only where its squared norm leaves the range: a float16 leaf beside a float32
    # one of 1e10 was scaled by 2^-34 to 0 (CONVERGED with its residual 1.0), and a scaled warm
    # start must come back exactly (2^e by `exp2` was 17 ulps off).
    def operator(v):
        return {"a": 2 * v["a"], "h": (4 * v["h"].astype(jnp.float32)).astype(jnp.float16)}

    rhs = {"a": jnp.array([1e10], jnp.float32), "h": jnp.array([1.0], jnp.float16)}
    result = xj.cg(operator, rhs, rtol=0.0, entry_tol={"a": 1e3, "h": 1e-3})
    assert int(result.status) == CGStatus.CONVERGED
    assert float(result.solution["h"][0]) == 0.25 and float(result.solution["a"][0]) == 5e9
    matrix = jnp.array([[4.0, 1.0], [1.0, 3.0]], jnp.float32)
    rhs = jnp.array([1.0, 2.0], jnp.float32) * 1e-30
    exact = jnp.array([1.0, 7.0], jnp.float32) / 11 * 1e-30
    start = xj.cg(lambda v: matrix @ v, rhs, x0=exact, rtol=1e-3)
    assert int(start.num_steps) == 0 and bool(jnp.all(start.solution == exact))
