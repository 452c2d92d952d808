"""Sparse features: the objective with a BCOO, the functional fit on scipy.sparse and BCOO."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from jax.experimental import sparse

import xentropy_jax as xj
from xentropy_jax import _linear
from xentropy_jax.solvers import _preconditioners, _sparse_input

NUM_ROWS, NUM_FEATURES, NUM_CLASSES = 60, 30, 4


def sparse_problem(seed=0, density=0.15, dtype=np.float64):
    rng = np.random.default_rng(seed)
    matrix = scipy.sparse.random(
        NUM_ROWS, NUM_FEATURES, density=density, format="csr", random_state=seed, dtype=dtype
    )
    matrix.data = 3 * matrix.data - 1
    labels = rng.integers(0, NUM_CLASSES, NUM_ROWS)
    sample_weight = rng.uniform(0.5, 2.0, NUM_ROWS)
    return matrix, labels, sample_weight


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("reference_class", [False, True])
def test_sparse_objective_equals_dense(fit_intercept, reference_class):
    matrix, labels, sample_weight = sparse_problem()
    settings = dict(
        sample_weight=sample_weight,
        l2=0.05,
        fit_intercept=fit_intercept,
        reference_class=reference_class,
    )
    dense = _linear.logistic_objective(matrix.toarray(), labels, NUM_CLASSES, **settings)
    bcoo = _sparse_input.to_bcoo(matrix, np.float64)
    sparse_objective = _linear.logistic_objective(bcoo, labels, NUM_CLASSES, **settings)
    assert isinstance(sparse_objective.features, sparse.BCOO)
    theta = jnp.asarray(np.random.default_rng(1).normal(size=dense.num_params))
    tangent = jnp.asarray(np.random.default_rng(2).normal(size=dense.num_params))
    evaluations = [
        _linear.evaluate(o, theta, o.free_logits(theta)) for o in (dense, sparse_objective)
    ]
    for left, right in zip(evaluations[0], evaluations[1], strict=True):
        np.testing.assert_allclose(right, left, rtol=1e-12, atol=1e-14)
    products = [
        _linear.hessian_vector_product(o, e, tangent)
        for o, e in zip((dense, sparse_objective), evaluations, strict=True)
    ]
    np.testing.assert_allclose(products[1], products[0], rtol=1e-12, atol=1e-14)
    for function in (_linear.hessian_diagonal, _linear.hessian):
        np.testing.assert_allclose(
            function(sparse_objective, evaluations[1]),
            function(dense, evaluations[0]),
            rtol=1e-12,
            atol=1e-14,
        )
    np.testing.assert_allclose(
        _linear.feature_gram(sparse_objective), _linear.feature_gram(dense), rtol=1e-12
    )


@pytest.mark.parametrize(
    "solver, kind",
    [
        ("newton-cg", "csr"),
        ("newton-cg", "csc"),
        ("newton-cg", "bcoo"),
        ("newton", "csr"),
        ("trust-region", "csr"),
    ],
)
def test_sparse_fit_equals_dense_fit(solver, kind):
    matrix, labels, sample_weight = sparse_problem()
    X = {"csr": matrix, "csc": matrix.tocsc(), "bcoo": sparse.BCOO.from_scipy_sparse(matrix)}[kind]
    settings = dict(sample_weight=sample_weight, l2=0.02, tol=1e-12, solver=solver)
    reference = xj.fit_logistic_regression(matrix.toarray(), labels, NUM_CLASSES, **settings)
    result = xj.fit_logistic_regression(X, labels, NUM_CLASSES, **settings)
    assert bool(result.converged)
    for ours, theirs in zip(result.params, reference.params, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["csr", "bcoo"])
def test_sparse_fit_inside_jit_that_closes_over_x(kind):
    # A concrete sparse X captured by the caller's jit (l2 its argument) is converted on the
    # host as outside jit; a BCOO's duplicate summing must not turn into tracers there.
    matrix, labels, _ = sparse_problem()
    X = matrix if kind == "csr" else sparse.BCOO.from_scipy_sparse(matrix)
    reference = xj.fit_logistic_regression(matrix.toarray(), labels, NUM_CLASSES, l2=0.02)
    traced = jax.jit(lambda l2: xj.fit_logistic_regression(X, labels, NUM_CLASSES, l2=l2).loss)
    np.testing.assert_allclose(traced(0.02), reference.loss, rtol=1e-10)


def test_duplicates_and_explicit_zeros_are_summed():
    matrix, labels, _ = sparse_problem()
    coo = matrix.tocoo()
    # Every stored entry split in two halves, plus explicit zeros: the same matrix.
    doubled = scipy.sparse.coo_matrix(
        (
            np.concatenate([coo.data / 2, coo.data / 2, np.zeros(5)]),
            (
                np.concatenate([coo.row, coo.row, np.arange(5)]),
                np.concatenate([coo.col, coo.col, np.arange(5)]),
            ),
        ),
        shape=matrix.shape,
    )
    reference = xj.fit_logistic_regression(matrix.toarray(), labels, NUM_CLASSES, l2=0.1, tol=1e-12)
    result = xj.fit_logistic_regression(doubled, labels, NUM_CLASSES, l2=0.1, tol=1e-12)
    np.testing.assert_allclose(result.params[0], reference.params[0], atol=1e-10)


def test_duplicates_are_summed_before_the_size_check():
    # Checked before summing, +1e200 and −1e200 at one position raised "entries up to 1e+200";
    # summed, they are a 0. Duplicates each within the limit whose sum is not still raise.
    matrix, labels, _ = sparse_problem()
    coo = matrix.tocoo()
    cancelling = scipy.sparse.coo_matrix(
        (
            np.concatenate([coo.data, [1e200, -1e200]]),
            (np.concatenate([coo.row, [0, 0]]), np.concatenate([coo.col, [1, 1]])),
        ),
        shape=matrix.shape,
    )
    reference = xj.fit_logistic_regression(matrix.toarray(), labels, NUM_CLASSES, l2=0.1, tol=1e-12)
    as_bcoo = sparse.BCOO(
        (jnp.asarray(cancelling.data), jnp.stack([cancelling.row, cancelling.col], axis=1)),
        shape=matrix.shape,
    )
    for X in (cancelling, as_bcoo):
        result = xj.fit_logistic_regression(X, labels, NUM_CLASSES, l2=0.1, tol=1e-12)
        np.testing.assert_allclose(result.params[0], reference.params[0], atol=1e-10)
    limit = float(np.sqrt(np.finfo(np.float64).max))
    overflowing = scipy.sparse.coo_matrix(
        (
            np.concatenate([coo.data, [0.75 * limit, 0.75 * limit]]),
            (np.concatenate([coo.row, [0, 0]]), np.concatenate([coo.col, [1, 1]])),
        ),
        shape=matrix.shape,
    )
    with pytest.raises(ValueError, match="X has entries up to"):
        xj.fit_logistic_regression(overflowing, labels, NUM_CLASSES, l2=0.1)


def test_stored_entries_are_bucketed_so_nearby_sizes_compile_once():
    sizes = [_sparse_input.bucketed_size(count) for count in range(1000, 1030)]
    assert len(set(sizes)) <= 2 and all(size >= 1000 for size in sizes)
    assert max(size / count for count, size in zip(range(1000, 1030), sizes, strict=True)) < 1.07
    assert _sparse_input.bucketed_size(0) == 1


@pytest.mark.parametrize("shape", [(40, 90), (90, 40)])
def test_entries_run_along_the_longer_dimension(shape):
    # By column for wide X (text), by row for tall X: the products then walk their larger
    # dense operand in order. Every input format gives the same matrix in that order, with
    # duplicates summed, whatever order it came in.
    matrix = scipy.sparse.random(*shape, density=0.1, format="coo", random_state=3)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(matrix.nnz)
    duplicated = np.concatenate([shuffled, shuffled[:7]])
    data = np.concatenate([matrix.data[shuffled], np.zeros(7)])
    messy = scipy.sparse.coo_matrix(
        (data, (matrix.row[duplicated], matrix.col[duplicated])), shape=shape
    )
    axis = 1 if shape[1] > shape[0] else 0
    inputs = [messy, messy.tocsr(), messy.tocsc(), sparse.BCOO.from_scipy_sparse(messy)]
    for given in inputs:
        bcoo = _sparse_input.to_bcoo(given, np.float64)
        key = np.asarray(bcoo.indices)[: matrix.nnz, axis]
        assert np.all(np.diff(key) >= 0), type(given).__name__
        np.testing.assert_array_equal(np.asarray(bcoo.todense()), matrix.toarray())


def test_sparse_nan_is_refused_and_auto_preconditioner_is_diagonal():
    matrix, labels, _ = sparse_problem()
    broken = matrix.copy()
    broken.data[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        xj.fit_logistic_regression(broken, labels, NUM_CLASSES)
    objective = _linear.logistic_objective(
        _sparse_input.to_bcoo(matrix, np.float64), labels, NUM_CLASSES
    )
    assert _preconditioners.resolve("auto", objective) == "diagonal"
    dense = _linear.logistic_objective(matrix.toarray(), labels, NUM_CLASSES)
    assert _preconditioners.resolve("auto", dense) == "kronecker"


def test_float32_sparse_fit_matches_float64():
    matrix, labels, sample_weight = sparse_problem()
    reference = xj.fit_logistic_regression(
        matrix, labels, NUM_CLASSES, sample_weight=sample_weight, l2=0.02, tol=1e-10
    )
    with jax.enable_x64(False):
        result = xj.fit_logistic_regression(
            matrix.astype(np.float32),
            labels,
            NUM_CLASSES,
            sample_weight=sample_weight,
            l2=0.02,
            tol=1e-5,
        )
        assert result.params[0].dtype == jnp.float32
    np.testing.assert_allclose(result.params[0], reference.params[0], atol=2e-4)
    assert abs(float(result.loss) - float(reference.loss)) <= 1e-6 * float(reference.loss)


def test_sparse_fit_compiles_once_per_shape():
    matrix, labels, _ = sparse_problem()
    other = sparse_problem(seed=3)[0]
    assert _sparse_input.bucketed_size(matrix.nnz) == _sparse_input.bucketed_size(other.nnz)
    from xentropy_jax.solvers import _fit

    chex.clear_trace_counter()
    traced = chex.assert_max_traces(_fit._fit.__wrapped__, n=1)
    original = _fit._fit
    _fit._fit = jax.jit(
        traced,
        static_argnames=_fit.FIT_STATIC_ARGNAMES,
    )
    try:
        for X in (matrix, other):
            xj.fit_logistic_regression(X, labels, NUM_CLASSES, l2=0.1)
    finally:
        _fit._fit = original


def test_bcoo_fits_compile_nothing_for_a_new_number_of_entries_and_ignore_padding():
    # A BCOO's duplicates were summed by JAX eagerly, which compiled some 35 small programs
    # for every number of stored entries (1.3 s a fit on folds of one bucket); and padding
    # entries at out-of-range indices were checked as data (NaN there refused the fit).
    matrix, labels, _ = sparse_problem()
    reference = xj.fit_logistic_regression(matrix, labels, NUM_CLASSES, l2=0.1)
    padded = sparse.BCOO.from_scipy_sparse(matrix)
    padding = jnp.full((3, 2), jnp.array(matrix.shape))
    padded = sparse.BCOO(
        (
            jnp.concatenate([padded.data, jnp.full(3, jnp.nan)]),
            jnp.concatenate([padded.indices, padding.astype(padded.indices.dtype)]),
        ),
        shape=matrix.shape,
    )
    result = xj.fit_logistic_regression(padded, labels, NUM_CLASSES, l2=0.1)
    np.testing.assert_allclose(result.params[0], reference.params[0], atol=1e-10)
    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for dropped in (1, 2):  # fewer stored entries, the same bucket
            smaller = matrix.tocoo()
            keep = np.arange(smaller.nnz) >= dropped
            smaller = scipy.sparse.coo_matrix(
                (smaller.data[keep], (smaller.row[keep], smaller.col[keep])), shape=matrix.shape
            )
            bcoo = sparse.BCOO.from_scipy_sparse(smaller)
            jax.block_until_ready(bcoo)
            compiles.clear()
            xj.fit_logistic_regression(bcoo, labels, NUM_CLASSES, l2=0.1)
            assert not compiles, compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_batched_fits_with_every_l2_positive_skip_the_minimum_norm_projection(monkeypatch):
    # Under vmap over l2 the projection's lax.cond became a select: every member built the
    # Gram X̃ᵀŴX̃, which densified a sparse X (LogisticRegressionCV on a 20,000 × 2,000 CSR:
    # +1 GiB and 29 s, against +0.4 GiB and 4 s without it).
    from xentropy_jax.solvers import _collinear

    calls = []

    def recorded_gram(objective):
        jax.debug.callback(lambda: calls.append(1))
        return _linear.feature_gram(objective)

    monkeypatch.setattr(_collinear, "feature_gram", recorded_gram)
    rng = np.random.default_rng(4)
    features = scipy.sparse.random(60, 5, density=0.4, format="csr", random_state=4)
    features = scipy.sparse.hstack([features, features[:, :1]]).tocsr()  # collinear
    labels = rng.integers(0, 3, 60)

    def fit(l2):
        return xj.fit_logistic_regression(features, labels, 3, l2=l2, tol=1e-10, throw=False)

    positive = jax.vmap(fit)(jnp.array([0.1, 0.01]))
    jax.effects_barrier()
    assert calls == [] and bool(positive.converged.all())
    mixed = jax.vmap(fit)(jnp.array([0.1, 0.0]))
    jax.effects_barrier()
    assert calls  # the member with l2 = 0 still gets its minimum-norm point
    for index, l2 in enumerate((0.1, 0.0)):
        member = [leaf[index] for leaf in mixed.params]
        chex.assert_trees_all_close(tuple(member), fit(l2).params, atol=1e-12)
