"""The loss, its gradient and its Hessian on real data (scikit-learn's digits), checked.

A linear model's logits z = XW on the 8×8 digit images: the loss and its closed-form gradient
match optax's autodiff, the per-example Hessian diag(s) − ssᵀ is PSD with null vector 1 and
eigenvalues at most 1/2, and its product with a vector never forms the K×K matrix.

Run: ``python examples/loss_tour.py``
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import xentropy_jax as xj


def main() -> None:
    # JAX's persistent compilation cache: a second run loads the compiled programs from disk
    # instead of compiling them again (JAX_COMPILATION_CACHE_DIR, when set, takes precedence).
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/jax"))
    digits = load_digits()
    inputs = jnp.asarray(digits.data / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target)
    num_classes = 10
    weights = 0.1 * jax.random.normal(jax.random.key(0), (inputs.shape[1], num_classes))

    def mean_loss(w, loss_fn):
        return loss_fn(inputs @ w, labels).mean()

    ours, grad = jax.value_and_grad(mean_loss)(
        weights, xj.softmax_cross_entropy_with_integer_labels
    )
    theirs, grad_optax = jax.value_and_grad(mean_loss)(
        weights, optax.softmax_cross_entropy_with_integer_labels
    )
    print(f"digits: {inputs.shape[0]} images, {inputs.shape[1]} pixels, {num_classes} classes")
    print(f"mean loss   ours {float(ours):.6f}   optax {float(theirs):.6f}")
    print(
        f"gradient    max|ours - optax| = {float(jnp.max(jnp.abs(grad - grad_optax))):.2e} "
        f"(norm {float(jnp.linalg.norm(grad)):.4f})"
    )

    logits = inputs @ weights
    probs = jax.nn.softmax(logits)
    dlogits = jax.grad(lambda z: xj.softmax_cross_entropy_with_integer_labels(z, labels).sum())(
        logits
    )
    residual = float(jnp.max(jnp.abs(dlogits - (probs - jax.nn.one_hot(labels, num_classes)))))
    print(f"dL/dz = softmax(z) - onehot(y): max deviation {residual:.2e}")

    hessians = xj.softmax_cross_entropy_hessian(logits)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessians, np.float64))
    null = float(jnp.max(jnp.abs(hessians @ jnp.ones(num_classes))))
    print(
        f"per-example Hessians {tuple(hessians.shape)}: eigenvalues in "
        f"[{eigenvalues.min():.2e}, {eigenvalues.max():.4f}] (bound 1/2), max|H·1| = {null:.1e}"
    )
    tangents = jax.random.normal(jax.random.key(1), logits.shape)
    product = xj.softmax_cross_entropy_hvp(logits, tangents)
    dense = jnp.einsum("nij,nj->ni", hessians, tangents)
    print(f"matrix-free H·v vs dense: max deviation {float(jnp.max(jnp.abs(product - dense))):.2e}")

    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    step = weights - 5.0 * grad
    print(
        f"one gradient step (lr 5): loss {float(ours):.4f} -> "
        f"{float(mean_loss(step, xj.softmax_cross_entropy_with_integer_labels)):.4f}, "
        f"accuracy {accuracy:.3f} -> {float(jnp.mean(jnp.argmax(inputs @ step, -1) == labels)):.3f}"
    )


if __name__ == "__main__":
    main()
