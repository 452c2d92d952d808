"""The logistic objective over rows streamed in chunks: X never sits in memory at once.

`StreamedLogisticObjective` implements the `Objective` protocol on top of `LogisticObjective`:
every method is one pass over the chunks, each chunk read from the host (a memory-mapped
``.npy`` file, an HDF5 or zarr dataset: anything sliceable by rows) through a
`jax.pure_callback` inside the compiled loop, and handed to the in-memory objective's functions.
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

import dataclasses
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._linear import (
    AUTO_MAX_GRAM_FEATURES,
    Evaluation,
    LogisticObjective,
    class_curvature,
    evaluate,
    feature_gram,
    hessian,
    hessian_diagonal,
    hessian_vector_product,
    loss_change,
    separated,
)

_MAX_SOURCES = 8
_sources: dict[tuple, RowChunks] = {}
_sources_lock = threading.Lock()


class RowChunks:
    """Rows of (X, labels, weights) read `chunk_rows` at a time, the last chunk zero-padded.

    Hashable by the identity of its arrays (a compiled fit is specialised to one source), and
    counts the chunks it has read (`passes` = reads / chunks).
    """

    def __init__(self, X, labels, weights, chunk_rows: int, dtype) -> None:
        self.X, self.labels, self.weights = X, labels, weights
        self.num_rows, self.num_features = X.shape
        self.chunk_rows = int(min(chunk_rows, self.num_rows))
        self.num_chunks = -(-self.num_rows // self.chunk_rows)
        self.dtype = np.dtype(dtype)
        self.reads = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, X, labels, weights, chunk_rows: int, dtype) -> RowChunks:
        """The source of these arrays: the same object for the same arrays and settings.

        A compiled fit keeps the source it was traced with; handing back that object keeps
        its read count (`passes`) the one that the compiled program updates.
        """
        source = cls(X, labels, weights, chunk_rows, dtype)
        with _sources_lock:
            source = _sources.setdefault(source._key(), source)
            while len(_sources) > _MAX_SOURCES:
                _sources.pop(next(iter(_sources)))
        return source

    def _key(self) -> tuple:
        return (id(self.X), id(self.labels), id(self.weights), self.chunk_rows, self.dtype.str)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowChunks) and self._key() == other._key()

    @property
    def passes(self) -> float:
        """Full passes over the rows read so far."""
        return self.reads / self.num_chunks

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk `index` on the host: X [chunk_rows, d], labels, weights (zero-padded)."""
        start = index * self.chunk_rows
        stop = min(start + self.chunk_rows, self.num_rows)
        X = np.zeros((self.chunk_rows, self.num_features), self.dtype)
        labels = np.zeros(self.chunk_rows, np.int32)
        weights = np.zeros(self.chunk_rows, self.dtype)
        X[: stop - start] = self.X[start:stop]
        labels[: stop - start] = self.labels[start:stop]
        weights[: stop - start] = 1.0 if self.weights is None else self.weights[start:stop]
        return X, labels, weights

    def read(self, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`rows` for the host callback, counting the read."""
        with self._lock:
            self.reads += 1
        return self.rows(int(index))

    def shapes(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        rows, d = self.chunk_rows, self.num_features
        return (
            jax.ShapeDtypeStruct((rows, d), self.dtype),
            jax.ShapeDtypeStruct((rows,), np.int32),
            jax.ShapeDtypeStruct((rows,), self.dtype),
        )


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
        total_weight: Σ w over every row (each chunk's weights are divided by it).
        source: the `RowChunks` (static).
        num_classes, fit_intercept, reference_class: as `LogisticObjective` (static).
    """

    l2: jax.Array
    total_weight: jax.Array
    source: RowChunks = dataclasses.field(metadata={"static": True})
    num_classes: int = dataclasses.field(metadata={"static": True})
    fit_intercept: bool = dataclasses.field(default=True, metadata={"static": True})
    reference_class: bool = dataclasses.field(default=False, metadata={"static": True})

    # The in-memory objective of one chunk (no penalty: it is added once, here).

    def _chunk(self, index: jax.Array) -> LogisticObjective:
        X, labels, weights = jax.pure_callback(
            self.source.read, self.source.shapes(), index, vmap_method="sequential"
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
        dtype = self.source.dtype
        return LogisticObjective(
            features=jnp.zeros((0, self.source.num_features), dtype),
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

        return lax.fori_loop(0, self.source.num_chunks, body, init)

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
    def num_params(self) -> int:
        return self._layout.num_params

    @property
    def dtype(self):
        return self.source.dtype

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

        loss, grad, all_separated = lax.fori_loop(0, self.source.num_chunks, body, init)
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

    def hessian_diagonal(self, evaluation: StreamedEvaluation) -> jax.Array:
        def part(chunk):
            return hessian_diagonal(chunk, self._probabilities(chunk, evaluation.theta))

        layout = self._layout
        penalty = layout.pack(
            jnp.full((layout.num_features, layout.num_free_classes), self.l2, self.dtype),
            jnp.zeros((layout.num_free_classes,), self.dtype),
        )
        return self._sum_over_chunks(part, jnp.zeros_like(evaluation.theta)) + penalty

    def hessian(self, evaluation: StreamedEvaluation) -> jax.Array:
        """The explicit [P, P] Hessian, summed over the chunks (small P only)."""

        def part(chunk):
            return hessian(chunk, self._probabilities(chunk, evaluation.theta))

        size = self.num_params
        penalty = jnp.diag(self._penalty_gradient(jnp.ones((size,), self.dtype)))
        return self._sum_over_chunks(part, jnp.zeros((size, size), self.dtype)) + penalty

    def hessian_null_space(self, matrix: jax.Array) -> jax.Array | None:
        return self._layout.hessian_null_space(matrix)

    @property
    def default_preconditioner(self) -> str:
        return "diagonal" if self.source.num_features > AUTO_MAX_GRAM_FEATURES else "kronecker"

    def feature_gram(self) -> jax.Array:
        size = self.source.num_features + int(self.fit_intercept)
        return self._sum_over_chunks(feature_gram, jnp.zeros((size, size), self.dtype))

    def class_curvature(self, evaluation: StreamedEvaluation) -> jax.Array:
        def part(chunk):
            return class_curvature(chunk, self._probabilities(chunk, evaluation.theta))

        size = self._layout.num_free_classes
        return self._sum_over_chunks(part, jnp.zeros((size, size), self.dtype))
