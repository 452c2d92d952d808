"""Rows sharded over several devices: the same fit as on one, one all-reduce per product.

Eight CPU devices exist only when `XLA_FLAGS=--xla_force_host_platform_device_count=8` is set
before jax starts, so the checks run in a child process and report back as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, os, re
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    import xentropy_jax as xj
    from xentropy_jax._linear import evaluate, hessian_vector_product, logistic_objective
    from xentropy_jax.sklearn import LogisticRegression

    out = {"devices": len(jax.devices())}
    rng = np.random.default_rng(0)
    N, d, K = 2000, 12, 4
    X = rng.normal(size=(N, d)) * rng.uniform(0.5, 2, size=d)
    y = rng.integers(0, K, N)
    w = rng.uniform(0.5, 1.5, N)

    def relative(a, b):
        return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    def sharded(count, kind=AxisType.Auto):
        mesh = jax.make_mesh((count,), ("rows",), devices=jax.devices()[:count], axis_types=(kind,))
        sharding = NamedSharding(mesh, PartitionSpec("rows"))
        return [jax.device_put(a, sharding) for a in (X, y, w)]

    fits = {}
    # The solvers share one loop and one objective: the sharded products are the same for all.
    for solver, counts in [("newton-cg", (2, 8)), ("newton", (4,))]:
        one = xj.fit_logistic_regression(
            X, y, K, sample_weight=w, l2=1e-3, tol=1e-12, solver=solver
        )
        for count in counts:
            kind = AxisType.Explicit if count == 8 else AxisType.Auto
            Xs, ys, ws = sharded(count, kind)
            many = xj.fit_logistic_regression(
                Xs, ys, K, sample_weight=ws, l2=1e-3, tol=1e-12, solver=solver
            )
            fits[f"{solver}/{count}"] = [
                relative(many.params[0], one.params[0]),
                relative(many.params[1], one.params[1]),
                int(many.n_iter),
                int(one.n_iter),
                bool(many.converged),
            ]
    out["fits"] = fits
    # The path on an Explicit mesh: its arrays too are moved to Auto axes (it raised a
    # ShardingTypeError from inside JAX).
    Xs, ys, ws = sharded(8, AxisType.Explicit)
    grid = [1e-2, 1e-3]
    path_one = xj.fit_regularization_path(X, y, K, grid, sample_weight=w, tol=1e-12)
    path_many = xj.fit_regularization_path(Xs, ys, K, grid, sample_weight=ws, tol=1e-12)
    out["path"] = [
        relative(path_many.params[0], path_one.params[0]),
        bool(path_many.converged.all()),
    ]

    # Unpenalised on an Explicit mesh with weights: the collinearity check after the fit got
    # the user's Explicit weights beside Auto features, and raised a mesh error.
    Xs, ys, ws = sharded(8, AxisType.Explicit)
    one = xj.fit_logistic_regression(X, y, K, sample_weight=w, tol=1e-12)
    many = xj.fit_logistic_regression(Xs, ys, K, sample_weight=ws, tol=1e-12)
    out["unpenalised"] = [relative(many.params[0], one.params[0]), bool(many.converged)]

    # A warm start placed on the Explicit mesh, and the streamed fit slicing Explicit arrays:
    # both raised mesh errors from inside JAX where the in-memory fit takes the data.
    Xs, ys, ws = sharded(8, AxisType.Explicit)
    replicated = NamedSharding(Xs.sharding.mesh, PartitionSpec())
    one = xj.fit_logistic_regression(X, y, K, sample_weight=w, l2=1e-3, tol=1e-12)
    start = tuple(jax.device_put(np.zeros(shape), replicated) for shape in ((d, K), (K,)))
    warm = xj.fit_logistic_regression(
        Xs, ys, K, sample_weight=ws, l2=1e-3, tol=1e-12, init=start
    )
    streamed = xj.fit_logistic_regression_streamed(
        Xs, ys, K, sample_weight=ws, l2=1e-3, tol=1e-12, chunk_rows=700
    )
    out["explicit init and streamed"] = [
        relative(warm.params[0], one.params[0]),
        relative(streamed.params[0], one.params[0]),
    ]

    # Integer-label losses and products beyond 32 classes on rows over an Explicit mesh: the
    # label scatter raised a ShardingTypeError from inside JAX (up to 32 the comparison served).
    wide = 40
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Explicit,))
    rows_only = NamedSharding(mesh, PartitionSpec("rows"))
    Z = rng.normal(size=(N, wide))
    labels = rng.integers(0, wide, N)
    V = rng.normal(size=(N, wide))
    Zs, labels_s, Vs = (jax.device_put(a, rows_only) for a in (Z, labels, V))
    integer_loss = xj.softmax_cross_entropy_with_integer_labels

    def mean_loss(z, y):
        return integer_loss(z, y).mean()

    with jax.set_mesh(mesh):
        out["explicit integer"] = {
            "loss": relative(integer_loss(Zs, labels_s), integer_loss(Z, labels)),
            "jit grad": relative(
                jax.jit(jax.grad(mean_loss))(Zs, labels_s), jax.grad(mean_loss)(Z, labels)
            ),
            "hvp": relative(
                jax.jvp(lambda z: jax.grad(mean_loss)(z, labels_s), (Zs,), (Vs,))[1],
                jax.jvp(lambda z: jax.grad(mean_loss)(z, labels), (Z,), (V,))[1],
            ),
        }

    # One Hessian product on 8 devices: the collectives XLA compiled into it.
    Xs, ys, ws = sharded(8)
    objective = logistic_objective(Xs, ys, K, sample_weight=ws, l2=1e-3)
    theta = jnp.zeros(objective.num_params)
    point = jax.jit(lambda o, t: evaluate(o, t, o.free_logits(t)))(objective, theta)
    text = jax.jit(hessian_vector_product).lower(objective, point, theta + 1).compile().as_text()
    collectives = re.findall(
        r"= (\\([^)]*\\)|\\S+) (all-reduce|all-gather|reduce-scatter|all-to-all)\\(", text
    )
    out["collectives"] = [[shape, name] for shape, name in collectives]

    # Bad values in one shard are found where they live.
    bad = np.array(X)
    bad[N - 1, 3] = np.nan
    try:
        xj.fit_logistic_regression(jax.device_put(bad, Xs.sharding), ys, K)
        out["nan_error"] = None
    except ValueError as error:
        out["nan_error"] = str(error)

    # The estimator: rows split over 3 devices (2000 rows padded to 2001).
    one = LogisticRegression(C=1.0, tol=1e-12).fit(X, y)
    many = LogisticRegression(C=1.0, tol=1e-12, devices=3).fit(X, y)
    out["estimator"] = [
        relative(jnp.asarray(many.coef_), jnp.asarray(one.coef_)),
        int(many.n_iter_[0]),
        int(one.n_iter_[0]),
    ]
    # Verbose progress from a fit over 3 devices: lines 0, 1, ... in order (the printer of
    # line 0 returns the loop's start, where an ordered callback is refused on several devices).
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        LogisticRegression(C=1.0, tol=1e-12, devices=3, verbose=1).fit(X, y)
    out["verbose"] = [int(line.split()[1]) for line in printed.getvalue().splitlines()]
    try:
        LogisticRegression(devices=9).fit(X, y)
        out["too_many"] = None
    except ValueError as error:
        out["too_many"] = str(error)
    # Device ids: clonable and picklable (a list of Device objects is neither), so searches,
    # cross-validation and pickling work.
    import pickle

    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    by_ids = LogisticRegression(C=1.0, tol=1e-12, devices=[0, 2, 5])
    fitted = pickle.loads(pickle.dumps(clone(by_ids).fit(X, y)))
    out["ids"] = [
        relative(jnp.asarray(fitted.coef_), jnp.asarray(one.coef_)),
        float(cross_val_score(by_ids, X, y, cv=2).mean()),
    ]
    try:
        LogisticRegression(devices=[1, 1]).fit(X, y)
        out["twice"] = None
    except ValueError as error:
        out["twice"] = str(error)

    # Inside shard_map (docs/scaling.md), with the default check and with check_vma=False,
    # each against its per-shard values on one device. With the check on, JAX sums a product
    # with respect to the replicated W over the shards, as it sums jax.grad's, and the
    # diagonals are the sums of the shards' diagonals (the sampled one with the same key on
    # every shard); with the check off they are the shards' own. The loops (the head, CG, the
    # fits) start from carries typed as their bodies' outputs.
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(AxisType.Auto,))
    rows, whole = PartitionSpec("rows"), PartitionSpec()
    W = rng.normal(size=(d, K)) / 4

    def linear(p, x):
        return x @ p

    def diagonal(X, y, W):
        return xj.ggn_diagonal(linear, W, X)[None]

    def bartlett(X, y, W):
        return xj.ggn_diagonal_bartlett(linear, W, X, jax.random.key(3), num_samples=2)[None]

    def hutchinson(X, y, W):
        return xj.ggn_diagonal_hutchinson(linear, W, X, jax.random.key(4), num_samples=2)[None]

    def closure_diagonal(X, y, W):
        # The model reads the shard's rows from its closure; its inputs are row numbers.
        X, rows = jnp.asarray(X), jnp.arange(X.shape[0])
        return xj.ggn_diagonal(lambda p, i: X[i] @ p, W, rows)[None]

    def solve(X, y, W):
        return xj.cg(lambda v: X.T @ (X @ v) + v, W[:, 0]).solution[None]

    def solve_gradient(X, y, W):
        def objective(X):
            solution = xj.cg(lambda v: X.T @ (X @ v) + v, W[:, 0], rtol=1e-12).solution
            return jnp.sum(jnp.sin(solution))

        return jax.grad(objective)(X)

    def fit(X, y, W):
        return xj.fit_logistic_regression(X, y, K, l2=0.5, tol=1e-10).params[0][None]

    def fit_float32(X, y, W):
        # float32 data take the Kronecker preconditioner's branches, typed alike (`_manual`).
        X = jnp.asarray(X, jnp.float32)
        return xj.fit_logistic_regression(X, y, K, l2=0.5, solver="trust-region").params[0][None]

    def path(X, y, W):
        return xj.fit_regularization_path(X, y, K, l2_values=[1.0, 0.1], tol=1e-10).params[0]

    cases = {  # name: (function, check_vma, summed over the shards)
        "loss": (lambda X, y, W: xj.softmax_cross_entropy_with_integer_labels(X @ W, y), True, 0),
        "ggn_vp": (lambda X, y, W: xj.ggn_vp(linear, W, X, W)[None], True, 1),
        "head": (lambda X, y, W: xj.linear_softmax_cross_entropy(X, W, y)[None], True, 0),
        "cg": (solve, True, 0),
        "fit": (fit, True, 0),
        "fit float32": (fit_float32, True, 0),
        "path": (path, True, 0),
        "ggn_diagonal": (diagonal, True, 1),
        "ggn_diagonal_bartlett": (bartlett, True, 1),
        "ggn_diagonal_hutchinson": (hutchinson, True, 1),
        "ggn_diagonal from a closure": (closure_diagonal, True, 1),
        "grad through cg": (solve_gradient, True, 0),
        "ggn_vp unchecked": (lambda X, y, W: xj.ggn_vp(linear, W, X, W)[None], False, 0),
        "cg unchecked": (solve, False, 0),
        "ggn_diagonal unchecked": (diagonal, False, 0),
    }
    out["shard_map"] = {}
    for name, (function, check, summed) in cases.items():
        mapped = jax.jit(
            jax.shard_map(
                function, mesh=mesh, in_specs=(rows, rows, whole), out_specs=rows, check_vma=check
            )
        )(X, y, W)
        shards = jnp.stack([
            function(X[i * 250 : (i + 1) * 250], y[i * 250 : (i + 1) * 250], W) for i in range(8)
        ])
        if summed:
            shards = jnp.broadcast_to(shards.sum(axis=0), shards.shape)
        out["shard_map"][name] = relative(mapped, jnp.concatenate(shards))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def report(request):
    # The test processes' fast compilation (conftest.py): this child checks sharding, not
    # what a user's fresh process compiles.
    env = dict(os.environ, XLA_FLAGS=request.config.test_xla_flags)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_sharded_fits_equal_the_one_device_fit(report):
    assert report["devices"] == 8
    for name, (coef, intercept, n_iter, n_iter_one, converged) in report["fits"].items():
        assert converged, name
        assert coef <= 1e-10 and intercept <= 1e-10, (name, coef, intercept)
        assert n_iter == n_iter_one, name


@pytest.mark.subprocess
def test_sharded_path_on_an_explicit_mesh_equals_the_one_device_path(report):
    relative, converged = report["path"]
    assert converged and relative <= 1e-10, report["path"]


@pytest.mark.subprocess
def test_unpenalised_weighted_fit_on_an_explicit_mesh_equals_the_one_device_fit(report):
    relative, converged = report["unpenalised"]
    assert converged and relative <= 1e-10, report["unpenalised"]


@pytest.mark.subprocess
def test_warm_start_and_streamed_fit_on_an_explicit_mesh(report):
    for relative in report["explicit init and streamed"]:
        assert relative <= 1e-10, report["explicit init and streamed"]


@pytest.mark.subprocess
def test_integer_losses_beyond_32_classes_on_an_explicit_mesh(report):
    for name, relative in report["explicit integer"].items():
        assert relative <= 1e-13, (name, relative)


@pytest.mark.subprocess
def test_one_all_reduce_of_the_parameter_block_per_product_and_no_gather(report):
    names = [name for _, name in report["collectives"]]
    assert names == ["all-reduce"], report["collectives"]
    # The reduced block is the d×K product Xᵀ·U together with the intercept's K sums.
    shape = report["collectives"][0][0]
    assert "[12,4]" in shape and "[4]" in shape, shape


@pytest.mark.subprocess
def test_validation_finds_bad_values_in_any_shard(report):
    assert report["nan_error"] is not None and "NaN" in report["nan_error"]


@pytest.mark.subprocess
def test_estimator_splits_rows_over_devices(report):
    coef, n_iter, n_iter_one = report["estimator"]
    assert coef <= 1e-10 and n_iter == n_iter_one
    assert report["verbose"] == list(range(n_iter + 1))
    assert report["too_many"] is not None and "available" in report["too_many"]
    coef, score = report["ids"]
    assert coef <= 1e-10 and 0 < score <= 1
    assert report["twice"] is not None and "more than once" in report["twice"]


@pytest.mark.subprocess
def test_inside_shard_map(report):
    # A float32 fit compiled inside `shard_map` rounds differently from the same fit alone
    # (8.6e-8 relative since the fits go on to the precision floor at their point): it agrees
    # to float32's precision; everything else to the last bits.
    limits = {"fit float32": 1e-6}
    errors = report["shard_map"]
    assert all(error <= limits.get(name, 1e-12) for name, error in errors.items()), errors


def test_estimator_refuses_to_split_sparse_rows_over_devices():
    import scipy.sparse

    from xentropy_jax.sklearn import LogisticRegression

    X = scipy.sparse.random(40, 5, density=0.3, format="csr", random_state=0)
    y = [0, 1, 2, 0] * 10
    with pytest.raises(ValueError, match="devices= splits dense X only"):
        LogisticRegression(devices=1).fit(X, y)


def test_estimator_refuses_a_boolean_device_count():
    # True is an int to Python (and to the parameter check): it was taken as one device.
    import numpy as np

    from xentropy_jax.sklearn import LogisticRegression

    X = np.random.default_rng(0).normal(size=(40, 3))
    y = [0, 1, 2, 0] * 10
    with pytest.raises(ValueError, match="not a number of devices"):
        LogisticRegression(devices=True).fit(X, y)


def test_explicit_mesh_arrays_inside_jit_get_a_clear_error():
    # Eagerly, arrays on Explicit mesh axes are moved to Auto axes; traced inside a caller's jit
    # their sharding is part of the trace, and the fit failed deep inside JAX with a
    # ShardingTypeError. It now says what to do.
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    import xentropy_jax as xj

    mesh = jax.make_mesh((1,), ("rows",), axis_types=(AxisType.Explicit,))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    X = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(40, 3))), rows)
    y = jax.device_put(jnp.arange(40) % 3, rows)
    eager = xj.fit_logistic_regression(X, y, 3, l2=1e-2)
    assert int(eager.status) == xj.Status.CONVERGED
    with pytest.raises(ValueError, match="Explicit mesh axes"):
        jax.jit(lambda X, y: xj.fit_logistic_regression(X, y, 3, l2=1e-2).loss)(X, y)
