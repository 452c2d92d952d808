"""Cross-entropy of a linear head ``softmax(h W + b)`` without ever holding the N×V logits.

A language model ends in ``z = h W + b`` (``h: [N, D]``, ``W: [D, V]``, ``V`` up to 256k) and a
softmax cross-entropy against integer labels ``c``. With ``s = softmax(z)``, label smoothing
``α`` (target ``t = (1 − α) e_c + α/V``) and the z-loss weight ``ζ``, per token::

    ℓ      = lse − (1 − α) z_c − (α/V) Σ_k z_k + ζ lse²,        lse = logsumexp(z)
    ∂ℓ/∂z  = a s − t,                                            a = 1 + 2ζ lse
    ∂²ℓ/∂z² = a (diag(s) − s sᵀ) + 2ζ s sᵀ,   so   H ż = s ⊙ (a ż − (a − 2ζ) sᵀż).

Everything runs over chunks: rows in blocks of ``row_chunk_size`` and, inside each, the
vocabulary in blocks of ``vocab_chunk_size``. A block's logits ``h_r W_c + b_c`` are recomputed
wherever they are needed and never stored; with a single vocabulary block (the default up to
V = 262,144) each row block needs one pass, else two (streaming row statistics, then the
outputs). ``−log s_c``, ``1 − s_c`` and ``ż − sᵀż`` are never formed by subtraction: they come
from the other classes' share and a shift of ``ż`` at the largest logit (`_RowStats`,
`_block_ggn`), exact in the tails as the losses are.
Every product is a GEMM of a row block against a vocabulary block:

* loss only: ``h_r W_c``;
* gradient: ``G = c ⊙ (a s − t)``, then ``G W_cᵀ`` (hidden), ``h_rᵀ G`` (weight), ``Σ G`` (bias);
* Gauss-Newton product: ``ż = ḣ W_c + h Ẇ_c + ḃ_c``, ``U = c ⊙ H ż``, then as the gradient.

The reduced losses (``reduction="sum"/"mean"``) carry a ``custom_jvp`` whose rule computes the
three gradients in one fused pass and returns their inner products with the tangents: ``jvp``
works, and reverse mode saves the gradients (parameter-sized) as its only residuals, so a
``value_and_grad`` costs the three GEMMs of the dense computation. The per-token loss
(``reduction="none"``) cannot do that (its weight gradient depends on the cotangent of every
token), so its rule computes the tangent ``Σ_k G_ik ż_ik`` in a chunked loop whose row blocks
are ``jax.checkpoint``-ed: reverse mode recomputes each block's logits instead of storing them
(one more GEMM than the reduced path).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ._checks import is_concrete as _is_concrete
from ._losses import integer_labels
from ._manual import explicit_mesh, fori_loop, scan
from ._precision import at_least_float32

# A block of at most this many logits (128 MiB in float32) by default: 256 rows at V = 2^17,
# enough rows for every GEMM to run at full speed on CPU.
_DEFAULT_BLOCK_ELEMENTS = 2**25
# The weight gradient is accumulated in column slices of at most this many elements.
_WEIGHT_SLICE_ELEMENTS = 2**24
# Up to this vocabulary size, a row block spans the whole vocabulary by default (one pass).
_DEFAULT_MAX_VOCAB_BLOCK = 2**18
_REDUCTIONS = ("none", "sum", "mean")


class _Config(NamedTuple):
    """Static configuration of one call (hashable: a ``nondiff_argnums`` argument)."""

    num_rows: int
    vocab_size: int
    row_chunk: int
    vocab_chunk: int
    label_smoothing: float
    z_loss: float
    compute_dtype: np.dtype

    @property
    def num_row_chunks(self) -> int:
        return -(-self.num_rows // self.row_chunk)

    @property
    def num_vocab_chunks(self) -> int:
        return -(-self.vocab_size // self.vocab_chunk)


# --------------------------------------------------------------------------------------------
# Layout: rows in blocks [R, Nc, ...], vocabulary in blocks [C, D, Vc]; zero padding.
# --------------------------------------------------------------------------------------------


def _row_blocks(x: jax.Array, config: _Config) -> jax.Array:
    pad = config.num_row_chunks * config.row_chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((config.num_row_chunks, config.row_chunk) + x.shape[1:])


def _unrow_blocks(x: jax.Array, config: _Config) -> jax.Array:
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])[: config.num_rows]


def _weight_blocks(weight: jax.Array, config: _Config) -> jax.Array:
    """``[D, V] -> [C, D, Vc]`` (a copy only when there is more than one block)."""
    if config.num_vocab_chunks == 1:
        return weight[None]
    pad = config.num_vocab_chunks * config.vocab_chunk - config.vocab_size
    weight = jnp.pad(weight, [(0, 0), (0, pad)])
    blocks = weight.reshape(weight.shape[0], config.num_vocab_chunks, config.vocab_chunk)
    return jnp.transpose(blocks, (1, 0, 2))


def _unweight_blocks(blocks: jax.Array, config: _Config) -> jax.Array:
    if config.num_vocab_chunks == 1:
        return blocks[0]
    weight = jnp.transpose(blocks, (1, 0, 2)).reshape(blocks.shape[1], -1)
    return weight[:, : config.vocab_size]


def _bias_blocks(bias: jax.Array, config: _Config, fill: float = 0.0) -> jax.Array:
    """``[V] -> [C, Vc]``, the columns beyond V (to whole blocks) filled with ``fill``."""
    pad = config.num_vocab_chunks * config.vocab_chunk - config.vocab_size
    if pad:
        bias = jnp.pad(bias, (0, pad), constant_values=fill)
    return bias.reshape(config.num_vocab_chunks, config.vocab_chunk)


def _primal_bias_blocks(bias: jax.Array, config: _Config) -> jax.Array:
    """`_bias_blocks` of the primal bias in the compute dtype, its padded columns masked.

    Their bias is ``-inf`` (probability 0), or under ``jax_debug_infs`` the compute dtype's lowest
    finite number, whose exponential is also 0 beside any row's largest logit below about 10³⁰:
    the check stopped the program at the ``-inf`` of every vocabulary that the blocks do not
    divide (V > 2¹⁸ by default). Read when traced, as the check applies, and JAX keeps a program
    traced with the check on for later calls without it: there a row whose every class is
    masked (``-inf``) gives the padding the probability (with the check on, its own ``-inf``
    stops the program first).
    """
    dtype = config.compute_dtype
    fill = float(jnp.finfo(dtype).min) if jax.config.jax_debug_infs else -jnp.inf
    return _bias_blocks(bias.astype(dtype), config, fill)


def _unbias_blocks(blocks: jax.Array, config: _Config) -> jax.Array:
    return blocks.reshape(-1)[: config.vocab_size]


# --------------------------------------------------------------------------------------------
# One block: logits, probabilities and the per-logit coefficients of the closed forms.
# --------------------------------------------------------------------------------------------


def _matmul(a: jax.Array, b: jax.Array, config: _Config) -> jax.Array:
    """``a @ b`` in the operands' dtype, accumulated in the compute dtype (float32 for bf16)."""
    return jnp.matmul(a, b, preferred_element_type=config.compute_dtype)


def _matmul_t(a: jax.Array, b: jax.Array, contract: int, config: _Config) -> jax.Array:
    """``aᵀ b`` (contract=0) or ``a bᵀ`` (contract=1) as a single dot_general."""
    dims = (((0,), (0,)), ((), ())) if contract == 0 else (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=config.compute_dtype)


def _block_logits(hidden_r, weight_c, bias_c, config: _Config) -> jax.Array:
    return _matmul(hidden_r, weight_c, config) + bias_c.astype(config.compute_dtype)[None, :]


def _column_valid(index: jax.Array, config: _Config) -> jax.Array:
    columns = index * config.vocab_chunk + jnp.arange(config.vocab_chunk)
    return columns < config.vocab_size, columns


def _block_probs(logits, lse) -> jax.Array:
    # exp(−inf − finite) = 0 gives masked (−inf bias) classes and padded columns (whose bias is
    # −inf, `_primal_bias_blocks`) probability 0. No select with a mask: a loop-invariant mask
    # broadcast to the block would be hoisted out of the row loop by reverse-mode partial
    # evaluation. A row with every class masked has lse = −inf: taken as the lowest finite
    # number, its probabilities are 0 (as from `_block_statistics`), not exp(−inf + inf) = NaN.
    lse = jnp.maximum(lse, jnp.finfo(lse.dtype).min)
    return jnp.exp(logits - lse[:, None])


def _z_loss_scale(lse: jax.Array, config: _Config) -> jax.Array:
    """``1 + 2ζ·lse`` per row, the z-loss's factor on the softmax terms.

    A row with every class masked has lse = −inf: its weight is 0, and its scale must not be
    ±inf (0·inf made its gradient and products NaN).
    """
    return 1.0 + 2.0 * config.z_loss * jnp.where(jnp.isfinite(lse), lse, 0.0)


def _block_gradient(
    logits, stats, labels_r, row_weight, index, config: _Config, probs=None
) -> jax.Array:
    """``c ⊙ (a s − t)`` for one block: the gradient of the weighted loss w.r.t. the logits.

    The label's entry ``a s_c − (1 − α) = 2ζ·lse·s_c − (1 − s_c) + α`` takes ``1 − s_c`` from
    the other classes' share (``stats.complement``), never by subtraction from 1: a confident
    token keeps its label's gradient where ``s_c`` rounds to 1.
    """
    valid, columns = _column_valid(index, config)
    lse = stats.lse
    if probs is None:
        probs = _block_probs(logits, lse)
    scale = _z_loss_scale(lse, config) if config.z_loss else None
    grad = probs if scale is None else scale[:, None] * probs
    label_entry = config.label_smoothing - stats.complement[:, None]
    if scale is not None:
        label_entry = label_entry + (scale - 1.0)[:, None] * probs
    grad = jnp.where(labels_r[:, None] == columns[None, :], label_entry, grad)
    if config.label_smoothing:
        smoothing = config.label_smoothing / config.vocab_size
        grad = grad - valid.astype(grad.dtype)[None, :] * smoothing
    return grad * row_weight[:, None]


def _block_ggn(logits, logits_dot, stats, row_weight, config: _Config, probs=None) -> jax.Array:
    """``c ⊙ s ⊙ (a (ż − sᵀż) + 2ζ sᵀż)`` for one block, i.e. ``c ⊙ s ⊙ (a ż − (a − 2ζ) sᵀż)``.

    ``ż`` is shifted by ``r``, its value at the largest logit (found here with a single
    vocabulary block, ``probs`` given; ``stats.shift`` across blocks, with ``stats.dot =
    sᵀ(ż − r)``): that class then adds nothing to ``sᵀ(ż − r)``, so the other classes' terms are
    not rounded away against it, and the product of a confident token stays accurate and
    positive semi-definite (as ``hessian_product_from_probs`` does in the losses).
    """
    lse = stats.lse
    if probs is not None:
        shift = _shift(logits, stats.peak, logits_dot)
        centred = logits_dot - shift[:, None]
        dot = jnp.sum(probs * centred, axis=-1)
        curvature = probs * (centred - dot[:, None])
        dot = dot + shift
    else:
        probs = _block_probs(logits, lse)
        curvature = probs * ((logits_dot - stats.shift[:, None]) - stats.dot[:, None])
        dot = stats.dot + stats.shift
    if config.z_loss:
        scale = _z_loss_scale(lse, config)
        curvature = scale[:, None] * curvature + 2.0 * config.z_loss * probs * dot[:, None]
    # A −inf logit (masked or padded class) gives s = 0 and a finite ż: the product is 0 there.
    return curvature * row_weight[:, None]


class _RowStats(NamedTuple):
    """Per row, what the closed forms need from the whole vocabulary, each exact in the tails.

    ``lse`` = logsumexp(z); ``label_nll`` = −log s_c = (m − z_c) + log1p(S + (e_c − 1)) and
    ``complement`` = 1 − s_c = S / T, with m the largest logit, S = Σ_{k≠c} exp(z_k − m) the other
    classes' share, e_c = exp(z_c − m) and T = S + e_c (as the integer loss's ``_label_split``):
    a label on the winner keeps its loss log1p(S) and its gradient −S/T where s_c rounds to 1.
    ``dot`` = sᵀ(ż − r) and ``shift`` = r, the tangent at the largest logit (GGN products across
    vocabulary blocks only), and ``peak`` = m (a single vocabulary block only); None otherwise.
    """

    lse: jax.Array
    label_nll: jax.Array
    complement: jax.Array
    dot: jax.Array | None = None
    shift: jax.Array | None = None
    peak: jax.Array | None = None


def _finish_label(peak, others, label_logit) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(lse, −log s_c, 1 − s_c, T)`` from the row's maximum, others' share and label logit.

    The total is ``T = S + e_c``: one sum over the classes serves both the normaliser and the
    complement, as in the integer loss.
    """
    label_exp = jnp.exp(jnp.minimum(label_logit - peak, 0.0))
    total = others + label_exp
    # S + (e_c − 1) ≥ 0 (S holds the winner's 1 unless the label is the winner, whose e_c = 1).
    rest = jnp.maximum(others + (label_exp - 1.0), 0.0)
    label_nll = jnp.maximum(peak - label_logit, 0.0) + jnp.log1p(rest)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.log(total) + peak, label_nll, others / safe_total, safe_total


def _label_columns(labels_r, columns) -> jax.Array:
    return labels_r[:, None] == columns[None, :]


def _label_logit(logits, labels_r) -> jax.Array:
    """``z_c`` per row of a block holding every class: a gather, the same number as the block's."""
    safe = jnp.clip(labels_r, 0, logits.shape[-1] - 1)[:, None]
    return jnp.take_along_axis(logits, safe, axis=-1)[:, 0]


def _shift(logits, peak, logits_dot) -> jax.Array:
    """``r``: the tangent at the largest logit, the mean over the classes tied there.

    Any r is exact in exact arithmetic; the mean keeps r the size of ż where many classes tie
    (a zero-initialised head), where their sum grew with the count and ``ż − r`` then lost
    log₂(count) bits. A row with no class at ``peak`` (every class masked) gets r = 0.
    """
    tied = logits == peak[:, None]
    count = jnp.maximum(jnp.sum(tied, axis=-1, dtype=logits_dot.dtype), 1.0)
    return jnp.sum(jnp.where(tied, logits_dot, 0.0), axis=-1) / count


def _block_statistics(logits, labels_r, columns):
    """``(_RowStats, softmax)`` of whole rows (a single vocabulary block) from one exponential.

    An all ``-inf`` row gives ``lse = -inf`` and probabilities 0.
    """
    peak = jnp.maximum(jnp.max(logits, axis=-1), jnp.finfo(logits.dtype).min)
    unnormalized = jnp.exp(logits - peak[:, None])
    others = jnp.sum(jnp.where(_label_columns(labels_r, columns), 0.0, unnormalized), axis=-1)
    lse, label_nll, complement, total = _finish_label(peak, others, _label_logit(logits, labels_r))
    probs = unnormalized * (1.0 / total)[:, None]
    return _RowStats(lse, label_nll, complement, peak=peak), probs


def _stream_step(state, logits, logits_dot, labels_r, first_column):
    """Online statistics with a running maximum ``m``: one vocabulary block.

    The state is (m, S, z_c, T, W, r): the others' share rescaled to m, the label's logit, and
    with tangents the total T, W = Σ exp(z − m)(ż − r) and r the tangent at the largest logit so
    far (W is re-based when r moves, by (r_old − r_new)·T_old).
    """
    peak, others, label_logit, total, weighted, shift = state
    block_peak = jnp.max(logits, axis=-1)
    new_peak = jnp.maximum(peak, block_peak)
    rescale = jnp.exp(peak - new_peak)
    terms = jnp.exp(logits - new_peak[:, None])
    local = labels_r - first_column
    label = local[:, None] == jnp.arange(logits.shape[-1])[None, :]
    others = others * rescale + jnp.sum(jnp.where(label, 0.0, terms), axis=-1)
    inside = (local >= 0) & (local < logits.shape[-1])
    label_logit = jnp.where(inside, _label_logit(logits, local), label_logit)
    if logits_dot is not None:
        new_shift = jnp.where(block_peak > peak, _shift(logits, block_peak, logits_dot), shift)
        weighted = (weighted + (shift - new_shift) * total) * rescale + jnp.sum(
            terms * (logits_dot - new_shift[:, None]), axis=-1
        )
        total = total * rescale + terms.sum(axis=-1)
        shift = new_shift
    return new_peak, others, label_logit, total, weighted, shift


def _finish_stream(state) -> _RowStats:
    peak, others, label_logit, _, weighted, shift = state
    lse, label_nll, complement, total = _finish_label(peak, others, label_logit)
    if weighted is None:
        return _RowStats(lse, label_nll, complement)
    return _RowStats(lse, label_nll, complement, weighted / total, shift)


def _init_stream(num_rows: int, config: _Config, with_dot: bool):
    # The running maximum starts at the lowest finite number, so that exp(m_old − m_new) is
    # never exp(−inf + inf) for a row whose first blocks are all −inf.
    dtype = config.compute_dtype
    peak = jnp.full((num_rows,), jnp.finfo(dtype).min, dtype)
    zeros = jnp.zeros((num_rows,), dtype)
    tangent = zeros if with_dot else None
    return peak, zeros, zeros, tangent, tangent, tangent


# --------------------------------------------------------------------------------------------
# Per row block: statistics (pass 1) and outputs (pass 2); one pass with a single vocab block.
# --------------------------------------------------------------------------------------------


def _tangent_logits(hidden_r, weight_c, hidden_dot_r, weight_dot_c, bias_dot_c, config):
    """``ż = ḣ W_c + h Ẇ_c + ḃ_c`` for one block; None when every tangent is absent."""
    terms = []
    if hidden_dot_r is not None:
        terms.append(_matmul(hidden_dot_r, weight_c, config))
    if weight_dot_c is not None:
        terms.append(_matmul(hidden_r, weight_dot_c, config))
    if bias_dot_c is not None:
        terms.append(bias_dot_c.astype(config.compute_dtype)[None, :])
    if not terms:
        return None
    return functools.reduce(jnp.add, terms)


def _row_statistics(hidden_r, labels_r, weight_blocks, bias_blocks, tangent_blocks, config):
    """`_RowStats` of one row block, streamed over the vocabulary blocks.

    With ``tangent_blocks``, also the tangent's ``sᵀ(ż − r)`` and ``r``.
    """
    hidden_dot_r, weight_dot_blocks, bias_dot_blocks = tangent_blocks or (None, None, None)
    with_dot = tangent_blocks is not None

    def step(state, xs):
        index, weight_c, bias_c, weight_dot_c, bias_dot_c = xs
        logits = _block_logits(hidden_r, weight_c, bias_c, config)
        first_column = index * config.vocab_chunk
        logits_dot = None
        if with_dot:
            logits_dot = _tangent_logits(
                hidden_r, weight_c, hidden_dot_r, weight_dot_c, bias_dot_c, config
            )
            if logits_dot is None:
                logits_dot = jnp.zeros_like(logits)
        return _stream_step(state, logits, logits_dot, labels_r, first_column), None

    state = _init_stream(hidden_r.shape[0], config, with_dot)
    xs = (
        jnp.arange(config.num_vocab_chunks),
        weight_blocks,
        bias_blocks,
        weight_dot_blocks,
        bias_dot_blocks,
    )
    state, _ = scan(step, state, xs)
    return _finish_stream(state)


def _token_losses(stats: _RowStats, hidden, weight, bias, labels, config: _Config) -> jax.Array:
    """``(1 − α)(−log s_c) + α (lse − Σ_k z_k / V) + ζ lse²`` per row (NaN for a bad label).

    That is ``lse − (1 − α) z_c − (α/V) Σ_k z_k + ζ lse²``, with a label outside [0, V) NaN.
    ``−log s_c`` comes from the statistics (`_RowStats`), not as ``lse − z_c``, which rounds to
    0 for a confident token (float32 from a margin of about 17).
    """
    loss = (1.0 - config.label_smoothing) * stats.label_nll
    if config.label_smoothing:
        # Σ_k z_k = h · (W 1) + Σ b: the uniform part of the target needs no vocabulary pass.
        column_sum = weight.astype(config.compute_dtype).sum(axis=1)
        total = hidden.astype(config.compute_dtype) @ column_sum
        total = total + bias.astype(config.compute_dtype).sum()
        loss = loss + config.label_smoothing * (stats.lse - total / config.vocab_size)
    if config.z_loss:
        loss = loss + config.z_loss * stats.lse**2
    valid = (labels >= 0) & (labels < config.vocab_size)
    return jnp.where(valid, loss, jnp.nan)


def _statistics(hidden, weight, bias, labels, config: _Config) -> _RowStats:
    """`_RowStats` of every row ``[N]``, streamed by row blocks and vocabulary blocks."""
    weight_blocks = _weight_blocks(weight, config)
    bias_blocks = _primal_bias_blocks(bias, config)

    def row_step(_, xs):
        hidden_r, labels_r = xs
        return None, _row_statistics(hidden_r, labels_r, weight_blocks, bias_blocks, None, config)

    _, stats = scan(row_step, None, (_row_blocks(hidden, config), _row_blocks(labels, config)))
    return jax.tree.map(lambda x: _unrow_blocks(x, config), stats)


def _row_weight(row_weight: jax.Array, labels: jax.Array, config: _Config) -> jax.Array:
    """Token weights with NaN on an included token whose label is outside ``[0, V)``."""
    valid = (labels >= 0) & (labels < config.vocab_size)
    return jnp.where(valid | (row_weight == 0), row_weight, jnp.nan)


def _add_weight_update(out_weight, index, hidden_r, coefficients, config: _Config):
    """``out_weight[index] += h_rᵀ B`` in column slices of at most 2^24 / D columns.

    XLA writes a GEMM's result to a fresh buffer before adding it: done in one piece, the update
    of a whole-vocabulary block would be a second weight-sized array.
    """
    width = coefficients.shape[1]
    pieces = -(-width // max(1, _WEIGHT_SLICE_ELEMENTS // max(1, hidden_r.shape[1])))
    step = -(-width // pieces)

    def add_piece(start, size, out_weight):
        piece = jax.lax.dynamic_slice_in_dim(coefficients, start, size, axis=1)
        update = _matmul_t(hidden_r, piece, 0, config)[None]
        current = jax.lax.dynamic_slice(out_weight, (index, 0, start), update.shape)
        return jax.lax.dynamic_update_slice(out_weight, current + update, (index, 0, start))

    # A loop, not unrolled pieces: XLA would schedule unrolled GEMMs side by side.
    if pieces > 1:
        out_weight = fori_loop(0, pieces - 1, lambda i, w: add_piece(i * step, step, w), out_weight)
    return add_piece((pieces - 1) * step, width - (pieces - 1) * step, out_weight)


def _output_pass(hidden, weight, bias, labels, row_weight, tangents, config: _Config):
    """Products ``Jᵀ B`` with ``B`` the per-block gradient (no tangents) or GGN product.

    Returns ``(stats, out_hidden, out_weight, out_bias)`` (`_RowStats` per row, ``[N]`` each);
    ``out_hidden`` and ``out_weight`` are
    None when the GGN product leaves that argument out (its tangent is None).
    """
    dtype = config.compute_dtype
    weight_blocks = _weight_blocks(weight, config)
    bias_blocks = _primal_bias_blocks(bias, config)
    ggn = tangents is not None
    if ggn:
        hidden_dot, weight_dot, bias_dot = tangents
        hidden_dot_blocks = None if hidden_dot is None else _row_blocks(hidden_dot, config)
        weight_dot_blocks = None if weight_dot is None else _weight_blocks(weight_dot, config)
        bias_dot_blocks = None if bias_dot is None else _bias_blocks(bias_dot, config)
        want = (hidden_dot is not None, weight_dot is not None, bias_dot is not None)
    else:
        hidden_dot_blocks = weight_dot_blocks = bias_dot_blocks = None
        want = (True, True, True)
    single = config.num_vocab_chunks == 1

    def block_coefficients(hidden_r, labels_r, weight_r, hidden_dot_r, stats, xs):
        index, weight_c, bias_c, weight_dot_c, bias_dot_c = xs
        logits = _block_logits(hidden_r, weight_c, bias_c, config)
        probs = None
        if single:
            # The whole row is in this block: its statistics come from the logits at hand, with
            # one exponential per logit (on CPU the exponential, not the memory, costs most).
            stats, probs = _block_statistics(logits, labels_r, _column_valid(index, config)[1])
        if not ggn:
            return stats, _block_gradient(logits, stats, labels_r, weight_r, index, config, probs)
        logits_dot = _tangent_logits(
            hidden_r, weight_c, hidden_dot_r, weight_dot_c, bias_dot_c, config
        )
        if logits_dot is None:
            logits_dot = jnp.zeros_like(logits)
        return stats, _block_ggn(logits, logits_dot, stats, weight_r, config, probs)

    def row_step(carry, xs):
        out_weight, out_bias = carry
        hidden_r, labels_r, weight_r, hidden_dot_r = xs
        stats = None
        if not single:
            tangent_blocks = (hidden_dot_r, weight_dot_blocks, bias_dot_blocks) if ggn else None
            stats = _row_statistics(
                hidden_r, labels_r, weight_blocks, bias_blocks, tangent_blocks, config
            )
        out_hidden_r = jnp.zeros(hidden_r.shape, dtype) if want[0] else None

        def vocab_step(inner, index):
            out_hidden_r, out_weight, out_bias = inner
            xs_c = (
                index,
                weight_blocks[index],
                bias_blocks[index],
                None if weight_dot_blocks is None else weight_dot_blocks[index],
                None if bias_dot_blocks is None else bias_dot_blocks[index],
            )
            stats_r, coefficients = block_coefficients(
                hidden_r, labels_r, weight_r, hidden_dot_r, stats, xs_c
            )
            # Half precision operands keep the GEMMs in their dtype, accumulated in float32.
            coefficients_op = coefficients.astype(jnp.result_type(hidden_r, xs_c[1]))
            if want[0]:
                out_hidden_r = out_hidden_r + _matmul_t(coefficients_op, xs_c[1], 1, config)
            if want[1]:
                out_weight = _add_weight_update(
                    out_weight, index, hidden_r, coefficients_op, config
                )
            if want[2]:
                out_bias = out_bias.at[index].add(coefficients.sum(axis=0))
            return (out_hidden_r, out_weight, out_bias), stats_r

        inner = (out_hidden_r, out_weight, out_bias)
        if single:
            inner, stats_r = vocab_step(inner, 0)
        else:
            inner = fori_loop(0, config.num_vocab_chunks, lambda i, c: vocab_step(c, i)[0], inner)
            stats_r = stats
        out_hidden_r, out_weight, out_bias = inner
        # Only what the losses need leaves the loop (the tangent's sums stay inside).
        return (out_weight, out_bias), (
            stats_r._replace(dot=None, shift=None, peak=None),
            out_hidden_r,
        )

    out_weight = jnp.zeros(weight_blocks.shape, dtype) if want[1] else None
    out_bias = jnp.zeros(bias_blocks.shape, dtype) if want[2] else None
    xs = (
        _row_blocks(hidden, config),
        _row_blocks(labels, config),
        _row_blocks(row_weight, config),
        hidden_dot_blocks,
    )
    (out_weight, out_bias), (stats, out_hidden) = scan(row_step, (out_weight, out_bias), xs)
    stats = jax.tree.map(lambda x: _unrow_blocks(x, config), stats)
    out_hidden = None if out_hidden is None else _unrow_blocks(out_hidden, config)
    out_weight = None if out_weight is None else _unweight_blocks(out_weight, config)
    out_bias = None if out_bias is None else _unbias_blocks(out_bias, config)
    return stats, out_hidden, out_weight, out_bias


# --------------------------------------------------------------------------------------------
# The two differentiable cores.
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _reduced_loss(config, hidden, weight, bias, labels, row_weight):
    """``Σ_i c_i ℓ_i`` (c: token weights, not differentiated)."""
    stats = _statistics(hidden, weight, bias, labels, config)
    losses = _token_losses(stats, hidden, weight, bias, labels, config)
    return jnp.sum(jnp.where(row_weight != 0, row_weight * losses, 0.0))


def _fused_value_and_grad(config, hidden, weight, bias, labels, row_weight):
    row_weight = _row_weight(row_weight, labels, config)
    stats, grad_hidden, grad_weight, grad_bias = _output_pass(
        hidden, weight, bias, labels, row_weight, None, config
    )
    losses = _token_losses(stats, hidden, weight, bias, labels, config)
    value = jnp.sum(jnp.where(row_weight != 0, row_weight * losses, 0.0))
    return value, grad_hidden, grad_weight, grad_bias


def _vdot(gradient: jax.Array, tangent) -> jax.Array | None:
    if isinstance(tangent, SymbolicZero):
        return None
    return jnp.vdot(gradient, tangent.astype(gradient.dtype))


@_reduced_loss.defjvp
def _reduced_loss_jvp(config, primals, tangents):
    # The tangent is ⟨∇, v⟩ with the three gradients from one fused pass: reverse mode keeps
    # these parameter-sized gradients as its residuals and never an N×V array.
    hidden, weight, bias, labels, row_weight = primals
    hidden_dot, weight_dot, bias_dot, _, _ = tangents
    value, grad_hidden, grad_weight, grad_bias = _fused_value_and_grad(
        config, hidden, weight, bias, labels, row_weight
    )
    terms = [
        _vdot(grad_hidden, hidden_dot),
        _vdot(grad_weight, weight_dot),
        _vdot(grad_bias, bias_dot),
    ]
    terms = [t for t in terms if t is not None]
    tangent = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(value)
    return value, tangent.astype(value.dtype)


_reduced_loss.defjvp(_reduced_loss_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _token_loss(config, hidden, weight, bias, labels, mask):
    """``ℓ_i`` per token, ``[N]``."""
    stats = _statistics(hidden, weight, bias, labels, config)
    return _token_losses(stats, hidden, weight, bias, labels, config)


def _token_tangent(config, hidden, weight, bias, labels, stats, tangents):
    """``Σ_k (∂ℓ_i/∂z_ik) ż_ik`` per token, by blocks; row blocks are rematerialised."""
    hidden_dot, weight_dot, bias_dot = tangents
    weight_blocks = _weight_blocks(weight, config)
    bias_blocks = _primal_bias_blocks(bias, config)
    weight_dot_blocks = None if weight_dot is None else _weight_blocks(weight_dot, config)
    bias_dot_blocks = None if bias_dot is None else _bias_blocks(bias_dot, config)
    ones = jnp.ones((config.row_chunk,), config.compute_dtype)

    @jax.checkpoint
    def row_tangent(hidden_r, labels_r, stats_r, hidden_dot_r):
        def step(total, xs):
            index, weight_c, bias_c, weight_dot_c, bias_dot_c = xs
            logits = _block_logits(hidden_r, weight_c, bias_c, config)
            grad = _block_gradient(logits, stats_r, labels_r, ones, index, config)
            logits_dot = _tangent_logits(
                hidden_r, weight_c, hidden_dot_r, weight_dot_c, bias_dot_c, config
            )
            return total + jnp.sum(grad * logits_dot, axis=-1), None

        xs = (
            jnp.arange(config.num_vocab_chunks),
            weight_blocks,
            bias_blocks,
            weight_dot_blocks,
            bias_dot_blocks,
        )
        total, _ = scan(step, jnp.zeros_like(stats_r.lse), xs)
        return total

    def row_step(_, xs):
        return None, row_tangent(*xs)

    hidden_dot_blocks = None if hidden_dot is None else _row_blocks(hidden_dot, config)
    xs = (
        _row_blocks(hidden, config),
        _row_blocks(labels, config),
        jax.tree.map(lambda x: _row_blocks(x, config), stats),
        hidden_dot_blocks,
    )
    _, tangent = scan(row_step, None, xs)
    return _unrow_blocks(tangent, config)


def _none_if_zero(tangent):
    return None if isinstance(tangent, SymbolicZero) else tangent


@_token_loss.defjvp
def _token_loss_jvp(config, primals, tangents):
    hidden, weight, bias, labels, mask = primals
    hidden_dot, weight_dot, bias_dot, _, _ = (_none_if_zero(t) for t in tangents)
    stats = _statistics(hidden, weight, bias, labels, config)
    losses = _token_losses(stats, hidden, weight, bias, labels, config)
    if hidden_dot is None and weight_dot is None and bias_dot is None:
        return losses, jnp.zeros_like(losses)
    tangent = _token_tangent(
        config, hidden, weight, bias, labels, stats, (hidden_dot, weight_dot, bias_dot)
    )
    valid = (labels >= 0) & (labels < config.vocab_size)
    # A NaN factor, not a select with a NaN constant: a select is transposed into a zero
    # cotangent for the bad token, and the gradient would silently skip it.
    poison = jnp.where(valid | ~mask, 1.0, jnp.nan).astype(tangent.dtype)
    return losses, (tangent * poison).astype(losses.dtype)


_token_loss.defjvp(_token_loss_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Public API: validation and layout at the boundary.
# --------------------------------------------------------------------------------------------


def _check_chunk(value: int | None, name: str) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}.")


def _explicit_mesh(*values):
    """The mesh of the first input sharded on a mesh with ``Explicit`` axes, else None."""
    for leaf in jax.tree.leaves(values):
        if isinstance(leaf, jax.Array) and (mesh := explicit_mesh(leaf)) is not None:
            return mesh
    return None


def _spec(value, ndim: int) -> tuple:
    """The partition of each of the first ``ndim`` axes of ``value`` (None: replicated)."""
    spec = ()
    if isinstance(value, jax.Array):
        spec = tuple(getattr(getattr(jax.typeof(value), "sharding", None), "spec", None) or ())
    return (spec + (None,) * ndim)[:ndim]


def _on_auto_axes(function, mesh, out_specs):
    """``function`` run with ``mesh``'s ``Explicit`` axes typed ``Auto``, outputs laid out so.

    The blocks are reshapes of the token and vocabulary axes, which an ``Explicit`` axis would
    ask every such reshape and contraction to state the sharding of; typed ``Auto``, the same
    devices hold the same shards and XLA's partitioner propagates the layout through the blocks.
    The outputs come back on the ``Explicit`` axes with the partitions ``out_specs`` (a pytree
    of ``PartitionSpec`` matching the outputs, None for a None output).
    """
    axes = tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    )
    out_sharding = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        out_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return jax.sharding.auto_axes(function, axes=axes, out_sharding=out_sharding)


def _plan(num_rows: int, vocab_size: int, row_chunk_size, vocab_chunk_size) -> tuple[int, int]:
    """Block sizes: the whole vocabulary up to 2^18 classes, rows to fill 2^25 logits."""
    if vocab_chunk_size is None:
        vocab_chunk = vocab_size if vocab_size <= _DEFAULT_MAX_VOCAB_BLOCK else 2**16
    else:
        vocab_chunk = vocab_chunk_size
    vocab_chunk = min(int(vocab_chunk), vocab_size)
    if row_chunk_size is None:
        row_chunk = max(8, _DEFAULT_BLOCK_ELEMENTS // vocab_chunk // 8 * 8)
    else:
        row_chunk = row_chunk_size
    return max(1, min(int(row_chunk), num_rows)), vocab_chunk


def _prepare(
    hidden,
    weight,
    labels,
    bias,
    where,
    label_smoothing,
    z_loss,
    row_chunk_size,
    vocab_chunk_size,
):
    """Checked, flattened arrays and the static configuration."""
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
    if hidden.ndim < 1 or weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"hidden must be [..., D] and weight [D, V] with the same D; got hidden "
            f"{hidden.shape} and weight {weight.shape}."
        )
    dim, vocab_size = weight.shape
    if vocab_size == 0:
        raise ValueError(f"weight needs at least one class, got shape {weight.shape}.")
    batch_shape = hidden.shape[:-1]
    given_labels = labels  # for the error message: `integer_labels` makes int64 ones −1
    labels = integer_labels(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    if labels.shape != batch_shape:
        raise ValueError(
            f"labels of shape {labels.shape} must have hidden's batch shape {batch_shape}."
        )
    if bias is None:
        bias = jnp.zeros((vocab_size,), weight.dtype)
    else:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got dtype {bias.dtype}.")
        if bias.shape != (vocab_size,):
            raise ValueError(f"bias must have shape [V] = [{vocab_size}], got {bias.shape}.")
    if where is None:
        mask = jnp.ones(batch_shape, bool)
    else:
        mask = jnp.asarray(where)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean array, got dtype {mask.dtype}.")
        try:
            mask = jnp.broadcast_to(mask, batch_shape)
        except ValueError as error:
            raise ValueError(
                f"where of shape {mask.shape} does not broadcast to the batch shape {batch_shape}."
            ) from error
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a Python float, got {type(value).__name__}.")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}.")
    if not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be finite and non-negative, got {z_loss}.")
    _check_chunk(row_chunk_size, "row_chunk_size")
    _check_chunk(vocab_chunk_size, "vocab_chunk_size")
    if _is_concrete(labels) and _is_concrete(mask):
        host_labels, host_mask = np.asarray(labels), np.asarray(mask)
        bad = host_mask & ((host_labels < 0) | (host_labels >= vocab_size))
        if bad.any():
            given = np.broadcast_to(np.asarray(given_labels), bad.shape)
            raise ValueError(
                f"labels must lie in [0, V) = [0, {vocab_size}) on included "
                f"tokens; got {given[bad][:5].tolist()}."
            )
    num_rows = int(np.prod(batch_shape, dtype=np.int64))
    row_chunk, vocab_chunk = _plan(num_rows, vocab_size, row_chunk_size, vocab_chunk_size)
    compute_dtype = np.dtype(at_least_float32(hidden, weight, bias))
    config = _Config(
        num_rows,
        vocab_size,
        row_chunk,
        vocab_chunk,
        float(label_smoothing),
        float(z_loss),
        compute_dtype,
    )
    return hidden.reshape(num_rows, dim), weight, labels.reshape(-1), bias, mask, config


def _token_weights(mask: jax.Array, reduction: str, dtype) -> jax.Array:
    weights = mask.reshape(-1).astype(dtype)
    if reduction == "mean":
        weights = weights / jnp.maximum(weights.sum(), 1.0)
    return weights


def _ggn_vp(config, reduction, hidden, weight, bias, labels, mask, tangents):
    """(the reduced loss, (G·v for hidden, weight, bias)): one pass over the vocabulary."""
    weights = _row_weight(_token_weights(mask, reduction, config.compute_dtype), labels, config)
    stats, *products = _output_pass(hidden, weight, bias, labels, weights, tangents, config)
    losses = _token_losses(stats, hidden, weight, bias, labels, config)
    return jnp.sum(jnp.where(weights != 0, weights * losses, 0.0)), tuple(products)


# Called eagerly, the scans above were traced and compiled afresh at every call (their bodies
# are new functions each time: 0.2-0.3 s a call at 10 tokens). Compiled once per static
# configuration and shapes; under a caller's trace they are inlined as before.
_REDUCED_LOSS = jax.jit(_reduced_loss, static_argnums=0)
_TOKEN_LOSS = jax.jit(_token_loss, static_argnums=0)
_GGN_VP = jax.jit(_ggn_vp, static_argnums=(0, 1))


def linear_softmax_cross_entropy(
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    row_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy of a linear head, ``softmax(h W + b)``, without the N×V logits.

    Per token, with ``z = h W + b``, ``lse = logsumexp(z)``, label ``c``, smoothing ``α``
    (target ``(1 − α) e_c + α/V``) and z-loss weight ``ζ``:

    .. math::
        \ell = \mathrm{lse} - (1-\alpha) z_c - \tfrac{\alpha}{V}\textstyle\sum_k z_k
               + \zeta\,\mathrm{lse}^2,
        \qquad \nabla_z \ell = (1 + 2\zeta\,\mathrm{lse})\, s - t .

    The logits are computed block by block (rows × vocabulary), reduced by a streaming
    logsumexp, and recomputed, never stored, wherever a derivative needs them. Derivatives are
    closed forms attached with ``jax.custom_jvp``, so ``grad``, ``jvp``, ``vmap`` and ``jit``
    all work; second order goes forward-over-reverse (``jax.jvp`` of ``jax.grad``), or through
    :func:`linear_softmax_cross_entropy_ggn_vp` for the Gauss-Newton product. With
    ``reduction="sum"`` or ``"mean"`` a gradient costs the three GEMMs of the dense computation
    (the rule computes the gradients in one fused pass and reverse mode keeps them as its only
    residuals); with ``"none"`` reverse mode recomputes each block's logits (one GEMM more).

    Numbers equal ``softmax_cross_entropy_with_integer_labels(h @ W + b, labels, where=...,
    label_smoothing=α) + ζ lse²`` (with ``α > 0`` and logits sharing a large offset c, up to
    about α·ulp(c) in the value: docs/linear_head.md). A ``-inf`` bias entry masks its class
    (probability and gradient 0 there); with ``α > 0`` the uniform target then meets a ``-inf``
    logit and the loss is ``+inf``, as in the dense formula. bfloat16 or float16 inputs run
    their GEMMs in their own dtype, accumulated in float32, with every reduction in float32.

    Inputs may be sharded over a mesh (``NamedSharding``): the token axes of ``hidden`` (and
    ``labels``, ``where``), the vocabulary axis of ``weight`` and ``bias``, or both. On
    ``Auto`` axes XLA's partitioner carries the layout through the blocks. Inputs on
    ``Explicit`` axes (the default of ``jax.make_mesh``) are computed with those axes typed
    ``Auto`` (``jax.sharding.auto_axes``: the same devices hold the same shards) and the result
    comes back on the ``Explicit`` axes: per-token losses sharded as ``hidden``'s token axes, a
    reduced loss replicated; gradients come back sharded as their arguments.

    Args:
        hidden: ``[..., D]`` features ``h`` of each token (floating point).
        weight: ``[D, V]`` head matrix ``W``.
        labels: ``[...]`` integer classes in ``[0, V)``.
        bias: optional ``[V]`` head bias ``b``; ``-inf`` entries mask classes.
        where: optional boolean mask of the batch shape: a ``False`` token contributes exactly
            0 (its label is not checked).
        label_smoothing: ``α`` in ``[0, 1]`` (a Python float).
        z_loss: finite ``ζ ≥ 0``, weight of the ``lse²`` regulariser (a Python float).
        reduction: ``"none"`` (per-token ``[...]``), ``"sum"``, or ``"mean"`` (over the tokens
            that ``where`` includes; 0 when there are none).
        row_chunk_size: rows per block; default fills ``2^25`` logits per block.
        vocab_chunk_size: classes per block; default the whole vocabulary up to ``2^18``, else
            ``2^16``. Neither size needs to divide its axis.

    Returns:
        ``[...]`` per-token losses, or a scalar for ``"sum"``/``"mean"``, in the promoted dtype of
        ``hidden`` and ``weight``.

    Raises:
        TypeError: for non-floating ``hidden``/``weight``/``bias``, non-integer labels, a
            non-boolean ``where``, or non-float ``label_smoothing``/``z_loss``.
        ValueError: for mismatched shapes, labels outside ``[0, V)`` on included tokens (when
            concrete; under ``jit`` such a token's loss is NaN), ``α`` outside ``[0, 1]``,
            ``ζ`` negative, NaN or infinite, a bad ``reduction`` or chunk size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
        >>> weight = jax.random.normal(jax.random.key(1), (4, 10))
        >>> labels = jnp.array([0, 3, 9, 1, 1, 5])
        >>> fused = xj.linear_softmax_cross_entropy(hidden, weight, labels, vocab_chunk_size=4)
        >>> dense = xj.softmax_cross_entropy_with_integer_labels(hidden @ weight, labels)
        >>> bool(jnp.allclose(fused, dense, atol=1e-5))
        True
        >>> mean = lambda w: xj.linear_softmax_cross_entropy(
        ...     hidden, w, labels, reduction="mean", vocab_chunk_size=4)
        >>> jax.grad(mean)(weight).shape
        (4, 10)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    mesh = _explicit_mesh(hidden, weight, labels, bias, where)
    if mesh is not None:
        options = dict(
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
            row_chunk_size=row_chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )

        def on_auto_axes(hidden, weight, labels, bias, where):
            return linear_softmax_cross_entropy(
                hidden, weight, labels, bias=bias, where=where, **options
            )

        batch_axes = max(jnp.ndim(hidden) - 1, 0) if reduction == "none" else 0
        out_spec = PartitionSpec(*_spec(hidden, batch_axes))
        return _on_auto_axes(on_auto_axes, mesh, out_spec)(hidden, weight, labels, bias, where)
    batch_shape = jnp.shape(hidden)[:-1]
    hidden, weight, labels, bias, mask, config = _prepare(
        hidden,
        weight,
        labels,
        bias,
        where,
        label_smoothing,
        z_loss,
        row_chunk_size,
        vocab_chunk_size,
    )
    out_dtype = jnp.result_type(hidden, weight)
    if config.num_rows == 0:
        # No token: an empty loss, or a sum (and mean) of 0, with zero gradients, as the dense
        # loss gives.
        return jnp.zeros(batch_shape if reduction == "none" else (), out_dtype)
    if reduction == "none":
        losses = _TOKEN_LOSS(config, hidden, weight, bias, labels, mask.reshape(-1))
        losses = jnp.where(mask.reshape(-1), losses, 0.0)
        return losses.reshape(batch_shape).astype(out_dtype)
    weights = _token_weights(mask, reduction, config.compute_dtype)
    return _REDUCED_LOSS(config, hidden, weight, bias, labels, weights).astype(out_dtype)


def linear_softmax_cross_entropy_ggn_vp(
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    tangents: tuple,
    *,
    bias: jax.typing.ArrayLike | None = None,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    row_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, tuple]:
    r"""The loss of the head and its Gauss-Newton product, in one chunked pass, no N×V array.

    For the reduced loss ``F = Σ_i c_i ℓ_i`` (``c_i = 1`` for ``"sum"``, ``1/N_included`` for
    ``"mean"``, 0 on tokens that ``where`` excludes) of the head ``z = h W + b``, with
    ``J`` the Jacobian of the logits w.r.t. the variables and the closed-form loss Hessian
    ``H_i = a_i (diag(s_i) − s_i s_iᵀ) + 2ζ s_i s_iᵀ`` (``a_i = 1 + 2ζ lse_i``):

    .. math::
        G v = J^\top \operatorname{diag}(c) H J v, \qquad
        J v = \dot h W + h \dot W + \dot b, \qquad
        H \dot z = s \odot (a \dot z - (a - 2\zeta)\, s^\top \dot z).

    Each block computes ``ż``, ``U = c ⊙ H ż`` and ``(U Wᵀ, hᵀ U, Σ U)``; with a single
    vocabulary block per row block that is one pass, else a streaming pass for ``lse`` and
    ``sᵀż`` first. For ``ζ = 0`` (or ``lse ≥ −1/(2ζ)``) ``H`` is positive semi-definite. The GGN
    does not depend on the labels or on ``α``: they only enter the returned loss. For
    ``(W, b)`` alone the head is linear, so this is also the exact Hessian product. For a whole
    model ``h = f(θ)`` use ``ḣ`` from ``jax.jvp(f, …)`` and pull the hidden part back with
    ``jax.vjp(f, …)`` (see ``docs/linear_head.md``). Sharded inputs work as in
    :func:`linear_softmax_cross_entropy`; on ``Explicit`` axes each product comes back sharded
    as its argument (``h``, ``W``, ``b``) and the loss replicated.

    Args:
        hidden: ``[..., D]`` features ``h``.
        weight: ``[D, V]`` head matrix ``W``.
        labels: ``[...]`` integer classes (for the loss value only).
        tangents: ``(ḣ, Ẇ, ḃ)`` shaped like ``(hidden, weight, bias)``. A ``None`` entry removes
            that argument from the variables: it gets no input direction and no output (the
            product is the corresponding block of ``G``). ``ḃ`` needs a ``bias``.
        bias: optional ``[V]`` bias; ``-inf`` entries mask classes.
        where: optional boolean token mask of the batch shape.
        label_smoothing: ``α`` (enters the loss value only).
        z_loss: finite ``ζ ≥ 0``.
        reduction: ``"sum"`` or ``"mean"``.
        row_chunk_size: rows per block (see :func:`linear_softmax_cross_entropy`).
        vocab_chunk_size: classes per block.

    Returns:
        ``(loss, (G_h, G_W, G_b))``: the reduced loss and the product's parts, each shaped and
        typed like its argument, ``None`` where the tangent is ``None``.

    Raises:
        TypeError, ValueError: as :func:`linear_softmax_cross_entropy`, and for tangents whose
        shapes do not match, all-``None`` tangents, or ``reduction="none"``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> hidden = jax.random.normal(jax.random.key(0), (6, 4))
        >>> weight = jax.random.normal(jax.random.key(1), (4, 10))
        >>> labels = jnp.array([0, 3, 9, 1, 1, 5])
        >>> direction = jnp.ones_like(weight)
        >>> loss, (_, product, _) = xj.linear_softmax_cross_entropy_ggn_vp(
        ...     hidden, weight, labels, (None, direction, None))
        >>> product.shape  # 1 is in the null space of every softmax Hessian
        (4, 10)
        >>> bool(jnp.abs(product).max() < 1e-5)
        True
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    if not isinstance(tangents, (tuple, list)) or len(tangents) != 3:
        raise TypeError("tangents must be a tuple (hidden_dot, weight_dot, bias_dot).")
    if all(t is None for t in tangents):
        raise ValueError("at least one of the tangents must be given (not None).")
    if tangents[2] is not None and bias is None:
        raise ValueError("a bias tangent needs a bias.")
    mesh = _explicit_mesh(hidden, weight, labels, tuple(tangents), bias, where)
    if mesh is not None:
        options = dict(
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
            row_chunk_size=row_chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )

        def on_auto_axes(hidden, weight, labels, tangents, bias, where):
            return linear_softmax_cross_entropy_ggn_vp(
                hidden, weight, labels, tangents, bias=bias, where=where, **options
            )

        # Each product is laid out as its argument, whatever the layout of its tangent.
        specs = [
            None if tangent is None else PartitionSpec(*_spec(x, jnp.ndim(x)))
            for tangent, x in zip(tangents, (hidden, weight, bias), strict=True)
        ]
        run = _on_auto_axes(on_auto_axes, mesh, (PartitionSpec(), tuple(specs)))
        return run(hidden, weight, labels, tuple(tangents), bias, where)
    batch_shape = jnp.shape(hidden)[:-1]
    out_dtypes = [jnp.result_type(x) for x in (hidden, weight)]
    out_dtypes.append(None if bias is None else jnp.result_type(bias))
    hidden, weight, labels, bias, mask, config = _prepare(
        hidden,
        weight,
        labels,
        bias,
        where,
        label_smoothing,
        z_loss,
        row_chunk_size,
        vocab_chunk_size,
    )
    shapes = ((*batch_shape, hidden.shape[-1]), weight.shape, bias.shape)
    checked = []
    for name, tangent, shape in zip(("hidden", "weight", "bias"), tangents, shapes, strict=True):
        if tangent is not None:
            tangent = jnp.asarray(tangent)
            if tangent.shape != tuple(shape):
                raise ValueError(
                    f"the {name} tangent must have shape {tuple(shape)}, got {tangent.shape}."
                )
            if not jnp.issubdtype(tangent.dtype, jnp.floating):
                raise TypeError(f"the {name} tangent must be floating point.")
        checked.append(tangent)
    if config.num_rows == 0:
        products = tuple(
            None if tangent is None else jnp.zeros(shape, dtype)
            for tangent, shape, dtype in zip(checked, shapes, out_dtypes, strict=True)
        )
        return jnp.zeros((), jnp.result_type(*out_dtypes[:2])), products
    if checked[0] is not None:
        checked[0] = checked[0].reshape(hidden.shape)
    loss, (out_hidden, out_weight, out_bias) = _GGN_VP(
        config, reduction, hidden, weight, bias, labels, mask, tuple(checked)
    )
    if out_hidden is not None:
        out_hidden = out_hidden.reshape(shapes[0]).astype(out_dtypes[0])
    if out_weight is not None:
        out_weight = out_weight.astype(out_dtypes[1])
    if out_bias is not None:
        out_bias = out_bias.astype(out_dtypes[2])
    return loss.astype(jnp.result_type(*out_dtypes[:2])), (out_hidden, out_weight, out_bias)
