"""One fit over several processes, each holding its own rows (JAX's multi-controller runtime).

Run ``python examples/fit_multiprocess.py`` (``--processes N``, default 2): it starts N worker
processes of this script on this machine, as a cluster launcher would start one per host. Each
worker

1. joins the cluster: ``jax.distributed.initialize(coordinator_address, num_processes,
   process_id)``, with CPU collectives over gloo (``jax_cpu_collectives_implementation``);
   on a real cluster the same three values come from the launcher (or from the environment on
   SLURM, Cloud TPU and Kubernetes, where ``initialize()`` finds them itself);
2. builds a global [N, d] array from its own block of rows,
   ``jax.make_array_from_process_local_data(NamedSharding(mesh, P("rows")), local_rows)``;
3. calls ``fit_logistic_regression`` on it: every process runs the same compiled program, and
   each Hessian product ends in one all-reduce of the (d + 1) × K block across processes.

The parent then fits the same data in one process and prints, for every worker, the largest
coefficient difference relative to the largest coefficient. A stuck collective would hang every
worker, so each has a timeout and its own log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

N_ROWS, N_FEATURES, N_CLASSES, L2, TOL = 3000, 12, 4, 1e-3, 1e-12
TIMEOUT = 240


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N_ROWS, N_FEATURES)) * rng.uniform(0.5, 2.0, size=N_FEATURES)
    y = rng.integers(0, N_CLASSES, N_ROWS)
    return X, y


def worker(rank: int, processes: int, port: int) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=processes, process_id=rank
    )
    from jax.sharding import NamedSharding, PartitionSpec

    import xentropy_jax as xj

    X, y = data()
    mesh = jax.make_mesh((jax.device_count(),), ("rows",))
    rows = NamedSharding(mesh, PartitionSpec("rows"))
    mine = np.array_split(np.arange(N_ROWS), processes)[rank]  # this process's rows only
    X_global = jax.make_array_from_process_local_data(rows, X[mine], X.shape)
    y_global = jax.make_array_from_process_local_data(rows, y[mine], y.shape)
    result = xj.fit_logistic_regression(X_global, y_global, N_CLASSES, l2=L2, tol=TOL)
    weights = np.asarray(result.params[0])  # replicated: every process holds all of it
    print(json.dumps({"rank": rank, "n_iter": int(result.n_iter), "weights": weights.tolist()}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes < 1 or N_ROWS % args.processes:
        # Each process holds an equal share of the row-sharded arrays.
        parser.error(f"--processes must be a positive divisor of the {N_ROWS} rows.")
    if args.worker is not None:
        worker(args.worker, args.processes, args.port)
        return

    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="multiprocess-fit-"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workers = []
    for rank in range(args.processes):
        command = [sys.executable, __file__, "--worker", str(rank), "--port", str(port)]
        command += ["--processes", str(args.processes)]
        log = open(logs / f"worker{rank}.log", "w")  # noqa: SIM115 - closed below
        workers.append(
            (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env), log)
        )
    outputs = []
    try:
        for rank, (process, log) in enumerate(workers):
            stdout, _ = process.communicate(timeout=TIMEOUT)
            log.close()
            if process.returncode != 0:
                sys.exit(f"worker {rank} failed; its log: {logs / f'worker{rank}.log'}")
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process, log in workers:
            process.kill()
            log.close()
    shutil.rmtree(logs)  # kept only when a worker failed (its log is named above)

    import jax

    jax.config.update("jax_enable_x64", True)
    import xentropy_jax as xj

    X, y = data()
    single = xj.fit_logistic_regression(X, y, N_CLASSES, l2=L2, tol=TOL)
    reference = np.asarray(single.params[0])
    print(f"{N_ROWS} x {N_FEATURES}, K = {N_CLASSES}: one process, {int(single.n_iter)} iterations")
    for output in outputs:
        difference = np.max(np.abs(np.asarray(output["weights"]) - reference))
        print(
            f"process {output['rank']} of {args.processes}: {output['n_iter']} iterations, "
            f"coefficients within {difference / np.max(np.abs(reference)):.1e} of one process"
        )


if __name__ == "__main__":
    main()
