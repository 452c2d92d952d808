"""The losses in the tails, against references computed in higher precision with mpmath.

Every component of the gradient m·s − y, of the Hessian and of its products must be accurate
relative to its own size at any margin (the complement 1 − s taken from the other classes'
exponentials, never by subtraction from 1), the float32 Hessian and its products positive
semi-definite up to the rounding of their smallest eigenvalue, and the loss finite when XLA fuses
the logits' producer into it. Plus the loss-level edge cases: empty batches, ``axis=None``,
labels on masked classes, label gradients at ``-inf`` logits, ``ggn_diagonal`` with N = 0.
"""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest

import xentropy_jax as xj

mpmath.mp.prec = 160

MARGINS = [0.0, 1.0, 5.0, 17.0, 18.0, 30.0, 40.0, 60.0]


def grid_logits(rng, num_classes, margin):
    """A winner at ``margin``, the others on a grid of quarters in [−4, 4).

    Differences of these logits are exact in float32, so the references below see exactly the
    numbers the code sees and every error is the code's own rounding.
    """
    others = rng.integers(-16, 16, num_classes - 1) / 4.0
    logits = np.concatenate([[margin], others])
    return logits[rng.permutation(num_classes)]


def exact_softmax(logits):
    """(s, 1 − s) of the float64 values of ``logits``, in 160-bit arithmetic."""
    values = [mpmath.mpf(float(v)) for v in np.asarray(logits, np.float64)]
    peak = max(values)
    exps = [mpmath.exp(v - peak) for v in values]
    total = mpmath.fsum(exps)
    return [e / total for e in exps], [(total - e) / total for e in exps]


def ulps(got, exact, dtype, floor=0.0):
    """|got − exact| / (eps · max(|exact|, floor)), componentwise, as float64."""
    got = np.asarray(jnp.asarray(got).astype(jnp.float64))
    exact = np.asarray(exact, np.float64)
    return np.abs(got - exact) / (float(jnp.finfo(dtype).eps) * np.maximum(np.abs(exact), floor))


def gradients(logits, label):
    """Our gradients at one row: integer label, one-hot label, and the one-hot from jax.grad."""
    num_classes = logits.shape[-1]
    onehot = jax.nn.one_hot(label, num_classes, dtype=logits.dtype)
    integer = jax.grad(xj.softmax_cross_entropy_with_integer_labels)(logits, label)
    dense = jax.grad(xj.softmax_cross_entropy)(logits, onehot)
    return integer, dense


# --------------------------------------------------------------------------------------------
# Gradients: every component to a few ulps of its own size.
# --------------------------------------------------------------------------------------------


def test_issue_example_two_classes_margin_40():
    """Float64, margin 40, label on the winner: [−4.25e-18, +4.25e-18], summing to zero."""
    logits = jnp.array([40.0, 0.0])
    probs, complement = exact_softmax(logits)
    exact = [-float(complement[0]), float(probs[1])]
    for grad in gradients(logits, 0):
        assert np.all(ulps(grad, exact, jnp.float64) <= 2)
        assert abs(float(grad.sum())) <= 4 * np.finfo(np.float64).eps * exact[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("num_classes", [2, 3, 10, 1000])
def test_gradient_components_relative_to_their_size(dtype, num_classes):
    rng = np.random.default_rng(num_classes)
    tiny = float(jnp.finfo(dtype).tiny)
    for margin in MARGINS:
        logits = grid_logits(rng, num_classes, margin)
        winner = int(np.argmax(logits))
        loser = (winner + 1) % num_classes
        probs, complement = exact_softmax(logits)
        for label in [winner, loser]:
            exact = [float(p) for p in probs]
            exact[label] = -float(complement[label])
            for grad in gradients(jnp.asarray(logits, dtype), label):
                # Components below the smallest normal number lose relative precision by
                # definition of the format; they are measured against it.
                # Up to 8 ulps: R sums up to a thousand terms.
                bound = 8 if num_classes > 10 else 4
                floor = tiny / float(jnp.finfo(dtype).eps)
                assert np.max(ulps(grad, exact, dtype, floor=floor)) <= bound, (
                    margin,
                    label,
                )
            # A one-hot row sums to zero up to the rounding of its smallest terms.
            total = float(jnp.sum(grad.astype(jnp.float64)))
            assert abs(total) <= 4 * float(jnp.finfo(dtype).eps) * abs(exact[label]) + tiny


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_soft_label_gradient_relative_to_its_terms(dtype):
    """m s_k − y_k = s_k (m − y_k) − y_k (1 − s_k): accurate relative to those two terms."""
    rng = np.random.default_rng(7)
    eps = float(jnp.finfo(dtype).eps)
    for num_classes in [3, 10, 1000]:
        for margin in MARGINS:
            logits = grid_logits(rng, num_classes, margin)
            labels = np.asarray(
                jnp.asarray(2.5 * rng.dirichlet(np.full(num_classes, 0.3)), dtype), np.float64
            )
            probs, complement = exact_softmax(logits)
            ys = [mpmath.mpf(float(y)) for y in labels]
            mass = mpmath.fsum(ys)
            exact = np.array([float(mass * p - y) for p, y in zip(probs, ys, strict=True)])
            terms = np.array(
                [
                    float(p * (mass - y) + y * q)
                    for p, q, y in zip(probs, complement, ys, strict=True)
                ]
            )
            grad = jax.grad(xj.softmax_cross_entropy)(
                jnp.asarray(logits, dtype), jnp.asarray(labels, dtype)
            )
            error = np.abs(np.asarray(grad, np.float64) - exact)
            # The label mass m is a rounded sum: s_k · ulp(m) is the floor of any method.
            bound = 8 * eps * (terms + np.asarray([float(p) for p in probs]) * float(mass))
            assert np.all(error <= bound + float(jnp.finfo(dtype).tiny)), (num_classes, margin)


def exact_soft_loss(logits, labels):
    """Σ_k y_k (logsumexp(z) − z_k) of the float64 values, in 160-bit arithmetic."""
    values = [mpmath.mpf(float(v)) for v in np.asarray(logits, np.float64)]
    peak = max(values)
    lse = peak + mpmath.log(mpmath.fsum(mpmath.exp(v - peak) for v in values))
    terms = [mpmath.mpf(float(y)) * (lse - v) for y, v in zip(labels, values, strict=True)]
    return float(mpmath.fsum(terms)), float(mpmath.fsum(abs(t) for t in terms))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6, -3e7])
def test_soft_label_loss_relative_to_its_terms(dtype, offset):
    """The soft-label loss keeps full relative accuracy at any common offset of the logits.

    Its terms y_k (logsumexp(z) − z_k) are summed one by one, each of its label's sign: the
    error is a few ulps of Σ_k |y_k (logsumexp(z) − z_k)|, whatever the offset and whatever
    the labels' signs. The shortcut m · logsumexp(z) − yᵀz loses digits in proportion to the
    offset (float32 lost 1% at 10⁶).
    """
    rng = np.random.default_rng(11)
    eps = float(jnp.finfo(dtype).eps)
    for num_classes in [2, 10, 1000]:
        for negative in [False, True]:
            for _ in range(3):
                logits = np.asarray(
                    jnp.asarray(offset + rng.normal(scale=3.0, size=num_classes), dtype),
                    np.float64,
                )
                labels = rng.dirichlet(np.full(num_classes, 0.5))
                if negative:
                    labels = labels - rng.uniform(0, 2.0 / num_classes, num_classes)
                labels = np.asarray(jnp.asarray(labels, dtype), np.float64)
                exact, magnitude = exact_soft_loss(logits, labels)
                loss = xj.softmax_cross_entropy(
                    jnp.asarray(logits, dtype), jnp.asarray(labels, dtype)
                )
                # Each term's rounding is relative to it; the gaps c − z_k are exact differences.
                assert abs(float(loss) - exact) <= 8 * eps * magnitude, (num_classes, negative)


def test_soft_labels_at_the_models_own_prediction():
    """Distillation targets: labels near softmax(z), ordinary logits, float32.

    The loss is then the entropy of s, small beside m · logsumexp(z) and yᵀz. The shortcut
    m · logsumexp(z) − yᵀz lost 6e-4 of it here (optax's log-softmax form loses 1e-5); summed
    term by term it keeps a few ulps.
    """
    rng = np.random.default_rng(5)
    eps = float(jnp.finfo(jnp.float32).eps)
    for offset in [0.0, 20.0]:
        logits = np.asarray(
            jnp.asarray(offset + rng.normal(scale=4.0, size=(50, 10)), jnp.float32), np.float64
        )
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        labels = np.asarray(
            jnp.asarray(probs / probs.sum(-1, keepdims=True), jnp.float32), np.float64
        )
        loss = xj.softmax_cross_entropy(
            jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32)
        )
        exact = np.array([exact_soft_loss(z, y)[0] for z, y in zip(logits, labels, strict=True)])
        assert np.max(np.abs(np.asarray(loss, np.float64) - exact) / exact) <= 8 * eps, offset


def test_random_logits_within_the_conditioning_of_the_shift():
    """Off the grid, z_k − max z rounds: the error stays within that rounding, |z_k − c|·eps."""
    rng = np.random.default_rng(3)
    for margin in MARGINS:
        logits = np.asarray(
            jnp.asarray(np.concatenate([[margin], rng.normal(size=99)]), jnp.float32), np.float64
        )
        probs, complement = exact_softmax(logits)
        exact = [float(p) for p in probs]
        exact[0] = -float(complement[0])
        grad = jax.grad(xj.softmax_cross_entropy_with_integer_labels)(
            jnp.asarray(logits, jnp.float32), 0
        )
        allowed = 4 + np.abs(logits - logits.max())
        assert np.all(ulps(grad, exact, jnp.float32) <= allowed), margin


# --------------------------------------------------------------------------------------------
# Hessian and products: accurate entries, PSD in low precision.
# --------------------------------------------------------------------------------------------


def exact_hessian(logits):
    probs, complement = exact_softmax(logits)
    size = len(probs)
    return np.array(
        [
            [
                float(probs[i] * complement[i] if i == j else -probs[i] * probs[j])
                for j in range(size)
            ]
            for i in range(size)
        ]
    )


def exact_probs_float64(logits):
    return np.array([float(p) for p in exact_softmax(logits)[0]])


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_hessian_and_product_entries_relative_to_their_size(num_classes):
    rng = np.random.default_rng(11)
    for dtype in [jnp.float32, jnp.float64]:
        eps = float(jnp.finfo(dtype).eps)
        floor = float(jnp.finfo(dtype).tiny) / eps
        for margin in MARGINS:
            logits = grid_logits(rng, num_classes, margin)
            exact = exact_hessian(logits)
            z = jnp.asarray(logits, dtype)
            closed = xj.softmax_cross_entropy_hessian(z)
            autodiff = jax.hessian(xj.softmax_cross_entropy_with_integer_labels)(z, 0)
            columns = jax.vmap(xj.softmax_cross_entropy_hvp, in_axes=(None, 0))(
                z, jnp.eye(num_classes, dtype=dtype)
            ).T
            for matrix in [closed, autodiff, columns]:
                assert np.max(ulps(matrix, exact, dtype, floor=floor)) <= 4, margin


def exact_product(logits, tangents):
    """(Hv exactly, the scale s_k (|v_k − sᵀv| + Σ_j s_j |v_j − sᵀv|)), in 160-bit arithmetic."""
    probs, _ = exact_softmax(logits)
    vs = [mpmath.mpf(float(v)) for v in tangents]
    mean = mpmath.fsum(p * v for p, v in zip(probs, vs, strict=True))
    exact = np.array([float(p * (v - mean)) for p, v in zip(probs, vs, strict=True)])
    p64 = np.array([float(p) for p in probs])
    spread = np.array([float(abs(v - mean)) for v in vs])
    return exact, p64 * (spread + np.sum(p64 * spread))


def test_product_relative_to_its_terms():
    """(Hv)_k to a few ulps of s_k (|v_k − sᵀv| + Σ_j s_j |v_j − sᵀv|) at every margin."""
    rng = np.random.default_rng(5)
    for dtype in [jnp.float32, jnp.float64]:
        eps = float(jnp.finfo(dtype).eps)
        for num_classes in [2, 3, 10, 1000]:
            for margin in MARGINS:
                logits = grid_logits(rng, num_classes, margin)
                tangents = np.asarray(jnp.asarray(rng.normal(size=num_classes), dtype), np.float64)
                exact, terms = exact_product(logits, tangents)
                for product in [
                    xj.softmax_cross_entropy_hvp(
                        jnp.asarray(logits, dtype), jnp.asarray(tangents, dtype)
                    ),
                    jax.jvp(
                        jax.grad(xj.softmax_cross_entropy_with_integer_labels),
                        (jnp.asarray(logits, dtype), 0),
                        (jnp.asarray(tangents, dtype), np.zeros((), jax.dtypes.float0)),
                    )[1],
                ]:
                    error = np.abs(np.asarray(product, np.float64) - exact)
                    # 8 ulps: sᵀ(v − r) sums up to a thousand terms.
                    assert np.all(error <= 8 * eps * terms + float(jnp.finfo(dtype).tiny)), (
                        num_classes,
                        margin,
                    )


def test_product_where_several_classes_share_the_mass():
    """The same bound where two or three classes share the mass, none reaching 1/2.

    The product shifted v by its value at a class with s ≥ 1/2, and not at all where none had
    it: sᵀv then rounded the small classes' terms away against the large ones (12% off at
    logits [14, 13.9, 13.8, 0, 0] in float32, 10¹² ulps at a float64 three-way tie).
    """
    rng = np.random.default_rng(6)
    for dtype in [jnp.float32, jnp.float64]:
        eps = float(jnp.finfo(dtype).eps)
        worst = 0.0
        for num_classes in [3, 5, 40]:
            for margin in [5.0, 16.0, 30.0, 60.0]:
                for sharing in [2, 3][: num_classes - 2]:  # (not every class: v constant)
                    for offset in [0.0, 1.0, 100.0]:
                        logits = grid_logits(rng, num_classes, 0.0)
                        top = rng.choice(num_classes, sharing, replace=False)
                        logits[top] = margin - rng.integers(0, 2, sharing) / 4.0
                        tangents = offset + rng.normal(size=num_classes)
                        tangents[top] = offset + 1.0  # v_k − sᵀv cancels at the shared classes
                        tangents = np.asarray(jnp.asarray(tangents, dtype), np.float64)
                        exact, terms = exact_product(logits, tangents)
                        product = xj.softmax_cross_entropy_hvp(
                            jnp.asarray(logits, dtype), jnp.asarray(tangents, dtype)
                        )
                        error = np.abs(np.asarray(product, np.float64) - exact)
                        bound = np.maximum(eps * terms, float(jnp.finfo(dtype).tiny))
                        worst = max(worst, float(np.max(error / bound)))
        assert worst <= 16, (dtype, worst)


def smallest_eigenvalues(matrix):
    """Smallest and second smallest eigenvalue of the symmetric part, in float64."""
    matrix = np.asarray(jnp.asarray(matrix).astype(jnp.float64))
    values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    return values[0], values[1]


def test_issue_example_three_classes_margin_18():
    """Float32, [18, 0, 0]: no eigenvalue below the rounding of the smallest nonzero one."""
    logits = jnp.array([18.0, 0.0, 0.0], jnp.float32)
    _, second = smallest_eigenvalues(exact_hessian(np.asarray(logits, np.float64)))
    eps = float(jnp.finfo(jnp.float32).eps)
    for matrix in [
        xj.softmax_cross_entropy_hessian(logits),
        jax.hessian(xj.softmax_cross_entropy_with_integer_labels)(logits, 0),
        jax.vmap(xj.softmax_cross_entropy_hvp, in_axes=(None, 0))(logits, jnp.eye(3)),
    ]:
        lowest, nonzero = smallest_eigenvalues(matrix)
        assert lowest >= -4 * eps * second
        np.testing.assert_allclose(nonzero, second, rtol=8 * eps)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 1000])
def test_float32_hessian_and_products_are_psd_at_every_margin(num_classes):
    """No eigenvalue below −4·eps·λmax: in the tails λmax ≈ 1 − s_win is itself tiny.

    (Subtracting 1 − s from 1 gave −0.3·λmax at margin 18.)
    """
    rng = np.random.default_rng(num_classes + 1)
    eps = float(jnp.finfo(jnp.float32).eps)
    # A thousand classes: three margins keep the eigendecompositions few.
    for margin in MARGINS if num_classes <= 10 else [0.0, 18.0, 60.0]:
        logits = grid_logits(rng, num_classes, margin)
        probs = exact_probs_float64(logits)
        exact = (
            exact_hessian(logits) if num_classes <= 10 else np.diag(probs) - np.outer(probs, probs)
        )
        largest = float(np.linalg.eigvalsh(exact)[-1])
        z = jnp.asarray(logits, jnp.float32)
        matrices = {
            "closed form": xj.softmax_cross_entropy_hessian(z),
            "products": jax.vmap(xj.softmax_cross_entropy_hvp, in_axes=(None, 0))(
                z, jnp.eye(num_classes, dtype=jnp.float32)
            ),
        }
        if num_classes <= 10:
            hessian_fn = jax.hessian(xj.softmax_cross_entropy_with_integer_labels)
            matrices["jax.hessian"] = hessian_fn(z, 0)
        for name, matrix in matrices.items():
            lowest, _ = smallest_eigenvalues(matrix)
            assert lowest >= -4 * eps * largest, (name, margin, lowest)


def test_float32_products_on_a_flat_row_of_a_thousand_classes():
    """Nearly flat rows: λmax ≈ max s, and the products' K² roundings reach −5.2·eps·λmax."""
    eps = float(jnp.finfo(jnp.float32).eps)
    for top in (0.625, 1.0):
        logits = np.zeros(1000)
        logits[7] = top
        probs = exact_probs_float64(logits)
        largest = float(np.linalg.eigvalsh(np.diag(probs) - np.outer(probs, probs))[-1])
        z = jnp.asarray(logits, jnp.float32)
        hessian = xj.softmax_cross_entropy_hessian(z)
        products = jax.vmap(xj.softmax_cross_entropy_hvp, in_axes=(None, 0))(
            z, jnp.eye(1000, dtype=jnp.float32)
        )
        assert smallest_eigenvalues(hessian)[0] >= -4 * eps * largest, top
        assert smallest_eigenvalues(products)[0] >= -8 * eps * largest, top


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_hessian_is_psd(dtype):
    rng = np.random.default_rng(2)
    eps = float(jnp.finfo(dtype).eps)
    for num_classes in [2, 3, 10]:
        for margin in [0.0, 5.0, 8.0, 12.0, 18.0, 40.0]:
            logits = grid_logits(rng, num_classes, margin)
            logits = np.asarray(jnp.asarray(logits, dtype), np.float64)
            largest = float(np.linalg.eigvalsh(exact_hessian(logits))[-1])
            matrix = xj.softmax_cross_entropy_hessian(jnp.asarray(logits, dtype))
            assert matrix.dtype == dtype
            lowest, _ = smallest_eigenvalues(matrix)
            # Each entry rounds to the half format: eigenvalues move by eps times the largest.
            assert lowest >= -4 * eps * largest, (num_classes, margin, lowest)


# --------------------------------------------------------------------------------------------
# Fused producers, masks over huge logits, ties, wide float16 rows.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0**31, 2.0**40, 1e30])
def test_finite_when_xla_fuses_the_producer(scale):
    """jit of loss(x / T), T not a power of two, |x / T| huge: XLA recomputes x / T inside the
    max and the exponential with different roundings; loss and gradient stay finite."""
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(64, 5)) * 3.0 * scale, jnp.float32)
    integer = jnp.asarray(rng.integers(0, 5, 64))
    onehot = jax.nn.one_hot(integer, 5, dtype=jnp.float32)
    for loss, labels in [
        (xj.softmax_cross_entropy_with_integer_labels, integer),
        (xj.softmax_cross_entropy, onehot),
    ]:
        value, grad = jax.jit(
            jax.value_and_grad(lambda x, loss=loss, labels=labels: loss(x / 3.0, labels).sum())
        )(inputs)
        assert np.isfinite(value) and value >= 0
        assert np.all(np.isfinite(grad))
    # At ordinary scales the fused result is the eager one.
    moderate = inputs / scale * 4.0
    fused = jax.jit(lambda x: xj.softmax_cross_entropy_with_integer_labels(x / 3.0, integer))
    np.testing.assert_allclose(
        fused(moderate),
        xj.softmax_cross_entropy_with_integer_labels(moderate / 3.0, integer),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("hidden", [1e30, np.inf, np.nan])
def test_where_mask_hides_a_huge_logit(hidden):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32).at[:, 2].set(hidden)
    where = jnp.ones((4, 5), bool).at[:, 2].set(False)
    integer = jnp.array([0, 1, 3, 4])
    keep = jnp.array([0, 1, 3, 4])
    for loss, labels, kept in [
        (xj.softmax_cross_entropy_with_integer_labels, integer, jnp.arange(4)),
        (xj.softmax_cross_entropy, jax.nn.one_hot(integer, 5), jax.nn.one_hot(jnp.arange(4), 4)),
    ]:

        def total(z, loss=loss, labels=labels):
            return loss(z, labels, where=where).sum()

        value, grad = jax.jit(jax.value_and_grad(total))(logits)
        np.testing.assert_allclose(value, loss(logits[:, keep], kept).sum(), rtol=1e-6)
        assert np.all(np.isfinite(grad)) and np.all(grad[:, 2] == 0.0)

        def first(z, loss=loss, labels=labels):
            return loss(z, labels[0], where=where[0])

        hessian = jax.hessian(first)(logits[0])
        assert np.all(np.isfinite(hessian))
        assert np.all(hessian[2] == 0) and np.all(hessian[:, 2] == 0)


def test_tied_maxima_are_exact():
    for num_classes in [2, 7, 1000]:
        logits = jnp.zeros(num_classes, jnp.float32)
        for grad in gradients(logits, 1):
            expected = np.full(num_classes, 1.0 / num_classes)
            expected[1] = -(num_classes - 1.0) / num_classes
            assert np.max(ulps(grad, expected, jnp.float32)) <= 2
        hessian = xj.softmax_cross_entropy_hessian(logits[:10] if num_classes > 10 else logits)
        size = hessian.shape[0]
        expected = (np.eye(size) - 1.0 / size) / size
        assert np.max(ulps(hessian, expected, jnp.float32)) <= 2
        # Two tied winners far above the rest: each has 1 − s = 1/2 exactly up to rounding.
        two = jnp.full(num_classes, -50.0, jnp.float32).at[:2].set(30.0)
        grad = jax.grad(xj.softmax_cross_entropy_with_integer_labels)(two, 0)
        assert abs(float(grad[0]) + 0.5) <= 2 * float(jnp.finfo(jnp.float32).eps)


def test_float16_rows_of_a_large_vocabulary():
    """2¹⁷ classes in float16 (the sum of the exponentials exceeds float16's range)."""
    num_classes = 2**17
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, num_classes)), jnp.float16)
    labels = jnp.array([0, 12345])
    ours = xj.softmax_cross_entropy_with_integer_labels(logits, labels)
    reference = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float64), labels)
    assert ours.dtype == jnp.float16
    eps = float(jnp.finfo(jnp.float16).eps)
    np.testing.assert_allclose(ours.astype(np.float64), reference, rtol=eps)
    grad = jax.grad(lambda z: xj.softmax_cross_entropy_with_integer_labels(z, labels).sum())(logits)
    expected = jax.nn.softmax(logits.astype(jnp.float64)) - jax.nn.one_hot(labels, num_classes)
    assert np.all(np.isfinite(grad.astype(np.float32)))
    np.testing.assert_allclose(grad.astype(np.float64), expected, atol=0.01 * eps)
    zeros = jnp.zeros((1, num_classes), jnp.float16)
    np.testing.assert_allclose(
        xj.softmax_cross_entropy(
            zeros, jax.nn.one_hot(jnp.array([3]), num_classes, dtype=jnp.float16)
        ),
        [np.log(num_classes)],
        rtol=eps,
    )


# --------------------------------------------------------------------------------------------
# Loss-level edge cases.
# --------------------------------------------------------------------------------------------


def test_empty_batch_with_class_axis_not_last():
    logits = jnp.zeros((3, 0))
    ours = xj.softmax_cross_entropy(logits, logits, axis=0)
    assert ours.shape == optax.softmax_cross_entropy(logits, logits, axis=0).shape == (0,)
    integer = xj.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(0, int), axis=0)
    assert integer.shape == (0,)
    assert xj.softmax_cross_entropy_hvp(logits, logits, axis=0).shape == (3, 0)


def test_axis_none_takes_every_axis_as_classes():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(2, 3)))
    labels = jnp.asarray(rng.random(size=(2, 3)))
    ours = xj.softmax_cross_entropy(logits, labels, axis=None)
    theirs = optax.softmax_cross_entropy(logits, labels, axis=None)
    np.testing.assert_allclose(ours, theirs, rtol=1e-14)
    assert ours.shape == ()
    flat = xj.softmax_cross_entropy_with_integer_labels(logits, jnp.array(4), axis=None)
    np.testing.assert_allclose(
        flat,
        xj.softmax_cross_entropy_with_integer_labels(logits.reshape(-1), jnp.array(4)),
        rtol=1e-14,
    )


def test_label_gradient_at_minus_inf_logit_agrees_in_both_modes():
    logits = jnp.array([0.0, -jnp.inf, 1.0])
    labels = jnp.array([0.5, 0.0, 0.5])
    reverse = jax.grad(xj.softmax_cross_entropy, argnums=1)(logits, labels)
    forward = jax.jacfwd(xj.softmax_cross_entropy, argnums=1)(logits, labels)
    np.testing.assert_allclose(reverse, forward, rtol=1e-14)
    assert reverse[1] == 0.0
    kept = np.array([0, 2])
    np.testing.assert_allclose(reverse[kept], -jax.nn.log_softmax(logits)[kept], rtol=1e-14)


def test_row_of_minus_inf_logits_has_the_one_hot_gradient():
    # Every logit -inf: the loss is +inf in both forms, the softmax of the empty row 0, so the
    # gradient is −y; the integer form gave −0 at the label (−S/T with S = T = 0).
    logits = jnp.array([[-jnp.inf] * 3, [0.0, 1.0, -jnp.inf]])
    labels = jnp.array([0, 2])
    onehot = jax.nn.one_hot(labels, 3, dtype=logits.dtype)
    integer = jax.grad(lambda z: xj.softmax_cross_entropy_with_integer_labels(z, labels).sum())
    dense = jax.grad(lambda z: xj.softmax_cross_entropy(z, onehot).sum())
    np.testing.assert_array_equal(integer(logits), dense(logits))
    assert float(integer(logits)[0, 0]) == -1.0
    assert np.all(np.isinf(xj.softmax_cross_entropy_with_integer_labels(logits, labels)))


def test_integer_label_on_a_masked_class_is_ignored_everywhere():
    """Eager, jit, with any spelling of no smoothing: 0, as optax's one-hot loss gives."""
    logits = jnp.array([0.3, 1.2, -0.4])
    where = jnp.array([True, False, True])
    expected = optax.softmax_cross_entropy(logits, jax.nn.one_hot(1, 3), where=where)
    loss = xj.softmax_cross_entropy_with_integer_labels
    values = [
        loss(logits, 1, where=where),
        loss(logits, 1, where=where, label_smoothing=0.0),
        loss(logits, 1, where=where, label_smoothing=jnp.array(0.0)),
        jax.jit(lambda z: loss(z, 1, where=where))(logits),
        jax.jit(lambda z, a: loss(z, 1, where=where, label_smoothing=a))(logits, 0.0),
        xj.softmax_cross_entropy(logits, jax.nn.one_hot(1, 3), where=where),
    ]
    for value in values:
        np.testing.assert_allclose(value, expected, atol=1e-15)
    grad = jax.grad(lambda z: loss(z, 1, where=where))(logits)
    assert np.all(grad == 0.0)


def test_label_smoothing_checked_whatever_its_type():
    logits, labels = jnp.zeros((2, 3)), jnp.full((2, 3), 1 / 3)
    for bad in [np.float32(1.5), jnp.array(-0.1), float("nan")]:
        with pytest.raises(ValueError, match="label_smoothing"):
            xj.softmax_cross_entropy(logits, labels, label_smoothing=bad)
    with pytest.raises(ValueError, match="scalar"):
        xj.softmax_cross_entropy(logits, labels, label_smoothing=jnp.array([0.1]))
    np.testing.assert_allclose(
        xj.softmax_cross_entropy(logits, labels, label_smoothing=np.float32(0.2)),
        xj.softmax_cross_entropy(logits, labels, label_smoothing=0.2),
        rtol=1e-7,
    )


def test_ggn_diagonal_of_an_empty_batch_is_zero():
    def linear(weights, inputs):
        return inputs @ weights

    weights = jnp.ones((2, 3))
    empty = jnp.zeros((0, 2))
    diagonal = xj.ggn_diagonal(linear, weights, empty)
    assert diagonal.shape == weights.shape and np.all(diagonal == 0.0)
    np.testing.assert_array_equal(xj.ggn_vp(linear, weights, empty, weights), 0.0)


# --------------------------------------------------------------------------------------------
# The other places that need 1 − s: the logistic objective's Hessian diagonal and the square-root
# factor of the loss Hessian behind the exact GGN diagonal.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference_class", [False, True])
@pytest.mark.parametrize("num_classes", [3, 10])
def test_logistic_hessian_diagonal_in_the_tails(num_classes, reference_class):
    """One example with x = 1: diag(H) over W is s_k (1 − s_k), each to its own size."""
    from xentropy_jax import _linear

    rng = np.random.default_rng(20 + num_classes)
    eps = float(jnp.finfo(jnp.float32).eps)
    first = int(reference_class)
    for margin in MARGINS:
        logits = grid_logits(rng, num_classes, margin)
        # With a reference class, class 0's logit is 0: shift the row (exact on this grid).
        logits = logits - logits[0] if reference_class else logits
        objective = _linear.logistic_objective(
            np.ones((1, 1), np.float32),
            np.array([int(np.argmax(logits))]),
            num_classes,
            l2=0.0,
            fit_intercept=False,
            reference_class=reference_class,
        )
        theta = jnp.asarray(logits[first:], jnp.float32)
        evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
        diagonal = _linear.hessian_diagonal(objective, evaluation)
        assert diagonal.dtype == jnp.float32
        probs, complement = exact_softmax(logits)
        exact = [float(p * q) for p, q in zip(probs, complement, strict=True)][first:]
        # log_softmax rounds z_k − c − log Σ once: |z_k − max z| ulps, as the shift allows.
        allowed = 8 + np.abs(logits - logits.max())[first:]
        floor = float(jnp.finfo(jnp.float32).tiny) / eps
        assert np.all(ulps(diagonal, exact, jnp.float32, floor=floor) <= allowed), margin


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_square_root_factor_in_the_tails(num_classes):
    """Rows √s_k (e_k − s): the diagonal √s_k (1 − s_k) keeps the winner's curvature."""
    from xentropy_jax._diagonals import _sqrt_factor_rows

    rng = np.random.default_rng(30 + num_classes)
    eps = float(jnp.finfo(jnp.float32).eps)
    floor = float(jnp.finfo(jnp.float32).tiny) / eps
    for margin in MARGINS:
        logits = grid_logits(rng, num_classes, margin)
        rows = _sqrt_factor_rows(jnp.asarray(logits, jnp.float32))
        probs, complement = exact_softmax(logits)
        exact = np.array(
            [
                [
                    float(mpmath.sqrt(probs[k]) * (complement[k] if k == j else -probs[j]))
                    for j in range(num_classes)
                ]
                for k in range(num_classes)
            ]
        )
        assert np.max(ulps(rows, exact, jnp.float32, floor=floor)) <= 4, margin
