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

Accuracy in the tails: the complement ``1 − s_k`` is never formed by subtraction from 1 but from
the other classes' exponentials (``softmax_parts``), the gradient is ``s (m − y) − y (1 − s)``
and the Hessian product shifts ``v`` by its value at the most probable class
(``hessian_product_from_probs``). The integer loss takes ``1 − s_label`` from one sum of the
other classes' exponentials (``_label_split``), so that its value and gradient cost the passes
of a plain softmax. Every component of the gradient, Hessian and product then keeps a few ulps
of its own size at any margin, and the float32 Hessian stays positive semi-definite;
``docs/losses.md`` states the guarantee and the tests that check it.

The public functions move the class axis (or axes) last, promote half precision to float32,
apply ``where`` masks and label smoothing, and call one of two private cores: ``_soft_loss``
(dense labels of any mass) or ``_integer_loss`` (one class index per row, no one-hot array).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.custom_batching
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ._manual import cond, explicit_mesh
from ._precision import at_least_float32

Axis = int | Sequence[int] | None


# --------------------------------------------------------------------------------------------
# Private cores: class axis last, compute dtype, `where` of the logits' shape or None.
# --------------------------------------------------------------------------------------------


def _peak(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """The shift ``c``: the row maximum over included classes, ``[..., 1]``.

    It is at least the lowest finite number, also when every class is ``-inf`` or masked, so
    that no ``inf − inf`` appears: any finite shift serves such a row. Masked classes count as
    that number, not as ``-inf``: with ``jnp.max``'s ``where``, ``jax_debug_infs`` stopped every
    call with a row or class mask at its ``-inf``. It is computed from ``stop_gradient(z)``:
    the normaliser does not depend on it, and no derivative of ``max`` (a select on the input)
    enters the higher-order rules.
    """
    lowest = jnp.finfo(logits.dtype).min
    logits = jax.lax.stop_gradient(logits)
    if where is not None:  # (`jnp.max`'s own `where` fills with -inf)
        logits = jnp.where(where, logits, lowest)
    if logits.shape[-1] == 0:
        return jnp.full((*logits.shape[:-1], 1), lowest, logits.dtype)
    # Raised after the reduction, not as its start (`initial`): a start other than max's
    # identity, -inf, made the integer value_and_grad of 1,024 × 32,000 logits 15% slower.
    return jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), lowest)


def _below(logits: jax.Array, peak: jax.Array) -> jax.Array:
    """``z − c``, clamped at the smallest normal number above 0: ``exp`` of it is at most 1.

    The clamp is not at 0: ``min`` and ``max`` split their derivative half and half at a tie,
    and the winner of every row sits at ``z = c``. The primal computations here are
    differentiated by plain autodiff where JAX applies forward mode to a reverse pass staged
    inside ``lax.scan``, ``lax.map`` or ``fori_loop`` (the custom rules count in the first pass
    only), so every second derivative of a loss computed in a loop goes through them; with the
    clamp at 0 the integer loss's Hessian there was 25% off and not symmetric.

    Nor may a selection near 0 sit on the derivative's path: that pass recomputes z − c, and
    XLA rounded it otherwise there (a gathered batch's product fused into it), so the winner's
    0 came out above 2⁻¹²⁶, the clamp took it, and its derivative was lost: ``jax.hessian`` of
    such a loss inside ``lax.scan`` was 13 to 50% off at margins of 10 to 30. The clamps keep
    their values and take the derivative of the difference (`_valued_as`), bounded only at the
    finite range (a ``-inf`` logit's difference would make that derivative NaN), where no
    rounding reaches. ``difference − stop_gradient(excess)`` was right too but cost 2.5× in the
    one-hot ``value_and_grad`` at 8,192 × 1,000 float32 (XLA split the fusion).
    """
    below = logits - peak
    finite = jnp.maximum(below, jnp.finfo(logits.dtype).min)
    return _valued_as(jnp.minimum(below, jnp.finfo(logits.dtype).tiny), finite)


def _gaps(logits: jax.Array, peak: jax.Array) -> jax.Array:
    """``c − z``, clamped at minus the smallest normal number (not at 0; see ``_below``)."""
    gaps = peak - logits
    finite = jnp.minimum(gaps, jnp.finfo(logits.dtype).max)
    return _valued_as(jnp.maximum(gaps, -jnp.finfo(logits.dtype).tiny), finite)


def _valued_as(value: jax.Array, derivative_of: jax.Array) -> jax.Array:
    """``value`` with the derivative of ``derivative_of``, a number equal to it in exact arithmetic.

    ``stop_gradient(value) + (x − stop_gradient(x))``: the second term is exactly 0 for a finite
    ``x``. For the row sums whose exact value needs a clamp or a cancellation-free formula
    (``R``, the normaliser) while autodiff must see the plain sum (see ``_below``).
    """
    return jax.lax.stop_gradient(value) + (derivative_of - jax.lax.stop_gradient(derivative_of))


def _exponentials(logits: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``e = exp(min(z − c, 0))`` (zero where masked) and the shift ``c``; every ``e_k ≤ 1``.

    The largest included class has ``e = exp(0) = 1``. The ``min`` changes nothing for logits
    held in memory, but XLA may fuse the logits' producer (``x / T``) into both the maximum and
    this exponential and round it differently in each (a multiply by the reciprocal contracted
    into a fused multiply-add): without the ``min`` a logit can then exceed its own row maximum
    by many units and overflow the exponential.
    """
    peak = _peak(logits, where)
    exps = jnp.exp(_below(logits, peak))
    if where is not None:
        exps = jnp.where(where, exps, 0.0)
    return exps, peak


def _totals(exps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``Σ_k e_k`` and ``R = Σ_k e_k − 1`` (the other classes' share beside the largest).

    Both of shape ``[..., 1]``.

    ``R`` comes without cancellation: when the total is below 3/2, every class but the largest
    has ``e_k < 1/2``, so ``min(e_k, 1 − e_k)`` is ``e_k`` for them and 0 for the largest
    (``e = 1``), and their sum is ``R`` to the last bit even where ``1 + R`` rounds to 1.
    Otherwise ``R ≥ 1/2`` and the subtraction loses nothing. Tied maxima count once each beyond
    the first, as they should. ``R ≥ 0`` always (also under the fused rounding described in
    ``_exponentials``), and an empty row gets ``R = 0``. Autodiff sees ``R`` as the total
    (``_valued_as``): the winner's term ``1 − e`` would have the wrong sign.
    """
    total = exps.sum(axis=-1, keepdims=True)
    below_half = jnp.minimum(exps, 1.0 - exps).sum(axis=-1, keepdims=True)
    rest = jnp.maximum(jnp.where(total < 1.5, below_half, total - 1.0), 0.0)
    return total, _valued_as(rest, total)


def _normaliser(total: jax.Array) -> jax.Array:
    """``1 / total`` per row, ``1`` for an empty row (total 0; otherwise it is at least 1).

    Autodiff sees the total itself (``_valued_as``): a confident row's total is exactly 1, where
    ``max(total, 1)`` would halve its derivative.
    """
    return 1.0 / _valued_as(jnp.maximum(total, 1.0), total)


def _rest(exps: jax.Array) -> jax.Array:
    return _totals(exps)[1]


@jax.custom_jvp
def softmax_parts(logits: jax.Array, where: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(s, 1 − s)`` over the last axis, each component to a few ulps of its own size.

    ``s_k = e_k / (1 + R)`` and ``1 − s_k = (R + (1 − e_k)) / (1 + R)``: the complement is the
    other classes' exponentials over the total, never ``1 − s_k`` by subtraction, so the winner
    of a confident row keeps ``1 − s ≈ R`` where ``s`` itself rounds to 1. Masked classes and
    empty rows get probability 0 (complement 1).
    """
    exps, _ = _exponentials(logits, where)
    total, rest = _totals(exps)
    # Computing s from the plain total (rather than 1 + R) lets XLA drop R where only s is
    # needed. Reciprocals per row: one multiply per class.
    probs = exps * _normaliser(total)
    # e − 1 is exact for e ≥ 1/2 (Sterbenz) and R + (1 − e) adds two non-negative numbers.
    complement = (rest - (exps - 1.0)) * (1.0 / (1.0 + rest))
    return probs, complement


@softmax_parts.defjvp
def _softmax_parts_jvp(primals, tangents):
    # ṡ = s ⊙ (ż − sᵀż) and (1 − s)˙ = −ṡ, built from the primal output so that one residual (s)
    # is saved and a further derivative goes through this rule again.
    logits, where = primals
    logits_dot, _ = tangents
    probs, complement = softmax_parts(logits, where)
    probs_dot = hessian_product_from_probs(probs, logits_dot, where)
    return (probs, complement), (probs_dot, -probs_dot)


def softmax_rule(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """Softmax over the last axis; masked classes and empty rows get probability 0."""
    return softmax_parts(logits, where)[0]


def hessian_product_from_probs(
    probs: jax.Array,
    tangents: jax.Array,
    where: jax.Array | None = None,
    *,
    complete: bool = True,
) -> jax.Array:
    """``(diag(s) − s sᵀ) v = s ⊙ (v − sᵀv)`` per row, classes last, from the probabilities.

    The one implementation of the closed-form product: the softmax's derivative rule, the public
    HVP, the Gauss-Newton operator and the logistic objective all call it.

    ``v`` is first shifted by its value ``r`` at the most probable class (the mean over tied
    classes): ``v − sᵀv = (v − r) − sᵀ(v − r)`` with no term from that class, so ``sᵀ(v − r)``
    keeps the other classes' contributions where ``sᵀv`` would round them away against the
    winner's, or against the two or three classes that share the mass. Every component of the
    product is then accurate to a few ulps of ``s_k (|v_k − sᵀv| + Σ_j s_j |v_j − sᵀv| / max s)``
    at any margin (``max s ≥ 1/2`` in a confident row), a constant vector maps to 0 wherever no
    other class comes within 4 eps of the most probable one, and the operator stays positive
    semi-definite up to the rounding of its smallest nonzero eigenvalue, in float32 too. The
    shift costs a maximum and one reduction over the classes. Two classes need neither:
    ``Hv = s₀s₁(v₀ − v₁)·[1, −1]``.

    ``complete=False`` says that classes were left out of ``probs`` (with zero tangent there,
    as the logistic objective's reference class): the rows do not sum to 1, the shift would be
    wrong, and the plain formula is used.
    """
    if where is not None:
        # s and the marker below are 0 on masked classes; the tangents there must not count.
        tangents = jnp.where(where, tangents, 0)
    if not complete:
        return probs * (tangents - _row_sums_of_products(probs, tangents))
    if probs.shape[-1] == 2:
        # Two classes: diag(s) − s sᵀ = s₀s₁·[[1, −1], [−1, 1]], so Hv = s₀s₁(v₀ − v₁)·[1, −1]
        # with no sum over the classes (which costs as much as the rest in rows this short):
        # each component keeps a few ulps at any margin, and the operator is exactly PSD.
        first = probs[..., :1] * probs[..., 1:] * (tangents[..., :1] - tangents[..., 1:])
        signs = 1 - 2 * jax.lax.broadcasted_iota(first.dtype, tangents.shape, tangents.ndim - 1)
        return first * signs
    # r = v at the most probable class (the mean over classes tied with it): floor(s / max s)
    # is 1 there and 0 elsewhere; the factor 1 + 4 eps keeps the maximum itself at 1 when XLA
    # divides by multiplying with a rounded reciprocal. A maximum and a count cost one pass
    # more over [..., K] than the old marker floor(2s) − floor(s) of a class with s ≥ 1/2
    # (1.1-1.4× at 1,024 × 32,000, 1.0-1.04× at 8,192 × 1,000; docs/losses.md).
    if probs.shape[-1] == 0:  # no classes: nothing to take a maximum of, and no product
        return probs * tangents
    peak = jnp.maximum(jnp.max(probs, axis=-1, keepdims=True), jnp.finfo(probs.dtype).tiny)
    top = jnp.floor(probs * ((1 + 4 * jnp.finfo(probs.dtype).eps) / peak))
    count = jnp.maximum(jnp.sum(top, axis=-1, keepdims=True), 1)
    shift = _row_sums_of_products(top, tangents) / count
    centered = tangents - shift
    shape = jnp.broadcast_shapes(probs.shape, centered.shape)
    return probs * (centered - _spread(_row_sums_of_products(probs, centered), shape))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _spread(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[..., 1]`` broadcast to ``shape``; its tangent is spread by a contraction instead.

    Reverse mode transposes a broadcast over the classes into a plain sum, and the Hessian
    product's ``s ⊙ (… − spread(Σ_k s_k c_k))`` then meets the CPU backend's wrong float32
    fusion of ``Σ_k(s ⊙ v)`` (see `_row_sums_of_products`): ``jax.jit(jax.jacrev)`` of a
    Hessian product came out 16–60% off. The tangent's contraction with ones transposes into a
    contraction, which stays out of that fusion. The primal keeps the broadcast: the solvers'
    compiled Hessian products are the same instructions as with the plain formula.
    """
    return jnp.broadcast_to(rows, shape)


@_spread.defjvp
def _spread_jvp(shape, primals, tangents):
    (rows,), (rows_dot,) = primals, tangents
    ones = jnp.ones(shape, rows_dot.dtype)
    highest = jax.lax.Precision.HIGHEST
    spread = jnp.einsum("...,...k->...k", rows_dot[..., 0], ones, precision=highest)
    return _spread(rows, shape), spread


def _row_sums_of_products(a: jax.Array, b: jax.Array) -> jax.Array:
    """``Σ_k a_k b_k`` per row, ``[..., 1]``, written as a contraction rather than a sum.

    Both are the same numbers: XLA rewrites a contraction with no free axis into the same fused
    multiply and sum. The contraction is there for ``vmap`` over tangents at fixed
    probabilities (a Hessian, a batch of Gauss-Newton products): ``a`` then broadcasts against
    a batched ``b``, and jax 0.10's CPU backend compiles ``s ⊙ Σ_k(s ⊙ v)`` of that form in
    float32 into an XNNPACK ("ynn") fusion that returns wrong numbers (``jax.jit`` of
    ``jax.hessian`` of the loss came out 100% off). The contraction stays out of that fusion.
    ``HIGHEST`` keeps backends whose default float32 contraction rounds its inputs (TPU, GPU
    tensor cores) at full precision.
    """
    total = jnp.einsum("...k,...k->...", a, b, precision=jax.lax.Precision.HIGHEST)
    return total[..., None]


@jax.custom_jvp
def _log1p_rest(logits: jax.Array, where: jax.Array | None) -> jax.Array:
    """``log1p(R) = logsumexp(z) − c`` per row, ``[...]``; its derivative is ``sᵀż`` (c held)."""
    exps, _ = _exponentials(logits, where)
    return jnp.log1p(_rest(exps))[..., 0]


@_log1p_rest.defjvp
def _log1p_rest_jvp(primals, tangents):
    # d logsumexp = sᵀż, as a contraction (see `_row_sums_of_products`); R's own formula (a
    # `min` per class) must not be differentiated.
    logits, where = primals
    logits_dot, _ = tangents
    if where is not None:
        logits_dot = jnp.where(where, logits_dot, 0)
    probs = softmax_rule(logits, where)
    return _log1p_rest(logits, where), _row_sums_of_products(probs, logits_dot)[..., 0]


def _dot_rows(a: jax.Array, b: jax.Array, where: jax.Array | None) -> jax.Array:
    """Row-wise ``Σ_k a_k b_k`` over included classes."""
    return jnp.sum(a * b, axis=-1, where=where)


def _label_gaps(labels: jax.Array, logits: jax.Array, peak: jax.Array) -> jax.Array:
    """Row-wise ``Σ_k y_k (c − z_k)``, ``[...]``, term by term; a class without label counts 0.

    Every term ``y_k · (c − z_k)`` (``_gaps``) is exact to rounding and of the sign of its label,
    so nothing cancels: ``m·c − yᵀz`` would lose the sum to a large common offset of the logits
    (float32 logits near 10⁴ lost 4 digits), and a clamp of it at 0 would be wrong for negative
    soft labels. The clamp in ``_gaps`` changes nothing for logits held in memory and keeps every
    term of a non-negative label above −2⁻¹²⁶·y under the fused rounding of ``_exponentials``.

    ``0 · inf`` is NaN, but a class that carries no label contributes nothing whatever its logit
    (a ``-inf`` logit is a masked class). The select that says so (``_masked_label_gaps``) keeps
    XLA's CPU backend from fusing the multiply into the reduction: it writes the products out
    as an ``[..., K]`` array and reads them back. On CPU the plain fused sum comes first, and the
    select runs only when some row came out NaN (``_checked_label_gaps``; up to ``_SMALL_GAPS``
    entries the select runs directly); elsewhere the select stays, as fusions there take it into
    the reduction. With ``jax_debug_nans`` on, the NaN of either form (computed, then discarded)
    would stop the caller's program: there the select comes before the multiply.
    """
    if jax.config.jax_debug_nans:  # read when traced, as the check applies it
        return (labels * jnp.where(labels != 0, _gaps(logits, peak), 0.0)).sum(axis=-1)
    if not isinstance(labels.size, int) or labels.size <= _SMALL_GAPS:
        # (A symbolic size, under `jax.export`, takes the form that serves every size.)
        return _masked_label_gaps(labels, logits, peak)
    return jax.lax.platform_dependent(
        labels, logits, peak, cpu=_checked_label_gaps, default=_masked_label_gaps
    )


def _masked_label_gaps(labels: jax.Array, logits: jax.Array, peak: jax.Array) -> jax.Array:
    return jnp.where(labels != 0, labels * _gaps(logits, peak), 0.0).sum(axis=-1)


# Up to this many entries the select form runs directly: there the check's own kernels (the NaN
# test, its reduction and the conditional) cost more than the written products save (one-hot
# value_and_grad about 5% faster from 512 x 10 to 64 x 1,000 float32; at 1,024 x 100 the check
# was 7% faster; docs/losses.md).
_SMALL_GAPS = 1 << 16


def _checked_label_gaps(labels: jax.Array, logits: jax.Array, peak: jax.Array) -> jax.Array:
    """``Σ_k y_k (c − z_k)`` in one fused pass; the select form for the whole batch if a row is NaN.

    A NaN row has an unlabelled infinite logit (or a NaN input); every other row equals the
    select form's. The primal is differentiated by plain autodiff inside loops (see ``_below``),
    so it holds nothing that cannot be linearised: only the predicate, which has no tangent,
    goes through a batching rule (``_any_over_batch``).
    """
    plain = (labels * _gaps(logits, peak)).sum(axis=-1)
    # Module-level branches with their operands passed, not closures over them: an eager call
    # then finds the branches it traced before, where closures (new functions holding the
    # call's arrays) compiled a new program at every call.
    nan = _any_over_batch(jnp.isnan(plain))
    return cond(nan, _select_branch, _plain_branch, labels, logits, peak, plain)


@jax.custom_batching.custom_vmap
def _any_over_batch(flags: jax.Array) -> jax.Array:
    """``any(flags)``, a scalar that stays unbatched under ``vmap``: true if any member has one.

    Under ``vmap`` a ``cond`` on a batched predicate becomes a select that computes both
    branches for every call; on this one it stays one ``cond`` over the whole batched array.
    (A ``custom_vmap`` around the whole computation did the same, but its derivative cannot be
    linearised: second derivatives inside ``lax.scan`` failed once a step held more than
    ``_SMALL_GAPS`` entries.)
    """
    return jnp.any(flags)


@_any_over_batch.def_vmap
def _any_over_batch_vmap(axis_size, in_batched, flags):
    return jnp.any(flags), False


def _select_branch(labels: jax.Array, logits: jax.Array, peak: jax.Array, plain: jax.Array):
    return _masked_label_gaps(labels, logits, peak)


def _plain_branch(labels: jax.Array, logits: jax.Array, peak: jax.Array, plain: jax.Array):
    return plain


@jax.custom_jvp
def _soft_loss(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """``Σ_k y_k (c − z_k) + m · log1p(R)`` per row, for labels already zero on masked classes.

    This is ``m · logsumexp(z) − yᵀz`` with the shift ``c`` taken out first and summed term by
    term (``_label_gaps``): no term cancels another, whatever the logits' common offset, the
    sum is exactly 0 for a one-hot label on the winner, so the small remainder ``m · log1p(R)``
    survives, and negative soft labels count with their sign.
    """
    exps, peak = _exponentials(logits, where)
    mass = labels.sum(axis=-1)
    # The barrier keeps XLA's CPU backend from fusing the row maximum with its broadcast: the
    # shift has two users here, and the fusion would write it out as an [..., K] array.
    shifted = _label_gaps(labels, logits, jax.lax.optimization_barrier(peak))
    return shifted + mass * jnp.log1p(_rest(exps)[..., 0])


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
        probs, complement = softmax_parts(logits, where)
        # m s_k − y_k = s_k (m − y_k) − y_k (1 − s_k): two non-negative terms, each exact in
        # the tails (for a one-hot label one of them is zero).
        grad = probs * (mass - labels) - labels * complement
        terms.append(_dot_rows(grad, logits_dot, where))
    if not isinstance(labels_dot, SymbolicZero):
        # ∂L/∂y_k = −log s_k, +inf on a −inf logit: such a class counts as masked (derivative 0)
        # unless it carries label mass, as in the primal. The select acts on the coefficient,
        # not on the product with the tangent, so that its transpose never meets 0 · inf.
        # (c − z_k) + log1p(R): exact to rounding at the winner of a confident row, whatever
        # the logits' offset, where logsumexp(z) − z_k rounds log1p(R) away against c.
        peak = _peak(logits, where)
        neg_log_probs = (peak - logits) + _log1p_rest(logits, where)[..., None]
        counts = (labels != 0) | jnp.isfinite(logits)
        terms.append(_dot_rows(jnp.where(counts, neg_log_probs, 0.0), labels_dot, None))
    return loss, sum(terms[1:], start=terms[0]) if terms else jnp.zeros_like(loss)


_soft_loss.defjvp(_soft_loss_jvp, symbolic_zeros=True)


def integer_labels(labels: jax.typing.ArrayLike) -> jax.Array:
    """Labels as a jax array, integer ones narrower than int32 widened (`wide_labels`).

    Host labels (NumPy, lists) beyond int32 become −1 when 64-bit mode is off: `jnp.asarray`
    would wrap them into int32 (2**32 + 1 to class 1), silently, where any label outside
    [0, K) must give NaN.
    """
    if not isinstance(labels, jax.Array) and not jax.config.jax_enable_x64:
        array = np.asarray(labels)
        if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize > 4:
            info = np.iinfo(np.int32)
            outside = (array < info.min) | (array > info.max)
            labels = np.where(outside, -1, array).astype(np.int32)
    return wide_labels(jnp.asarray(labels))


def wide_labels(labels: jax.Array) -> jax.Array:
    """Integer labels narrower than int32, as int32.

    `labels < K` would cast K to the labels' dtype, where it wraps: int8 labels against K = 200
    read every label as out of range (NaN losses), as uint8 label 255 against K = 300 did.
    """
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype.itemsize < 4:
        return labels.astype(jnp.int32)
    return labels


def _label_is_valid(labels: jax.Array, num_classes: int) -> jax.Array:
    return (labels >= 0) & (labels < num_classes)


def _row_scale(labels: jax.Array, where: jax.Array | None, num_classes: int, dtype) -> jax.Array:
    """Per row: 1, NaN for a label outside ``[0, K)``, 0 for a label on a masked class. ``[...]``.

    A label on a class that ``where`` excludes carries no label mass, as in
    ``softmax_cross_entropy`` with the one-hot row (whose labels on masked classes are ignored):
    the row's loss and gradient are 0. A fully masked row is a special case.
    """
    valid = _label_is_valid(labels, num_classes)
    scale = jnp.where(valid, 1.0, jnp.nan).astype(dtype)
    if where is not None:
        safe_labels = _safe_labels(labels, num_classes)
        included = jnp.take_along_axis(where, safe_labels, axis=-1)[..., 0]
        # An out-of-range label stays NaN unless the whole row is masked.
        ignored = (valid & ~included) | ~jnp.any(where, axis=-1)
        scale = jnp.where(ignored, 0.0, scale)
    return scale


def _label_split(
    logits: jax.Array, labels: jax.Array, where: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The exponentials split at the label: what the integer loss and its gradient share.

    Returns ``(e', c, z_label, e_label, S)``: ``e'`` the exponentials ``e_k = exp(min(z_k − c,
    0))`` with the label's class (and masked classes) set to 0, ``[..., K]``; then, each
    ``[..., 1]``, the shift ``c``, the label's logit and exponential, and ``S = Σ_k e'_k`` the
    other classes' share. ``S`` is one plain sum, so ``1 − s_label = S / (S + e_label)`` is exact
    whatever the margin, and so is ``R = S − (1 − e_label)`` when the label is the most
    probable class (``e_label = 1``); otherwise ``c − z_label`` dominates the loss. No second
    reduction over the classes is needed, whatever the ties.
    """
    safe_labels = _safe_labels(labels, logits.shape[-1])
    label_logits = jnp.take_along_axis(logits, safe_labels, axis=-1)
    peak = _peak(logits, where)
    exps = jnp.exp(_below(logits, peak))
    if where is not None:
        exps = jnp.where(where, exps, 0.0)
    # The label's class is left out by writing 0 there (`_at_labels`). A label outside [0, K)
    # leaves out the clipped class; its row is NaN (`_row_scale`) anyway.
    exps = _at_labels(exps, safe_labels, 0.0)
    label_exps = jnp.exp(_below(label_logits, peak))
    if where is not None:
        label_exps = jnp.where(jnp.take_along_axis(where, safe_labels, axis=-1), label_exps, 0.0)
    return exps, peak, label_logits, label_exps, exps.sum(axis=-1, keepdims=True)


# Up to this many classes `_at_labels` selects by comparing each class index with the label;
# beyond, it scatters one entry per row. On XLA's CPU backend the comparison inside the pass over
# [..., K] cost the integer value_and_grad a fifth to a quarter of its time at 100 to 32,000
# classes, while with few classes the scatter's fixed cost per row dominates: float32
# value_and_grad, comparison / scatter, 0.60-0.69 at 65536 x 2 to 30, 0.87 at 65536 x 40, 1.01 at
# 65536 x 50 and 1.38 at 65536 x 100 (docs/losses.md).
_COMPARE_CLASSES = 32


def _at_labels(values: jax.Array, safe_labels: jax.Array, value) -> jax.Array:
    """``values`` [..., K] with each row's entry at its label (``[..., 1]``) set to ``value``."""
    if (
        not all(isinstance(n, int) for n in values.shape)
        or values.shape[-1] <= _COMPARE_CLASSES
        or explicit_mesh(values) is not None
    ):
        # The scatter needs concrete shapes (under `jax.export` with a symbolic batch or class
        # axis the comparison serves), and jax 0.10's scatter refuses rows sharded over
        # `Explicit` mesh axes ("All operands should have the same sharding").
        classes = jax.lax.broadcasted_iota(safe_labels.dtype, values.shape, values.ndim - 1)
        return jnp.where(classes == safe_labels, value, values)
    return jnp.put_along_axis(values, safe_labels, value, axis=-1, inplace=False)


def _safe_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    """Labels clipped into ``[0, K)``, ``[..., 1]``: indices for gathers and scatters."""
    return jnp.clip(labels, 0, num_classes - 1)[..., None]


@jax.custom_jvp
def _integer_loss(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """``(c − z[label]) + log1p(R)`` per row; NaN for a label outside ``[0, K)``.

    This is ``logsumexp(z) − z[label]`` with the shift taken out first, so that a label on the
    winner of a confident row keeps the small loss ``log1p(R)``; ``R`` comes from
    ``_label_split``.
    """
    _, peak, label_logits, label_exps, others = _label_split(logits, labels, where)
    # c − z[label] ≥ 0 and R ≥ 0; the clamps only matter under the fused rounding of
    # `_exponentials`, and leave autodiff the plain derivatives (`_below`, `_valued_as`).
    shifted = _gaps(label_logits, peak)
    total = others + label_exps
    rest = _valued_as(jnp.maximum(others + (label_exps - 1.0), 0.0), total)
    loss = (shifted + jnp.log1p(rest))[..., 0]
    scale = _row_scale(labels, where, logits.shape[-1], logits.dtype)
    # Not loss * scale: a label on a masked class may sit on a +inf logit.
    return jnp.where(scale == 0, 0.0, loss * scale)


@jax.custom_jvp
def _integer_grad(logits: jax.Array, labels: jax.Array, where: jax.Array | None) -> jax.Array:
    """``s − e_label`` per row, ``[..., K]``, every component to a few ulps of its own size.

    ``s_k = e_k / T`` off the label and ``−(1 − s_label) = −S / T`` on it, with ``T = S +
    e_label`` (``_label_split``): the passes of a plain softmax and nothing more. Its derivative
    is the Hessian product, through ``softmax_rule``'s rule, so that higher derivatives stay closed.
    """
    exps, _, _, label_exps, others = _label_split(logits, labels, where)
    # The total is at least 1 (the largest term is exp(0) = 1) except on an empty row: every
    # class masked (the row scale zeroes it) or every logit -inf (its loss is +inf).
    total = others + label_exps
    inverse_total = _normaliser(total)
    # The label's component −(1 − s_label) = −S/T is written at the label, as `_label_split`
    # writes its 0. An empty row has s = 0, so −1 there, as the one-hot loss gives (S/T was
    # −0): 1 − min(T, 1) is 0 on every other row, and costs nothing per class. It has no
    # derivative (loops differentiate this primal; `min` would split one at T = 1).
    empty = 1 - jnp.minimum(jax.lax.stop_gradient(total), 1)
    complement = (others + empty) * inverse_total
    safe_labels = _safe_labels(labels, logits.shape[-1])
    return _at_labels(exps * inverse_total, safe_labels, -complement)


@_integer_grad.defjvp
def _integer_grad_jvp(primals, tangents):
    logits, labels, where = primals
    logits_dot, _, _ = tangents
    product = hessian_product_from_probs(softmax_rule(logits, where), logits_dot, where)
    return _integer_grad(logits, labels, where), product


@_integer_loss.defjvp
def _integer_loss_jvp(primals, tangents):
    # dL = (s − e_label)ᵀ ż; the one-hot vector is a comparison fused into the product, never an
    # array, and an out-of-range label turns the row's gradient into NaN like its value. One
    # factor per row (1, NaN for a bad label, 0 for a masked label) applied by a broadcast
    # multiply rather than a select over [..., K], which keeps the product in one fused kernel.
    logits, labels, where = primals
    logits_dot, _, _ = tangents
    scale = _row_scale(labels, where, logits.shape[-1], logits.dtype)
    grad = _integer_grad(logits, labels, where) * scale[..., None]
    return _integer_loss(logits, labels, where), _dot_rows(grad, logits_dot, where)


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
    return at_least_float32(*dtypes)


def _is_integer(axis) -> bool:
    """A Python or NumPy integer (``np.int64(1)`` from array code), never a bool."""
    return isinstance(axis, (int, np.integer)) and not isinstance(axis, (bool, np.bool_))


def _normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        # As optax: every axis is a class axis, and each example is the whole array.
        axes = tuple(range(ndim))
    elif _is_integer(axis):
        axes = (int(axis),)
    elif isinstance(axis, Sequence) and all(_is_integer(a) for a in axis):
        axes = tuple(int(a) for a in axis)
    else:
        raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}.")
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
    # The class count spelled out, not -1: reshape cannot infer it when a batch axis is empty.
    num_classes = int(np.prod([x.shape[a] for a in range(len(batch), x.ndim)]))
    return x.reshape(x.shape[: len(batch)] + (num_classes,))


def _classes_back(x: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """Inverse of ``_classes_last`` for an array of the logits' ``shape``."""
    if axes == (len(shape) - 1,):
        return x
    batch = tuple(a for a in range(len(shape)) if a not in axes)
    x = x.reshape(tuple(shape[a] for a in batch + axes))
    return jnp.transpose(x, np.argsort(batch + axes))


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` has ``target``'s rank and broadcasts to it."""
    if len(shape) != len(target):
        return False
    return all(n in (1, m) for n, m in zip(shape, target, strict=True))


def _prepare_where(
    where: jax.typing.ArrayLike | None, logits: jax.Array, axes: tuple[int, ...]
) -> jax.Array | None:
    """A boolean mask of the logits' shape, classes last; a per-example or scalar mask broadcast."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean array, got dtype {where.dtype}.")
    try:
        if 0 < where.ndim != logits.ndim:  # a scalar broadcasts as it is (as in optax)
            where = jnp.expand_dims(where, axes)
        where = jnp.broadcast_to(where, logits.shape)
    except ValueError as error:
        raise ValueError(
            f"where of shape {where.shape} does not broadcast to the logits' shape "
            f"{logits.shape} (it must be a scalar, of the batch shape or of the logits' shape)."
        ) from error
    return _classes_last(where, axes)


def _check_label_smoothing(label_smoothing: float | jax.Array) -> None:
    """``α`` must be a scalar number; a concrete one (Python, NumPy or JAX) in [0, 1].

    A traced ``α`` has its shape and dtype checked (a vector was broadcast over the classes
    under ``jit``); its value cannot be.
    """
    if isinstance(label_smoothing, jax.core.Tracer):
        if label_smoothing.shape != () or not jnp.issubdtype(label_smoothing.dtype, jnp.number):
            raise ValueError(
                f"label_smoothing must be a scalar number, got a traced array of shape "
                f"{label_smoothing.shape} and dtype {label_smoothing.dtype}."
            )
        return
    value = np.asarray(label_smoothing)
    if value.shape != () or not (
        jnp.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)
    ):
        raise ValueError(f"label_smoothing must be a scalar number, got {label_smoothing!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")


def _no_smoothing(label_smoothing: float | jax.Array) -> bool:
    return isinstance(label_smoothing, (int, float)) and label_smoothing == 0


def _smooth(labels: jax.Array, where: jax.Array | None, label_smoothing) -> jax.Array:
    """``(1 − α)·y + α·m/K`` with ``K`` the number of included classes: the mass ``m`` is kept."""
    if where is None:
        num_included = labels.shape[-1]
        uniform = labels.sum(axis=-1, keepdims=True) / num_included
    else:
        # In the labels' dtype: an int32 count failed strict dtype promotion.
        num_included = where.sum(axis=-1, keepdims=True).astype(labels.dtype)
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
    precision inputs are computed in float32 and returned in the promoted input dtype. Every
    component of the gradient (and of the Hessian) is accurate to a few ulps of its own size at
    any margin, where ``1 − s`` computed by subtraction would round to 0 (see ``docs/losses.md``);
    loss and gradient stay finite when ``jit`` fuses the logits' producer into the loss.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (floating point).
        labels: ``[..., K]`` target weights: one-hot, soft, or unnormalised. Logits and labels
            broadcast against each other, as in optax (one row of logits against many rows
            of labels, say); the class axes count from the logits' last dimension.
        axis: the class axis, a tuple of axes whose elements together form the classes, or
            ``None`` for all axes (one example).
        where: boolean mask: a scalar, of the batch shape (a ``False`` row gives exactly 0) or
            of the logits' shape (``False`` classes are excluded from the softmax and their labels
            are ignored). Where the labels have more dimensions than the logits, a mask with
            as many as the logits that broadcasts to their shape is a mask of their shape
            and broadcasts as they do; one of the labels' shape or of the batch shape covers
            every row.
        label_smoothing: ``α`` in ``[0, 1]``; the labels become ``(1 − α)·y + α·m/K`` over the
            ``K`` included classes, keeping their mass (``optax.smooth_labels`` for one-hot).
            A ``-inf`` logit outside ``where`` is not excluded: its share of ``α`` gives an
            infinite loss, as ``optax.smooth_labels`` followed by optax's loss does; pass
            ``where=jnp.isfinite(logits)`` to spread ``α`` over the finite classes only.

    Returns:
        ``[...]``: the loss of each example (no reduction).

    Raises:
        TypeError: if the logits are not floating point, the labels complex, or ``where`` not
            boolean.
        ValueError: for a bad ``axis``, shapes that do not broadcast (or logits with one
            class broadcast against labels with several, without a ``where`` of the labels'
            shape), or ``α`` outside [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        >>> print(np.round(np.asarray(xj.softmax_cross_entropy(logits, labels), float), 4))
        [0.2761 2.9518]
    """
    logits = _check_floating(logits)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.complexfloating):  # was cast to real, silently
        raise TypeError(f"labels must be real, got dtype {labels.dtype}.")
    _check_label_smoothing(label_smoothing)
    axes = _normalize_axes(axis, logits.ndim)
    try:
        shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    except ValueError as error:
        raise ValueError(
            f"labels of shape {labels.shape} do not broadcast against the logits' shape "
            f"{logits.shape}."
        ) from error
    # Logits broadcast against labels with more dimensions (one row of logits for many label
    # rows, as optax allows); the class axes keep their place counted from the logits' end.
    extra = len(shape) - logits.ndim
    axes = tuple(a + extra for a in axes)
    if where is not None and extra and _broadcasts(np.shape(where), logits.shape):
        # A mask of the logits' own shape broadcasts as they do: read against the broadcast
        # logits it was taken for a mask of the batch shape (a class mask zeroed a row).
        where = jnp.reshape(where, (1,) * extra + np.shape(where))
    spread = [a for a in axes if logits.shape[a - extra] == 1 != shape[a]]
    if spread and not (
        np.ndim(where) == len(shape) and all(np.shape(where)[a] > 1 for a in spread)
    ):
        # optax's softmax broadcasts the one class over the labels' only where `where` spans
        # them (as here); otherwise it takes the softmax of one class, a loss of 0.
        raise ValueError(
            f"the logits' class axes {axis} of shape {logits.shape} would broadcast against the "
            f"labels' {labels.shape}: give the logits all K classes (or a where of the labels' "
            "shape)."
        )
    logits, labels = jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape)
    out_dtype = jnp.result_type(logits, labels)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        out_dtype = logits.dtype
    dtype = _compute_dtype(logits.dtype, labels.dtype)
    where = _prepare_where(where, logits, axes)
    logits = _classes_last(logits, axes).astype(dtype)
    labels = _classes_last(labels, axes).astype(dtype)
    if where is not None:
        labels = jnp.where(where, labels, 0.0)
    if not _no_smoothing(label_smoothing):
        labels = _smooth(labels, where, label_smoothing)
    return _soft_loss(logits, labels, where).astype(out_dtype)


def safe_softmax_cross_entropy(
    logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike
) -> jax.Array:
    """``optax.safe_softmax_cross_entropy``: a ``-inf`` logit without label mass counts 0.

    Optax's plain loss returns NaN for such a class (``0 · −inf``) and its safe variant follows
    the convention ``0 · log 0 = 0``. :func:`softmax_cross_entropy` already does (a ``-inf``
    logit is a masked class), so this is that function over the last axis, with the same
    closed-form derivatives.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (floating point).
        labels: ``[..., K]`` target weights, broadcasting against the logits.

    Returns:
        ``[...]``: the loss of each example.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> logits = jnp.array([[0.0, -jnp.inf, 1.0]])
        >>> losses = xj.safe_softmax_cross_entropy(logits, jnp.array([[0.5, 0.0, 0.5]]))
        >>> print(np.round(np.asarray(losses, float), 4))
        [0.8133]
    """
    return softmax_cross_entropy(logits, labels)


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
      loss and NaN gradient for its row, never a plausible number (with 64-bit mode off, a
      NumPy int64 label beyond int32 passed here counts as outside; passed to a ``jax.jit`` or
      ``jax.vmap`` of a caller, it is narrowed to int32 before this function sees it, which
      wraps it into range, as for any JAX function: check such labels before that call); a
      row fully masked by ``where`` gives 0 whatever its label, and so does a label on a class
      that ``where`` excludes (it carries no label, as the one-hot row in
      ``optax.softmax_cross_entropy``; optax's integer version returns ``logsumexp − z[label]``
      there, which can be negative);
    * a ``-inf`` logit is a masked class: finite loss and zero gradient there, unless the label
      sits on it, which gives ``+inf`` (with gradient −1 at the label and 0 elsewhere when
      every logit of the row is ``-inf``, as the one-hot loss; optax gives NaN).

    With ``label_smoothing = α`` the target is ``(1 − α)·e_c + α/K`` over the included classes.

    Args:
        logits: ``[..., K]`` unnormalised log-probabilities (floating point).
        labels: ``[...]`` integer class indices (a flat index into the class axes when ``axis``
            is a tuple), of the logits' batch shape; a dimension of size 1 on either side
            broadcasts, as in optax.
        axis: the class axis, a tuple of axes whose elements together form the classes, or
            ``None`` for all axes (then ``labels`` is a scalar flat index).
        where: boolean mask: a scalar, of the batch shape or of the logits' shape (see
            :func:`softmax_cross_entropy`).
        label_smoothing: ``α`` in ``[0, 1]``.

    Returns:
        ``[...]``: the loss of each example (no reduction).

    Raises:
        TypeError: if the logits are not floating point or the labels are not integers.
        ValueError: for a bad ``axis``, mismatched shapes, or ``α`` outside [0, 1].

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
        >>> losses = xj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
        >>> print(np.round(np.asarray(losses, float), 4))
        [0.2761 2.9518]
    """
    logits = _check_floating(logits)
    labels = integer_labels(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype}; for one-hot or "
            "soft labels use softmax_cross_entropy."
        )
    _check_label_smoothing(label_smoothing)
    axes = _normalize_axes(axis, logits.ndim)
    logits, labels = _broadcast_batch(logits, labels, axes, axis)
    out_dtype = logits.dtype
    where = _prepare_where(where, logits, axes)
    logits = _classes_last(logits, axes).astype(_compute_dtype(logits.dtype))
    if _no_smoothing(label_smoothing):
        return _integer_loss(logits, labels, where).astype(out_dtype)
    num_classes = logits.shape[-1]
    onehot = (labels[..., None] == jnp.arange(num_classes)[(None,) * labels.ndim]).astype(
        logits.dtype
    )
    valid = _label_is_valid(labels, num_classes)[..., None]
    # NaN labels make an out-of-range row's loss and gradient NaN through the formulas; masked
    # classes (a fully masked row included) carry no label.
    onehot = jnp.where(valid, onehot, jnp.nan)
    if where is not None:
        onehot = jnp.where(where, onehot, 0.0)
    smoothed = _smooth(onehot, where, label_smoothing)
    return _soft_loss(logits, smoothed, where).astype(out_dtype)


def _broadcast_batch(
    logits: jax.Array, labels: jax.Array, axes: tuple[int, ...], axis: Axis
) -> tuple[jax.Array, jax.Array]:
    """Logits and integer labels broadcast to one batch shape, as optax's gather allows.

    The labels must have as many dimensions as the logits' batch shape; each batch dimension
    of either may be 1 (one row of logits for many labels, or one label for many rows).
    """
    batch_shape = tuple(n for a, n in enumerate(logits.shape) if a not in axes)
    shape = None
    if labels.ndim == len(batch_shape):
        try:
            shape = jnp.broadcast_shapes(batch_shape, labels.shape)
        except ValueError:
            pass
    if shape is None:
        raise ValueError(
            f"labels of shape {labels.shape} do not match the logits' batch shape {batch_shape} "
            f"(logits {logits.shape}, class axis {axis})."
        )
    batch = iter(shape)
    full = tuple(n if a in axes else next(batch) for a, n in enumerate(logits.shape))
    return jnp.broadcast_to(logits, full), jnp.broadcast_to(labels, shape)


def softmax_cross_entropy_hessian(
    logits: jax.typing.ArrayLike, axis: Axis = -1, where: jax.typing.ArrayLike | None = None
) -> jax.Array:
    r"""The Hessian of the softmax cross-entropy with respect to the logits, as a matrix.

    .. math:: \nabla^2_z L = \operatorname{diag}(s) - s s^\top, \qquad s = \operatorname{softmax}(z)

    for labels of unit mass (multiply by ``m`` for mass ``m``). It does not depend on the
    labels. It is symmetric positive semi-definite, ``H·1 = 0``, and its eigenvalues lie in
    ``[0, 1/2]``. The diagonal uses the exact complement ``1 − s_k``, so every entry keeps a few
    ulps of its own size at any margin and the matrix stays PSD in float32 (no eigenvalue below
    the rounding of the smallest nonzero one). Masked (``-inf`` or ``where=False``) classes get zero
    rows and columns.
    This forms ``K×K`` per example: prefer :func:`softmax_cross_entropy_hvp` for products.

    Args:
        logits: ``[..., K]`` floating point (the class axis may sit elsewhere: ``axis``).
        axis: the class axis.
        where: boolean mask: a scalar, of the batch shape or of the logits' shape.

    Returns:
        ``[..., K, K]``: one matrix per example, the batch axes in order and the class axis
        moved last.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> print(xj.softmax_cross_entropy_hessian(jnp.zeros(2)))
        [[ 0.25 -0.25]
         [-0.25  0.25]]
    """
    logits = _check_floating(logits)
    axes = _normalize_axes(axis, logits.ndim)
    where = _prepare_where(where, logits, axes)
    probs, complement = softmax_parts(
        _classes_last(logits, axes).astype(_compute_dtype(logits.dtype)), where
    )
    eye = jnp.eye(probs.shape[-1], dtype=bool)
    # Off the diagonal −s_i s_j; on it s_k (1 − s_k) with the exact complement, so that the
    # winner of a confident row keeps its curvature and the matrix stays PSD in float32.
    outer = probs[..., :, None] * probs[..., None, :]
    diagonal = (probs * complement)[..., :, None]
    return jnp.where(eye, diagonal, -outer).astype(logits.dtype)


def softmax_cross_entropy_hvp(
    logits: jax.typing.ArrayLike,
    tangents: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Product of the softmax cross-entropy Hessian with a vector, per example, matrix-free.

    .. math:: (\operatorname{diag}(s) - s s^\top)\, v = s \odot (v - s^\top v)

    in ``O(K)`` per example (a few passes over the classes), for labels of unit mass (multiply
    by ``m`` for mass ``m``). ``v`` is shifted by its value at the most probable class first,
    so each component is accurate to a few ulps of its terms at any margin (see
    ``hessian_product_from_probs``). Equals ``jax.jvp(jax.grad(loss), (z,), (v,))[1]`` for each
    example's loss, and is itself differentiable.

    Args:
        logits: ``[..., K]`` floating point.
        tangents: ``[..., K]`` vectors ``v``, same shape as ``logits``.
        axis: the class axis.
        where: boolean mask: a scalar, of the batch shape or of the logits' shape.

    Returns:
        ``[..., K]``: ``H v`` in the layout of ``tangents``, in the dtype the logits and the
        tangents promote to (computed in at least float32).

    Raises:
        ValueError: if ``tangents`` and ``logits`` differ in shape.
        TypeError: if the logits are not floating point or the tangents complex.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import xentropy_jax as xj
        >>> print(xj.softmax_cross_entropy_hvp(jnp.zeros(2), jnp.array([1.0, -1.0])))
        [ 0.5 -0.5]
    """
    logits = _check_floating(logits)
    tangents = jnp.asarray(tangents)
    if jnp.issubdtype(tangents.dtype, jnp.complexfloating):  # crashed inside JAX's `floor`
        raise TypeError(f"tangents must be real, got dtype {tangents.dtype}.")
    if tangents.shape != logits.shape:
        raise ValueError(
            f"tangents of shape {tangents.shape} must have the logits' shape {logits.shape}."
        )
    axes = _normalize_axes(axis, logits.ndim)
    where = _prepare_where(where, logits, axes)
    dtype = _compute_dtype(logits.dtype, tangents.dtype)
    probs = softmax_rule(_classes_last(logits, axes).astype(dtype), where)
    vectors = _classes_last(tangents, axes).astype(dtype)
    product = hessian_product_from_probs(probs, vectors, where)
    return _classes_back(product, axes, logits.shape).astype(jnp.result_type(tangents, logits))
