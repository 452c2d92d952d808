"""Sparse features at the public boundary: scipy.sparse and BCOO in, one BCOO layout out.

Sparse X is never densified. A scipy CSR/CSC/COO matrix (or array) becomes a
`jax.experimental.sparse.BCOO` with duplicates summed and its number of stored entries padded up
with explicit zeros to a coarse size bucket, so that fits on matrices with nearly the same
number of non-zeros (cross-validation folds, a path over C) share one compiled solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

# Stored entries are padded up to a multiple of 2^(bits − _BUCKET_BITS) of their count: at most
# 1/2^(_BUCKET_BITS − 1) ≈ 6% extra memory, and at most 2^_BUCKET_BITS sizes per power of two.
_BUCKET_BITS = 5


def is_scipy_sparse(X) -> bool:
    """Whether X is a scipy.sparse matrix or array (without importing scipy when absent)."""
    try:
        import scipy.sparse
    except ImportError:  # pragma: no cover - scipy comes with jax
        return False
    return scipy.sparse.issparse(X)


def is_sparse(X) -> bool:
    """Whether X is sparse input: a scipy.sparse matrix/array or a BCOO."""
    return isinstance(X, sparse.BCOO) or is_scipy_sparse(X)


def stored_values(X) -> np.ndarray | jax.Array:
    """The explicitly stored values of sparse X (what a finiteness check must look at)."""
    return X.data


def bucketed_size(count: int) -> int:
    """The padded number of stored entries for `count` non-zeros (at least 1)."""
    count = max(int(count), 1)
    step = 1 << max(count.bit_length() - _BUCKET_BITS, 0)
    return -(-count // step) * step


def to_bcoo(X, dtype) -> sparse.BCOO:
    """A canonical [N, d] BCOO of dtype `dtype`: duplicates summed, stored entries bucketed.

    The padding entries are explicit zeros at (0, 0), so every product is unchanged.
    """
    if isinstance(X, sparse.BCOO):
        matrix = X.sum_duplicates(nse=X.nse, remove_zeros=False)
        data, indices = np.asarray(matrix.data), np.asarray(matrix.indices)
        # sum_duplicates pads with out-of-range indices; drop them (zero data anyway).
        keep = np.all(indices < np.asarray(X.shape), axis=1)
        data, indices = data[keep], indices[keep]
    else:
        coo = X.tocoo(copy=True)
        coo.sum_duplicates()
        data = coo.data
        indices = np.stack([coo.row, coo.col], axis=1)
    size = bucketed_size(data.size)
    data = np.concatenate([np.asarray(data, dtype), np.zeros(size - data.size, dtype)])
    indices = np.concatenate(
        [np.asarray(indices, np.int32), np.zeros((size - len(indices), 2), np.int32)]
    )
    return sparse.BCOO((jnp.asarray(data), jnp.asarray(indices)), shape=tuple(X.shape))
