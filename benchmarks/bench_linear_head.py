"""Chunked linear-head cross-entropy vs the dense computation: peak memory and time.

Two jobs, each fused (``linear_softmax_cross_entropy*``) vs dense (``h @ W + b`` materialised):

* ``loss+grad``: ``value_and_grad`` of the mean loss w.r.t. hidden, weight and bias;
* ``loss+GGN``: the mean loss and one Gauss-Newton product in the direction ``(ḣ, Ẇ)``. Dense:
  ``softmax_cross_entropy_with_integer_labels`` on the logits and ``xj.ggn_vp`` of the logits
  function ``(h, W) ↦ h W + b``. Fused: ``linear_softmax_cross_entropy_ggn_vp``, one call.

Memory, two ways: XLA's compiled memory analysis at the full size (``--n``; compiling needs no
data, so the dense N×V program is analysed even when it is not run): temporaries (``temp``) and
the whole footprint (``total``: arguments + outputs + temporaries − aliased bytes); and, for the
programs that are timed, the measured growth of the process's resident set during a call
(sampled every 5 ms; the arguments are already resident, so this is outputs + temporaries).
Time: each program is compiled ahead (the compile time is printed), then called ``--calls``
times, fused and dense interleaved; the minima of wall and of process CPU seconds are reported
(on a shared machine the CPU seconds are the steadier measure of the work). The last call's
results of fused and dense are compared (loss and each array: max difference over max entry;
MISMATCH beyond ``RTOL`` of the dtype). Timing at
``--time-n`` rows (default: ``--n``) needs room for the dense program (about 13 GiB resident at
the default size); the work of both programs is linear in N, so a smaller ``--time-n`` also
gives the ratios.

Run: ``python benchmarks/bench_linear_head.py`` (V = 131,072, D = 1,024, N = 8,192; about
10 minutes on 2 CPU cores); ``--quick`` for a small shape; ``--sweep-rows 128 256 512`` times
the fused programs with each row block (memory at ``--n``, time at ``--time-n``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, peak_growth  # noqa: E402

import xentropy_jax as xj  # noqa: E402

GIB = 2.0**30
JOBS = ("loss+grad", "loss+GGN")
# Fused against dense, max |difference| / max |dense| of the loss and of each array: about
# 1e-6 measured in float32, 1e-2 to 2e-2 in bfloat16 (8 bits; N = 2048, D = 1024).
RTOL = {"float32": 1e-4, "bfloat16": 1e-1}


def make_jobs(row_chunk, vocab_chunk):
    """``name -> (jitted function, number of arguments)``; labels are an argument."""
    chunks = dict(row_chunk_size=row_chunk, vocab_chunk_size=vocab_chunk)

    def fused_mean(h, w, b, labels):
        return xj.linear_softmax_cross_entropy(h, w, labels, bias=b, reduction="mean", **chunks)

    def dense_mean(h, w, b, labels):
        return xj.softmax_cross_entropy_with_integer_labels(h @ w + b, labels).mean()

    def fused_ggn(h, w, b, labels, h_dot, w_dot):
        return xj.linear_softmax_cross_entropy_ggn_vp(
            h, w, labels, (h_dot, w_dot, None), bias=b, **chunks
        )

    def dense_ggn(h, w, b, labels, h_dot, w_dot):
        def logits_fn(params, _):
            return params["h"] @ params["w"] + b

        loss = dense_mean(h, w, b, labels)
        product = xj.ggn_vp(logits_fn, {"h": h, "w": w}, None, {"h": h_dot, "w": w_dot})
        return loss, (product["h"], product["w"])

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2))  # noqa: E731
    return {
        "loss+grad fused": (jax.jit(grad(fused_mean)), 4),
        "loss+grad dense": (jax.jit(grad(dense_mean)), 4),
        "loss+GGN fused": (jax.jit(fused_ggn), 6),
        "loss+GGN dense": (jax.jit(dense_ggn), 6),
    }


def shapes(n, d, v, dtype):
    s = jax.ShapeDtypeStruct
    return (
        s((n, d), dtype),
        s((d, v), dtype),
        s((v,), dtype),
        s((n,), jnp.int32),
        s((n, d), dtype),
        s((d, v), dtype),
    )


def compile_jobs(n, d, v, dtype, row_chunk, vocab_chunk, names):
    """``name -> (compiled, arity, compile seconds, temp bytes, total bytes)``."""
    jobs = make_jobs(row_chunk, vocab_chunk)
    args = shapes(n, d, v, dtype)
    out = {}
    for name in names:
        fn, arity = jobs[name]
        start = time.perf_counter()
        compiled = fn.lower(*args[:arity]).compile()
        seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        total = (
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )
        out[name] = (compiled, arity, seconds, stats.temp_size_in_bytes, total)
    return out


def print_memory(compiled, n, d, v, dtype):
    print(
        f"\nCompiled memory at N={n}, D={d}, V={v} ({jnp.dtype(dtype).name}; one N×V array is "
        f"{n * v * jnp.dtype(dtype).itemsize / GIB:.2f} GiB):"
    )
    print(f"  {'job':<20s} {'temp GiB':>10s} {'total GiB':>10s} {'compile s':>10s}")
    for name, (_, _, seconds, temp, total) in compiled.items():
        print(f"  {name:<20s} {temp / GIB:10.3f} {total / GIB:10.3f} {seconds:10.1f}")
    for job in JOBS:
        if f"{job} fused" in compiled and f"{job} dense" in compiled:
            fused, dense = compiled[f"{job} fused"][3:], compiled[f"{job} dense"][3:]
            print(
                f"  {job}: fused / dense  temp {fused[0] / dense[0]:.4f} "
                f"(1/{dense[0] / fused[0]:.1f})  total {fused[1] / dense[1]:.4f} "
                f"(1/{dense[1] / fused[1]:.1f})"
            )


def make_args(n, d, v, dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    hidden = jax.random.normal(keys[0], (n, d), dtype)
    weight = (jax.random.normal(keys[1], (d, v), dtype) / d**0.5).astype(dtype)
    bias = jax.random.normal(keys[2], (v,), dtype)
    labels = jax.random.randint(keys[3], (n,), 0, v, jnp.int32)
    hidden_dot = jax.random.normal(keys[4], (n, d), dtype)
    weight_dot = jax.random.normal(keys[5], (d, v), dtype)
    return jax.block_until_ready((hidden, weight, bias, labels, hidden_dot, weight_dot))


def relative_error(result, reference) -> float:
    """The largest, over the leaves, of max |result − reference| / max |reference|."""
    errors = []
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        errors.append(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
    return max(errors)


def time_calls(compiled, args, names, calls):
    """``name -> (min wall s, min CPU s, max resident growth MiB)``, calls interleaved, and
    ``name -> the last call's result``.

    CPU seconds are the process's (all threads): on a machine shared with other work they count
    what the program did, while its wall time also counts the waits for a core.
    """
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    growth = {name: 0.0 for name in names}
    last = {}
    for _ in range(calls):
        for name in names:
            program, arity = compiled[name][:2]
            gc.collect()
            start = time.process_time()
            result, seconds, grown = peak_growth(
                lambda p=program, k=arity: jax.block_until_ready(p(*args[:k]))
            )
            cpu[name].append(time.process_time() - start)
            last[name] = result
            del result
            wall[name].append(seconds)
            growth[name] = max(growth[name], grown)
            print(
                f"    {name:<20s} {seconds:8.2f} s wall {cpu[name][-1]:8.2f} s CPU  "
                f"resident +{grown / 1024:.2f} GiB  (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    return {name: (min(wall[name]), min(cpu[name]), growth[name]) for name in names}, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="rows (default 8192; 512 with --quick)")
    parser.add_argument("--d", type=int, help="hidden size (default 1024; 64 with --quick)")
    parser.add_argument("--v", type=int, help="vocabulary (default 131072; 8192 with --quick)")
    parser.add_argument("--time-n", type=int, default=None, help="rows for timing (default --n)")
    parser.add_argument("--row-chunk", type=int, default=None)
    parser.add_argument("--vocab-chunk", type=int, default=None)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per program")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=512, D=64, V=8192, 64-row blocks (unless given explicitly)",
    )
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument(
        "--sweep-rows",
        type=int,
        nargs="+",
        default=None,
        help="row blocks to compare (fused only; dense timed once)",
    )
    args = parser.parse_args()
    # --quick sets the small shape's defaults, not what is given explicitly.
    shape = {"n": 512, "d": 64, "v": 8192} if args.quick else {"n": 8192, "d": 1024, "v": 131072}
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.row_chunk = args.row_chunk or 64
    dtype = jnp.dtype(args.dtype)
    time_n = args.time_n or args.n
    print(machine_info())
    print(f"load average before: {os.getloadavg()}")
    names = [f"{job} {kind}" for job in args.jobs for kind in ("fused", "dense")]
    sweep = args.sweep_rows or [args.row_chunk]
    for position, row_chunk in enumerate(sweep):
        print(
            f"\nchunks: rows {row_chunk or 'default'}, vocabulary {args.vocab_chunk or 'default'}"
        )
        fused_only = position > 0
        wanted = [name for name in names if not (fused_only and name.endswith("dense"))]
        compiled = compile_jobs(args.n, args.d, args.v, dtype, row_chunk, args.vocab_chunk, wanted)
        print_memory(compiled, args.n, args.d, args.v, dtype)
        if args.skip_time:
            continue
        if time_n != args.n:
            compiled = compile_jobs(
                time_n, args.d, args.v, dtype, row_chunk, args.vocab_chunk, wanted
            )
        data = make_args(time_n, args.d, args.v, dtype)
        print(
            f"\nTime at N={time_n}, D={args.d}, V={args.v} ({dtype.name}), {args.calls} "
            "calls each after compiling, interleaved; resident growth during a call:",
            flush=True,
        )
        for job in args.jobs:
            pair = [name for name in wanted if name.startswith(job)]
            results, outputs = time_calls(compiled, data, pair, args.calls)
            for name in pair:
                best, best_cpu, grown = results[name]
                print(
                    f"  {name:<20s} min {best:8.2f} s wall {best_cpu:8.2f} s CPU   "
                    f"peak resident growth {grown / 1024:.2f} GiB"
                )
            if len(pair) == 2:
                fused, dense = results[pair[0]], results[pair[1]]
                print(
                    f"  {job}: fused / dense  wall {fused[0] / dense[0]:.3f}  CPU "
                    f"{fused[1] / dense[1]:.3f}  resident {fused[2] / dense[2]:.4f} "
                    f"(1/{dense[2] / fused[2]:.1f})",
                    flush=True,
                )
                error = relative_error(outputs[pair[0]], outputs[pair[1]])
                flag = "ok" if error <= RTOL[dtype.name] else "MISMATCH"
                print(
                    f"  {job}: fused vs dense results, max difference / max |dense| {error:.1e} "
                    f"(tolerance {RTOL[dtype.name]:g}) {flag}"
                )
            del outputs
        del data, compiled
        gc.collect()
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
