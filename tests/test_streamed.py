"""Fits over rows streamed from memory-mapped files equal the in-memory fits."""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np
import pytest

import xentropy_jax as xj

N, D, K = 3000, 8, 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D)) * rng.uniform(0.5, 3.0, size=D)
    noise = rng.normal(size=(2, N))
    y = (X[:, 0] - X[:, 1] + noise[0] > 0).astype(int) + (X[:, 2] + noise[1] > 0.5) * 2
    weights = rng.uniform(0.5, 2.0, N)
    folder = tmp_path_factory.mktemp("rows")
    for name, array in {"X": X, "y": y, "w": weights}.items():
        np.save(folder / f"{name}.npy", array)
    mapped = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("X", "y", "w")}
    return (X, y, weights), mapped


CASES = [
    dict(solver="newton-cg", l2=1e-3),
    dict(solver="newton", l2=0.0, reference_class=True),
    dict(solver=xj.TrustRegion(preconditioner="diagonal"), l2=1e-2, fit_intercept=False),
]


@pytest.mark.parametrize("settings", CASES, ids=["newton-cg", "newton-reference", "tr-diagonal"])
def test_streamed_fit_equals_the_in_memory_fit(files, settings, capsys):
    (X, y, weights), mapped = files
    whole = xj.fit_logistic_regression(X, y, K, sample_weight=weights, tol=1e-10, **settings)
    streamed = xj.fit_logistic_regression_streamed(
        mapped["X"],
        mapped["y"],
        K,
        sample_weight=mapped["w"],
        tol=1e-10,
        chunk_rows=700,
        verbose=True,
        **settings,
    )
    assert bool(streamed.converged)
    assert abs(float(streamed.loss) - float(whole.loss)) <= 1e-8 * abs(float(whole.loss))
    for ours, reference in zip(streamed.params, whole.params, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-8)
    assert int(streamed.n_iter) == int(whole.n_iter)
    # 5 chunks of 700 rows (the last one padded); the passes are counted and printed.
    printed = capsys.readouterr().out
    assert "passes over 5 chunks of 700 rows" in printed
    passes = float(printed.split(" passes over")[0].split()[-1])
    assert passes >= int(streamed.n_iter) + int(streamed.n_hessian_products)


def test_streamed_float32_reaches_the_float64_objective(files):
    (X, y, weights), mapped = files
    reference = xj.fit_logistic_regression(X, y, K, l2=1e-3, tol=1e-10)
    with jax.enable_x64(False):
        streamed = xj.fit_logistic_regression_streamed(
            mapped["X"].astype(np.float32), mapped["y"], K, l2=1e-3, chunk_rows=1024
        )
    assert streamed.params[0].dtype == np.float32
    assert abs(float(streamed.loss) - float(reference.loss)) <= 1e-6 * float(reference.loss)


@pytest.mark.parametrize(("name", "C", "gap"), [("wine", 1e4, 1e-5), ("digits", 1e2, 1e-6)])
def test_streamed_float32_fits_of_raw_data_reach_the_float64_optimum(name, C, gap):
    # With the static precision floor only, these stopped CONVERGED 1.4e-3 (wine) and 9.0e-5
    # (digits) above the optimum; the in-memory fit went on from there (`minimize_to_floor`).
    from sklearn.datasets import load_digits, load_wine

    X, y = {"wine": load_wine, "digits": load_digits}[name](return_X_y=True)
    num_classes, l2 = len(np.unique(y)), 1.0 / (C * len(y))

    def objective(params):
        W, b = (np.asarray(p, np.float64) for p in params)
        Z = X @ W + b
        Z = Z - Z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(Z).sum(axis=1))
        return np.mean(lse - Z[np.arange(len(y)), y]) + 0.5 * l2 * np.sum(W**2)

    best = xj.fit_logistic_regression(X, y, num_classes, l2=l2, tol=1e-13, max_iter=500)
    streamed = xj.fit_logistic_regression_streamed(
        X.astype(np.float32), y, num_classes, l2=l2, chunk_rows=len(y) // 3 + 1
    )
    assert streamed.params[0].dtype == np.float32
    assert 0 <= objective(streamed.params) / objective(best.params) - 1 < gap


def test_streamed_rounding_floor_sums_the_in_memory_one(files):
    from xentropy_jax._linear import logistic_objective
    from xentropy_jax._streamed import RowChunks, StreamedLogisticObjective, hold, release
    from xentropy_jax.solvers._floor import rounding_floor
    from xentropy_jax.solvers._streamed_fit import _rounding_floor

    (X, y, weights), _ = files
    X, weights = X.astype(np.float32), weights.astype(np.float32)
    l2 = np.float32(1e-3)
    theta = np.random.default_rng(1).normal(size=(D + 1) * K).astype(np.float32)
    whole = rounding_floor(logistic_objective(X, y, K, sample_weight=weights, l2=l2), theta)
    source = RowChunks(X, y, weights, 700, np.float32)
    source.weight_shift = 0
    token = hold(source)
    try:
        streamed = StreamedLogisticObjective(
            l2=l2,
            total_weight=np.float32(weights.sum()),
            token=np.int32(token),
            chunks=source.layout,
            num_classes=K,
        )
        output = xj.solvers._loop.SolverOutput(theta, None, 0, 0, 0)
        chunked = np.asarray(_rounding_floor(streamed, output))
    finally:
        release(token)
    assert chunked.dtype == np.float32 and np.all(chunked > 0)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def test_streamed_fit_inside_jit_with_a_traced_penalty(files):
    # The chunks are read on the host through callbacks, so the fit runs inside a caller's jit;
    # its status is then traced, and l2 may be a jit argument.
    (X, y, weights), mapped = files
    whole = xj.fit_logistic_regression(X, y, K, sample_weight=weights, l2=1e-3, tol=1e-10)

    def fit(l2):
        return xj.fit_logistic_regression_streamed(
            mapped["X"],
            mapped["y"],
            K,
            sample_weight=mapped["w"],
            l2=l2,
            tol=1e-10,
            chunk_rows=1024,
        )

    for result in (jax.jit(fit)(1e-3), jax.jit(lambda: fit(1e-3))()):
        assert int(result.status) == xj.Status.CONVERGED
        np.testing.assert_allclose(result.params[0], whole.params[0], rtol=0, atol=1e-8)


def test_streamed_fit_under_jit_reports_a_bad_l2_or_tol_as_the_in_memory_fit():
    # Without an in-jit check a negative tol came back CONVERGED, a negative l2 MAX_ITER.
    rng = np.random.default_rng(14)
    X, y = rng.normal(size=(60, 3)), rng.integers(0, 3, 60)
    cases = [(-0.5, 1e-8), (np.nan, 1e-8), (0.1, -1.0), (0.1, np.nan), (0.1, 1e-8)]
    for fit in (xj.fit_logistic_regression, xj.fit_logistic_regression_streamed):
        run = jax.jit(lambda l2, tol: fit(X, y, 3, l2=l2, tol=tol, throw=False))  # noqa: B023
        statuses = [xj.Status(int(run(l2, tol).status)).name for l2, tol in cases]
        assert statuses == ["INVALID_L2", "INVALID_L2", "INVALID_TOL", "INVALID_TOL", "CONVERGED"]


def test_streamed_weights_count_only_through_their_ratios():
    rng = np.random.default_rng(2)
    y = np.arange(40) % 3
    X = rng.normal(size=(40, 2)) + np.eye(3, 2)[y]
    fit = functools.partial(xj.fit_logistic_regression_streamed, labels=y, num_classes=3, l2=0.1)
    for dtype, weights, weight_dtype in [
        # Divided by an overflowing total in float32, every weight became 0 (W = 0, CONVERGED);
        # then they were refused, where the in-memory fit takes them.
        (np.float32, 1e37, np.float64),
        (np.float64, 1e308, np.float64),  # the total overflows float64 on the host
        (np.float32, 1e-39, np.float64),  # subnormal in float32
        (np.float32, [1e-39] * 20 + [1e37] * 20, np.float64),  # a sum in range, its largest beyond
        # Subnormal in their own dtype: the chunk reads, on XLA's threads, which flush those,
        # took every weight as 0 (W = 0, CONVERGED).
        (np.float64, 1e-310, np.float64),
        (np.float32, 1e-40, np.float32),
        (np.float64, [1e-310] * 20 + [1e-300] * 20, np.float64),
    ]:
        data = X.astype(dtype)
        weights = np.broadcast_to(np.asarray(weights, weight_dtype), (40,))
        unit = np.where(weights == weights.max(), 1.0, 0.0)  # the smallest are 0 beside it
        result, reference = fit(data, sample_weight=weights), fit(data, sample_weight=unit)
        assert int(result.status) == xj.Status.CONVERGED
        assert np.all(np.abs(result.params[0]) > 1e-3)  # not W = 0
        np.testing.assert_allclose(result.params[0], reference.params[0], rtol=1e-5)
        np.testing.assert_allclose(result.params[1], reference.params[1], rtol=1e-5, atol=1e-6)
    # NumPy converted strings and objects (the in-memory fit refuses them).
    for weights in (np.full(40, "1.0"), np.full(40, 1.0, dtype=object)):
        with pytest.raises(TypeError, match="sample_weight"):
            fit(X, sample_weight=weights)


def test_streamed_input_errors_name_the_rows(files):
    (X, y, _), _ = files
    bad = X.copy()
    bad[2500, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity .*rows 2048"):
        xj.fit_logistic_regression_streamed(bad, y, K, chunk_rows=1024)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        xj.fit_logistic_regression_streamed(X, y + 1, K, chunk_rows=1024)
    with pytest.raises(ValueError, match="chunk_rows"):
        xj.fit_logistic_regression_streamed(X, y, K, chunk_rows=0)
    # As the in-memory fit: these were accepted (tol < 0 converged, NaN ran to a failure).
    for tol in (-1.0, np.nan):
        with pytest.raises(ValueError, match="tol must be a non-negative scalar"):
            xj.fit_logistic_regression_streamed(X, y, K, tol=tol)
    with pytest.raises(ValueError, match=r"max_iter must be an integer in \[0, 2\*\*31 - 1\]"):
        xj.fit_logistic_regression_streamed(X, y, K, max_iter=-1)
    with pytest.raises(ValueError, match="X has no rows"):  # was a ZeroDivisionError
        xj.fit_logistic_regression_streamed(X[:0], y[:0], K)
    # Labels or weights [N, 1] failed inside NumPy ("object too deep for desired array").
    with pytest.raises(ValueError, match=r"labels must have shape \(\d+,\), got \(\d+, 1\)"):
        xj.fit_logistic_regression_streamed(X, y[:, None], K)
    with pytest.raises(ValueError, match=r"sample_weight must have shape"):
        xj.fit_logistic_regression_streamed(X, y, K, sample_weight=np.ones((len(y), 1)))


def test_streamed_dataframe_in_float64():
    # With 64-bit mode on (as here) a DataFrame, which has no single dtype, raised
    # AttributeError; the in-memory fit took it.
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(300, 3)), rng.integers(0, K, 300)
    streamed = xj.fit_logistic_regression_streamed(pd.DataFrame(X), y, K, l2=1e-2, chunk_rows=64)
    whole = xj.fit_logistic_regression(X, y, K, l2=1e-2)
    assert streamed.params[0].dtype == np.float64
    np.testing.assert_allclose(streamed.params[0], whole.params[0], rtol=0, atol=1e-10)


def _ragged_chunks(X, y, weights, sizes):
    """A generator function: a fresh pass over chunks of the given lengths at each call."""
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(y)

    def chunks():
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield X[start:stop], y[start:stop], weights[start:stop]

    return chunks


RAGGED = [700, 1000, 300, 650, 350]  # the longest first, last one short: padded to 1000 rows


@pytest.mark.parametrize("settings", CASES[:2], ids=["newton-cg", "newton-reference"])
def test_fit_from_an_iterator_of_ragged_chunks_equals_the_in_memory_fit(files, settings, capsys):
    (X, y, weights), mapped = files
    whole = xj.fit_logistic_regression(X, y, K, sample_weight=weights, tol=1e-10, **settings)
    # Chunks of memory-mapped rows, from a generator function (one iterator per pass).
    chunks = _ragged_chunks(mapped["X"], mapped["y"], mapped["w"], RAGGED)
    streamed = xj.fit_logistic_regression_streamed(
        chunks, num_classes=K, tol=1e-10, verbose=True, **settings
    )
    assert bool(streamed.converged)
    assert int(streamed.n_iter) == int(whole.n_iter)
    assert abs(float(streamed.loss) - float(whole.loss)) <= 1e-8 * abs(float(whole.loss))
    for ours, reference in zip(streamed.params, whole.params, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-8)
    assert "passes over 5 chunks of 1000 rows" in capsys.readouterr().out


def test_chunks_of_mixed_dtypes_are_fitted_in_the_widest(files):
    # A float32 first chunk fitted the float64 chunks after it in float32 (CONVERGED 1.3e-7
    # from the in-memory fit of their concatenation, which NumPy makes float64).
    (X, y, weights), _ = files
    parts = [(X[:700].astype(np.float32), y[:700], weights[:700])]
    parts += [(X[700:], y[700:], weights[700:])]
    for chunks in (parts, parts[::-1]):
        streamed = xj.fit_logistic_regression_streamed(chunks, num_classes=K, tol=1e-12)
        assert streamed.params[0].dtype == np.float64
        whole_of_these = xj.fit_logistic_regression(
            np.concatenate([c[0] for c in chunks]),
            np.concatenate([c[1] for c in chunks]),
            K,
            sample_weight=np.concatenate([c[2] for c in chunks]),
            tol=1e-12,
        )
        np.testing.assert_allclose(streamed.params[0], whole_of_these.params[0], atol=1e-12)


def test_fit_from_a_list_of_chunks_and_a_one_shot_generator_is_refused(files):
    (X, y, weights), _ = files
    chunks = _ragged_chunks(X, y, weights, [1200, 1200, 600])
    whole = xj.fit_logistic_regression(X, y, K, sample_weight=weights, l2=1e-2, tol=1e-10)
    listed = xj.fit_logistic_regression_streamed(list(chunks()), num_classes=K, l2=1e-2, tol=1e-10)
    assert abs(float(listed.loss) - float(whole.loss)) <= 1e-8 * float(whole.loss)
    with pytest.raises(TypeError, match="one-shot iterator.*function that returns a fresh"):
        xj.fit_logistic_regression_streamed(chunks(), num_classes=K)
    with pytest.raises(ValueError, match="labels and weights come in the chunks"):
        xj.fit_logistic_regression_streamed(chunks, y, K)
    with pytest.raises(ValueError, match="labels and weights come in the chunks"):
        xj.fit_logistic_regression_streamed(list(chunks()), y, K)
    # Rows as nested lists with their labels, as the in-memory fit takes them: not chunks.
    rows = xj.fit_logistic_regression_streamed(
        X.tolist(), y.tolist(), K, sample_weight=weights, l2=1e-2, tol=1e-10, chunk_rows=700
    )
    assert abs(float(rows.loss) - float(whole.loss)) <= 1e-8 * float(whole.loss)
    with pytest.raises(ValueError, match="num_classes=K"):
        xj.fit_logistic_regression_streamed(chunks, K)


def test_chunk_errors_name_the_rows_and_changed_chunks_are_caught(files):
    (X, y, weights), _ = files
    bad = y.copy()
    bad[1500] = K
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) \(rows 1200 to 2399\)"):
        xj.fit_logistic_regression_streamed(
            _ragged_chunks(X, bad, weights, [1200, 1200, 600]), num_classes=K
        )
    calls = []

    def shrinking():  # the second pass gives a chunk of another length
        calls.append(None)
        size = 1200 if len(calls) == 1 else 1100
        yield X[:size], y[:size]
        yield X[size:], y[size:]

    # The ValueError itself, not XLA's JaxRuntimeError around the callback that raised it.
    with pytest.raises(ValueError, match="every pass must give the same chunks"):
        xj.fit_logistic_regression_streamed(shrinking, num_classes=K, l2=1e-2)
    growing_calls = []

    def growing():  # later passes give a third chunk: it was left out, and CONVERGED said
        growing_calls.append(None)
        yield X[:1200], y[:1200]
        yield X[1200:2400], y[1200:2400]
        if len(growing_calls) > 1:
            yield X[2400:], y[2400:]

    with pytest.raises(ValueError, match="ran on past the 2 of the first pass"):
        xj.fit_logistic_regression_streamed(growing, num_classes=K, l2=1e-2)


def test_a_float32_chunk_before_a_float64_one_is_held_to_float64s_range():
    # Entries of 1e17 overflow float32's squares, not float64's: a float32 first chunk was
    # refused ("fit in float64") although the fit runs in float64, as the reversed order did.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 4))
    X[:, 3] *= 1e17
    y = rng.integers(0, 3, 600)
    whole = xj.fit_logistic_regression(
        np.concatenate([X[:300].astype(np.float32), X[300:]]), y, 3, l2=1e-3
    )
    for chunks in (
        [(X[:300].astype(np.float32), y[:300]), (X[300:], y[300:])],
        [(X[300:], y[300:]), (X[:300].astype(np.float32), y[:300])],
    ):
        streamed = xj.fit_logistic_regression_streamed(chunks, num_classes=3, l2=1e-3)
        assert streamed.converged and streamed.params[0].dtype == np.float64
    np.testing.assert_allclose(float(streamed.loss), float(whole.loss), rtol=1e-10)
    with pytest.raises(ValueError, match=r"beyond .* \(rows 0 to 299, up to .*or fit in float64"):
        xj.fit_logistic_regression_streamed(
            [(X[:300].astype(np.float32), y[:300])] * 2, num_classes=3, l2=1e-3
        )


def _collinear(X):
    groups = np.random.default_rng(1).integers(0, 3, len(X))
    return {
        # Column 8 is 3 × column 2: with l2 = 0 only W[2] + 3·W[8] is identified.
        "scaled copy": (np.concatenate([X, 3 * X[:, 2:3]], axis=1), "2, 8"),
        # Three dummies that sum to the intercept's column.
        "dummies": (np.concatenate([X[:, :5], np.eye(3)[groups]], axis=1), "5, 6, 7, intercept"),
    }


@pytest.mark.parametrize("problem", ["scaled copy", "dummies"])
def test_streamed_collinear_unpenalised_fit_is_the_minimum_norm_optimum(files, problem):
    (X, y, weights), _ = files
    collinear, named = _collinear(X)[problem]
    with pytest.warns(xj.CollinearityWarning, match=rf"columns \[{named}\]") as whole_warning:
        whole = xj.fit_logistic_regression(collinear, y, K, sample_weight=weights, tol=1e-10)
    with pytest.warns(xj.CollinearityWarning) as streamed_warning:
        streamed = xj.fit_logistic_regression_streamed(
            _ragged_chunks(collinear, y, weights, [1000, 1200, 800]), num_classes=K, tol=1e-10
        )
    assert str(streamed_warning[0].message) == str(whole_warning[0].message)
    assert int(streamed.n_iter) == int(whole.n_iter)
    assert abs(float(streamed.loss) - float(whole.loss)) <= 1e-8 * abs(float(whole.loss))
    for ours, reference in zip(streamed.params, whole.params, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-8)
    if problem == "scaled copy":  # the least-norm split of W[2] + 3·W[8]: W[8] = 3·W[2]
        np.testing.assert_allclose(
            streamed.params[0][8], 3 * streamed.params[0][2], rtol=0, atol=1e-8
        )
    # The same from sliceable rows.
    with pytest.warns(xj.CollinearityWarning, match=rf"columns \[{named}\]"):
        sliced = xj.fit_logistic_regression_streamed(
            collinear, y, K, sample_weight=weights, tol=1e-10, chunk_rows=700
        )
    np.testing.assert_allclose(sliced.params[0], whole.params[0], rtol=0, atol=1e-8)


def test_streamed_float32_columns_collinear_to_its_precision_say_so():
    # The streamed fit decides on its Gram alone: float32 columns x and x + 1e-4·z are
    # collinear to float32 precision, not exactly (float64 resolves them).
    rng = np.random.default_rng(0)
    x = rng.normal(size=600)
    X = np.column_stack([x, x + 1e-4 * rng.normal(size=600), rng.normal(size=600)])
    y = rng.integers(0, 3, 600)
    chunks = [(X[:300].astype(np.float32), y[:300]), (X[300:].astype(np.float32), y[300:])]
    with pytest.warns(xj.CollinearityWarning, match="collinear to float32 precision"):
        xj.fit_logistic_regression_streamed(chunks, num_classes=3, l2=0.0, throw=False)


@pytest.mark.parametrize("solver", ["newton", "newton-cg"])
def test_streamed_params_have_the_returned_loss_at_a_large_norm(solver):
    # As the in-memory fit's test: raw breast cancer in float32 without a penalty, two columns
    # null only to float32 precision. The streamed fit projected whenever its Gram had a null
    # space: params with an objective of 2.4 (newton) and 12 (newton-cg) beside a loss of 0.016
    # and 0.008.
    from sklearn.datasets import load_breast_cancer

    from xentropy_jax import _linear

    X, y = load_breast_cancer(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xj.CollinearityWarning)
        result = xj.fit_logistic_regression_streamed(
            X.astype(np.float32), y, 2, solver=solver, throw=False
        )
    objective = _linear.logistic_objective(X.astype(np.float32).astype(np.float64), y, 2)
    theta = objective.restrict(*(jax.numpy.asarray(p, np.float64) for p in result.params))
    np.testing.assert_allclose(float(objective.value(theta)), float(result.loss), rtol=1e-3)


def test_sparse_rows_are_densified_chunk_by_chunk(files):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    (X, y, weights), _ = files
    thinned = np.where(np.abs(X) > 1.0, X, 0.0)  # about half the entries zero
    matrix = scipy_sparse.csr_matrix(thinned)
    whole = xj.fit_logistic_regression(thinned, y, K, sample_weight=weights, l2=1e-3, tol=1e-10)
    sliced = xj.fit_logistic_regression_streamed(
        matrix, y, K, sample_weight=weights, l2=1e-3, tol=1e-10, chunk_rows=1100
    )
    iterated = xj.fit_logistic_regression_streamed(
        [(matrix[:2000], y[:2000], weights[:2000]), (matrix[2000:], y[2000:], weights[2000:])],
        num_classes=K,
        l2=1e-3,
        tol=1e-10,
    )
    for streamed in (sliced, iterated):
        assert abs(float(streamed.loss) - float(whole.loss)) <= 1e-8 * float(whole.loss)
        np.testing.assert_allclose(streamed.params[0], whole.params[0], rtol=0, atol=1e-8)


class _GrowingRows:
    """Rows that grow in place, as an HDF5 dataset's `resize` or a zarr array's `append`."""

    def __init__(self, rows):
        self.rows = np.asarray(rows)

    shape = property(lambda self: self.rows.shape)
    dtype = property(lambda self: self.rows.dtype)
    ndim = property(lambda self: self.rows.ndim)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def append(self, rows):
        self.rows = np.concatenate([self.rows, rows])


def test_a_dataset_grown_in_place_is_fitted_on_all_its_rows(files):
    # The same objects, longer: a source of the old shape read only the old 2,000 rows against
    # the new total weight, and reported CONVERGED at the wrong optimum.
    (X, y, _), _ = files
    features, labels = _GrowingRows(X[:2000]), _GrowingRows(y[:2000])
    xj.fit_logistic_regression_streamed(features, labels, K, l2=1e-3, chunk_rows=700)
    features.append(X[2000:])
    labels.append(y[2000:])
    grown = xj.fit_logistic_regression_streamed(
        features, labels, K, l2=1e-3, tol=1e-10, chunk_rows=700
    )
    whole = xj.fit_logistic_regression(X, y, K, l2=1e-3, tol=1e-10)
    assert abs(float(grown.loss) - float(whole.loss)) <= 1e-8 * float(whole.loss)
    np.testing.assert_allclose(grown.params[0], whole.params[0], rtol=0, atol=1e-8)


def test_new_data_of_the_same_layout_reuse_the_program_and_are_not_kept(files):
    # A compiled fit sees the chunk layout, not the data object: a copy of X (a resample, a
    # fold, a refit) compiled a new program each time (1.6 s), and every program kept its X
    # alive (10 fits on fresh 20,000 × 5 arrays held all 10).
    import gc
    import weakref

    from xentropy_jax.solvers._streamed_fit import _fit_streamed

    (X, y, _), _ = files
    first = xj.fit_logistic_regression_streamed(X.copy(), y, K, l2=1e-3, chunk_rows=700)
    programs = _fit_streamed._cache_size()
    copies = [X.copy() for _ in range(3)]
    kept = [weakref.ref(copy) for copy in copies]
    for copy in copies:
        again = xj.fit_logistic_regression_streamed(copy, y, K, l2=1e-3, chunk_rows=700)
        np.testing.assert_array_equal(again.params[0], first.params[0])
    assert _fit_streamed._cache_size() == programs
    del copies, copy
    gc.collect()
    assert all(ref() is None for ref in kept)


def test_streamed_fit_takes_every_scipy_format():
    # A COO matrix (and DIA, BSR) cannot be sliced by rows: "'coo_matrix' object is not
    # subscriptable".
    import scipy.sparse

    X = scipy.sparse.random(50, 4, density=0.5, format="csr", random_state=0)
    y = np.arange(50) % 3
    reference = xj.fit_logistic_regression_streamed(X, y, 3, l2=0.1, chunk_rows=16).params
    for layout in ("coo", "dia", "bsr"):
        result = xj.fit_logistic_regression_streamed(
            X.asformat(layout), y, 3, l2=0.1, chunk_rows=16
        )
        np.testing.assert_allclose(result.params[0], reference[0], atol=1e-12)
