"""Fits over rows streamed from memory-mapped files equal the in-memory fits."""

from __future__ import annotations

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
