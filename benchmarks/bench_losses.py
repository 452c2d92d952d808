"""Loss primitives side by side with optax and a hand-written closed form, in one process.

For each shape (float32 logits) it times, interleaving single calls and keeping minima:

* ``value_and_grad`` of the mean loss: ours vs optax, integer and one-hot labels, and the
  one-hot case against a hand-written closed form (no autodiff, no care for the tails);
* the Hessian-vector product of the mean loss: ``jvp(grad)`` of ours, of optax's (autodiff),
  ``softmax_cross_entropy_hvp`` and a hand-written closed form ``s ⊙ (v − sᵀv) / N``;
* where it fits in memory, the per-example Hessians ``[N, K, K]`` then a batched product.

It prints ratios ours / theirs and the floor of a numerically stable ``value_and_grad``: the
row maximum (one read of the logits) plus ``exp(z − max)`` for every entry written out, each
timed on its own. On a 2-core CPU the exponential, not memory bandwidth, sets that floor.

Before timing, ours (and the baseline's) value_and_grad and Hessian products are checked against
the hand-written closed forms, relative to each form's largest entry: MISMATCH beyond ``RTOL``
ends the run with a non-zero exit status.

Run: ``python benchmarks/bench_losses.py`` (``--quick`` for small shapes). ``--baseline FILE``
times another version of the losses module (a copy of an earlier ``xentropy_jax/_losses.py``,
e.g. from ``git show REV:xentropy_jax/_losses.py``) alongside, for before/after ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).parent))
from _common import format_times, interleaved_min_times, machine_info, ratio_table  # noqa: E402

import xentropy_jax as xj  # noqa: E402

HESSIAN_BYTES_LIMIT = 1 << 28  # materialise [N, K, K] float32 only up to 256 MiB
RTOL = 1e-5  # agreement with the closed forms: max |error| / max |closed form|, float32


def closed_form_hvp(logits, tangents):
    """Reference: (diag(s) − s sᵀ) v / N written out by hand with jax.nn.softmax."""
    probs = jax.nn.softmax(logits, axis=-1)
    inner = jnp.sum(probs * tangents, axis=-1, keepdims=True)
    return probs * (tangents - inner) / logits.shape[0]


def closed_form_value_and_grad(logits, labels):
    """Reference: the mean loss ``m·logsumexp(z) − yᵀz`` and its gradient ``(m·s − y) / N``.

    Written out by hand with no autodiff and no care for the tails (``s`` from ``exp(z − max)``
    over its sum): the fewest passes a dense-label closed form takes.
    """
    peak = jnp.max(logits, axis=-1, keepdims=True)
    exps = jnp.exp(logits - peak)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    mass = jnp.sum(labels, axis=-1, keepdims=True)
    loss = mass * (peak + jnp.log(total)) - jnp.sum(labels * logits, axis=-1, keepdims=True)
    return jnp.mean(loss), (mass * exps / total - labels) / logits.shape[0]


def relative_error(result, reference) -> float:
    """The largest, over the leaves, of max |result − reference| / max |reference|."""
    pairs = zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True)
    return max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs)


def load_module(path: str):
    """A losses module from a file, loaded inside the package: its relative imports (the
    package's `_manual` and `_precision` helpers) resolve to the installed ones."""
    spec = importlib.util.spec_from_file_location("xentropy_jax._baseline_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_shape(num_rows: int, num_classes: int, repeats: int, baseline=None) -> None:
    key_logits, key_labels, key_tangents = jax.random.split(jax.random.key(0), 3)
    logits = 3.0 * jax.random.normal(key_logits, (num_rows, num_classes), jnp.float32)
    labels = jax.random.randint(key_labels, (num_rows,), 0, num_classes)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    tangents = jax.random.normal(key_tangents, logits.shape, jnp.float32)

    def mean_of(loss):
        return lambda z, targets: jnp.mean(loss(z, targets))

    ours_int = mean_of(xj.softmax_cross_entropy_with_integer_labels)
    optax_int = mean_of(optax.softmax_cross_entropy_with_integer_labels)
    ours_hot = mean_of(xj.softmax_cross_entropy)
    optax_hot = mean_of(optax.softmax_cross_entropy)

    def hvp_of(loss):
        return jax.jit(lambda z, v, c: jax.jvp(lambda u: jax.grad(loss)(u, c), (z,), (v,))[1])

    # Labels are arguments, not constants closed over, so that XLA cannot fold them in.
    fns = {
        "ours value_and_grad (integer)": jax.jit(jax.value_and_grad(ours_int)),
        "optax value_and_grad (integer)": jax.jit(jax.value_and_grad(optax_int)),
        "ours value_and_grad (one-hot)": jax.jit(jax.value_and_grad(ours_hot)),
        "optax value_and_grad (one-hot)": jax.jit(jax.value_and_grad(optax_hot)),
        "ours jvp(grad) (integer)": hvp_of(ours_int),
        "optax jvp(grad) (integer)": hvp_of(optax_int),
        "ours softmax_cross_entropy_hvp": jax.jit(
            lambda z, v: xj.softmax_cross_entropy_hvp(z, v) / z.shape[0]
        ),
        "hand-written closed-form hvp": jax.jit(closed_form_hvp),
        "hand-written value_and_grad (one-hot)": jax.jit(closed_form_value_and_grad),
        "row max (floor, pass 1)": jax.jit(lambda z: jnp.max(z, axis=-1)),
        "exp(z - max) written (floor, pass 2)": jax.jit(lambda z, peak: jnp.exp(z - peak[:, None])),
    }
    args = {
        "ours value_and_grad (integer)": (logits, labels),
        "optax value_and_grad (integer)": (logits, labels),
        "ours value_and_grad (one-hot)": (logits, onehot),
        "optax value_and_grad (one-hot)": (logits, onehot),
        "ours jvp(grad) (integer)": (logits, tangents, labels),
        "optax jvp(grad) (integer)": (logits, tangents, labels),
        "ours softmax_cross_entropy_hvp": (logits, tangents),
        "hand-written closed-form hvp": (logits, tangents),
        "hand-written value_and_grad (one-hot)": (logits, onehot),
        "row max (floor, pass 1)": (logits,),
        "exp(z - max) written (floor, pass 2)": (logits, jnp.max(logits, axis=-1)),
    }
    if baseline is not None:
        fns["baseline value_and_grad (integer)"] = jax.jit(
            jax.value_and_grad(mean_of(baseline.softmax_cross_entropy_with_integer_labels))
        )
        fns["baseline value_and_grad (one-hot)"] = jax.jit(
            jax.value_and_grad(mean_of(baseline.softmax_cross_entropy))
        )
        fns["baseline jvp(grad) (integer)"] = hvp_of(
            mean_of(baseline.softmax_cross_entropy_with_integer_labels)
        )
        fns["baseline softmax_cross_entropy_hvp"] = jax.jit(
            lambda z, v: baseline.softmax_cross_entropy_hvp(z, v) / z.shape[0]
        )
        for kind in ("value_and_grad (integer)", "value_and_grad (one-hot)", "jvp(grad) (integer)"):
            args[f"baseline {kind}"] = args[f"ours {kind}"]
        args["baseline softmax_cross_entropy_hvp"] = args["ours softmax_cross_entropy_hvp"]
    hessian_bytes = num_rows * num_classes * num_classes * 4
    if hessian_bytes <= HESSIAN_BYTES_LIMIT:
        row_loss = optax.softmax_cross_entropy_with_integer_labels
        row_hessian = jax.hessian(row_loss)
        name = "jax.hessian [N,K,K] then multiply"
        fns[name] = jax.jit(
            lambda z, v, c: jnp.einsum("nij,nj->ni", jax.vmap(row_hessian)(z, c), v) / z.shape[0]
        )
        args[name] = (logits, tangents, labels)

    # Correctness first: the results must agree before their times mean anything. Each is
    # measured against a closed form at the scale of that form (value, gradient, product).
    value_and_grad = closed_form_value_and_grad(logits, onehot)
    hvp = closed_form_hvp(logits, tangents)
    references = {
        "value_and_grad (integer)": value_and_grad,
        "value_and_grad (one-hot)": value_and_grad,
        "jvp(grad) (integer)": hvp,
        "softmax_cross_entropy_hvp": hvp,
    }
    checked = ["ours"] + (["baseline"] if baseline is not None else [])
    errors = {
        f"{who} {kind}": relative_error(fns[f"{who} {kind}"](*args[f"{who} {kind}"]), reference)
        for who in checked
        for kind, reference in references.items()
    }
    print(f"\n== logits float32 [{num_rows}, {num_classes}] ==")
    print("agreement with the hand-written closed forms (max |error| / max |closed form|):")
    for name, error in errors.items():
        print(f"  {name:<44s} {error:.1e}  {'ok' if error <= RTOL else 'MISMATCH'}")
    if max(errors.values()) > RTOL:
        raise SystemExit(f"MISMATCH: results differ from the closed forms by more than {RTOL:g}")

    times = interleaved_min_times(
        {name: (lambda f=fn, a=args[name]: f(*a)) for name, fn in fns.items()}, repeats=repeats
    )
    print(format_times(times))
    pairs = [
        ("ours value_and_grad (integer)", "optax value_and_grad (integer)"),
        ("ours value_and_grad (one-hot)", "optax value_and_grad (one-hot)"),
        ("ours value_and_grad (one-hot)", "hand-written value_and_grad (one-hot)"),
        ("ours jvp(grad) (integer)", "hand-written closed-form hvp"),
        ("ours softmax_cross_entropy_hvp", "hand-written closed-form hvp"),
        ("ours jvp(grad) (integer)", "optax jvp(grad) (integer)"),
    ]
    if baseline is not None:
        pairs += [
            ("baseline value_and_grad (integer)", "optax value_and_grad (integer)"),
            ("baseline value_and_grad (one-hot)", "optax value_and_grad (one-hot)"),
            ("baseline jvp(grad) (integer)", "optax jvp(grad) (integer)"),
            ("ours value_and_grad (integer)", "baseline value_and_grad (integer)"),
            ("ours value_and_grad (one-hot)", "baseline value_and_grad (one-hot)"),
            ("ours jvp(grad) (integer)", "baseline jvp(grad) (integer)"),
            ("ours softmax_cross_entropy_hvp", "baseline softmax_cross_entropy_hvp"),
        ]
    if "jax.hessian [N,K,K] then multiply" in times:
        pairs.append(("ours softmax_cross_entropy_hvp", "jax.hessian [N,K,K] then multiply"))
    print("ratios (ours / theirs; below 1 means ours is faster):")
    print(ratio_table(times, pairs))
    print("reference pair (hand-written closed form / optax; neither is ours):")
    reference_pair = ("hand-written value_and_grad (one-hot)", "optax value_and_grad (one-hot)")
    print(ratio_table(times, [reference_pair]))
    # A stable value_and_grad needs the row maximum before any exp (one read of the logits)
    # and then exp(z − max) for every entry, written out as the gradient: those two passes,
    # timed on their own, are the floor for any implementation that keeps huge logits exact.
    floor = times["row max (floor, pass 1)"] + times["exp(z - max) written (floor, pass 2)"]
    print(
        f"floor (row max + exp(z - max) written): {1e3 * floor:.3f} ms; value_and_grad / floor: "
        f"ours integer {times['ours value_and_grad (integer)'] / floor:.2f}, "
        f"optax integer {times['optax value_and_grad (integer)'] / floor:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--baseline", help="another losses module file to time alongside")
    options = parser.parse_args()
    baseline = load_module(options.baseline) if options.baseline else None
    print(machine_info())
    if options.quick:
        shapes, repeats = [(256, 100), (64, 10)], 5
    else:
        shapes, repeats = [(8192, 1000), (65536, 100), (1024, 32000), (512, 10)], 20
    for num_rows, num_classes in shapes:
        bench_shape(num_rows, num_classes, repeats, baseline)


if __name__ == "__main__":
    main()
