"""Preconditioned conjugate gradients on pytrees, plain and Steihaug, with an outcome code.

Both solve A x = b for a symmetric operator A given only as products ``v ↦ A v`` on pytrees
(for example ``ggn_operator``), with an optional preconditioner ``r ↦ M⁻¹ r`` (M symmetric
positive definite). Each iteration costs one product with A, one with M⁻¹ and O(P) vector work;
the loop is a ``lax.while_loop`` (``jit``- and ``vmap``-compatible, no host round trip), and
how it ended is reported as a :class:`CGStatus` code instead of being guessed from the
iterate. Called eagerly, a solve runs one compiled program, reused by later calls with the same
operator, or with another pytree operator of the same structure (``ggn_operator``'s), and the
same shapes.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._checks import check_real
from ._manual import vary_like, varying_carry, while_loop, zero_tangent
from ._precision import at_least_float32
from ._seen import Programs, holds_tracer

PyTree = Any
Operator = Callable[[PyTree], PyTree]


class CGStatus(enum.IntEnum):
    """How a CG solve ended (``CGResult.status`` holds the integer value).

    Attributes:
        CONVERGED: ‖b − A x‖ ≤ max(rtol·‖b‖, atol).
        MAX_STEPS: the step limit was reached first; raise ``max_steps`` or precondition.
        NEGATIVE_CURVATURE: a direction p with pᵀAp ≤ 0 was met, so A is not positive definite
            there. :func:`cg` returns the last iterate before it; :func:`steihaug_cg` follows p
            to the trust-region boundary.
        NON_FINITE: a product or a step size was NaN or infinite; the last finite iterate is
            returned. Check the operator (the right-hand side's own scale is taken out).
        BOUNDARY: (:func:`steihaug_cg` only) the iterate reached the trust-region boundary
            ‖x‖_M = radius along a direction of positive curvature.
        INVALID_RADIUS: (:func:`steihaug_cg` only) a traced radius that is not positive (zero,
            negative or NaN; a concrete one raises a ``ValueError``): no step was taken and the
            solution is 0.
    """

    CONVERGED = 0
    MAX_STEPS = 1
    NEGATIVE_CURVATURE = 2
    NON_FINITE = 3
    BOUNDARY = 4
    INVALID_RADIUS = 5


class CGResult(NamedTuple):
    """Outcome of a CG solve of A x = b.

    Attributes:
        solution: the approximate solution x, a pytree like ``rhs``.
        residual: b − A x: computed afresh after a verified ``CONVERGED`` (:func:`cg`),
            otherwise kept up to date by the recurrence (no extra product).
        status: int32 scalar, a :class:`CGStatus` value.
        num_steps: int32 scalar, the iterations taken (one product with A each; a non-zero
            ``x0`` costs one more product before the loop).
        residual_norm: ‖b − A x‖₂.
    """

    solution: PyTree
    residual: PyTree
    status: jax.Array
    num_steps: jax.Array
    residual_norm: jax.Array


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ over leaves of ⟨aᵢ, bᵢ⟩, accumulated in at least float32."""
    # Widened before the product: float16's vdot rounds every partial sum (‖r‖² of a right-hand
    # side of 1e-4 came out 0, CONVERGED after 2 steps; of 100, inf, NON_FINITE at step 0).
    terms = [
        jnp.vdot(x.astype(wide), y.astype(wide))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        for wide in [at_least_float32(x, y)]
    ]
    return sum(terms[1:], terms[0]) if terms else jnp.zeros((), jnp.float32)


def _axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """The pytree y + α x, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda a, b: b + alpha.astype(jnp.result_type(b)) * a, x, y)


def _where(condition: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), x, y)


def _check_inputs(
    rhs: PyTree,
    x0: PyTree | None,
    rtol: Any,
    atol: Any,
    max_steps: Any,
    entry_tol: PyTree | None = None,
) -> int:
    leaves = jax.tree.leaves(rhs)
    if not leaves:
        raise ValueError("rhs must have at least one array leaf.")
    for leaf in leaves:
        # Real only: complex leaves solved, but reverse mode took the Hermitian operator's
        # transpose for itself and returned conjugated gradients.
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"every leaf of rhs must be real floating, got {jnp.result_type(leaf)}."
            )
    if x0 is not None:
        try:  # chex names the first leaf that differs by its path in the tree
            chex.assert_trees_all_equal_shapes(x0, rhs)
        except AssertionError as error:
            detail = str(error).split("failed:", 1)[-1].strip()
            raise ValueError(f"x0 must match rhs leaf by leaf: {detail}") from None
    for name, value in (("rtol", rtol), ("atol", atol)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
    if entry_tol is not None:
        try:  # leaf by leaf, each broadcasting against rhs's
            jax.tree.map(
                lambda b, t: jnp.broadcast_shapes(jnp.shape(b), jnp.shape(t)), rhs, entry_tol
            )
        except ValueError as error:
            raise ValueError(
                f"entry_tol must broadcast against rhs leaf by leaf: {error}"
            ) from None
    entry_tols = [("entry_tol", leaf) for leaf in jax.tree.leaves(entry_tol)]
    for name, value in [("rtol", rtol), ("atol", atol), *entry_tols]:
        if value is None:
            raise TypeError(f"{name} must be a non-negative number, got None.")
        check_real(name, value)  # strings; complex, whose imaginary part was dropped
        if not isinstance(value, jax.core.Tracer) and not np.all(np.asarray(value) >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
    if max_steps is None:
        return _num_unknowns(rhs)
    if not isinstance(max_steps, jax.core.Tracer) and not (
        np.ndim(max_steps) == 0
        and np.isfinite(max_steps)
        and int(max_steps) == max_steps
        and 0 <= max_steps <= 2**31 - 1  # CG counts its steps in int32
    ):
        raise ValueError(f"max_steps must be an integer in [0, 2**31 - 1], got {max_steps!r}.")
    return max_steps


def _num_unknowns(rhs: PyTree) -> int:
    """The number of entries of b, CG's default step limit."""
    return sum(int(np.prod(jnp.shape(leaf))) for leaf in jax.tree.leaves(rhs))


def _as_arrays(tree: PyTree | None) -> PyTree | None:
    """The leaves as JAX arrays: Python floats and NumPy scalars failed on ``.astype``."""
    return jax.tree.map(jnp.asarray, tree)


class _State(NamedTuple):
    solution: PyTree
    residual: PyTree
    direction: PyTree
    rho: jax.Array  # rᵀ M⁻¹ r
    num_steps: jax.Array
    status: jax.Array
    # Steihaug only: ‖x‖²_M, xᵀMp and pᵀMp by recurrence (no product with M).
    x_norm2: jax.Array
    x_dot_p: jax.Array
    p_norm2: jax.Array


_RUNNING = -1


def _run(
    operator: Operator,
    rhs: PyTree,
    x0: PyTree | None,
    radius: jax.Array | None,
    preconditioner: Operator | None,
    rtol: Any,
    atol: Any,
    max_steps: Any,
    entry_tol: PyTree | None,
    verify: bool = False,
) -> CGResult:
    """Check the arguments, then solve; an eager call runs a compiled program.

    Eagerly, ``lax.while_loop`` traces and compiles its body on every call (0.4-0.5 s for a
    small network's Gauss-Newton operator, for each solve). Eager calls therefore go through
    a ``jax.jit`` program per static part (`Programs`, the last 16 kept): an operator that is a
    pytree of arrays (a ``jax.tree_util.Partial`` such as ``ggn_operator``'s) travels as an
    argument, so a new operator of the same structure reuses the program; any other callable
    is compiled into one from its second call on (a new lambda at every call is solved in
    place). Inside a trace (``jit``, ``vmap``, ``grad``) the loop is traced in place.
    """
    rhs, x0 = _as_arrays(rhs), _as_arrays(x0)
    max_steps = _check_inputs(rhs, x0, rtol, atol, max_steps, entry_tol)
    arguments = (rhs, x0, radius, rtol, atol, max_steps, entry_tol)
    leaves = jax.tree.leaves((arguments, operator, preconditioner))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return _solve(operator, preconditioner, *arguments, verify=verify)
    (operator_leaves, operator_static), (preconditioner_leaves, preconditioner_static) = (
        _split_callable(operator),
        _split_callable(preconditioner),
    )
    statics = (operator_static, preconditioner_static)
    pytrees = all(s is None or isinstance(s, jax.tree_util.PyTreeDef) for s in statics)
    program = _PROGRAMS((*statics, verify), compile_first=pytrees)
    if program is None:
        return _solve(operator, preconditioner, *arguments, verify=verify)
    return program(operator_leaves, preconditioner_leaves, *arguments)


def _split_callable(function: Operator | None) -> tuple[list, Any]:
    """``(array leaves, static part)`` of an operator.

    A pytree whose leaves are all arrays splits into its leaves and its (hashable) structure;
    any other callable is its own static part.
    """
    if function is None:
        return [], None
    leaves, treedef = jax.tree.flatten(function)
    if all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
        return leaves, treedef
    return [], function


def _join_callable(leaves: list, static: Any) -> Operator | None:
    if isinstance(static, jax.tree_util.PyTreeDef):
        return jax.tree.unflatten(static, leaves)
    return static


def _solve_program(key: tuple) -> Callable:
    """The compiled solve for one (operator structure, preconditioner structure, verify)."""
    operator_static, preconditioner_static, verify = key

    def solve(operator_leaves: list, preconditioner_leaves: list, *args: Any) -> CGResult:
        operator = _join_callable(operator_leaves, operator_static)
        preconditioner = _join_callable(preconditioner_leaves, preconditioner_static)
        return _solve(operator, preconditioner, *args, verify=verify)

    return jax.jit(solve)


# Pytree operators (a `Partial` of arrays, as `ggn_operator`'s) are compiled at once: a new one
# of the same structure reuses the program. Other callables are compiled from their second call
# on, so that a new function at every call (a lambda written in a loop) is never compiled.
_PROGRAMS = Programs(_solve_program)


def _check_map(name: str, function: Operator, rhs: PyTree) -> None:
    """Raise ValueError unless ``function`` maps rhs to a pytree of rhs's structure and shapes.

    Checked on abstract values, where the solve is traced: a map that returned another shape
    failed inside the loop with JAX's "dot_general requires contracting dimensions to have
    the same shape", which names neither the operator nor the preconditioner.
    """
    out = jax.eval_shape(function, rhs)
    shapes = jax.tree.map(jnp.shape, rhs)
    if jax.tree.structure(out) != jax.tree.structure(rhs) or jax.tree.map(jnp.shape, out) != shapes:
        got = jax.tree.map(jnp.shape, out)
        raise ValueError(
            f"the {name} must map rhs to a pytree of the same structure and shapes: rhs has "
            f"{shapes}, the {name} returned {got}."
        )
    # A wider output (a float64 matrix applied to float32 rhs) failed in the loop with JAX's
    # "carry input and carry output must have equal types"; a narrower one is promoted.
    for given, returned in zip(jax.tree.leaves(rhs), jax.tree.leaves(out), strict=True):
        given, returned = jnp.result_type(given), jnp.result_type(returned)
        if jnp.promote_types(given, returned) != given:
            raise ValueError(
                f"the {name} returned {returned} for a {given} leaf of rhs: cast its output "
                f"to {given} (or rhs to a wider real dtype)."
            )


def _scale_exponent(rhs: PyTree, steihaug: bool) -> jax.Array:
    """The e of max|b| in [2^(e−1), 2^e) where b is to be scaled by 2⁻ᵉ, otherwise 0 (int32).

    CG is linear in b: A(x·2⁻ᵉ) = b·2⁻ᵉ runs the same steps with every vector scaled by a power
    of two, and its scalars (α, β, the ratios of the norms) unchanged. Solved as given, a
    float32 b of 1e-19 had ‖b‖² and ‖r‖² underflow to 0, taken as an exact zero residual:
    CONVERGED after one step 28% off, or at x = 0 (and b of 1e19 overflowed to NON_FINITE at
    step 0). b is scaled only where ‖b‖², summed as CG sums it (`tree_vdot`), leaves the range
    in which the solve works as given: above the smallest normal number by 2⁴⁰ (room for the
    residual's fall by rtol², the test's (rtol·‖b‖)²) and below the largest by 2⁸; Steihaug's
    boundary step multiplies squared norms, and there ‖b‖² stays within the square root of the
    range (float32 b of 1e-15 or 1e15 met radius²·‖p‖² out of range: x = 0). Elsewhere the
    solve is the unscaled one, bit for bit; where b is scaled, a leaf of a narrower dtype far
    below the largest entry (float16 beside float32 at 1e20) may lose its smallest entries.
    """
    leaves = [lax.stop_gradient(leaf) for leaf in jax.tree.leaves(rhs)]
    norm2 = tree_vdot(leaves, leaves)
    info = jnp.finfo(norm2.dtype)
    if steihaug:
        low, high = info.minexp // 2, info.maxexp // 2
    else:
        low, high = info.minexp + 40, info.maxexp - 8
    one = jnp.ones((), norm2.dtype)
    # (0 included: squares below the smallest normal number are flushed to 0 on CPU.)
    outside = ~(jnp.ldexp(one, low) <= norm2) | ~(norm2 <= jnp.ldexp(one, high))
    peak = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(leaf), initial=0).astype(norm2.dtype) for leaf in leaves]
    )
    far = outside & jnp.isfinite(peak) & (peak > 0)
    return jnp.where(far, jnp.frexp(peak)[1], 0).astype(jnp.int32)


def _times_power_of_two(tree: PyTree, exponent: jax.Array) -> PyTree:
    """Every leaf times 2^exponent (`ldexp`, exact: `exp2` was 17 ulps off at -63)."""

    def scale(leaf):
        wide = at_least_float32(leaf)
        scaled = jnp.ldexp(jnp.asarray(leaf, wide), exponent)
        # Floating leaves keep their dtype; an integer tolerance becomes a floating one.
        return scaled.astype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else scaled

    return jax.tree.map(scale, tree)


def _solve(
    operator: Operator,
    preconditioner: Operator | None,
    rhs: PyTree,
    x0: PyTree | None,
    radius: jax.Array | None,
    rtol: Any,
    atol: Any,
    max_steps: Any,
    entry_tol: PyTree | None,
    verify: bool = False,
) -> CGResult:
    """CG from x0 (or 0) on b scaled by a power of two (`_scale_exponent`), then verified."""
    exponent = _scale_exponent(rhs, steihaug=radius is not None)
    down = functools.partial(_times_power_of_two, exponent=-exponent)
    if radius is not None:
        radius = down(jnp.asarray(radius))
    result = _iterate(
        operator,
        preconditioner,
        down(rhs),
        None if x0 is None else down(x0),
        radius,
        rtol,
        down(jnp.asarray(atol)),
        max_steps,
        None if entry_tol is None else down(_as_arrays(entry_tol)),
    )
    up = functools.partial(_times_power_of_two, exponent=exponent)
    result = result._replace(
        solution=up(result.solution),
        residual=up(result.residual),
        residual_norm=up(result.residual_norm),
    )
    if not verify:
        return result

    # Until b − A x, computed afresh at x (one product), is within tolerance: CG restarts from x
    # while its recurrence reports CONVERGED and steps remain, and a fresh residual that passes
    # at once (no step taken) is the verified end.
    def unverified(carry: tuple[CGResult, jax.Array]) -> jax.Array:
        result, verified = carry
        return (result.status == CGStatus.CONVERGED) & ~verified

    def restart(carry: tuple[CGResult, jax.Array]) -> tuple[CGResult, jax.Array]:
        result, _ = carry
        again = _solve(
            operator,
            preconditioner,
            rhs,
            result.solution,
            None,
            rtol,
            atol,
            max_steps - result.num_steps,
            entry_tol,
        )
        combined = again._replace(num_steps=result.num_steps + again.num_steps)
        return combined, again.num_steps == 0

    result, _ = while_loop(unverified, restart, (result, jnp.zeros((), bool)))
    return result


def _iterate(
    operator: Operator,
    preconditioner: Operator | None,
    rhs: PyTree,
    x0: PyTree | None,
    radius: jax.Array | None,
    rtol: Any,
    atol: Any,
    max_steps: Any,
    entry_tol: PyTree | None,
) -> CGResult:
    """The CG (or Steihaug-Toint) iteration from x0 (or 0), the residual by recurrence."""

    def small(residual: PyTree, residual_norm2: jax.Array) -> jax.Array:
        """‖r‖₂ within tolerance, or every entry within its own (``entry_tol``).

        An exact zero residual is solved whatever the tolerance: with a NaN one (traced, so not
        checked), the next direction was 0 and pᵀAp = 0 ended the solve as NEGATIVE_CURVATURE.
        """
        done = (residual_norm2 <= tolerance**2) | (residual_norm2 == 0)
        if entry_tol is not None:
            within = jax.tree.map(lambda r, t: jnp.all(jnp.abs(r) <= t), residual, entry_tol)
            done = done | jnp.all(jnp.stack(jax.tree.leaves(within)))
        return done

    for name, function in (("operator", operator), ("preconditioner", preconditioner)):
        if function is not None:
            _check_map(name, function, rhs)
    precondition = preconditioner if preconditioner is not None else (lambda r: r)
    if x0 is None:
        solution = jax.tree.map(jnp.zeros_like, rhs)
        residual = rhs
    else:
        solution = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), x0, rhs)
        residual = jax.tree.map(jnp.subtract, rhs, operator(solution))
    rhs_norm = jnp.sqrt(tree_vdot(rhs, rhs))
    scalar = rhs_norm.dtype
    tolerance = jnp.maximum(jnp.asarray(rtol, scalar) * rhs_norm, jnp.asarray(atol, scalar))
    max_steps = jnp.asarray(max_steps, jnp.int32)
    preconditioned = precondition(residual)
    rho = tree_vdot(residual, preconditioned)
    residual_norm2 = tree_vdot(residual, residual)
    start_status = jnp.where(
        ~jnp.isfinite(residual_norm2) | ~jnp.isfinite(rho),
        CGStatus.NON_FINITE,
        jnp.where(
            small(residual, residual_norm2),
            CGStatus.CONVERGED,
            jnp.where(max_steps <= 0, CGStatus.MAX_STEPS, _RUNNING),
        ),
    ).astype(jnp.int32)
    zero = jnp.zeros((), scalar)
    state = _State(
        solution=solution,
        residual=residual,
        direction=preconditioned,
        rho=rho,
        num_steps=jnp.zeros((), jnp.int32),
        status=start_status,
        x_norm2=zero,
        x_dot_p=zero,
        p_norm2=rho,
    )
    steihaug = radius is not None
    if steihaug:
        radius = jnp.asarray(radius, scalar)
        # A negative radius would act as its absolute value (only radius² enters) and a NaN one
        # as no region at all.
        state = state._replace(
            status=jnp.where(radius > 0, state.status, CGStatus.INVALID_RADIUS).astype(jnp.int32)
        )

    def to_boundary(s: _State) -> jax.Array:
        """τ ≥ 0 with ‖x + τp‖_M = radius (the root of a quadratic, without cancellation)."""
        gap = jnp.maximum(radius**2 - s.x_norm2, 0)
        root = jnp.sqrt(s.x_dot_p**2 + s.p_norm2 * gap)
        return jnp.where(
            s.x_dot_p >= 0,
            gap / jnp.where(s.x_dot_p + root > 0, s.x_dot_p + root, 1),
            (root - s.x_dot_p) / jnp.where(s.p_norm2 > 0, s.p_norm2, 1),
        )

    def cond(s: _State) -> jax.Array:
        return s.status == _RUNNING

    def body(s: _State) -> _State:
        product = operator(s.direction)
        curvature = tree_vdot(s.direction, product)
        alpha = s.rho / jnp.where(curvature != 0, curvature, 1)
        negative = curvature <= 0
        next_x_norm2 = s.x_norm2 + 2 * alpha * s.x_dot_p + alpha**2 * s.p_norm2
        if steihaug:
            crosses = ~negative & (next_x_norm2 >= radius**2)
            step_alpha = jnp.where(negative | crosses, to_boundary(s), alpha)
        else:
            crosses = jnp.zeros((), bool)
            step_alpha = jnp.where(negative, 0, alpha)
        solution = _axpy(step_alpha, s.direction, s.solution)
        residual = _axpy(-step_alpha, product, s.residual)
        preconditioned = precondition(residual)
        rho = tree_vdot(residual, preconditioned)
        residual_norm2 = tree_vdot(residual, residual)
        finite = jnp.isfinite(curvature) & jnp.isfinite(alpha) & jnp.isfinite(rho)
        finite &= jnp.isfinite(residual_norm2)
        num_steps = s.num_steps + 1
        status = jnp.where(
            ~finite,
            CGStatus.NON_FINITE,
            jnp.where(
                negative,
                CGStatus.NEGATIVE_CURVATURE,
                jnp.where(
                    crosses,
                    CGStatus.BOUNDARY,
                    jnp.where(
                        small(residual, residual_norm2),
                        CGStatus.CONVERGED,
                        jnp.where(num_steps >= max_steps, CGStatus.MAX_STEPS, _RUNNING),
                    ),
                ),
            ),
        ).astype(jnp.int32)
        beta = rho / jnp.where(s.rho != 0, s.rho, 1)
        direction = _axpy(beta, s.direction, preconditioned)
        x_dot_p = beta * (s.x_dot_p + alpha * s.p_norm2)
        p_norm2 = rho + beta**2 * s.p_norm2
        new = _State(
            solution, residual, direction, rho, num_steps, status, next_x_norm2, x_dot_p, p_norm2
        )
        # A non-finite step keeps the last finite iterate.
        kept = s._replace(num_steps=num_steps, status=status)
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)

    final = while_loop(cond, body, state)
    result = CGResult(
        solution=final.solution,
        residual=final.residual,
        status=final.status,
        num_steps=final.num_steps,
        residual_norm=jnp.sqrt(tree_vdot(final.residual, final.residual)),
    )
    return result


def cg(
    operator: Operator,
    rhs: PyTree,
    *,
    x0: PyTree | None = None,
    preconditioner: Operator | None = None,
    rtol: jax.typing.ArrayLike = 1e-5,
    atol: jax.typing.ArrayLike = 0.0,
    max_steps: jax.typing.ArrayLike | None = None,
    entry_tol: PyTree | None = None,
    verify: bool = True,
) -> CGResult:
    """Preconditioned conjugate gradients for A x = b on pytrees, with an outcome code.

    For A symmetric positive definite, iterate k minimises the quadratic ½xᵀAx − bᵀx over
    x₀ + span{M⁻¹r₀, (M⁻¹A)M⁻¹r₀, …}; with x₀ = 0 and A ≻ 0 every iterate is a descent
    direction of that quadratic. The recurrences (Hestenes-Stiefel, preconditioned):

        α = rᵀz / pᵀAp,  x ← x + αp,  r ← r − αAp,  z = M⁻¹r,  β = r'ᵀz' / rᵀz,  p ← z' + βp.

    It stops when ‖r‖₂ ≤ max(rtol·‖b‖₂, atol) or, given ``entry_tol``, when every entry has
    |rᵢ| ≤ entry_tolᵢ (``CONVERGED``), after ``max_steps`` iterations
    (``MAX_STEPS``), at a direction with pᵀAp ≤ 0, returning the iterate before it
    (``NEGATIVE_CURVATURE``; with x₀ = 0 at the first step that is 0), or when a number turns
    non-finite, returning the last finite iterate (``NON_FINITE``). Cost per iteration: one
    product with A, one with M⁻¹, and a few O(P) vector operations. A right-hand side whose
    squared norm leaves the range where the solve works as given (about 2^-86 to 2^120 in
    float32; for :func:`steihaug_cg`, 2^±63) is solved as b·2⁻ᵉ, max|b| in [1/2, 1), with
    ``x0``, ``atol``, ``entry_tol`` (and the radius) scaled alike, and the solution scaled back:
    the same steps, where the squared norms of b itself would underflow or overflow (a float32
    b of 1e-19 was reported converged 28% off, one of 1e19 non-finite).

    Derivatives (``jax.grad``, ``jvp``, ``vmap`` of either, to any order) with respect to b and
    to the arrays the operator reads are those of the exact solution x = A⁻¹b, not of the
    iterations: ẋ = A⁻¹(ḃ − Ȧx), by one more CG solve (``lax.custom_linear_solve``; A is
    symmetric, so reverse mode solves with A too). That solve starts from 0 with ``rtol``, no
    ``atol`` or ``entry_tol`` (which are in b's units), and the larger of ``max_steps`` and
    the default step limit (it has A's conditioning), so ask for a tight ``rtol``. ``x0``, the
    preconditioner and the tolerances may depend on the differentiated values but carry no
    derivative: the exact solution does not depend on them. Any part of a pytree system may
    be left out of the differentiation (a constant leaf of b or block of A, an unused leaf of x).
    The derivatives assume A ≻ 0 and perturbations that keep A symmetric (a matrix used as
    ``A @ v`` differentiated along a non-symmetric direction gets the wrong second derivative);
    for a singular or indefinite A (a CG that ends ``NEGATIVE_CURVATURE``) they are not those of
    any solution. The other fields of the result carry no derivative. (:func:`steihaug_cg`,
    whose solution is not A⁻¹b, has none in reverse mode.)

    Args:
        operator: ``v ↦ A v`` on pytrees shaped like ``rhs``, A symmetric (e.g.
          :func:`xentropy_jax.ggn_operator`). An operator that is not a pytree of arrays is
          taken to be pure, as ``jax.jit`` takes the function it compiles: from its second
          eager call on it runs compiled, so what it reads besides its argument (an
          attribute that changes, a global) is frozen at that call. Pass arrays that change
          inside the operator, as ``jax.tree_util.Partial(matvec, arrays)``.
        rhs: b, a pytree of floating arrays.
        x0: optional starting point (a warm start), a pytree like ``rhs``; costs one product.
        preconditioner: optional ``r ↦ M⁻¹ r``, M symmetric positive definite (pure, as
          ``operator``).
        rtol: relative tolerance on ‖r‖₂ / ‖b‖₂ (may be traced).
        atol: absolute tolerance on ‖r‖₂ (may be traced).
        max_steps: iteration limit (may be traced); by default the number of unknowns.
        entry_tol: optional per-entry tolerances, a pytree like ``rhs`` (leaves broadcast
          against its leaves): also stop once every |rᵢ| ≤ entry_tolᵢ. Useful when the
          entries of b live on different scales, as a gradient whose parameters each have
          their own attainable accuracy: a 2-norm target set by the smallest can sit below
          the rounding of the largest.
        verify: when the recurrence's residual meets the tolerance, compute b − A x afresh (one
          more product) and, if it does not, go on with CG from x within the remaining steps,
          so that ``CONVERGED`` and ``residual`` hold for the true residual. The recurrence
          drifts from it on ill-conditioned systems: at condition 1e10 in float64 it reported
          5.9e-11 where ‖b − A x‖ was 1.6e-5. ``False`` trusts the recurrence (the package's
          inner Newton solves, which check their own progress).

    Returns:
        A :class:`CGResult` (solution, residual, status, num_steps, residual_norm).

    Raises:
        ValueError: if ``rhs`` is empty, ``x0`` does not match it, the operator or the
          preconditioner returns a pytree of another structure or shapes, or a tolerance /
          the step limit is negative (checked when concrete, ``entry_tol`` included).
        TypeError: if a leaf of ``rhs`` is not floating.

    Example:
        A pytree system, solved exactly in as many steps as unknowns:

        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> A = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
        >>> def operator(v):
        ...     x = A @ jnp.concatenate([v["a"], v["b"]])
        ...     return {"a": x[:2], "b": x[2:]}
        >>> rhs = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
        >>> result = xj.cg(operator, rhs, rtol=1e-6)
        >>> xj.CGStatus(int(result.status)).name, int(result.num_steps)
        ('CONVERGED', 3)
        >>> exact = jnp.linalg.solve(A, jnp.array([1.0, 2.0, 3.0]))
        >>> bool(jnp.allclose(jnp.concatenate([result.solution["a"], result.solution["b"]]),
        ...                   exact, atol=1e-5))
        True
    """
    if not holds_tracer(rhs, operator, preconditioner, x0, rtol, atol, max_steps, entry_tol):
        # Eager (no value of a trace, in the arguments or what the functions hold): nothing to
        # differentiate, and the compiled program of `_run` serves.
        return _run(
            operator, rhs, x0, None, preconditioner, rtol, atol, max_steps, entry_tol, verify
        )
    rhs, x0 = _as_arrays(rhs), _as_arrays(x0)
    max_steps = _check_inputs(rhs, x0, rtol, atol, max_steps, entry_tol)  # at the boundary
    # Inside `shard_map`, b typed as varying where CG's iterates will (`_manual`): the products
    # with A and M⁻¹ and the warm start vary them. The closures' jaxprs are specialised to it.
    start = rhs if x0 is None else x0
    precondition = (lambda r: r) if preconditioner is None else preconditioner
    rhs = varying_carry(
        lambda v: jax.tree.map(lambda *t: sum(t), operator(v), precondition(v), start), rhs
    )
    # The arrays A reads, as arguments, so that its derivative can be taken; those of M⁻¹, x0
    # and the tolerances carry none (the exact solution does not depend on them).
    matvec, consts = jax.closure_convert(operator, rhs)
    if preconditioner is not None:
        preconditioner, preconditioner_consts = jax.closure_convert(preconditioner, rhs)
    else:
        preconditioner_consts = []
    settings = jax.tree.map(
        lambda v: lax.stop_gradient(v) if isinstance(v, jax.core.Tracer) else v,
        (preconditioner_consts, x0, rtol, atol, max_steps, entry_tol),
    )
    return _solved(matvec, preconditioner, verify, consts, settings, rhs)


def _settled(preconditioner: Callable | None, settings: tuple) -> tuple:
    """The preconditioner and the other options of `_solved`, from its arguments."""
    consts, x0, rtol, atol, max_steps, entry_tol = settings
    if preconditioner is not None:
        preconditioner = functools.partial(_call_with, preconditioner, consts)
    return preconditioner, x0, rtol, atol, max_steps, entry_tol


def _call_with(function: Callable, consts: list, value: PyTree) -> PyTree:
    return function(value, *consts)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _solved(
    matvec: Callable,
    preconditioner: Callable | None,
    verify: bool,
    consts: list,
    settings: tuple,
    rhs: PyTree,
) -> CGResult:
    """CG for A x = b, A = ``matvec(·, *consts)``, differentiated as the exact solve."""
    precondition, x0, rtol, atol, max_steps, entry_tol = _settled(preconditioner, settings)
    operator = functools.partial(_call_with, matvec, consts)
    return _run(operator, rhs, x0, None, precondition, rtol, atol, max_steps, entry_tol, verify)


@_solved.defjvp
def _solved_jvp(
    matvec: Callable,
    preconditioner: Callable | None,
    verify: bool,
    primals: tuple,
    tangents: tuple,
) -> tuple[CGResult, CGResult]:
    """ẋ = A⁻¹(ḃ − Ȧx): ``custom_linear_solve`` with A symmetric, so reverse mode solves with A.

    ẋ's system has a right-hand side of its own scale: its solve takes the relative tolerance
    only, from 0 (x0, atol and entry_tol belong to b's system: reused, an atol gave a zero
    derivative and a warm start one 3.5e3 off). It has A's conditioning, so it may take as
    many steps as b's: the step limit is the larger of ``max_steps`` and the number of
    unknowns (the default alone left a gradient 0.2 off at condition 1e6, where b's solve
    took 505 steps for 60 unknowns).
    """
    consts, settings, rhs = primals
    consts_dot, _, rhs_dot = tangents
    result = _solved(matvec, preconditioner, verify, consts, settings, rhs)
    x = result.solution
    _, moved = jax.jvp(lambda *c: matvec(x, *c), tuple(consts), tuple(consts_dot))
    operator = functools.partial(_call_with, matvec, consts)
    precondition, _, rtol, _, max_steps, _ = _settled(preconditioner, settings)
    size = _num_unknowns(rhs)
    steps = (
        jnp.maximum(max_steps, size)
        if isinstance(max_steps, jax.core.Tracer)
        else max(int(max_steps), size)
    )

    def solve(matvec: Operator, b: PyTree) -> PyTree:
        return _run(matvec, b, None, None, precondition, rtol, 0.0, steps, None, verify).solution

    # Typed as b (inside `shard_map`), to which the closure's jaxpr is specialised.
    leaves, treedef = jax.tree.flatten(jax.tree.map(jnp.subtract, rhs_dot, moved))
    rhs_dot = treedef.unflatten(_linked(vary_like(leaves, jax.tree.leaves(rhs))))
    x_dot = lax.custom_linear_solve(operator, rhs_dot, solve, symmetric=True)
    x_dot = treedef.unflatten(_linked(jax.tree.leaves(x_dot)))
    return result, zero_tangent(result)._replace(solution=x_dot)


def _linked(leaves: list) -> list:
    """Each leaf plus 0·Σ(all leaves): the same values, each depending on every other.

    `lax.custom_linear_solve` differentiates a pytree system only when every leaf of b
    depends on the differentiated values, in both directions. A part of b that does not (a
    constant block of A, a constant leaf of b) failed ``jax.grad`` with a bare AssertionError
    inside JAX, and a leaf of x that the caller did not use (a zero cotangent) failed
    second-order derivatives with "Zero is not a valid JAX type". Linked, no leaf of b is a
    constant and no leaf of x gets a zero cotangent. Inside ``shard_map`` CG's scalars
    already mix all leaves, so they vary along the same axes.
    """
    link = 0 * sum(jnp.sum(leaf) for leaf in leaves)
    return [leaf + link.astype(leaf.dtype) for leaf in leaves]


def plain_cg(
    operator: Operator,
    rhs: PyTree,
    *,
    x0: PyTree | None = None,
    preconditioner: Operator | None = None,
    rtol: jax.typing.ArrayLike = 1e-5,
    atol: jax.typing.ArrayLike = 0.0,
    max_steps: jax.typing.ArrayLike | None = None,
    entry_tol: PyTree | None = None,
    verify: bool = True,
) -> CGResult:
    """:func:`cg` without its implicit derivatives, for the package's inner solves.

    Newton steps and the implicit derivative's own solve are never differentiated, and need
    no second trace of their operator.
    """
    return _run(operator, rhs, x0, None, preconditioner, rtol, atol, max_steps, entry_tol, verify)


def steihaug_cg(
    operator: Operator,
    rhs: PyTree,
    radius: jax.typing.ArrayLike,
    *,
    preconditioner: Operator | None = None,
    rtol: jax.typing.ArrayLike = 1e-5,
    atol: jax.typing.ArrayLike = 0.0,
    max_steps: jax.typing.ArrayLike | None = None,
    entry_tol: PyTree | None = None,
) -> CGResult:
    """Steihaug-Toint truncated CG for the trust-region problem min ½xᵀAx − bᵀx, ‖x‖_M ≤ radius.

    The CG iteration of :func:`cg` from x₀ = 0, whose iterates grow monotonically in the
    M-norm ‖x‖_M = √(xᵀMx) (M the preconditioner's matrix; the identity without one). It
    stops at the boundary ‖x‖_M = radius when the next iterate would leave the region
    (``BOUNDARY``) or when a direction of non-positive curvature pᵀAp ≤ 0 is met, which it
    follows to the boundary (``NEGATIVE_CURVATURE``), so A may be indefinite. Otherwise it
    ends as :func:`cg` does (``CONVERGED``, ``MAX_STEPS``, ``NON_FINITE``). ‖x‖_M, xᵀMp and
    pᵀMp follow their recurrences (xᵀMp' = β(xᵀMp + α pᵀMp), p'ᵀMp' = r'ᵀz' + β² pᵀMp), so
    only M⁻¹ is ever applied. Cost per iteration as :func:`cg`.

    Args:
        operator: ``v ↦ A v`` on pytrees shaped like ``rhs``, A symmetric (may be indefinite);
          pure, as :func:`cg`'s (from its second eager call on it runs compiled).
        rhs: b, a pytree of floating arrays (−gradient for a Newton step).
        radius: trust-region radius Δ > 0 (may be traced).
        preconditioner: optional ``r ↦ M⁻¹ r``, M symmetric positive definite; it also sets
          the norm of the region.
        rtol: relative tolerance on ‖r‖₂ / ‖b‖₂.
        atol: absolute tolerance on ‖r‖₂.
        max_steps: iteration limit; by default the number of unknowns.
        entry_tol: optional per-entry tolerances, as :func:`cg`: also stop (``CONVERGED``) once
          every |rᵢ| ≤ entry_tolᵢ.

    Returns:
        A :class:`CGResult`; ``status`` is ``BOUNDARY`` or ``NEGATIVE_CURVATURE`` when the
        solution lies on the boundary.

    Raises:
        ValueError: as :func:`cg`, or if ``radius`` is not positive (checked when concrete).
        TypeError: if a leaf of ``rhs`` is not floating.

    Example:
        With an indefinite A, the step goes to the boundary:

        >>> import jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> A = jnp.diag(jnp.array([2.0, -1.0]))
        >>> result = xj.steihaug_cg(lambda v: A @ v, jnp.array([1.0, 1.0]), radius=3.0)
        >>> xj.CGStatus(int(result.status)).name
        'NEGATIVE_CURVATURE'
        >>> round(float(jnp.linalg.norm(result.solution)), 4)
        3.0
    """
    if np.ndim(radius) != 0:
        raise ValueError(f"radius must be a scalar, got shape {np.shape(radius)}.")
    if not isinstance(radius, jax.core.Tracer) and not np.all(np.asarray(radius) > 0):
        raise ValueError(f"radius must be a positive number, got {radius!r}.")
    return _run(operator, rhs, None, radius, preconditioner, rtol, atol, max_steps, entry_tol)
