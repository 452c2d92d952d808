"""The `NewtonCG` solver: matrix-free truncated Newton with preconditioned CG and a line search."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .._cg import cg
from .._objective import Objective
from . import _preconditioners
from ._inner import check_cg_options, forcing_term, max_cg_steps
from ._linesearch import check_line_search_options, line_search_step
from ._loop import Iterate, SolverOutput, StepResult, run
from ._progress import Progress

# CG also stops once every entry of the linear model's next gradient, g + HΔ, is within this
# fraction of its parameter's tolerance: the step then meets the convergence test in the model.
# With per-parameter tolerances (the precision floor) a 2-norm target set by the smallest can sit
# below the rounding of the products in the largest entries; in float32 CG then ran to its cap.
_ENTRY_FRACTION = 0.1


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
        preconditioner: "auto" (default: what the objective prefers; for logistic
            regression "diagonal" for sparse X or d > 4000, else "kronecker"), "kronecker"
            (A ⊗ B + l2·I; needs the (d+1)×(d+1) Gram), "ekfac" (the Kronecker eigenbasis
            with per-pair eigenvalues), "diagonal" (Jacobi) or "none".
        max_cg_iter: most Hessian products per outer iteration.
        forcing_cap: upper bound of the forcing term (loose solves far from the optimum).
        forcing_exponent: η_k = ‖g‖^forcing_exponent near the optimum (0.5: superlinear).
        sufficient_decrease: Armijo constant of the line search.
        max_line_search: trial step lengths before the line search gives up.
        product_dtype: None (default) computes CG's Hessian products in the objective's dtype;
            "float32" computes them in float32 for float64 data (mixed precision): the data
            are cast once per fit (an extra [N, d] float32 copy of X), each product runs its
            two GEMMs at float32 speed, and everything that decides the answer stays float64:
            the value, the gradient, the line search, the stopping test and the CG vectors.
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
        ValueError: max_cg_iter must be >= 1, got 0
    """

    preconditioner: str = "auto"
    max_cg_iter: int = 250
    forcing_cap: float = 0.5
    forcing_exponent: float = 0.5
    sufficient_decrease: float = 1e-4
    max_line_search: int = 30
    product_dtype: str | None = None

    def __post_init__(self):
        check_cg_options(
            self.preconditioner, self.max_cg_iter, self.forcing_cap, self.forcing_exponent
        )
        check_line_search_options(self.sufficient_decrease, self.max_line_search)
        if self.product_dtype not in (None, "float32"):
            raise ValueError(f"product_dtype must be None or 'float32', got {self.product_dtype!r}")

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
        (`_ENTRY_FRACTION`), whichever comes first.

        `basis` is the preconditioner's once-per-fit setup (`_preconditioners.setup_basis`);
        `products` the objective whose Hessian products CG uses (`product_objective`; None: the
        objective itself).
        """
        evaluation = point.evaluation
        grad = evaluation.grad
        metric = _preconditioners.build(self.preconditioner, objective, evaluation, basis)
        solve = cg(
            _product_operator(objective, products, evaluation),
            -grad,
            preconditioner=metric.solve,
            rtol=forcing_term(grad, tol, self.forcing_cap, self.forcing_exponent),
            max_steps=max_cg_steps(self.max_cg_iter, objective.num_params),
            entry_tol=_ENTRY_FRACTION * jnp.broadcast_to(tol, grad.shape).astype(grad.dtype),
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


def _cast_floating(tree, dtype):
    """`tree` with every floating leaf cast to `dtype` (integer leaves, as labels, unchanged)."""

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, tree)


def product_objective(objective: Objective, product_dtype: str | None) -> Objective | None:
    """The objective with its floating data in `product_dtype`, or None when that is its own.

    Generic over pytree objectives: every floating leaf (for logistic regression X, or a
    BCOO's stored values, the row weights and l2) is cast; the Hessian product is the same
    code in the narrower type. None as well when the cast leaves the objective's dtype unchanged,
    as for `fit_logistic_regression_streamed`, whose chunks are read in the source's dtype.

    Raises:
        TypeError: the objective is not a pytree, so its arrays cannot be found.
    """
    if product_dtype is None or jnp.dtype(product_dtype) == jnp.dtype(objective.dtype):
        return None
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(objective)):
        raise TypeError(
            f"product_dtype={product_dtype!r} casts the objective's arrays, so the objective "
            f"must be a pytree (e.g. a jax.tree_util.register_dataclass); got a "
            f"{type(objective).__name__} that is not one"
        )
    products = _cast_floating(objective, jnp.dtype(product_dtype))
    # An objective whose data do not live in its leaves (the streamed fit's chunks arrive in
    # their source's dtype) keeps its own products.
    return products if jnp.dtype(products.dtype) == jnp.dtype(product_dtype) else None


def _product_operator(objective: Objective, products: Objective | None, evaluation):
    """The operator v ↦ H·v at `evaluation`, computed by `products` (in its dtype) if given."""
    if products is None:
        return lambda tangent: objective.hessian_product(evaluation, tangent)
    low = _cast_floating(evaluation, products.dtype)  # XLA drops the fields never read
    return lambda tangent: products.hessian_product(low, tangent.astype(products.dtype)).astype(
        objective.dtype
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
