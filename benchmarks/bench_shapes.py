"""Compilation and memory across row counts: the estimator fitted at many distinct shapes.

A loop over data sizes (cross-validation folds, learning curves) fits the estimator at a new row
count every time. This script fits ``LogisticRegression`` 50 times at 50 distinct row counts
evenly spread over [4200, 7140] (``make_classification``, 20 features, 5 classes, float64) and
reports, for each mode in its own fresh process:

* the number of XLA compilations of the solver's program (counted through ``jax.monitoring``'s
  backend-compile events), of any other program, and the seconds they all took;
* the growth of the process's resident memory over the loop (after the first fit);
* the wall time of the loop.

Modes: ``bucketed`` is the estimator as shipped (the first row count runs exactly, every other
one is padded with zero-weight rows to one of 4 bucket sizes per doubling of the row count, and
at most ``_MAX_PROGRAMS`` programs are kept); ``exact`` switches both
off (the behaviour before bucketing beyond 4,096 rows: one program per row count, all kept).
The third, ``features``, fits at 24 distinct feature counts (24 distinct programs that no padding
can share) to show that memory stays bounded once more than ``_MAX_PROGRAMS`` programs were
needed. The persistent compilation cache is off, so every compilation is counted.

Run ``python benchmarks/bench_shapes.py`` (5 to 15 minutes on two cores, most of it in the
``exact`` mode's 50 compilations), ``--modes bucketed`` (about a minute) or ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("bucketed", "exact", "features")


def _resident_mib() -> float:
    """Resident set size of this process, in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return 0.0


def run_mode(mode: str, num_fits: int) -> dict:
    """Fit the estimator ``num_fits`` times in this process; return counts and memory."""
    import gc

    import jax
    import numpy as np
    from sklearn.datasets import make_classification

    import xentropy_jax.sklearn as xsk

    jax.config.update("jax_enable_compilation_cache", False)
    choose = xsk.fitted_rows
    if mode == "exact":
        choose = lambda n_samples, configuration: n_samples  # noqa: E731
        xsk._MAX_PROGRAMS = 10**9
    fitted: list[tuple[int, int]] = []  # (rows given, rows the fit ran at), as the fit chose

    def recorded(n_samples: int, configuration: tuple) -> int:
        fitted.append((n_samples, choose(n_samples, configuration)))
        return fitted[-1][1]

    xsk.fitted_rows = recorded
    compilations: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append((kwargs.get("fun_name"), duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    max_rows, max_features = 7140, 40
    X, y = make_classification(
        n_samples=max_rows,
        n_features=max_features,
        n_informative=15,
        n_classes=5,
        random_state=0,
    )
    if mode == "features":
        shapes = [(2000, d) for d in range(10, 10 + num_fits)]
    else:
        shapes = [(int(n), 20) for n in np.linspace(4200, 7140, num_fits).round()]
    assert len(set(shapes)) == len(shapes)

    def fit(rows: int, features: int) -> None:
        xsk.LogisticRegression(C=1.0).fit(X[:rows, :features], y[:rows])

    fit(*shapes[0])  # the first fit: what any process pays once
    gc.collect()
    start_mib, start = _resident_mib(), time.perf_counter()
    compilations.clear()
    fitted.clear()
    for rows, features in shapes[1:]:
        fit(rows, features)
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "mode": mode,
        "fits": len(shapes) - 1,
        "distinct_shapes": len(shapes) - 1,
        "compilations": sum(name == "jit(_fit)" for name, _ in compilations),
        "other_compilations": sum(name != "jit(_fit)" for name, _ in compilations),
        "compile_seconds": sum(duration for _, duration in compilations),
        "memory_growth_mib": _resident_mib() - start_mib,
        "loop_seconds": seconds,
        "fitted_rows": sorted({ran for _, ran in fitted}),
        "padded_fits": sum(ran != given for given, ran in fitted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer fits per mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--fits", type=int, default=None, help="fits per mode (default 51)")
    args = parser.parse_args()
    # 51 fits: the first one (not counted) and 50 more at 50 distinct row counts.
    num_fits = args.fits or (13 if args.quick else 51)
    if args.child:
        fits = num_fits if args.child != "features" else min(num_fits, 25)
        print(json.dumps(run_mode(args.child, fits)))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine_info

    print(machine_info())
    print(
        "\nEach mode runs in a fresh process; counts and memory are over the fits after the first."
    )
    header = (
        f"{'mode':10s} {'fits':>5s} {'solver compilations':>19s} {'others':>6s} {'compile s':>9s} "
        f"{'memory MiB':>10s} {'loop s':>7s}  row counts fitted (after padding)"
    )
    print(header)
    results = {}
    for mode in args.modes:
        completed = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", mode, "--fits", str(num_fits)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        results[mode] = result
        padded = f"{result['padded_fits']} of {result['fits']} fits padded"
        if mode == "features":
            rows = f"2000 rows, {result['fits']} feature counts ({padded})"
        elif result["padded_fits"] == 0:
            rows = f"each fit's own row count, none padded ({len(result['fitted_rows'])} counts)"
        else:
            rows = f"{result['fitted_rows']} ({padded})"
        print(
            f"{mode:10s} {result['fits']:5d} {result['compilations']:19d} "
            f"{result['other_compilations']:6d} "
            f"{result['compile_seconds']:9.1f} {result['memory_growth_mib']:10.0f} "
            f"{result['loop_seconds']:7.1f}  {rows}",
            flush=True,
        )
    if "bucketed" in results and "exact" in results:
        ratio = results["bucketed"]["loop_seconds"] / results["exact"]["loop_seconds"]
        print(f"\nloop time bucketed / exact = {ratio:.3f}")


if __name__ == "__main__":
    main()
