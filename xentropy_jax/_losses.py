"""Softmax cross-entropy with closed-form derivative rules attached through ``jax.custom_jvp``.

For logits ``z`` and labels ``y`` of total mass ``m = Σ_k y_k``, with ``s = softmax(z)``::

    L(z, y)  = m · logsumexp(z) − yᵀz
    ∇_z L    = m · s − y                      (one-hot labels: s − y)
    ∇²_z L   = m · (diag(s) − s sᵀ)           (does not depend on which class is labelled)
    ∇²_z L v = m · s ⊙ (v − sᵀv)              (O(K) per row; no K×K matrix)

The rules below express every tangent through differentiable primal computations: the loss
itself, and a softmax whose own ``custom_jvp`` gives ``ṡ = s ⊙ (ż − sᵀż)``. Differentiating a
rule again therefore lands on a closed form again, to any order, and the reverse pass of
``jax.grad`` saves a single ``[..., K]`` residual, the gradient ``m · s − y`` itself.

The public functions move the class axis (or axes) last, promote half precision to float32,
apply ``where`` masks and label smoothing, and call one of two private cores: ``_soft_loss``
(dense labels of any mass) or ``_integer_loss`` (one class index per row, no one-hot array).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Axis = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# Private cores: class axis last, compute dtype, `where` of the logits' shape or None.
# --------------------------------------------------------------------------------------------


def _shifted_exp(logits: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Return ``exp(z − c)`` (zero where masked) and ``c``, with ``c`` the finite row maximum.

    The shift is the row maximum over included classes, raised to the lowest finite number when
    every class is ``-inf`` or masked so that no ``inf − inf`` appears. It is computed from
    ``stop_gradient(z)``: the normaliser does not depend on it, and no derivative of ``max`` (a
    select on the input) enters the higher-order rules.
    """
    peak = jnp.max(
        jax.lax.stop_gradient(logits), axis=-1, keepdims=True, where=where, initial=-jnp.inf
    )
    # A row with no finite included logit has peak −inf; any finite shift serves it. `maximum`
    # (not a select) keeps the whole softmax in one fused kernel on CPU.
    peak = jnp.maximum(peak, jnp.finfo(logits.dtype).min)
    unnormalized = jnp.exp(logits - peak)
    if where is not None:
        unnormalized = jnp.where(where, unnormalized, 0.0)
    return unnormalized, peak


def _logsumexp(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """Row-wise ``log Σ_k exp(z_k)`` over included classes, ``-inf`` for an empty row."""
    unnormalized, peak = _shifted_exp(logits, where)
    return jnp.log(unnormalized.sum(axis=-1)) + peak[..., 0]


@jax.custom_jvp
def _softmax(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """Softmax over the last axis; masked classes and empty rows get probability 0."""
    unnormalized, _ = _shifted_exp(logits, where)
    # The largest included term is exp(0) = 1, so the total is 0 (nothing included) or >= 1:
    # max(total, 1) guards the empty row exactly, without a select.
    total = unnormalized.sum(axis=-1, keepdims=True)
    return unnormalized / jnp.maximum(total, 1.0)


def hessian_product_from_probs(
    probs: jax.Array, tangents: jax.Array, where: jax.Array | None = None
) -> jax.Array:
    """``(diag(s) − s sᵀ) v = s ⊙ (v − sᵀv)`` per row, classes last, from the probabilities.

    The one implementation of the closed-form product: the softmax's derivative rule, the public
    HVP, the Gauss-Newton operator and the logistic objective all call it.
    """
    mean = jnp.sum(probs * tangents, axis=-1, keepdims=True, where=where)
    return probs * (tangents - mean)


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
    # ṡ = s ⊙ (ż − sᵀż), built from the primal output so that one residual (s) is saved and a
    # further derivative goes through this rule again.
    logits, where = primals
    logits_dot, _ = tangents
    probs = _softmax(logits, where)
    return probs, hessian_product_from_probs(probs, logits_dot, where)


def _dot_rows(a: jax.Array, b: jax.Array, where: jax.Array | None) -> jax.Array:
    """Row-wise ``Σ_k a_k b_k`` over included classes."""
    return jnp.sum(a * b, axis=-1, where=where)


@jax.custom_jvp
def _soft_loss(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """``m · logsumexp(z) − yᵀz`` per row, for labels already zero on masked classes."""
    mass = labels.sum(axis=-1)
    # 0 · (−inf) is NaN: a class that carries no label contributes nothing, whatever its logit.
    label_logits = jnp.where(labels != 0, labels * logits, 0.0).sum(axis=-1)
    normalizer = jnp.where(mass != 0, mass * _logsumexp(logits, where), 0.0)
    return normalizer - label_logits


@_soft_loss.defjvp
def _soft_loss_jvp(primals, tangents):
    # dL = (m·s − y)ᵀ ż + ẏᵀ (logsumexp(z) − z). Symbolic zeros let the common case (labels not
    # differentiated) skip the second term entirely.
    logits, labels, where = primals
    logits_dot, labels_dot, _ = tangents
    loss = _soft_loss(logits, labels, where)
    terms = []
    if not isinstance(logits_dot, SymbolicZero):
        mass = labels.sum(axis=-1, keepdims=True)
        grad = mass * _softmax(logits, where) - labels
        terms.append(_dot_rows(grad, logits_dot, where))
    if not isinstance(labels_dot, SymbolicZero):
        # ∂L/∂y_k = −log s_k, +inf on a −inf logit: such a class counts as masked (derivative 0)
        # unless it carries label mass, as in the primal. The predicate must not involve the
        # tangent, which is linear.
        neg_log_probs = _logsumexp(logits, where)[..., None] - logits
        counts = (labels != 0) | jnp.isfinite(logits)
        terms.append(jnp.where(counts, labels_dot * neg_log_probs, 0.0).sum(axis=-1))
    return loss, sum(terms[1:], start=terms[0]) if terms else jnp.zeros_like(loss)


_soft_loss.defjvp(_soft_loss_jvp, symbolic_zeros=True)


def _label_is_valid(labels: jax.Array, num_classes: int) -> jax.Array:
    return (labels >= 0) & (labels < num_classes)


@jax.custom_jvp
def _integer_loss(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """``logsumexp(z) − z[label]`` per row; NaN for a label outside ``[0, K)``."""
    num_classes = logits.shape[-1]
    safe_labels = jnp.clip(labels, 0, num_classes - 1)[..., None]
    label_logits = jnp.take_along_axis(logits, safe_labels, axis=-1)[..., 0]
    loss = jnp.where(
        _label_is_valid(labels, num_classes), _logsumexp(logits, where) - label_logits, jnp.nan
    )
    if where is not None:
        loss = jnp.where(jnp.any(where, axis=-1), loss, 0.0)
    return loss


@_integer_loss.defjvp
def _integer_loss_jvp(primals, tangents):
    # dL = (s − e_label)ᵀ ż; the one-hot vector is a comparison fused into the product, never an
    # array, and an out-of-range label turns the row's gradient into NaN like its value.
    logits, labels, where = primals
    logits_dot, _, _ = tangents
    num_classes = logits.shape[-1]
    onehot = labels[..., None] == jnp.arange(num_classes)
    # One factor per row (1, NaN for a bad label, 0 for a masked row) applied by a broadcast
    # multiply rather than a select over [..., K], which keeps the product in one fused kernel.
    row_scale = jnp.where(_label_is_valid(labels, num_classes), 1.0, jnp.nan).astype(logits.dtype)
    if where is not None:
        row_scale = jnp.where(jnp.any(where, axis=-1), row_scale, 0.0)
    grad = (_softmax(logits, where) - onehot) * row_scale[..., None]
    # No `where` in this sum: a label on a masked class still enters the loss through z[label].
    return _integer_loss(logits, labels, where), _dot_rows(grad, logits_dot, None)


# --------------------------------------------------------------------------------------------
# Layout and dtype handling shared by the public functions.
# --------------------------------------------------------------------------------------------


def _check_floating(logits: jax.typing.ArrayLike) -> jax.Array:
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(
            f"logits must be a floating-point array, got dtype {logits.dtype}; "
            "cast them with logits.astype(jnp.float32)."
        )
    return logits


def _compute_dtype(*dtypes) -> np.dtype:
    """Float32 for half precision (bfloat16, float16) inputs, else the promoted float type."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    if isinstance(axis, int):
        axes = (axis,)
    elif isinstance(axis, Sequence) and all(isinstance(a, int) for a in axis):
        axes = tuple(axis)
    else:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}.")
    if not axes:
        raise ValueError("axis must name at least one class axis.")
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for logits with {ndim} dimensions.")
    normalized = tuple(a % ndim for a in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"axis {axis!r} repeats an axis.")
    return normalized


def _classes_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Move the class axes of ``x`` to the end (in the given order) and flatten them."""
    batch = tuple(a for a in range(x.ndim) if a not in axes)
    if axes == (x.ndim - 1,):
        return x
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (-1,))


def _classes_back(x: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Inverse of ``_classes_last`` for an array of the logits' ``shape``."""
    if axes == (len(shape) - 1,):
        return x
    batch = tuple(a for a in range(len(shape)) if a not in axes)
    x = x.reshape(tuple(shape[a] for a in batch + axes))
    return jnp.transpose(x, np.argsort(batch + axes))


def _prepare_where(
    where: jax.typing.ArrayLike | None, logits: jax.Array, axes: tuple[int, ...]
) -> jax.Array | None:
    """A boolean mask of the logits' shape, classes last; a per-example mask is broadcast."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {where.dtype}.")
    if where.ndim != logits.ndim:
        where = jnp.expand_dims(where, axes)
    try:
        where = jnp.broadcast_to(where, logits.shape)
    except ValueError as error:
        raise ValueError(
            f"where of shape {where.shape} does not broadcast to the logits' shape "
            f"{logits.shape} (it must be of the batch shape or of the logits' shape)."
        ) from error
    return _classes_last(where, axes)


def _check_label_smoothing(label_smoothing: float | jax.Array) -> None:
    # Any concrete value (Python, NumPy or JAX scalar) is checked; a tracer cannot be.
    if isinstance(label_smoothing, jax.core.Tracer):
        return
    value = np.asarray(label_smoothing, dtype=float)
    if not np.all((value >= 0.0) & (value <= 1.0)):
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}.")


def _no_smoothing(label_smoothing: float | jax.Array) -> bool:
    return isinstance(label_smoothing, (int, float)) and label_smoothing == 0


def _smooth(labels: jax.Array, where: jax.Array | None, label_smoothing) -> jax.Array:
    """``(1 − α)·y + α·m/K`` with ``K`` the number of included classes: the mass ``m`` is kept."""
    if where is None:
        num_included = labels.shape[-1]
        uniform = labels.sum(axis=-1, keepdims=True) / num_included
    else:
        num_included = where.sum(axis=-1, keepdims=True)
        uniform = labels.sum(axis=-1, keepdims=True) / jnp.maximum(num_included, 1)
        uniform = jnp.where(where, uniform, 0.0)
    return (1.0 - label_smoothing) * labels + label_smoothing * uniform


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.Array = 0.0,
) -> jax.Array:
    r"""Softmax cross-entropy against labels of any total mass, per example.

    With ``s = softmax(z)`` over the class axis and ``m = Σ_k y_k`` the label mass,

    .. math::
        L(z, y) = m \operatorname{logsumexp}(z) - y^\top z = -\sum_k y_k \log s_k,
        \qquad \nabla_z L = m s - y,
        \qquad \nabla^2_z L = m (\operatorname{diag}(s) - s s^\top).

    These derivatives are attached as closed forms through ``jax.custom_jvp``, so ``jax.grad``,
    ``jax.jvp``, ``jax.hessian`` and their compositions use them (to any order) under ``jit``
    and ``vmap``. The labels are differentiable too: ``∂L/∂y_k = logsumexp(z) − z_k``.

    It takes the same arguments and gives the same numbers as ``optax.softmax_cross_entropy``,
    plus ``label_smoothing``, and differs where optax returns NaN: a ``-inf`` logit is a masked
    class (finite loss, zero gradient and curvature there) unless a label sits on it, which gives
    ``+inf`` as the maths says. ``+inf`` or NaN logits give NaN for their row only. Half
    precision inputs are computed in float32 and returned in the promoted input dtype.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (floating point).
        labels: ``[..., K]`` (or broadcastable) target weights: one-hot, soft, or unnormalised.
        axis: the class axis, or a tuple of axes whose elements together form the classes.
        where: boolean mask of the batch shape (a ``False`` row gives exactly 0) or of the
            logits' shape (``False`` classes are excluded from the softmax and their labels
            are ignored).
        label_smoothing: ``α`` in ``[0, 1]``; the labels become ``(1 − α)·y + α·m/K`` over the
            ``K`` included classes, keeping their mass (``optax.smooth_labels`` for one-hot).

    Returns:
        ``[...]``: the loss of each example (no reduction).

    Raises:
        TypeError: if the logits are not floating point, or ``where`` is not boolean.
        ValueError: for a bad ``axis``, shapes that do not broadcast, or ``α`` outside [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> print(xj.softmax_cross_entropy(logits, labels).round(4))
        [0.2761 2.9518]
    """
    logits = _check_floating(logits)
    labels = jnp.asarray(labels)
    _check_label_smoothing(label_smoothing)
    try:
        labels = jnp.broadcast_to(labels, logits.shape)
    except ValueError as error:
        raise ValueError(
            f"labels of shape {labels.shape} do not broadcast to the logits' shape {logits.shape}."
        ) from error
    out_dtype = jnp.result_type(logits, labels)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = logits.dtype
    dtype = _compute_dtype(logits.dtype, labels.dtype)
    axes = _normalize_axes(axis, logits.ndim)
    where = _prepare_where(where, logits, axes)
    logits = _classes_last(logits, axes).astype(dtype)
    labels = _classes_last(labels, axes).astype(dtype)
    if where is not None:
        labels = jnp.where(where, labels, 0.0)
    if not _no_smoothing(label_smoothing):
        labels = _smooth(labels, where, label_smoothing)
    return _soft_loss(logits, labels, where).astype(out_dtype)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    label_smoothing: float | jax.Array = 0.0,
) -> jax.Array:
    r"""Softmax cross-entropy against one class index per example.

    .. math::
        L(z, c) = \operatorname{logsumexp}(z) - z_c,
        \qquad \nabla_z L = s - e_c,
        \qquad \nabla^2_z L = \operatorname{diag}(s) - s s^\top,

    with the derivatives attached through ``jax.custom_jvp`` (see
    :func:`softmax_cross_entropy`); the one-hot vector ``e_c`` is never materialised.

    Same arguments and numbers as ``optax.softmax_cross_entropy_with_integer_labels``, with
    these differences, all on inputs where optax's answer is not meaningful:

    * a label outside ``[0, K)`` (negative ones included, which optax wraps around) gives a NaN
      loss and NaN gradient for its row, never a plausible number; a row fully masked by
      ``where`` gives 0 whatever its label;
    * a ``-inf`` logit is a masked class: finite loss and zero gradient there, unless the label
      sits on it, which gives ``+inf``.

    With ``label_smoothing = α`` the target is ``(1 − α)·e_c + α/K`` over the included classes.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (floating point).
        labels: ``[...]`` integer class indices (a flat index into the class axes when ``axis``
            is a tuple).
        axis: the class axis, or a tuple of axes whose elements together form the classes.
        where: boolean mask of the batch shape or of the logits' shape (see
            :func:`softmax_cross_entropy`).
        label_smoothing: ``α`` in ``[0, 1]``.

    Returns:
        ``[...]``: the loss of each example (no reduction).

    Raises:
        TypeError: if the logits are not floating point or the labels are not integers.
        ValueError: for a bad ``axis``, mismatched shapes, or ``α`` outside [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> print(xj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])).round(4))
        [0.2761 2.9518]
    """
    logits = _check_floating(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype}; for one-hot or "
            "soft labels use softmax_cross_entropy."
        )
    _check_label_smoothing(label_smoothing)
    axes = _normalize_axes(axis, logits.ndim)
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels of shape {labels.shape} do not match the logits' batch shape {batch_shape} "
            f"(logits {logits.shape}, class axis {axis})."
        )
    out_dtype = logits.dtype
    where = _prepare_where(where, logits, axes)
    logits = _classes_last(logits, axes).astype(_compute_dtype(logits.dtype))
    if _no_smoothing(label_smoothing):
        return _integer_loss(logits, labels, where).astype(out_dtype)
    num_classes = logits.shape[-1]
    onehot = (labels[..., None] == jnp.arange(num_classes)).astype(logits.dtype)
    valid = _label_is_valid(labels, num_classes)[..., None]
    # NaN labels make an out-of-range row's loss and gradient NaN through the formulas; masked
    # classes (a fully masked row included) carry no label.
    onehot = jnp.where(valid, onehot, jnp.nan)
    if where is not None:
        onehot = jnp.where(where, onehot, 0.0)
    smoothed = _smooth(onehot, where, label_smoothing)
    return _soft_loss(logits, smoothed, where).astype(out_dtype)


def softmax_cross_entropy_hessian(
    logits: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""The Hessian of the softmax cross-entropy with respect to the logits, as a matrix.

    .. math:: \nabla^2_z L = \operatorname{diag}(s) - s s^\top, \qquad s = \operatorname{softmax}(z)

    for labels of unit mass (multiply by ``m`` for mass ``m``). It does not depend on the
    labels. It is symmetric positive semi-definite, ``H·1 = 0``, and its eigenvalues lie in
    ``[0, 1/2]``. Masked (``-inf`` or ``where=False``) classes get zero rows and columns.
    This forms ``K×K`` per example: prefer :func:`softmax_cross_entropy_hvp` for products.

    Args:
        logits: ``[..., K]`` floating point (the class axis may sit elsewhere: ``axis``).
        axis: the class axis.
        where: boolean mask of the batch shape or of the logits' shape.

    Returns:
        ``[..., K, K]``: one matrix per example, the batch axes in order and the class axis
        moved last.

    Example:
        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> print(xj.softmax_cross_entropy_hessian(jnp.zeros(2)))
        [[ 0.25 -0.25]
         [-0.25  0.25]]
    """
    logits = _check_floating(logits)
    axes = _normalize_axes(axis, logits.ndim)
    where = _prepare_where(where, logits, axes)
    probs = _softmax(_classes_last(logits, axes).astype(_compute_dtype(logits.dtype)), where)
    eye = jnp.eye(probs.shape[-1], dtype=probs.dtype)
    # diag(s) − s sᵀ = s_i (δ_ij − s_j)
    return (probs[..., :, None] * (eye - probs[..., None, :])).astype(logits.dtype)


def softmax_cross_entropy_hvp(
    logits: jax.typing.ArrayLike,
    tangents: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Product of the softmax cross-entropy Hessian with a vector, per example, matrix-free.

    .. math:: (\operatorname{diag}(s) - s s^\top)\, v = s \odot (v - s^\top v)

    in ``O(K)`` per example (two passes over the classes), for labels of unit mass (multiply by
    ``m`` for mass ``m``). Equals ``jax.jvp(jax.grad(loss), (z,), (v,))[1]`` for each example's
    loss, and is itself differentiable.

    Args:
        logits: ``[..., K]`` floating point.
        tangents: ``[..., K]`` vectors ``v``, same shape as ``logits``.
        axis: the class axis.
        where: boolean mask of the batch shape or of the logits' shape.

    Returns:
        ``[..., K]``: ``H v`` in the layout and dtype of ``tangents``.

    Raises:
        ValueError: if ``tangents`` and ``logits`` differ in shape.

    Example:
        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> print(xj.softmax_cross_entropy_hvp(jnp.zeros(2), jnp.array([1.0, -1.0])))
        [ 0.5 -0.5]
    """
    logits = _check_floating(logits)
    tangents = jnp.asarray(tangents)
    if tangents.shape != logits.shape:
        raise ValueError(
            f"tangents of shape {tangents.shape} must have the logits' shape {logits.shape}."
        )
    axes = _normalize_axes(axis, logits.ndim)
    where = _prepare_where(where, logits, axes)
    dtype = _compute_dtype(logits.dtype, tangents.dtype)
    probs = _softmax(_classes_last(logits, axes).astype(dtype), where)
    vectors = _classes_last(tangents, axes).astype(dtype)
    product = hessian_product_from_probs(probs, vectors, where)
    return _classes_back(product, axes, logits.shape).astype(jnp.result_type(tangents, logits))
