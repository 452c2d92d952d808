"""The logistic objective over rows streamed in chunks: X never sits in memory at once.

`StreamedLogisticObjective` implements the `Objective` protocol on top of `LogisticObjective`:
every method is one pass over the chunks, each chunk read from the host through a
`jax.pure_callback` inside the compiled loop, and handed to the in-memory objective's functions.
The chunks come from a `RowChunks` (slices of arrays sliceable by rows: a memory-mapped ``.npy``
file, an HDF5 or zarr dataset) or an `IteratedChunks` (a fresh iterator of row chunks per pass,
padded to the longest chunk with zero-weight rows).
The probabilities of the current iterate are recomputed per chunk instead of being stored, so
memory is O(chunk_rows·(d + K) + P), whatever N is:

* `evaluate` (loss, gradient and the separation certificate): one pass;
* `hessian_product` (one CG step): one pass, with the probabilities recomputed;
* `loss_change` (one line-search trial or trust-region test): one pass;
* the preconditioners: `hessian_diagonal` one pass per outer iteration, or, for "kronecker",
  `feature_gram` one pass per fit and `class_curvature` one pass per outer iteration.

The penalty (l2/2)·‖W‖² is added once, outside the chunks; each chunk's rows carry their weights
divided by the total weight of all rows, so that the sums over chunks are the in-memory
objective's sums exactly (up to the order of additions).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._linear import (
    Evaluation,
    LogisticObjective,
    auto_preconditioner,
    class_curvature,
    diagonal_class_curvature,
    evaluate,
    feature_gram,
    hessian,
    hessian_diagonal,
    hessian_vector_product,
    loss_change,
    separated,
)

# The sources of the fits running now, by token. A compiled fit depends only on its source's
# `ChunkLayout` and receives the token as an argument, so that a new data object of the same
# layout reuses the program, and nothing compiled keeps the data alive.
_live_sources: dict[int, _ChunkSource] = {}
_tokens = itertools.count()
_live_lock = threading.Lock()


def hold(source: _ChunkSource) -> int:
    """Register `source` for the compiled loop's reads; returns its token."""
    with _live_lock:
        token = next(_tokens)
        _live_sources[token] = source
    return token


def release(token: int) -> None:
    """Drop the source of `token` (after its fit has run)."""
    with _live_lock:
        _live_sources.pop(token, None)


def _read(token, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host callback: chunk `index` of the source registered as `token`."""
    with _live_lock:
        source = _live_sources.get(int(token))
    if source is None:
        raise RuntimeError(
            "the data of this streamed fit are no longer held: a compiled program ran after "
            "fit_logistic_regression_streamed returned. Call the fit itself again."
        )
    return source.read(int(index))


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """What the compiled loop knows of a source: the padded chunk shapes, how many, the dtype."""

    num_features: int
    chunk_rows: int
    num_chunks: int
    dtype: np.dtype

    def shapes(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        rows, d = self.chunk_rows, self.num_features
        return (
            jax.ShapeDtypeStruct((rows, d), self.dtype),
            jax.ShapeDtypeStruct((rows,), np.int32),
            jax.ShapeDtypeStruct((rows,), self.dtype),
        )


def dense_rows(X) -> np.ndarray:
    """A chunk of rows as a dense NumPy array (a SciPy sparse matrix or a BCOO is densified)."""
    if hasattr(X, "toarray"):  # SciPy sparse
        return np.asarray(X.toarray())
    if hasattr(X, "todense") and hasattr(X, "indices"):  # jax.experimental.sparse.BCOO
        return np.asarray(X.todense())
    return np.asarray(X)


def _shifted(values: np.ndarray, shift: int) -> np.ndarray:
    """``values·2**shift`` in float64, exact for subnormal float32 or float64 values too.

    The chunk reads run on XLA's threads, which treat subnormal operands as zero: there
    ``np.ldexp`` (and a conversion to float64) of weights of 1e-310 gave 0, and a fit whose
    every weight was subnormal returned all-zero coefficients marked CONVERGED. A subnormal's
    bits are its integer mantissa m, worth m·2**(emin − mantissa bits): m converts exactly.
    """
    if values.dtype not in (np.float32, np.float64):
        return np.ldexp(values.astype(np.float64), shift)
    info = np.finfo(values.dtype)
    bits = values.view(np.uint32 if values.dtype == np.float32 else np.uint64)
    mantissa_bits = info.nmant
    exponent = (bits >> mantissa_bits) & ((1 << (info.bits - 1 - mantissa_bits)) - 1)
    mantissa = (bits & ((1 << mantissa_bits) - 1)).astype(np.float64)
    sign = np.where(bits >> (info.bits - 1) != 0, -1.0, 1.0)
    tiny = sign * np.ldexp(mantissa, shift + info.minexp - mantissa_bits)
    return np.where(exponent == 0, tiny, np.ldexp(values.astype(np.float64), shift))


class _ChunkSource:
    """What the compiled loop asks of a source: fixed chunk shapes, chunk `index` on the host.

    Subclasses set num_rows, num_features, chunk_rows, num_chunks and dtype, and implement
    `rows` (chunk `index`, zero-padded to `chunk_rows`) and `checked` (one pass of the raw
    chunks, for the input checks). A compiled fit sees only its `layout` (and reads through
    `hold`'s token); the source counts the chunks it has read (`passes` = reads / chunks).
    """

    num_rows: int
    num_features: int
    chunk_rows: int
    num_chunks: int
    dtype: np.dtype
    # Every chunk's weights are multiplied by 2**weight_shift (in float64) before they take the
    # chunks' dtype, set by the checking pass: the largest weight becomes one in [1, 2), so that
    # neither the weights nor their sum overflow, as in the in-memory fit. A shift, not a factor:
    # the factor may be subnormal, and the callback runs on XLA's threads, which flush those.
    weight_shift: int = 0

    def __init__(self) -> None:
        self.reads = 0
        self.failure: BaseException | None = None  # what a read raised, for the fit to re-raise
        self._lock = threading.Lock()

    @property
    def passes(self) -> float:
        """Full passes over the rows read so far."""
        return self.reads / self.num_chunks

    def _padded(self, X, labels, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One chunk of m <= chunk_rows rows, followed by chunk_rows − m rows of weight 0."""
        rows = len(labels)
        padded_X = np.zeros((self.chunk_rows, self.num_features), self.dtype)
        padded_labels = np.zeros(self.chunk_rows, np.int32)
        padded_weights = np.zeros(self.chunk_rows, self.dtype)
        padded_X[:rows] = dense_rows(X)
        padded_labels[:rows] = labels
        padded_weights[:rows] = (
            np.ldexp(1.0, self.weight_shift)
            if weights is None
            else _shifted(np.asarray(weights), self.weight_shift)
        )
        return padded_X, padded_labels, padded_weights

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk `index` on the host: X [chunk_rows, d], labels, weights (zero-padded)."""
        raise NotImplementedError

    def checked(self):
        """One pass over the raw chunks: (first row, X, labels, weights or None) on the host."""
        raise NotImplementedError

    def read(self, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`rows` for the host callback, counting the read.

        An error is kept in `failure`: in the callback XLA wraps it in a `JaxRuntimeError`, and
        the fit raises the original (a `ValueError` for chunks that changed) instead.
        """
        with self._lock:
            self.reads += 1
        try:
            return self.rows(int(index))
        except BaseException as error:  # KeyboardInterrupt in a generator too
            self.failure = error
            raise

    @property
    def layout(self) -> ChunkLayout:
        return ChunkLayout(self.num_features, self.chunk_rows, self.num_chunks, self.dtype)


class RowChunks(_ChunkSource):
    """Rows of (X, labels, weights) sliced `chunk_rows` at a time, the last chunk zero-padded.

    X may be sparse (a SciPy CSR matrix): each chunk is densified when it is read.
    """

    def __init__(self, X, labels, weights, chunk_rows: int, dtype) -> None:
        super().__init__()
        self.X, self.labels, self.weights = X, labels, weights
        self.num_rows, self.num_features = X.shape
        self.chunk_rows = int(min(chunk_rows, self.num_rows))
        self.num_chunks = -(-self.num_rows // self.chunk_rows)
        self.dtype = np.dtype(dtype)

    def _slice(self, index: int) -> tuple[int, slice]:
        start = index * self.chunk_rows
        return start, slice(start, min(start + self.chunk_rows, self.num_rows))

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, rows = self._slice(index)
        weights = None if self.weights is None else self.weights[rows]
        return self._padded(self.X[rows], self.labels[rows], weights)

    def checked(self):
        for index in range(self.num_chunks):
            start, rows = self._slice(index)
            weights = None if self.weights is None else np.asarray(self.weights[rows])
            yield start, dense_rows(self.X[rows]), np.asarray(self.labels[rows]), weights


# What `next` returns from an iterator that has no chunk left.
_EXHAUSTED = object()

# Iterators over the chunks of one source kept open at once (passes that overlap in time).
_MAX_OPEN_PASSES = 4


def is_chunk_iterable(X: Any) -> bool:
    """Whether X is a source of chunks (a function returning an iterator, or an iterable).

    Anything with a `shape` is an array sliceable by rows instead.
    """
    if hasattr(X, "shape"):
        return False
    return callable(X) or isinstance(X, collections.abc.Iterable)


class IteratedChunks(_ChunkSource):
    """Row chunks (X_c, labels_c) or (X_c, labels_c, weights_c) from a fresh iterator per pass.

    `chunks` is a function returning a new iterator over the chunks (such as a generator
    function), or an iterable that starts over each time it is iterated (a list, a tuple, an
    object with `__iter__`). A one-shot iterator is refused: a Newton fit reads the data many
    times. The layout (number of chunks, their lengths, d, dtype) is learnt by the checking pass
    (`checked`); every later pass must give the same chunks. The compiled chunk is as long as
    the longest chunk, and shorter chunks are padded with rows of weight 0.

    Chunks are asked for in order within a pass; passes that overlap in time each get their own
    iterator (a few are kept open), and a chunk asked for out of order is reached by skipping.
    """

    def __init__(self, chunks, x64: bool) -> None:
        super().__init__()
        if not callable(chunks) and iter(chunks) is chunks:
            raise TypeError(
                "the chunks are a one-shot iterator (a generator, or iter(...)), but a fit reads "
                "the data once per gradient, per Hessian product and per line-search trial. Pass "
                "a function that returns a fresh iterator each time it is called (the generator "
                "function itself, or e.g. `lambda: read_chunks(paths)`), or a list of chunks."
            )
        self.chunks = chunks
        self._x64 = x64
        self.lengths: tuple[int, ...] = ()
        self._open: list[list] = []

    def _fresh(self):
        iterator = self.chunks() if callable(self.chunks) else iter(self.chunks)
        try:
            return iter(iterator)
        except TypeError:
            raise TypeError(
                f"the chunk function returned {type(iterator).__name__}, not an iterator"
            ) from None

    def _unpack(self, item, index: int):
        if not (isinstance(item, tuple | list) and len(item) in (2, 3)):
            raise TypeError(
                f"chunk {index} is {type(item).__name__}: each chunk must be a tuple "
                "(X_chunk, labels_chunk) or (X_chunk, labels_chunk, weights_chunk)"
            )
        X, labels = dense_rows(item[0]), np.asarray(item[1])
        weights = None if len(item) == 2 or item[2] is None else np.asarray(item[2])
        if X.ndim != 2 or X.shape[0] < 1:
            raise ValueError(f"chunk {index}: X must be 2-D with rows, got shape {X.shape}")
        if labels.shape != (X.shape[0],) or (weights is not None and weights.shape != labels.shape):
            raise ValueError(
                f"chunk {index}: labels (and weights) must have shape ({X.shape[0]},) to match "
                f"its X, got {labels.shape}" + ("" if weights is None else f" and {weights.shape}")
            )
        return X, labels, weights

    def checked(self):
        lengths, start = [], 0
        for index, item in enumerate(self._fresh()):
            X, labels, weights = self._unpack(item, index)
            if index == 0:
                self.num_features = X.shape[1]
                self.dtype = np.dtype(np.float32)
            elif X.shape[1] != self.num_features:
                raise ValueError(
                    f"chunk {index} has {X.shape[1]} columns, chunk 0 has {self.num_features}"
                )
            # Float64 if any chunk is (with x64 on), as the chunks' concatenation would be: the
            # first chunk's dtype alone fitted float64 chunks after a float32 one in float32,
            # CONVERGED 1.3e-7 from the in-memory fit. Chunks checked before were float32, which
            # the wider dtype holds exactly.
            if self._x64 and X.dtype == np.float64:
                self.dtype = np.dtype(np.float64)
            lengths.append(X.shape[0])
            yield start, X, labels, weights
            start += X.shape[0]
        if not lengths:
            raise ValueError("the chunks are empty: no rows to fit")
        self.lengths = tuple(lengths)
        self.num_rows, self.num_chunks, self.chunk_rows = start, len(lengths), max(lengths)

    def _next(self, index: int):
        """Chunk `index` from an open iterator standing at it, else from a new one."""
        at = [entry for entry in self._open if entry[0] <= index]
        if at:
            entry = max(at, key=lambda entry: entry[0])
        else:
            entry = [0, self._fresh()]
            self._open.append(entry)
            del self._open[:-_MAX_OPEN_PASSES]
        try:
            while True:
                item = next(entry[1])
                entry[0] += 1
                if entry[0] > index:
                    break
        except StopIteration:
            self._open.remove(entry)
            raise ValueError(
                f"the chunks ran out before chunk {index} of {self.num_chunks}: every pass must "
                "give the same chunks as the first (a function returning a fresh iterator, or a "
                "re-iterable)"
            ) from None
        if entry[0] == self.num_chunks:
            self._open.remove(entry)
            # A pass that gives more chunks than the first was fitted on the first's alone
            # (CONVERGED on part of the data); fewer are caught above.
            if next(entry[1], _EXHAUSTED) is not _EXHAUSTED:
                raise ValueError(
                    f"the chunks ran on past the {self.num_chunks} of the first pass: every pass "
                    "must give the same chunks as the first"
                )
        return item

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            X, labels, weights = self._unpack(self._next(index), index)
        if X.shape != (self.lengths[index], self.num_features):
            raise ValueError(
                f"chunk {index} has shape {X.shape} in this pass but had "
                f"{(self.lengths[index], self.num_features)} in the first: every pass must give "
                "the same chunks"
            )
        return self._padded(X, labels, weights)


class StreamedEvaluation(NamedTuple):
    """What one pass at θ computes: loss, gradient, and the separation certificate.

    θ itself is kept: every later pass recomputes the chunks' probabilities from it.
    """

    loss: jax.Array
    grad: jax.Array
    theta: jax.Array
    separated: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StreamedLogisticObjective:
    """The penalised multinomial logistic objective of `LogisticObjective`, rows in chunks.

    Attributes:
        l2: scalar L2 strength on W.
        total_weight: Σ w over every row, the weights as the chunks give them (times the
            source's 2**weight_shift): each chunk's weights are divided by it.
        token: int32 scalar, the `hold` token of the `RowChunks` or `IteratedChunks` to read.
        chunks: that source's `ChunkLayout` (static).
        num_classes, fit_intercept, reference_class: as `LogisticObjective` (static).
        shift: [d] the weighted column means, for `centred_feature_gram` (None: not centred).
        dominant_shift: [d] those of the columns whose mean dominates their spread, for
            `feature_shift(dominant=True)` (`centring_shift`).
    """

    l2: jax.Array
    total_weight: jax.Array
    token: jax.Array
    chunks: ChunkLayout = dataclasses.field(metadata={"static": True})
    num_classes: int = dataclasses.field(metadata={"static": True})
    fit_intercept: bool = dataclasses.field(default=True, metadata={"static": True})
    reference_class: bool = dataclasses.field(default=False, metadata={"static": True})
    shift: jax.Array | None = None
    dominant_shift: jax.Array | None = None

    # The in-memory objective of one chunk (no penalty: it is added once, here).

    def _chunk(self, index: jax.Array) -> LogisticObjective:
        X, labels, weights = jax.pure_callback(
            _read, self.chunks.shapes(), self.token, index, vmap_method="sequential"
        )
        return LogisticObjective(
            features=X,
            labels=labels,
            weights=weights / self.total_weight,
            l2=jnp.zeros((), X.dtype),
            num_classes=self.num_classes,
            fit_intercept=self.fit_intercept,
            reference_class=self.reference_class,
        )

    @property
    def _layout(self) -> LogisticObjective:
        """An objective of no rows with this one's parameter layout (pack, unpack, expand)."""
        dtype = self.chunks.dtype
        return LogisticObjective(
            features=jnp.zeros((0, self.chunks.num_features), dtype),
            labels=jnp.zeros((0,), jnp.int32),
            weights=jnp.zeros((0,), dtype),
            l2=self.l2,
            num_classes=self.num_classes,
            fit_intercept=self.fit_intercept,
            reference_class=self.reference_class,
        )

    def _sum_over_chunks(self, function, init: Any) -> Any:
        """Σ over chunks of function(chunk objective), a pytree like `init`: one pass."""

        def body(index, total):
            part = function(self._chunk(index))
            return jax.tree.map(jnp.add, total, part)

        return lax.fori_loop(0, self.chunks.num_chunks, body, init)

    @staticmethod
    def _probabilities(chunk: LogisticObjective, theta: jax.Array) -> Evaluation:
        """The chunk's log-probabilities and free-class probabilities at θ (no gradient)."""
        log_probs = jax.nn.log_softmax(chunk.logits(theta), axis=-1)
        probs = jnp.exp(log_probs)[:, int(chunk.reference_class) :]
        zero = jnp.zeros((), log_probs.dtype)
        return Evaluation(zero, zero, log_probs, probs)

    def _penalty_gradient(self, theta: jax.Array) -> jax.Array:
        layout = self._layout
        weights, intercept = layout.unpack(theta)
        return layout.pack(self.l2 * weights, jnp.zeros_like(intercept))

    # The `Objective` protocol.

    @property
    def num_rows(self) -> int:
        """The rows of every chunk, padding included: a bound on N (for `null_cutoff`)."""
        return self.chunks.chunk_rows * self.chunks.num_chunks

    @property
    def num_params(self) -> int:
        return self._layout.num_params

    @property
    def dtype(self):
        return self.chunks.dtype

    @property
    def num_free_classes(self) -> int:
        return self._layout.num_free_classes

    def predictor(self, theta: jax.Array) -> tuple:
        """Nothing is cached per row (that would be N × K): every trial recomputes a pass."""
        return ()

    def evaluate(self, theta: jax.Array, predictor: tuple) -> StreamedEvaluation:
        def part(chunk):
            point = evaluate(chunk, theta, chunk.free_logits(theta))
            return point.loss, point.grad, separated(chunk, chunk.free_logits(theta))

        init = (jnp.zeros((), self.dtype), jnp.zeros_like(theta), jnp.ones((), bool))

        def body(index, total):
            loss, grad, all_separated = part(self._chunk(index))
            return total[0] + loss, total[1] + grad, total[2] & all_separated

        loss, grad, all_separated = lax.fori_loop(0, self.chunks.num_chunks, body, init)
        loss = loss + self._layout.penalty(theta)
        return StreamedEvaluation(loss, grad + self._penalty_gradient(theta), theta, all_separated)

    def hessian_product(self, evaluation: StreamedEvaluation, tangent: jax.Array) -> jax.Array:
        def part(chunk):
            return hessian_vector_product(
                chunk, self._probabilities(chunk, evaluation.theta), tangent
            )

        return self._sum_over_chunks(part, jnp.zeros_like(tangent)) + self._penalty_gradient(
            tangent
        )

    def loss_change(self, theta, evaluation, direction, direction_predictor, scale) -> jax.Array:
        def part(chunk):
            point = self._probabilities(chunk, theta)
            return loss_change(chunk, theta, point, direction, chunk.free_logits(direction), scale)

        change = self._sum_over_chunks(part, jnp.zeros((), self.dtype))
        layout = self._layout
        weights, _ = layout.unpack(theta)
        step, _ = layout.unpack(direction)
        return change + self.l2 * (
            scale * jnp.vdot(weights, step) + 0.5 * scale**2 * jnp.vdot(step, step)
        )

    def diverged(self, evaluation: StreamedEvaluation, predictor: tuple) -> jax.Array:
        return (self.l2 == 0) & evaluation.separated

    def hessian_diagonal(
        self, evaluation: StreamedEvaluation, shift: jax.Array | None = None
    ) -> jax.Array:
        def part(chunk):
            return hessian_diagonal(chunk, self._probabilities(chunk, evaluation.theta), shift)

        layout = self._layout
        penalty = layout.pack(
            jnp.full((layout.num_features, layout.num_free_classes), self.l2, self.dtype),
            jnp.zeros((layout.num_free_classes,), self.dtype),
        )
        return self._sum_over_chunks(part, jnp.zeros_like(evaluation.theta)) + penalty

    def hessian(self, evaluation: StreamedEvaluation, shift: jax.Array | None = None) -> jax.Array:
        """The explicit [P, P] Hessian summed over the chunks (small P), centred by `shift`."""

        def part(chunk):
            return hessian(chunk, self._probabilities(chunk, evaluation.theta), shift)

        size = self.num_params
        penalty = jnp.diag(self._penalty_gradient(jnp.ones((size,), self.dtype)))
        return self._sum_over_chunks(part, jnp.zeros((size, size), self.dtype)) + penalty

    def hessian_null_space(self, matrix: jax.Array) -> jax.Array | None:
        return self._layout.hessian_null_space(matrix)

    def remove_class_shift(self, vector: jax.Array) -> jax.Array:
        return self._layout.remove_class_shift(vector)

    @property
    def default_preconditioner(self) -> str:
        return auto_preconditioner(self.chunks.num_features)

    def feature_gram(self, shift: jax.Array | None = None) -> jax.Array:
        size = self.chunks.num_features + int(self.fit_intercept)
        return self._sum_over_chunks(
            lambda chunk: feature_gram(chunk, shift), jnp.zeros((size, size), self.dtype)
        )

    def centred_feature_gram(self) -> tuple[jax.Array, jax.Array | None]:
        """(A_c, μ) as `LogisticObjective.centred_feature_gram`, μ = `shift` (one pass)."""
        return self.feature_gram(self.shift), self.shift

    def feature_shift(self, dominant: bool = False) -> jax.Array | None:
        """μ, as `LogisticObjective.feature_shift` (computed before the fit)."""
        return self.dominant_shift if dominant else self.shift

    def class_curvature(self, evaluation: StreamedEvaluation) -> jax.Array:
        def part(chunk):
            return class_curvature(chunk, self._probabilities(chunk, evaluation.theta))

        size = self._layout.num_free_classes
        diagonal = diagonal_class_curvature(self.num_classes, self.reference_class)
        shape = (size,) if diagonal else (size, size)
        return self._sum_over_chunks(part, jnp.zeros(shape, self.dtype))
