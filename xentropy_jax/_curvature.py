"""Matrix-free curvature of the softmax cross-entropy of a model: GGN and Hessian products.

The objective is the weighted mean of the per-example losses of a model ``logits_fn``:

    F(θ) = Σᵢ wᵢ Lᵢ(zᵢ(θ)) / Σᵢ wᵢ,      z(θ) = logits_fn(θ, inputs) ∈ R^{N×K},

(the plain mean when no weights are given). With Jᵢ = ∂zᵢ/∂θ and the closed-form loss Hessian
Hᵢ = mᵢ (diag(sᵢ) − sᵢsᵢᵀ), s = softmax(z), m the label mass, the generalised Gauss-Newton matrix
is G = Σᵢ cᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ with cᵢ = wᵢ mᵢ / Σ w. It never depends on which class is
labelled, so the products below take the label mass, not the labels. No K×K, N×K×K or P×P
array is formed: the loss Hessian is applied in O(N·K) through its closed form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ._checks import check_real
from ._checks import is_concrete as _is_concrete
from ._losses import (
    hessian_product_from_probs,
    integer_labels,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
    softmax_rule,
)
from ._precision import at_least_float32
from ._rowsums import normalized_weights
from ._seen import Programs

PyTree = Any
LogitsFn = Callable[[PyTree, PyTree], jax.Array]


def logits_shape(logits_fn: LogitsFn, params: PyTree, inputs: PyTree) -> jax.ShapeDtypeStruct:
    out = jax.eval_shape(logits_fn, params, inputs)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"logits_fn(params, inputs) must return one [N, K] array, got {shape}.")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"logits_fn must return floating logits, got dtype {out.dtype}.")
    if out.shape[1] == 0:
        raise ValueError("logits_fn returned logits with no classes (K = 0).")
    return out


def check_params(params: PyTree) -> None:
    for leaf in jax.tree.leaves(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"every leaf of params must be floating, got dtype {jnp.result_type(leaf)}; "
                "close over integer state in logits_fn instead."
            )


def _check_tangents(params: PyTree, tangents: PyTree, name: str = "tangents") -> None:
    """ValueError unless `tangents` matches `params` leaf by leaf (structure, shape, dtype).

    chex names the first leaf that differs by its path in the tree ('layer1/w': (3,) != (4,)).
    """
    try:
        # Python numbers as leaves have no shape for chex: compare them as arrays.
        chex.assert_trees_all_equal_shapes_and_dtypes(
            *(jax.tree.map(jnp.asarray, tree) for tree in (params, tangents))
        )
    except AssertionError as error:
        detail = str(error).split("failed:", 1)[-1].strip()
        raise ValueError(
            f"{name} must match params leaf by leaf (tree structure, shapes and dtypes): {detail}"
        ) from None


def _per_example(value: Any, n: int, name: str, nonnegative: bool = True) -> jax.Array:
    """``value`` as an array broadcast to [N]; checked for sign and finiteness when concrete."""
    array = jnp.asarray(value)
    check_real(name, array)  # complex: its imaginary part was dropped silently
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != n):
        raise ValueError(f"{name} must be a scalar or have shape [N] = [{n}], got {array.shape}.")
    check_values(value, name, nonnegative)
    return jnp.broadcast_to(array, (n,))


def check_values(value: Any, name: str, nonnegative: bool = True) -> None:
    """ValueError if ``value`` is concrete and not finite (or negative); nothing when traced."""
    if value is not None and _is_concrete(value):
        host = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(host)):
            raise ValueError(f"{name} must be finite.")
        if nonnegative and np.any(host < 0):
            raise ValueError(f"{name} must be non-negative.")


def loss_probabilities(logits: jax.Array) -> jax.Array:
    """softmax(z) as the losses define it ([N, K]; ``-inf`` classes and empty rows give 0).

    Half precision logits give float32 probabilities, as the losses compute in float32.
    """
    return softmax_rule(logits.astype(at_least_float32(logits.dtype)), None)


def example_coefficients(
    n: int,
    dtype: jnp.dtype,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
) -> jax.Array:
    """cᵢ = wᵢ mᵢ / Σⱼ wⱼ (mᵢ / N without weights), all zero when Σ w = 0. Shape [N].

    In at least float32: in float16, N or Σ w above 65,504 is inf and every cᵢ came out 0.
    Weights checked nowhere else (inside ``jit``) with a NaN or a negative entry give NaN for
    every cᵢ, so that the loss and its curvature come out NaN. A NaN weight used to count as
    Σ w = 0 and gave a loss, gradient and products of exactly 0.
    """
    dtype = at_least_float32(dtype)
    mass = _per_example(label_mass, n, "label_mass").astype(dtype)
    if sample_weight is None:
        return mass / n
    weight = _per_example(sample_weight, n, "sample_weight").astype(dtype)
    # An all-zero weight vector is the empty mean, taken as the zero objective: no 0/0.
    coefficients = normalized_weights(weight) * mass
    invalid = jnp.any(~jnp.isfinite(weight) | (weight < 0))
    return jnp.where(invalid, jnp.nan, coefficients)


def _apply_ggn(
    model_jvp: Callable,
    model_vjp: Callable,
    probs: jax.Array,
    coefficients: jax.Array,
    damping: jax.Array,
    tangents: PyTree,
) -> PyTree:
    try:
        logit_tangents = model_jvp(tangents)
    except (TypeError, ValueError) as error:  # JAX's words name no argument of ours
        raise ValueError(
            f"tangents must match params leaf by leaf (tree structure, shapes and dtypes): {error}"
        ) from None
    vectors = logit_tangents.astype(probs.dtype)
    # The closed form of softmax_cross_entropy_hvp, s ⊙ (u − sᵀu), from probabilities computed
    # once: recomputing the softmax in every product would cost K exponentials per row each time.
    loss_curvature = hessian_product_from_probs(probs, vectors)
    cotangents = coefficients[:, None] * loss_curvature
    dtype = logit_tangents.dtype
    if jnp.finfo(dtype).minexp > jnp.finfo(jnp.float32).minexp:
        # float16 (or narrower): each row's cᵢ(Hv)ᵢ is near 1/N of the result, below float16's
        # smallest normal number (2⁻¹⁴) beyond N ≈ 10⁴, and products at N = 10⁵ came out 0. A
        # power of two S ≥ 1 (exact) lifts the largest cotangent to 2⁻¹⁰ when it is smaller,
        # so that the rows keep their digits, but never lifts the cotangents' total |u| above
        # 2⁸, and the product is divided by S after. Cotangents already in range are left
        # alone: lifting them all (to a total of 2⁸) overflowed the products of models whose
        # Jacobians are large (inputs of 1,000).
        magnitudes = jnp.abs(cotangents)
        largest, total = jnp.max(magnitudes), jnp.sum(magnitudes)
        exponent = jnp.minimum(jnp.floor(-10 - jnp.log2(largest)), jnp.floor(8 - jnp.log2(total)))
        exponent = jnp.where(largest > 0, jnp.clip(exponent, 0, -jnp.finfo(dtype).minexp), 0)
        (product,) = model_vjp((jnp.exp2(exponent) * cotangents).astype(dtype))
        product = jax.tree.map(
            lambda g: (jnp.exp2(-exponent) * g.astype(cotangents.dtype)).astype(g.dtype),
            product,
        )
    else:
        (product,) = model_vjp(cotangents.astype(dtype))
    return jax.tree.map(lambda g, v: g + damping.astype(jnp.result_type(v)) * v, product, tangents)


def ggn_operator(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    *,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
    damping: jax.typing.ArrayLike = 0.0,
) -> Callable[[PyTree], PyTree]:
    """Linearise the model once; return the damped Gauss-Newton product ``v ↦ (G + λI) v``.

    For the objective F(θ) = Σᵢ wᵢ Lᵢ / Σᵢ wᵢ of per-example softmax cross-entropies of the logits
    z = logits_fn(θ, inputs), the generalised Gauss-Newton matrix is

        G = Σᵢ cᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ,    cᵢ = wᵢ mᵢ / Σⱼ wⱼ,   sᵢ = softmax(zᵢ),

    with Jᵢ = ∂zᵢ/∂θ and mᵢ the label mass of row i (1 for one-hot or integer labels). For the
    softmax cross-entropy G is also the Fisher information E_{ŷ∼softmax(z)}[g gᵀ] (g the gradient
    at sampled labels ŷ), so no labels are needed. G is symmetric positive semi-definite.

    The model is run forward once here (``jax.linearize``) and the probabilities s are stored;
    each call of the returned operator is one linearised forward pass J v, the closed-form
    loss-Hessian product sᵢ ⊙ (uᵢ − sᵢᵀuᵢ) in O(N·K) with no exponential, and one transposed
    pass Jᵀ u: about the cost of one gradient, with O(N·K + P) memory beyond the stored
    linearisation. The operator is a ``jax.tree_util.Partial``, so it can be passed into
    ``jit``-compiled solvers (conjugate gradients) as an argument. It is differentiable in
    ``params``, ``inputs`` and the weights (the probabilities move with θ).

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits. Classes can be masked with
          ``-inf`` logits. It is taken to be pure, as ``jax.jit`` takes the function it
          compiles: from the second eager call with the same function on, the linearisation
          runs compiled, so what it reads besides ``params`` and ``inputs`` (a global such as
          a temperature) is frozen at that call. Pass what changes through ``inputs``.
        params: pytree of floating arrays θ (P numbers in all).
        inputs: ``logits_fn``'s second argument, a pytree of arrays (passed through unchanged;
          close over anything else, such as a string or a Python flag).
        sample_weight: optional non-negative [N] weights wᵢ (a 0/1 mask masks examples). Without
          them the objective is the plain mean. If Σ w = 0 the objective is 0 and so is G.
        label_mass: mᵢ = Σₖ yᵢₖ, a scalar or [N]; 1 for one-hot or integer labels.
        damping: finite λ ≥ 0 added as λ·v (Levenberg-Marquardt / Tikhonov damping). Under
          `jit`, where it is not checked, a negative or non-finite λ makes every product NaN.

    Returns:
        A function ``tangents -> (G + λI) tangents`` mapping a pytree shaped as ``params`` to one of
        the same structure, shapes and dtypes.

    Raises:
        ValueError: if the logits are not [N, K] or the weights/mass are the wrong shape, or
          (when concrete) negative or non-finite.
        TypeError: if the logits or a parameter are not floating.

    Example:
        For a linear model G is the Hessian, and shifting every class alike is its null direction:

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> ggn = xj.ggn_operator(linear, W, X)
        >>> labels = jnp.array([0, 2, 1])
        >>> H = jax.jit(jax.hessian(lambda w: xj.mean_cross_entropy(linear, w, X, labels)))(W)
        >>> V = jnp.arange(6.0).reshape(2, 3)
        >>> bool(jnp.allclose(ggn(V), jnp.tensordot(H, V, 2), atol=1e-6))  # float32 too
        True
        >>> bool(jnp.allclose(ggn(jnp.ones((2, 3))), 0, atol=1e-6))
        True
    """
    check_params(params)
    shape = logits_shape(logits_fn, params, inputs)
    coefficients = example_coefficients(shape.shape[0], shape.dtype, sample_weight, label_mass)
    if damping is None:
        raise TypeError("damping must be a non-negative number, got None.")
    check_real("damping", damping)
    if np.ndim(damping) != 0:
        raise ValueError(f"damping must be a scalar, got shape {np.shape(damping)}.")
    if _is_concrete(damping) and not 0 <= float(damping) < float("inf"):
        raise ValueError(f"damping must be a finite non-negative number, got {damping}.")
    compiled = _compiled_linearization(logits_fn, params, inputs)
    if compiled is None:
        model_jvp, model_vjp, probs = _linearization(logits_fn, params, inputs)
    else:
        model_jvp, model_vjp, probs = compiled(params, inputs)
    coefficients = coefficients.astype(probs.dtype)
    # Under `jit` a negative or non-finite damping (unchecked above) makes every product NaN,
    # as a negative weight does: the operator has no status field to report it through.
    damping = jnp.asarray(damping)
    damping = jnp.where((damping >= 0) & jnp.isfinite(damping), damping, jnp.nan)
    return Partial(_apply_ggn, model_jvp, model_vjp, probs, coefficients, damping)


def _linearization(logits_fn: LogitsFn, params: PyTree, inputs: PyTree) -> tuple:
    """``(v ↦ J v, u ↦ Jᵀ u, s)`` at ``params``: one forward pass of the model."""
    logits, model_jvp = jax.linearize(lambda p: logits_fn(p, inputs), params)
    model_vjp = jax.linear_transpose(model_jvp, params)
    # No stop_gradient: the operator is then differentiable in params, inputs and weights
    # (d/dθ of vᵀ G(θ) v includes how s moves), and nothing costs more when it is not.
    return model_jvp, model_vjp, loss_probabilities(logits)


# Built eagerly, each linearisation carries a new jaxpr in its pytree structure, and a jitted
# solver taking the operator as an argument compiled again for every outer step (0.5-1 s each,
# its cache growing by one entry per step). Built by one compiled program, the structure is
# that program's, the same at every call with the same model, shapes and dtypes. A program per
# model, for the last 16 models used more than once (`Programs`).
_LINEARIZATIONS = Programs(lambda logits_fn: jax.jit(functools.partial(_linearization, logits_fn)))


def _compiled_linearization(logits_fn: LogitsFn, params: PyTree, inputs: PyTree) -> Callable | None:
    """The compiled linearisation of a model seen before, eagerly; else None.

    A new function at every step (a lambda written in the loop) is linearised in place, neither
    compiled nor kept. ``logits_shape`` already traces the model on abstract inputs, so the
    program asks nothing more of them; inside a trace it would be inlined anyway.
    """
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((params, inputs))):
        return None
    return _LINEARIZATIONS(logits_fn)


def ggn_vp(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    tangents: PyTree,
    *,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
    damping: jax.typing.ArrayLike = 0.0,
) -> PyTree:
    """One Gauss-Newton-vector product (G + λI) v of the weighted mean cross-entropy.

    G = Σᵢ cᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ with cᵢ = wᵢ mᵢ / Σ w, as in :func:`ggn_operator`, which
    this calls once. Cost: one forward pass, one linearised forward pass J v, O(N·K) for the loss
    Hessian and one transposed pass Jᵀ u (≈ 1.5 gradients for a network dominated by matrix
    products). To apply G to many vectors at the same parameters, use :func:`ggn_operator`.

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits, pure as in
          :func:`ggn_operator` (from the second eager call with the same function on, what it
          reads besides its arguments is frozen at that call).
        params: pytree of floating arrays θ.
        inputs: second argument of ``logits_fn``.
        tangents: pytree v with the structure, shapes and dtypes of ``params``.
        sample_weight: optional non-negative [N] example weights (plain mean without them).
        label_mass: mᵢ, a scalar or [N]; 1 for one-hot or integer labels.
        damping: finite λ ≥ 0 added as λ·v.

    Returns:
        (G + λI) v, a pytree like ``params``.

    Raises:
        ValueError: as :func:`ggn_operator`, or if ``tangents`` does not match ``params``.
        TypeError: as :func:`ggn_operator`.

    Example:
        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> W, V = jnp.zeros((2, 3)), jnp.arange(6.0).reshape(2, 3)
        >>> damped = xj.ggn_vp(linear, W, X, V, damping=0.5)
        >>> bool(jnp.allclose(damped - xj.ggn_vp(linear, W, X, V), 0.5 * V))
        True
        >>> damped.shape
        (2, 3)
    """
    check_params(params)
    _check_tangents(params, tangents)
    operator = ggn_operator(
        logits_fn,
        params,
        inputs,
        sample_weight=sample_weight,
        label_mass=label_mass,
        damping=damping,
    )
    return operator(tangents)


def mean_cross_entropy(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    labels: jax.typing.ArrayLike,
    *,
    sample_weight: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """The objective F(θ) = Σᵢ wᵢ Lᵢ / Σᵢ wᵢ (plain mean without weights, 0 if Σ w = 0).

    Built on the package's losses, whose ``custom_jvp`` rules make every derivative of F closed
    form at the loss. Cost: one forward pass.

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits.
        params: pytree of floating arrays θ.
        inputs: second argument of ``logits_fn``.
        labels: integer class indices [N], or label distributions / one-hot rows [N, K].
        sample_weight: optional non-negative [N] example weights. A row of weight 0 counts for
            nothing whatever its label, so padding rows may carry any label (−1, −100, ...):
            such a label (out of [0, K), or a label row with a non-finite entry) is taken as
            class 0 (a row of zeros), so the derivative in that row's weight is class 0's loss;
            a valid label's row gets its own loss there.

    Returns:
        The scalar objective, in the losses' dtype: that of the logits and the labels promoted.

    Raises:
        ValueError: if the labels or weights do not fit the [N, K] logits.
        TypeError: if the logits are not floating.

    Example:
        At θ = 0 every class has probability 1/K, so F = log K; one-hot labels agree with
        integer labels, and a 0/1 weight selects examples:

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> labels = jnp.array([0, 2, 1])
        >>> print(round(float(xj.mean_cross_entropy(linear, jnp.zeros((2, 3)), X, labels)), 4))
        1.0986
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> one_hot = jax.nn.one_hot(labels, 3)
        >>> bool(jnp.isclose(xj.mean_cross_entropy(linear, W, X, labels),
        ...                  xj.mean_cross_entropy(linear, W, X, one_hot)))
        True
        >>> only_first = jnp.array([1.0, 0.0, 0.0])
        >>> first = xj.mean_cross_entropy(linear, W, X, labels, sample_weight=only_first)
        >>> bool(jnp.isclose(first, xj.softmax_cross_entropy_with_integer_labels(X[0] @ W, 0)))
        True
    """
    shape = logits_shape(logits_fn, params, inputs)
    n, k = shape.shape
    # Not `jnp.asarray`: host int64 labels beyond int32 wrapped into range (2**32 + 1 to
    # class 1) with 64-bit mode off, a plausible loss where any label outside [0, K) is NaN.
    labels = integer_labels(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (n,):
            raise ValueError(f"integer labels must have shape [N] = [{n}], got {labels.shape}.")
        loss_fn = softmax_cross_entropy_with_integer_labels
    elif labels.shape == (n, k):
        loss_fn = softmax_cross_entropy
    else:
        raise ValueError(
            f"labels must be integers [N] = [{n}] or floating [N, K] = [{n}, {k}], "
            f"got {labels.dtype} {labels.shape}."
        )
    coefficients = example_coefficients(n, shape.dtype, sample_weight)
    if sample_weight is not None:
        # A row of weight 0 is left out whatever its label: padding labels (−1, −100, K) would
        # give a NaN loss and gradient there, and 0 · NaN is NaN. Such a label (an integer out
        # of [0, K), a label row with a non-finite entry) becomes class 0, or a row of zeros; a
        # valid label is kept, so that the derivative in that row's weight is its own loss
        # (replacing every zero-weight row's label gave the replacement's loss there). At no
        # measured cost in the fused loss.
        if labels.ndim == 1:
            kept = (coefficients != 0) | ((labels >= 0) & (labels < k))
        else:
            kept = (coefficients != 0) | jnp.all(jnp.isfinite(labels), axis=-1)
        labels = jnp.where(kept if labels.ndim == 1 else kept[:, None], labels, 0)
    losses = loss_fn(logits_fn(params, inputs), labels)
    # Summed in at least float32, returned in the losses' dtype (that of the logits and the
    # labels promoted). A row of weight 0 whose label sits on a −inf logit (a padding row of
    # masked classes) has loss +inf, and 0 · inf is NaN: such terms count 0. Finite losses keep
    # their product, so that the derivative in a zero weight stays that row's loss.
    wide = at_least_float32(coefficients, losses)
    terms = coefficients.astype(wide) * losses.astype(wide)
    terms = jnp.where((coefficients == 0) & jnp.isinf(losses), 0, terms)
    return jnp.sum(terms).astype(losses.dtype)


def hessian_vp(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    labels: jax.typing.ArrayLike,
    tangents: PyTree,
    *,
    sample_weight: jax.typing.ArrayLike | None = None,
) -> PyTree:
    """Exact Hessian-vector product ∇²F(θ) v of the weighted mean cross-entropy.

    ∇²F = G + Σᵢ (wᵢ/Σw) Σₖ (∂Lᵢ/∂zᵢₖ) ∇²zᵢₖ: the Gauss-Newton matrix plus the model's own
    curvature weighted by the residuals mᵢsᵢ − yᵢ. It depends on the labels, and it can be
    indefinite. For a model linear in θ (multinomial logistic regression) the second term is zero
    and ∇²F = G. Computed forward-over-reverse, as ``jax.jvp`` of ``jax.grad`` of
    :func:`mean_cross_entropy`, whose loss rules are closed form: one forward pass, one
    linearised forward pass and one backward pass with its tangent (≈ 1.5-2 gradients of cost),
    O(N·K + P) memory beyond the backward pass.

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits.
        params: pytree of floating arrays θ.
        inputs: second argument of ``logits_fn``.
        labels: integer class indices [N], or label distributions / one-hot rows [N, K].
        tangents: pytree v with the structure, shapes and dtypes of ``params``.
        sample_weight: optional non-negative [N] example weights (rows of weight 0 may carry
            any label, as in :func:`mean_cross_entropy`).

    Returns:
        ∇²F(θ) v, a pytree like ``params``.

    Raises:
        ValueError: if labels, weights or tangents do not fit.
        TypeError: if the logits or a parameter are not floating.

    Example:
        Against ``jax.hessian``; for a linear model the Hessian is the Gauss-Newton matrix:

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> labels = jnp.array([0, 2, 1])
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> V = jnp.arange(6.0).reshape(2, 3)
        >>> product = xj.hessian_vp(linear, W, X, labels, V)
        >>> H = jax.jit(jax.hessian(lambda w: xj.mean_cross_entropy(linear, w, X, labels)))(W)
        >>> bool(jnp.allclose(product, jnp.tensordot(H, V, 2), atol=1e-6))  # float32 too
        True
        >>> bool(jnp.allclose(product, xj.ggn_vp(linear, W, X, V)))
        True
    """
    check_params(params)
    _check_tangents(params, tangents)

    def gradient(p: PyTree) -> PyTree:
        return jax.grad(
            lambda q: mean_cross_entropy(logits_fn, q, inputs, labels, sample_weight=sample_weight)
        )(p)

    return jax.jvp(gradient, (params,), (tangents,))[1]
