"""Inputs that differ only in their types, or by a few rows, share one compiled program."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentropy_jax as xj
from xentropy_jax import _buckets
from xentropy_jax import _inference_core as core
from xentropy_jax.solvers import _fit as fit_module
from xentropy_jax.solvers import _path as path_module

jax.config.update("jax_enable_x64", True)

NUM_CLASSES = 3


def _data(num_rows, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(num_rows, 4)).astype(dtype)
    y = rng.integers(0, NUM_CLASSES, num_rows)
    return X, y


@contextlib.contextmanager
def no_new_program(function):
    """Assert that the jitted `function` compiled no new program inside the block."""
    size = function._cache_size()
    yield
    assert function._cache_size() == size


def test_fit_types_that_do_not_matter_share_the_program():
    # Each of these compiled its own program of the solver (1.6–4 s).
    X, y = _data(60)
    weights = np.random.default_rng(1).integers(1, 4, 60)
    options = dict(l2=0.01, tol=1e-8)
    reference = xj.fit_logistic_regression(X, y, NUM_CLASSES, max_iter=100, **options)
    weighted = xj.fit_logistic_regression(X, y, NUM_CLASSES, sample_weight=weights * 1.0, **options)
    init = tuple(np.asarray(part) for part in reference.params)
    warm = xj.fit_logistic_regression(X, y, NUM_CLASSES, init=init, **options)
    with no_new_program(fit_module._fit):
        again = [
            xj.fit_logistic_regression(X, y, NUM_CLASSES, max_iter=np.int64(100), **options),
            xj.fit_logistic_regression(X, y.astype(np.uint8), NUM_CLASSES, **options),
            xj.fit_logistic_regression(X, y.astype(np.int32), NUM_CLASSES, **options),
        ]
        same_weights = [
            xj.fit_logistic_regression(X, y, NUM_CLASSES, sample_weight=w, **options)
            for w in (weights, weights.astype(np.float32))
        ]
        warm_f32 = xj.fit_logistic_regression(
            X, y, NUM_CLASSES, init=tuple(p.astype(np.float32) for p in init), **options
        )
    for result in again:
        np.testing.assert_array_equal(result.params[0], reference.params[0])
    for result in same_weights:
        np.testing.assert_array_equal(result.params[0], weighted.params[0])
    np.testing.assert_allclose(warm_f32.params[0], warm.params[0], atol=1e-6)


def test_path_types_that_do_not_matter_share_the_program():
    X, y = _data(60)
    l2_values = np.array([1.0, 0.1, 0.01])
    reference = xj.fit_regularization_path(X, y, NUM_CLASSES, l2_values, tol=1e-8, max_iter=50)
    with no_new_program(path_module._path):
        results = [
            xj.fit_regularization_path(
                X, y, NUM_CLASSES, l2_values, tol=np.float64(1e-8), max_iter=np.int64(50)
            ),
            xj.fit_regularization_path(
                X, y.astype(np.int32), NUM_CLASSES, l2_values.astype(np.float32), tol=1e-8
            ),
        ]
    np.testing.assert_array_equal(results[0].params[0], reference.params[0])
    np.testing.assert_allclose(results[1].params[0], reference.params[0], atol=1e-6)


def test_labels_beyond_int32_still_fail_under_jit():
    # Concrete labels become int32 after their range check; traced ones keep their type, so the
    # check inside `jit` still sees a label that int32 would wrap into range.
    X, y = _data(40)
    labels = y.astype(np.int64)
    labels[3] = 2**32 + 1

    @jax.jit
    def status(labels):
        return xj.fit_logistic_regression(X, labels, NUM_CLASSES, l2=0.1, throw=False).status

    assert int(status(labels)) == xj.Status.INVALID_LABELS


def test_inference_row_counts_share_the_sums(monkeypatch):
    # Each new row count compiled the dense sums (0.8–1 s) and the robust ones again.
    X, y = _data(510, seed=2)
    sizes = (480, 500, 510)
    assert len({_buckets.padded_rows(n) for n in sizes}) == 1
    groups = np.arange(510) % 7

    def inference(n):
        fit = xj.fit_logistic_regression(
            X[:n], y[:n], NUM_CLASSES, reference_class=True, solver="newton", tol=1e-12
        )
        return [
            xj.logit_inference(fit, X[:n], y[:n], cov_type=cov, marginal_effects=True, **kw)
            for cov, kw in (("nonrobust", {}), ("HC0", {}), ("cluster", {"groups": groups[:n]}))
        ]

    inference(sizes[0])
    with no_new_program(core.dense_sums), no_new_program(core.margin_sums):
        padded = [inference(n) for n in sizes[1:]]
    # The zero-weight rows change nothing: the same results on the rows alone.
    monkeypatch.setattr(xj._inference, "fitted_rows", lambda n, configuration: n)
    for n, results in zip(sizes[1:], padded, strict=True):
        for ours, exact in zip(results, inference(n), strict=True):
            np.testing.assert_allclose(ours.bse, exact.bse, rtol=1e-9)
            np.testing.assert_allclose(ours.llf, exact.llf, rtol=1e-12)
            np.testing.assert_allclose(ours.margins.bse, exact.margins.bse, rtol=1e-9)


@pytest.mark.parametrize("count", [1, 7, 33, 1000, 1025, 5000])
def test_padded_rows_are_a_bucket_at_least_as_large(count):
    padded = _buckets.padded_rows(count)
    assert padded >= max(count, _buckets.MIN_ROWS)
    assert _buckets.padded_rows(padded) == padded


def test_no_trace_is_kept_alive():
    # The operator caches recorded closures over a trace's values, and a preconditioner branch
    # closed over a traced array that the compiled jaxpr keeps: `jax.checking_leaks` raised for
    # CG under jit, and for fits under jit and grad.
    from xentropy_jax import _cg, _curvature, _seen

    A, b = np.array([[4.0, 1.0], [1.0, 3.0]]), np.array([1.0, 2.0])
    X, y = _data(40)
    W = np.zeros((4, NUM_CLASSES))
    with jax.checking_leaks():
        jax.jit(lambda A: xj.cg(lambda v: A @ v, b).solution)(A)
        jax.jvp(lambda A: xj.cg(lambda v: A @ v, b).solution, (A,), (A,))
        jax.jit(lambda X: xj.fit_logistic_regression(X, y, NUM_CLASSES, l2=0.1).params)(X)
        jax.grad(lambda X: xj.fit_logistic_regression(X, y, NUM_CLASSES, l2=0.1).loss)(X)
        jax.grad(lambda s: xj.ggn_vp(lambda p, x: s * (x @ p), W, X, W + 1).sum())(1.0)
    parts = [*(p for key in _cg._PROGRAMS.keys() for p in key), *_curvature._LINEARIZATIONS.keys()]
    assert not _seen.holds_tracer(*parts)


def test_programs_keep_a_bounded_number_of_operators_alive():
    # jax.jit with the operator as a static argument kept every operator used twice, with its
    # closure and compiled program, for the rest of the process (60 of 60 matrices of 60 outer
    # steps); the record of programs now keeps the last 16.
    import gc
    import weakref

    from xentropy_jax import _cg

    alive = []
    for step in range(20):
        matrix = jnp.asarray(np.eye(3) * (step + 2.0))
        alive.append(weakref.ref(matrix))

        def operator(v, matrix=matrix):
            return matrix @ v

        for rhs in (jnp.ones(3), jnp.arange(3.0)):
            result = xj.cg(operator, rhs, rtol=1e-12)
            np.testing.assert_allclose(result.solution, rhs / (step + 2.0), rtol=1e-10)
        del matrix, operator, result
    gc.collect()
    assert len(_cg._PROGRAMS) <= 16
    assert sum(ref() is not None for ref in alive) <= 16
    assert alive[0]() is None


def test_programs_from_several_threads():
    # A key's hash and comparison run Python code (a dataclass's), between which another
    # thread evicted the entry: a KeyError from ggn_vp and cg under threads.
    import dataclasses
    import random
    import sys
    import threading

    from xentropy_jax._seen import Programs

    @dataclasses.dataclass(frozen=True)
    class Scale:
        s: float

    programs = Programs(lambda key: lambda: key, size=16)
    keys = [Scale(float(i)) for i in range(20)]
    errors = []

    def work(seed):
        pick = random.Random(seed)
        try:
            for _ in range(50_000):
                key = keys[pick.randrange(len(keys))]
                program = programs(key)
                assert program is None or program() is key
        except Exception as error:  # collected for the assertion below
            errors.append(repr(error))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_first_sightings_do_not_evict_programs():
    # One-off lambdas filled the record and pushed out the program of the operator that comes
    # back at every step (it then compiled at every step: 0.33 s against 0.002 s).
    from xentropy_jax._seen import Programs

    programs = Programs(lambda key: lambda: key, size=2)
    assert programs("kept") is None
    kept = programs("kept")
    assert kept is not None and kept() == "kept"
    for once in range(5):
        assert programs(f"once {once}") is None
    assert programs("kept") is kept


@contextlib.contextmanager
def compilations():
    """The XLA compilations inside the block, as a list of log messages."""
    import logging

    found = []

    class Count(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage():
                found.append(record.getMessage())

    logger = logging.getLogger("jax")
    handler, level, propagate = Count(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        with jax.log_compiles(True):
            yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_eager_diagonals_optax_updates_and_the_head_compile_once():
    # Their scan and cond bodies were new functions at every eager call: one XLA compilation
    # (0.2-1 s) per call with the same shapes, where ggn_vp compiles once.
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    W = {"W": jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)}

    def model(p, x):
        return x @ p["W"]

    labels = jnp.asarray(rng.integers(0, 11, size=10))

    def head_mean(hidden, weight):
        return xj.linear_softmax_cross_entropy(hidden, weight, labels, reduction="mean")

    sophia = xj.scale_by_sophia_g()
    diagonal = xj.scale_by_ggn_diagonal()
    calls = {
        "ggn_diagonal": lambda i: xj.ggn_diagonal(model, {"W": W["W"] + i}, inputs),
        "sophia_g": lambda i: sophia.update(
            W, sophia.init(W), {"W": W["W"] + i}, logits_fn=model, inputs=inputs
        ),
        "ggn_diagonal_scaling": lambda i: diagonal.update(
            W, diagonal.init(W), {"W": W["W"] + i}, logits_fn=model, inputs=inputs
        ),
        "head_loss": lambda i: xj.linear_softmax_cross_entropy(
            inputs + i, W["W"], labels, reduction="mean"
        ),
        "head_losses": lambda i: xj.linear_softmax_cross_entropy(inputs + i, W["W"], labels),
        "head_gradient": lambda i: jax.grad(head_mean, (0, 1))(inputs + i, W["W"]),
        "head_ggn_vp": lambda i: xj.linear_softmax_cross_entropy_ggn_vp(
            inputs + i, W["W"], labels, (None, W["W"], None)
        ),
    }
    for name, call in calls.items():
        for i in range(2):  # the first sighting runs eagerly, the second compiles
            jax.block_until_ready(call(float(i)))
        with compilations() as found:
            for i in range(2, 5):
                jax.block_until_ready(call(float(i)))
        assert not found, (name, found)


def test_eager_soft_label_loss_beyond_the_select_size_compiles_once():
    # Beyond 2¹⁶ entries the CPU form checks its fused label sum for NaN in a `cond` whose
    # branches were closures over the call's arrays: every eager call compiled (75-115 ms).
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(300, 300)), jnp.float32)
    labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(300, 300)), jnp.float32))

    def total(z):
        return xj.softmax_cross_entropy(z, labels).sum()

    for _ in range(2):
        jax.block_until_ready((xj.softmax_cross_entropy(logits, labels), jax.grad(total)(logits)))
    shifted = [logits + i for i in range(3)]
    with compilations() as found:
        for z in shifted:
            jax.block_until_ready((xj.softmax_cross_entropy(z, labels), jax.grad(total)(z)))
    assert not found, found
