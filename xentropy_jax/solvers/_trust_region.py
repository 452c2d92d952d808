"""The `TrustRegion` solver: Steihaug-CG in a trust region with liblinear TRON's update rules."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._cg import CGStatus, steihaug_cg
from .._objective import Objective
from . import _preconditioners
from ._inner import (
    FORCING_CAP,
    FORCING_EXPONENT,
    check_cg_options,
    check_product_dtype,
    entry_tolerance,
    forcing_term,
    max_cg_steps,
    preconditioner_at,
    product_objective,
    product_operator,
)
from ._linesearch import keep_in_subspace
from ._loop import Iterate, SolverOutput, StepResult, initial_theta, run
from ._progress import Progress

# liblinear's TRON constants: acceptance and radius-update thresholds on the ratio of actual to
# predicted reduction, and the radius scalings.
_ETA0, _ETA1, _ETA2 = 1e-4, 0.25, 0.75
_SIGMA1, _SIGMA2, _SIGMA3 = 0.25, 0.5, 4.0


def accepted(actual: jax.Array, predicted: jax.Array) -> jax.Array:
    """TRON's acceptance test: a finite change and actual > 1e-4·predicted reduction."""
    return jnp.isfinite(actual) & (actual > _ETA0 * predicted)


def radius_update(
    radius: jax.Array,
    step_norm: jax.Array,
    actual: jax.Array,
    predicted: jax.Array,
    slope: jax.Array,
    on_boundary: jax.Array,
) -> jax.Array:
    """The next trust radius from liblinear's TRON (Lin, Weng and Keerthi, 2008).

    α = max(σ₁, −½·gᵀs/(f(θ+s) − f(θ) − gᵀs)) is the step length that minimises the quadratic
    through f(θ), gᵀs and f(θ + s) (σ₃ when that quadratic is not convex, σ₁ when the change is
    not finite). With ρ = actual/predicted reduction: ρ < η₀ shrinks to min(α‖s‖, σ₂Δ);
    ρ < η₁ to max(σ₁Δ, min(α‖s‖, σ₂Δ)); ρ < η₂ to max(σ₁Δ, min(α‖s‖, σ₃Δ)); otherwise the
    radius grows, to σ₃Δ when the step stopped on the boundary, else to max(Δ, min(α‖s‖, σ₃Δ)).

    Args:
        radius: Δ, the current radius.
        step_norm: ‖s‖_M of the step.
        actual: f(θ) − f(θ + s).
        predicted: the model's reduction −(gᵀs + ½sᵀHs).
        slope: gᵀs.
        on_boundary: whether the inner solve stopped on the boundary.

    Returns:
        The new radius (a pure function: no state, no side effect).
    """
    change = -actual
    curvature_gap = change - slope
    alpha = jnp.where(
        curvature_gap <= 0,
        _SIGMA3,
        jnp.maximum(_SIGMA1, -0.5 * slope / jnp.where(curvature_gap > 0, curvature_gap, 1)),
    )
    alpha = jnp.where(jnp.isfinite(change), alpha, _SIGMA1)
    scaled = alpha * step_norm
    bad = ~jnp.isfinite(change) | (actual < _ETA0 * predicted)
    return jnp.where(
        bad,
        jnp.minimum(scaled, _SIGMA2 * radius),
        jnp.where(
            actual < _ETA1 * predicted,
            jnp.maximum(_SIGMA1 * radius, jnp.minimum(scaled, _SIGMA2 * radius)),
            jnp.where(
                actual < _ETA2 * predicted,
                jnp.maximum(_SIGMA1 * radius, jnp.minimum(scaled, _SIGMA3 * radius)),
                jnp.where(
                    on_boundary,
                    _SIGMA3 * radius,
                    jnp.maximum(radius, jnp.minimum(scaled, _SIGMA3 * radius)),
                ),
            ),
        ),
    )


class _Carry(NamedTuple):
    radius: jax.Array
    decrement: jax.Array


@dataclasses.dataclass(frozen=True)
class TrustRegion:
    """Trust-region Newton: Steihaug-CG in ‖s‖_M <= Δ, radius updated as liblinear's TRON.

    Each iteration solves the quadratic model inside the region with preconditioned CG (the
    same closed-form Hessian products as `NewtonCG`), compares the actual reduction of f with
    the model's, accepts the step when the ratio exceeds 1e-4, and rescales the radius with
    TRON's rules (Lin, Weng and Keerthi, 2008). The first radius is unbounded: the first step
    is a Newton-CG step, and the radius starts from its length (TRON's min(Δ₀, ‖s‖_M)).

    The region is measured in the preconditioner's norm ‖s‖_M, as TRON does.

    Attributes:
        preconditioner: "auto" (default), "kronecker", "ekfac", "diagonal" or "none", see
            `NewtonCG`.
        max_cg_iter: most Hessian products per iteration.
        forcing_cap: upper bound of the CG relative tolerance.
        forcing_exponent: CG relative tolerance ‖g‖^forcing_exponent near the optimum (0.25,
            as `NewtonCG`).
        preconditioner_mix: with the diagonal, M = (1 − mix)·mean(diag H) + mix·diag(H); 1 is
            the plain Hessian diagonal, TRON uses 0.01 in its own scaling.
        product_dtype: None (default) or "float32": CG's Hessian products in float32 for
            float64 data, as `NewtonCG`'s. The model's predicted decrease then uses those
            products; the actual decrease, the gradient and the stopping test stay float64, so
            the ratio test keeps the fit on the float64 objective.

    Raises:
        ValueError: on construction, for an unknown preconditioner, product dtype or a value
            out of range.

    Example:
        The same optimum as the line-search solvers:

        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> reference = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6)
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6, solver=xj.TrustRegion())
        >>> same = jnp.allclose(result.params[0], reference.params[0], atol=1e-5)
        >>> bool(result.converged), bool(same)
        (True, True)
    """

    preconditioner: str = "auto"
    max_cg_iter: int = 250
    forcing_cap: float = FORCING_CAP
    forcing_exponent: float = FORCING_EXPONENT
    preconditioner_mix: float = 1.0
    product_dtype: str | None = None

    def __post_init__(self):
        check_cg_options(
            self.preconditioner, self.max_cg_iter, self.forcing_cap, self.forcing_exponent
        )
        if not 0 < self.preconditioner_mix <= 1:
            raise ValueError(f"preconditioner_mix must be in (0, 1], got {self.preconditioner_mix}")
        check_product_dtype(self.product_dtype)

    def step(
        self,
        objective: Objective,
        point: Iterate,
        basis,
        tol: jax.Array,
        carry: _Carry,
        products: Objective | None = None,
    ) -> StepResult:
        """One iteration: Steihaug-CG in ‖s‖_M <= Δ, the ratio test, the radius update.

        CG stops as `NewtonCG`'s does (relative residual η or every entry within a tenth of its
        tolerance), or on the boundary; `products` as in `NewtonCG.step`.
        """
        evaluation = point.evaluation
        grad = evaluation.grad
        dtype = grad.dtype
        metric = preconditioner_at(
            self.preconditioner, objective, products, evaluation, basis, self.preconditioner_mix
        )
        solve = steihaug_cg(
            product_operator(objective, products, evaluation),
            -grad,
            carry.radius,
            preconditioner=metric.solve,
            rtol=forcing_term(grad, tol, self.forcing_cap, self.forcing_exponent),
            max_steps=max_cg_steps(self.max_cg_iter, objective.num_params),
            entry_tol=entry_tolerance(grad, tol),
        )
        step = solve.solution
        step_predictor = objective.predictor(step)
        slope = jnp.vdot(grad, step)
        # Model decrease −(gᵀs + ½sᵀHs) with Hs = −g − r.
        predicted = -0.5 * (slope - jnp.vdot(step, solve.residual))
        actual = -objective.loss_change(
            point.theta, evaluation, step, step_predictor, jnp.ones((), dtype)
        )
        step_norm = jnp.sqrt(jnp.vdot(step, metric.apply(step)))
        # The first radius is unbounded: the first step is a Newton-CG step, and the radius
        # starts from its length (TRON's min(Δ₀, ‖s‖_M)).
        first = ~jnp.isfinite(carry.radius)
        radius = jnp.where(first, jnp.minimum(carry.radius, step_norm), carry.radius)
        # Steihaug follows a direction of negative curvature to the boundary too.
        on_boundary = (solve.status == CGStatus.BOUNDARY) | (
            solve.status == CGStatus.NEGATIVE_CURVATURE
        )
        # A boundary step whose model predicts no decrease: H is PSD, so the negative curvature
        # was rounding (float32 at l2 = 1e7: sᵀHs = −394 measured, 394 in fact). Rejected, and
        # the radius shrinks; its predicted decrease, −197, had ended the fit LINE_SEARCH_FAILED
        # (a step with no model decrease) where NewtonCG converged.
        no_model_decrease = on_boundary & ~(predicted > 0)
        radius = jnp.where(
            no_model_decrease,
            _SIGMA1 * jnp.minimum(radius, step_norm),
            radius_update(radius, step_norm, actual, predicted, slope, on_boundary),
        )
        taken = accepted(actual, predicted) & ~no_model_decrease
        theta = jnp.where(taken, keep_in_subspace(objective, point.theta + step), point.theta)
        predictor = jax.tree.map(
            lambda a, b: jnp.where(taken, a + b, a), point.predictor, step_predictor
        )
        # A step inside the region is the (inexact) Newton step from θ, so its model decrease
        # measures θ itself whether or not it was taken: at an optimum (a warm start from a
        # converged fit) the step is rejected, its decrease being rounding, and keeping the
        # last accepted decrement (inf at first) reported LINE_SEARCH_FAILED there.
        decrement = jnp.where(taken | ~on_boundary, predicted, carry.decrement)
        # The region has collapsed below the resolution of θ: no decrease can be found.
        collapsed = radius <= 10 * jnp.finfo(dtype).eps * (
            1 + jnp.sqrt(jnp.vdot(theta, metric.apply(theta)))
        )
        return StepResult(
            Iterate(theta, predictor, objective.evaluate(theta, predictor)),
            decrement=decrement,
            failed=collapsed & ~taken,
            n_products=solve.num_steps,
            carry=_Carry(radius, decrement),
            report={
                "cg": solve.num_steps,
                "radius": radius,
                "ratio": actual / predicted,
                "accepted": taken,
            },
        )

    def minimize(
        self,
        objective: Objective,
        theta: jax.Array,
        *,
        tol: jax.Array,
        max_iter: jax.Array,
        verbose: bool = False,
        basis=None,
    ) -> SolverOutput:
        """Minimise `objective` from θ [P]; arguments and result as `NewtonCG.minimize`."""
        if basis is None:
            basis = _preconditioners.setup_basis(self.preconditioner, objective)
        products = product_objective(objective, self.product_dtype)  # once, before the loop
        progress = None
        if verbose:
            progress = Progress(
                "cg {cg:3d}  radius {radius:.3e}  actual/predicted {ratio:.3g}  accepted {accepted}"
            )
        theta = initial_theta(objective, theta)  # its dtype is the carry's
        carry = _Carry(jnp.asarray(jnp.inf, theta.dtype), jnp.asarray(jnp.inf, theta.dtype))
        return run(
            objective,
            theta,
            lambda point, carry: self.step(objective, point, basis, tol, carry, products),
            carry,
            tol=tol,
            max_iter=max_iter,
            progress=progress,
        )


jax.tree_util.register_dataclass(
    TrustRegion,
    data_fields=[],
    meta_fields=[
        "preconditioner",
        "max_cg_iter",
        "forcing_cap",
        "forcing_exponent",
        "preconditioner_mix",
        "product_dtype",
    ],
)
