"""Chunked linear-head cross-entropy vs the dense computation: peak memory and time.

Two jobs, each fused (``linear_softmax_cross_entropy*``) vs dense (``h @ W + b`` materialised):

* ``loss+grad``: ``value_and_grad`` of the mean loss w.r.t. hidden, weight and bias;
* ``loss+GGN``: the mean loss and one Gauss-Newton product in the direction ``(ḣ, Ẇ)``. Dense:
  ``softmax_cross_entropy_with_integer_labels`` on the logits and ``xj.ggn_vp`` of the logits
  function ``(h, W) ↦ h W + b``. Fused: ``linear_softmax_cross_entropy_ggn_vp``, one call.

Memory comes from XLA's compiled memory analysis at the full size (``--n``; compiling needs no
data, so the dense N×V program is analysed without being run): temporaries (``temp``) and the
whole footprint (``total``: arguments + outputs + temporaries − aliased bytes).
Time is the minimum over interleaved single calls at ``--time-n`` rows (default: ``--n``);
running the dense program needs about 2-3 N×V arrays of float32, so on a machine with little
free memory pass a smaller ``--time-n`` (the work of both programs is linear in N).

Run: ``python benchmarks/bench_linear_head.py`` (V = 131,072, D = 1,024, N = 8,192);
``--quick`` for a small shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from _common import format_times, interleaved_min_times, machine_info, ratio_table  # noqa: E402

import xentropy_jax as xj  # noqa: E402


def make_jobs(labels, row_chunk, vocab_chunk):
    chunks = dict(row_chunk_size=row_chunk, vocab_chunk_size=vocab_chunk)

    def fused_mean(h, w, b):
        return xj.linear_softmax_cross_entropy(h, w, labels, bias=b, reduction="mean", **chunks)

    def dense_mean(h, w, b):
        return xj.softmax_cross_entropy_with_integer_labels(h @ w + b, labels).mean()

    def fused_ggn(h, w, b, h_dot, w_dot):
        return xj.linear_softmax_cross_entropy_ggn_vp(
            h, w, labels, (h_dot, w_dot, None), bias=b, **chunks
        )

    def dense_ggn(h, w, b, h_dot, w_dot):
        def logits_fn(params, _):
            return params["h"] @ params["w"] + b

        loss = dense_mean(h, w, b)
        product = xj.ggn_vp(logits_fn, {"h": h, "w": w}, None, {"h": h_dot, "w": w_dot})
        return loss, (product["h"], product["w"])

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2))  # noqa: E731
    return {
        "loss+grad fused": (jax.jit(grad(fused_mean)), 3),
        "loss+grad dense": (jax.jit(grad(dense_mean)), 3),
        "loss+GGN fused": (jax.jit(fused_ggn), 5),
        "loss+GGN dense": (jax.jit(dense_ggn), 5),
    }


def shapes(n, d, v, dtype):
    s = jax.ShapeDtypeStruct
    return (s((n, d), dtype), s((d, v), dtype), s((v,), dtype), s((n, d), dtype), s((d, v), dtype))


def memory_table(n, d, v, dtype, row_chunk, vocab_chunk):
    labels = jnp.zeros((n,), jnp.int32)
    jobs = make_jobs(labels, row_chunk, vocab_chunk)
    args = shapes(n, d, v, dtype)
    rows = {}
    for name, (fn, arity) in jobs.items():
        stats = fn.lower(*args[:arity]).compile().memory_analysis()
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        rows[name] = (stats.temp_size_in_bytes, total)
    gib = 2.0**30
    print(f"\nCompiled memory at N={n}, D={d}, V={v} ({jnp.dtype(dtype).name}; one N×V array is "
          f"{n * v * jnp.dtype(dtype).itemsize / gib:.2f} GiB):")
    print(f"  {'job':<20s} {'temp GiB':>10s} {'total GiB':>10s}")
    for name, (temp, peak) in rows.items():
        print(f"  {name:<20s} {temp / gib:10.3f} {peak / gib:10.3f}")
    for job in ("loss+grad", "loss+GGN"):
        fused, dense = rows[f"{job} fused"], rows[f"{job} dense"]
        ratio = dense[0] / fused[0]
        print(f"  {job}: fused / dense  temp {fused[0] / dense[0]:.4f} (1/{ratio:.1f})"
              f"  total {fused[1] / dense[1]:.4f} (1/{dense[1] / fused[1]:.1f})")


def time_table(n, d, v, dtype, row_chunk, vocab_chunk, repeats, jobs_to_time):
    keys = jax.random.split(jax.random.key(0), 6)
    hidden = jax.random.normal(keys[0], (n, d), dtype)
    weight = (jax.random.normal(keys[1], (d, v), dtype) / d**0.5).astype(dtype)
    bias = jax.random.normal(keys[2], (v,), dtype)
    labels = jax.random.randint(keys[3], (n,), 0, v)
    hidden_dot = jax.random.normal(keys[4], (n, d), dtype)
    weight_dot = jax.random.normal(keys[5], (d, v), dtype)
    args = (hidden, weight, bias, hidden_dot, weight_dot)
    jobs = make_jobs(labels, row_chunk, vocab_chunk)
    calls = {name: (lambda fn=fn, k=k: fn(*args[:k])) for name, (fn, k) in jobs.items()}
    # One job at a time, fused and dense interleaved, so that at most one dense program's
    # buffers are alive at once.
    print(f"\nTime at N={n}, D={d}, V={v} ({jnp.dtype(dtype).name}), min of {repeats} "
          "interleaved calls:", flush=True)
    for job in jobs_to_time:
        pair = {f"{job} fused": calls[f"{job} fused"], f"{job} dense": calls[f"{job} dense"]}
        times = interleaved_min_times(pair, repeats=repeats, warmup=1)
        print(format_times(times))
        print(ratio_table(times, [(f"{job} fused", f"{job} dense")]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--v", type=int, default=131072)
    parser.add_argument("--time-n", type=int, default=None, help="rows for timing (default --n)")
    parser.add_argument("--row-chunk", type=int, default=None)
    parser.add_argument("--vocab-chunk", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="N=512, D=64, V=8192, 64-row blocks")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--jobs", nargs="+", default=["loss+grad", "loss+GGN"],
                        choices=["loss+grad", "loss+GGN"])
    args = parser.parse_args()
    if args.quick:
        args.n, args.d, args.v = 512, 64, 8192
        args.row_chunk = args.row_chunk or 64
    dtype = jnp.dtype(args.dtype)
    print(machine_info())
    print(f"chunks: rows {args.row_chunk or 'default'}, vocabulary {args.vocab_chunk or 'default'}")
    memory_table(args.n, args.d, args.v, dtype, args.row_chunk, args.vocab_chunk)
    if not args.skip_time:
        time_table(args.time_n or args.n, args.d, args.v, dtype, args.row_chunk,
                   args.vocab_chunk, args.repeats, args.jobs)


if __name__ == "__main__":
    main()
