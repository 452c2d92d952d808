"""Shared timing helpers for the side-by-side benchmarks.

Timings on a small shared machine are noisy, so every benchmark interleaves single calls of the
functions it compares and reports the minimum of each: the minimum is the least disturbed run.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping

import jax


def machine_info() -> str:
    """One paragraph describing the machine and its thread settings."""
    threads = {
        name: os.environ.get(name, "unset")
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
    }
    try:
        from threadpoolctl import threadpool_info

        pools = ", ".join(f"{p['internal_api']}:{p['num_threads']}" for p in threadpool_info())
    except ImportError:  # threadpoolctl comes with scikit-learn
        pools = "threadpoolctl not installed"
    return (
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} logical cores; jax {jax.__version__} backend "
        f"{jax.default_backend()} devices {jax.devices()}\n"
        f"threads: {threads}; BLAS pools: {pools}"
    )


def block(tree):
    """Wait for every array in ``tree``; return it."""
    return jax.block_until_ready(tree)


def interleaved_min_times(
    fns: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Minimum wall time in seconds of each zero-argument callable, calls interleaved.

    Each callable must return JAX arrays (or anything ``jax.block_until_ready`` accepts): the
    timer waits for them, so asynchronous dispatch is not mistaken for speed.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ratio_table(times: Mapping[str, float], pairs: list[tuple[str, str]]) -> str:
    """Lines ``ours / theirs = ratio`` for the given pairs of names in ``times``."""
    lines = []
    for ours, theirs in pairs:
        lines.append(f"  {ours:<40s} / {theirs:<40s} = {times[ours] / times[theirs]:6.3f}")
    return "\n".join(lines)


def format_times(times: Mapping[str, float]) -> str:
    """Lines ``name: milliseconds``."""
    return "\n".join(f"  {name:<48s} {1e3 * t:10.3f} ms" for name, t in times.items())


def resident_mib() -> float:
    """Resident set size of this process, in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - not Linux
        return 0.0


def peak_growth(function: Callable[[], object]) -> tuple[object, float, float]:
    """(function(), its wall seconds, the peak growth of the resident set during it, in MiB).

    The resident set is sampled every 5 ms against its size just before the call
    (ru_maxrss would include peaks from before, such as generating the data).
    """
    import threading

    before, peak, done = resident_mib(), [0.0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_mib())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    try:
        result = function()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    return result, seconds, max(peak[0], resident_mib()) - before
