"""Chunked linear-head cross-entropy against the dense loss (ours, optax's) and dense curvature."""

import functools
import os
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fresh import json_report

import xentropy_jax as xj

N, D, V = 13, 5, 29  # prime-ish sizes: chunks of 3, 4, 7 divide neither N nor V

CHUNKS = [(None, None), (3, 4), (5, 7), (13, 29), (4, 64), (100, 10)]


def make_head(dtype=jnp.float64, seed=0, n=N, d=D, v=V, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (n, d), dtype)
    weight = scale * jax.random.normal(keys[1], (d, v), dtype)
    bias = jax.random.normal(keys[2], (v,), dtype)
    labels = jax.random.randint(keys[3], (n,), 0, v)
    return hidden, weight, bias, labels


def dense_losses(hidden, weight, bias, labels, where=None, label_smoothing=0.0, z_loss=0.0):
    logits = hidden @ weight + bias[None, :]
    losses = xj.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=label_smoothing
    )
    if z_loss:
        losses = losses + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
    if where is not None:
        losses = jnp.where(where, losses, 0.0)
    return losses


def reduce(losses, where, reduction):
    if reduction == "sum":
        return losses.sum()
    count = losses.size if where is None else jnp.maximum(where.sum(), 1)
    return losses.sum() / count


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row_chunk, vocab_chunk, label_smoothing, z_loss",
    [
        (r, v, a, z)
        for (r, v), (a, z) in zip(
            CHUNKS,
            [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 0.3), (0.0, 0.0), (0.3, 0.1)],
            strict=True,
        )
    ],
)
def test_per_token_value_equals_dense(row_chunk, vocab_chunk, label_smoothing, z_loss):
    hidden, weight, bias, labels = make_head()
    fused = xj.linear_softmax_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        row_chunk_size=row_chunk,
        vocab_chunk_size=vocab_chunk,
    )
    dense = dense_losses(hidden, weight, bias, labels, None, label_smoothing, z_loss)
    np.testing.assert_allclose(fused, dense, rtol=1e-12, atol=1e-12)


def test_value_equals_optax_and_keeps_batch_shape():
    hidden, weight, bias, labels = make_head(n=12)
    hidden3, labels3 = hidden.reshape(3, 4, D), labels.reshape(3, 4)
    fused = xj.linear_softmax_cross_entropy(
        hidden3, weight, labels3, bias=bias, row_chunk_size=5, vocab_chunk_size=6
    )
    logits3 = hidden3 @ weight + bias[None, None, :]
    reference = optax.softmax_cross_entropy_with_integer_labels(logits3, labels3)
    assert fused.shape == (3, 4)
    np.testing.assert_allclose(fused, reference, rtol=1e-12)
    smoothed = xj.linear_softmax_cross_entropy(
        hidden3, weight, labels3, bias=bias, label_smoothing=0.3, vocab_chunk_size=6
    )
    targets = optax.smooth_labels(jax.nn.one_hot(labels3, V), 0.3)
    np.testing.assert_allclose(smoothed, optax.softmax_cross_entropy(logits3, targets), rtol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduced_value_and_where(reduction):
    hidden, weight, bias, labels = make_head()
    where = jnp.arange(N) % 3 != 1
    labels = jnp.where(where, labels, -7)  # labels of excluded tokens are never looked at
    fused = xj.linear_softmax_cross_entropy(
        hidden,
        weight,
        labels,
        bias=bias,
        where=where,
        reduction=reduction,
        z_loss=0.05,
        row_chunk_size=4,
        vocab_chunk_size=8,
    )
    dense = reduce(
        dense_losses(hidden, weight, bias, jnp.maximum(labels, 0), where, 0.0, 0.05),
        where,
        reduction,
    )
    np.testing.assert_allclose(fused, dense, rtol=1e-12)
    per_token = xj.linear_softmax_cross_entropy(hidden, weight, labels, bias=bias, where=where)
    assert jnp.all(per_token[~where] == 0.0)


def test_all_masked_mean_is_zero_with_zero_gradient():
    hidden, weight, bias, labels = make_head()
    where = jnp.zeros(N, bool)

    def mean(w):
        return xj.linear_softmax_cross_entropy(
            hidden, w, labels, bias=bias, where=where, reduction="mean", vocab_chunk_size=8
        )

    value, grad = jax.value_and_grad(mean)(weight)
    assert value == 0.0
    assert jnp.all(grad == 0.0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_tokens_give_an_empty_loss_or_zero(reduction):
    # As the dense loss: an empty batch is an empty result (a sum of nothing is 0; the mean over
    # no included token is 0, as with every token masked), with zero gradients.
    _, weight, bias, _ = make_head()
    hidden, labels = jnp.zeros((0, 3, weight.shape[0])), jnp.zeros((0, 3), int)

    def loss(h, w, b):
        return xj.linear_softmax_cross_entropy(h, w, labels, bias=b, reduction=reduction)

    value = jax.jit(loss)(hidden, weight, bias)
    assert value.shape == ((0, 3) if reduction == "none" else ())
    assert jnp.all(value == 0.0)
    grads = jax.grad(lambda *args: loss(*args).sum(), argnums=(0, 1, 2))(hidden, weight, bias)
    dense = jax.grad(
        lambda h, w, b: xj.softmax_cross_entropy_with_integer_labels(
            h @ w + b[None, None], labels
        ).sum(),
        argnums=(0, 1, 2),
    )(hidden, weight, bias)
    for got, expected in zip(grads, dense, strict=True):
        assert got.shape == expected.shape and jnp.all(got == 0.0) and jnp.all(expected == 0.0)
    if reduction != "none":
        tangents = (jnp.ones_like(hidden), jnp.ones_like(weight), None)
        value, products = xj.linear_softmax_cross_entropy_ggn_vp(
            hidden, weight, labels, tangents, bias=bias, reduction=reduction
        )
        assert value == 0.0 and products[2] is None
        assert products[0].shape == hidden.shape and jnp.all(products[1] == 0.0)


def test_minus_inf_bias_masks_classes():
    hidden, weight, bias, labels = make_head()
    masked = jnp.arange(V) % 4 == 0
    bias = jnp.where(masked, -jnp.inf, bias)
    labels = jnp.where(masked[labels], labels + 1, labels)
    kwargs = dict(bias=bias, row_chunk_size=4, vocab_chunk_size=6)
    fused = xj.linear_softmax_cross_entropy(hidden, weight, labels, **kwargs)
    np.testing.assert_allclose(fused, dense_losses(hidden, weight, bias, labels), rtol=1e-12)
    assert jnp.all(jnp.isfinite(fused))

    def mean(w, b):
        return xj.linear_softmax_cross_entropy(
            hidden, w, labels, reduction="mean", **{**kwargs, "bias": b}
        )

    def dense_mean(w, b):
        return dense_losses(hidden, w, b, labels).mean()

    grads = jax.grad(mean, argnums=(0, 1))(weight, bias)
    dense_grads = jax.grad(dense_mean, argnums=(0, 1))(weight, bias)
    for g, r in zip(grads, dense_grads, strict=True):
        assert jnp.all(jnp.isfinite(g))
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    assert jnp.all(grads[0][:, masked] == 0.0) and jnp.all(grads[1][masked] == 0.0)
    # A label on a masked class costs +inf, as the dense formula says.
    bad = xj.linear_softmax_cross_entropy(hidden, weight, jnp.zeros_like(labels), **kwargs)
    assert jnp.all(bad == jnp.inf)


# --------------------------------------------------------------------------------------------
# Gradients and tangents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reduction, row_chunk, vocab_chunk",
    [("none", 3, 4), ("none", None, None), ("sum", 5, 7), ("mean", 100, 10), ("mean", 3, 4)],
)
def test_gradients_equal_dense(reduction, row_chunk, vocab_chunk):
    hidden, weight, bias, labels = make_head(seed=1)
    where = jnp.arange(N) % 5 != 2
    cotangent = jax.random.normal(jax.random.key(9), (N,), jnp.float64)
    options = dict(label_smoothing=0.1, z_loss=0.02)

    def scalar(losses):
        return (cotangent * losses).sum() if reduction == "none" else losses

    def fused(h, w, b):
        return scalar(
            xj.linear_softmax_cross_entropy(
                h,
                w,
                labels,
                bias=b,
                where=where,
                reduction=reduction,
                row_chunk_size=row_chunk,
                vocab_chunk_size=vocab_chunk,
                **options,
            )
        )

    def dense(h, w, b):
        losses = dense_losses(h, w, b, labels, where, **options)
        return scalar(losses if reduction == "none" else reduce(losses, where, reduction))

    value, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(hidden, weight, bias)
    dense_value, dense_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(hidden, weight, bias)
    np.testing.assert_allclose(value, dense_value, rtol=1e-12)
    for g, r in zip(grads, dense_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    tangents = jax.tree.map(lambda x: jnp.cos(3.0 * x), (hidden, weight, bias))
    out, out_dot = jax.jvp(fused, (hidden, weight, bias), tangents)
    _, dense_dot = jax.jvp(dense, (hidden, weight, bias), tangents)
    np.testing.assert_allclose(out, dense_value, rtol=1e-12)
    np.testing.assert_allclose(out_dot, dense_dot, rtol=1e-10)


def test_gradients_equal_optax():
    hidden, weight, bias, labels = make_head(seed=2)

    def fused(h, w, b):
        return xj.linear_softmax_cross_entropy(
            h, w, labels, bias=b, reduction="mean", row_chunk_size=4, vocab_chunk_size=10
        )

    def reference(h, w, b):
        return optax.softmax_cross_entropy_with_integer_labels(h @ w + b[None, :], labels).mean()

    grads = jax.grad(fused, argnums=(0, 1, 2))(hidden, weight, bias)
    expected = jax.grad(reference, argnums=(0, 1, 2))(hidden, weight, bias)
    for g, r in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


def test_finite_differences():
    hidden, weight, bias, labels = make_head(seed=3, n=6, v=11)
    for reduction in ("none", "mean"):

        @jax.jit
        def loss(h, w, b, reduction=reduction):
            return xj.linear_softmax_cross_entropy(
                h,
                w,
                labels,
                bias=b,
                reduction=reduction,
                z_loss=0.1,
                label_smoothing=0.1,
                row_chunk_size=4,
                vocab_chunk_size=3,
            )

        jax.test_util.check_grads(loss, (hidden, weight, bias), order=1, modes=("fwd", "rev"))


def test_second_order_forward_over_reverse_is_the_hessian():
    hidden, weight, bias, labels = make_head(seed=4)
    direction = (jnp.sin(hidden), jnp.cos(weight), jnp.sin(2.0 * bias))

    def fused(params):
        h, w, b = params
        return xj.linear_softmax_cross_entropy(
            h,
            w,
            labels,
            bias=b,
            reduction="mean",
            z_loss=0.05,
            row_chunk_size=5,
            vocab_chunk_size=8,
        )

    def dense(params):
        h, w, b = params
        return dense_losses(h, w, b, labels, z_loss=0.05).mean()

    params = (hidden, weight, bias)
    hvp = jax.jvp(jax.grad(fused), (params,), (direction,))[1]
    dense_hvp = jax.jvp(jax.grad(dense), (params,), (direction,))[1]
    for g, r in zip(hvp, dense_hvp, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Gauss-Newton products
# --------------------------------------------------------------------------------------------


def dense_head_ggn(hidden, weight, bias, labels, tangents, where, z_loss, reduction):
    """Jᵀ diag(c) H J v with H from autodiff of the dense loss in the logits."""
    weights = jnp.ones(N) if where is None else where.astype(jnp.float64)
    if reduction == "mean":
        weights = weights / jnp.maximum(weights.sum(), 1)
    variables = [i for i, t in enumerate(tangents) if t is not None]

    def logits_of(*args):
        full = [hidden, weight, bias]
        for i, a in zip(variables, args, strict=True):
            full[i] = a
        return full[0] @ full[1] + full[2][None, :]

    primals = [(hidden, weight, bias)[i] for i in variables]
    logits, logits_dot = jax.jvp(logits_of, primals, [tangents[i] for i in variables])

    def loss_of_logits(z):
        losses = xj.softmax_cross_entropy_with_integer_labels(z, labels)
        return (weights * (losses + z_loss * jax.nn.logsumexp(z, axis=-1) ** 2)).sum()

    curvature = jax.jvp(jax.grad(loss_of_logits), (logits,), (logits_dot,))[1]
    pulled = jax.vjp(logits_of, *primals)[1](curvature)
    out = [None, None, None]
    for i, p in zip(variables, pulled, strict=True):
        out[i] = p
    return tuple(out)


@pytest.mark.parametrize(
    "row_chunk, vocab_chunk, z_loss, which",
    [
        (None, None, 0.0, (1, 1, 1)),
        (3, 4, 0.03, (1, 1, 1)),
        (5, 7, 0.0, (0, 1, 1)),
        (100, 10, 0.03, (0, 1, 0)),
        (3, 4, 0.0, (1, 0, 0)),
        (None, None, 0.03, (0, 1, 0)),
    ],
)
def test_ggn_vp_equals_dense(row_chunk, vocab_chunk, z_loss, which):
    hidden, weight, bias, labels = make_head(seed=5)
    where = jnp.arange(N) % 4 != 3
    full = (jnp.cos(hidden), jnp.sin(weight), jnp.cos(3.0 * bias))
    tangents = tuple(t if w else None for t, w in zip(full, which, strict=True))
    loss, products = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden,
        weight,
        labels,
        tangents,
        bias=bias,
        where=where,
        z_loss=z_loss,
        row_chunk_size=row_chunk,
        vocab_chunk_size=vocab_chunk,
    )
    expected = dense_head_ggn(hidden, weight, bias, labels, tangents, where, z_loss, "mean")
    for p, r in zip(products, expected, strict=True):
        if r is None:
            assert p is None
        else:
            np.testing.assert_allclose(p, r, rtol=1e-10, atol=1e-13)
    dense_loss = reduce(
        dense_losses(hidden, weight, bias, labels, where, z_loss=z_loss), where, "mean"
    )
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-12)


def test_ggn_vp_equals_package_ggn_and_hessian_for_the_weights():
    hidden, weight, bias, labels = make_head(seed=6)
    params = {"w": weight, "b": bias}
    tangents = {"w": jnp.sin(weight), "b": jnp.cos(bias)}

    def logits_fn(p, h):
        return h @ p["w"] + p["b"][None, :]

    _, (_, g_w, g_b) = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden,
        weight,
        labels,
        (None, tangents["w"], tangents["b"]),
        bias=bias,
        row_chunk_size=4,
        vocab_chunk_size=6,
    )
    expected = xj.ggn_vp(logits_fn, params, hidden, tangents)
    np.testing.assert_allclose(g_w, expected["w"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g_b, expected["b"], rtol=1e-10, atol=1e-13)

    # The head is linear in (W, b): its GGN there is the Hessian of the fused loss itself.
    def mean(w, b):
        return xj.linear_softmax_cross_entropy(
            hidden, w, labels, bias=b, reduction="mean", row_chunk_size=4, vocab_chunk_size=6
        )

    hessian = jax.jvp(
        jax.grad(mean, argnums=(0, 1)), (weight, bias), (tangents["w"], tangents["b"])
    )[1]
    np.testing.assert_allclose(hessian[0], g_w, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(hessian[1], g_b, rtol=1e-10, atol=1e-13)


def test_whole_model_ggn_through_jvp_and_vjp():
    keys = jax.random.split(jax.random.key(7), 4)
    inputs = jax.random.normal(keys[0], (N, 3), jnp.float64)
    params = {
        "w1": jax.random.normal(keys[1], (3, D), jnp.float64),
        "w2": jax.random.normal(keys[2], (D, V), jnp.float64),
    }
    labels = jax.random.randint(keys[3], (N,), 0, V)
    tangents = jax.tree.map(jnp.cos, params)

    def features(w1):
        return jnp.tanh(inputs @ w1)

    hidden, hidden_dot = jax.jvp(features, (params["w1"],), (tangents["w1"],))
    _, (g_hidden, g_w2, _) = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden,
        params["w2"],
        labels,
        (hidden_dot, tangents["w2"], None),
        row_chunk_size=5,
        vocab_chunk_size=7,
    )
    (g_w1,) = jax.vjp(features, params["w1"])[1](g_hidden)

    def logits_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    expected = xj.ggn_vp(logits_fn, params, inputs, tangents)
    np.testing.assert_allclose(g_w1, expected["w1"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g_w2, expected["w2"], rtol=1e-10, atol=1e-13)


def test_ggn_is_symmetric_positive_semidefinite():
    hidden, weight, bias, labels = make_head(seed=8, n=6, d=3, v=7)
    size = weight.size

    def product(flat):
        _, (_, g_w, _) = xj.linear_softmax_cross_entropy_ggn_vp(
            hidden,
            weight,
            labels,
            (None, flat.reshape(weight.shape), None),
            bias=bias,
            row_chunk_size=4,
            vocab_chunk_size=3,
        )
        return g_w.reshape(-1)

    matrix = jax.vmap(product)(jnp.eye(size))
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-14)
    assert np.linalg.eigvalsh(np.asarray(matrix)).min() > -1e-12


# --------------------------------------------------------------------------------------------
# Float32, bfloat16, transformations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_chunk", [None, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_confident_tokens_are_exact_in_the_tails(vocab_chunk, dtype):
    # Labels on the winner at margins 10-60: the head formed lse − z_c, s_c − 1 and ż − sᵀż by
    # subtraction, so the loss, the label's gradient and the GGN product rounded to 0 or lost
    # every digit from a margin of about 17 in float32 (37 in float64), and the float32 GGN had
    # a negative eigenvalue as large as its smallest true one. The dense losses are exact there.
    rng = np.random.default_rng(0)
    eps = float(jnp.finfo(dtype).eps)
    hidden = jnp.asarray(rng.normal(size=(6, 3)), dtype)
    weight = jnp.asarray(0.3 * rng.normal(size=(3, 5)), dtype)
    tangents = (
        None,
        jnp.asarray(rng.normal(size=(3, 5)), dtype),
        jnp.asarray(rng.normal(size=5), dtype),
    )
    labels = jnp.zeros(6, jnp.int32)
    chunks = {"vocab_chunk_size": vocab_chunk}

    def dense(params, x):
        return x @ params["w"] + params["b"][None, :]

    for margin in [10.0, 20.0, 30.0, 40.0, 60.0]:
        bias = jnp.asarray(np.r_[margin, np.zeros(4)], dtype)
        params = {"w": weight, "b": bias}
        logits = dense(params, hidden)
        losses = xj.linear_softmax_cross_entropy(hidden, weight, labels, bias=bias, **chunks)
        expected = xj.softmax_cross_entropy_with_integer_labels(logits, labels)
        np.testing.assert_allclose(losses, expected, rtol=64 * eps)

        def head_mean(b, params=params):
            return xj.linear_softmax_cross_entropy(
                hidden, params["w"], labels, bias=b, reduction="mean", **chunks
            )

        grad = jax.grad(head_mean)(bias)
        expected = jax.grad(
            lambda b, params=params: xj.mean_cross_entropy(
                dense, {**params, "b": b}, hidden, labels
            )
        )(bias)
        np.testing.assert_allclose(grad, expected, rtol=64 * eps)

        _, (_, product_w, product_b) = xj.linear_softmax_cross_entropy_ggn_vp(
            hidden, weight, labels, tangents, bias=bias, **chunks
        )
        expected = xj.ggn_vp(dense, params, hidden, {"w": tangents[1], "b": tangents[2]})
        for got, want in [(product_w, expected["w"]), (product_b, expected["b"])]:
            error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            assert error <= 64 * eps, (margin, error)

    # The bias block of the GGN, 3 classes at margin 18: no eigenvalue below the rounding of
    # the smallest true one (it was −1.1e-8 against 7.5e-9 in float32).
    bias = jnp.asarray([18.0, 0.0, -1.0], dtype)
    one = jnp.zeros((1, 1), dtype)
    columns = [
        xj.linear_softmax_cross_entropy_ggn_vp(
            one,
            jnp.zeros((1, 3), dtype),
            jnp.zeros(1, jnp.int32),
            (None, None, unit),
            bias=bias,
            **chunks,
        )[1][2]
        for unit in jnp.eye(3, dtype=dtype)
    ]
    eigenvalues = np.linalg.eigvalsh(np.asarray(jnp.stack(columns), np.float64))
    assert eigenvalues[0] >= -4 * eps * eigenvalues[-1], eigenvalues


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float32_equals_dense_float32(reduction):
    hidden, weight, bias, labels = make_head(jnp.float32, seed=10, n=40, d=16, v=300)

    def fused(h, w, b):
        out = xj.linear_softmax_cross_entropy(
            h,
            w,
            labels,
            bias=b,
            reduction=reduction,
            z_loss=1e-3,
            row_chunk_size=16,
            vocab_chunk_size=64,
        )
        return out.sum()

    def dense(h, w, b):
        losses = dense_losses(h, w, b, labels, z_loss=1e-3)
        return losses.sum() if reduction == "none" else losses.mean()

    value, grads = jax.value_and_grad(fused, argnums=(0, 1, 2))(hidden, weight, bias)
    dense_value, dense_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(hidden, weight, bias)
    assert value.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    np.testing.assert_allclose(value, dense_value, rtol=2e-5)
    for g, r in zip(grads, dense_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    if reduction == "none":
        return
    _, products = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden,
        weight,
        labels,
        (jnp.cos(hidden), jnp.sin(weight), None),
        bias=bias,
        row_chunk_size=16,
        vocab_chunk_size=64,
    )
    expected = dense_head_ggn_any(hidden, weight, bias, labels, jnp.cos(hidden), jnp.sin(weight))
    assert all(p.dtype == jnp.float32 for p in products[:2])
    for p, r in zip(products[:2], expected, strict=True):
        np.testing.assert_allclose(p, r, rtol=1e-4, atol=1e-6)


def dense_head_ggn_any(hidden, weight, bias, labels, hidden_dot, weight_dot):
    def logits_fn(p, _):
        return p["h"] @ p["w"] + bias[None, :]

    out = xj.ggn_vp(logits_fn, {"h": hidden, "w": weight}, None, {"h": hidden_dot, "w": weight_dot})
    return out["h"], out["w"]


def test_bfloat16_accumulates_in_float32():
    hidden, weight, bias, labels = make_head(jnp.float32, seed=11, n=48, d=32, v=300)
    cast = [x.astype(jnp.bfloat16) for x in (hidden, weight, bias)]

    def fused(h, w, b):
        return xj.linear_softmax_cross_entropy(
            h, w, labels, bias=b, reduction="mean", row_chunk_size=16, vocab_chunk_size=128
        )

    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(*cast)
    assert value.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    # The reference: the same bfloat16 numbers, computed densely in float32.
    upcast = [x.astype(jnp.float32) for x in cast]
    ref_value, ref_grads = jax.value_and_grad(
        lambda h, w, b: dense_losses(h, w, b, labels).mean(), argnums=(0, 1, 2)
    )(*upcast)
    np.testing.assert_allclose(np.float32(value), ref_value, rtol=1e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=2e-2 * scale)
    per_token = xj.linear_softmax_cross_entropy(*cast[:2], labels, bias=cast[2])
    assert per_token.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(per_token, np.float32), dense_losses(*upcast, labels), rtol=2e-2, atol=2e-2
    )


def test_jit_compiles_once_and_vmap_over_heads():
    hidden, weight, bias, labels = make_head(seed=12)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(h, w, b):
        return jax.value_and_grad(
            lambda w: xj.linear_softmax_cross_entropy(
                h, w, labels, bias=b, reduction="mean", row_chunk_size=4, vocab_chunk_size=8
            )
        )(w)

    for k in range(3):
        value, grad = step(hidden + k, weight, bias)
    np.testing.assert_allclose(
        value, dense_losses(hidden + 2, weight, bias, labels).mean(), rtol=1e-12
    )
    weights = jnp.stack([weight, 2.0 * weight, -weight])

    def per_head(w):
        return xj.linear_softmax_cross_entropy(
            hidden, w, labels, bias=bias, row_chunk_size=4, vocab_chunk_size=8
        )

    batched = jax.vmap(per_head)(weights)
    grads = jax.vmap(jax.grad(lambda w: per_head(w).sum()))(weights)
    for i in range(3):
        np.testing.assert_allclose(
            batched[i], dense_losses(hidden, weights[i], bias, labels), rtol=1e-12
        )
        np.testing.assert_allclose(
            grads[i],
            jax.grad(lambda w: dense_losses(hidden, w, bias, labels).sum())(weights[i]),
            rtol=1e-10,
            atol=1e-13,
        )


# --------------------------------------------------------------------------------------------
# Memory: no N×V array in the program
# --------------------------------------------------------------------------------------------

BIG_N, BIG_D, BIG_V = 512, 8, 4096  # N×V float32 = 8 MiB; a 64×512 block is 128 KiB


def _largest_intermediate(jaxpr) -> int:
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape"):
                largest = max(largest, int(np.prod(aval.shape, dtype=np.int64)))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    inner = getattr(inner, "jaxpr", inner)
                    largest = max(largest, _largest_intermediate(inner))
    return largest


@functools.lru_cache
def _big_problem():
    hidden, weight, bias, labels = make_head(jnp.float32, seed=13, n=BIG_N, d=BIG_D, v=BIG_V)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("kind", ["grad_mean", "grad_none", "jvp_none", "ggn"])
def test_no_n_by_v_array_in_compiled_program(kind):
    hidden, weight, bias, labels = _big_problem()
    chunks = dict(row_chunk_size=64, vocab_chunk_size=512)
    tangents = (jnp.ones_like(hidden), jnp.ones_like(weight), jnp.ones_like(bias))
    if kind == "grad_mean":
        fn = jax.value_and_grad(
            lambda h, w, b: xj.linear_softmax_cross_entropy(
                h, w, labels, bias=b, reduction="mean", **chunks
            ),
            argnums=(0, 1, 2),
        )
        args = (hidden, weight, bias)
    elif kind == "grad_none":
        fn = jax.grad(
            lambda h, w, b: xj.linear_softmax_cross_entropy(h, w, labels, bias=b, **chunks).sum(),
            argnums=(0, 1, 2),
        )
        args = (hidden, weight, bias)
    elif kind == "jvp_none":

        def fn(h, w, b):
            return jax.jvp(
                lambda h, w, b: xj.linear_softmax_cross_entropy(h, w, labels, bias=b, **chunks),
                (h, w, b),
                tangents,
            )

        args = (hidden, weight, bias)
    else:

        def fn(h, w, b):
            return xj.linear_softmax_cross_entropy_ggn_vp(h, w, labels, tangents, bias=b, **chunks)

        args = (hidden, weight, bias)
    full = BIG_N * BIG_V
    assert _largest_intermediate(jax.make_jaxpr(fn)(*args).jaxpr) < full // 8
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
    if memory is not None:  # backends without the analysis return None
        assert memory.temp_size_in_bytes < full * 4 // 4

    def dense(h, w, b):
        return jax.value_and_grad(lambda w: dense_losses(h, w, b, labels).mean())(w)

    dense_memory = jax.jit(dense).lower(*args).compile().memory_analysis()
    if memory is not None and dense_memory is not None:
        # The check can fail: the dense program does hold N×V arrays.
        assert dense_memory.temp_size_in_bytes >= full * 4
        assert _largest_intermediate(jax.make_jaxpr(dense)(*args).jaxpr) >= full


# --------------------------------------------------------------------------------------------
# Errors at the boundary
# --------------------------------------------------------------------------------------------


def test_errors():
    hidden, weight, bias, labels = make_head()
    fn = xj.linear_softmax_cross_entropy
    with pytest.raises(ValueError, match="labels must lie"):
        fn(hidden, weight, labels.at[0].set(V))
    with pytest.raises(ValueError, match="same D"):
        fn(hidden, weight.T, labels)
    with pytest.raises(TypeError, match="integer"):
        fn(hidden, weight, labels.astype(jnp.float32))
    with pytest.raises(TypeError, match="floating"):
        fn(hidden.astype(jnp.int32), weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        fn(hidden, weight, labels, reduction="max")
    with pytest.raises(ValueError, match="label_smoothing"):
        fn(hidden, weight, labels, label_smoothing=1.5)
    for z_loss in (-1.0, float("nan"), float("inf")):  # NaN passed and gave NaN losses
        with pytest.raises(ValueError, match="z_loss must be finite and non-negative"):
            fn(hidden, weight, labels, z_loss=z_loss)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fn(hidden, weight, labels, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        fn(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="tangent must have shape"):
        xj.linear_softmax_cross_entropy_ggn_vp(hidden, weight, labels, (None, hidden, None))
    with pytest.raises(ValueError, match="needs a bias"):
        xj.linear_softmax_cross_entropy_ggn_vp(hidden, weight, labels, (None, None, bias))
    # Under jit the label cannot be checked: its token's loss is NaN, never a plausible number.
    out = jax.jit(lambda y: fn(hidden, weight, y))(labels.at[0].set(V))
    assert jnp.isnan(out[0]) and jnp.all(jnp.isfinite(out[1:]))
    with pytest.raises(ValueError, match="at least one class"):  # it named the labels' range
        fn(hidden, weight[:, :0], labels)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_out_of_range_label_under_jit_gives_nan_gradients(reduction):
    # With reduction="none" reverse mode gave the bad token a zero gradient: the rule's
    # select against NaN was transposed into a zero cotangent.
    hidden, weight, bias, labels = make_head()
    bad = labels.at[0].set(V)

    def total(hidden, weight, labels, where):
        losses = xj.linear_softmax_cross_entropy(
            hidden, weight, labels, bias=bias, where=where, reduction=reduction
        )
        return losses.sum()

    gradient = jax.jit(jax.grad(total, argnums=(0, 1)))
    grad_hidden, grad_weight = gradient(hidden, weight, bad, None)
    assert jnp.all(jnp.isnan(grad_hidden[0])) and jnp.any(jnp.isnan(grad_weight))
    # A token that `where` leaves out may hold any label: the gradient is the others'.
    out = jnp.arange(N) != 0
    grad_hidden, grad_weight = gradient(hidden, weight, bad, out)
    expected = jax.grad(total, argnums=(0, 1))(hidden, weight, labels, out)
    np.testing.assert_allclose(grad_hidden, expected[0], rtol=1e-12)
    np.testing.assert_allclose(grad_weight, expected[1], rtol=1e-12)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("vocab_chunk_size", [None, 4])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_rows_with_every_class_masked(z_loss, vocab_chunk_size, reduction):
    # lse = −inf made the z-loss scale infinite, and 0 · inf gave NaN gradients and products
    # although `where` leaves every such token out (they contribute exactly 0). Across
    # vocabulary blocks, and per token, the probabilities were exp(−inf + inf) = NaN.
    hidden, weight, _, labels = make_head()
    masked = jnp.full((V,), -jnp.inf)
    nothing = jnp.zeros(N, bool)
    options = dict(bias=masked, where=nothing, z_loss=z_loss, vocab_chunk_size=vocab_chunk_size)

    def loss(weight):
        losses = xj.linear_softmax_cross_entropy(
            hidden, weight, labels, reduction=reduction, **options
        )
        return jnp.sum(losses)

    assert loss(weight) == 0.0
    np.testing.assert_array_equal(jax.grad(loss)(weight), 0.0)
    _, product = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden, weight, labels, (hidden, weight, None), **options
    )
    np.testing.assert_array_equal(product[0], 0.0)
    np.testing.assert_array_equal(product[1], 0.0)


@pytest.mark.parametrize("vocab_chunk_size", [None, 256])
def test_float32_products_where_every_class_ties(vocab_chunk_size):
    # A zero-initialised head ties all V logits. The shift of the tangent was their sum, about
    # V·|ż|, and ż − r then lost log₂V bits: 7e-5 relative at V = 4096 with one block.
    n, d, v = 4, 8, 4096
    hidden, _, _, labels = make_head(jnp.float32, n=n, d=d, v=v)
    weight = jnp.zeros((d, v), jnp.float32)
    weight_dot = jax.random.normal(jax.random.key(1), (d, v), jnp.float32) + 1.0
    _, (_, product, _) = xj.linear_softmax_cross_entropy_ggn_vp(
        hidden, weight, labels, (None, weight_dot, None), vocab_chunk_size=vocab_chunk_size
    )
    # Exact: every s_k = 1/V, so H ż = (ż − mean ż) / V per row, and the mean loss divides by n.
    hidden64 = np.asarray(hidden, np.float64)
    logits_dot = hidden64 @ np.asarray(weight_dot, np.float64)
    centred = logits_dot - logits_dot.mean(axis=1, keepdims=True)
    expected = hidden64.T @ centred / (v * n)
    error = np.abs(np.asarray(product, np.float64) - expected).max() / np.abs(expected).max()
    assert error < 1e-6, error


def test_debug_infs_meets_no_inf_of_the_padding():
    # The columns that pad V to whole blocks had bias -inf, and jax_debug_infs stopped every
    # call whose blocks do not divide V (by default, V > 2**18) although the results are finite.
    hidden, weight, bias, labels = make_head()

    def loss(weight, bias):
        return xj.linear_softmax_cross_entropy(
            hidden, weight, labels, bias=bias, reduction="sum", vocab_chunk_size=4, z_loss=1e-3
        )

    def product(weight):
        return xj.linear_softmax_cross_entropy_ggn_vp(
            hidden, weight, labels, (hidden, weight, bias), bias=bias, vocab_chunk_size=4
        )

    calls = [
        lambda: jax.value_and_grad(loss, argnums=(0, 1))(weight, bias),
        lambda: jax.jit(jax.grad(loss))(weight, bias),
        lambda: product(weight),
    ]
    # float16 logits computed in float32 below float16's lowest number (-65504): padding at
    # that number took their probability (loss [4496, 3506] for [992, 0]).
    hidden16 = jnp.ones((2, 1), jnp.float16)
    weight16 = jnp.array([[-60000, -59000, -60000, -60000, -60000]], jnp.float16)
    bias16 = jnp.full((5,), -10000, jnp.float16)
    labels16 = jnp.array([0, 1])
    calls.append(
        lambda: jax.value_and_grad(
            lambda b: xj.linear_softmax_cross_entropy(
                hidden16, weight16, labels16, bias=b, reduction="sum", vocab_chunk_size=4
            )
        )(bias16)
    )
    expected = [call() for call in calls]
    with jax.debug_infs(True):
        for call, reference in zip(calls, expected, strict=True):
            chex.assert_trees_all_close(call(), reference, rtol=1e-14)


def test_zero_features_differentiate():
    # D = 0: the forward pass worked, its gradient raised ZeroDivisionError.
    labels = jnp.array([0, 1, 2])
    value, grad = jax.value_and_grad(
        lambda w: xj.linear_softmax_cross_entropy(jnp.zeros((3, 0)), w, labels, reduction="mean")
    )(jnp.zeros((0, 5)))
    np.testing.assert_allclose(value, np.log(5.0), rtol=1e-12)
    assert grad.shape == (0, 5)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, os
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import xentropy_jax as xj

    keys = jax.random.split(jax.random.key(0), 5)
    hidden = jax.random.normal(keys[0], (4, 6, 6))  # batch shape (4, 6): 24 tokens
    weight = jax.random.normal(keys[1], (6, 36))
    bias = jax.random.normal(keys[2], (36,))
    labels = jax.random.randint(keys[3], (4, 6), 0, 36)
    where = jnp.arange(24).reshape(4, 6) % 7 != 3
    dots = (jnp.cos(hidden), jax.random.normal(keys[4], (6, 36)), None)  # no bias direction
    # Blocks divide neither the 24 tokens nor the 36 classes, nor the shards.
    options = dict(row_chunk_size=5, vocab_chunk_size=8, z_loss=1e-2, label_smoothing=0.1)

    def step(h, w, b, y, m, dots):
        per_token = xj.linear_softmax_cross_entropy(h, w, y, bias=b, where=m, **options)
        mean, grads = jax.value_and_grad(
            lambda h, w, b: xj.linear_softmax_cross_entropy(
                h, w, y, bias=b, where=m, reduction="mean", **options),
            argnums=(0, 1, 2))(h, w, b)
        ggn_loss, ggn = xj.linear_softmax_cross_entropy_ggn_vp(
            h, w, y, dots, bias=b, where=m, **options)
        return {"per_token": per_token, "mean": mean, "grads": grads, "ggn_loss": ggn_loss,
                "ggn": ggn}

    plain = jax.jit(step)(hidden, weight, bias, labels, where, dots)
    out = {"devices": jax.device_count()}

    def compare(name, result):
        errors = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), result, plain)
        specs = jax.tree.map(lambda a: list(jax.typeof(a).sharding.spec), result)
        out[name] = {"error": max(jax.tree.leaves(errors)), "specs": specs}

    # Auto axes: the partitioner propagates the layout through the blocks.
    auto = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(auto, P(*spec)))
    compare("auto", jax.jit(step)(put(hidden, "data"), put(weight, None, "model"),
                                  put(bias, "model"), put(labels, "data"), put(where, "data"),
                                  dots))
    # Explicit axes, the default of jax.make_mesh.
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    out["explicit"] = mesh.axis_types == (AxisType.Explicit,) * 2
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    # Rows over "data", under jit without a context mesh.
    compare("rows", jax.jit(step)(put(hidden, "data"), weight, bias, put(labels, "data"),
                                  put(where, "data"), dots))
    # Rows over "data" and the vocabulary over "model", in a context mesh.
    with jax.set_mesh(mesh):
        compare("rows_vocab", jax.jit(step)(
            put(hidden, "data"), put(weight, None, "model"), put(bias, "model"),
            put(labels, "data"), put(where, "data"),
            (put(dots[0], "data"), put(dots[1], None, "model"), None)))
    # Both batch axes sharded, called eagerly (no grad: eager reverse mode on Explicit axes
    # needs a context mesh, a requirement of jax itself).
    eager = xj.linear_softmax_cross_entropy(
        put(hidden, "data", "model"), weight, put(labels, "data", "model"), bias=bias,
        where=put(where, "data", "model"), **options)
    reference = plain["per_token"]
    out["tokens_eager"] = {
        "error": float(jnp.max(jnp.abs(eager - reference)) / jnp.max(jnp.abs(reference))),
        "spec": list(jax.typeof(eager).sharding.spec),
    }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded_report(request):
    # Four CPU devices exist only when XLA_FLAGS is set before jax starts: a child process,
    # which compiles as fast as the test processes (conftest.py).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=request.config.test_xla_flags)
    return json_report(SHARDED_SCRIPT, env)


@pytest.mark.subprocess
def test_sharded_inputs_give_the_unsharded_numbers(sharded_report):
    assert sharded_report["devices"] == 4 and sharded_report["explicit"]
    for case in ("auto", "rows", "rows_vocab", "tokens_eager"):
        # Value, the three gradients, the GGN products: equal to float64 rounding.
        assert sharded_report[case]["error"] <= 1e-12, (case, sharded_report[case])


@pytest.mark.subprocess
def test_explicitly_sharded_outputs_keep_the_layout_of_their_arguments(sharded_report):
    rows = sharded_report["rows"]["specs"]
    assert rows["per_token"] == ["data", None]
    assert rows["mean"] == [] and rows["ggn_loss"] == []
    assert rows["grads"] == [["data", None, None], [None, None], [None]]
    assert rows["ggn"] == [["data", None, None], [None, None], None]
    vocab = sharded_report["rows_vocab"]["specs"]
    assert vocab["grads"] == [["data", None, None], [None, "model"], ["model"]]
    assert vocab["ggn"] == [["data", None, None], [None, "model"], None]
    assert sharded_report["tokens_eager"]["spec"] == ["data", "model"]
