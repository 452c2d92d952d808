"""Fit plus statistical inference: xentropy_jax against statsmodels' MNLogit, and peak memory.

Two parts:

1. ``speed``: ``make_classification(100_000, 100, n_informative=60, n_classes=10,
   random_state=0)``, unpenalised. Ours: ``fit_logistic_regression`` (Newton-CG) followed by
   ``logit_inference`` (dense Hessian, 891 parameters) with average marginal effects, once
   cold (compilation included) and once warm. statsmodels: ``MNLogit(...).fit(method="newton")``
   from zeros with a capped ``maxiter`` (its own run, whether it converged and its time), then
   from our estimates (``start_params``) so that it finishes at the same optimum, to compare
   the standard errors. Its marginal effects are not run at this size (their complex-step
   Jacobian forms one N x (d·K) array per parameter).
2. ``memory`` (in a fresh process, for a clean peak RSS): 1,000,000 x 20, K = 5: fit, standard
   errors and marginal effects; prints the process's peak resident memory.

Run ``python benchmarks/bench_inference.py`` (both parts; ``--sm-maxiter`` caps statsmodels'
cold run, default 3), or ``--part speed`` / ``--part memory``; ``--quick`` shrinks the sizes.

``--full-statsmodels`` runs statsmodels from zeros to its own convergence (``maxiter`` 100)
instead, compares its params, bse and llf with ours, times our fit + standard errors with and
without marginal effects, and runs ``get_margeff`` only when its complex-step Jacobian (one
[N, d̃, K] float64 array per parameter) fits in memory. For a fair comparison run it on one
thread: ``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`` (printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from _common import machine_info  # noqa: E402
from sklearn.datasets import make_classification  # noqa: E402

import xentropy_jax as xj  # noqa: E402


def _clock():
    """(wall, CPU) seconds: on a shared machine the process CPU time is the steadier figure."""
    return np.array([time.perf_counter(), time.process_time()])


def _fmt(seconds):
    return f"{seconds[0]:.1f} s wall / {seconds[1]:.1f} s CPU"


def _ours(X, y, k):
    start = _clock()
    fit = xj.fit_logistic_regression(X, y, k, reference_class=True, tol=1e-8)
    jax.block_until_ready(fit)
    fitted = _clock()
    result = xj.logit_inference(fit, X, y, marginal_effects=True)
    done = _clock()
    return fit, result, fitted - start, done - fitted


def speed(n, d, informative, k, sm_maxiter, full=False):
    import statsmodels.api as sm
    from scipy.linalg import qr

    X, y = make_classification(n, d, n_informative=informative, n_classes=k, random_state=0)
    print(
        f"\n== speed: make_classification({n}, {d}, n_informative={informative}, "
        f"n_classes={k}, random_state=0), penalty=None, float64"
    )
    # make_classification adds n_redundant=2 exact linear combinations of the informative
    # columns: the Hessian is singular and no standard error exists. Drop them (pivoted QR).
    extended = np.column_stack([X, np.ones(n)])
    _, r, pivots = qr(extended, mode="economic", pivoting=True)
    rank = int(np.sum(np.abs(np.diag(r)) > 1e-10 * np.abs(r[0, 0])))
    dropped = sorted(int(j) for j in pivots[rank:] if j < d)
    X = np.delete(X, dropped, axis=1)
    n, d = X.shape
    print(
        f"[X, 1] has rank {rank} of {extended.shape[1]}: the collinear columns {dropped} are "
        f"dropped (no standard error exists with them); {d} features, "
        f"{(d + 1) * (k - 1)} parameters remain"
    )
    fit, result, fit_cold, inf_cold = _ours(X, y, k)
    fit, result, fit_warm, inf_warm = _ours(X, y, k)
    ours_total = fit_warm + inf_warm
    print(f"ours cold: fit {_fmt(fit_cold)} + inference {_fmt(inf_cold)} (compilation included)")
    print(
        f"ours warm: fit {_fmt(fit_warm)} + inference with margins {_fmt(inf_warm)} = "
        f"{_fmt(ours_total)}; converged={bool(fit.converged)} n_iter={int(fit.n_iter)} "
        f"max|grad|={float(fit.grad_norm):.1e}"
    )
    exog = np.column_stack([X, np.ones(n)])
    model = sm.MNLogit(y, exog)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = _clock()
        cold = model.fit(method="newton", maxiter=sm_maxiter, disp=0)
        bse = np.asarray(cold.bse)
        sm_cold = _clock() - start
    print(
        f"statsmodels from zeros, maxiter={sm_maxiter}: {_fmt(sm_cold)}, converged="
        f"{cold.mle_retvals['converged']}, iterations={cold.mle_retvals['iterations']}, "
        f"finite standard errors: {np.isfinite(bse).all()}"
    )
    if full:
        _full_comparison(X, y, fit, result, fit_warm, ours_total, cold, sm_cold)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = _clock()
        warm = model.fit(method="newton", maxiter=10, disp=0, start_params=result.params.T.ravel())
        bse = np.asarray(warm.bse)
        sm_warm = _clock() - start
    difference = float(np.max(np.abs(bse - result.bse) / bse))
    print(
        f"statsmodels from our optimum: {_fmt(sm_warm)}, converged="
        f"{warm.mle_retvals['converged']}, iterations={warm.mle_retvals['iterations']}; "
        f"largest relative difference of standard errors: {difference:.2e}"
    )
    per_iteration = sm_cold / max(1, cold.mle_retvals["iterations"])
    state = "converged" if cold.mle_retvals["converged"] else "did NOT converge"
    for label, index in (("wall", 0), ("CPU", 1)):
        print(
            f"[{label}] ours (fit + SEs + margins) / statsmodels cold run ({state}): "
            f"{ours_total[index] / sm_cold[index]:.4f} "
            f"({sm_cold[index] / ours_total[index]:.1f}x faster); / statsmodels started at "
            f"our optimum (its SEs only): {ours_total[index] / sm_warm[index]:.4f} "
            f"({sm_warm[index] / ours_total[index]:.1f}x); statsmodels per Newton iteration "
            f"~{per_iteration[index]:.1f} s"
        )


def _full_comparison(X, y, fit, result, fit_time, ours_total, sm_fit, sm_time):
    """statsmodels run to its end, then its marginal effects, side by side with ours."""
    start = _clock()
    jax.block_until_ready(xj.logit_inference(fit, X, y).bse)
    ours_se = fit_time + _clock() - start
    _compare("statsmodels from zeros", sm_fit, result)
    state = "converged" if sm_fit.mle_retvals["converged"] else "did NOT converge"
    print(f"ours warm without margins: fit + SEs {_fmt(ours_se)}")
    for label, index in (("wall", 0), ("CPU", 1)):
        print(
            f"[{label}] ours (fit + SEs) / statsmodels from zeros ({state}, fit + SEs): "
            f"{ours_se[index] / sm_time[index]:.4f} ({sm_time[index] / ours_se[index]:.1f}x "
            f"faster); ours (fit + SEs + marginal effects) / the same: "
            f"{ours_total[index] / sm_time[index]:.4f}"
        )
    # get_margeff differentiates by complex steps (statsmodels.tools.numdiff.approx_fprime_cs)
    # and keeps one [N, d̃, K] float64 array per parameter before averaging over the rows.
    n, num_terms = sm_fit.model.exog.shape
    need = sm_fit.params.size * n * num_terms * sm_fit.model.J * 8 / 2**30
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    if need > min(4.0, available / 4):
        print(
            f"statsmodels get_margeff() not run: its complex-step Jacobian keeps "
            f"{sm_fit.params.size} arrays of {n} x {num_terms} x {sm_fit.model.J} float64, "
            f"{need:.0f} GiB ({available:.0f} GiB available)"
        )
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = _clock()
        margeff = sm_fit.get_margeff()
        effects, effects_se = np.asarray(margeff.margeff), np.asarray(margeff.margeff_se)
        sm_margins = _clock() - start
    print(
        f"statsmodels get_margeff(): {_fmt(sm_margins)}; vs ours, largest relative "
        f"difference: effects "
        f"{np.max(np.abs(effects - result.margins.effects) / np.abs(effects)):.2e}, their "
        f"standard errors "
        f"{np.max(np.abs(effects_se - result.margins.bse) / effects_se):.2e}"
    )
    sm_total = sm_time + sm_margins
    for label, index in (("wall", 0), ("CPU", 1)):
        print(
            f"[{label}] ours / statsmodels, fit + SEs + marginal effects: "
            f"{ours_total[index] / sm_total[index]:.4f} "
            f"({sm_total[index] / ours_total[index]:.1f}x faster)"
        )


def _compare(label, sm_result, result):
    """Largest relative differences of statsmodels' params, bse and llf from ours."""
    params = np.asarray(sm_result.params)
    bse = np.asarray(sm_result.bse)
    print(
        f"{label} vs ours, largest relative difference: params "
        f"{np.max(np.abs(params - result.params) / np.abs(params)):.2e} (in standard errors "
        f"{np.max(np.abs(params - result.params) / bse):.2e}), bse "
        f"{np.max(np.abs(bse - result.bse) / bse):.2e}, llf "
        f"{abs(sm_result.llf - result.llf) / abs(sm_result.llf):.2e} "
        f"(llf {sm_result.llf:.6f} vs {result.llf:.6f})"
    )


def memory(n, d, k):
    X, y = make_classification(
        n, d, n_informative=d // 2, n_redundant=0, n_classes=k, random_state=0
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # This process's settings (also when `--part all` started it), after `before`: machine_info
    # starts jax's backend, whose memory the figure after generating the data has left out.
    print(machine_info())
    print(
        f"\n== memory: make_classification({n}, {d}, n_classes={k}), float64, "
        f"data {X.nbytes / 2**20:.0f} MiB, peak RSS after generating it {before:.2f} GiB"
    )
    fit, result, fit_time, inf_time = _ours(X, y, k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"fit {_fmt(fit_time)} (converged={bool(fit.converged)}), standard errors + "
        f"marginal effects {_fmt(inf_time)} (compilation included)"
    )
    print(
        f"largest |AME| {np.abs(result.margins.effects).max():.4f}, median SE of AME "
        f"{np.median(result.margins.bse):.2e}"
    )
    print(f"peak RSS of the process: {peak:.2f} GiB (target <= 2 GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "speed", "memory"], default="all")
    parser.add_argument("--sm-maxiter", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--full-statsmodels",
        action="store_true",
        help="run statsmodels from zeros to convergence (maxiter 100: tens of minutes on one "
        "core) and compare its params, bse and llf with ours; implies --part speed",
    )
    args = parser.parse_args()
    if args.full_statsmodels:
        args.part = "speed"
        args.sm_maxiter = max(args.sm_maxiter, 100)
    if args.part in ("all", "speed"):
        print(machine_info())
        sizes = (20_000, 40, 20, 5) if args.quick else (100_000, 100, 60, 10)
        speed(*sizes, sm_maxiter=args.sm_maxiter, full=args.full_statsmodels)
    if args.part == "all":
        command = [sys.executable, __file__, "--part", "memory"] + (
            ["--quick"] if args.quick else []
        )
        subprocess.run(command, check=True)
    elif args.part == "memory":
        memory(*((100_000, 20, 5) if args.quick else (1_000_000, 20, 5)))


if __name__ == "__main__":
    main()
