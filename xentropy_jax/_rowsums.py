"""Sums over rows in fixed-size chunks, so that per-row intermediates never exceed one chunk.

Inference needs sums such as Σᵢ (x̃ᵢx̃ᵢᵀ) ⊗ (diag sᵢ − sᵢsᵢᵀ) or Σᵢ gᵢgᵢᵀ whose natural
per-row factors are [N, P] arrays. Scanning over chunks of rows keeps the memory at
O(chunk·P + P²) while the work stays in large GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import sparse

from ._manual import fori_loop


def chunk_rows(num_params: int, budget_bytes: int = 1 << 26, itemsize: int = 8) -> int:
    """Rows per chunk such that a [chunk, num_params] array takes at most `budget_bytes`.

    Between 256 and 65,536 rows, a multiple of 256.
    """
    rows = budget_bytes // max(1, num_params * itemsize)
    return int(min(65536, max(256, rows - rows % 256)))


def row_chunk_sum(fn: Callable, arrays: tuple, chunk: int):
    """Σ over row chunks of `fn(*chunk_arrays)` (a pytree of arrays), traced once per shape.

    Args:
        fn: maps arrays whose leading axis is a chunk of rows to a pytree of partial sums.
        arrays: arrays sharing the leading (row) axis N.
        chunk: rows per chunk (static). The N − N mod chunk leading rows go through one loop
            over dynamic slices of the arrays themselves (a leading slice reshaped into chunks
            would copy nearly all of them when chunk does not divide N); the remaining rows
            through one more call.

    Returns:
        The pytree sum of `fn` over all chunks.
    """
    num_rows = arrays[0].shape[0]
    full = num_rows // chunk

    def part(start, size):
        return fn(*(lax.dynamic_slice_in_dim(a, start, size) for a in arrays))

    def add(total, start):
        return jax.tree.map(jnp.add, total, part(start, chunk))

    total = None
    if full:
        total = fori_loop(1, full, lambda index, total: add(total, index * chunk), part(0, chunk))
    if num_rows % chunk:
        tail = part(full * chunk, num_rows % chunk)
        total = tail if total is None else jax.tree.map(jnp.add, total, tail)
    return total


def normalized_weights(weights: jax.Array) -> jax.Array:
    """Row weights w ≥ 0 [N] divided by their sum, ŵ = w / Σw: 0 when Σw = 0, no overflow.

    Scaled by the largest weight first, by its square root twice: XLA's CPU division multiplies
    by the reciprocal, and 1/max is subnormal (flushed to 0) beyond 1/tiny (8.5e37 in
    float32). The barriers keep XLA from folding the divisions into one by max·Σw, whose
    overflow made every weight 0 (a fit of W = 0 reported as converged).
    """
    peak = jnp.max(weights, initial=0)
    # The guard inside the root: outside it, √0's infinite derivative made the derivative with
    # respect to all-zero weights NaN.
    root = jnp.sqrt(jnp.where(peak > 0, peak, 1))
    weights = lax.optimization_barrier(lax.optimization_barrier(weights / root) / root)
    total = jnp.sum(weights)
    # All zero: the empty mean, taken as 0, with a zero derivative as well.
    return jnp.where(total > 0, weights / jnp.where(total > 0, total, 1), 0)


def column_sums_by_chunks(
    fn: Callable, features: jax.Array | sparse.BCOO, values: jax.Array, chunk: int | None
) -> jax.Array:
    """fn(X, V) for X and per-row values V, summed over chunks of `chunk` rows of a dense X.

    `fn` maps rows and their values (weights [N], per-row curvatures [N, K]) to a sum over
    those rows (a Gram, column sums, the Hessian diagonal's (X ⊙ X)ᵀ·V). One call on all of X
    holds its [N, d]-sized intermediates (X̃ = [X, 1], ŵ ⊙ X̃, |X|, X ⊙ X): copies as large as
    X. By chunks they take O(chunk·d). With `chunk` None, a sparse X (whose products hold no
    such copy), or up to one chunk of rows, the result is the single call's, bit for bit.
    """
    if chunk is None or isinstance(features, sparse.BCOO) or features.shape[0] <= chunk:
        return fn(features, values)
    return row_chunk_sum(fn, (features, values), chunk)
