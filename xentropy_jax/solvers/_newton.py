"""The `Newton` solver: line-search Newton with the explicit Hessian and a Cholesky solve."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._manual import cond
from .._objective import Evaluation, Objective
from ._linalg import cholesky, cholesky_solve, eigh, jacobi_scaled
from ._linesearch import check_line_search_options, line_search_step
from ._loop import Iterate, SolverOutput, StepResult, run
from ._progress import Progress


def newton_direction(objective: Objective, evaluation: Evaluation) -> jax.Array:
    """Δ = −H⁻¹g from the explicit Hessian (`Objective.hessian`), the minimum-norm one.

    Directions along which the objective is exactly flat (`Objective.hessian_null_space`, if
    the objective has it) are filled in before factorising, so that they do not make the
    Cholesky factorisation fail; any other singularity (collinear features with l2 = 0) falls
    back to the pseudo-inverse. Cost: O(P³) for the factorisation.
    """
    matrix = objective.hessian(evaluation)
    grad = evaluation.grad
    null_space = getattr(objective, "hessian_null_space", lambda matrix: None)(matrix)
    if null_space is not None:
        matrix = matrix + null_space
    # Jacobi scaling D·H·D (unit diagonal) before factorising: columns of very different
    # scales (1e8 next to 1) would otherwise lose the small ones to rounding, in float32 above
    # all. The step is D·(DHD)⁻¹·D·g, the same Newton step.
    matrix, scale = jacobi_scaled(matrix)
    factor = cholesky(matrix)
    direction = -scale * cholesky_solve(factor, scale * grad)

    def pseudo_inverse_step(_):
        # H singular beyond the known direction (collinear features with l2 = 0): the
        # minimum-norm Newton step (in the scaled variables) from the eigendecomposition.
        eigenvalues, eigenvectors = eigh(matrix)
        cutoff = jnp.max(eigenvalues) * matrix.shape[0] * jnp.finfo(matrix.dtype).eps
        inverse = jnp.where(
            eigenvalues > cutoff, 1 / jnp.where(eigenvalues > cutoff, eigenvalues, 1), 0
        )
        return -scale * (eigenvectors @ (inverse * (eigenvectors.T @ (scale * grad))))

    direction = cond(
        jnp.all(jnp.isfinite(direction)), lambda _: direction, pseudo_inverse_step, None
    )
    return direction


@dataclasses.dataclass(frozen=True)
class Newton:
    """Newton's method with the explicit Hessian, a Cholesky solve and a line search.

    Per iteration: the [P, P] Hessian in O(N·P²) flops (P = (d + 1)·K), its Cholesky factor in
    O(P³), then a backtracking line search. The choice when P is small (a few hundred). It
    drives any `Objective` that has the optional `hessian` method.

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

    def step(self, objective: Objective, point: Iterate, carry=()) -> StepResult:
        """One iteration: the Newton direction, then the line search along it."""
        direction = newton_direction(objective, point.evaluation)
        return line_search_step(
            objective,
            point,
            direction,
            -jnp.vdot(point.evaluation.grad, direction),
            jnp.ones((), jnp.int32),
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
        return run(
            objective,
            theta,
            lambda point, carry: self.step(objective, point, carry),
            (),
            tol=tol,
            max_iter=max_iter,
            progress=progress,
        )


jax.tree_util.register_dataclass(
    Newton, data_fields=[], meta_fields=["sufficient_decrease", "max_line_search"]
)
