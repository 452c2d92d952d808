"""The `TrustRegion` solver: Steihaug-CG in a trust region with liblinear TRON's update rules."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._linear import Evaluation, LogisticObjective, evaluate, hessian_vector_product, loss_change
from . import _preconditioners
from ._cg import conjugate_gradient
from ._convergence import status_code
from ._newton import SolverOutput, setup
from ._newton_cg import check_cg_options, forcing_term
from ._progress import Progress
from ._result import RUNNING

# liblinear's TRON constants: acceptance and radius-update thresholds on the ratio of actual to
# predicted reduction, and the radius scalings.
_ETA0, _ETA1, _ETA2 = 1e-4, 0.25, 0.75
_SIGMA1, _SIGMA2, _SIGMA3 = 0.25, 0.5, 4.0


class TrustRegionState(NamedTuple):
    """State of the trust-region loop."""

    theta: jax.Array
    free_logits: jax.Array
    evaluation: Evaluation
    radius: jax.Array
    decrement: jax.Array
    n_iter: jax.Array
    n_hessian_products: jax.Array
    status: jax.Array


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
        preconditioner: "auto" (default), "kronecker", "ekfac" or "diagonal", see `NewtonCG`.
        max_cg_iter: most Hessian products per iteration.
        forcing_cap: upper bound of the CG relative tolerance.
        forcing_exponent: CG relative tolerance ‖g‖^forcing_exponent near the optimum.
        preconditioner_mix: with the diagonal, M = (1 − mix)·mean(diag H) + mix·diag(H); 1 is
            the plain Hessian diagonal, TRON uses 0.01 in its own scaling.

    Raises:
        ValueError: on construction, for an unknown preconditioner or a value out of range.

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
    forcing_cap: float = 0.5
    forcing_exponent: float = 0.5
    preconditioner_mix: float = 1.0

    def __post_init__(self):
        check_cg_options(
            self.preconditioner, self.max_cg_iter, self.forcing_cap, self.forcing_exponent
        )
        if not 0 < self.preconditioner_mix <= 1:
            raise ValueError(f"preconditioner_mix must be in (0, 1], got {self.preconditioner_mix}")

    def minimize(
        self,
        objective: LogisticObjective,
        theta: jax.Array,
        *,
        tol: jax.Array,
        max_iter: jax.Array,
        verbose: bool = False,
        basis=None,
    ) -> SolverOutput:
        """Run the solver from θ [P] (`basis`: the preconditioner's setup, if already computed)."""
        start = setup(objective, theta, max_iter)
        dtype = theta.dtype
        max_steps = min(self.max_cg_iter, max(objective.num_params, 1))
        if basis is None:  # a regularisation path passes the one it computed once
            basis = _preconditioners.setup_basis(self.preconditioner, objective)
        progress = None
        if verbose:
            progress = Progress(
                "cg {cg:3d}  radius {radius:.3e}  actual/predicted {ratio:.3g}  accepted {accepted}"
            )
            progress.start(start.evaluation)

        def cond(state: TrustRegionState) -> jax.Array:
            return state.status == RUNNING

        def body(state: TrustRegionState) -> TrustRegionState:
            evaluation = state.evaluation
            grad = evaluation.grad
            metric = _preconditioners.build(
                self.preconditioner, objective, evaluation, basis, self.preconditioner_mix
            )

            def matvec(tangent):
                return hessian_vector_product(objective, evaluation, tangent)

            solve = conjugate_gradient(
                matvec,
                -grad,
                metric,
                rtol=forcing_term(grad, tol, self.forcing_cap, self.forcing_exponent),
                max_steps=max_steps,
                radius=state.radius,
            )
            step = solve.solution
            step_logits = objective.free_logits(step)
            grad_step = jnp.vdot(grad, step)
            # Model decrease −(gᵀs + ½sᵀHs) with Hs = −g − r.
            predicted = -0.5 * (grad_step - jnp.vdot(step, solve.residual))
            change = loss_change(
                objective, state.theta, evaluation, step, step_logits, jnp.ones((), dtype)
            )
            actual = -change
            step_norm = jnp.sqrt(jnp.vdot(step, metric.apply(step)))
            first = state.n_iter == 0
            radius = jnp.where(first, jnp.minimum(state.radius, step_norm), state.radius)
            # Step length that minimises the quadratic through f, gᵀs and the new value.
            curvature_gap = change - grad_step
            alpha = jnp.where(
                curvature_gap <= 0,
                _SIGMA3,
                jnp.maximum(
                    _SIGMA1,
                    -0.5 * grad_step / jnp.where(curvature_gap > 0, curvature_gap, 1),
                ),
            )
            alpha = jnp.where(jnp.isfinite(change), alpha, _SIGMA1)
            bad = ~jnp.isfinite(change) | (actual < _ETA0 * predicted)
            radius = jnp.where(
                bad,
                jnp.minimum(alpha * step_norm, _SIGMA2 * radius),
                jnp.where(
                    actual < _ETA1 * predicted,
                    jnp.maximum(_SIGMA1 * radius, jnp.minimum(alpha * step_norm, _SIGMA2 * radius)),
                    jnp.where(
                        actual < _ETA2 * predicted,
                        jnp.maximum(
                            _SIGMA1 * radius, jnp.minimum(alpha * step_norm, _SIGMA3 * radius)
                        ),
                        jnp.where(
                            solve.on_boundary,
                            _SIGMA3 * radius,
                            jnp.maximum(radius, jnp.minimum(alpha * step_norm, _SIGMA3 * radius)),
                        ),
                    ),
                ),
            )
            accepted = jnp.isfinite(change) & (actual > _ETA0 * predicted)
            theta = jnp.where(accepted, state.theta + step, state.theta)
            free_logits = jnp.where(accepted, state.free_logits + step_logits, state.free_logits)
            new_evaluation = evaluate(objective, theta, free_logits)
            decrement = jnp.where(
                accepted, 0.5 * (-grad_step - jnp.vdot(step, solve.residual)), state.decrement
            )
            n_iter = state.n_iter + 1
            # The region has collapsed below the resolution of θ: no decrease can be found.
            collapsed = radius <= 10 * jnp.finfo(dtype).eps * (
                1 + jnp.sqrt(jnp.vdot(theta, metric.apply(theta)))
            )
            status = status_code(
                objective,
                new_evaluation,
                free_logits,
                decrement=decrement,
                n_iter=n_iter,
                max_iter=max_iter,
                tol=tol,
                step_failed=collapsed & ~accepted,
            )
            if progress is not None:
                progress.iteration(
                    n_iter,
                    new_evaluation,
                    cg=solve.n_steps,
                    radius=radius,
                    ratio=actual / predicted,
                    accepted=accepted,
                )
            return TrustRegionState(
                theta,
                free_logits,
                new_evaluation,
                radius,
                decrement,
                n_iter,
                state.n_hessian_products + solve.n_steps,
                status,
            )

        state = TrustRegionState(
            theta=start.theta,
            free_logits=start.free_logits,
            evaluation=start.evaluation,
            radius=jnp.asarray(jnp.inf, dtype),
            decrement=start.decrement,
            n_iter=start.n_iter,
            n_hessian_products=start.n_hessian_products,
            status=start.status,
        )
        state = lax.while_loop(cond, body, state)
        return SolverOutput(
            state.theta, state.evaluation, state.n_iter, state.status, state.n_hessian_products
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
    ],
)
