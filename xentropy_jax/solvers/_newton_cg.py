"""The `NewtonCG` solver: matrix-free truncated Newton with preconditioned CG and a line search."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._linear import Evaluation, LogisticObjective, hessian_vector_product
from . import _preconditioners
from ._cg import conjugate_gradient
from ._linesearch import check_line_search_options
from ._newton import SolverOutput, Step, line_search_newton

# The inner solve never aims below this fraction of tol on the residual: the next gradient is
# ≈ the residual, so solving further cannot make the fit converge sooner.
_TOL_FRACTION = 0.1


def forcing_term(grad: jax.Array, tol: jax.Array, cap: float, exponent: float) -> jax.Array:
    """Inexact-Newton forcing term η = min(cap, max(‖g‖₂^exponent, 0.1·tol/‖g‖₂)).

    ‖g‖^exponent (exponent 1/2) gives superlinear convergence; the second term stops the last
    solves from going far beyond what `tol` asks of the next gradient (per-parameter
    tolerances [P] count by their smallest).
    """
    norm = jnp.linalg.norm(grad)
    enough = _TOL_FRACTION * jnp.min(tol) / jnp.where(norm > 0, norm, 1)
    return jnp.minimum(cap, jnp.maximum(norm**exponent, enough))


def check_cg_options(
    preconditioner: str, max_cg_iter: int, forcing_cap: float, forcing_exponent: float
) -> None:
    """Raise ValueError for an unknown preconditioner or a CG option out of range."""
    if preconditioner not in _preconditioners.KINDS:
        raise ValueError(
            f"preconditioner must be one of {_preconditioners.KINDS}, got {preconditioner!r}"
        )
    if max_cg_iter < 1:
        raise ValueError(f"max_cg_iter must be >= 1, got {max_cg_iter}")
    if not 0 < forcing_cap < 1:
        raise ValueError(f"forcing_cap must be in (0, 1), got {forcing_cap}")
    if forcing_exponent < 0:
        raise ValueError(f"forcing_exponent must be >= 0, got {forcing_exponent}")


@dataclasses.dataclass(frozen=True)
class NewtonCG:
    """Truncated Newton: CG on H·Δ = −g to a relative residual η_k, then a line search.

    H is never formed: each CG iteration is one closed-form Hessian product (two GEMMs with
    X, O(N·K) in between) reusing the probabilities of the outer iteration. CG is preconditioned
    by the Kronecker factorisation A ⊗ B + l2·I of H (A the weighted feature Gram, formed once
    per fit, B the mean class curvature) or by the exact Hessian diagonal (one GEMM with X² per
    outer iteration). The forcing sequence η_k = min(forcing_cap, ‖g‖^forcing_exponent) makes
    the convergence superlinear (Eisenstat and Walker; Nocedal and Wright, section 7.1).

    Attributes:
        preconditioner: "auto" (default: "diagonal" for sparse X or d > 4000, else
            "kronecker"), "kronecker" (A ⊗ B + l2·I; needs the (d+1)×(d+1) Gram), "ekfac"
            (the Kronecker eigenbasis with per-pair eigenvalues) or "diagonal".
        max_cg_iter: most Hessian products per outer iteration.
        forcing_cap: upper bound of the forcing term (loose solves far from the optimum).
        forcing_exponent: η_k = ‖g‖^forcing_exponent near the optimum (0.5: superlinear).
        sufficient_decrease: Armijo constant of the line search.
        max_line_search: trial step lengths before the line search gives up.

    Raises:
        ValueError: on construction, for an unknown preconditioner or a value out of range.

    Example:
        Either preconditioner reaches the same optimum; the configuration is checked on
        construction:

        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
        >>> y = np.array([0, 0, 1, 2, 2, 0])
        >>> reference = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6)
        >>> solver = xj.NewtonCG(preconditioner="diagonal")
        >>> result = xj.fit_logistic_regression(X, y, 3, l2=0.1, tol=1e-6, solver=solver)
        >>> same = jnp.allclose(result.params[0], reference.params[0], atol=1e-5)
        >>> bool(result.converged), bool(same)
        (True, True)
        >>> xj.NewtonCG(max_cg_iter=0)
        Traceback (most recent call last):
        ...
        ValueError: max_cg_iter must be >= 1, got 0
    """

    preconditioner: str = "auto"
    max_cg_iter: int = 250
    forcing_cap: float = 0.5
    forcing_exponent: float = 0.5
    sufficient_decrease: float = 1e-4
    max_line_search: int = 30

    def __post_init__(self):
        check_cg_options(
            self.preconditioner, self.max_cg_iter, self.forcing_cap, self.forcing_exponent
        )
        check_line_search_options(self.sufficient_decrease, self.max_line_search)

    def inner_solve(
        self,
        objective: LogisticObjective,
        evaluation: Evaluation,
        basis: _preconditioners.FeatureBasis | None,
        tol: jax.Array,
    ) -> Step:
        """Preconditioned CG on H·Δ = −g to ‖HΔ + g‖ <= η‖g‖."""
        grad = evaluation.grad

        def matvec(tangent):
            return hessian_vector_product(objective, evaluation, tangent)

        solve = conjugate_gradient(
            matvec,
            -grad,
            _preconditioners.build(self.preconditioner, objective, evaluation, basis),
            rtol=forcing_term(grad, tol, self.forcing_cap, self.forcing_exponent),
            max_steps=min(self.max_cg_iter, max(objective.num_params, 1)),
        )
        # HΔ = −g − r, so ΔᵀHΔ = −Δᵀ(g + r) with no extra product.
        curvature = -jnp.vdot(solve.solution, grad + solve.residual)
        return Step(solve.solution, curvature, solve.n_steps)

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
        if basis is None:  # a regularisation path passes the one it computed once
            basis = _preconditioners.setup_basis(self.preconditioner, objective)

        def inner_solve(objective, evaluation):
            return self.inner_solve(objective, evaluation, basis, tol)

        return line_search_newton(
            objective,
            theta,
            inner_solve,
            tol=tol,
            max_iter=max_iter,
            sufficient_decrease=self.sufficient_decrease,
            max_line_search=self.max_line_search,
            verbose=verbose,
        )


jax.tree_util.register_dataclass(
    NewtonCG,
    data_fields=[],
    meta_fields=[
        "preconditioner",
        "max_cg_iter",
        "forcing_cap",
        "forcing_exponent",
        "sufficient_decrease",
        "max_line_search",
    ],
)
