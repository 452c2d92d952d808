"""The inner CG solve shared by `NewtonCG` and `TrustRegion`: options, stops, products, M."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from .._objective import Objective
from . import _preconditioners

# The inner solve never aims below this fraction of tol on the residual: the next gradient is
# ≈ the residual, so solving further cannot make the fit converge sooner.
_TOL_FRACTION = 0.1

# The forcing term's defaults, shared by NewtonCG and TrustRegion: η = min(0.5, ‖g‖^¼). The
# exponent ¼ replaced ½, which asked for tighter solves than the outer iterations needed
# (docs/solvers.md has the measurements).
FORCING_CAP = 0.5
FORCING_EXPONENT = 0.25


def forcing_term(grad: jax.Array, tol: jax.Array, cap: float, exponent: float) -> jax.Array:
    """Inexact-Newton forcing term η = min(cap, max(‖g‖₂^exponent, 0.1·tol/‖g‖₂)).

    ‖g‖^exponent (any exponent > 0) gives superlinear convergence; the second term stops the last
    solves from going far beyond what `tol` asks of the next gradient (per-parameter
    tolerances [P] count by their smallest).
    """
    norm = jnp.linalg.norm(grad)
    enough = _TOL_FRACTION * jnp.min(tol) / jnp.where(norm > 0, norm, 1)
    return jnp.minimum(cap, jnp.maximum(norm**exponent, enough))


# CG also stops once every entry of the linear model's next gradient, g + HΔ, is within this
# fraction of its parameter's tolerance: the step then meets the convergence test in the model.
# With per-parameter tolerances (the precision floor) a 2-norm target set by the smallest can sit
# below the rounding of the products in the largest entries; in float32 CG then ran to its cap.
_ENTRY_FRACTION = 0.1


def entry_tolerance(grad: jax.Array, tol: jax.Array) -> jax.Array:
    """CG's per-entry residual tolerances [P]: `_ENTRY_FRACTION` of each parameter's `tol`."""
    return _ENTRY_FRACTION * jnp.broadcast_to(tol, grad.shape).astype(grad.dtype)


def check_cg_options(
    preconditioner: str, max_cg_iter: int, forcing_cap: float, forcing_exponent: float
) -> None:
    """Raise ValueError for an unknown preconditioner or a CG option out of range."""
    if preconditioner not in _preconditioners.KINDS:
        raise ValueError(
            f"preconditioner must be one of {_preconditioners.KINDS}, got {preconditioner!r}"
        )
    if not (isinstance(max_cg_iter, numbers.Integral) and max_cg_iter >= 1):
        raise ValueError(f"max_cg_iter must be an integer >= 1, got {max_cg_iter!r}")
    if not 0 < forcing_cap < 1:
        raise ValueError(f"forcing_cap must be in (0, 1), got {forcing_cap}")
    if not 0 <= forcing_exponent < math.inf:  # NaN too
        raise ValueError(f"forcing_exponent must be finite and >= 0, got {forcing_exponent}")


def max_cg_steps(max_cg_iter: int, num_params: int) -> int:
    """At most `max_cg_iter` products, and never more than the P that exact CG needs.

    Uncapped, an unpreconditioned fit of columns scaled 1e3 and 1e-3 (P = 6) converged where
    capped it stops at MAX_ITER; but float32 fits with a class of zero weight went from 12 of
    12 CONVERGED to 3, and ill-conditioned float32 fits took up to 13x the products: kept.
    """
    return min(max_cg_iter, max(num_params, 1))


def check_product_dtype(product_dtype: str | None) -> None:
    """Raise ValueError unless `product_dtype` is None or "float32"."""
    if product_dtype not in (None, "float32"):
        raise ValueError(f"product_dtype must be None or 'float32', got {product_dtype!r}")


def _cast_floating(tree, dtype):
    """`tree` with every floating leaf cast to `dtype` (integer leaves, as labels, unchanged)."""

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree.map(cast, tree)


def product_objective(objective: Objective, product_dtype: str | None) -> Objective | None:
    """The objective with its floating data in `product_dtype`, or None when that is its own.

    Generic over pytree objectives: every floating leaf (for logistic regression X, or a
    BCOO's stored values, the row weights and l2) is cast, or the objective's own
    ``astype(dtype)`` says how; the Hessian product is the same code in the narrower type.
    None as well when the cast leaves the objective's dtype unchanged, as for
    `fit_logistic_regression_streamed`, whose chunks are read in the source's dtype.

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
    # An objective may say how it is cast (`LogisticObjective.astype` drops what only its own
    # dtype uses); otherwise every floating leaf is.
    astype = getattr(objective, "astype", None)
    if callable(astype):
        products = astype(jnp.dtype(product_dtype))
    else:
        products = _cast_floating(objective, jnp.dtype(product_dtype))
    # An objective whose data do not live in its leaves (the streamed fit's chunks arrive in
    # their source's dtype) keeps its own products.
    return products if jnp.dtype(products.dtype) == jnp.dtype(product_dtype) else None


def product_operator(objective: Objective, products: Objective | None, evaluation):
    """The operator v ↦ H·v at `evaluation`, computed by `products` (in its dtype) if given."""
    if products is None:
        return lambda tangent: objective.hessian_product(evaluation, tangent)
    low = _cast_floating(evaluation, products.dtype)  # XLA drops the fields never read
    return lambda tangent: products.hessian_product(low, tangent.astype(products.dtype)).astype(
        objective.dtype
    )


def preconditioner_at(
    kind: str,
    objective: Objective,
    products: Objective | None,
    evaluation,
    basis,
    mix: float = 1.0,
) -> _preconditioners.Preconditioner:
    """The preconditioner at `evaluation`, its per-iteration factors from `products` if given.

    Like the products, the preconditioner only steers CG, so with `product_dtype="float32"` its
    per-iteration work runs in float32 too: the class curvature B (an N·K² GEMM, the bulk of
    that work at many classes: 0.91 s in float64 against 0.23 s in float32 at N = 50,000,
    K = 1,000, where a float32 Hessian product takes 0.37 s; O(N·K) where `class_curvature`
    gives B's diagonal) and its eigendecomposition, or the Hessian diagonal.
    The once-per-fit basis stays as computed; CG's vectors stay in the objective's dtype (the
    maps promote them).
    """
    if products is None:
        return _preconditioners.build(kind, objective, evaluation, basis, mix)
    low = _cast_floating(evaluation, products.dtype)
    return _preconditioners.build(kind, products, low, basis, mix)
