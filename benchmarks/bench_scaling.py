"""Rows over several devices, and rows streamed from disk: time and memory against one device.

Two parts, each in a child process (the device count is fixed when jax starts):

1. ``--devices 1 2``: one Hessian product and one whole Newton-CG fit with the rows of a float32
   [N, d] problem on 1 and on 2 CPU devices (``--xla_force_host_platform_device_count``),
   interleaved single calls, minima. On a CPU the devices share the same cores, so this measures
   the cost of the partitioning (the all-reduce and the split GEMMs), not a speed-up; on a
   machine with several accelerators the same program splits the work.
2. ``--streamed``: the same fit from a memory-mapped ``.npy`` file in chunks against the
   in-memory fit: time and the growth of the resident set during a repeat fit (compilation
   excluded; the in-memory fit's includes reading the file into memory).

Run ``python benchmarks/bench_scaling.py`` (the issue's N = 2,000,000, d = 256, K = 16 needs
about 2 GiB per copy of X and several minutes) or ``--quick`` (N = 200,000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _data(n_rows: int, n_features: int, n_classes: int):
    import numpy as np

    rng = np.random.default_rng(0)
    means = rng.normal(size=(n_classes, n_features)).astype(np.float32) / 4
    y = rng.integers(0, n_classes, n_rows)
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32) + means[y]
    return X, y


def child_devices(count: int, n_rows: int, n_features: int, n_classes: int, repeats: int) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import xentropy_jax as xj
    from xentropy_jax._linear import evaluate, hessian_vector_product, logistic_objective

    X, y = _data(n_rows, n_features, n_classes)
    mesh = jax.make_mesh((count,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    X, y = jax.device_put(X, rows), jax.device_put(y, rows)
    objective = logistic_objective(X, y, n_classes, l2=1e-4)
    theta = jnp.full((objective.num_params,), 1e-3, jnp.float32)
    point = jax.jit(lambda o, t: evaluate(o, t, o.free_logits(t)))(objective, theta)
    product = jax.jit(hessian_vector_product)
    product(objective, point, theta).block_until_ready()
    hvp = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(objective, point, theta).block_until_ready()
        hvp.append(time.perf_counter() - start)
    xj.fit_logistic_regression(X, y, n_classes, l2=1e-4, tol=1e-6)  # compile
    fits = []
    for _ in range(max(1, repeats // 2)):
        start = time.perf_counter()
        result = xj.fit_logistic_regression(X, y, n_classes, l2=1e-4, tol=1e-6)
        result.params[0].block_until_ready()
        fits.append(time.perf_counter() - start)
    return {"devices": count, "hvp_s": min(hvp), "fit_s": min(fits), "n_iter": int(result.n_iter)}


def child_streamed(n_rows: int, n_features: int, n_classes: int, chunk_rows: int) -> dict:
    import numpy as np
    from _common import peak_growth

    import xentropy_jax as xj

    folder = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    X, y = _data(n_rows, n_features, n_classes)
    np.save(folder / "X.npy", X)
    np.save(folder / "y.npy", y)
    del X, y
    X = np.load(folder / "X.npy", mmap_mode="r")
    y = np.load(folder / "y.npy", mmap_mode="r")
    out = {"file_mib": (folder / "X.npy").stat().st_size / 2**20}

    # Each fit once before measuring: compilation and the runtime's buffers are not counted.
    xj.fit_logistic_regression_streamed(X, y, n_classes, l2=1e-4, tol=1e-6, chunk_rows=chunk_rows)
    xj.fit_logistic_regression(np.asarray(X), np.asarray(y), n_classes, l2=1e-4, tol=1e-6)
    streamed, out["streamed_s"], out["streamed_growth_mib"] = peak_growth(
        lambda: xj.fit_logistic_regression_streamed(
            X, y, n_classes, l2=1e-4, tol=1e-6, chunk_rows=chunk_rows
        )
    )
    whole, out["in_memory_s"], out["in_memory_growth_mib"] = peak_growth(
        lambda: xj.fit_logistic_regression(
            np.asarray(X), np.asarray(y), n_classes, l2=1e-4, tol=1e-6
        )
    )
    out["objective_gap"] = abs(float(streamed.loss) - float(whole.loss)) / float(whole.loss)
    out["n_iter"] = [int(streamed.n_iter), int(whole.n_iter)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n_rows = 200_000 if args.quick else 2_000_000
    n_features, n_classes = 256, 16
    if args.child:
        kind, _, value = args.child.partition("=")
        if kind == "devices":
            out = child_devices(int(value), n_rows, n_features, n_classes, args.repeats)
        else:
            out = child_streamed(n_rows, n_features, n_classes, chunk_rows=n_rows // 8)
        print(json.dumps(out))
        return

    from _common import machine_info

    print(machine_info())
    print(f"float32 Gaussian class means, N = {n_rows:,}, d = {n_features}, K = {n_classes}")
    results = {}
    for child in ("devices=1", "devices=2", "streamed"):
        command = [sys.executable, __file__, "--child", child, "--repeats", str(args.repeats)]
        command += ["--quick"] if args.quick else []
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        results[child] = json.loads(completed.stdout.strip().splitlines()[-1])
    one, two = results["devices=1"], results["devices=2"]
    print(
        f"Hessian product: 1 device {one['hvp_s'] * 1e3:.1f} ms, 2 devices "
        f"{two['hvp_s'] * 1e3:.1f} ms (2 / 1: {two['hvp_s'] / one['hvp_s']:.2f})"
    )
    print(
        f"whole fit:       1 device {one['fit_s']:.2f} s, 2 devices {two['fit_s']:.2f} s "
        f"(2 / 1: {two['fit_s'] / one['fit_s']:.2f}; {one['n_iter']} and {two['n_iter']} "
        "iterations)"
    )
    streamed = results["streamed"]
    print(
        f"streamed from a {streamed['file_mib']:.0f} MiB file in 8 chunks: "
        f"{streamed['streamed_s']:.2f} s, resident set +{streamed['streamed_growth_mib']:.0f} MiB; "
        f"in memory {streamed['in_memory_s']:.2f} s, +{streamed['in_memory_growth_mib']:.0f} MiB "
        f"(streamed / in memory: {streamed['streamed_s'] / streamed['in_memory_s']:.2f}); "
        f"objectives within {streamed['objective_gap']:.1e}, iterations {streamed['n_iter']}"
    )


if __name__ == "__main__":
    main()
