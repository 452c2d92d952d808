"""Row buckets: zero-weight rows that let nearby row counts share one compiled program.

Every sum of the objective and of the inference is weighted, so rows of weight 0 (zero
features, label 0) change no result. Padding to a few bucket sizes makes cross-validation
folds, learning curves and scikit-learn's checks, whose row counts differ by a few rows, run
one compiled program: up to `POWER_OF_TWO_ROWS` rows, to the next power of two (at least
`MIN_ROWS`; the extra rows cost next to nothing there); beyond, to the next number with
`MANTISSA_BITS` bits after the leading one (4 buckets per doubling: 5,120, 6,144, 7,168,
8,192, ...), at most 25% extra rows (about 10% on average). Above `POWER_OF_TWO_ROWS` the extra
rows cost time in every product, so the first row count a configuration meets runs exactly,
and only other row counts of the same configuration are padded (`fitted_rows`): repeat fits
on one data set pay nothing, a loop over sizes compiles one program more than the buckets.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import scipy.sparse

MIN_ROWS = 32
POWER_OF_TWO_ROWS = 1024
MANTISSA_BITS = 2

# The first row count of each configuration (see `fitted_rows`), for the most recent ones.
_MAX_CONFIGURATIONS = 64
_first_rows: OrderedDict[tuple, int] = OrderedDict()
_lock = threading.Lock()


def padded_rows(n_samples: int) -> int:
    """The bucket that `n_samples` rows are padded to, when they are padded."""
    if n_samples <= POWER_OF_TWO_ROWS:
        return max(MIN_ROWS, 1 << (n_samples - 1).bit_length())
    step = 1 << (n_samples.bit_length() - 1 - MANTISSA_BITS)
    return -(-n_samples // step) * step


def fitted_rows(n_samples: int, configuration: tuple) -> int:
    """The row count a program runs at: `n_samples` itself, or its bucket (`padded_rows`).

    Small row counts are always padded. Above `POWER_OF_TWO_ROWS`, the first row count seen
    for a configuration (everything else that selects a compiled program, as a hashable
    tuple) runs exactly, and any other row count of that configuration runs at its bucket.
    """
    if n_samples <= POWER_OF_TWO_ROWS:
        return padded_rows(n_samples)
    with _lock:
        first = _first_rows.setdefault(configuration, n_samples)
        _first_rows.move_to_end(configuration)
        while len(_first_rows) > _MAX_CONFIGURATIONS:
            _first_rows.popitem(last=False)
    return n_samples if n_samples == first else padded_rows(n_samples)


def pad_rows(n_rows: int, X, *row_arrays: np.ndarray) -> tuple:
    """(X, *row_arrays) with zero rows appended up to `n_rows` rows.

    X is a NumPy array or a scipy.sparse matrix (padded as CSR); each row array has the rows
    on its last axis (labels [N], weights [N], fold weights [splits, N]).
    """
    extra = n_rows - X.shape[0]
    if extra <= 0:
        return (X, *row_arrays)
    if scipy.sparse.issparse(X):
        padding = scipy.sparse.csr_matrix((extra, X.shape[1]), dtype=X.dtype)
        X = scipy.sparse.vstack([scipy.sparse.csr_matrix(X), padding], format="csr")
    else:
        X = np.concatenate([X, np.zeros((extra, *X.shape[1:]), X.dtype)])
    padded = tuple(
        np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, extra)]) for array in row_arrays
    )
    return (X, *padded)
