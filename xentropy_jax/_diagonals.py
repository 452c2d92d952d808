"""Diagonal of the Gauss-Newton matrix: exact through a square-root factor, or estimated.

G = Σᵢ cᵢ Jᵢᵀ Hᵢ Jᵢ with Hᵢ = diag(sᵢ) − sᵢsᵢᵀ and cᵢ = wᵢ mᵢ / Σ w (see ``_curvature``). The loss
Hessian factors as H = B Bᵀ with B = diag(√s) − s √sᵀ, whose k-th column √sₖ (eₖ − s) is the
gradient of the loss at label k scaled by the square root of its probability. Hence

    diag(G) = Σᵢ cᵢ Σₖ sᵢₖ (Jᵢᵀ (eₖ − sᵢ))²,

the Fisher information summed over all K labels instead of sampled. Three ways to get it:

* :func:`ggn_diagonal`: exact, K per-example backward passes (needs per-example gradients);
* :func:`ggn_diagonal_hutchinson`: z ⊙ G z for Rademacher z, one GGN product per probe;
* :func:`ggn_diagonal_bartlett`: ĝ ⊙ ĝ for ĝ the gradient at labels sampled from the model's
  own softmax (Gauss-Newton-Bartlett), one backward pass per sample.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ._checks import is_concrete
from ._curvature import (
    LogitsFn,
    PyTree,
    check_params,
    example_coefficients,
    ggn_operator,
    logits_shape,
)
from ._losses import softmax_cross_entropy_with_integer_labels, softmax_parts
from ._manual import cast_varying, scan, vary_like, varying_axes
from ._precision import at_least_float32
from ._seen import Programs

# Default memory budget of ggn_diagonal: numbers held at once by the per-example gradients.
# 2^20 (4 MiB in float32) keeps a chunk in cache: at 2^25 a 64-32-10 MLP on the 1,797 digits took
# 2.46 s per diagonal on a 2-core CPU, against 22 ms here (9,610 parameters: 0.88 s against 38 ms).
_PER_EXAMPLE_BUDGET = 2**20


def _check_num_samples(num_samples: int) -> None:
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")


def _wide(value) -> jnp.dtype:
    """The dtype sums of squares are taken in: ``value``'s, at least float32.

    In bfloat16 a running sum stops growing once it is a few hundred times each term (the
    chunked diagonal came out 15 to 50% low), and in float16 the squares under- and overflow.
    """
    return at_least_float32(value)


def _per_shard(params: PyTree, data: PyTree) -> tuple[PyTree, list[tuple]]:
    """``params`` marked as varying along the manual axes along which ``data`` vary, and those axes.

    Inside ``shard_map`` with ``check_vma``, JAX sums the gradient with respect to parameters
    replicated over an axis along which the data vary over that axis's shards. A gradient that
    is squared must not be: each per-example gradient would be the sum of one example from each
    shard, and each sampled gradient the sum of the shards' draws, which share their noise.
    Squares are formed per shard with the marked parameters, then :func:`_summed_over_shards`
    adds the shards' squares, as JAX sums ``jax.grad``'s and ``ggn_vp``'s (G is a sum over the
    examples). ``data`` holds the logits' type (``logits_shape``): data the model reads from its
    closure vary the logits as its inputs do. Outside ``shard_map`` nothing varies and nothing
    changes.
    """
    leaves, treedef = jax.tree.flatten(params)
    data_axes = varying_axes(data)
    shared = [tuple(sorted(data_axes - varying_axes(p), key=str)) for p in leaves]
    return treedef.unflatten(cast_varying(leaves, shared)), shared


def _summed_over_shards(leaves: list, shared: list[tuple]) -> list:
    return [jax.lax.psum(x, a) if a else x for x, a in zip(leaves, shared, strict=True)]


def _root(probs: jax.Array) -> jax.Array:
    """√s, with every derivative taken as 0 where s = 0 (√ of 1 there, then selected away).

    There ṡ = s·(ż − sᵀż) is 0 too, and the squares the rows feed are linear in s: sqrt's own
    0·∞ made every derivative of the diagonal NaN as soon as one probability was exactly 0 (a
    class masked by a ``-inf`` logit, or one that underflowed at a large margin).
    """
    positive = probs > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, probs, 1)), 0)


def _sqrt_factor_rows(logits: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """Rows k of Bᵀ for one example, ``scale · √sₖ (eₖ − s)``, in the logits' dtype. [K, K].

    Σₖ rowₖ rowₖᵀ = scale² (diag(s) − ssᵀ); the dtype is that of the model's VJP cotangents.
    The diagonal √sₖ (1 − sₖ) takes 1 − sₖ from the other classes' exponentials (as the losses
    do), so the winner of a confident example keeps its curvature at any margin. Half precision
    logits get their rows in float32, scaled, then rounded once.
    """
    probs, complement = softmax_parts(logits.astype(_wide(logits)), None)
    eye = jnp.eye(logits.shape[-1], dtype=bool)
    rows = _root(probs)[:, None] * jnp.where(eye, complement[None, :], -probs[None, :])
    return (scale * rows).astype(logits.dtype)


def _squares(logits_fn: LogitsFn, params: PyTree, example: PyTree, root: jax.Array) -> list:
    """Σₖ (Jᵀ·root·bₖ)² for one example, a list like params' leaves: one VJP per class."""

    def row_logits(p: PyTree) -> jax.Array:
        logits = logits_fn(p, jax.tree.map(lambda x: x[None], example))
        if logits.ndim != 2 or logits.shape[0] != 1:
            # A model that closes over an [N, K] array (a mask, a per-row bias) gave N rows
            # here, whose first was taken silently: a diagonal 0.16 off where its largest
            # entry is 0.18.
            raise ValueError(
                f"logits_fn returned logits of shape {logits.shape} for one row of the inputs, "
                "not [1, K]: pass per-row arrays (masks, biases) through inputs, not by closure"
            )
        return logits[0]

    logits, model_vjp = jax.vjp(row_logits, params)
    (columns,) = jax.vmap(model_vjp)(_sqrt_factor_rows(logits, root))
    # Squares and sums in float32 at least (see `_wide`).
    return [jnp.sum(jnp.square(c.astype(_wide(c))), axis=0) for c in jax.tree.leaves(columns)]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _example_squares(
    logits_fn: LogitsFn, params: PyTree, example: PyTree, weight: jax.Array, real: jax.Array
) -> list:
    """Σₖ (Jᵀbₖ)² times the weight, for one example, with its rows scaled by √weight.

    Scaling the rows keeps the squares' sum one fused reduction (a weight applied to each
    example's squares took 1.25 to 1.6 times as long, an MLP at N = 4,096); the derivatives
    (`_example_squares_jvp`) are taken through the unscaled squares times the weight, where
    √weight's infinite derivative at a weight of 0 made every derivative in the weights NaN.
    """
    # A padding row (`real` False, weight 0) has its root set, not taken: √0 is infinitely
    # steep, and reverse-mode second derivatives in the weights met it there (NaN whenever the
    # chunk size did not divide N). A real row of weight 0 keeps √, whose NaN there is better
    # than the wrong derivative a zero slope would give (docs/curvature.md).
    return _squares(
        logits_fn, params, example, jnp.where(real, jnp.sqrt(jnp.where(real, weight, 1)), 0)
    )


@functools.partial(_example_squares.defjvp, symbolic_zeros=True)
def _example_squares_jvp(logits_fn, primals, tangents):
    params, example, weight, real = primals
    params_dot, example_dot, weight_dot, _ = tangents
    out = _example_squares(logits_fn, params, example, weight, real)
    # The squares are linear in the weight: every derivative is taken through the unscaled
    # squares times the weight, so that no order meets √weight's derivative.
    values, structure = jax.tree.flatten((params, example))
    dots = structure.flatten_up_to((params_dot, example_dot))
    moved = [i for i, dot in enumerate(dots) if not isinstance(dot, SymbolicZero)]

    def unscaled(*chosen):
        leaves = list(values)
        for i, value in zip(moved, chosen, strict=True):
            leaves[i] = value
        return _squares(logits_fn, *structure.unflatten(leaves), jnp.ones_like(weight))

    squares, squares_dot = jax.jvp(unscaled, [values[i] for i in moved], [dots[i] for i in moved])
    out_dot = [weight.astype(d.dtype) * d for d in squares_dot]
    if not isinstance(weight_dot, SymbolicZero):
        out_dot = [
            dot + weight_dot.astype(u.dtype) * u for dot, u in zip(out_dot, squares, strict=True)
        ]
    return out, out_dot


def ggn_diagonal(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    *,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
    chunk_size: int | None = None,
) -> PyTree:
    """The exact diagonal of the Gauss-Newton matrix G of the weighted mean cross-entropy.

    diag(G) = Σᵢ cᵢ Σₖ (Jᵢᵀ bᵢₖ)², with cᵢ = wᵢ mᵢ / Σ w and bᵢₖ = √sᵢₖ (eₖ − sᵢ) the columns of
    the square-root factor Bᵢ = diag(√sᵢ) − sᵢ√sᵢᵀ of the loss Hessian (BᵢBᵢᵀ = diag(sᵢ) − sᵢsᵢᵀ).
    The squares are per example, so this takes per-example gradients: the model is called on
    one example at a time under ``vmap``, which requires row i of the logits to depend only on
    row i of the inputs (no batch normalisation across examples). Two backward passes of the
    batch check that: a model whose first or last row of logits reaches another row of its
    floating inputs raises ValueError, or, under ``jit``, gets a NaN diagonal. Inside
    ``shard_map`` with ``check_vma``, the shards' diagonals are summed for parameters replicated
    over the data's axes, as ``jax.grad`` sums gradients (docs/scaling.md).

    Cost: one forward and two backward passes of the batch, and K per-example backward passes
    (≈ K gradients of flops), holding ``chunk_size`` × K × P numbers at once. Use it when K·P
    fits in memory a few times over; for large models use :func:`ggn_diagonal_hutchinson` or
    :func:`ggn_diagonal_bartlett`.

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits, row-wise independent, pure
          as in :func:`ggn_operator` (from the second eager call with the same function and
          ``chunk_size`` on, it runs compiled, and what it reads besides its arguments is
          frozen at that call).
        params: pytree of floating arrays θ (P numbers).
        inputs: pytree of arrays whose leaves all have leading axis N.
        sample_weight: optional non-negative [N] example weights (plain mean without them).
        label_mass: mᵢ, a scalar or [N]; 1 for one-hot or integer labels.
        chunk_size: examples processed together; by default as many as keep about 2²⁰ numbers of
          per-example gradients in memory (at least one).

    Returns:
        diag(G), a pytree like ``params`` (non-negative).

    Raises:
        ValueError: if the shapes do not fit, ``chunk_size`` is not a positive integer, or the
            model's rows are not independent (outside ``jit``).
        TypeError: if the logits or a parameter are not floating.

    Example:
        For a linear model G is the Hessian, so its diagonal is the one ``jax.hessian`` gives:

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> labels = jnp.array([0, 2, 1])
        >>> H = jax.jit(jax.hessian(lambda w: xj.mean_cross_entropy(linear, w, X, labels)))(W)
        >>> exact = jnp.diagonal(H.reshape(6, 6)).reshape(2, 3)
        >>> bool(jnp.allclose(xj.ggn_diagonal(linear, W, X), exact))
        True
    """
    check_params(params)
    shape = logits_shape(logits_fn, params, inputs)
    n, k = shape.shape
    leaves = jax.tree.leaves(inputs)
    if not leaves or any(jnp.ndim(x) < 1 or jnp.shape(x)[0] != n for x in leaves):
        raise ValueError(f"every leaf of inputs must have leading axis N = {n}.")
    coefficients = example_coefficients(n, shape.dtype, sample_weight, label_mass)
    if n == 0:
        # The empty mean is the zero objective (as in `example_coefficients`): G = 0.
        return jax.tree.map(jnp.zeros_like, params)
    # NumPy leaves cannot be indexed by the traced row numbers of the chunk loop below.
    inputs = jax.tree.map(jnp.asarray, inputs)
    num_params = sum(int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params))
    if chunk_size is None:
        chunk_size = max(1, _PER_EXAMPLE_BUDGET // max(1, k * num_params))
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    chunk_size = min(int(chunk_size), n)

    params, shared = _per_shard(params, (shape, inputs, sample_weight, label_mass))
    leaves, treedef = jax.tree.flatten(params)
    arrays = (params, inputs, coefficients)
    program = None
    if is_concrete(arrays):
        program = _CHUNKED_SUMS((logits_fn, chunk_size))
    if program is None:
        program = functools.partial(_chunked_sums, logits_fn, chunk_size)
    sums, largest = program(*arrays)
    mixed = _mixes_rows(logits_fn, params, inputs, n)
    if is_concrete(mixed) and mixed:
        raise ValueError(
            "ggn_diagonal needs row i of the logits to depend only on row i of the inputs, but "
            "this model's first or last row of logits depends on other rows of the inputs "
            "(batch normalisation, attention or a running sum across the batch). Use "
            "ggn_diagonal_hutchinson or ggn_diagonal_bartlett, which work for any model."
        )
    # Under a trace the check cannot raise: such a model's diagonal comes out NaN, not wrong.
    diagonals = [
        jnp.where(mixed, jnp.nan, largest.astype(s.dtype) * s).astype(jnp.result_type(p))
        for s, p in zip(sums, leaves, strict=True)
    ]
    return treedef.unflatten(_summed_over_shards(diagonals, shared))


def _chunked_sums(
    logits_fn: LogitsFn, chunk_size: int, params: PyTree, inputs: PyTree, coefficients: jax.Array
) -> tuple[list, jax.Array]:
    """(Σᵢ (cᵢ / max c)·Σₖ (Jᵢᵀbᵢₖ)² per leaf of params, max c): a scan over chunks of examples."""
    n = coefficients.shape[0]
    # Each example's rows carry √(cᵢ / max c) and the sum is multiplied by max c at the end:
    # rows scaled by √cᵢ itself fell below float16's smallest normal number at N = 10⁵, and a
    # weight applied to each example's squares instead took 2 to 4 times as long.
    largest = jnp.max(coefficients)
    relative = jnp.where(largest > 0, coefficients / jnp.where(largest > 0, largest, 1), 0)

    def add_chunk(total: list, start: jax.Array) -> tuple[list, None]:
        index = start + jnp.arange(chunk_size)
        # Padding rows repeat the last example with coefficient 0: finite, and add nothing.
        safe = jnp.minimum(index, n - 1)
        chunk = jax.tree.map(lambda x: x[safe], inputs)
        real = index < n
        weights = jnp.where(real, relative[safe], 0)
        squares = jax.vmap(functools.partial(_example_squares, logits_fn, params))(
            chunk, weights, real
        )
        return [t + jnp.sum(q, axis=0) for t, q in zip(total, squares, strict=True)], None

    zeros = [jnp.zeros(jnp.shape(p), _wide(p)) for p in jax.tree.leaves(params)]
    starts = jnp.arange(-(-n // chunk_size)) * chunk_size
    sums, _ = scan(add_chunk, zeros, starts)  # a carry typed as the squares (`_manual`)
    return sums, largest


# Called eagerly, the scan above was traced and compiled afresh at every call (its body is a new
# function each time: 0.3-1 s a call). A compiled program per model and chunk size, for the last
# 16 used more than once (`Programs`, as `ggn_vp`'s linearisations).
_CHUNKED_SUMS = Programs(lambda key: jax.jit(functools.partial(_chunked_sums, *key)))


def _mixes_rows(logits_fn: LogitsFn, params: PyTree, inputs: PyTree, n: int) -> jax.Array:
    """Whether the first or the last row of the logits reaches another row of the (floating) inputs.

    Two backward passes of the batch (one, under ``vmap``), with the cotangent 1 on row 0 of
    the logits, then on row N − 1, and 0 elsewhere: for a model whose rows are independent,
    every other row of the inputs' cotangent is a sum of exact zeros, so the test has no
    rounding to allow for (comparing the logits of one example with the batched ones did:
    matrix-vector and matrix products round differently, and a linear model on features near
    10⁴ failed it). Batch normalisation sends either cotangent through the batch mean to every
    row; a causal model (row i reads rows ≤ i, as a prefix sum over the batch) shows from the
    last row, whose logits read every row, where row 0's read only their own. Integer inputs
    (token indices) are not looked at; NaN cotangents (from non-finite parameters) do not count.
    """
    if n < 2:
        return jnp.zeros((), bool)
    params, inputs = jax.lax.stop_gradient((params, inputs))
    leaves, treedef = jax.tree.flatten(inputs)
    floating = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]
    if not any(floating):
        return jnp.zeros((), bool)

    def model(varied: list) -> jax.Array:
        it = iter(varied)
        rebuilt = [next(it) if f else leaf for leaf, f in zip(leaves, floating, strict=True)]
        return logits_fn(params, treedef.unflatten(rebuilt))

    logits, model_vjp = jax.vjp(
        model, [leaf for leaf, f in zip(leaves, floating, strict=True) if f]
    )
    zeros = jnp.zeros_like(logits)  # typed as the logits (varying inside `shard_map`)
    seeds = jnp.stack([zeros.at[0].set(1), zeros.at[-1].set(1)])
    (cotangents,) = jax.vmap(model_vjp)(seeds)
    return jnp.any(
        jnp.stack(
            [jnp.any(jnp.abs(c[0, 1:]) > 0) | jnp.any(jnp.abs(c[1, :-1]) > 0) for c in cotangents]
        )
    )


def _rademacher_like(key: jax.Array, params: PyTree, num_samples: int) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    probes = [
        jax.random.rademacher(k, (num_samples, *jnp.shape(p))).astype(jnp.result_type(p))
        for k, p in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, probes)


def ggn_diagonal_hutchinson(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    key: jax.Array,
    *,
    num_samples: int = 1,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
) -> PyTree:
    """Hutchinson's unbiased estimate of diag(G): the mean of z ⊙ (G z) over Rademacher probes z.

    E[z ⊙ G z]ₚ = Σ_q Gₚ_q E[zₚ z_q] = Gₚₚ since the entries of z are independent ±1. The variance
    of one probe is Σ_{q≠p} Gₚ_q², so the estimate is good when G is diagonally dominant. Works
    for any model (no per-example structure needed). Inside ``shard_map`` with ``check_vma``,
    each shard forms its own estimate and the shards' estimates are summed, as for
    :func:`ggn_diagonal`.

    Cost: one forward pass, then ``num_samples`` GGN products (each ≈ one gradient), run
    together under ``vmap`` (memory ``num_samples`` × (N·K + P)).

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits.
        params: pytree of floating arrays θ.
        inputs: second argument of ``logits_fn``.
        key: a ``jax.random.key``.
        num_samples: number of probes averaged (static).
        sample_weight: optional non-negative [N] example weights (plain mean without them).
        label_mass: mᵢ, a scalar or [N]; 1 for one-hot or integer labels.

    Returns:
        An unbiased estimate of diag(G), a pytree like ``params``.

    Raises:
        ValueError: if the shapes do not fit or ``num_samples`` is not a positive integer.
        TypeError: if the logits or a parameter are not floating.

    Example:
        Many probes average to the exact diagonal (a linear model, where G is the Hessian):

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> labels = jnp.array([0, 2, 1])
        >>> H = jax.jit(jax.hessian(lambda w: xj.mean_cross_entropy(linear, w, X, labels)))(W)
        >>> exact = jnp.diagonal(H.reshape(6, 6)).reshape(2, 3)
        >>> @jax.jit
        ... def estimate_at(key):
        ...     return xj.ggn_diagonal_hutchinson(linear, W, X, key, num_samples=4000)
        >>> estimate = estimate_at(jax.random.key(0))
        >>> bool(jnp.allclose(estimate, exact, atol=0.1 * exact.max()))
        True
    """
    _check_num_samples(num_samples)
    check_params(params)
    if not jax.tree.leaves(params):  # no parameter: nothing to probe (vmap needs an array)
        return params
    shape = logits_shape(logits_fn, params, inputs)
    params, shared = _per_shard(params, (shape, inputs, sample_weight, label_mass))
    operator = ggn_operator(
        logits_fn, params, inputs, sample_weight=sample_weight, label_mass=label_mass
    )
    leaves, treedef = jax.tree.flatten(params)
    # Probes typed as their parameters (a key that differs between shards varies them all).
    probes = jax.tree.leaves(_rademacher_like(key, params, num_samples))
    probes = treedef.unflatten(vary_like(probes, leaves))
    products = jax.vmap(operator)(probes)
    estimates = jax.tree.map(lambda z, gz: jnp.mean(z * gz, axis=0), probes, products)
    return treedef.unflatten(_summed_over_shards(treedef.flatten_up_to(estimates), shared))


def ggn_diagonal_bartlett(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    key: jax.Array,
    *,
    num_samples: int = 1,
    sample_weight: jax.typing.ArrayLike | None = None,
    label_mass: jax.typing.ArrayLike = 1.0,
) -> PyTree:
    """Gauss-Newton-Bartlett unbiased estimate of diag(G) from labels sampled from the model.

    Draw ŷᵢ ∼ softmax(zᵢ) independently for each example and form the gradient

        ĝ = Σᵢ √cᵢ Jᵢᵀ (sᵢ − e_{ŷᵢ}) = ∇_θ Σᵢ √cᵢ Lᵢ(θ; ŷᵢ),     cᵢ = wᵢ mᵢ / Σ w.

    Each sᵢ − e_{ŷᵢ} has mean 0 and covariance diag(sᵢ) − sᵢsᵢᵀ, and the examples are
    independent, so E[ĝ ĝᵀ] = Σᵢ cᵢ Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ = G and ĝ ⊙ ĝ is unbiased for
    diag(G). With equal weights and unit mass ĝ = √N g for g the gradient of the mean loss at ŷ,
    i.e. the estimate N·g⊙g. Classes are drawn with JAX's high-range Gumbel noise, which
    reaches probabilities down to about 1e-14 in float32 (rarer ones, at margins beyond about
    32, are never drawn: their share of G is then missing, at most ~1e-14 of a row's); rows with
    every class at −inf have no curvature and count 0. Works for any model (no per-example
    structure needed). Inside ``shard_map`` with ``check_vma``, each shard squares its own ĝ
    and the shards' estimates are summed, as for :func:`ggn_diagonal`.

    Cost: one forward pass, then one backward pass per sample (≈ one gradient each), run
    together under ``vmap``.

    Args:
        logits_fn: ``logits_fn(params, inputs) -> [N, K]`` logits.
        params: pytree of floating arrays θ.
        inputs: second argument of ``logits_fn``.
        key: a ``jax.random.key``.
        num_samples: number of label samples averaged (static).
        sample_weight: optional non-negative [N] example weights (plain mean without them).
        label_mass: mᵢ, a scalar or [N]; 1 for one-hot or integer labels.

    Returns:
        An unbiased estimate of diag(G), a pytree like ``params`` (non-negative).

    Raises:
        ValueError: if the shapes do not fit or ``num_samples`` is not a positive integer.
        TypeError: if the logits or a parameter are not floating.

    Example:
        Many samples average to the exact diagonal (a linear model, where G is the Hessian):

        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.3]])
        >>> W = jnp.array([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
        >>> labels = jnp.array([0, 2, 1])
        >>> H = jax.jit(jax.hessian(lambda w: xj.mean_cross_entropy(linear, w, X, labels)))(W)
        >>> exact = jnp.diagonal(H.reshape(6, 6)).reshape(2, 3)
        >>> @jax.jit
        ... def estimate_at(key):
        ...     return xj.ggn_diagonal_bartlett(linear, W, X, key, num_samples=4000)
        >>> estimate = estimate_at(jax.random.key(0))
        >>> bool(jnp.allclose(estimate, exact, atol=0.1 * exact.max()))
        True
        >>> bool(jnp.all(estimate >= 0))
        True
    """
    _check_num_samples(num_samples)
    check_params(params)
    shape = logits_shape(logits_fn, params, inputs)
    n, k = shape.shape
    root_coefficients = jnp.sqrt(example_coefficients(n, shape.dtype, sample_weight, label_mass))
    params, shared = _per_shard(params, (shape, inputs, sample_weight, label_mass))
    logits, model_vjp = jax.vjp(lambda p: logits_fn(p, inputs), params)
    logits = jax.lax.stop_gradient(logits)
    # A row with every class at −inf has s = 0 and no curvature, but the sampler still draws
    # a class for it (class 0), whose −e₀ added Jᵀe₀ squared to the mean: such rows count 0.
    live = jnp.any(logits > -jnp.inf, axis=-1)
    row_coefficients = jnp.where(live, root_coefficients, 0)

    def squared_gradient(sample_key: jax.Array) -> PyTree:
        # Gumbel noise drawn in half precision samples the wrong distribution (a class at
        # margin 8 came up 0.4 to 0.6 times as often as its probability): draw in float32.
        # mode="high": the default Gumbel noise in float32 never drew classes of probability
        # below about 1e-7 (a tail of 1,000 classes at margin 17 came out 10x low); "high"
        # samples down to about 1e-14, for twice the random bits.
        labels = jax.random.categorical(sample_key, logits.astype(wide), axis=-1, mode="high")
        logit_gradient = jax.grad(
            lambda z: jnp.sum(
                row_coefficients * softmax_cross_entropy_with_integer_labels(z, labels).astype(wide)
            )
        )(logits)
        (gradient,) = model_vjp(logit_gradient)
        return jax.tree.map(lambda g: jnp.square(g.astype(_wide(g))), gradient)

    wide = _wide(logits)
    squares = jax.vmap(squared_gradient)(jax.random.split(key, num_samples))
    leaves, treedef = jax.tree.flatten(params)
    means = [
        jnp.mean(s, axis=0).astype(jnp.result_type(p))
        for s, p in zip(treedef.flatten_up_to(squares), leaves, strict=True)
    ]
    return treedef.unflatten(_summed_over_shards(means, shared))
