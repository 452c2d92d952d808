"""The `Newton` solver: line-search Newton with the explicit Hessian and a Cholesky solve."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._cg import plain_cg
from .._manual import cond
from .._objective import Evaluation, Objective
from ._inner import entry_tolerance, forcing_term
from ._linalg import cholesky, cholesky_solve, eigh, jacobi_scaled
from ._linesearch import check_line_search_options, line_search_step
from ._loop import Iterate, SolverOutput, StepResult, run
from ._preconditioners import centring_flat, centring_of
from ._progress import Progress


def newton_direction(
    objective: Objective,
    evaluation: Evaluation,
    tol: jax.Array | None = None,
    shift: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Δ = −H⁻¹g from the explicit Hessian (`Objective.hessian`), the minimum-norm one.

    Directions along which the objective is exactly flat (`Objective.hessian_null_space`, if
    the objective has it) are filled in before factorising, so that they do not make the
    Cholesky factorisation fail; any other singularity (collinear features with l2 = 0) falls
    back to the pseudo-inverse. Cost: O(P³) for the factorisation.

    With `shift` μ (`feature_shift`), H is factorised in the centred variables θ = C·θ_c
    (`centring`): Δ = −C·(CᵀHC)⁻¹·Cᵀg, the same step, from the entries of CᵀHC that the
    objective forms on X − 1·μᵀ. Below float64, with `tol` given, a factorised step is refined
    (`_refined`).

    Returns:
        (Δ, ΔᵀHΔ, Hessian products: the explicit Hessian counts as one).
    """
    matrix = (
        objective.hessian(evaluation) if shift is None else objective.hessian(evaluation, shift)
    )
    grad = evaluation.grad

    def centred(vector: jax.Array, back: bool) -> jax.Array:
        # Cᵀ·v (into the centred variables) or C·v (back).
        return centring_flat(vector, shift, inverse=False, transpose=not back)

    null_space = getattr(objective, "hessian_null_space", lambda matrix: None)(matrix)
    if null_space is not None:
        matrix = matrix + null_space
    # Jacobi scaling D·H·D (unit diagonal) before factorising: columns of very different
    # scales (1e8 next to 1) would otherwise lose the small ones to rounding, in float32 above
    # all. The step is D·(DHD)⁻¹·D·g, the same Newton step.
    matrix, scale = jacobi_scaled(matrix)
    refining = tol is not None and jnp.dtype(grad.dtype) != jnp.float64

    def inverse(factor: jax.Array, vector: jax.Array) -> jax.Array:
        return centred(scale * cholesky_solve(factor, scale * centred(vector, False)), True)

    factor = cholesky(matrix)
    direction = -inverse(factor, grad)

    def pseudo_inverse_step(_):
        # H singular beyond the known direction (collinear features with l2 = 0): the
        # minimum-norm Newton step (in the scaled variables) from the eigendecomposition.
        eigenvalues, eigenvectors = eigh(matrix)
        # (`initial`: an objective with no parameters has no eigenvalues, and no step.)
        cutoff = jnp.max(eigenvalues, initial=0.0) * matrix.shape[0] * jnp.finfo(matrix.dtype).eps
        inverse = jnp.where(
            eigenvalues > cutoff, 1 / jnp.where(eigenvalues > cutoff, eigenvalues, 1), 0
        )
        scaled_grad = scale * centred(grad, False)
        step = -centred(scale * (eigenvectors @ (inverse * (eigenvectors.T @ scaled_grad))), True)
        if not refining:
            return step, factor
        # The refinement's preconditioner: the factor of D·H·D + cutoff·I, positive definite
        # beyond the entries' rounding (at most P·eps·‖D·H·D‖).
        return step, cholesky(matrix + cutoff * jnp.eye(matrix.shape[0], dtype=matrix.dtype))

    factorised = jnp.all(jnp.isfinite(direction))
    direction, factor = cond(factorised, lambda _: (direction, factor), pseudo_inverse_step, None)
    one = jnp.ones((), jnp.int32)
    if not refining:
        return direction, -jnp.vdot(grad, direction), one
    # On the range of the objective's `remove_class_shift` Π, as the CG solvers' preconditioners
    # (`_preconditioners.build`): unprojected, CG moved along the common shift of the classes,
    # which no product sees (a step of 4e4 where the exact one is 0.9, with a class of zero
    # weight), and the predictor's rounding then made the fit optimise the wrong logits.
    project = getattr(objective, "remove_class_shift", lambda vector: vector)
    solve = _refined(
        objective,
        evaluation,
        project(direction),
        lambda vector: project(inverse(factor, project(vector))),
        tol,
    )
    # HΔ = −g − r: ΔᵀHΔ with no further product.
    curvature = -jnp.vdot(solve.solution, grad + solve.residual)
    return solve.solution, curvature, one + 1 + solve.num_steps


# Most CG steps of a refinement (each one Hessian product, where forming H costs about P/2).
# Measured on raw iris, wine, digits and breast cancer and nearly collinear columns: 0.1 to 2.6
# steps an iteration on average, beyond the product that measures the step's residual.
_REFINEMENT_STEPS = 10


def _refined(objective, evaluation, direction, inverse, tol):
    """CG on H·Δ = −g from the factorised step, preconditioned by the factorised Hessian.

    Below float64 the explicit Hessian's rounding, about eps·‖H‖ in every entry, swamps its
    small eigenvalues: on columns x and x + 1e-3·noise its float32 steps went wrong along
    their difference, and the fit stopped at max_iter 4.8e-4 above the optimum, where
    Newton-CG converged. The matrix-free product resolves that curvature (it never forms
    H's entries), so CG started at the factorised step and preconditioned by the same
    factor corrects it in a few products; well-conditioned steps are accepted after the one
    product that measures their residual. The solve stops at ‖HΔ + g‖ <= min(0.1, ‖g‖)·‖g‖
    (keeping Newton's quadratic rate), at every |(HΔ + g)_j| <= tol_j / 10, or after
    `_REFINEMENT_STEPS` products.
    """
    grad = evaluation.grad
    return plain_cg(
        lambda tangent: objective.hessian_product(evaluation, tangent),
        -grad,
        x0=direction,
        preconditioner=inverse,
        rtol=forcing_term(grad, tol, 0.1, 1.0),
        max_steps=_REFINEMENT_STEPS,
        entry_tol=entry_tolerance(grad, tol),
        verify=False,
    )


@dataclasses.dataclass(frozen=True)
class Newton:
    """Newton's method with the explicit Hessian, a Cholesky solve and a line search.

    Per iteration: the [P, P] Hessian in O(N·P²) flops (P = (d + 1)·K), its Cholesky factor in
    O(P³), then a backtracking line search. The choice when P is small (a few hundred). It
    drives any `Objective` that has the optional `hessian` method. Below float64 each step is
    refined by CG on matrix-free Hessian products, preconditioned by the factor (one product
    when the factorised step is accurate, at most 11; `n_hessian_products` counts them, and
    the explicit Hessian as one), and, where the objective has `feature_shift` (a dense X with
    an intercept), the Hessian is formed and factorised in the centred variables (W, b + μᵀW)
    of the columns whose mean dominates their spread (`centring_of`).

    Attributes:
        sufficient_decrease: Armijo constant of the line search.
        max_line_search: trial step lengths before the line search gives up.

    Example:
        The same optimum as the default matrix-free solver:

        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> reference = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6)
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6, solver=xj.Newton())
        >>> same = jnp.allclose(result.params[0], reference.params[0], atol=1e-5)
        >>> bool(result.converged), bool(same)
        (True, True)
    """

    sufficient_decrease: float = 1e-4
    max_line_search: int = 30

    def __post_init__(self):
        check_line_search_options(self.sufficient_decrease, self.max_line_search)

    def step(
        self,
        objective: Objective,
        point: Iterate,
        carry=(),
        tol: jax.Array | None = None,
        shift: jax.Array | None = None,
    ) -> StepResult:
        """One iteration: the Newton direction (refined below float64), then the line search.

        `shift`: the column means of centred variables (`newton_direction`), or None.
        """
        direction, curvature, products = newton_direction(objective, point.evaluation, tol, shift)
        return line_search_step(
            objective,
            point,
            direction,
            curvature,
            products,
            sufficient_decrease=self.sufficient_decrease,
            max_line_search=self.max_line_search,
        )

    def minimize(
        self,
        objective: Objective,
        theta: jax.Array,
        *,
        tol: jax.Array,
        max_iter: jax.Array,
        verbose: bool = False,
    ) -> SolverOutput:
        """Minimise `objective` from θ [P] (the objective needs the optional `hessian`).

        Args:
            objective: any `Objective` with a `hessian(evaluation)` method.
            theta: [P] initial point.
            tol: scalar or [P] tolerance: stop when |g| <= tol and ½ΔᵀHΔ <= max(tol).
            max_iter: most iterations.
            verbose: print a line per iteration (loss, max|g|, step length, decrement, time).

        Returns:
            A `SolverOutput` (theta, evaluation, n_iter, status, n_hessian_products).

        Raises:
            ValueError: an objective without `hessian` (use `NewtonCG` or `TrustRegion`,
                which need only Hessian products).
        """
        if not hasattr(objective, "hessian"):
            raise ValueError(
                f"Newton needs the objective's explicit Hessian, hessian(evaluation) -> [P, P]; "
                f"{type(objective).__name__} has none: add it, or use NewtonCG or TrustRegion, "
                "which need only hessian_product."
            )
        progress = Progress("step {step:.3g}  decrement {decrement:.3e}") if verbose else None
        shift = centring_of(objective)
        return run(
            objective,
            theta,
            lambda point, carry: self.step(objective, point, carry, tol, shift),
            (),
            tol=tol,
            max_iter=max_iter,
            progress=progress,
        )


jax.tree_util.register_dataclass(
    Newton, data_fields=[], meta_fields=["sufficient_decrease", "max_line_search"]
)
