"""Dense factorisations (eigh, Cholesky, LU solves) that never run batched on the CPU.

Under `jax.vmap` a LAPACK call gets a batch of matrices, and jaxlib's CPU kernels split a
batch estimated at more than 2·10⁵ flops (about one eigh of a 60 × 60 matrix) into tasks on
XLA's intra-op thread pool, then block the calling thread, itself a worker of that pool, until
the tasks are done. When two such calls run at once (a fit vmapped over cross-validation folds
computes independent factorisations, and `lax.cond` under `vmap` runs both branches), every
worker of a 2-core machine's pool can end up waiting for tasks that no worker is left to run:
the program hangs, with the CPU idle. Seen on a 2-core machine with jax 0.10.2: `jax.vmap` of
two eighs and a Cholesky of 200 × 200 matrices (batch 3) hung within 200 calls, and
`LogisticRegressionCV(Cs=5, cv=3)` on digits hung in its first fit in a fresh process.

The functions here are the `jax.numpy` ones with a `custom_vmap` rule: on the CPU a batch is
factorised one matrix at a time in a `lax.map` loop (a single matrix runs on the calling thread,
with nothing to wait for); on other platforms the batched call is kept. They are for the solvers'
factorisations, which are never differentiated in reverse mode (the fits differentiate their
optimality condition, see `_implicit`); forward mode works.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _unbatched_on_cpu(function: Callable) -> Callable:
    """`function` of single matrices, mapped one matrix at a time under `vmap` on the CPU."""

    @jax.custom_batching.custom_vmap
    def call(*args):
        return function(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        if not any(in_batched):
            # Forward mode batches the tangents alone (jax.jacfwd, jax.hessian): the rule is
            # asked for the unbatched primal. Calling `call` again here recursed without end.
            out = function(*args)
            return out, jax.tree.map(lambda _: False, out)
        args = tuple(
            arg if batched else jnp.broadcast_to(arg, (axis_size, *jnp.shape(arg)))
            for arg, batched in zip(args, in_batched, strict=True)
        )
        out = lax.platform_dependent(
            *args,
            cpu=lambda *batch: lax.map(lambda one: call(*one), batch),
            default=jax.vmap(function),
        )
        return out, jax.tree.map(lambda _: True, out)

    return call


eigh = _unbatched_on_cpu(jnp.linalg.eigh)
cholesky = _unbatched_on_cpu(jnp.linalg.cholesky)
solve = _unbatched_on_cpu(jnp.linalg.solve)


@_unbatched_on_cpu
def cholesky_solve(factor: jax.Array, rhs: jax.Array) -> jax.Array:
    """A⁻¹·b from the lower Cholesky factor L of A = L·Lᵀ (two triangular solves)."""
    return jax.scipy.linalg.cho_solve((factor, True), rhs)


def null_cutoff(size: int, num_rows: int, dtype) -> float:
    """The eigenvalue of a Jacobi-scaled Gram of `num_rows` rows below which it counts as 0.

    In units of the largest eigenvalue: d̃·√N·eps. Each entry of the scaled Gram, a sum of N
    products, carries rounding of order √N·eps (at most 1 in size, by Cauchy-Schwarz), and its
    eigenvalues as much again times d̃. An intercept beside a constant column gave a smallest
    eigenvalue of 4.6e-15 (float64, N = 300, d̃ = 7) where d̃·eps alone cut at 3.2e-15, and up
    to 2.6·√N·eps over N = 100 to 100,000 rows in both precisions. With `num_rows = 1`: d̃·eps,
    the cutoff wherever a direction is not then checked against X itself.
    """
    return size * math.sqrt(max(num_rows, 1)) * float(np.finfo(dtype).eps)


def jacobi_scaled(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(D·A·D, D) for a symmetric A [n, n], with D = diag(A)^(-1/2) (1 where diag(A) <= 0).

    D·A·D has a unit diagonal, so that rows and columns of very different scales (a feature
    1e8 times another) keep their digits through a factorisation, in float32 above all. The
    solvers factorise it wherever they factorise a Gram or a Hessian, and map back with D.
    """
    diagonal = jnp.diag(matrix)
    positive = diagonal > 0
    scale = jnp.where(positive, lax.rsqrt(jnp.where(positive, diagonal, 1)), 1)
    return matrix * scale[:, None] * scale[None, :], scale
