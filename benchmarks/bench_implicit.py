"""Derivatives through a fit (implicit differentiation) against the fit itself.

One problem, ``make_classification(n_samples, n_features, n_informative=n_features // 2,
n_classes)`` split into a training and a validation half, l2 = 1e-3, tol = 1e-8, float64. Timed,
each compiled once and then called interleaved (minimum of the repeats):

- ``fit``: the fit alone (its parameters);
- ``jvp l2``: the fit and d(params)/d(l2) along one tangent (``jax.jvp``: one CG solve);
- ``grad l2``: the validation loss and its gradient in l2 (``jax.grad``: one CG solve);
- ``grad X, w, l2``: the validation loss and its gradient in the training X, the sample
  weights and l2 together (still one CG solve, then one product with ∂g/∂x transposed);
- ``two refits``: what a central finite difference in l2 costs.

The implicit derivative d(params)/d(l2) is checked against that central difference (l2 times
and divided by ``FD_STEP``, truncation error about (FD_STEP − 1)² relative): the largest
difference over the largest entry is printed, MISMATCH beyond ``FD_RTOL``. Then the float32
derivative against the float64 one (relative to the largest entry), both fits converged to their
floors. Run ``python benchmarks/bench_implicit.py`` (``--quick`` for a smaller problem).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from _common import format_times, interleaved_min_times, machine_info, ratio_table
from sklearn.datasets import make_classification

import xentropy_jax as xj

jax.config.update("jax_enable_x64", True)

L2 = 1e-3
TOL = 1e-8
FD_STEP = 1.001  # the two refits at l2·FD_STEP and l2/FD_STEP
FD_RTOL = 1e-4  # 100 x the step's O(1e-6) truncation error, room for the fits' own tolerance


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows, features, classes = (4_000, 20, 4) if args.quick else (40_000, 50, 8)
    X, y = make_classification(
        2 * rows, features, n_informative=features // 2, n_classes=classes, random_state=0
    )
    X = (X - X.mean(0)) / X.std(0)
    X_train, y_train, X_valid, y_valid = X[:rows], y[:rows], X[rows:], y[rows:]
    weights = np.ones(rows)
    print(machine_info())
    print(f"\n== X {X_train.shape}, K = {classes}, l2 = {L2:g}, tol = {TOL:g}")

    def params(X, weights, l2):
        result = xj.fit_logistic_regression(
            X, y_train, classes, sample_weight=weights, l2=l2, tol=TOL, throw=False
        )
        return result.params

    def validation_loss(X, weights, l2):
        W, b = params(X, weights, l2)
        log_probs = jax.nn.log_softmax(X_valid @ W + b)
        return -jnp.mean(jnp.take_along_axis(log_probs, y_valid[:, None], axis=1))

    fit = jax.jit(params)
    jvp_l2 = jax.jit(lambda X, w, l2: jax.jvp(lambda t: params(X, w, t), (l2,), (1.0,)))
    grad_l2 = jax.jit(jax.value_and_grad(validation_loss, argnums=2))
    grad_all = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1, 2)))
    inputs = (jnp.asarray(X_train), jnp.asarray(weights), jnp.asarray(L2))
    result = xj.fit_logistic_regression(X_train, y_train, classes, l2=L2, tol=TOL)
    print(f"fit: {int(result.n_iter)} iterations, {int(result.n_hessian_products)} products")
    times = interleaved_min_times(
        {
            "fit": lambda: fit(*inputs),
            "jvp l2": lambda: jvp_l2(*inputs),
            "grad l2": lambda: grad_l2(*inputs),
            "grad X, w, l2": lambda: grad_all(*inputs),
            "two refits": lambda: (fit(*inputs[:2], L2 * FD_STEP), fit(*inputs[:2], L2 / FD_STEP)),
        },
        repeats=args.repeats,
    )
    print(format_times(times))
    print(
        ratio_table(
            times,
            [
                ("jvp l2", "fit"),
                ("grad l2", "fit"),
                ("grad X, w, l2", "fit"),
                ("two refits", "fit"),
            ],
        )
    )
    implicit = jvp_l2(*inputs)[1]
    above, below = fit(*inputs[:2], L2 * FD_STEP), fit(*inputs[:2], L2 / FD_STEP)
    for name, derivative, a, b in zip(["dW/dl2", "db/dl2"], implicit, above, below, strict=True):
        difference = (a - b) / (L2 * FD_STEP - L2 / FD_STEP)
        error = float(jnp.max(jnp.abs(derivative - difference)) / jnp.max(jnp.abs(derivative)))
        flag = "ok" if error <= FD_RTOL else "MISMATCH"
        print(
            f"implicit {name} vs the two refits' central difference: max difference / max "
            f"|implicit| = {error:.2e} (tolerance {FD_RTOL:g}) {flag}"
        )

    exact = jax.jacfwd(lambda l2: params(X_train, weights, l2))(L2)
    single = jax.jacfwd(
        lambda l2: params(X_train.astype(np.float32), weights.astype(np.float32), l2)
    )(np.float32(L2))
    for name, a, b in zip(["dW/dl2", "db/dl2"], single, exact, strict=True):
        error = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        print(f"float32 {name}: max error / max|float64| = {error:.2e}")


if __name__ == "__main__":
    main()
