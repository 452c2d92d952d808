"""Curvature products of a whole model: ours against one gradient and against plain autodiff.

Two models, float32:

* an MLP 784-256-10 (ReLU) on a batch of 1024;
* a linear model (multinomial logistic regression) on 100 000 × 100 inputs, K = 10;
* with ``--wide``, also a linear model with many classes (4096 × 32 inputs, K = 4096).

For each: one gradient of the mean loss (ours and optax's), one GGN product (``ggn_vp``, one
shot; and the apply of a ``ggn_operator`` linearised once, as conjugate gradients uses it), the
same GGN product by autodiff of optax's loss, both ways: linearised once too (``jax.linearize``
and ``jax.linear_transpose`` of the model outside the timing, then Jᵀ·(``jvp`` of ``grad`` of the
loss in the logits)·J v per call), like for like with the operator's apply, and with the forward
pass redone at every call (``jvp`` of the ``vjp`` with the Jacobian frozen), like for like with
``ggn_vp``; and the Hessian product (``hessian_vp`` against ``jvp(grad)`` of optax's loss). Every
function is jitted with its arrays as arguments; the minimum of interleaved calls is reported.
Before timing, the GGN products are checked against autodiff's with the forward pass (max error
over max entry, printed; MISMATCH beyond ``GGN_EPS`` machine epsilons, 1.2e-4 in float32).

Run ``python benchmarks/bench_curvature.py`` (``--small`` for a quick check at small sizes).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from _common import format_times, interleaved_min_times, machine_info, ratio_table

import xentropy_jax as xj

GGN_EPS = 1000  # tolerance of the GGN check: this many machine epsilons of the parameters' dtype
GGN_OPERATOR = "ggn_operator apply (ours, linearised once)"
GGN_LINEARISED = "GGN autodiff of optax, linearised once"
GGN_FORWARD = "GGN autodiff of optax, forward each call"


def mlp(params, inputs):
    hidden = jax.nn.relu(inputs @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def linear(params, inputs):
    return inputs @ params["w"] + params["b"]


def make_mlp(n, d, h, k, key):
    keys = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(keys[0], (d, h)) / jnp.sqrt(d),
        "b1": jnp.zeros(h),
        "w2": jax.random.normal(keys[1], (h, k)) / jnp.sqrt(h),
        "b2": jnp.zeros(k),
    }
    inputs = jax.random.normal(keys[2], (n, d))
    labels = jax.random.randint(keys[3], (n,), 0, k)
    return params, inputs, labels


def make_linear(n, d, k, key):
    keys = jax.random.split(key, 3)
    params = {"w": jax.random.normal(keys[0], (d, k)) / jnp.sqrt(d), "b": jnp.zeros(k)}
    inputs = jax.random.normal(keys[1], (n, d))
    labels = jax.random.randint(keys[2], (n,), 0, k)
    return params, inputs, labels


def optax_mean_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def contenders(model, params, inputs, labels):
    """Zero-argument callables, each one jitted call on device arrays."""
    tangents = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)

    grad_ours = jax.jit(jax.grad(lambda p, x, y: xj.mean_cross_entropy(model, p, x, y)))
    grad_optax = jax.jit(jax.grad(lambda p, x, y: optax_mean_loss(model(p, x), y)))
    ggn_ours = jax.jit(lambda p, x, v: xj.ggn_vp(model, p, x, v))
    build_operator = jax.jit(lambda p, x: xj.ggn_operator(model, p, x))
    apply_operator = jax.jit(lambda operator, v: operator(v))
    operator = build_operator(params, inputs)

    @jax.jit
    def ggn_autodiff(p, x, y, v):
        # G v = d/dε Jᵀ(θ) ∇ℓ(f(θ + εv)): jvp of the vjp, with the Jacobian frozen at θ.
        def model_at(q):
            return model(q, x)

        logits, model_vjp = jax.vjp(model_at, p)
        loss_gradient = jax.grad(optax_mean_loss)

        def frozen_gradient(q):
            return model_vjp(loss_gradient(model_at(q), y))[0]

        return jax.jvp(frozen_gradient, (p,), (v,))[1]

    @jax.jit
    def linearise_autodiff(p, x):
        logits, model_jvp = jax.linearize(lambda q: model(q, x), p)
        return logits, model_jvp, jax.linear_transpose(model_jvp, p)

    @jax.jit
    def ggn_autodiff_linearised(linearisation, y, v):
        # G v = Jᵀ H J v with J linearised once (as the operator is) and the loss Hessian
        # product H u by autodiff of optax's loss in the logits.
        logits, model_jvp, model_transpose = linearisation
        loss_gradient = jax.grad(lambda z: optax_mean_loss(z, y))
        loss_hvp = jax.jvp(loss_gradient, (logits,), (model_jvp(v),))[1]
        return model_transpose(loss_hvp)[0]

    linearisation = linearise_autodiff(params, inputs)

    hessian_ours = jax.jit(lambda p, x, y, v: xj.hessian_vp(model, p, x, y, v))

    @jax.jit
    def hessian_autodiff(p, x, y, v):
        gradient = jax.grad(lambda q: optax_mean_loss(model(q, x), y))
        return jax.jvp(gradient, (p,), (v,))[1]

    p, x, y, v = params, inputs, labels, tangents
    return {
        "gradient (ours)": lambda: grad_ours(p, x, y),
        "gradient (optax)": lambda: grad_optax(p, x, y),
        "ggn_vp (ours, one shot)": lambda: ggn_ours(p, x, v),
        GGN_OPERATOR: lambda: apply_operator(operator, v),
        GGN_LINEARISED: lambda: ggn_autodiff_linearised(linearisation, y, v),
        GGN_FORWARD: lambda: ggn_autodiff(p, x, y, v),
        "hessian_vp (ours)": lambda: hessian_ours(p, x, y, v),
        "hessian autodiff of optax (jvp of grad)": lambda: hessian_autodiff(p, x, y, v),
    }


PAIRS = [
    ("ggn_vp (ours, one shot)", "gradient (ours)"),
    (GGN_OPERATOR, "gradient (ours)"),
    ("ggn_vp (ours, one shot)", "gradient (optax)"),
    (GGN_OPERATOR, "gradient (optax)"),
    # Like for like: the operator's apply against autodiff linearised once too, the one-shot
    # product against autodiff that runs the forward pass at every call. The cross pair shows
    # what the linearisation saves, not what our loss rules do.
    (GGN_OPERATOR, GGN_LINEARISED),
    ("ggn_vp (ours, one shot)", GGN_FORWARD),
    (GGN_OPERATOR, GGN_FORWARD),
    ("hessian_vp (ours)", "gradient (ours)"),
    ("hessian_vp (ours)", "hessian autodiff of optax (jvp of grad)"),
    ("gradient (ours)", "gradient (optax)"),
]


def relative_error(result, reference) -> float:
    """max |result − reference| over max |reference|, each over every leaf of the pytrees."""
    pairs = zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True)
    error = max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs)
    return error / max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(reference))


def run(name, model, problem, repeats):
    params, inputs, labels = problem
    fns = contenders(model, params, inputs, labels)
    print(f"\n{name}")
    reference = fns[GGN_FORWARD]()
    tolerance = GGN_EPS * max(float(jnp.finfo(p.dtype).eps) for p in jax.tree.leaves(params))
    print(f"  GGN products vs {GGN_FORWARD} (max error / max entry, tolerance {tolerance:.1e}):")
    for product in ("ggn_vp (ours, one shot)", GGN_OPERATOR, GGN_LINEARISED):
        error = relative_error(fns[product](), reference)
        print(f"    {product:<44s} {error:.1e}  {'ok' if error <= tolerance else 'MISMATCH'}")
    times = interleaved_min_times(fns, repeats=repeats)
    print(format_times(times))
    print(ratio_table(times, PAIRS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small sizes, for a quick check")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--wide", action="store_true", help="also a model with K = 4096 classes")
    args = parser.parse_args()
    print(machine_info())
    key = jax.random.key(0)
    if args.small:
        mlp_sizes, linear_sizes = (128, 64, 32, 10), (2000, 20, 10)
    else:
        mlp_sizes, linear_sizes = (1024, 784, 256, 10), (100_000, 100, 10)
    n, d, h, k = mlp_sizes
    run(f"MLP {d}-{h}-{k}, batch {n}, float32", mlp, make_mlp(n, d, h, k, key), args.repeats)
    n, d, k = linear_sizes
    run(
        f"linear model {n} x {d}, K = {k}, float32", linear, make_linear(n, d, k, key), args.repeats
    )
    if args.wide:
        # Many classes: the softmax's exponentials, not the matrix products, set the cost.
        n, d, k = (512, 32, 512) if args.small else (4096, 32, 4096)
        problem = make_linear(n, d, k, key)
        run(
            f"wide softmax: linear model {n} x {d}, K = {k}, float32", linear, problem, args.repeats
        )


if __name__ == "__main__":
    main()
