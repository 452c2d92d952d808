"""Newton-CG's preconditioners on the data people bring, against scikit-learn's solvers.

For each problem (float64, tol = 1e-6, scikit-learn's objective with C = 1/(l2·N)) it prints our
iterations, Hessian products and repeat-fit time with each preconditioner ("auto" is what the
estimator uses), scikit-learn's lbfgs and newton-cg times on the same data, and the ratio of
"auto" to the faster of the two that converged (of the two, when neither did; flagged when
"auto" itself did not converge). Times are minima over interleaved single calls. Each
scikit-learn fit's objective is compared with that of our "auto" fit (MISMATCH when ours is
higher by more than ``OBJECTIVE_RTOL`` relative; a higher one of theirs is noted).

Problems: raw (unstandardised) digits at two penalties, standardised digits, raw wine,
`make_classification` as it comes and with its columns scaled by 10^±3, and
Gaussian class means with many classes.

Run: ``python benchmarks/bench_preconditioners.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from _common import interleaved_min_times, machine_info  # noqa: E402
from bench_data import _objective, gaussian_means  # noqa: E402
from sklearn.datasets import load_digits, load_wine, make_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import xentropy_jax as xj  # noqa: E402

TOL = 1e-6
KINDS = ("auto", "kronecker", "diagonal", "none")
MAX_ITER = 200  # for both sides: a solver that needs more is reported as not converged
OBJECTIVE_RTOL = 1e-6  # scikit-learn's objective against ours, relative


def problems():
    """(name, X, y, l2)."""
    digits, digit_labels = load_digits(return_X_y=True)
    yield "digits, raw pixels", digits, digit_labels, 1e-3
    yield "digits, raw pixels, weak penalty", digits, digit_labels, 1e-5
    yield "digits, standardised", StandardScaler().fit_transform(digits), digit_labels, 1e-4
    wine, wine_labels = load_wine(return_X_y=True)
    yield "wine, raw", wine, wine_labels, 1e-3
    X, y = make_classification(20_000, 100, n_informative=40, n_classes=10, random_state=0)
    yield "make_classification 20000 x 100, K = 10", X, y, 1e-4
    X, y = make_classification(5_000, 50, n_informative=20, n_classes=5, random_state=0)
    X = X * 10.0 ** np.random.default_rng(0).uniform(-3, 3, X.shape[1])
    yield "the same 5000 x 50, K = 5, columns scaled by 10^U(-3, 3)", X, y, 1e-4
    X, y = gaussian_means(5_000, 128, 200)
    yield "Gaussian class means 5000 x 128, K = 200", X, y, 1 / 5_000


def compare(name, X, y, l2, repeats):
    """Print our fit with each preconditioner and scikit-learn's two solvers on one problem."""
    k = int(y.max()) + 1
    print(f"\n== {name}: X {X.shape}, K = {k}, l2 = {l2:g}, tol = {TOL}")
    results, fns, unconverged, fitted = {}, {}, set(), {}
    for kind in KINDS:
        solver = xj.NewtonCG(preconditioner=kind)

        def ours(solver=solver, kind=kind):
            result = xj.fit_logistic_regression(
                X, y, k, l2=l2, tol=TOL, solver=solver, max_iter=MAX_ITER, throw=False
            )
            results[kind] = jax.block_until_ready(result)

        ours()  # compile
        fns[kind] = ours
    for solver_name in ("lbfgs", "newton-cg"):

        def theirs(solver_name=solver_name):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                fitted[solver_name] = LogisticRegression(
                    C=1 / (l2 * len(y)), tol=TOL, solver=solver_name, max_iter=MAX_ITER
                ).fit(X, y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                unconverged.add(f"sklearn {solver_name}")

        fns[f"sklearn {solver_name}"] = theirs
    times = interleaved_min_times(fns, repeats=repeats, warmup=0)
    for kind in KINDS:
        result = results[kind]
        print(
            f"  {kind:<10s} {int(result.n_iter):4d} iterations "
            f"{int(result.n_hessian_products):6d} Hessian products "
            f"{1e3 * times[kind]:9.1f} ms  {xj.Status(int(result.status)).name}"
        )
    C = 1 / (l2 * len(y))
    weights, intercept = (np.asarray(a) for a in results["auto"].params)
    ours = _objective(X, y, weights.T, intercept, C)
    keys = ("sklearn lbfgs", "sklearn newton-cg")
    best = min([key for key in keys if key not in unconverged] or keys, key=times.get)
    for key in keys:
        model = fitted[key.removeprefix("sklearn ")]
        relative = (_objective(X, y, model.coef_, model.intercept_, C) - ours) / ours
        flag = "  NOT CONVERGED" if key in unconverged else ""
        if relative < -OBJECTIVE_RTOL:
            flag += "  MISMATCH: our objective is higher"
        elif relative > OBJECTIVE_RTOL:
            flag += "  (above our objective)"
        print(
            f"  {key:<20s} {1e3 * times[key]:9.1f} ms  objective - ours (auto) relative "
            f"{relative:+.1e}{flag}"
        )
    status = xj.Status(int(results["auto"].status)).name
    flag = "" if results["auto"].converged else f"  AUTO NOT CONVERGED ({status})"
    print(f"  ratio auto / {best} = {times['auto'] / times[best]:.2f}{flag}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run the problems whose name contains this")
    args = parser.parse_args()
    print(machine_info())
    for name, X, y, l2 in problems():
        if args.only in name:
            compare(name, X, y, l2, args.repeats)


if __name__ == "__main__":
    main()
