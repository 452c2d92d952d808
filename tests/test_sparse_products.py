"""Blocked sparse-dense products: equal to dense products, differentiable, no [nse, K] array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.experimental import sparse

import xentropy_jax as xj
from xentropy_jax import _linear, _sparse_products
from xentropy_jax._sparse_products import block_size, matmul, transpose_matmul
from xentropy_jax.solvers import _fit as fit_module
from xentropy_jax.solvers import _sparse_input


def random_bcoo(num_rows, num_features, density, seed=0, dtype=np.float64, empty=True, padded=True):
    """A canonical BCOO and the same matrix dense, in NumPy.

    `padded`: as the fit builds it (`to_bcoo`, stored entries padded to a bucketed count);
    else exactly the non-zeros, an odd number of them (never a multiple of a block).
    """
    matrix = scipy.sparse.random(
        num_rows, num_features, density=density, format="csr", random_state=seed, dtype=dtype
    )
    matrix.data = 3 * matrix.data - 1
    if empty:  # an empty row and an empty column besides the random ones
        matrix = matrix.tolil()
        matrix[num_rows // 2, :] = 0
        matrix[:, num_features // 3] = 0
        matrix = matrix.tocsr()
        matrix.eliminate_zeros()
    if padded:
        return _sparse_input.to_bcoo(matrix, dtype), matrix.toarray()
    if matrix.nnz % 2 == 0:
        matrix.data[-1] = 0
        matrix.eliminate_zeros()
    return sparse.BCOO.from_scipy_sparse(matrix), matrix.toarray()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few entries, so that a small matrix spans many blocks and a ragged end."""
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 1024)


def test_block_size_is_the_largest_power_of_two_within_the_budget():
    # 8 MiB / (20·8 B) = 52428 → 32768.
    assert block_size(2_031_616, 20, 8) == 32768
    assert block_size(100_001, 20, 8) == 32768  # not a divisor: the last block starts early
    assert block_size(3 * 2**12, 20, 8) == 3 * 2**12  # within the budget: one block
    assert block_size(0, 20, 8) == 1
    empty = sparse.BCOO((jnp.zeros((0,)), jnp.zeros((0, 2), jnp.int32)), shape=(4, 3))
    assert np.all(np.asarray(matmul(empty, jnp.ones((3, 2)))) == 0)
    assert np.all(np.asarray(transpose_matmul(empty, jnp.ones((4, 2)))) == 0)
    for entries in (1_000_001, 65_537 * 15, 3 * 2**22 + 5):
        size = block_size(entries, 7, 4)
        assert size & (size - 1) == 0 and size * 7 * 4 <= _sparse_products.BLOCK_BYTES
        assert size * 7 * 4 > _sparse_products.BLOCK_BYTES // 2


@pytest.mark.parametrize("num_classes", [1, 2])
def test_a_ragged_product_copies_no_stored_entries(monkeypatch, num_classes):
    """nse not a multiple of the block: the temporaries stay a few blocks, not a copy of X.

    A product that padded the stored entries to a multiple of the block held copies of the
    values and the indices (at few classes, several times a block); the last block now starts
    early instead.
    """
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 4096 * num_classes * 8)
    features, dense = random_bcoo(400, 300, density=0.3, padded=False)
    size = block_size(features.nse, num_classes, 8)
    assert features.nse % size != 0 and features.nse > 4 * size
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(300, num_classes))
    product = jax.jit(matmul).lower(features, weights).compile()
    temporaries = product.memory_analysis().temp_size_in_bytes
    assert temporaries < features.data.nbytes
    np.testing.assert_allclose(product(features, weights), dense @ weights, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("value_map", [jnp.square, jnp.abs])
def test_mapped_transpose_products_equal_products_with_the_mapped_matrix(monkeypatch, value_map):
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 16 * 3 * 8)
    features, dense = random_bcoo(37, 23, density=0.3, padded=False)
    residual = np.random.default_rng(3).normal(size=(37, 3))
    expected = np.asarray(value_map(dense)).T @ residual
    for matrix in (features, jnp.asarray(dense)):  # blocked, and the dense GEMM
        np.testing.assert_allclose(
            transpose_matmul(matrix, residual, value_map=value_map), expected, rtol=1e-12
        )


def test_the_sparse_hessian_diagonal_stores_no_squared_copy_of_x(monkeypatch):
    """(X ⊙ X)ᵀ·V squares each block's values as it takes them: no [nse] array is formed."""
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 512 * 4 * 8)
    features, _ = random_bcoo(300, 2000, density=0.02, padded=False)
    labels = np.arange(300) % 4
    objective = _linear.logistic_objective(features, labels, 4, l2=1e-3)
    theta = jnp.zeros(objective.num_params)
    evaluation = _linear.evaluate(objective, theta, objective.free_logits(theta))
    compiled = jax.jit(_linear.hessian_diagonal).lower(objective, evaluation).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    output = objective.num_params * 8
    assert temporaries - output < features.data.nbytes // 2


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("num_classes", [1, 3, 64])
@pytest.mark.parametrize("shape", [(37, 23), (5, 300), (250, 4)])
def test_products_equal_dense_products(monkeypatch, shape, num_classes, padded):
    # Blocks of 16 entries: many blocks, and a ragged end for an odd number of entries.
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 16 * num_classes * 8)
    features, dense = random_bcoo(*shape, density=0.2, seed=shape[0], padded=padded)
    num_rows, num_features = shape
    size = block_size(features.nse, num_classes, 8)
    assert size <= 16 and features.nse > 4 * size
    # Unpadded, the stored entries are not a multiple of the block (the last starts early).
    assert padded or features.nse % size != 0
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(num_features, num_classes))
    residual = rng.normal(size=(num_rows, num_classes))
    np.testing.assert_allclose(matmul(features, weights), dense @ weights, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        transpose_matmul(features, residual), dense.T @ residual, rtol=1e-12, atol=1e-14
    )
    # Vectors, and the same under jit.
    np.testing.assert_allclose(
        jax.jit(matmul)(features, weights[:, 0]), dense @ weights[:, 0], rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        jax.jit(transpose_matmul)(features, residual[:, 0]),
        dense.T @ residual[:, 0],
        rtol=1e-12,
        atol=1e-14,
    )
    # The empty row and column give exact zeros.
    assert np.all(np.asarray(matmul(features, weights))[num_rows // 2] == 0)
    assert np.all(np.asarray(transpose_matmul(features, residual))[num_features // 3] == 0)


def test_float32_products(small_blocks):
    features, dense = random_bcoo(40, 30, density=0.3, dtype=np.float32)
    weights = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
    product = matmul(features, weights)
    assert product.dtype == jnp.float32
    np.testing.assert_allclose(product, dense.astype(np.float64) @ weights, rtol=1e-5, atol=1e-5)
    transposed = transpose_matmul(features, product)
    assert transposed.dtype == jnp.float32
    np.testing.assert_allclose(
        transposed, dense.T.astype(np.float64) @ np.asarray(product), rtol=1e-5, atol=1e-5
    )


def test_dense_and_batched_bcoo_fall_back_to_the_ordinary_product():
    features, dense = random_bcoo(12, 9, density=0.4)
    weights = np.random.default_rng(1).normal(size=(9, 2))
    np.testing.assert_allclose(matmul(jnp.asarray(dense), weights), dense @ weights, rtol=1e-12)
    np.testing.assert_allclose(
        transpose_matmul(jnp.asarray(dense), dense @ weights), dense.T @ dense @ weights
    )
    batched = sparse.BCOO.fromdense(dense, n_batch=1)
    np.testing.assert_allclose(matmul(batched, weights), dense @ weights, rtol=1e-12)


def test_derivatives_in_values_and_dense_match_the_dense_formula(small_blocks):
    """jvp and grad in the stored values and in B, against autodiff of the dense product."""
    features, _ = random_bcoo(30, 20, density=0.25)
    rows, columns = features.indices[:, 0], features.indices[:, 1]
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.normal(size=(20, 4)))
    residual = jnp.asarray(rng.normal(size=(30, 4)))

    def blocked(values, weights):
        matrix = sparse.BCOO((values, features.indices), shape=features.shape)
        return transpose_matmul(matrix, matmul(matrix, weights) * residual)

    def explicit(values, weights):
        matrix = jnp.zeros(features.shape, values.dtype).at[rows, columns].add(values)
        return matrix.T @ ((matrix @ weights) * residual)

    tangents = (jnp.asarray(rng.normal(size=features.nse)), jnp.asarray(rng.normal(size=(20, 4))))
    primals = (features.data, weights)
    ours, our_tangent = jax.jvp(blocked, primals, tangents)
    theirs, their_tangent = jax.jvp(explicit, primals, tangents)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(our_tangent, their_tangent, rtol=1e-12, atol=1e-13)
    cotangent = jnp.asarray(rng.normal(size=(20, 4)))
    our_grads = jax.grad(lambda *a: jnp.vdot(cotangent, blocked(*a)), argnums=(0, 1))(*primals)
    their_grads = jax.grad(lambda *a: jnp.vdot(cotangent, explicit(*a)), argnums=(0, 1))(*primals)
    for ours, theirs in zip(our_grads, their_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-13)


def test_vmap_over_dense_operands_and_stored_values(small_blocks):
    features, dense = random_bcoo(25, 15, density=0.3)
    rng = np.random.default_rng(4)
    weights = rng.normal(size=(3, 15, 2))
    batched = jax.vmap(matmul, in_axes=(None, 0))(features, weights)
    np.testing.assert_allclose(batched, np.einsum("nd,bdk->bnk", dense, weights), rtol=1e-12)
    scales = np.array([1.0, -2.0, 0.5])

    def scaled_product(scale):
        matrix = sparse.BCOO((scale * features.data, features.indices), shape=features.shape)
        return transpose_matmul(matrix, jnp.ones((25, 2)))

    np.testing.assert_allclose(
        jax.vmap(scaled_product)(jnp.asarray(scales)),
        scales[:, None, None] * (dense.T @ np.ones((25, 2)))[None],
        rtol=1e-12,
    )


def _largest_array(text: str) -> int:
    """The most elements of any array shape written in an HLO module's text."""
    sizes = [
        int(np.prod([int(n) for n in dims.split(",")]))
        for dims in re.findall(r"(?:f32|f64|s32|pred)\[([0-9,]+)\]", text)
    ]
    return max(sizes)


@pytest.fixture
def quarter_mebibyte_blocks(monkeypatch):
    """Blocks of 256 KiB: at the sizes below, nse is several times a block, as at text sizes."""
    monkeypatch.setattr(_sparse_products, "BLOCK_BYTES", 1 << 18)


def test_compiled_sparse_fit_holds_no_entries_by_classes_array(quarter_mebibyte_blocks):
    """The whole compiled fit program, walked shape by shape: nothing of nse × K elements.

    Sizes are chosen so that nse·K exceeds every legitimate array (P = (d + 1)·K, N·K, nse),
    and the blocks are several times smaller than nse. The check can fail: the BCOO operator's
    own product does hold such an array.
    """
    num_rows, num_features, num_classes = 1000, 5000, 20
    features, _ = random_bcoo(num_rows, num_features, density=0.004, empty=False)
    entries_by_classes = features.nse * num_classes
    assert block_size(features.nse, num_classes, 8) * 4 <= features.nse
    labels = jnp.asarray(np.arange(num_rows) % num_classes, jnp.int32)
    weights = jnp.ones(num_rows)
    solver = fit_module._resolve_solver("newton-cg")
    compiled = fit_module._fit.lower(
        features,
        labels,
        weights,
        1e-3,
        None,
        1e-8,
        50,
        num_classes=num_classes,
        fit_intercept=True,
        reference_class=False,
        penalised=True,
        checked=True,
        solver=solver,
        verbose=False,
    ).compile()
    largest = _largest_array(compiled.as_text())
    assert largest < entries_by_classes // 2
    weights_matrix = jnp.ones((num_features, num_classes))
    operator = jax.jit(lambda X, W: X @ W).lower(features, weights_matrix).compile()
    assert _largest_array(operator.as_text()) >= entries_by_classes


def test_compiled_gradient_of_a_sparse_fit_holds_no_entries_by_classes_array(
    quarter_mebibyte_blocks,
):
    """The same walk for jax.grad and jax.jvp of a fit in the stored values.

    Implicit differentiation multiplies by X and Xᵀ again, here with derivatives through the
    blocked loops (rematerialised, so no block's gather is saved for the backward pass).
    """
    num_rows, num_features, num_classes = 1000, 5000, 20
    features, _ = random_bcoo(num_rows, num_features, density=0.004, empty=False, seed=1)
    assert block_size(features.nse, num_classes, 8) * 4 <= features.nse
    labels = jnp.asarray(np.arange(num_rows) % num_classes, jnp.int32)

    def scalar(values):
        matrix = sparse.BCOO((values, features.indices), shape=features.shape)
        result = xj.fit_logistic_regression(
            matrix, labels, num_classes, l2=1e-3, tol=1e-8, max_iter=50
        )
        return jnp.sum(result.params[0]) + result.loss

    for program in (jax.grad(scalar), lambda v: jax.jvp(scalar, (v,), (v,))[1]):
        compiled = jax.jit(program).lower(features.data).compile()
        assert _largest_array(compiled.as_text()) < features.nse * num_classes // 2


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_sparse_gram_equals_the_dense_gram_and_holds_no_dense_x(monkeypatch, padded, fit_intercept):
    # The Gram of an unpenalised fit (minimum-norm projection, collinearity warning) was
    # X̃ᵀ·(ŵ ⊙ X̃) against a dense copy of X: 1.5 GiB more for a 12 MiB CSR matrix.
    features, dense = random_bcoo(300, 40, density=0.05, padded=padded)
    weights = np.random.default_rng(1).random(300)
    weights[::7] = 0
    tilde = np.concatenate([dense, np.ones((300, 1))], axis=1) if fit_intercept else dense
    expected = tilde.T @ (weights[:, None] * tilde)
    for block_bytes in (300 * 8 * 3, 1 << 26):  # three columns a block (a ragged last), or all
        monkeypatch.setattr(_sparse_products, "_GRAM_BLOCK_BYTES", block_bytes)
        gram = _linear.sparse_feature_gram(features, jnp.asarray(weights), fit_intercept)
        np.testing.assert_allclose(gram, expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(_sparse_products, "_GRAM_BLOCK_BYTES", 300 * 8 * 4)
    compiled = (
        jax.jit(_sparse_products.weighted_gram).lower(features, jnp.asarray(weights)).compile()
    )
    assert compiled.memory_analysis().temp_size_in_bytes < dense.nbytes // 2


def test_unpenalised_sparse_fit_names_collinear_columns_as_the_dense_fit():
    features, dense = random_bcoo(200, 12, density=0.3, padded=True)
    dense = np.concatenate([dense, 2 * dense[:, :1]], axis=1)  # column 12 = 2 × column 0
    matrix = scipy.sparse.csr_matrix(dense)
    labels = np.arange(200) % 3
    results = []
    for X in (matrix, dense, matrix.astype(np.float32)):
        # Column 4 is all zero (`random_bcoo`), column 12 twice column 0.
        with pytest.warns(xj.CollinearityWarning, match=r"\[0, 4, 12\] of X are exactly"):
            results.append(xj.fit_logistic_regression(X, labels, 3, tol=1e-9))
    np.testing.assert_allclose(results[0].params[0], results[1].params[0], atol=1e-8)
    # The minimum-norm point splits the shared direction as the columns' scales: w₁₂ = 2·w₀.
    weights = np.asarray(results[0].params[0])
    np.testing.assert_allclose(weights[12], 2 * weights[0], atol=1e-8)
