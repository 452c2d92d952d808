"""The solver core: a user-defined objective, the preconditioners, line search and radius rule.

The objective here is Poisson regression with an L2 penalty, written in this file against the
`Objective` protocol: no solver code knows it exists. It is checked against scikit-learn's
`PoissonRegressor` and against the gradient of a naive formula.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import PoissonRegressor

import xentropy_jax as xj
from xentropy_jax._linear import evaluate, logistic_objective
from xentropy_jax.solvers import _preconditioners
from xentropy_jax.solvers._linesearch import backtracking
from xentropy_jax.solvers._trust_region import radius_update

PACKAGE = Path(xj.__file__).parent


class PoissonPoint(NamedTuple):
    loss: jax.Array
    grad: jax.Array
    rates: jax.Array  # exp(Xθ), what the curvature reuses


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Poisson:
    """f(θ) = mean(exp(xᵢθ) − yᵢ·xᵢθ) + (l2/2)·‖θ‖², the predictor η = Xθ."""

    features: jax.Array
    counts: jax.Array
    l2: jax.Array

    @property
    def num_params(self) -> int:
        return self.features.shape[1]

    @property
    def dtype(self):
        return self.features.dtype

    def predictor(self, theta):
        return self.features @ theta

    def evaluate(self, theta, predictor):
        rates = jnp.exp(predictor)
        n = self.features.shape[0]
        loss = jnp.mean(rates - self.counts * predictor) + 0.5 * self.l2 * theta @ theta
        grad = self.features.T @ (rates - self.counts) / n + self.l2 * theta
        return PoissonPoint(loss, grad, rates)

    def hessian_product(self, evaluation, tangent):
        n = self.features.shape[0]
        return self.features.T @ (evaluation.rates * (self.features @ tangent)) / n + (
            self.l2 * tangent
        )

    def hessian(self, evaluation):
        n = self.features.shape[0]
        weighted = evaluation.rates[:, None] * self.features
        return self.features.T @ weighted / n + self.l2 * jnp.eye(self.num_params)

    def hessian_diagonal(self, evaluation):
        n = self.features.shape[0]
        return jnp.square(self.features).T @ evaluation.rates / n + self.l2

    def loss_change(self, theta, evaluation, direction, direction_predictor, scale):
        moved = scale * direction_predictor
        data = jnp.mean(evaluation.rates * jnp.expm1(moved) - self.counts * moved)
        penalty = self.l2 * (scale * theta @ direction + 0.5 * scale**2 * direction @ direction)
        return data + penalty

    def diverged(self, evaluation, predictor):
        return jnp.zeros((), bool)


def naive_loss(theta, features, counts, l2):
    eta = features @ theta
    return jnp.mean(jnp.exp(eta) - counts * eta) + 0.5 * l2 * jnp.sum(theta**2)


@pytest.fixture(scope="module")
def poisson():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 6)) / 2
    truth = rng.normal(size=6) / 2
    counts = rng.poisson(np.exp(features @ truth)).astype(float)
    return jnp.asarray(features), jnp.asarray(counts)


SOLVERS = [
    xj.Newton(),
    xj.NewtonCG(),
    xj.NewtonCG(preconditioner="none"),
    xj.TrustRegion(),
    xj.TrustRegion(preconditioner="none"),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"{type(s).__name__}")
def test_user_defined_objective_is_fitted_by_every_solver(poisson, solver):
    features, counts = poisson
    l2 = 0.05
    objective = Poisson(features, counts, jnp.asarray(l2))
    assert isinstance(objective, xj.Objective)
    output = solver.minimize(objective, jnp.zeros(6), tol=1e-10, max_iter=50)
    assert xj.Status(int(output.status)) == xj.Status.CONVERGED
    # An independent reference: scikit-learn minimises mean deviance / 2 + alpha/2·‖θ‖², the
    # same objective up to a constant in θ.
    reference = PoissonRegressor(alpha=l2, fit_intercept=False, tol=1e-12, max_iter=1000)
    reference.fit(np.asarray(features), np.asarray(counts))
    np.testing.assert_allclose(output.theta, reference.coef_, rtol=1e-6, atol=1e-8)
    naive_grad = jax.grad(naive_loss)(output.theta, features, counts, l2)
    assert float(jnp.max(jnp.abs(naive_grad))) <= 1e-10
    np.testing.assert_allclose(output.evaluation.loss, naive_loss(output.theta, *poisson, l2))


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"{type(s).__name__}")
def test_an_objective_with_no_parameters_converges_at_once(solver):
    # Newton's pseudo-inverse step took the largest of no eigenvalues: NumPy's "zero-size array
    # to reduction operation max" where the CG solvers returned CONVERGED.
    rng = np.random.default_rng(0)
    objective = Poisson(jnp.zeros((5, 0)), jnp.asarray(rng.poisson(1.0, 5), float), 0.1)
    output = solver.minimize(objective, jnp.zeros(0), tol=1e-8, max_iter=10)
    assert xj.Status(int(output.status)) == xj.Status.CONVERGED
    assert output.theta.shape == (0,)


def test_user_defined_objective_under_jit_and_vmap_compiles_once(poisson):
    features, counts = poisson
    solver = xj.NewtonCG()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fit(l2):
        objective = Poisson(features, counts, l2)
        return solver.minimize(objective, jnp.zeros(6), tol=1e-10, max_iter=50).theta

    grid = jnp.array([0.01, 0.1, 1.0])
    batched = jax.vmap(fit)(grid)
    for l2, theta in zip(grid, batched, strict=True):
        one = xj.Newton().minimize(
            Poisson(features, counts, l2), jnp.zeros(6), tol=1e-10, max_iter=50
        )
        np.testing.assert_allclose(theta, one.theta, rtol=1e-7, atol=1e-10)
    # A second call with the same shapes reuses the program (assert_max_traces would raise).
    jax.vmap(fit)(grid * 2)


def test_preconditioner_auto_and_missing_capabilities(poisson):
    features, counts = poisson
    objective = Poisson(features, counts, jnp.asarray(0.1))
    assert _preconditioners.resolve("auto", objective) == "diagonal"
    with pytest.raises(ValueError, match="feature_gram"):
        xj.NewtonCG(preconditioner="kronecker").minimize(
            objective, jnp.zeros(6), tol=1e-8, max_iter=5
        )

    class Bare(NamedTuple):  # no hessian_diagonal: "auto" falls back to plain CG
        pass

    assert _preconditioners.resolve("auto", Bare()) == "none"
    # A solver called directly checks its tolerance and iteration limit (they ran: MAX_ITER).
    for options in (dict(tol=-1.0, max_iter=5), dict(tol=np.nan, max_iter=5)):
        with pytest.raises(ValueError, match="tol must be >= 0"):
            xj.NewtonCG().minimize(objective, jnp.zeros(6), **options)
    for max_iter in (-1, 2.5, np.inf):
        with pytest.raises(ValueError, match="max_iter must be an integer >= 0"):
            xj.TrustRegion().minimize(objective, jnp.zeros(6), tol=1e-8, max_iter=max_iter)
    # Newton needs the explicit Hessian: named, not an AttributeError from inside the loop.
    with pytest.raises(ValueError, match=r"Newton needs the objective's explicit Hessian"):
        xj.Newton().minimize(Bare(), jnp.zeros(6), tol=1e-8, max_iter=5)


@pytest.mark.parametrize("solver", SOLVERS[:2] + SOLVERS[3:4], ids=lambda s: type(s).__name__)
def test_minimize_names_a_bad_argument(poisson, solver):
    # These failed inside NumPy ufuncs, a broadcast, dot_general or while_loop's carry check,
    # naming no argument: max_iter=True ran as one iteration.
    features, counts = poisson
    objective = Poisson(features, counts, jnp.asarray(0.1))
    good = dict(theta=jnp.zeros(6), tol=1e-8, max_iter=5)
    for error, message, bad in (
        (TypeError, "tol must be a real number, got None", dict(tol=None)),
        (TypeError, "tol must be a real number or array, got the string", dict(tol="1e-8")),
        (ValueError, r"tol must be a scalar or have shape \[P\] = \(6,\)", dict(tol=np.ones(5))),
        (ValueError, r"theta must have shape \[P\] = \(6,\), got \(5,\)", dict(theta=np.ones(5))),
        *[
            (ValueError, "max_iter must be an integer >= 0", dict(max_iter=value))
            for value in (None, "5", True, 5 + 0j)
        ],
    ):
        arguments = {**good, **bad}
        with pytest.raises(error, match=message):
            solver.minimize(objective, arguments.pop("theta"), **arguments)
    # An objective that answers wider than its dtype failed in while_loop's carry check; one
    # that answers narrower (float32 arrays in a float64 objective) is promoted and runs.
    wider = Poisson(features.astype(jnp.float32), counts, jnp.asarray(0.1))
    with pytest.raises(TypeError, match="evaluate gives a float64 grad where its dtype is float32"):
        solver.minimize(wider, **good)

    # A loss or gradient of another shape failed in the loop with JAX's own messages.
    for loss_shape in ((), (6,)):

        class Shaped(Poisson):
            def evaluate(self, theta, predictor, loss_shape=loss_shape):
                point = super().evaluate(theta, predictor)
                grad = point.grad if loss_shape else point.grad[:5]  # one wrong shape each
                return point._replace(loss=point.loss * jnp.ones(loss_shape), grad=grad)

        shaped = Shaped(features, counts, jnp.asarray(0.1))
        with pytest.raises(ValueError, match=r"a scalar loss and a grad of shape \[P\] = \(6,\)"):
            solver.minimize(shaped, **good)
    if not isinstance(solver, xj.Newton):  # a Hessian the CG solvers never call stays uncalled

        class Stub(Poisson):
            def hessian(self, evaluation):
                raise NotImplementedError

        stub = Stub(features, counts, jnp.asarray(0.1))
        assert xj.Status(int(solver.minimize(stub, **good).status)) == xj.Status.MAX_ITER
    for tol, max_iter in ((np.full(6, 1e-8), np.int64(50)), (np.array([1e-8]), np.array(50))):
        output = solver.minimize(objective, jnp.zeros(6), tol=tol, max_iter=max_iter)
        assert xj.Status(int(output.status)) == xj.Status.CONVERGED


@pytest.fixture(scope="module")
def logistic_point():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 4)) * np.array([1.0, 3.0, 0.1, 1.0])
    X[:, 3] += 0.8 * X[:, 0]  # correlated columns
    y = rng.integers(0, 3, 120)
    cases = {}
    for reference in (False, True):
        objective = logistic_objective(
            X, y, 3, l2=0.05, fit_intercept=True, reference_class=reference
        )
        theta = jnp.asarray(rng.normal(size=objective.num_params) / 3)
        cases[reference] = (objective, evaluate(objective, theta, objective.free_logits(theta)))
    return cases


@pytest.mark.parametrize("kind", ["kronecker", "ekfac", "diagonal", "none"])
@pytest.mark.parametrize("reference", [False, True])
def test_preconditioners_are_spd_and_inverse_of_each_other(logistic_point, kind, reference):
    # On the subspace where the gradient and H·v live: all of θ with a reference class, the
    # rows of [W; b] centred over the classes without one (Π the orthogonal projection on it,
    # built here from its definition). There `solve` and `apply` are symmetric positive
    # definite and inverse to each other, and `solve` leaves the subspace for nothing.
    objective, evaluation = logistic_point[reference]
    basis = _preconditioners.setup_basis(kind, objective)
    metric = _preconditioners.build(kind, objective, evaluation, basis)
    size, classes = objective.num_params, objective.num_free_classes
    eye = np.eye(size)
    centring = np.eye(classes) - (0.0 if reference else 1.0 / classes)
    projection = np.kron(np.eye(size // classes), centring)
    apply = np.asarray(jax.vmap(metric.apply)(jnp.asarray(eye)).T)
    solve = np.asarray(jax.vmap(metric.solve)(jnp.asarray(eye)).T)
    np.testing.assert_allclose(apply @ solve, projection, atol=1e-9)
    np.testing.assert_allclose(solve @ apply @ projection, projection, atol=1e-9)
    np.testing.assert_allclose(solve, projection @ solve @ projection, atol=1e-12)
    np.testing.assert_allclose(apply, apply.T, atol=1e-10 * np.max(np.abs(apply)))
    np.testing.assert_allclose(solve, solve.T, atol=1e-10 * np.max(np.abs(solve)))
    # Positive definite on the subspace: add the identity on its complement.
    complement = eye - projection
    assert np.min(np.linalg.eigvalsh(projection @ apply @ projection + complement)) > 0
    assert np.min(np.linalg.eigvalsh(solve + complement)) > 0


def test_diagonal_preconditioner_keeps_the_class_shift_out():
    # Jacobi scales the classes of a row differently: without projecting its output onto the
    # centred rows, CG moved θ along the class shift, which only l2 pulls back. Here (unequal
    # column scales, 5 classes) Newton-CG and the trust region then took 26 iterations and
    # 1,343 products and left the rows off-centre by 8e-8; with the projection 9 and 178.
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=600, n_features=12, n_informative=8, n_classes=5, random_state=1
    )
    X = X * np.logspace(-1, 1, X.shape[1])
    kronecker = xj.fit_logistic_regression(X, y, 5, l2=1e-3, tol=1e-10)
    for solver in (xj.NewtonCG(preconditioner="diagonal"), xj.TrustRegion("diagonal")):
        fit = xj.fit_logistic_regression(X, y, 5, l2=1e-3, tol=1e-10, solver=solver)
        weights = np.asarray(fit.params[0])
        assert bool(fit.converged) and int(fit.n_hessian_products) <= 300
        assert np.max(np.abs(weights.sum(axis=1))) <= 1e-12
        np.testing.assert_allclose(weights, kronecker.params[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("penalised", [False, True])
def test_kronecker_penalty_is_exact_when_positive(penalised):
    # l2 > 0 (float64), known statically or only at run time (a traced l2 may be 0): the basis
    # is A's own eigenbasis and M = A ⊗ B + l2·I exactly. The Jacobi-scaled basis, kept for
    # l2 = 0, would approximate l2·I, badly for these unequal columns.
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 4)) * np.array([1.0, 30.0, 0.01, 1.0])
    y = rng.integers(0, 3, 150)
    objective = logistic_objective(X, y, 3, l2=0.05, fit_intercept=False, penalised=penalised)
    theta = jnp.asarray(rng.normal(size=objective.num_params) / 3)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    basis = _preconditioners.setup_basis("kronecker", objective)
    metric = _preconditioners.build("kronecker", objective, evaluation, basis)
    apply = np.asarray(jax.vmap(metric.apply)(jnp.eye(objective.num_params)).T)
    # B with its eigenvalues floored as documented (B·1 = 0 without a reference class).
    values, vectors = np.linalg.eigh(np.asarray(objective.class_curvature(evaluation)))
    values = np.maximum(values, _preconditioners._EIGENVALUE_FLOOR * values.max())
    curvature = (vectors * values) @ vectors.T
    expected = np.kron(X.T @ X / len(y), curvature) + 0.05 * np.eye(objective.num_params)
    error = np.max(np.abs(apply - expected)) / np.max(np.abs(expected))
    assert error <= 1e-12
    scaled = _preconditioners.feature_basis(objective.feature_gram(), scaled=True)
    approximate = np.asarray(
        jax.vmap(_preconditioners.kronecker(objective, evaluation, scaled).apply)(
            jnp.eye(objective.num_params)
        ).T
    )
    assert np.max(np.abs(approximate - expected)) / np.max(np.abs(expected)) > 1e-6


@pytest.mark.parametrize("reference_class", [False, True])
def test_unpenalised_kronecker_in_centred_variables_is_a_kron_b(reference_class):
    # l2 = 0 with an intercept: in the centred Gram's basis (X − 1·μᵀ, then the maps C and
    # C⁻¹ between the variables) M is still A ⊗ B with A = X̃ᵀŴX̃ of the raw columns,
    # M⁻¹ its inverse (on the class-centred subspace without a reference class).
    rng = np.random.default_rng(5)
    n, d = 200, 3
    X = rng.normal(size=(n, d)) * np.array([1.0, 0.1, 2.0]) + np.array([4.0, -20.0, 0.5])
    y = rng.integers(0, 3, n)
    w = rng.uniform(0.5, 2.0, n)
    objective = logistic_objective(
        X, y, 3, sample_weight=w, l2=0.0, reference_class=reference_class
    )
    theta = jnp.asarray(rng.normal(size=objective.num_params) / 3)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    # (The fits build this basis below float64 only; the algebra is checked in float64.)
    centred, shift = objective.centred_feature_gram()
    np.testing.assert_allclose(shift, (w / w.sum()) @ X, rtol=1e-12)
    basis = _preconditioners.feature_basis(centred, scaled=True, shift=shift)
    metric = _preconditioners.build("kronecker", objective, evaluation, basis)
    eye = jnp.eye(objective.num_params)
    apply = np.asarray(jax.vmap(metric.apply)(eye).T)
    solve = np.asarray(jax.vmap(metric.solve)(eye).T)
    values, vectors = np.linalg.eigh(np.asarray(objective.class_curvature(evaluation)))
    values = np.maximum(values, _preconditioners._EIGENVALUE_FLOOR * values.max())
    design = np.c_[X, np.ones(n)]
    gram = design.T @ ((w / w.sum())[:, None] * design)
    expected = np.kron(gram, (vectors * values) @ vectors.T)
    np.testing.assert_allclose(apply, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    classes = objective.num_free_classes
    center = np.kron(np.eye(d + 1), np.eye(classes) - (0.0 if reference_class else 1 / classes))
    inverse = center @ np.linalg.pinv(expected) @ center
    np.testing.assert_allclose(solve, inverse, rtol=0, atol=1e-9 * np.abs(inverse).max())


@pytest.mark.parametrize("reference_class", [False, True])
def test_many_classes_take_the_diagonal_class_curvature(reference_class):
    # From 100 classes on, without a reference class, B is its diagonal b = Σ ŵ s ⊙ (1 − s)
    # (against B from explicit per-row matrices), and M = A ⊗ diag(b) + l2·I exactly; with a
    # reference class the full B is kept.
    rng = np.random.default_rng(7)
    n, k = 300, 120
    X = rng.normal(size=(n, 3))
    y = rng.integers(0, k, n)
    w = rng.uniform(0.5, 2.0, n)
    objective = logistic_objective(
        X,
        y,
        k,
        sample_weight=w,
        l2=0.05,
        fit_intercept=False,
        penalised=True,
        reference_class=reference_class,
    )
    theta = jnp.asarray(rng.normal(size=objective.num_params) / 3)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    probs = np.asarray(evaluation.probs)
    scaled = w / w.sum()
    full = sum(scaled[i] * (np.diag(probs[i]) - np.outer(probs[i], probs[i])) for i in range(n))
    curvature = np.asarray(objective.class_curvature(evaluation))
    if reference_class:
        np.testing.assert_allclose(curvature, full, rtol=1e-10, atol=1e-14)
        return
    np.testing.assert_allclose(curvature, np.diag(full), rtol=1e-12)
    basis = _preconditioners.setup_basis("kronecker", objective)
    metric = _preconditioners.build("kronecker", objective, evaluation, basis)
    apply = np.asarray(jax.vmap(metric.apply)(jnp.eye(objective.num_params)).T)
    values = np.maximum(curvature, _preconditioners._EIGENVALUE_FLOOR * curvature.max())
    gram = X.T @ (scaled[:, None] * X)
    expected = np.kron(gram, np.diag(values)) + 0.05 * np.eye(objective.num_params)
    np.testing.assert_allclose(apply, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("kind", ["kronecker", "ekfac"])
def test_many_class_fits_reach_the_optimum_of_an_unpreconditioned_fit(kind):
    # 120 classes: the Kronecker forms with the diagonal class curvature (and the Kronecker
    # form of the streamed fit) reach the optimum that CG without a preconditioner reaches.
    rng = np.random.default_rng(8)
    means = rng.normal(size=(120, 6))
    y = rng.integers(0, 120, 1200)
    X = means[y] + rng.normal(size=(1200, 6))
    solver = xj.NewtonCG(preconditioner=kind)
    fit = functools.partial(xj.fit_logistic_regression, X, y, 120, l2=1e-3, tol=1e-9)
    reference = fit(solver=xj.NewtonCG(preconditioner="none"))
    results = [fit(solver=solver)]
    if kind == "kronecker":  # the streamed objective has no design matrix for "ekfac"
        results.append(
            xj.fit_logistic_regression_streamed(
                X, y, 120, l2=1e-3, tol=1e-9, chunk_rows=500, solver=solver
            )
        )
    for result in results:
        assert result.converged
        for ours, expected in zip(result.params, reference.params, strict=True):
            np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    assert results[0].n_hessian_products <= reference.n_hessian_products


@pytest.mark.parametrize("spread, l2, exact", [(1.0, 1e-3, True), (1e4, 1e-3, False)])
def test_float32_takes_the_exact_penalty_basis_when_l2_covers_its_rounding(spread, l2, exact):
    # float32: A's own basis only when l2 >= eps·trace(A)/2; columns spread over 10^±4 make
    # trace(A) ~ 1e8 and keep the Jacobi-scaled basis. Decided at run time (l2 may be traced).
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 5)) * spread ** np.linspace(-1, 1, 5)
    y = rng.integers(0, 3, 200)
    single = logistic_objective(jnp.asarray(X, jnp.float32), y, 3, l2=l2, penalised=True)
    assert single.dtype == jnp.float32

    def unit_scales(objective):
        basis = _preconditioners.setup_basis("kronecker", objective)
        return jnp.all(basis.scale == 1) & jnp.all(basis.penalty == 1)

    assert bool(unit_scales(single)) == exact
    assert bool(jax.jit(unit_scales)(single)) == exact
    # The same when l2 > 0 is only known at run time (penalised=False: l2 may be 0).
    traced = logistic_objective(jnp.asarray(X, jnp.float32), y, 3, l2=l2, penalised=False)
    assert bool(jax.jit(unit_scales)(traced)) == exact
    # float64 with l2 > 0: always A's own basis; with l2 = 0, never.
    for penalised in (True, False):
        assert bool(unit_scales(logistic_objective(X, y, 3, l2=l2, penalised=penalised)))
    for dtype in (jnp.float32, jnp.float64):
        unpenalised = logistic_objective(jnp.asarray(X, dtype), y, 3, l2=0.0)
        assert not bool(unit_scales(unpenalised))


@pytest.mark.parametrize("classes, intercept", [(3, False), (120, False), (3, True)])
def test_float32_kronecker_factorises_class_blocks_for_spread_columns(classes, intercept):
    # float32, columns spread over 10^±4, l2 > 0 below eps·trace(A)/2: the basis is the scaled
    # one, whose diagonal stand-in for l2·D² is far from M; the factorised class blocks give
    # M = A ⊗ B + l2·I and its inverse to float32 accuracy (against float64 matrices). From
    # 100 classes on, B is its diagonal (Q = I). With an intercept (columns off-centre) the
    # basis is the centred Gram's, and the blocks those of the centred variables.
    rng = np.random.default_rng(4)
    n, d, l2 = 400, 6, 1e-3
    X = (rng.normal(size=(n, d)) + 3.0 * intercept) * 10.0 ** np.linspace(-4, 4, d)
    X[:, 1] += 1e-4 * X[:, 0]  # correlated columns of different scales
    y = rng.integers(0, classes, n)
    objective = logistic_objective(
        jnp.asarray(X, jnp.float32), y, classes, l2=l2, fit_intercept=intercept
    )
    theta = jnp.asarray(rng.normal(size=objective.num_params) * 1e-3, jnp.float32)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    basis = _preconditioners.setup_basis("kronecker", objective)
    assert bool(jnp.any(basis.scale != 1))  # l2 does not cover A's rounding: scaled basis
    assert (basis.shift is not None) == intercept
    penalty = np.ones(d)
    if intercept:  # centred variables: the penalty's own l2·P, the intercept unpenalised
        X, d, penalty = np.c_[X, np.ones(n)], d + 1, np.r_[penalty, 0.0]
    metric = _preconditioners.build("kronecker", objective, evaluation, basis)
    identity = jnp.eye(objective.num_params, dtype=jnp.float32)
    apply = np.asarray(jax.vmap(metric.apply)(identity).T, np.float64)
    solve = np.asarray(jax.vmap(metric.solve)(identity).T, np.float64)
    # B from the objective, its eigenvalues floored as documented, then M in float64.
    curvature = np.asarray(objective.class_curvature(evaluation), np.float64)
    if curvature.ndim == 1:
        values, vectors = curvature, np.eye(curvature.size)
    else:
        values, vectors = np.linalg.eigh(curvature)
    values = np.maximum(values, _preconditioners._EIGENVALUE_FLOOR * values.max())
    gram = X.T @ X / n
    expected = np.kron(gram, (vectors * values) @ vectors.T)
    expected += l2 * np.kron(np.diag(penalty), np.eye(classes))

    # Entry by entry, relative to the geometric mean of the diagonal entries (the scale at
    # which the columns' sizes cancel), the float32 products agree to about 1e-6.
    def error(matrix, reference):
        scale = np.sqrt(np.outer(np.diag(reference), np.diag(reference)))
        return np.max(np.abs(matrix - reference) / scale)

    assert error(apply, expected) <= 1e-5
    # The inverse on the centred subspace (without a reference class the shift is flat).
    center = np.kron(np.eye(d), np.eye(classes) - 1.0 / classes)
    inverse = center @ np.linalg.inv(expected) @ center
    assert error(solve, inverse) <= 1e-5
    # S's eigenbasis with l2·D² replaced by its diagonal there (the previous behaviour) is
    # orders of magnitude off for these columns.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_preconditioners, "_factors_class_blocks", lambda *_: False)
        rayleigh = _preconditioners.kronecker(objective, evaluation, basis)
    approximate = np.asarray(jax.vmap(rayleigh.apply)(identity).T, np.float64)
    assert error(approximate, expected) > 1.0


def test_backtracking_armijo():
    # f(t) = (t − 0.3)², from t = 0 along Δ = 1: slope −0.6.
    def change_at(t):
        return (t - 0.3) ** 2 - 0.09

    result = backtracking(change_at, jnp.asarray(-0.6), sufficient_decrease=1e-4)
    assert bool(result.success)
    # The largest t in {1, 1/2, 1/4, ...} meeting the Armijo condition: 1/2 (1 increases f).
    assert float(result.scale) == 0.5
    assert float(result.change) <= 1e-4 * 0.5 * -0.6
    ascent = backtracking(change_at, jnp.asarray(0.6))
    assert not bool(ascent.success) and int(ascent.n_steps) == 0
    never = backtracking(lambda t: jnp.asarray(jnp.nan), jnp.asarray(-1.0), max_steps=5)
    assert not bool(never.success) and int(never.n_steps) == 5


def test_trust_region_radius_rule():
    radius, norm = jnp.asarray(2.0), jnp.asarray(2.0)
    # A very good step on the boundary: the radius grows by σ₃ = 4.
    grown = radius_update(radius, norm, jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(-1.5), True)
    assert float(grown) == 8.0
    # Inside the region, a good step keeps at least the radius.
    kept = radius_update(radius, norm, jnp.asarray(1.0), jnp.asarray(1.0), jnp.asarray(-1.5), False)
    assert float(kept) >= 2.0
    # A step that increased f: the radius shrinks to at most σ₂·Δ.
    shrunk = radius_update(
        radius, norm, jnp.asarray(-0.5), jnp.asarray(1.0), jnp.asarray(-1.5), False
    )
    assert float(shrunk) <= 1.0
    failed = radius_update(
        radius, norm, jnp.asarray(jnp.nan), jnp.asarray(1.0), jnp.asarray(-1.5), False
    )
    assert float(failed) == 0.25 * 2.0  # σ₁·‖s‖ when the change is not finite


def _imports(path: Path) -> set[str]:
    """The package-relative modules a file imports (``.._linear``, ``._loop``, ...)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = "." * node.level + (node.module or "")
            if node.module is None:
                found.update(base + alias.name for alias in node.names)
            else:
                found.add(base)
    return found


def test_solvers_never_import_a_concrete_objective_nor_each_other():
    core = ["_loop", "_convergence", "_linesearch", "_inner", "_preconditioners", "_progress"]
    peers = ["_newton", "_newton_cg", "_trust_region"]
    for name in core + peers:
        imported = _imports(PACKAGE / "solvers" / f"{name}.py")
        assert "..__linear" not in imported and ".._linear" not in imported, name
        assert not any(f".{peer}" in imported for peer in peers if peer != name), name
    for name in core:  # the core never imports a solver
        assert not any(f".{peer}" in _imports(PACKAGE / "solvers" / f"{name}.py") for peer in peers)


def test_nothing_imports_jax_private_modules():
    for path in list(PACKAGE.rglob("*.py")) + list(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            assert not any(name.startswith("jax._src") for name in names), path.name
