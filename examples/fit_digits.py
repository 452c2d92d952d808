"""Newton fit of scikit-learn's digits, side by side with scikit-learn: accuracy, iterations, time.

Multinomial logistic regression (10 classes, 64 pixels, L2 penalty C = 1) on the standardised
digits, fitted to the optimum by ``xentropy_jax.sklearn.LogisticRegression`` and by
scikit-learn's own solvers at the same C and a tight tolerance. Fit times are the minimum of
interleaved repeats after a warm-up fit (our first fit compiles; refits of the same shape do not).
The printed table also shows each fit's objective and its largest gradient entry, computed
independently in NumPy, so that "converged" means the same thing for every row.

Run: ``python examples/fit_digits.py`` (``XENTROPY_SMALL=1`` shrinks the data and repeats).
"""

from __future__ import annotations

import os
import time
import warnings

import jax
import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from xentropy_jax.sklearn import LogisticRegression

SMALL = os.environ.get("XENTROPY_SMALL") == "1"
C = 1.0
TOL = 1e-8


def penalised_objective(coef, intercept, inputs, labels, C) -> tuple[float, float]:
    """scikit-learn's objective mean CE + ‖W‖²/(2CN) and its max |gradient|, for coef [K, d]."""
    num_rows = inputs.shape[0]
    l2 = 1.0 / (C * num_rows)
    logits = inputs @ coef.T + intercept
    rows = np.arange(num_rows)
    loss = -np.mean(log_softmax(logits, axis=1)[rows, labels]) + 0.5 * l2 * np.sum(coef**2)
    residual = softmax(logits, axis=1)
    residual[rows, labels] -= 1
    grad_coef = residual.T @ inputs / num_rows + l2 * coef
    return loss, max(np.abs(grad_coef).max(), np.abs(residual.mean(0)).max())


def main() -> None:
    # JAX's persistent compilation cache: a second run loads the compiled programs from disk
    # instead of compiling them again (JAX_COMPILATION_CACHE_DIR, when set, takes precedence).
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jax"))
    inputs, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        inputs, labels, test_size=0.25, random_state=0, stratify=labels
    )
    if SMALL:
        train_x, train_y = train_x[:400], train_y[:400]
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    repeats = 2 if SMALL else 7

    models = {
        "xentropy_jax newton-cg": lambda: LogisticRegression(C=C, solver="newton-cg", tol=TOL),
        "xentropy_jax trust-region": lambda: LogisticRegression(
            C=C, solver="trust-region", tol=TOL
        ),
        "xentropy_jax newton": lambda: LogisticRegression(C=C, solver="newton", tol=TOL),
        "sklearn lbfgs": lambda: SklearnLogisticRegression(C=C, tol=TOL, max_iter=10_000),
        "sklearn newton-cg": lambda: SklearnLogisticRegression(
            C=C, solver="newton-cg", tol=TOL, max_iter=1000
        ),
        "sklearn newton-cholesky": lambda: SklearnLogisticRegression(
            C=C, solver="newton-cholesky", tol=TOL, max_iter=1000
        ),
    }
    print(f"jax {jax.__version__} on {jax.devices()}; {os.cpu_count()} CPU cores")
    print(
        f"digits: {train_x.shape[0]} training / {test_x.shape[0]} test rows, "
        f"{train_x.shape[1]} features, 10 classes; C = {C}, tol = {TOL}"
    )
    fitted, first, best = {}, {}, dict.fromkeys(models, np.inf)
    for name, make in models.items():
        start = time.perf_counter()
        fitted[name] = make().fit(train_x, train_y)
        first[name] = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a non-converged fit would spoil the comparison
        for _ in range(repeats):
            for name, make in models.items():
                start = time.perf_counter()
                make().fit(train_x, train_y)
                best[name] = min(best[name], time.perf_counter() - start)

    reference = fitted["sklearn newton-cholesky"]
    print(
        f"\n{'model':26s} {'iters':>5s} {'fit ms':>8s} {'1st fit ms':>10s} {'objective':>16s} "
        f"{'max|grad|':>9s} {'train acc':>9s} {'test acc':>8s} {'max|Δcoef|':>10s}"
    )
    for name, model in fitted.items():
        loss, grad = penalised_objective(model.coef_, model.intercept_, train_x, train_y, C)
        print(
            f"{name:26s} {int(np.max(model.n_iter_)):5d} {1e3 * best[name]:8.1f} "
            f"{1e3 * first[name]:10.1f} {loss:16.12f} {grad:9.1e} "
            f"{model.score(train_x, train_y):9.4f} {model.score(test_x, test_y):8.4f} "
            f"{np.abs(model.coef_ - reference.coef_).max():10.1e}"
        )
    print(
        "\nfit ms: minimum over interleaved refits; 1st fit ms includes our one-off compilation. "
        "max|Δcoef| is against sklearn newton-cholesky."
    )


if __name__ == "__main__":
    main()
