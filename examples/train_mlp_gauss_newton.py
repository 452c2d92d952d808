"""Train a small MLP on scikit-learn's digits with Gauss-Newton (Hessian-free) steps and with Adam.

Each Gauss-Newton step solves (G + λI) d = −∇F by a few conjugate-gradient iterations, where G is
the network's generalised Gauss-Newton matrix, applied matrix-free by ``xj.ggn_operator`` (one
linearisation per step, then one Jacobian-vector and one transposed product per CG iteration).
The damping λ follows the Levenberg-Marquardt rule on the ratio of actual to predicted decrease.
Both training loops are single ``jit``-compiled ``lax.scan``s; the script prints the training
loss and test accuracy of both methods at equal wall-clock time.

Run: ``python examples/train_mlp_gauss_newton.py [--plot curves.png]``
(``XENTROPY_SMALL=1`` shrinks the run to a few seconds.)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import NamedTuple

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


def tree_dot(a, b) -> jax.Array:
    """Σ aᵢbᵢ over every leaf of two pytrees of the same structure."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


class GaussNewtonState(NamedTuple):
    params: list
    damping: jax.Array


def gauss_newton_step(state: GaussNewtonState, inputs, labels, cg_iterations: int):
    """One damped Gauss-Newton step with a CG inner solve and Levenberg-Marquardt damping."""

    def objective(p):
        return xj.mean_cross_entropy(mlp_logits, p, inputs, labels)

    loss, grad = jax.value_and_grad(objective)(state.params)
    damped = xj.ggn_operator(mlp_logits, state.params, inputs, damping=state.damping)
    neg_grad = jax.tree.map(jnp.negative, grad)
    direction, _ = jax.scipy.sparse.linalg.cg(damped, neg_grad, maxiter=cg_iterations)
    # Predicted decrease from the undamped quadratic model gᵀd + ½ dᵀGd.
    curvature = tree_dot(direction, damped(direction)) - state.damping * tree_dot(
        direction, direction
    )
    predicted = tree_dot(grad, direction) + 0.5 * curvature
    candidate = jax.tree.map(jnp.add, state.params, direction)
    new_loss = objective(candidate)
    ratio = (new_loss - loss) / jnp.minimum(predicted, -1e-30)
    damping = jnp.where(
        ratio > 0.75,
        state.damping * 2 / 3,
        jnp.where(ratio < 0.25, state.damping * 1.5, state.damping),
    )
    accept = jnp.isfinite(new_loss) & (new_loss < loss)
    params = jax.tree.map(lambda new, old: jnp.where(accept, new, old), candidate, state.params)
    return GaussNewtonState(params, jnp.clip(damping, 1e-6, 1e3)), jnp.minimum(new_loss, loss)


def accuracy(params, inputs, labels) -> jax.Array:
    """Fraction of rows whose largest logit is the label."""
    return jnp.mean(jnp.argmax(mlp_logits(params, inputs), -1) == labels)


def train_gauss_newton(params, data, num_steps: int, cg_iterations: int = 20, damping=1.0):
    """``num_steps`` Gauss-Newton steps in one scan: (params, losses [T], test accuracies [T])."""
    train_x, train_y, test_x, test_y = data

    def step(state, _):
        state, _ = gauss_newton_step(state, train_x, train_y, cg_iterations)
        loss = xj.mean_cross_entropy(mlp_logits, state.params, train_x, train_y)
        return state, (loss, accuracy(state.params, test_x, test_y))

    state = GaussNewtonState(params, jnp.asarray(damping, jnp.float32))
    state, (losses, accuracies) = jax.lax.scan(step, state, length=num_steps)
    return state.params, losses, accuracies


def train_adam(params, data, num_steps: int, learning_rate: float = 1e-2):
    """``num_steps`` full-batch Adam steps in one compiled scan, same outputs as above."""
    train_x, train_y, test_x, test_y = data
    optimizer = optax.adam(learning_rate)

    def objective(p):
        return xj.mean_cross_entropy(mlp_logits, p, train_x, train_y)

    def step(carry, _):
        p, opt_state = carry
        grad = jax.grad(objective)(p)
        updates, opt_state = optimizer.update(grad, opt_state, p)
        p = optax.apply_updates(p, updates)
        return (p, opt_state), (objective(p), accuracy(p, test_x, test_y))

    (params, _), (losses, accuracies) = jax.lax.scan(
        step, (params, optimizer.init(params)), length=num_steps
    )
    return params, losses, accuracies


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
    gn_steps, adam_steps = (10, 100) if SMALL else (40, 1500)
    print(f"devices {jax.devices()}")
    print(
        f"digits: {data[0].shape[0]} training / {data[2].shape[0]} test images; "
        f"MLP 64-{hidden}-{hidden}-10 with {num_params} parameters; full batch"
    )
    train_gn = jax.jit(train_gauss_newton, static_argnums=(2, 3))
    train_ad = jax.jit(train_adam, static_argnums=(2,))
    (_, gn_losses, gn_acc), gn_time = timed(train_gn, params, data, gn_steps, 20)
    (_, adam_losses, adam_acc), adam_time = timed(train_ad, params, data, adam_steps)
    gn_clock = gn_time * np.arange(1, gn_steps + 1) / gn_steps
    adam_clock = adam_time * np.arange(1, adam_steps + 1) / adam_steps

    print(f"{'method':26s} {'steps':>6s} {'time s':>8s} {'train loss':>11s} {'test acc':>9s}")
    print(
        f"{'Gauss-Newton (20 CG its)':26s} {gn_steps:6d} {gn_time:8.3f} "
        f"{float(gn_losses[-1]):11.2e} {float(gn_acc[-1]):9.3f}"
    )
    print(
        f"{'Adam (lr 1e-2)':26s} {adam_steps:6d} {adam_time:8.3f} "
        f"{float(adam_losses[-1]):11.2e} {float(adam_acc[-1]):9.3f}"
    )
    # Adam's loss when Gauss-Newton finished, at the same wall-clock time.
    at_same_time = int(np.searchsorted(adam_clock, gn_time))
    if at_same_time < adam_steps:
        print(
            f"at {gn_time:.3f} s Adam had taken {at_same_time + 1} steps: "
            f"train loss {float(adam_losses[at_same_time]):.2e} vs Gauss-Newton "
            f"{float(gn_losses[-1]):.2e}"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for clock, losses, acc, name in [
            (gn_clock, gn_losses, gn_acc, "Gauss-Newton"),
            (adam_clock, adam_losses, adam_acc, "Adam"),
        ]:
            axes[0].semilogy(clock, losses, label=name)
            axes[1].plot(clock, acc, label=name)
        axes[0].set(xlabel="seconds", ylabel="training loss")
        axes[1].set(xlabel="seconds", ylabel="test accuracy")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
