"""The `NewtonCG` solver: matrix-free truncated Newton with preconditioned CG and a line search."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._cg import plain_cg
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
from ._linesearch import check_line_search_options, line_search_step
from ._loop import Iterate, SolverOutput, StepResult, run
from ._progress import Progress


@dataclasses.dataclass(frozen=True)
class NewtonCG:
    """Truncated Newton: CG on H·Δ = −g to a relative residual η_k, then a line search.

    H is never formed: each CG iteration is one closed-form Hessian product (two GEMMs with
    X, O(N·K) in between) reusing the probabilities of the outer iteration. CG is preconditioned
    by the Kronecker factorisation A ⊗ B + l2·I of H (A the weighted feature Gram, formed once
    per fit, B the mean class curvature, or its diagonal from 100 classes on without a
    reference class) or by the exact Hessian diagonal (one GEMM with X² per outer iteration).
    The forcing sequence η_k = min(forcing_cap, ‖g‖^forcing_exponent) makes the convergence
    superlinear (Eisenstat and Walker; Nocedal and Wright, section 7.1).

    Attributes:
        preconditioner: "auto" (default: what the objective prefers; for logistic
            regression "diagonal" for sparse X or d > 4000, else "kronecker"), "kronecker"
            (A ⊗ B + l2·I; needs the (d+1)×(d+1) Gram), "ekfac" (the Kronecker eigenbasis
            with per-pair eigenvalues), "diagonal" (Jacobi) or "none".
        max_cg_iter: most Hessian products per outer iteration.
        forcing_cap: upper bound of the forcing term (loose solves far from the optimum).
        forcing_exponent: η_k = ‖g‖^forcing_exponent near the optimum (superlinear, of
            order 1 + forcing_exponent). The default 0.25 asks for looser solves than the
            classical 0.5: it measured about half the Hessian products on many-class
            problems, and one to three more outer iterations on easy ones (docs/solvers.md).
        sufficient_decrease: Armijo constant of the line search.
        max_line_search: trial step lengths before the line search gives up.
        product_dtype: None (default) computes CG's Hessian products in the objective's dtype;
            "float32" computes them in float32 for float64 data (mixed precision): the data
            are cast once per fit (an extra [N, d] float32 copy of X), each product runs its
            two GEMMs at float32 speed (and the preconditioner's per-iteration factors, such as
            the class curvature, are computed in float32), and everything that decides the
            answer stays float64: the value, the gradient, the line search, the stopping test
            and the CG vectors.
            The products only steer the Newton direction, whose CG solve is inexact by design
            (relative residual η_k, usually 1e-1 to 1e-4, against float32's rounding of 6e-8),
            so the fit reaches the same float64 optimum; the step and product counts may
            differ (more at tight tolerances on ill-conditioned data, see docs/solvers.md). No
            effect on float32 data, nor in `fit_logistic_regression_streamed` (its chunks are
            read as they are stored).

    Raises:
        ValueError: on construction, for an unknown preconditioner, product dtype or a value
            out of range.

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
        ValueError: max_cg_iter must be an integer >= 1, got 0
    """

    preconditioner: str = "auto"
    max_cg_iter: int = 250
    forcing_cap: float = FORCING_CAP
    forcing_exponent: float = FORCING_EXPONENT
    sufficient_decrease: float = 1e-4
    max_line_search: int = 30
    product_dtype: str | None = None

    def __post_init__(self):
        check_cg_options(
            self.preconditioner, self.max_cg_iter, self.forcing_cap, self.forcing_exponent
        )
        check_line_search_options(self.sufficient_decrease, self.max_line_search)
        check_product_dtype(self.product_dtype)

    def step(
        self,
        objective: Objective,
        point: Iterate,
        basis,
        tol: jax.Array,
        carry=(),
        products: Objective | None = None,
    ) -> StepResult:
        """One iteration: preconditioned CG on H·Δ = −g, then a line search.

        CG stops at ‖HΔ + g‖ <= η‖g‖ or once every |(HΔ + g)_j| <= tol_j / 10
        (`entry_tolerance`), whichever comes first.

        `basis` is the preconditioner's once-per-fit setup (`_preconditioners.setup_basis`);
        `products` the objective whose Hessian products CG uses (`product_objective`; None: the
        objective itself).
        """
        evaluation = point.evaluation
        grad = evaluation.grad
        metric = preconditioner_at(self.preconditioner, objective, products, evaluation, basis)
        solve = plain_cg(
            product_operator(objective, products, evaluation),
            -grad,
            preconditioner=metric.solve,
            rtol=forcing_term(grad, tol, self.forcing_cap, self.forcing_exponent),
            max_steps=max_cg_steps(self.max_cg_iter, objective.num_params),
            entry_tol=entry_tolerance(grad, tol),
            verify=False,
        )
        # HΔ = −g − r, so ΔᵀHΔ = −Δᵀ(g + r) with no extra product. A first CG direction of
        # zero curvature (rounding only, H is PSD) leaves Δ = 0: no decrease, a failed step.
        curvature = -jnp.vdot(solve.solution, grad + solve.residual)
        result = line_search_step(
            objective,
            point,
            solve.solution,
            curvature,
            solve.num_steps,
            sufficient_decrease=self.sufficient_decrease,
            max_line_search=self.max_line_search,
        )
        return result._replace(report={"cg": solve.num_steps, **result.report})

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
        """Minimise `objective` from θ [P].

        Args:
            objective: any `Objective` (the "diagonal" preconditioner needs its optional
                `hessian_diagonal`, the Kronecker ones its Kronecker factors).
            theta: [P] initial point.
            tol: scalar or [P] tolerance: stop when |g| <= tol and ½ΔᵀHΔ <= max(tol).
            max_iter: most iterations.
            verbose: print a line per iteration (loss, max|g|, CG products, step length,
                decrement, time).
            basis: the preconditioner's setup, when already computed (a regularisation path
                computes it once for all its fits).

        Returns:
            A `SolverOutput` (theta, evaluation, n_iter, status, n_hessian_products).
        """
        if basis is None:
            basis = _preconditioners.setup_basis(self.preconditioner, objective)
        products = product_objective(objective, self.product_dtype)  # once, before the loop
        progress = None
        if verbose:
            progress = Progress("cg {cg:3d}  step {step:.3g}  decrement {decrement:.3e}")
        return run(
            objective,
            theta,
            lambda point, carry: self.step(objective, point, basis, tol, carry, products),
            (),
            tol=tol,
            max_iter=max_iter,
            progress=progress,
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
        "product_dtype",
    ],
)
