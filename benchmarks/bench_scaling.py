"""Rows over devices, over processes, in memory and streamed from disk: time and memory.

Every part runs in child processes (the device count is fixed when jax starts, and each child's
peak resident set is its own), on float32 rows with Gaussian class means, generated in blocks
of at most 1,000,000 rows so that the same rows come out whatever the split:

* ``devices``: one Hessian product and one whole Newton-CG fit with the rows on 1 and on 2 CPU
  devices (``--xla_force_host_platform_device_count``), minima of interleaved calls. On a CPU
  the devices share the same cores, so this measures the cost of the partitioning (the
  all-reduce and the split GEMMs) more than a speed-up; with several accelerators the same
  program splits the work.
* ``processes``: the same, with 1 process and with 2 processes over loopback
  (``jax.distributed.initialize``, gloo collectives), each process making only its own rows.
* ``in-memory``: one whole fit of the rows in memory: time, iterations, peak resident set.
* ``in-memory-chunks``: the rows in one numpy array in memory, fitted by
  `fit_logistic_regression_streamed` in chunks of ``--chunk-rows`` rows (its memory is the
  array plus one chunk's work, where the one-program fit holds about X more):
  time, iterations, peak resident set.
* ``streamed``: the rows written block by block to a ``.npy`` file (``--folder``), then one
  fit from a function that returns an iterator of chunks read with ``np.fromfile`` (read(2),
  not a memory map, so the peak resident set is what the fit holds, not the page cache):
  time, passes, time per pass, peak resident set. The file is deleted afterwards.

Examples: ``python benchmarks/bench_scaling.py --quick`` (N = 200,000, d = 256, K = 16, all
parts); ``--parts devices processes`` at the issue's N = 2,000,000; ``--parts in-memory
in-memory-chunks --rows 20000000 --features 100 --classes 10``; ``--parts streamed --rows
66000000 --features 100 --classes 10 --folder /big/disk`` (a 24.6 GiB file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

BLOCK = 1_000_000
L2, TOL = 1e-4, 1e-6


def _block_rows(n_rows: int) -> int:
    """Rows per generated block: 1,000,000, or N / 8 for smaller N (so that 2 processes split)."""
    return min(BLOCK, -(-n_rows // 8))


def _block(index: int, n_rows: int, n_features: int, n_classes: int):
    """Rows [index·B, min(N, (index + 1)·B)) as float32 X and integer labels (B = `_block_rows`)."""
    import numpy as np

    means = np.random.default_rng(0).normal(size=(n_classes, n_features)).astype(np.float32) / 4
    rng = np.random.default_rng(1 + index)
    block = _block_rows(n_rows)
    size = min(block, n_rows - index * block)
    y = rng.integers(0, n_classes, size)
    X = rng.standard_normal(size=(size, n_features), dtype=np.float32) + means[y]
    return X, y


def _rows(start_block: int, stop_block: int, args):
    """The blocks [start_block, stop_block) in one preallocated float32 array."""
    import numpy as np

    block = _block_rows(args.rows)
    stop = min(stop_block * block, args.rows)
    X = np.empty((stop - start_block * block, args.features), np.float32)
    y = np.empty(len(X), np.int64)
    for index in range(start_block, stop_block):
        at = (index - start_block) * block
        X[at : at + block], y[at : at + block] = _block(
            index, args.rows, args.features, args.classes
        )
    return X, y


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _outcome(result) -> dict:
    """What every child reports of its last fit, and the process's peak resident set so far."""
    return {
        "n_iter": int(result.n_iter),
        "n_hvp": int(result.n_hessian_products),
        "converged": bool(result.converged),
        "loss": float(result.loss),
        "peak_mib": _peak_mib(),
    }


def _time_product_and_fit(X, y, args) -> dict:
    """Minimum times of one Hessian product and of one whole fit on the arrays X, y."""
    import jax
    import jax.numpy as jnp

    import xentropy_jax as xj
    from xentropy_jax._linear import evaluate, hessian_vector_product, logistic_objective

    objective = logistic_objective(X, y, args.classes, l2=L2)
    theta = jnp.full((objective.num_params,), 1e-3, jnp.float32)
    point = jax.jit(lambda o, t: evaluate(o, t, o.free_logits(t)))(objective, theta)
    product = jax.jit(hessian_vector_product)
    product(objective, point, theta).block_until_ready()
    hvp = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        product(objective, point, theta).block_until_ready()
        hvp.append(time.perf_counter() - start)
    del point
    fits = []
    for _ in range(1 + args.fit_repeats):  # the first call compiles
        start = time.perf_counter()
        result = xj.fit_logistic_regression(X, y, args.classes, l2=L2, tol=TOL)
        result.params[0].block_until_ready()
        fits.append(time.perf_counter() - start)
    return {
        "hvp_s": min(hvp),
        "fit_s": min(fits[1:]) if len(fits) > 1 else fits[0],
        "first_fit_s": fits[0],
        **_outcome(result),
    }


def child_devices(count: int, args) -> dict:
    # The user's XLA flags stay (thread settings included); only the device count is ours.
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{flag}={count}"])
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    X, y = _rows(0, -(-args.rows // _block_rows(args.rows)), args)
    mesh = jax.make_mesh((count,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    X, y = jax.device_put(X, rows), jax.device_put(y, rows)
    return {"devices": count, **_time_product_and_fit(X, y, args)}


def child_process(rank: int, processes: int, port: int, args) -> dict:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}", num_processes=processes, process_id=rank
        )
    from jax.sharding import NamedSharding, PartitionSpec

    blocks = -(-args.rows // _block_rows(args.rows))
    assert blocks % processes == 0, "the generated blocks of rows must split evenly"
    mine = blocks // processes
    X, y = _rows(rank * mine, (rank + 1) * mine, args)  # this process's rows only
    mesh = jax.make_mesh((jax.device_count(),), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    X = jax.make_array_from_process_local_data(rows, X, (args.rows, args.features))
    y = jax.make_array_from_process_local_data(rows, y, (args.rows,))
    return {"processes": processes, "rank": rank, **_time_product_and_fit(X, y, args)}


def child_in_memory(args) -> dict:
    """One fit of the rows in memory, X built on the device block by block (one copy of X)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    import xentropy_jax as xj

    start = time.perf_counter()
    put = jax.jit(
        lambda whole, block, at: lax.dynamic_update_slice(
            whole, block, (at,) + (0,) * (block.ndim - 1)
        ),
        donate_argnums=0,
    )
    X = jnp.zeros((args.rows, args.features), jnp.float32)
    y = jnp.zeros((args.rows,), jnp.int32)
    block = _block_rows(args.rows)
    for index in range(-(-args.rows // block)):
        X_block, y_block = _block(index, args.rows, args.features, args.classes)
        X = put(X, X_block, index * block)
        y = put(y, y_block.astype(np.int32), index * block)
    made = time.perf_counter() - start
    start = time.perf_counter()
    result = xj.fit_logistic_regression(X, y, args.classes, l2=L2, tol=TOL)
    result.params[0].block_until_ready()
    return {
        "make_s": made,
        "fit_s": time.perf_counter() - start,  # compilation included (one fit)
        "x_gib": X.nbytes / 2**30,
        **_outcome(result),
    }


def child_in_memory_chunks(args) -> dict:
    """One fit of rows held in one numpy array, passed over in chunks of `--chunk-rows` rows."""
    import xentropy_jax as xj

    start = time.perf_counter()
    X, y = _rows(0, -(-args.rows // _block_rows(args.rows)), args)
    made = time.perf_counter() - start
    start = time.perf_counter()
    result = xj.fit_logistic_regression_streamed(
        X, y, args.classes, chunk_rows=args.chunk_rows, l2=L2, tol=TOL, throw=False
    )
    return {
        "make_s": made,
        "fit_s": time.perf_counter() - start,  # checking pass and compilation included
        "x_gib": X.nbytes / 2**30,
        **_outcome(result),
    }


def child_write(path: str, args) -> dict:
    import numpy as np

    start = time.perf_counter()
    header = {"descr": "<f4", "fortran_order": False, "shape": (args.rows, args.features)}
    labels = np.empty(args.rows, np.int32)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        for index in range(-(-args.rows // _block_rows(args.rows))):
            X, y = _block(index, args.rows, args.features, args.classes)
            file.write(X.tobytes())
            at = index * _block_rows(args.rows)
            labels[at : at + len(y)] = y
    np.save(path.replace(".npy", "-labels.npy"), labels)
    return {"write_s": time.perf_counter() - start, "file_gib": os.path.getsize(path) / 2**30}


def child_streamed(path: str, args) -> dict:
    import numpy as np

    import xentropy_jax as xj

    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        offset = file.tell()
    labels = np.load(path.replace(".npy", "-labels.npy"), mmap_mode="r")
    n_rows, n_features = shape
    chunk = args.chunk_rows

    def chunks():  # a fresh pass over the file, chunk by chunk
        for start in range(0, n_rows, chunk):
            rows = min(chunk, n_rows - start)
            X = np.fromfile(
                path,
                dtype,
                count=rows * n_features,
                offset=offset + start * n_features * dtype.itemsize,
            )
            yield X.reshape(rows, n_features), np.asarray(labels[start : start + rows])

    counted = {"passes": 0}

    def counting():
        counted["passes"] += 1
        return chunks()

    start = time.perf_counter()
    result = xj.fit_logistic_regression_streamed(
        counting, num_classes=args.classes, l2=L2, tol=TOL, throw=False
    )
    seconds = time.perf_counter() - start
    return {
        "fit_s": seconds,  # checking pass and compilation included
        "passes": counted["passes"],  # iterators asked for, the checking pass included
        **_outcome(result),
    }


def _run(part: list[str], args, env=None) -> dict:
    command = [sys.executable, __file__, *part, *_size_flags(args)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{part} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _size_flags(args) -> list[str]:
    return [
        f"--rows={args.rows}",
        f"--features={args.features}",
        f"--classes={args.classes}",
        f"--repeats={args.repeats}",
        f"--fit-repeats={args.fit_repeats}",
        f"--chunk-rows={args.chunk_rows}",
    ]


def _processes(count: int, args) -> dict:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", f"process={rank},{count},{port}"]
            + _size_flags(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(count)
    ]
    outputs = []
    try:
        for process in workers:
            stdout, stderr = process.communicate(timeout=3600)
            if process.returncode != 0:
                raise RuntimeError(f"a worker failed:\n{stderr[-3000:]}")
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in workers:
            process.kill()
    return outputs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="N = 200,000 and chunks of at most 50,000 rows"
    )
    parser.add_argument(
        "--rows",
        type=int,
        help="N (default 2,000,000; 200,000 with --quick); the devices and processes parts "
        "split the rows evenly in two: a multiple of 8 below 8,000,000, of 2,000,000 above",
    )
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="Hessian products timed")
    parser.add_argument("--fit-repeats", type=int, default=1, help="fits timed after the first")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["devices", "processes", "in-memory", "in-memory-chunks", "streamed"],
        choices=["devices", "processes", "in-memory", "in-memory-chunks", "streamed"],
    )
    parser.add_argument("--folder", help="where the streamed part writes its file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is None:  # --quick sets the defaults, not what was asked for explicitly
        args.rows = 200_000 if args.quick else 2_000_000
    if args.quick:
        args.chunk_rows = min(args.chunk_rows, 50_000)
    if args.rows < 1:
        parser.error(f"--rows must be at least 1, got {args.rows}")
    split = {"devices", "processes"} & set(args.parts)
    step = 2 * _block_rows(args.rows) if args.rows >= 8 * BLOCK else 8
    if split and not args.child and args.rows % step:  # (checked once, by the parent)
        parser.error(
            f"--rows {args.rows:,}: the {' and '.join(sorted(split))} part(s) split the rows "
            "evenly in two; give a multiple of 8 below 8,000,000 (of 2,000,000 above), or "
            "other --parts"
        )
    if args.child:
        kind, _, value = args.child.partition("=")
        if kind == "devices":
            out = child_devices(int(value), args)
        elif kind == "process":
            rank, processes, port = map(int, value.split(","))
            out = child_process(rank, processes, port, args)
        elif kind == "in-memory":
            out = child_in_memory(args)
        elif kind == "in-memory-chunks":
            out = child_in_memory_chunks(args)
        elif kind == "write":
            out = child_write(value, args)
        else:
            out = child_streamed(value, args)
        print(json.dumps(out))
        return

    from _common import machine_info

    print(machine_info())
    print(f"load average {os.getloadavg()}")
    print(
        f"float32 Gaussian class means, N = {args.rows:,}, d = {args.features}, "
        f"K = {args.classes}, l2 = {L2}, tol = {TOL}"
    )
    compiled = " with compilation" if args.fit_repeats == 0 else ""
    if "devices" in args.parts:
        env = dict(os.environ, JAX_PLATFORMS="cpu")  # CPU devices, as in `_processes`
        one, two = (_run(["--child", f"devices={count}"], args, env) for count in (1, 2))
        print(
            f"Hessian product: 1 device {one['hvp_s'] * 1e3:.0f} ms, 2 devices "
            f"{two['hvp_s'] * 1e3:.0f} ms (1 / 2: {one['hvp_s'] / two['hvp_s']:.2f})"
        )
        print(
            f"whole fit{compiled}: 1 device {one['fit_s']:.1f} s, 2 devices {two['fit_s']:.1f} s "
            f"(1 / 2: {one['fit_s'] / two['fit_s']:.2f}; iterations {one['n_iter']} and "
            f"{two['n_iter']}, Hessian products {one['n_hvp']} and {two['n_hvp']}; "
            f"peak RSS {one['peak_mib']:.0f} and {two['peak_mib']:.0f} MiB)"
        )
    if "processes" in args.parts:
        one, two = _processes(1, args), _processes(2, args)
        print(
            f"Hessian product: 1 process {one['hvp_s'] * 1e3:.0f} ms, 2 processes over loopback "
            f"{two['hvp_s'] * 1e3:.0f} ms (1 / 2: {one['hvp_s'] / two['hvp_s']:.2f})"
        )
        print(
            f"whole fit{compiled}: 1 process {one['fit_s']:.1f} s, 2 processes "
            f"{two['fit_s']:.1f} s "
            f"(1 / 2: {one['fit_s'] / two['fit_s']:.2f}; iterations {one['n_iter']} and "
            f"{two['n_iter']}; losses {one['loss']:.7g} and {two['loss']:.7g}; peak RSS per "
            f"process {one['peak_mib']:.0f} and {two['peak_mib']:.0f} MiB)"
        )
    if "in-memory" in args.parts:
        out = _run(["--child", "in-memory"], args)
        print(
            f"in memory: X {out['x_gib']:.2f} GiB made in {out['make_s']:.0f} s; one fit "
            f"{out['fit_s']:.0f} s with compilation ({out['n_iter']} iterations, {out['n_hvp']} "
            f"Hessian products, converged {out['converged']}); peak RSS {out['peak_mib']:.0f} MiB"
        )
    if "in-memory-chunks" in args.parts:
        out = _run(["--child", "in-memory-chunks"], args)
        print(
            f"in memory, in chunks of {args.chunk_rows:,} rows: X {out['x_gib']:.2f} GiB made in "
            f"{out['make_s']:.0f} s; one fit {out['fit_s']:.0f} s with the checking pass and "
            f"compilation ({out['n_iter']} iterations, {out['n_hvp']} Hessian products, "
            f"converged {out['converged']}, loss {out['loss']:.7g}); peak RSS "
            f"{out['peak_mib']:.0f} MiB"
        )
    if "streamed" in args.parts:
        folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-scaling-"))
        path = str(folder / "X.npy")
        try:
            written = _run(["--child", f"write={path}"], args)
            out = _run(["--child", f"streamed={path}"], args)
        finally:
            for name in (path, path.replace(".npy", "-labels.npy")):
                if os.path.exists(name):
                    os.remove(name)
        print(
            f"streamed: a {written['file_gib']:.2f} GiB file (written in {written['write_s']:.0f}"
            f" s) in chunks of {args.chunk_rows:,} rows: one fit {out['fit_s']:.0f} s with the "
            f"checking pass and compilation, {out['passes']} passes "
            f"({out['fit_s'] / out['passes']:.1f} s per pass), {out['n_iter']} iterations, "
            f"{out['n_hvp']} Hessian products, converged {out['converged']}; peak RSS "
            f"{out['peak_mib']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
