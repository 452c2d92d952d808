"""The inner CG solve shared by `NewtonCG` and `TrustRegion`: options and forcing term."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _preconditioners

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


def max_cg_steps(max_cg_iter: int, num_params: int) -> int:
    """At most `max_cg_iter` products, and never more than the P that exact CG needs."""
    return min(max_cg_iter, max(num_params, 1))
