"""Preconditioned conjugate gradients: truncated (Newton-CG) and Steihaug (trust region).

Both solve H·s = −g approximately for a symmetric positive semidefinite operator H given only
as products, with a preconditioner M (see `_preconditioners`), starting from s = 0 so that every
iterate is a descent direction. Cost: one product H·d and one M⁻¹·r per iteration, plus O(P).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._preconditioners import Preconditioner

Operator = Callable[[jax.Array], jax.Array]


class CGResult(NamedTuple):
    """Outcome of a CG solve of H·s = rhs.

    Attributes:
        solution: [P] approximate solution s.
        residual: [P] rhs − H·s (kept up to date by the recurrence).
        n_steps: products with H taken.
        on_boundary: whether the trust-region boundary stopped the iteration (Steihaug only).
    """

    solution: jax.Array
    residual: jax.Array
    n_steps: jax.Array
    on_boundary: jax.Array


class _State(NamedTuple):
    solution: jax.Array
    residual: jax.Array
    preconditioned: jax.Array
    direction: jax.Array
    rho: jax.Array
    n_steps: jax.Array
    done: jax.Array
    on_boundary: jax.Array


def _init(rhs: jax.Array, preconditioner: Preconditioner) -> _State:
    preconditioned = preconditioner.solve(rhs)
    return _State(
        solution=jnp.zeros_like(rhs),
        residual=rhs,
        preconditioned=preconditioned,
        direction=preconditioned,
        rho=jnp.vdot(rhs, preconditioned),
        n_steps=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool),
        on_boundary=jnp.zeros((), bool),
    )


def _boundary_scale(
    solution: jax.Array, direction: jax.Array, metric: Preconditioner, radius: jax.Array
) -> jax.Array:
    """τ >= 0 with ‖s + τd‖_M = radius, in the cancellation-free form of liblinear's TRON."""
    metric_direction = metric.apply(direction)
    s_d = jnp.vdot(solution, metric_direction)
    s_s = jnp.vdot(solution, metric.apply(solution))
    d_d = jnp.vdot(direction, metric_direction)
    gap = jnp.maximum(radius**2 - s_s, 0)
    root = jnp.sqrt(s_d**2 + d_d * gap)
    safe_d_d = jnp.where(d_d > 0, d_d, 1)
    return jnp.where(
        s_d >= 0, gap / jnp.where(s_d + root > 0, s_d + root, 1), (root - s_d) / safe_d_d
    )


def conjugate_gradient(
    matvec: Operator,
    rhs: jax.Array,
    preconditioner: Preconditioner,
    *,
    rtol: jax.Array,
    max_steps: int,
    radius: jax.Array | None = None,
) -> CGResult:
    """Preconditioned CG on H·s = rhs, truncated at ‖rhs − H·s‖₂ <= rtol·‖rhs‖₂.

    With `radius`, this is Steihaug's CG in the trust region ‖s‖_M <= radius (M the
    preconditioner, as TRON): an iterate that leaves the region is pulled back to the boundary
    along its direction and the iteration stops; so does a direction of non-positive curvature.

    Args:
        matvec: v -> H·v for v [P].
        rhs: [P] right-hand side (−g for a Newton step).
        preconditioner: M ≈ H, symmetric positive definite; M⁻¹ is applied each iteration.
        rtol: relative tolerance on the residual (the forcing term of inexact Newton).
        max_steps: most products with H.
        radius: trust-region radius in the M-norm, or None for no region.

    Returns:
        A `CGResult`. Without a region, a direction of non-positive curvature at the first
        iteration returns the preconditioned steepest-descent direction M⁻¹·rhs.
    """
    threshold = rtol * jnp.linalg.norm(rhs)
    tiny = jnp.finfo(rhs.dtype).tiny

    def cond(state: _State) -> jax.Array:
        return ~state.done & (state.n_steps < max_steps)

    def body(state: _State) -> _State:
        product = matvec(state.direction)
        curvature = jnp.vdot(state.direction, product)
        positive = curvature > tiny
        step = state.rho / jnp.where(positive, curvature, 1)
        solution = state.solution + step * state.direction
        residual = state.residual - step * product
        # Non-positive curvature (only rounding can give it for a PSD H): stop; at the first
        # iteration fall back to the preconditioned steepest-descent direction.
        first = state.n_steps == 0
        fallback = jnp.where(first, state.direction, state.solution)
        fallback_residual = jnp.where(first, state.residual - product, state.residual)
        solution = jnp.where(positive, solution, fallback)
        residual = jnp.where(positive, residual, fallback_residual)
        stop = ~positive
        on_boundary = state.on_boundary
        if radius is not None:
            outside = jnp.vdot(solution, preconditioner.apply(solution)) > radius**2
            tau = _boundary_scale(state.solution, state.direction, preconditioner, radius)
            solution = jnp.where(outside, state.solution + tau * state.direction, solution)
            residual = jnp.where(outside, state.residual - tau * product, residual)
            on_boundary = outside
            stop = stop | outside
        preconditioned = preconditioner.solve(residual)
        rho = jnp.vdot(residual, preconditioned)
        beta = rho / jnp.where(state.rho > 0, state.rho, 1)
        direction = preconditioned + beta * state.direction
        stop = stop | (jnp.linalg.norm(residual) <= threshold)
        return _State(
            solution, residual, preconditioned, direction, rho, state.n_steps + 1, stop, on_boundary
        )

    state = _init(rhs, preconditioner)
    state = state._replace(done=jnp.linalg.norm(rhs) <= threshold)
    state = lax.while_loop(cond, body, state)
    return CGResult(state.solution, state.residual, state.n_steps, state.on_boundary)
