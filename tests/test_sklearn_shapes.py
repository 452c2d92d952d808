"""The estimator across shapes: bucketed zero-weight padding and a bounded set of programs."""

import contextlib

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")

import xentropy_jax.sklearn as xsk  # noqa: E402
from xentropy_jax import _buckets  # noqa: E402
from xentropy_jax.solvers import fit_logistic_regression  # noqa: E402

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def solver_traces():
    """Collect the tracings of the solver's compiled program (one per program built)."""
    traces: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE_EVENT and kwargs.get("fun_name") == "_fit":
            traces.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield traces
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _data(num_rows: int, num_features: int = 3, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_rows, num_features))
    y = rng.integers(0, num_classes, num_rows)
    return X, y


def test_padded_rows_buckets():
    sizes = np.arange(1, 300_000)
    padded = np.array([_buckets.padded_rows(int(n)) for n in sizes])
    assert np.all(padded >= sizes)
    assert np.all(np.diff(padded) >= 0)  # monotone
    assert all(
        _buckets.padded_rows(int(p)) == p for p in np.unique(padded)
    )  # a bucket pads to itself
    large = sizes > _buckets.POWER_OF_TWO_ROWS
    overhead = padded[large] / sizes[large] - 1
    assert overhead.max() <= 0.25 and overhead.mean() < 0.11
    # Four buckets per doubling: the row counts of a cross-validation loop share a few programs.
    assert len(np.unique(padded[(sizes >= 4200) & (sizes <= 7140)])) <= 4
    assert len(np.unique(padded[(sizes > 2**16) & (sizes <= 2**17)])) == 4


def test_nearby_row_counts_share_one_program(monkeypatch):
    # Beyond 4,096 rows every new row count used to trace and compile its own program.
    monkeypatch.setattr(xsk, "_programs", type(xsk._programs)())
    monkeypatch.setattr(_buckets, "_first_rows", type(_buckets._first_rows)())
    X, y = _data(4700)
    row_counts = [4200, 4450, 4700, 4200]
    assert len({_buckets.padded_rows(n) for n in row_counts}) == 1
    models = []
    with solver_traces() as traces:
        for n in row_counts:
            models.append(xsk.LogisticRegression(C=1.0, solver="newton").fit(X[:n], y[:n]))
    # The first row count runs exactly (padding would cost time in every product), the others
    # share their bucket's program, and the first one again reuses its own.
    assert len(traces) <= 2  # fewer when an earlier test already built these programs
    assert sorted(key[0] for key in xsk._programs) == [4200, 5120]

    # Padding changes nothing: the same optimum as the core fitted on the rows themselves.
    n = row_counts[0]
    result = fit_logistic_regression(
        X[:n], y[:n], 3, l2=1.0 / n, solver="newton", tol=1e-10, max_iter=50
    )
    weights, intercept = (np.asarray(p) for p in result.params)
    np.testing.assert_allclose(models[0].coef_, weights.T, atol=1e-7)
    np.testing.assert_allclose(models[0].intercept_, intercept, atol=1e-7)


def test_programs_are_bounded(monkeypatch):
    monkeypatch.setattr(xsk, "_MAX_PROGRAMS", 1)
    monkeypatch.setattr(xsk, "_programs", type(xsk._programs)())
    clears = []
    clear_caches = jax.clear_caches
    monkeypatch.setattr(jax, "clear_caches", lambda: (clears.append(1), clear_caches())[1])
    X, y = _data(100)

    def fit(rows: int):
        return xsk.LogisticRegression(solver="newton").fit(X[:rows], y[:rows])

    with solver_traces() as traces:
        fit(40)  # 64 rows
        kept = len(traces)  # 0 when an earlier test already built this program
        fit(50)  # 64 rows again: kept, no new program
        assert clears == [] and len(traces) == kept and len(xsk._programs) == 1
        fit(100)  # 128 rows: a second program, beyond the bound
        assert clears == [1] and len(xsk._programs) == 1
        fit(60)  # 64 rows: dropped with the caches, so traced again
        assert clears == [1, 1] and len(traces) == kept + 2


def test_sparse_programs_are_keyed_by_their_stored_entries(monkeypatch):
    # One shape with more non-zeros is another program (its stored entries pad to another
    # bucket): counted as one, such fits grew memory past the bound.
    import scipy.sparse

    monkeypatch.setattr(xsk, "_programs", type(xsk._programs)())
    X, y = _data(100)
    dense = np.where(np.random.default_rng(1).random(X.shape) < 0.5, X, 0.0)
    sparser = np.where(np.random.default_rng(2).random(X.shape) < 0.8, dense, 0.0)
    for matrix in (dense, sparser, dense):
        xsk.LogisticRegression(solver="newton-cg").fit(scipy.sparse.csr_matrix(matrix), y)
    assert len(xsk._programs) == 2


def test_cv_row_counts_share_the_path_program(monkeypatch):
    # The outer folds of a nested cross-validation differ by a row: each compiled the path
    # program again (6–7 s).
    from xentropy_jax.solvers import _path as path_module

    X, y = _data(803, seed=3)
    search = xsk.LogisticRegressionCV(Cs=3, cv=3, tol=1e-10)
    search.fit(X[:790], y[:790])
    size = path_module._path._cache_size()
    padded = [xsk.LogisticRegressionCV(Cs=3, cv=3, tol=1e-10).fit(X[:n], y[:n]) for n in (802, 803)]
    assert path_module._path._cache_size() == size
    # The zero-weight rows change nothing: the same scores and paths on the rows alone.
    monkeypatch.setattr(xsk, "fitted_rows", lambda n_samples, configuration: n_samples)
    for n, model in zip((802, 803), padded, strict=True):
        exact = xsk.LogisticRegressionCV(Cs=3, cv=3, tol=1e-10).fit(X[:n], y[:n])
        np.testing.assert_allclose(model.scores_[1], exact.scores_[1], rtol=1e-12)
        np.testing.assert_allclose(model.coefs_paths_[1], exact.coefs_paths_[1], atol=1e-8)
        np.testing.assert_allclose(model.coef_, exact.coef_, atol=1e-8)
