"""`lax.cond` that stays a branch under `jax.vmap`.

Under `vmap`, a `lax.cond` whose predicate is batched becomes a select: every member of the
batch computes both branches. For a rare, costly branch beside a cheap one (the line search's
exact recomputation beside its one-pass sum) that makes a batch of fits (`vmap` over values of
l2, the cross-validation folds of `LogisticRegressionCV`) pay for the costly branch at every
step. `batch_cond` keeps one branch for the whole batch when every member's predicate agrees,
and computes both (then selects) only when they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._manual import alike


def batch_cond(
    pred: jax.Array, true_fun: Callable[..., Any], false_fun: Callable[..., Any], *operands: Any
) -> Any:
    """`lax.cond(pred, true_fun, false_fun, *operands)`, still a branch under `jax.vmap`.

    Unbatched, it is that `lax.cond`. With `pred` batched (one per member of a batch), the
    batch runs `true_fun` alone if every member's `pred` holds, `false_fun` alone if none
    does, and both, selecting member by member, otherwise.

    Args:
        pred: scalar boolean.
        true_fun: function of `operands`, run where `pred` holds. It must take every traced
            array it uses from `operands`: it may close over Python values (static
            settings), not over traced arrays.
        false_fun: the same, run where `pred` fails; returns the same pytree as `true_fun`.
        *operands: the branches' arguments (pytrees of arrays).

    Returns:
        The chosen branch's output.
    """
    true_fun, false_fun = alike((true_fun, false_fun), *operands)

    @jax.custom_batching.custom_vmap
    def cond(pred, *operands):
        return lax.cond(pred, true_fun, false_fun, *operands)

    @cond.def_vmap
    def cond_vmap(axis_size, in_batched, pred, *operands):
        if not any(jax.tree.leaves(in_batched)):
            # Forward mode under vmap batches the tangents alone (jax.hessian, jax.jacfwd of a
            # gradient): the rule is asked for the unbatched primal, which must stay unbatched.
            # Broadcast and marked batched, it failed jacfwd's out_axes=None for its value.
            out = lax.cond(pred, true_fun, false_fun, *operands)
            return out, jax.tree.map(lambda _: False, out)
        pred_batched, *operands_batched = in_batched
        # Leaf by leaf: mapped over a pytree node such as a BCOO, None axes rebuilt the node
        # around None leaves, which vmap did not take as a prefix of the operands.
        leaves, tree = jax.tree.flatten(operands)
        in_axes = [0 if batched else None for batched in jax.tree.leaves(operands_batched)]

        def on_leaves(fun):
            return jax.vmap(
                lambda *leaves: fun(*jax.tree.unflatten(tree, leaves)),
                in_axes=in_axes,
                axis_size=axis_size,
            )

        true_all, false_all = on_leaves(true_fun), on_leaves(false_fun)
        operands = leaves
        if not pred_batched:
            out = lax.cond(pred, true_all, false_all, *operands)
        else:

            def mixed(*operands):
                return jax.tree.map(
                    lambda chosen, other: jnp.where(
                        pred.reshape(pred.shape + (1,) * (chosen.ndim - 1)), chosen, other
                    ),
                    true_all(*operands),
                    false_all(*operands),
                )

            index = jnp.where(jnp.all(pred), 0, jnp.where(jnp.any(pred), 2, 1))
            out = lax.switch(index, (true_all, false_all, mixed), *operands)
        return out, jax.tree.map(lambda _: True, out)

    return cond(pred, *operands)
