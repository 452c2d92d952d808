"""The penalised multinomial logistic regression objective, with closed-form curvature.

For features X [N, d], integer labels y [N] in [0, K), sample weights w [N] >= 0 and L2 strength
l2 >= 0, the objective over weights W [d, K] and intercept b [K] is

    f(W, b) = Σᵢ wᵢ·CE(xᵢW + b, yᵢ) / Σᵢ wᵢ + (l2/2)·‖W‖²,      CE(z, y) = logsumexp(z) − z_y,

the intercept never penalised (scikit-learn's `C` is `l2 = 1 / (C·Σᵢ wᵢ)`). With
`reference_class=True`, column 0 of W and entry 0 of b are fixed at zero (class 0 is the reference
category, as statsmodels' `MNLogit`; for K = 2 this is scikit-learn's binomial model).

The logits are linear in the parameters and the cross-entropy is convex in the logits, so the
Hessian is the Gauss-Newton (Fisher) matrix: with s = softmax(xW + b) and the row weights
ŵᵢ = wᵢ/Σw,

    H = Σᵢ ŵᵢ·(x̃ᵢx̃ᵢᵀ) ⊗ (diag(sᵢ) − sᵢsᵢᵀ) + l2·I_W,        x̃ = [x, 1].

Its product with a direction (V, c) needs two GEMMs and O(N·K) work in between, never an
[N, K, K] array: Z = XV + c, U = ŵ ⊙ s ⊙ (Z − (s·Z)), Hv = (XᵀU + l2·V, Σᵢ Uᵢ).

Parameters are handled as one flat vector θ (the solvers' unknown): the free block of W in
row-major order, then the free block of b when there is an intercept. The free classes are all K,
or classes 1..K−1 with a reference class; `LogisticObjective.expand` returns (W [d, K], b [K]).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import sparse
from jax.typing import ArrayLike

from ._batch_cond import batch_cond
from ._losses import hessian_product_from_probs, integer_labels, softmax_parts
from ._rowsums import column_sums_by_chunks, normalized_weights
from ._sparse_products import map_features, matmul, transpose_matmul, weighted_gram

# "auto" preconditions CG with the Hessian diagonal beyond this many features (see
# `LogisticObjective.default_preconditioner`).
AUTO_MAX_GRAM_FEATURES = 4000


def auto_preconditioner(num_features: int, dense: bool = True) -> str:
    """What "auto" means for logistic regression (`LogisticObjective.default_preconditioner`).

    "diagonal" for sparse X or d > `AUTO_MAX_GRAM_FEATURES`, else "kronecker".
    """
    return "kronecker" if dense and num_features <= AUTO_MAX_GRAM_FEATURES else "diagonal"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogisticObjective:
    """Data and settings of one multinomial logistic regression problem (a pytree).

    Attributes:
        features: [N, d] float design matrix X, dense or a `jax.experimental.sparse.BCOO`
            (kept sparse: the products X·V and Xᵀ·U are sparse-dense products).
        labels: [N] integer labels in [0, num_classes).
        weights: [N] row weights normalised to sum to one, ŵ = w / Σw.
        l2: scalar L2 strength on W (traced: a batch of problems may vary it).
        num_classes: K (static).
        fit_intercept: whether b is a free parameter (static).
        reference_class: whether class 0's column and intercept are fixed at zero (static).
        penalised: whether l2 > 0 is known when the program is built (static). Then the parts
            that only an unpenalised fit needs (the separation certificate, the minimum-norm
            projection) are left out of the compiled program; False means l2 may be 0.
        row_chunk: rows per chunk of the sums over a dense X whose [N, d]-sized intermediates
            would be copies of X (the Gram, the precision floor's column sums, the Hessian
            diagonal), so that they take one chunk (static); None sums in one call, as a
            row-sharded X needs (slicing its rows would gather them onto every device).
        transposed_features: X̃ᵀ [d̃, N] stored row-major (X̃ = [X, 1] with an intercept, X
            without), a copy of a dense X for the GEMMs X̃ᵀ·U over the rows that the gradient
            and every Hessian product take, or None to read X itself (`logistic_objective`'s
            ``transposed_copy``).
    """

    features: jax.Array | sparse.BCOO
    labels: jax.Array
    weights: jax.Array
    l2: jax.Array
    num_classes: int = dataclasses.field(metadata={"static": True})
    fit_intercept: bool = dataclasses.field(default=True, metadata={"static": True})
    reference_class: bool = dataclasses.field(default=False, metadata={"static": True})
    penalised: bool = dataclasses.field(default=False, metadata={"static": True})
    row_chunk: int | None = dataclasses.field(default=None, metadata={"static": True})
    transposed_features: jax.Array | None = None

    @property
    def num_features(self) -> int:
        """d, the number of columns of X."""
        return self.features.shape[1]

    @property
    def num_free_classes(self) -> int:
        """K, or K − 1 with a reference class: the columns of W that are free."""
        return self.num_classes - int(self.reference_class)

    @property
    def num_params(self) -> int:
        """Length of θ: (d + fit_intercept)·(free classes)."""
        return (self.num_features + int(self.fit_intercept)) * self.num_free_classes

    @property
    def dtype(self) -> jnp.dtype:
        """Floating dtype of the computation (that of the features)."""
        return self.features.dtype

    def astype(self, dtype) -> LogisticObjective:
        """The objective with its floating data (X, the row weights, l2) in `dtype`.

        The transposed copy of X is dropped unless `dtype` is float64, where it measured
        faster (`logistic_objective`): a float32 copy of the products' X need not hold two.
        """
        dtype = jnp.dtype(dtype)
        features = map_features(lambda values: values.astype(dtype), self.features)
        transposed = self.transposed_features
        keep = transposed is not None and dtype == jnp.float64
        return dataclasses.replace(
            self,
            features=features,
            weights=self.weights.astype(dtype),
            l2=self.l2.astype(dtype),
            transposed_features=transposed.astype(dtype) if keep else None,
        )

    def unpack(self, theta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Split θ [P] into the free W [d, Kf] and free b [Kf] (zeros without intercept)."""
        d, kf = self.num_features, self.num_free_classes
        weights = theta[: d * kf].reshape(d, kf)
        if self.fit_intercept:
            return weights, theta[d * kf :]
        return weights, jnp.zeros((kf,), theta.dtype)

    def pack(self, weights: jax.Array, intercept: jax.Array) -> jax.Array:
        """Inverse of `unpack`: θ from the free W [d, Kf] and b [Kf]."""
        parts = [weights.reshape(-1)]
        if self.fit_intercept:
            parts.append(intercept.reshape(-1))
        return jnp.concatenate(parts)

    def expand(self, theta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Full parameters (W [d, K], b [K]), fixed reference entries set to zero."""
        weights, intercept = self.unpack(theta)
        if self.reference_class:
            weights = jnp.pad(weights, ((0, 0), (1, 0)))
            intercept = jnp.pad(intercept, (1, 0))
        return weights, intercept

    def restrict(self, weights: ArrayLike, intercept: ArrayLike) -> jax.Array:
        """θ from full parameters (W [d, K], b [K]), dropping fixed entries.

        With a reference class the parameters are first shifted so that class 0's column and
        intercept are zero, which leaves every probability unchanged.
        """
        weights = jnp.asarray(weights, self.dtype)
        intercept = jnp.asarray(intercept, self.dtype)
        if self.reference_class:
            weights = (weights - weights[:, :1])[:, 1:]
            intercept = (intercept - intercept[:1])[1:]
        return self.pack(weights, intercept)

    def free_logits(self, theta: jax.Array) -> jax.Array:
        """X·W + b for the free classes, [N, Kf]: one GEMM. Linear in θ."""
        weights, intercept = self.unpack(theta)
        logits = matmul(self.features, weights)
        return logits + intercept[None, :] if self.fit_intercept else logits

    def logits(self, theta: jax.Array) -> jax.Array:
        """All K logits [N, K] (a zero column in front with a reference class)."""
        logits = self.free_logits(theta)
        return jnp.pad(logits, ((0, 0), (1, 0))) if self.reference_class else logits

    def penalty(self, theta: jax.Array) -> jax.Array:
        """(l2/2)·‖W‖²."""
        weights, _ = self.unpack(theta)
        return 0.5 * self.l2 * jnp.vdot(weights, weights)

    def value(self, theta: jax.Array) -> jax.Array:
        """f(θ), the objective value. Cost: one GEMM and O(N·K)."""
        return evaluate(self, theta, self.free_logits(theta)).loss

    # The `Objective` protocol (see `_objective`), over the module's functions below.

    def predictor(self, theta: jax.Array) -> jax.Array:
        """The free logits X·W + b [N, Kf], linear in θ (`free_logits`)."""
        return self.free_logits(theta)

    def evaluate(self, theta: jax.Array, predictor: jax.Array) -> Evaluation:
        """`evaluate` at θ from its free logits."""
        return evaluate(self, theta, predictor)

    def hessian_product(self, evaluation: Evaluation, tangent: jax.Array) -> jax.Array:
        """`hessian_vector_product`: H·v in two GEMMs."""
        return hessian_vector_product(self, evaluation, tangent)

    def loss_change(
        self,
        theta: jax.Array,
        evaluation: Evaluation,
        direction: jax.Array,
        direction_predictor: jax.Array,
        scale: jax.Array,
    ) -> jax.Array:
        """`loss_change`: f(θ + tΔ) − f(θ) in O(N·K), from the logits of Δ."""
        return loss_change(self, theta, evaluation, direction, direction_predictor, scale)

    def diverged(self, evaluation: Evaluation, predictor: jax.Array) -> jax.Array:
        """l2 = 0 and the logits separate the data (`separated`): no finite optimum exists."""
        if self.penalised:
            return jnp.zeros((), bool)
        return (self.l2 == 0) & separated(self, predictor)

    def hessian(self, evaluation: Evaluation, shift: jax.Array | None = None) -> jax.Array:
        """The explicit Hessian [P, P] (`hessian`), in the centred variables given `shift`."""
        return hessian(self, evaluation, shift)

    def hessian_diagonal(self, evaluation: Evaluation, shift: jax.Array | None = None) -> jax.Array:
        """diag(H) [P] (`hessian_diagonal`), of CᵀHC given `shift`."""
        return hessian_diagonal(self, evaluation, shift)

    def remove_class_shift(self, vector: jax.Array) -> jax.Array:
        """The vector v [P] with each row of its [d̃, Kf] view centred over the classes.

        Adding c·1ᵀ to a row of [W; b] shifts every class's logit by the same amount and
        changes no probability, so the loss is flat along it; the penalty is smallest, and
        the gradient and every H·v lie, in the centred subspace, where the solvers keep θ
        (the preconditioners project onto it, see `_preconditioners.build`). The identity
        with a reference class, whose parametrisation has no such direction.
        """
        if self.reference_class:
            return vector
        block = vector.reshape(-1, self.num_free_classes)
        return (block - jnp.mean(block, axis=1, keepdims=True)).reshape(-1)

    def hessian_null_space(self, matrix: jax.Array) -> jax.Array | None:
        """Without a reference class: the class shifts P = I ⊗ 11ᵀ/K, scaled like `matrix`.

        A common shift of every class changes no probability, so H·P = P·H (the loss part of
        H annihilates P, the penalty is block-diagonal by feature) and the gradient is
        orthogonal to P's range when W's rows are centred (the solvers keep them so). Then
        (H + αP)⁻¹g = H⁺g: adding αP removes the singular direction without changing the
        Newton step. α is one value per feature row (the mean of its diagonal block of
        `matrix`), so that a large column does not swamp the small ones. None with a reference
        class, where H is nonsingular.
        """
        if self.reference_class:
            return None
        kf = self.num_free_classes
        row_scale = jnp.mean(jnp.diag(matrix).reshape(-1, kf), axis=1)
        row_scale = jnp.maximum(row_scale, jnp.finfo(matrix.dtype).tiny)
        block = jnp.full((kf, kf), 1.0 / kf, matrix.dtype)
        return jnp.kron(jnp.diag(row_scale), block)

    @property
    def default_preconditioner(self) -> str:
        """What "auto" means here: "diagonal" for sparse X or d > 4000, else "kronecker".

        The Kronecker form needs the d̃ × d̃ Gram and its eigendecomposition, which cost more
        than they save beyond a few thousand features (and do not fit in memory at text
        sizes); sparse X would have to be densified for it.
        """
        return auto_preconditioner(
            self.num_features, dense=not isinstance(self.features, sparse.BCOO)
        )

    def design_matrix(self) -> jax.Array:
        """X̃ = [X, 1] (with an intercept) as a dense [N, d̃] array, for small d only."""
        features = dense_features(self.features)
        if self.fit_intercept:
            features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
        return features

    def feature_gram(self) -> jax.Array:
        """A = X̃ᵀ·diag(ŵ)·X̃ [d̃, d̃] (`feature_gram`), the fixed Kronecker factor."""
        return feature_gram(self)

    def centred_feature_gram(self) -> tuple[jax.Array, jax.Array | None]:
        """(A_c, μ), the Gram of [X − 1·μᵀ, 1] and the column means (`centred_feature_gram`)."""
        return centred_feature_gram(self)

    def feature_shift(self, dominant: bool = False) -> jax.Array | None:
        """μ [d], the column means that centre X (`feature_shift`), or None."""
        return feature_shift(self, dominant)

    def class_curvature(self, evaluation: Evaluation) -> jax.Array:
        """B = Σᵢ ŵᵢ·(diag(sᵢ) − sᵢsᵢᵀ) [Kf, Kf] or its diagonal [Kf] (`class_curvature`)."""
        return class_curvature(self, evaluation)


class Evaluation(NamedTuple):
    """Everything computed once per outer iteration at one point θ.

    Attributes:
        loss: scalar f(θ).
        grad: [P] gradient of f.
        log_probs: [N, K] log-softmax of the logits.
        probs: [N, Kf] probabilities of the free classes (what every curvature product uses).
    """

    loss: jax.Array
    grad: jax.Array
    log_probs: jax.Array
    probs: jax.Array


def _with_reference(objective: LogisticObjective, free_logits: jax.Array) -> jax.Array:
    return _padded(objective.reference_class, free_logits)


def _padded(reference_class: bool, free_logits: jax.Array) -> jax.Array:
    """[N, K] logits from the free classes' [N, Kf]: a zero column for the reference class."""
    if reference_class:
        return jnp.pad(free_logits, ((0, 0), (1, 0)))
    return free_logits


def label_mask(objective: LogisticObjective) -> jax.Array:
    """[N, K] booleans: whether class k is row i's label (one-hot)."""
    classes = jnp.arange(objective.num_classes, dtype=objective.labels.dtype)
    return objective.labels[:, None] == classes[None, :]


def separated(objective: LogisticObjective, free_logits: jax.Array) -> jax.Array:
    """Whether the current logits classify every weighted row strictly correctly.

    If they do, the current W is itself a separating direction: scaling it up drives the
    unpenalised loss to 0, so with l2 = 0 the maximum-likelihood estimate does not exist. This
    is a certificate, not a heuristic: on data that are not separable it can never hold.
    Cost: O(N·K).
    """
    logits = _with_reference(objective, free_logits)
    labels = objective.labels[:, None]
    label_logit = jnp.take_along_axis(logits, labels, axis=-1)[:, 0]
    is_label = label_mask(objective)
    runner_up = jnp.max(jnp.where(is_label, -jnp.inf, logits), axis=-1)
    margin_ok = (label_logit > runner_up) | (objective.weights <= 0)
    return jnp.all(margin_ok)


def evaluate(objective: LogisticObjective, theta: jax.Array, free_logits: jax.Array) -> Evaluation:
    """Value, gradient and probabilities at θ from its (already computed) logits.

    Args:
        objective: the problem.
        theta: [P] parameters.
        free_logits: [N, Kf] logits of the free classes at θ, `objective.free_logits(theta)`.

    Returns:
        An `Evaluation`. The gradient is (Xᵀ·R + l2·W, Σᵢ Rᵢ) with R = ŵ ⊙ (s − onehot(y))
        restricted to the free classes, each entry of R to a few ulps of its own size (the
        label's −(1 − s_y) from the other classes' probabilities, `softmax_parts`). Cost: one
        GEMM (Xᵀ·R) and O(N·K).
    """
    logits = _with_reference(objective, free_logits)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    label_log_probs = jnp.take_along_axis(log_probs, objective.labels[:, None], axis=-1)[:, 0]
    loss = -jnp.vdot(objective.weights, label_log_probs) + objective.penalty(theta)
    # s − onehot(y), the label's entry −(1 − s_y) from the other classes' probabilities: by
    # subtraction it would round to a multiple of eps/2 (to 0 once 1 − s_y < eps/4).
    is_label = label_mask(objective)
    probs, complement = softmax_parts(logits, None)
    residual = objective.weights[:, None] * jnp.where(is_label, -complement, probs)
    first = int(objective.reference_class)
    residual, probs = residual[:, first:], probs[:, first:]
    weights, _ = objective.unpack(theta)
    grad_weights, grad_intercept = _transpose_products(objective, residual)
    grad = objective.pack(grad_weights + objective.l2 * weights, grad_intercept)
    return Evaluation(loss, grad, log_probs, probs)


def _transpose_products(
    objective: LogisticObjective, values: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(Xᵀ·values [d, K], Σᵢ valuesᵢ [K]), the gradient's and each Hessian product's.

    One GEMM with X̃ᵀ = [X, 1]ᵀ where the objective holds that copy, else Xᵀ·values from X and
    a sum over the rows.
    """
    transposed = objective.transposed_features
    if transposed is None:
        return transpose_matmul(objective.features, values), jnp.sum(values, axis=0)
    product = transposed @ values
    if objective.fit_intercept:  # the copy's last row is the ones
        return product[:-1], product[-1]
    return product, jnp.sum(values, axis=0)


def hessian_vector_product(
    objective: LogisticObjective, evaluation: Evaluation, tangent: jax.Array
) -> jax.Array:
    """H·v at the point of `evaluation`, from the closed form.

    Args:
        objective: the problem.
        evaluation: `evaluate` at the point.
        tangent: [P] direction v = (V, c).

    Returns:
        [P] H·v = (XᵀU + l2·V, Σᵢ Uᵢ), U = ŵ ⊙ s ⊙ (Z − (s·Z)), Z = XV + c over free classes.
        Cost: two GEMMs (X·V and Xᵀ·U), O(N·K) in between.
    """
    directional = objective.free_logits(tangent)
    # Over the free classes only: a reference class has zero logit tangent, so it drops out.
    weighted = objective.weights[:, None] * hessian_product_from_probs(
        evaluation.probs, directional, complete=not objective.reference_class
    )
    weights, _ = objective.unpack(tangent)
    product_weights, product_intercept = _transpose_products(objective, weighted)
    return objective.pack(product_weights + objective.l2 * weights, product_intercept)


def hessian_diagonal(
    objective: LogisticObjective, evaluation: Evaluation, shift: jax.Array | None = None
) -> jax.Array:
    """diag(H) [P]: Σᵢ ŵᵢ·x_ij²·s_ik(1 − s_ik) + l2 for W, Σᵢ ŵᵢ·s_ik(1 − s_ik) for b.

    With `shift` μ [d] (`feature_shift`, a dense X), diag(CᵀHC), that of the centred variables
    (W, b + μᵀW): x_ij − μ_j in place of x_ij.

    1 − s_ik is the other classes' probabilities summed where s_ik > 1/2 (at most one class per
    row), never 1 − s_ik by subtraction: a confident row keeps its winner's curvature
    s(1 − s) ≈ Σ_{j≠k} s_ij at any margin, where the subtraction would round it to 0.

    Cost: one GEMM with X² (X² is formed on the fly: by row chunks of a dense X, block by block
    of a sparse X's stored values); O(N·K) for the complement.
    """
    probs = evaluation.probs
    all_probs = probs
    if objective.reference_class:
        all_probs = jnp.concatenate([jnp.exp(evaluation.log_probs[:, :1]), probs], axis=1)
    dominant = all_probs > 0.5
    others = jnp.sum(jnp.where(dominant, 0.0, all_probs), axis=1, keepdims=True)
    complement = jnp.where(probs > 0.5, others, 1 - probs)
    variance = objective.weights[:, None] * probs * complement

    def squares(rows, values):
        if shift is not None:
            rows = rows - shift.astype(rows.dtype)[None, :]
        return transpose_matmul(rows, values, value_map=jnp.square)

    # By row chunks: in one call XLA would keep X ⊙ X, hoisted out of the solver's loop.
    diag_weights = column_sums_by_chunks(
        squares,
        objective.features,
        variance,
        objective.row_chunk,
    )
    diag_weights = diag_weights + objective.l2
    return objective.pack(diag_weights, jnp.sum(variance, axis=0))


def hessian(
    objective: LogisticObjective, evaluation: Evaluation, shift: jax.Array | None = None
) -> jax.Array:
    """The explicit Hessian [P, P] in θ's layout, for small P.

    H[(i,k),(j,l)] = Σₙ ŵₙ·x̃ₙᵢx̃ₙⱼ·(δ_kl·s_nk − s_nk·s_nl) + l2·δ over W entries: the diagonal
    part is Kf weighted Gram matrices X̃ᵀdiag(ŵ⊙s_k)X̃, the rank-one part one Gram matrix BᵀB
    with B = √ŵ ⊙ (x̃ ⊗ s) [N, P]. Cost: O(N·P²) flops in large GEMMs, O(N·P + P²) memory.

    With `shift` μ [d] (`feature_shift`), the Hessian in the centred variables
    θ_c = (W, b + μᵀW), CᵀHC with C as in `centred_feature_gram`: the same sums over the rows of
    [X − 1·μᵀ, 1], where a column c + δ·z keeps the curvature δ² that H's entries, of order
    c², round away below float64.
    """
    features = objective.design_matrix()
    if shift is not None:
        features = features - jnp.append(shift, 0).astype(features.dtype)[None, :]
    probs = evaluation.probs
    num_rows, dt = features.shape
    kf = probs.shape[1]
    scaled = objective.weights[:, None] * probs
    # One GEMM [Kf·d̃, N] × [N, d̃] (an einsum over three operands would form [N, Kf, d̃, d̃]).
    left = (scaled[:, :, None] * features[:, None, :]).reshape(num_rows, kf * dt)
    diagonal_blocks = (left.T @ features).reshape(kf, dt, dt)
    root = jnp.sqrt(objective.weights)[:, None, None] * features[:, :, None] * probs[:, None, :]
    root = root.reshape(num_rows, dt * kf)
    eye = jnp.eye(kf, dtype=probs.dtype)
    matrix = jnp.einsum("kij,kl->ikjl", diagonal_blocks, eye).reshape(dt * kf, dt * kf)
    matrix = matrix - root.T @ root
    penalised = jnp.arange(dt * kf) < objective.num_features * kf
    return matrix + jnp.diag(jnp.where(penalised, objective.l2, 0.0).astype(matrix.dtype))


def loss_change(
    objective: LogisticObjective,
    theta: jax.Array,
    evaluation: Evaluation,
    step: jax.Array,
    step_logits: jax.Array,
    scale: jax.Array,
) -> jax.Array:
    """f(θ + t·Δ) − f(θ), accurate even when the change is far below f's rounding.

    Per row, logsumexp(z + t·ζ) − logsumexp(z) = log1p(Σₖ sₖ·expm1(t·ζₖ)), so a small change
    keeps its relative accuracy instead of drowning in eps·f (this is what lets the line search
    make progress at tol = 1e-8 and below).

    The sum is taken from the stored probabilities and ζ alone, in one fused pass over
    [N, Kf] (a reference class has ζ = 0 and adds nothing). That is exact unless a move is
    large. Where a row's sum nears −1 (its logsumexp falls by more than log 2, and 1 + Σ
    would cancel), 1 + Σ = Σₖ sₖ·exp(t·ζₖ) is summed directly, from positive terms, in a
    second pass. Where a sum overflows, or a probability below the normal range (its digits
    lost, or 0) meets a logit rising by more than `_LARGE_MOVE`, `_row_changes` recomputes
    every row from the log-probabilities. Each of these runs only when needed (`batch_cond`:
    under `vmap`, only when some problem of the batch needs it).

    Args:
        objective: the problem.
        theta: [P] current point.
        evaluation: `evaluate` at θ.
        step: [P] direction Δ.
        step_logits: [N, Kf] `objective.free_logits(step)` (one GEMM, done once per direction).
        scale: scalar step length t.

    Returns:
        Scalar change of the objective. Cost: O(N·K), no GEMM; one pass over [N, Kf] unless
        a move is large.
    """
    probs = evaluation.probs
    # scale·ζ is formed inside each pass: a product shared by the passes would be stored.
    total = jnp.sum(probs * jnp.expm1(scale * step_logits), axis=-1)
    counted = objective.weights > 0
    small = ~counted | (jnp.isfinite(total) & (total > -0.5))
    # Two scalars, not a test per entry (which would keep XLA from fusing the sum's pass).
    lost = (jnp.min(probs, initial=1) < jnp.finfo(probs.dtype).tiny) & (
        scale * jnp.max(step_logits, initial=-jnp.inf) > _LARGE_MOVE
    )

    summed = jnp.log1p(jnp.where(small, total, 0))  # [N]: no pass over [N, Kf]
    row_change = batch_cond(
        jnp.all(small) & ~lost,
        lambda summed, *_: summed,
        functools.partial(_large_moves, objective.reference_class),
        summed,
        small,
        lost,
        evaluation,
        step_logits,
        scale,
    )
    label_step = jnp.take_along_axis(
        _with_reference(objective, step_logits), objective.labels[:, None], axis=-1
    )[:, 0]
    row_change = jnp.where(counted, row_change - scale * label_step, 0)
    weights, _ = objective.unpack(theta)
    step_weights, _ = objective.unpack(step)
    penalty_change = objective.l2 * (
        scale * jnp.vdot(weights, step_weights)
        + 0.5 * scale**2 * jnp.vdot(step_weights, step_weights)
    )
    return jnp.vdot(objective.weights, row_change) + penalty_change


def _large_moves(
    reference_class: bool,
    summed: jax.Array,
    small: jax.Array,
    lost: jax.Array,
    evaluation: Evaluation,
    step_logits: jax.Array,
    scale: jax.Array,
) -> jax.Array:
    """`loss_change`'s row changes [N] where some row's sum nears −1 or a move is large."""
    probs = evaluation.probs
    # Where the sum nears −1, 1 + Σ = Σₖ sₖ·exp(uₖ) summed directly: positive terms.
    direct = jnp.sum(probs * jnp.exp(scale * step_logits), axis=-1)
    if reference_class:
        direct = direct + jnp.exp(evaluation.log_probs[:, 0])
    normal = small | (jnp.isfinite(direct) & (direct >= jnp.finfo(probs.dtype).tiny))

    def recomputed(summed, small, direct, evaluation, step_logits, scale):
        moved = scale * _padded(reference_class, step_logits)
        return _row_changes(evaluation.log_probs, moved)

    return batch_cond(
        jnp.all(normal) & ~lost,
        lambda summed, small, direct, *_: jnp.where(small, summed, jnp.log(direct)),
        recomputed,
        summed,
        small,
        direct,
        evaluation,
        step_logits,
        scale,
    )


# `loss_change` sums from the stored probabilities unless one below the normal range meets a
# logit move above this: with u <= 30 its term sₖ·expm1(u) stays below tiny·e³⁰ (2e-295 in
# float64, 1e-25 in float32), negligible.
_LARGE_MOVE = 30.0


def _row_changes(log_probs: jax.Array, moved: jax.Array) -> jax.Array:
    """Per row [N], log Σₖ sₖ·exp(uₖ) for the logit moves u [N, K] of every class, of any size."""
    small = moved < 1
    # sₖ·expm1(u) for small u; exp(log sₖ + u) − sₖ where u is large (no inf·0).
    terms = jnp.where(
        small,
        jnp.exp(log_probs) * jnp.expm1(jnp.where(small, moved, 0)),
        jnp.exp(log_probs + moved) - jnp.exp(log_probs),
    )
    total = jnp.sum(terms, axis=-1)
    # For large changes (a sum overflowing, or close to −1 where log1p cancels) the plain
    # shifted logsumexp is exact enough.
    accurate = jnp.isfinite(total) & (total > -0.5)
    return jnp.where(
        accurate,
        jnp.log1p(jnp.where(accurate, total, 0)),
        jax.nn.logsumexp(log_probs + moved, axis=-1),
    )


def logistic_objective(
    X: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    *,
    sample_weight: ArrayLike | None = None,
    l2: float | ArrayLike = 0.0,
    fit_intercept: bool = True,
    reference_class: bool = False,
    penalised: bool = False,
    row_chunk: int | None = None,
    transposed_copy: bool = False,
) -> LogisticObjective:
    """Build the penalised multinomial logistic objective (no validation; see the solvers').

    Args:
        X: [N, d] features, dense or a `jax.experimental.sparse.BCOO` (kept sparse); float64
            stays float64 (with x64 on), anything else becomes float32 or the default float
            dtype.
        labels: [N] integer labels in [0, num_classes).
        num_classes: K.
        sample_weight: [N] weights ≥ 0, or None for ones. They are normalised to sum to one.
        l2: L2 strength on W, `1 / (C·Σw)` in scikit-learn's terms; 0 for no penalty.
        fit_intercept: whether to fit the unpenalised intercept b.
        reference_class: fix class 0's column of W and intercept at zero.
        penalised: l2 is known to be positive (a static promise, `LogisticObjective.penalised`).
        row_chunk: `LogisticObjective.row_chunk` (None for a row-sharded X).
        transposed_copy: also hold X̃ᵀ [d̃, N] row-major (dense X only; an [N, d̃] copy more
            in memory) for the GEMMs X̃ᵀ·U, whose row of ones gives the sums over the rows.
            On the CPU a float64 GEMM contracting the rows of a row-major X ran at about half
            the speed of X·V (12.8 to 14.5 ms against 7.2 ms at 20,000 × 128 × 200) and at
            7.8 to 10.1 ms from the copy; float32 GEMMs run at one speed either way. The fits
            ask for it where `solvers._fit.wants_transposed_copy` says.

    Returns:
        A `LogisticObjective` pytree.
    """
    features = X if isinstance(X, sparse.BCOO) else jnp.asarray(X)
    if not jnp.issubdtype(features.dtype, jnp.floating):
        features = features.astype(jnp.result_type(float))
    elif jnp.finfo(features.dtype).bits < 32:
        features = features.astype(jnp.float32)
    dtype = features.dtype
    labels = integer_labels(labels)  # host int64 labels beyond int32: −1, not wrapped
    if jnp.issubdtype(labels.dtype, jnp.integer) and jnp.iinfo(labels.dtype).bits > 32:
        # Beyond int32 a label would wrap into range (2**32 + 1 to 1) and escape the check of
        # `_input_status` inside `jit`: make it −1, which the check reports.
        limit = jnp.iinfo(jnp.int32).max
        labels = jnp.where((labels < 0) | (labels > limit), -1, labels)
    labels = labels.astype(jnp.int32)
    if sample_weight is None:
        weights = jnp.full(labels.shape, 1.0 / max(labels.shape[0], 1), dtype)
    else:
        weights = normalized_weights(jnp.asarray(sample_weight, dtype))
    transposed = None
    if transposed_copy and not isinstance(features, sparse.BCOO):
        transposed = features.T
        if fit_intercept:  # X̃ᵀ = [X, 1]ᵀ: the sums over the rows in the same GEMM
            transposed = jnp.concatenate([transposed, jnp.ones_like(transposed[:1])])
        # Materialised as its own row-major array (XLA would otherwise be free to read X
        # through a transposed layout, the slow GEMM again).
        transposed = lax.optimization_barrier(transposed)
    return LogisticObjective(
        features=features,
        transposed_features=transposed,
        labels=labels,
        weights=weights,
        l2=jnp.asarray(l2, dtype),
        num_classes=num_classes,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
        penalised=penalised,
        row_chunk=row_chunk,
    )


def gradient_hessian_product(
    objective: LogisticObjective, theta: jax.Array
) -> tuple[jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]:
    """Loss, gradient and a Hessian-product closure at θ, probabilities computed once.

    Args:
        objective: the problem.
        theta: [P] parameters.

    Returns:
        (loss, grad [P], hvp) where `hvp(v)` returns H·v [P] for v [P] at two GEMMs each; the
        operator is symmetric positive semidefinite.
    """
    evaluation = evaluate(objective, theta, objective.free_logits(theta))

    def hvp(tangent: jax.Array) -> jax.Array:
        return hessian_vector_product(objective, evaluation, tangent)

    return evaluation.loss, evaluation.grad, hvp


def feature_gram(objective: LogisticObjective, shift: jax.Array | None = None) -> jax.Array:
    """A = X̃ᵀ·diag(ŵ)·X̃ [d̃, d̃], X̃ = [X, 1] with an intercept. Cost: O(N·d²), once per fit.

    With B = `class_curvature`, A ⊗ B approximates H (exact when every row has the same
    probabilities): the Kronecker preconditioner of the CG solvers. With `shift` μ [d] (a
    dense X with an intercept), the Gram of [X − 1·μᵀ, 1] (see `centred_feature_gram`).
    """
    features = objective.features
    if isinstance(features, sparse.BCOO):
        return sparse_feature_gram(features, objective.weights, objective.fit_intercept)

    def gram(rows, weights):
        if shift is not None:
            rows = rows - shift.astype(rows.dtype)[None, :]
        if objective.fit_intercept:
            rows = jnp.concatenate([rows, jnp.ones_like(rows[:, :1])], axis=1)
        return rows.T @ (weights[:, None] * rows)

    return column_sums_by_chunks(gram, features, objective.weights, objective.row_chunk)


def centred_feature_gram(objective: LogisticObjective) -> tuple[jax.Array, jax.Array | None]:
    """(A_c, μ): the Gram of X̃_c = [X − 1·μᵀ, 1] and μ, the weighted column means.

    Centring is a change of the intercept's variable: X̃_c = X̃·C with C = [[I, 0], [−μᵀ, 1]]
    (b_c = b + μᵀW), so A = C⁻ᵀ·A_c·C⁻¹ in exact arithmetic. In floating point A_c keeps what
    A rounds away: a column c + δ·z beside the intercept (δ·z ≪ c) has a scaled eigenvalue of
    order δ²/c² in A, below float32's eps for δ/c = 1e-4, and of order 1 in A_c, where X − μ
    is exact (Sterbenz: the difference of floats within a factor of two of each other). For a
    sparse X (centring would fill it) or without an intercept: (`feature_gram`, None).

    μ = x_r + Σᵢ ŵᵢ·(xᵢ − x_r), with x_r the row of largest weight: a column constant over the
    weighted rows then centres to exact zeros. Σᵢ ŵᵢ·xᵢ itself rounded 3 to 2.9999976 (float32,
    N = 300), and the column of 2.4e-6, Jacobi-scaled by 4e5, amplified rounding along the
    dependence with the intercept (intercepts of 8e5). Columns constant to the working
    precision are not centred (μⱼ = 0, see `centring_shift`). Cost: one pass over X for μ and
    the spreads, one for the Gram.
    """
    shift = feature_shift(objective)
    return feature_gram(objective, shift), shift


def feature_shift(
    objective: LogisticObjective, dominant: bool = False, data: bool = False
) -> jax.Array | None:
    """μ [d] of `centred_feature_gram`; None for a sparse X or without an intercept.

    `dominant`: only the columns whose mean dominates their spread are centred; `data`: the
    shift by which a fit centres X itself (`centring_shift`).
    """
    features = objective.features
    if isinstance(features, sparse.BCOO) or not objective.fit_intercept:
        return None
    reference = features[jnp.argmax(objective.weights)]

    def moments(rows, weights):
        deviations = rows - reference[None, :]
        return weights @ deviations, weights @ jnp.square(deviations)

    deviation, square = column_sums_by_chunks(
        moments, features, objective.weights, objective.row_chunk
    )
    return centring_shift(reference, deviation, square, features.dtype, dominant, data)


# A column is centred only where its spread exceeds this many times the rounding of its logits
# in the model's own variables (`centring_shift`).
CENTRED_SPREAD = 16.0

# The fits that centre X itself (`centred_input`) do so for spreads above this many ulps of the
# column: 1e6 + z in float32 (σ/m = 1e-6, 8 ulps), not a column constant but for a few ulps.
INPUT_SPREAD = 4.0

# `newton` and the diagonal preconditioner centre only the columns whose squared mean exceeds
# this many times their variance (`centring_shift` with `dominant`).
DOMINANT_MEAN = 100.0


def centring_shift(reference, deviation, square, dtype, dominant: bool = False, data: bool = False):
    """μ [d] for `centred_feature_gram`: the weighted means, 0 for columns constant to `dtype`.

    From Σᵢ ŵᵢ·(xᵢ − x_r) (`deviation`) and Σᵢ ŵᵢ·(xᵢ − x_r)² (`square`), ŵ summing to one:
    μ = x_r + deviation and the spread σ² = square − deviation². The products run in the
    model's variables θ, where a centred column's logits, of norm 1 along eⱼ/σⱼ, carry a
    rounding of about 2·eps·mⱼ/σⱼ (mⱼ² = μⱼ² + σⱼ², the column's and the intercept's terms).
    Centred, a column below that would be a direction that θ's arithmetic cannot resolve: a
    float32 column 7 with five rows one ulp above (σ/m = 7e-9), or 1e6 + z, along which CG
    proposed |W| ≈ 1e5 with b ≈ −7·W, logits that were rounding, and the fits stopped at W = 0
    (LINE_SEARCH_FAILED) or CONVERGED far above the optimum. Uncentred (μⱼ = 0, where
    0 < σⱼ ≤ `CENTRED_SPREAD`·eps·mⱼ), A's own rounding hides it as before. A constant column
    (σⱼ = 0) is centred, to exact zeros, and 7 + 1e-3·z (σ/m = 1.4e-4 in float32) too. NumPy
    or JAX arrays alike.

    With `dominant`, for `newton` and the diagonal preconditioner, only the columns whose
    mean dominates their spread, μⱼ² > `DOMINANT_MEAN`·σⱼ², are centred: those whose centred
    curvature the uncentred Hessian loses to its rounding first (σ²/μ² ≤ 1e-8 for 1e4 + z in
    float32, where `newton` stopped CONVERGED up to 6.5e-4 above the optimum). Centring every
    column also changed `newton`'s steps on unpenalised quasi-separated float32 fits (iris,
    μ²/σ² ≤ 50): two of eight such fits without a reference class went from CONVERGED to
    MAX_ITER at the same loss.

    With `data` (and `dominant`), for the fits that centre X itself (`centred_input`): they
    compute on the centred values, not in θ, so columns are centred down to a spread of a few
    ulps of the column (`INPUT_SPREAD`), and constant columns are not centred (centred, their
    minimum-norm optimum would put the whole shift in the intercept, not split it with the
    column's coefficient as in X's own variables).
    """
    mean = reference + deviation
    spread = (square - deviation**2).clip(0) ** 0.5
    magnitude = (mean**2 + spread**2) ** 0.5
    floor = INPUT_SPREAD if data else CENTRED_SPREAD
    lost = (spread > 0) & (spread <= floor * float(np.finfo(dtype).eps) * magnitude)
    if data:
        lost = lost | (spread == 0)
    if dominant:
        lost = lost | (mean**2 <= DOMINANT_MEAN * spread**2)
    return mean * (~lost).astype(mean.dtype)


def sparse_feature_gram(
    features: sparse.BCOO, weights: jax.Array, fit_intercept: bool
) -> jax.Array:
    """X̃ᵀ·diag(w)·X̃ [d̃, d̃] for a sparse X, X̃ = [X, 1] with an intercept, never dense whole.

    Xᵀ·diag(w)·X by `weighted_gram`, bordered by the weighted column sums Xᵀw and Σw.
    """
    gram = weighted_gram(features, weights)
    if not fit_intercept:
        return gram
    sums = transpose_matmul(features, weights.astype(gram.dtype))
    total = jnp.sum(weights).astype(gram.dtype)
    return jnp.block([[gram, sums[:, None]], [sums[None, :], total[None, None]]])


# From this many classes on, without a reference class, `class_curvature` is B's diagonal.
DIAGONAL_CLASS_CURVATURE_CLASSES = 100


def diagonal_class_curvature(num_classes: int, reference_class: bool) -> bool:
    """Whether `class_curvature` gives B's diagonal [Kf] rather than B [Kf, Kf] (static)."""
    return not reference_class and num_classes >= DIAGONAL_CLASS_CURVATURE_CLASSES


def class_curvature(objective: LogisticObjective, evaluation: Evaluation) -> jax.Array:
    """B = Σᵢ ŵᵢ·(diag(sᵢ) − sᵢsᵢᵀ) over the free classes [Kf, Kf], or its diagonal [Kf].

    The full B costs O(N·K²) per outer iteration (a [K, N] × [N, K] GEMM) and the Kronecker
    preconditioner then an O(K³) eigendecomposition and O(d·K²) rotations per CG step. Its
    off-diagonal part, the coupling −Σᵢ ŵᵢsᵢsᵢᵀ between classes, matters where a reference class
    ties the free classes together (dropping it took 1.4 to 3.1 times the Hessian products at
    K = 30 to 150) but not without one, where B's null direction, a common shift of all classes,
    is one the solvers never move along: at 50 to 800 classes the diagonal
    b = Σᵢ ŵᵢ·sᵢ ⊙ (1 − sᵢ), O(N·K), took the same products to within 13% (Gaussian class
    means, isotropic and anisotropic features, l2 = 1/N and 1e-6) and made fits at N = 20,000,
    d = 128 18% faster at K = 200 and 33% at K = 800. So from
    `DIAGONAL_CLASS_CURVATURE_CLASSES` classes on, without a reference class, this returns b.
    """
    probs = evaluation.probs
    weighted = objective.weights[:, None] * probs
    if diagonal_class_curvature(objective.num_classes, objective.reference_class):
        return jnp.sum(weighted * (1 - probs), axis=0)
    return jnp.diag(jnp.sum(weighted, axis=0)) - weighted.T @ probs


def dense_features(features: jax.Array | sparse.BCOO) -> jax.Array:
    """X as a dense array (only for the explicit-Hessian paths, meant for small d)."""
    return features.todense() if isinstance(features, sparse.BCOO) else features
