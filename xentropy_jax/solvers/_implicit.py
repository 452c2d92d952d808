"""Derivatives of a fit by implicit differentiation of its optimality condition.

The fitted θ* solves g(θ*; x) = ∇_θ f(θ*; x) = 0, where x are the differentiable inputs of the
objective (the features X, the normalised row weights ŵ, l2). Differentiating the condition,

    H·θ̇ + ∂_x g·ẋ = 0,      so      θ̇ = −H⁻¹·(∂_x g·ẋ),      H = ∇²_θ f(θ*; x),

one Hessian solve per tangent, by matrix-free conjugate gradients (`xentropy_jax.cg`, with the
fit's own "auto" preconditioner at θ*), and never a derivative of the solver's iterations. The
solve sits inside `jax.lax.custom_linear_solve` with `symmetric=True`: H is symmetric, so the
transposed solve (reverse mode: one solve per cotangent) is the same solve, and `jax.grad`,
`jax.vjp`, `jax.jvp`, `jax.jacfwd` and `jax.jacrev` all work, under `jit` and `vmap` too.

Singular directions are solved in the projected space, so the tangent is that of the point the
fit returns:
- without a reference class, a shift of every class by the same amount (the rows of Θ [d̃, K]
  shifted by a constant) is an invariant subspace S of H (eigenvalue l2 along W, 0 along b).
  The solve is on P·H·P + α·(I − P), P the projector onto S's complement (centring each row
  over the classes): positive definite, equal to H on S^⊥, and the right-hand side and the
  tangent are centred, as the fit's symmetric parameters are.
- with l2 = 0 and exactly collinear columns of X̃ = [X, 1], the right-hand side and the tangent
  are also projected off null(X̃ᵀŴX̃) ⊗ R^K (as `minimum_norm` projects the fit): the tangent of
  the minimum-norm optimum where that point moves smoothly (sample weights, and perturbations
  of X that keep the columns' dependence); for other perturbations of X no derivative exists
  (the optimum jumps), and the projected tangent is only the pseudo-inverse's.

The loss's tangent is the chain rule through f(θ*(x), x): ∂_x f·ẋ + gᵀθ̇, whose second term
vanishes at an exact optimum (the envelope theorem).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._cg import CGStatus, plain_cg
from .._linear import Evaluation, LogisticObjective, evaluate, hessian_diagonal
from .._linear import hessian_vector_product as _hessian_vector_product
from .._manual import zero_tangent
from .._precision import full_precision
from ._collinear import minimum_norm
from ._preconditioners import build, setup_basis

Minimize = Callable[[LogisticObjective, jax.Array, jax.Array, jax.Array], Any]


def minimize_implicit(
    minimize: Minimize,
    objective: LogisticObjective,
    theta: jax.Array,
    tol: jax.Array,
    max_iter: jax.Array,
) -> tuple[jax.Array, jax.Array, Any]:
    """Run a solver, with derivatives of its optimum by implicit differentiation.

    Args:
        minimize: (objective, θ₀, tol, max_iter) -> the solver's output, which has `theta` [P]
            and `evaluation.loss`. It must close over no traced value.
        objective: the problem; its floating leaves (features, weights, l2) are the inputs that
            derivatives are taken with respect to.
        theta: [P] starting point (no derivative: the optimum does not depend on it).
        tol: the solver's tolerance (no derivative).
        max_iter: the solver's iteration limit (no derivative).

    Returns:
        (θ*, loss, output): θ* [P] the solver's point projected as `minimum_norm` does, the
        objective there, and the solver's output (its tangents are zero). θ* and the loss carry
        the implicit derivatives of the optimality condition at θ*, whether the solver
        converged or not.
    """

    @jax.custom_jvp
    def solve(objective, theta, tol, max_iter):
        output = minimize(objective, theta, tol, max_iter)
        theta = minimum_norm(objective, output.theta, transposable=False)  # a primal only
        return theta, output.evaluation.loss, output

    @solve.defjvp
    @full_precision  # the rule is traced when differentiated, outside the fit's trace
    def solve_jvp(primals, tangents):
        objective = primals[0]
        optimum, loss, output = solve(*primals)
        optimum_dot, loss_dot = optimum_tangent(objective, optimum, tangents[0])
        return (optimum, loss, output), (optimum_dot, loss_dot, zero_tangent(output))

    return solve(objective, theta, tol, max_iter)


def optimum_tangent(
    objective: LogisticObjective, theta: jax.Array, objective_dot: LogisticObjective
) -> tuple[jax.Array, jax.Array]:
    """(θ̇, ḟ) at an optimum θ [P] for the input tangent `objective_dot`.

    θ̇ = −H⁺·(∂_x g·ẋ) (one CG solve, see the module docstring) and ḟ = ∂_x f·ẋ + gᵀθ̇.
    Linear in `objective_dot` and transposable (`custom_linear_solve`), so reverse mode works.
    """

    def gradient_and_loss(problem):
        evaluation = evaluate(problem, theta, problem.free_logits(theta))
        return (evaluation.grad, evaluation.loss), evaluation

    (grad, _), (grad_dot, loss_dot), evaluation = jax.jvp(
        gradient_and_loss, (objective,), (objective_dot,), has_aux=True
    )
    matvec, solve_projected = _projected_hessian(objective, evaluation)
    theta_dot = -lax.custom_linear_solve(matvec, grad_dot, solve_projected, symmetric=True)
    return theta_dot, loss_dot + jnp.vdot(grad, theta_dot)


def _projected_hessian(
    objective: LogisticObjective, evaluation: Evaluation
) -> tuple[Callable[[jax.Array], jax.Array], Callable]:
    """(A, solve): A = P·H·P + α·(I − P), and solve(A, b) = the projected CG solution of A·x = b.

    P centres each row of Θ over the classes (identity with a reference class). α holds one
    value per row of Θ [d̃, Kf], the mean of that row's diag(H): the added eigenvalue then sits
    inside that row's part of H's spectrum, and α·(I − P) commutes with P (P acts within rows),
    so A stays symmetric. One α for all rows, the mean of the whole diagonal, was set by the
    largest columns: on raw wine (columns from 0.1 to 1,000) the Jacobi-preconditioned solve
    hit its step limit and the derivative came out 6% off in float64 and 59% in float32.
    """
    dtype = objective.dtype
    kf = objective.num_free_classes
    diagonal = hessian_diagonal(objective, evaluation)
    diagonal = jnp.where(diagonal > 0, diagonal, jnp.max(diagonal, initial=1.0))
    alpha = jnp.repeat(jnp.mean(diagonal.reshape(-1, kf), axis=1), kf).astype(dtype)

    centre = objective.remove_class_shift

    def matvec(vector):
        centred = centre(vector)
        product = centre(_hessian_vector_product(objective, evaluation, centred))
        if objective.reference_class:
            return product
        return product + alpha * (vector - centred)

    # The fit's own preconditioner at θ* ("auto": Kronecker in the features' eigenbasis up to
    # 4,000 features, Jacobi beyond), projected onto the centred space where the solve runs. Jacobi
    # alone left float32 raw wine at 2e-4 (3e-3 with a reference class) in 94 steps.
    # It only speeds the solve up, so its inputs carry no derivative: reverse mode over this
    # rule (jax.jacrev or jax.grad of a derivative) would otherwise have to differentiate its
    # factorisations, whose `custom_vmap` (`_linalg`) has no reverse mode.
    kind = "auto"
    fixed, at = lax.stop_gradient((objective, evaluation))
    preconditioner = build(kind, fixed, at, setup_basis(kind, fixed))

    def project(vector):
        # The class shift, and with l2 = 0 the features' null space (a no-op otherwise).
        return centre(minimum_norm(objective, vector))

    num_params = objective.num_params
    eps = jnp.finfo(dtype).eps

    def solve(operator, rhs):
        # Tolerances relative to the right-hand side before the projection: a cotangent along
        # the class shift only (that of Σ W, say) projects to rounding, which no solve reduces
        # by a further eps^¾, and whose solution is 0 to that rounding anyway.
        scale = jnp.linalg.norm(rhs)
        rhs = project(rhs)
        result = plain_cg(
            operator,
            rhs,
            preconditioner=preconditioner.solve,
            rtol=eps**0.75,
            atol=eps**0.75 * scale,
            max_steps=2 * num_params + 10,
            verify=False,
        )
        # Not silently: inside `jit` too, a solve that stopped short says so at run time. In
        # float32 the residual of an ill-conditioned H stalls near 1e-4 while the tangent is
        # right to 1e-6, so only a residual above √eps counts.
        relative = result.residual_norm / jnp.where(scale > 0, scale, 1)
        short = (result.status != CGStatus.CONVERGED) & (relative > jnp.sqrt(eps))
        jax.debug.callback(_warn_if_short, short, result.status, result.num_steps, relative)
        return project(result.solution)

    return matvec, solve


def _warn_if_short(short, status, num_steps, relative_residual) -> None:
    """The host side of the solve's check: a `RuntimeWarning` if any solve stopped short."""
    short, status, num_steps, relative = map(
        np.asarray, (short, status, num_steps, relative_residual)
    )
    if not np.any(short):
        return
    warnings.warn(
        "implicit differentiation: the Hessian solve behind this derivative of the fit stopped "
        f"as {CGStatus(int(status[short].flat[0])).name} after {int(num_steps[short].max())} "
        f"steps at relative residual {float(relative[short].max()):.1e}, so the derivative is "
        "approximate. Standardise the columns of X, add a penalty, or use float64.",
        RuntimeWarning,
        stacklevel=2,
    )
