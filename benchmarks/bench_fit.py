"""Fitting multinomial logistic regression: xentropy_jax's estimator against scikit-learn.

Three cases, each in this one process:

1. ``make_classification(n_samples=100_000, n_features=100, n_informative=60, n_classes=10)``
   with C=1, tol=1e-8: our first fit (compilation included), our repeat fit, and
   scikit-learn's ``lbfgs``, ``newton-cg`` and ``newton-cholesky``; every fit must reach the
   same coefficients (to 1e-5 relative).
2. A wide problem, 5,000 x 500 with K=20, where ``newton-cholesky`` must factor a
   10,020 x 10,020 Hessian at every iteration.
3. The unpenalised fit against statsmodels' ``MNLogit`` (Newton) on a size it can finish.

Run ``python benchmarks/bench_fit.py`` (about 15 minutes on two cores, most of it in
scikit-learn's ``lbfgs`` and ``newton-cholesky`` on the wide case) or ``--quick`` for smaller
sizes. Times are the minimum over interleaved repeats (``--repeats``, default 1 at full size);
the first fit is one call, the first use of the solver in the process.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np
from _common import format_times, interleaved_min_times, machine_info
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression as SklearnLogisticRegression

import xentropy_jax as xj
from xentropy_jax.sklearn import LogisticRegression

TOL = 1e-8
COEF_RTOL = 1e-5
LLF_RTOL = 1e-10  # statsmodels' log-likelihood against ours, relative


def _coefficients(model) -> np.ndarray:
    return np.hstack([model.coef_, model.intercept_[:, None]])


def _relative_difference(model, reference: np.ndarray) -> float:
    return float(np.max(np.abs(_coefficients(model) - reference)) / np.max(np.abs(reference)))


def _work(X, y, solver: str) -> tuple[int, int]:
    """(iterations, Hessian products) of our fit at C = 1, rerun functionally.

    The estimator reports only ``n_iter_``: ``fit_logistic_regression`` on the same objective
    (l2 = 1/(C·N), float64, the estimator's solver) also counts its Hessian products.
    """
    with jax.enable_x64(True):
        result = xj.fit_logistic_regression(
            X, y, int(y.max()) + 1, l2=1.0 / len(y), tol=TOL, max_iter=200, solver=solver
        )
    return int(result.n_iter), int(result.n_hessian_products)


def _timed(fit):
    start = time.perf_counter()
    model = fit()
    return model, time.perf_counter() - start


def compare_with_scikit_learn(title: str, X, y, sklearn_solvers: list[str], repeats: int):
    """Time our first and repeat fits and scikit-learn's solvers; compare coefficients."""
    print(f"\n== {title}: X {X.shape}, K = {np.unique(y).size}, C = 1, tol = {TOL:g}")

    def ours():
        return LogisticRegression(C=1.0, tol=TOL, max_iter=200).fit(X, y)

    def theirs(name):
        return lambda: SklearnLogisticRegression(C=1.0, tol=TOL, solver=name, max_iter=10_000).fit(
            X, y
        )

    models, warned = {}, set()

    def run(name, fit):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            models[name] = fit()  # the last model of each, to compare coefficients
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            warned.add(name)

    first_model, first = _timed(ours)
    fits = {"xentropy_jax (repeat fit)": ours}
    fits.update({f"sklearn {name}": theirs(name) for name in sklearn_solvers})
    times = interleaved_min_times(
        {name: lambda name=name, fit=fit: run(name, fit) for name, fit in fits.items()},
        repeats=repeats,
        warmup=0,
    )
    times = {"xentropy_jax (first fit, compile included)": first, **times}
    print(format_times(times))
    iterations, products = _work(X, y, first_model.solver_)
    print(
        f"  our solver: {first_model.solver_}, n_iter_ = {first_model.n_iter_[0]}; Hessian "
        f"products {products} (counted by fit_logistic_regression, {iterations} iterations)"
    )

    reference = _coefficients(models["xentropy_jax (repeat fit)"])
    print("  max |coef - ours| / max |ours| (must be <= 1e-5):")
    same = []
    for name, model in models.items():
        difference = _relative_difference(model, reference)
        if name in warned:
            flag = "NOT CONVERGED"
        elif difference > COEF_RTOL:
            flag = "DIFFERENT (stopped early by its own criterion)"
        else:
            flag = "ok"
            same.append(name)
        print(f"    {name:<44s} {difference:9.2e}  n_iter_ {int(model.n_iter_[0]):5d}  {flag}")

    candidates = [name for name in same if name.startswith("sklearn ")]
    if not candidates:
        print("  no scikit-learn solver reached the same coefficients: no ratio")
        return
    fastest = min(candidates, key=times.get)
    print(
        f"  ratios to the fastest scikit-learn fit with the same coefficients, {fastest} "
        "(targets: first <= 0.8, repeat <= 0.5):"
    )
    for name in ("xentropy_jax (first fit, compile included)", "xentropy_jax (repeat fit)"):
        print(f"    {name:<44s} {times[name] / times[fastest]:6.3f}")


def compare_with_statsmodels(n_samples: int, n_features: int, n_classes: int, repeats: int):
    import statsmodels.api as sm

    X, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=n_features,
        n_redundant=0,
        n_classes=n_classes,
        flip_y=0.2,
        random_state=0,
    )
    exog = sm.add_constant(X)
    print(f"\n== unpenalised maximum likelihood: X {X.shape}, K = {n_classes}")

    def ours():
        return LogisticRegression(penalty=None, tol=TOL).fit(X, y)

    def theirs():
        return sm.MNLogit(y, exog).fit(method="newton", maxiter=100, tol=1e-10, disp=0)

    model, first = _timed(ours)
    result = theirs()
    times = interleaved_min_times(
        {
            "xentropy_jax penalty=None (repeat fit)": lambda: (ours(), None)[1],
            "statsmodels MNLogit newton": lambda: (theirs(), None)[1],
        },
        repeats=repeats,
        warmup=0,
    )
    times = {"xentropy_jax penalty=None (first fit)": first, **times}
    print(format_times(times))
    log_likelihood = model.predict_log_proba(X)[np.arange(y.size), y].sum()
    difference = abs(log_likelihood - result.llf) / abs(result.llf)
    print(
        f"  log-likelihood: ours {log_likelihood:.10f}, statsmodels {result.llf:.10f} "
        f"(relative difference {difference:.1e}, must be <= {LLF_RTOL:g}) "
        + ("ok" if difference <= LLF_RTOL else "MISMATCH")
    )
    relative = np.vstack(
        [model.intercept_[1:] - model.intercept_[0], (model.coef_[1:] - model.coef_[0]).T]
    )
    difference = np.max(np.abs(relative - result.params)) / np.max(np.abs(result.params))
    print(
        f"  max |params - statsmodels| / max |statsmodels| = {difference:.1e} (must be <= "
        f"{COEF_RTOL:g}) " + ("ok" if difference <= COEF_RTOL else "MISMATCH")
    )
    if not result.mle_retvals["converged"]:
        print("  statsmodels MNLogit did NOT converge")
    ratio = times["xentropy_jax penalty=None (repeat fit)"] / times["statsmodels MNLogit newton"]
    print(f"  repeat fit / statsmodels = {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats")
    parser.add_argument("--skip-wide", action="store_true", help="skip the wide case")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 1)

    print(machine_info())
    start = time.perf_counter()
    jax.numpy.zeros(1).block_until_ready()  # backend start-up is not part of any fit
    print(f"jax backend start-up: {time.perf_counter() - start:.3f} s")

    if args.quick:
        main_case = dict(n_samples=10_000, n_features=50, n_informative=30, n_classes=5)
        wide = dict(n_samples=1_000, n_features=200, n_informative=100, n_classes=10)
        statsmodels_size = (5_000, 10, 4)
    else:
        main_case = dict(n_samples=100_000, n_features=100, n_informative=60, n_classes=10)
        wide = dict(n_samples=5_000, n_features=500, n_informative=200, n_classes=20)
        statsmodels_size = (20_000, 20, 5)

    solvers = ["lbfgs", "newton-cg", "newton-cholesky"]
    X, y = make_classification(**main_case, random_state=0)
    compare_with_scikit_learn("main case", X, y, solvers, repeats)
    if not args.skip_wide:
        # newton-cholesky factors a 10,020 x 10,020 Hessian per iteration here.
        X, y = make_classification(**wide, random_state=0)
        compare_with_scikit_learn("wide case", X, y, solvers, repeats)
    compare_with_statsmodels(*statsmodels_size, repeats=repeats)


if __name__ == "__main__":
    main()
