"""Values typed for ``jax.shard_map`` with ``check_vma``: loop carries, tangents, casts.

Inside ``shard_map``, JAX types every value by the manual mesh axes along which it varies over
the shards (the data split by rows vary, replicated parameters do not), and a loop's carry must
keep its type from one iteration to the next. A loop that starts from zeros and adds products
with the data therefore fails to trace ("carry input and carry output must have equal types").
:func:`varying_carry` gives the initial carry the type its body gives it: the body is traced
abstractly (``jax.eval_shape``), and each leaf is cast to varying along the axes its output
varies along, until nothing changes. Outside ``shard_map``, or with ``check_vma=False``, nothing
varies and the carry is returned as it is, without tracing anything. :func:`zero_tangent` types
a custom derivative's zero tangents the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType

PyTree = Any


def explicit_mesh(value: Any) -> Any:
    """The mesh of ``value``'s type if it has ``Explicit`` axes (``jax.make_mesh``'s default).

    None for a value typed on no mesh or on ``Auto`` or manual axes only. Works on concrete
    arrays and on tracers alike (``jax.typeof``).
    """
    mesh = getattr(getattr(jax.typeof(value), "sharding", None), "mesh", None)
    if any(kind == AxisType.Explicit for kind in getattr(mesh, "axis_types", ())):
        return mesh
    return None


def varying_axes(tree: PyTree) -> frozenset:
    """The manual mesh axes along which some leaf of ``tree`` (arrays or shape structs) varies."""
    axes = frozenset()
    for leaf in jax.tree.leaves(tree):
        mat = getattr(leaf, "manual_axis_type", None)
        if mat is None:
            mat = getattr(jax.typeof(leaf), "mat", None)
        axes |= getattr(mat, "varying", frozenset())
    return axes


def cast_varying(leaves: list, axes: list[tuple]) -> list:
    """Each leaf cast to varying along its axes (none: the leaf as it is)."""
    return [lax.pcast(x, a, to="varying") if a else x for x, a in zip(leaves, axes, strict=True)]


def vary_along(leaves: list, axes: list[frozenset]) -> list:
    """Each leaf cast to vary along its set of axes too (those it varies along already stay)."""
    return cast_varying(
        leaves,
        [tuple(sorted(a - varying_axes(x), key=str)) for x, a in zip(leaves, axes, strict=True)],
    )


def vary_like(leaves: list, types: list) -> list:
    """Each leaf cast to vary along the axes its counterpart in ``types`` varies along too."""
    return vary_along(leaves, [varying_axes(t) for t in types])


def _inside_shard_map() -> bool:
    """Whether manual mesh axes are in scope (``get_abstract_mesh`` is absent from older JAX)."""
    current_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    return current_mesh is not None and bool(getattr(current_mesh(), "manual_axes", ()))


def zero_tangent(tree: PyTree) -> PyTree:
    """Zero tangents for a pytree, each typed as its leaf (float0 for integer and bool leaves).

    A custom derivative rule must give each output a tangent of the output's type, including
    the manual axes along which it varies inside ``shard_map``; fresh zeros vary along none.
    """

    def zero(leaf: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            tangent = jnp.zeros_like(leaf)
        else:
            tangent = np.zeros(jnp.shape(leaf), jax.dtypes.float0)
        return vary_like([tangent], [leaf])[0]

    return jax.tree.map(zero, tree)


def varying_carry(body: Callable[[PyTree], PyTree], carry: PyTree) -> PyTree:
    """``carry`` with each leaf varying along the manual axes along which ``body(carry)``'s does.

    Args:
        body: one iteration, ``carry -> carry`` (wrap a scan's step to drop its output).
        carry: the initial carry.

    Returns:
        The carry, unchanged outside ``shard_map``; inside it, cast with ``jax.lax.pcast`` so
        that ``body`` maps its type to itself.
    """
    if not _inside_shard_map():
        return carry
    leaves, treedef = jax.tree.flatten(carry)
    # Each pass can only add axes (at most every manual axis to every leaf), so this ends.
    while True:
        out = jax.tree.leaves(jax.eval_shape(body, treedef.unflatten(leaves)))
        if all(varying_axes(o) <= varying_axes(c) for o, c in zip(out, leaves, strict=True)):
            return treedef.unflatten(leaves)
        leaves = vary_like(leaves, out)


def while_loop(cond: Callable, body: Callable, init: PyTree) -> PyTree:
    """``lax.while_loop`` whose initial carry is typed by :func:`varying_carry`."""
    return lax.while_loop(cond, body, varying_carry(body, init))


def fori_loop(lower: Any, upper: Any, body: Callable, init: PyTree) -> PyTree:
    """``lax.fori_loop`` whose initial carry is typed by :func:`varying_carry`."""
    return lax.fori_loop(lower, upper, body, varying_carry(lambda c: body(lower, c), init))


def scan(step: Callable, init: PyTree, xs: PyTree) -> tuple[PyTree, PyTree]:
    """``lax.scan`` whose initial carry is typed by :func:`varying_carry` (on the first slice)."""
    if any(jnp.shape(x)[0] == 0 for x in jax.tree.leaves(xs)):
        return lax.scan(step, init, xs)
    first = jax.tree.map(lambda x: x[0], xs)
    return lax.scan(step, varying_carry(lambda c: step(c, first)[0], init), xs)


def alike(branches: tuple[Callable, ...], *operands: Any) -> tuple[Callable, ...]:
    """``branches`` whose outputs are typed alike: each leaf varies where any branch's does.

    The branches of a ``lax.cond`` must give outputs of one type; inside ``shard_map`` one
    branch may read the data (a factorisation of the shard's Gram) and another not (a fallback
    that returns its input). Outside ``shard_map`` the branches are returned as they are.
    """
    if not _inside_shard_map():
        return branches
    outs = [jax.tree.leaves(jax.eval_shape(branch, *operands)) for branch in branches]
    axes = [frozenset().union(*map(varying_axes, leaves)) for leaves in zip(*outs, strict=True)]

    def typed(branch: Callable) -> Callable:
        def run(*args: Any) -> PyTree:
            leaves, treedef = jax.tree.flatten(branch(*args))
            return treedef.unflatten(vary_along(leaves, axes))

        return run

    return tuple(typed(branch) for branch in branches)


def cond(pred: Any, true_fun: Callable, false_fun: Callable, *operands: Any) -> PyTree:
    """``lax.cond`` whose branches give outputs of one type inside ``shard_map`` (:func:`alike`)."""
    return lax.cond(pred, *alike((true_fun, false_fun), *operands), *operands)
