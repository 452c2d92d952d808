"""Train an MLP on scikit-learn's digits with Gauss-Newton (Hessian-free) steps, Sophia-G, Adam.

``xj.gauss_newton()`` is an optax transformation: each step solves (G + λI) d = −∇F by at most
20 iterations of the package's conjugate gradients (``xj.cg``), where G is the network's
generalised Gauss-Newton matrix applied matrix-free (``xj.ggn_operator``: one linearisation per
step, then one Jacobian-vector and one transposed product per CG iteration), warm-started from
the previous direction; the damping λ follows the Levenberg-Marquardt rule on the ratio of actual
to predicted decrease. ``xj.sophia_g`` preconditions by a sampled Gauss-Newton diagonal. Every
training loop is the same ``jit``-compiled ``lax.scan`` around ``optimizer.update``; the script
prints the training loss and test accuracy of each method, and compares them at equal
wall-clock time.

Run: ``python examples/train_mlp_gauss_newton.py [--plot curves.png]``
(``XENTROPY_SMALL=1`` shrinks the run to a few seconds.)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import xentropy_jax as xj

SMALL = os.environ.get("XENTROPY_SMALL") == "1"


def load_data():
    """Standardised digits, split 80/20: (train inputs, train labels, test inputs, test labels)."""
    inputs, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        inputs, labels, test_size=0.2, random_state=0, stratify=labels
    )
    if SMALL:
        train_x, train_y = train_x[:400], train_y[:400]
    mean, scale = train_x.mean(0), train_x.std(0) + 1.0
    standardise = lambda x: jnp.asarray((x - mean) / scale, jnp.float32)  # noqa: E731
    return standardise(train_x), jnp.asarray(train_y), standardise(test_x), jnp.asarray(test_y)


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """Glorot-scaled dense layers."""
    layers = []
    for key_layer, fan_in, fan_out in zip(
        jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True
    ):
        scale = jnp.sqrt(2.0 / (fan_in + fan_out))
        layers.append(
            {"w": scale * jax.random.normal(key_layer, (fan_in, fan_out)), "b": jnp.zeros(fan_out)}
        )
    return layers


def mlp_logits(params: list[dict[str, jax.Array]], inputs: jax.Array) -> jax.Array:
    """Tanh hidden layers, linear output: [N, d] -> [N, K] logits."""
    hidden = inputs
    for layer in params[:-1]:
        hidden = jnp.tanh(hidden @ layer["w"] + layer["b"])
    return hidden @ params[-1]["w"] + params[-1]["b"]


def accuracy(params, inputs, labels) -> jax.Array:
    """Fraction of rows whose largest logit is the label."""
    return jnp.mean(jnp.argmax(mlp_logits(params, inputs), -1) == labels)


def train(optimizer: optax.GradientTransformationExtraArgs, params, data, num_steps: int):
    """``num_steps`` full-batch steps of any optimiser in one compiled scan.

    The model and batch go to ``update`` as extra arguments, which the second-order
    transformations need (``logits_fn``, ``inputs``; ``value_fn``/``value`` for the
    Levenberg-Marquardt damping) and plain optax optimisers ignore.
    Returns (params, training losses [T], test accuracies [T], optimiser states).
    """
    train_x, train_y, test_x, test_y = data

    def objective(p):
        return xj.mean_cross_entropy(mlp_logits, p, train_x, train_y)

    def step(carry, _):
        p, state = carry
        loss, grad = jax.value_and_grad(objective)(p)
        updates, state = optimizer.update(
            grad, state, p, logits_fn=mlp_logits, inputs=train_x, value_fn=objective, value=loss
        )
        p = optax.apply_updates(p, updates)
        return (p, state), (objective(p), accuracy(p, test_x, test_y), state)

    (params, _), (losses, accuracies, states) = jax.lax.scan(
        step, (params, optimizer.init(params)), length=num_steps
    )
    return params, losses, accuracies, states


def timed(fn, *args, **kwargs):
    """Compile, then run once more and time it: (outputs, seconds)."""
    jax.block_until_ready(fn(*args, **kwargs))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", help="save the loss curves to this image file")
    args = parser.parse_args()

    data = load_data()
    hidden = 16 if SMALL else 64
    params = init_mlp(jax.random.key(0), [data[0].shape[1], hidden, hidden, 10])
    num_params = sum(p.size for p in jax.tree.leaves(params))
    gn_steps, first_order_steps = (10, 100) if SMALL else (40, 1500)
    print(f"devices {jax.devices()}")
    print(
        f"digits: {data[0].shape[0]} training / {data[2].shape[0]} test images; "
        f"MLP 64-{hidden}-{hidden}-10 with {num_params} parameters; full batch"
    )
    methods = [
        ("Gauss-Newton (20 CG its)", xj.gauss_newton(max_cg_steps=20), gn_steps),
        (
            "Sophia-G (lr 3e-3)",
            xj.sophia_g(3e-3, b1=0.9, gamma=0.01, bias_correction=True),
            first_order_steps,
        ),
        ("Adam (lr 1e-2)", optax.adam(1e-2), first_order_steps),
    ]
    runs = {}
    print(f"{'method':26s} {'steps':>6s} {'time s':>8s} {'train loss':>11s} {'test acc':>9s}")
    for name, optimizer, steps in methods:
        run = jax.jit(lambda p, optimizer=optimizer, steps=steps: train(optimizer, p, data, steps))
        (_, losses, accuracies, states), seconds = timed(run, params)
        runs[name] = (seconds * np.arange(1, steps + 1) / steps, losses, accuracies, states)
        print(
            f"{name:26s} {steps:6d} {seconds:8.3f} "
            f"{float(losses[-1]):11.2e} {float(accuracies[-1]):9.3f}"
        )
    gn_clock, gn_losses, _, gn_states = runs["Gauss-Newton (20 CG its)"]
    statuses = np.bincount(np.asarray(gn_states.cg_status), minlength=len(xj.CGStatus))
    print(
        "Gauss-Newton: CG outcomes "
        + ", ".join(f"{s.name.lower()} {statuses[s]}" for s in xj.CGStatus if statuses[s])
        + f"; {int(np.sum(~np.asarray(gn_states.accepted)))} steps rejected; damping 1 -> "
        f"{float(gn_states.damping[0]):.2g} after step 1 -> {float(gn_states.damping[-1]):.2g}"
    )
    # The others' training loss when Gauss-Newton finished, at the same wall-clock time.
    for name in ("Sophia-G (lr 3e-3)", "Adam (lr 1e-2)"):
        clock, losses, _, _ = runs[name]
        at_same_time = int(np.searchsorted(clock, gn_clock[-1]))
        if at_same_time < clock.size:
            print(
                f"at {gn_clock[-1]:.3f} s {name} had taken {at_same_time + 1} steps: "
                f"train loss {float(losses[at_same_time]):.2e} vs Gauss-Newton "
                f"{float(gn_losses[-1]):.2e}"
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, (clock, losses, accuracies, _) in runs.items():
            axes[0].semilogy(clock, losses, label=name)
            axes[1].plot(clock, accuracies, label=name)
        axes[0].set(xlabel="seconds", ylabel="training loss")
        axes[1].set(xlabel="seconds", ylabel="test accuracy")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
