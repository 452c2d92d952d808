"""Second-order optax transformations on the closed-form softmax cross-entropy curvature.

Three ``optax.GradientTransformationExtraArgs``, each a pure ``init``/``update`` pair with a
``NamedTuple`` state, on any parameter pytree, inside the user's ``jax.jit``:

* :func:`gauss_newton`: a damped Gauss-Newton (Hessian-free) step d solving (G + λI) d = −g by
  the package's :func:`~xentropy_jax.cg`, warm-started, with Levenberg-Marquardt damping;
* :func:`sophia_g` / :func:`scale_by_sophia_g`: Sophia with the Gauss-Newton-Bartlett diagonal
  (or the exact GGN diagonal), refreshed every k steps, and the clipped update;
* :func:`scale_by_ggn_diagonal`: a diagonal Gauss-Newton preconditioner g / (diag G + λ)^p to
  put in front of any optax optimiser.

The curvature belongs to the objective F(θ) = Σᵢ wᵢ L(zᵢ, yᵢ) / Σᵢ wᵢ of logits
z = logits_fn(θ, inputs), so ``update`` takes the model and the batch as extra keyword
arguments: ``logits_fn``, ``inputs``, and optionally ``sample_weight``, ``label_mass``, and
(for the damping rule of :func:`gauss_newton`) ``value_fn`` / ``value``, named as optax's
L-BFGS names them. ``optax.chain`` forwards them to every transformation that takes them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._cg import CGStatus, plain_cg, tree_vdot
from ._checks import check_flag as _check_flag
from ._checks import is_concrete as _is_concrete
from ._curvature import LogitsFn, PyTree, check_params, check_values, ggn_operator
from ._diagonals import ggn_diagonal, ggn_diagonal_bartlett, ggn_diagonal_hutchinson
from ._manual import cond
from ._precision import at_least_float32
from ._seen import Programs

ESTIMATORS = ("bartlett", "exact", "hutchinson")


def _check(
    name: str,
    value: Any,
    low: float,
    high: float = np.inf,
    closed: bool = True,
    *,
    below_high: bool = False,
    finite: bool = False,
    integer: bool = False,
) -> None:
    """Range check of a hyperparameter, when it is concrete (``inject_hyperparams`` traces).

    The value must be a number in [low, high] (``closed=False``: low excluded; ``below_high``:
    high excluded), finite when ``finite`` (inf is a valid bound elsewhere, such as no clipping),
    and a whole finite number when ``integer``.
    """
    if not _is_concrete(value) or callable(value):
        return
    dtype = np.asarray(value).dtype
    # jnp.issubdtype knows bfloat16, whose NumPy kind is "V": optax.inject_hyperparams casts
    # the hyperparameters to the parameters' dtype, and bfloat16 parameters were refused.
    if isinstance(value, (bool, np.bool_)) or not (
        jnp.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
    ):
        # np.asarray("1", dtype=float) is 1.0: a string passed, and failed later or never.
        raise TypeError(f"{name} must be a number, got {value!r}.")
    array = np.asarray(value, dtype=np.float64)
    ok = (array >= low if closed else array > low) & (array < high if below_high else array <= high)
    if finite or integer:
        ok &= np.isfinite(array)
    if integer:
        ok &= array == np.round(array)
    if array.ndim != 0 or not bool(ok):
        kind = "an integer" if integer else "a finite number" if finite else "a number"
        interval = f"{'[' if closed else '('}{low}, {high}{')' if below_high else ']'}"
        hint = ""
        small = jnp.issubdtype(dtype, np.floating) and jnp.finfo(dtype).bits <= 16
        if small and array.ndim == 0 and array == 0:
            hint = (
                f" In {dtype} a small positive value rounds to 0: optax.inject_hyperparams "
                "casts to the parameters' dtype unless given hyperparam_dtype=jnp.float32."
            )
        raise ValueError(f"{name} must be {kind} in {interval}, got {value!r}.{hint}")


def _check_order(low_name: str, low: Any, high_name: str, high: Any) -> None:
    """``low <= high`` for two hyperparameters, when both are concrete."""
    if all(_is_concrete(v) and not callable(v) for v in (low, high)) and not low <= high:
        raise ValueError(f"{low_name} must not exceed {high_name}, got {low!r} > {high!r}.")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")


def _require_model(
    name: str,
    updates: PyTree,
    params: PyTree | None,
    logits_fn: LogitsFn | None,
    inputs: PyTree | None,
) -> LogitsFn:
    """Check update's arguments; returns the model to call (`_MaskedModel` where masked)."""
    if params is None:
        raise ValueError(f"{name}: update(grads, state, params, ...) needs the current params.")
    # Before the gradients are cast to the parameters' dtypes: the float0 gradient of an
    # integer leaf (`jax.grad(..., allow_int=True)`) failed in that cast with an unrelated error.
    check_params(params)
    try:
        # Mismatches failed inside CG ("x0 must match rhs") or in a broadcast.
        trees = (jax.tree.map(jnp.asarray, tree) for tree in (updates, params))
        chex.assert_trees_all_equal_shapes(*trees)
    except AssertionError as error:
        detail = str(error).split("failed:", 1)[-1].strip()
        raise ValueError(
            f"{name}: the updates (gradients) must match params leaf by leaf (tree structure "
            f"and shapes): {detail}"
        ) from None
    if logits_fn is None or inputs is None:
        raise ValueError(
            f"{name}: update needs the model and batch as keyword arguments, "
            "update(grads, state, params, logits_fn=..., inputs=...): "
            "logits_fn(params, inputs) -> [N, K] logits."
        )
    masked = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    if any(isinstance(leaf, optax.MaskedNode) for leaf in masked):
        return _MaskedModel(logits_fn)
    return logits_fn


@dataclasses.dataclass(frozen=True)
class _MaskedModel:
    """A model called on params that ``optax.masked`` has partly replaced by ``MaskedNode``.

    ``optax.masked`` and ``optax.multi_transform`` hand a transformation only its own group of
    parameters, the others replaced by ``optax.MaskedNode()``; a model cannot run on those. The
    model's own error (an ``@`` with a ``MaskedNode``) is kept as the cause of one that says
    what to pass instead. ``gauss_newton``'s ``value_fn`` is wrapped alike (``name``).
    """

    logits_fn: Callable[..., jax.Array]
    name: str = "logits_fn"

    def __call__(self, params: PyTree, *inputs: PyTree) -> jax.Array:
        try:
            return self.logits_fn(params, *inputs)
        except Exception as error:
            example = {
                "logits_fn": "logits_fn=lambda p, x: model({**params, 'head': p['head']}, x)",
                "value_fn": "value_fn=lambda p: loss({**params, 'head': p['head']})",
            }[self.name]
            raise ValueError(
                f"{self.name} failed on params in which optax.masked (or optax.multi_transform) "
                "replaced the parameters outside this transformation's group by "
                f"optax.MaskedNode(). It needs them all: pass a {self.name} that puts the "
                f"current values back, e.g. {example} for a transformation of params['head'] "
                "(docs/optax.md)."
            ) from error


def _float_dtype(params: PyTree) -> jnp.dtype:
    leaves = jax.tree.leaves(params)
    return at_least_float32(*leaves) if leaves else jnp.dtype(jnp.float32)


def _is_key(seed: Any) -> bool:
    """Whether `seed` is a typed key array (`jax.random.key`), concrete or traced."""
    return isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)


def _check_seed(seed: Any) -> None:
    """A seed must be a key of the default implementation, or an integer of int64's range.

    A whole float (2.0) passed a numeric check and failed inside JAX, at `init`; a typed key
    was refused with NumPy's "cannot interpret" error.
    """
    if _is_key(seed):
        default = str(jax.random.key_impl(jax.random.key(0)))
        if seed.shape != () or str(jax.random.key_impl(seed)) != default:
            raise TypeError(
                f"seed must be an integer or a single key of the default implementation "
                f"({default}), as jax.random.key(0) makes; got a key of shape {seed.shape} "
                f"({jax.random.key_impl(seed)})."
            )
        return
    if not _is_concrete(seed):
        return
    if isinstance(seed, (bool, np.bool_)) or not (
        isinstance(seed, int) or (np.ndim(seed) == 0 and np.asarray(seed).dtype.kind in "iu")
    ):
        raise TypeError(f"seed must be an integer or a key from jax.random.key, got {seed!r}.")
    if isinstance(seed, int) and not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}.")


def _key_data(seed: Any) -> jax.Array:
    # Raw uint32 key data: a plain array leaf that every optax tree utility accepts.
    return jax.random.key_data(seed if _is_key(seed) else jax.random.key(seed))


def _curvature_zeros(params: PyTree) -> PyTree:
    """The first average of a curvature diagonal: zeros like ``params``, in at least float32.

    In bfloat16 an average h ← 0.99·h + 0.01·ĥ stops moving once 0.01·(ĥ − h) is below half an
    ulp of h: it settled at 0.65 of the diagonal it averaged, so every step came out 1.5 times too
    long. Gradient moments keep the parameters' dtype, as optax's own do.
    """
    return jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), at_least_float32(p)),
        params,
    )


def _estimate_diagonal(
    estimator: str,
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    key: jax.Array,
    sample_weight: jax.typing.ArrayLike | None,
    label_mass: jax.typing.ArrayLike,
) -> PyTree:
    options = {"sample_weight": sample_weight, "label_mass": label_mass}
    if estimator == "exact":
        return ggn_diagonal(logits_fn, params, inputs, **options)
    key = jax.random.wrap_key_data(key)
    if estimator == "hutchinson":
        return ggn_diagonal_hutchinson(logits_fn, params, inputs, key, **options)
    return ggn_diagonal_bartlett(logits_fn, params, inputs, key, **options)


# ---------------------------------------------------------------------------------------------
# Gauss-Newton / Hessian-free
# ---------------------------------------------------------------------------------------------


class GaussNewtonState(NamedTuple):
    """State of :func:`gauss_newton`.

    Attributes:
        damping: λ for the next step (adapted by the Levenberg-Marquardt rule).
        direction: the last CG solution d, a pytree like params (the next warm start).
        cg_steps: int32, CG iterations of the last solve.
        cg_status: int32, the :class:`~xentropy_jax.CGStatus` of the last solve.
        ratio: ρ = actual / predicted reduction of the last step; 0 where nothing is measured
            (before the first step, and without ``value_fn``).
        accepted: whether the last step was taken (a rejected step returns zero updates).
        count: int32, steps taken.
    """

    damping: jax.Array
    direction: PyTree
    cg_steps: jax.Array
    cg_status: jax.Array
    ratio: jax.Array
    accepted: jax.Array
    count: jax.Array


def gauss_newton(
    initial_damping: float = 1.0,
    max_cg_steps: int = 20,
    cg_rtol: float = 1e-4,
    warm_start_decay: float = 0.95,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    lower_ratio: float = 0.25,
    upper_ratio: float = 0.75,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
) -> optax.GradientTransformationExtraArgs:
    """Damped Gauss-Newton (Hessian-free) steps: d ≈ −(G + λI)⁻¹ g by truncated CG.

    At each step, with g the incoming gradient and G = Σᵢ cᵢ Jᵢᵀ(diag(sᵢ) − sᵢsᵢᵀ)Jᵢ the
    Gauss-Newton matrix of the batch (:func:`~xentropy_jax.ggn_operator`, one linearisation,
    then one GGN product per CG iteration):

    1. solve (G + λI) d = −g by :func:`~xentropy_jax.cg`, from x₀ = ``warm_start_decay`` · d_prev
       (Martens 2010), for at most ``max_cg_steps`` iterations or ‖r‖ ≤ ``cg_rtol``·‖g‖;
    2. the undamped quadratic model predicts the change m(d) = gᵀd + ½dᵀGd, with dᵀGd read off
       the CG residual r = −g − (G + λI)d as −gᵀd − dᵀr − λ‖d‖² (no extra product);
    3. if ``value_fn`` is given, the actual change f(θ + d) − f(θ) is measured (one forward
       pass, plus one for f(θ) unless ``value`` is passed) and ρ = actual / predicted adapts λ
       (Levenberg-Marquardt): λ ← λ·``damping_decrease`` if ρ > ``upper_ratio``,
       λ ← λ·``damping_increase`` if ρ < ``lower_ratio`` or the step is not finite, clipped to
       [``min_damping``, ``max_damping``], and left as it is where g is exactly zero (a batch
       of zero weights). A step that does not lower the loss is rejected (zero update).
       Without ``value_fn`` λ stays fixed and every finite descent step is taken.

    The update is d itself (learning rate 1: the curvature sets the scale); chain
    ``optax.scale(α)`` after it to shorten steps, knowing that the damping rule judges the full
    step. Cost per step: about 2 + ``max_cg_steps`` gradient evaluations (+1 for a warm start).

    ``update(grads, state, params, *, logits_fn, inputs, value_fn=None, value=None,
    sample_weight=None, label_mass=1.0)``: ``logits_fn(params, inputs) -> [N, K]`` is the model,
    ``inputs`` the batch, ``value_fn(params) -> scalar`` the training loss on the same batch
    (e.g. ``xj.mean_cross_entropy`` with the labels), ``value`` its value at ``params``.

    Args:
        initial_damping: finite λ₀ ≥ 0 (the state then carries λ; injecting it later changes
          nothing).
        max_cg_steps: CG iteration limit per step, an integer ≥ 1 (may be injected: it is a loop
          bound).
        cg_rtol: CG relative residual tolerance.
        warm_start_decay: factor in [0, 1] on the previous direction as CG's start; 0 starts
          from 0, so that d is a descent direction whenever CG stops.
        damping_increase: factor > 1 applied to λ after a poor or rejected step.
        damping_decrease: factor in (0, 1] applied to λ after a good step.
        lower_ratio: ρ below which the step counts as poor (at most ``upper_ratio``).
        upper_ratio: ρ above which the step counts as good.
        min_damping: lower bound of λ (at most ``max_damping``).
        max_damping: upper bound of λ.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with state :class:`GaussNewtonState`.

    Raises:
        ValueError: if a hyperparameter is out of range (when concrete), or, at ``update``, if
          ``params``, ``logits_fn`` or ``inputs`` is missing.

    Example:
        Three steps of multinomial logistic regression:

        >>> import jax, jax.numpy as jnp, optax
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jax.random.normal(jax.random.key(0), (64, 3))
        >>> y = jnp.argmax(X @ jnp.array([[1.0, -1, 0], [0, 1, -1], [1, 0, 1]]), -1)
        >>> optimizer = xj.gauss_newton(initial_damping=1e-2)
        >>> @jax.jit
        ... def step(W, state):
        ...     loss_fn = lambda w: xj.mean_cross_entropy(linear, w, X, y)
        ...     loss, grad = jax.value_and_grad(loss_fn)(W)
        ...     updates, state = optimizer.update(
        ...         grad, state, W, logits_fn=linear, inputs=X, value_fn=loss_fn, value=loss)
        ...     return optax.apply_updates(W, updates), state, loss
        >>> W = jnp.zeros((3, 3))
        >>> state = optimizer.init(W)
        >>> losses = []
        >>> for _ in range(3):
        ...     W, state, loss = step(W, state)
        ...     losses.append(float(loss))
        >>> losses[2] < losses[1] < losses[0]
        True
        >>> bool(state.accepted), xj.CGStatus(int(state.cg_status)).name
        (True, 'CONVERGED')
    """
    _check("initial_damping", initial_damping, 0.0, finite=True)
    _check("max_cg_steps", max_cg_steps, 1, 2**31 - 1, integer=True)  # int32: CG's counter
    _check("cg_rtol", cg_rtol, 0.0)
    _check("warm_start_decay", warm_start_decay, 0.0, 1.0)
    _check("damping_increase", damping_increase, 1.0)
    _check("damping_decrease", damping_decrease, 0.0, 1.0, closed=False)
    _check("lower_ratio", lower_ratio, -np.inf)
    _check("upper_ratio", upper_ratio, -np.inf)
    _check("min_damping", min_damping, 0.0)
    _check("max_damping", max_damping, 0.0)
    _check_order("lower_ratio", lower_ratio, "upper_ratio", upper_ratio)
    _check_order("min_damping", min_damping, "max_damping", max_damping)

    def init_fn(params: PyTree) -> GaussNewtonState:
        dtype = _float_dtype(params)
        return GaussNewtonState(
            # A copy: under optax.inject_hyperparams `initial_damping` is the state's own array,
            # and one buffer in two leaves cannot be donated ("donate the same buffer twice").
            damping=jnp.array(initial_damping, dtype, copy=True),
            direction=jax.tree.map(jnp.zeros_like, params),
            cg_steps=jnp.zeros((), jnp.int32),
            cg_status=jnp.asarray(CGStatus.CONVERGED, jnp.int32),
            # 0, not NaN: a NaN in the state stopped jit(init) and every step without value_fn
            # under jax_debug_nans, also in a program compiled before the check was turned on.
            ratio=jnp.zeros((), dtype),
            accepted=jnp.ones((), bool),
            count=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: GaussNewtonState,
        params: PyTree | None = None,
        *,
        logits_fn: LogitsFn | None = None,
        inputs: PyTree | None = None,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        value: jax.Array | None = None,
        sample_weight: jax.typing.ArrayLike | None = None,
        label_mass: jax.typing.ArrayLike = 1.0,
        **extra_args: Any,
    ) -> tuple[PyTree, GaussNewtonState]:
        del extra_args
        logits_fn = _require_model("gauss_newton", updates, params, logits_fn, inputs)
        if value_fn is not None and isinstance(logits_fn, _MaskedModel):
            value_fn = _MaskedModel(value_fn, "value_fn")
        if not jax.tree.leaves(params):  # nothing to fit (CG needs an unknown)
            return updates, state._replace(count=optax.safe_increment(state.count))
        # CG runs in the parameters' dtypes, which the GGN operator's vectors must have: float32
        # gradients of bfloat16 parameters failed inside it ("tangents must match params").
        grad = jax.tree.map(lambda g, p: jnp.asarray(g).astype(jnp.result_type(p)), updates, params)
        damping = state.damping
        operator = ggn_operator(
            logits_fn,
            params,
            inputs,
            sample_weight=sample_weight,
            label_mass=label_mass,
            damping=damping,
        )
        start = jax.tree.map(lambda d: jnp.asarray(warm_start_decay, d.dtype) * d, state.direction)
        result = plain_cg(
            operator,
            jax.tree.map(jnp.negative, grad),
            x0=start,
            rtol=cg_rtol,
            max_steps=max_cg_steps,
            verify=False,  # a truncated Newton step: the recurrence's residual serves
        )
        direction = result.solution
        grad_dot = tree_vdot(grad, direction)
        curvature = -grad_dot - tree_vdot(direction, result.residual)
        curvature = curvature - damping * tree_vdot(direction, direction)
        predicted = grad_dot + 0.5 * curvature
        finite = jnp.isfinite(predicted) & (result.status != CGStatus.NON_FINITE)
        descent = finite & (predicted < 0)
        dtype = damping.dtype
        if value_fn is None:
            ratio = jnp.zeros((), dtype)  # nothing measured
            accepted = descent
            new_damping = damping
        else:
            before = value_fn(params) if value is None else value
            candidate = jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, direction)
            actual = value_fn(candidate) - before
            measured = descent & jnp.isfinite(actual)
            # 0 where nothing is measured (as documented), not actual / −1.
            ratio = jnp.where(measured, actual / jnp.where(descent, predicted, -1), 0).astype(dtype)
            accepted = measured & (actual < 0)
            good = measured & (ratio > upper_ratio)
            poor = ~measured | (ratio < lower_ratio)
            new_damping = jnp.where(
                good,
                damping * damping_decrease,
                jnp.where(poor, damping * damping_increase, damping),
            )
            new_damping = jnp.clip(new_damping, min_damping, max_damping).astype(dtype)
            # A zero gradient (a batch whose weights are all 0, an exact optimum) says nothing
            # of the model's quality: λ climbed 1.5× per such step towards max_damping.
            new_damping = jnp.where(tree_vdot(grad, grad) == 0, damping, new_damping)
        step = jax.tree.map(
            lambda d, u: jnp.where(accepted, d, jnp.zeros_like(d)).astype(jnp.result_type(u)),
            direction,
            updates,
        )
        # A non-finite solve must not poison the next warm start.
        kept = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), direction)
        new_state = GaussNewtonState(
            damping=new_damping,
            direction=kept,
            cg_steps=result.num_steps,
            cg_status=result.status,
            ratio=ratio,
            accepted=accepted,
            count=optax.safe_increment(state.count),
        )
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# Diagonal estimates: Sophia-G and the diagonal preconditioner
# ---------------------------------------------------------------------------------------------


class SophiaGState(NamedTuple):
    """State of :func:`scale_by_sophia_g`.

    Attributes:
        count: int32, steps taken.
        mu: exponential moving average of the gradients m, a pytree like params.
        hessian: exponential moving average h of the diagonal estimates, a pytree like params
            in at least float32.
        key: uint32 PRNG key data for the label samples.
        num_refreshes: int32, estimates averaged into h so far (for the bias correction).
    """

    count: jax.Array
    mu: PyTree
    hessian: PyTree
    key: jax.Array
    num_refreshes: jax.Array


def _refresh(
    count: jax.Array,
    interval: Any,
    average: PyTree,
    decay: Any,
    key: jax.Array,
    estimator: str,
    params: PyTree,
    logits_fn: LogitsFn,
    inputs: PyTree,
    sample_weight: jax.typing.ArrayLike | None,
    label_mass: jax.typing.ArrayLike,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """Average h ← decay·h + (1 − decay)·ĥ when count % interval == 0 (a real branch).

    Returns the average, the next key and whether the estimate was averaged in (int32 0 or
    1, for the bias correction's count). A batch whose weights or label masses are all 0 has
    no curvature to estimate: its refresh is skipped, as `gauss_newton` leaves λ alone on a
    zero gradient (averaged in, its ĥ = 0 shrank h by the decay and counted as an estimate).
    """
    arrays = (count, interval, average, decay, key, params, inputs, sample_weight, label_mass)
    if _is_concrete(arrays):
        # The compiled program sees them traced: checked here, a negative or NaN weight came
        # out as a NaN update and a NaN average from the second eager call on.
        check_values(sample_weight, "sample_weight")
        check_values(label_mass, "label_mass")
        program = _REFRESHES((estimator, logits_fn))
        if program is not None:
            return program(*arrays)
    return _refreshed(estimator, logits_fn, *arrays)


def _refreshed(
    estimator: str,
    logits_fn: LogitsFn,
    count: jax.Array,
    interval: Any,
    average: PyTree,
    decay: Any,
    key: jax.Array,
    params: PyTree,
    inputs: PyTree,
    sample_weight: jax.typing.ArrayLike | None,
    label_mass: jax.typing.ArrayLike,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """`_refresh` itself: a `cond` on count % interval == 0 and some weight, around the estimate."""
    key, sample_key = jax.random.split(jax.random.wrap_key_data(key))
    sample_key = jax.random.key_data(sample_key)

    def estimate(avg: PyTree) -> PyTree:
        fresh = _estimate_diagonal(
            estimator, logits_fn, params, inputs, sample_key, sample_weight, label_mass
        )
        return jax.tree.map(
            lambda h, e: (decay * h + (1 - decay) * e.astype(h.dtype)).astype(h.dtype), avg, fresh
        )

    # All weights or all label masses exactly 0: nothing to estimate. Tested apart, so that a
    # bad shape meets the estimator's own check, and with `==`, so that NaN or negative values
    # (traced, not checked) still reach the estimate and show as NaN there.
    weight = jnp.asarray(1.0 if sample_weight is None else sample_weight)
    empty = jnp.all(weight == 0) | jnp.all(jnp.asarray(label_mass) == 0)
    refreshed = (count % interval == 0) & ~empty
    average = cond(refreshed, estimate, lambda avg: avg, average)
    return average, jax.random.key_data(key), refreshed.astype(jnp.int32)


# Called eagerly (an `update` outside `jit`), `_refreshed`'s branch was traced and compiled
# afresh at every step (its functions are new each time: 0.5-1 s a step). A compiled program per
# estimator and model, for the last 16 used more than once (`Programs`, as `ggn_vp`'s
# linearisations).
_REFRESHES = Programs(lambda key: jax.jit(functools.partial(_refreshed, *key)))


def scale_by_sophia_g(
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.05,
    eps: float = 1e-12,
    update_interval: int = 10,
    clip_threshold: float = 1.0,
    estimator: str = "bartlett",
    seed: int | jax.Array = 0,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Sophia's clipped, diagonally preconditioned direction with a Gauss-Newton diagonal.

    Sophia (Liu et al., 2023, "Sophia: A Scalable Stochastic Second-order Optimizer"):

        m ← b₁ m + (1 − b₁) g                                      every step,
        h ← b₂ h + (1 − b₂) ĥ                                       every ``update_interval`` steps,
        u = clip(m / max(γ h, ε), −c, c)                            c = ``clip_threshold``,

    where ĥ estimates diag(G) of the batch. ``estimator="bartlett"`` (Sophia-G) is the
    Gauss-Newton-Bartlett estimate ĝ⊙ĝ with ĝ the gradient of the loss at labels sampled from
    the model's own softmax, scaled by the batch size (:func:`~xentropy_jax.ggn_diagonal_bartlett`,
    unbiased; one forward and one backward pass); ``"exact"`` uses the exact diagonal
    (:func:`~xentropy_jax.ggn_diagonal`, K per-example backward passes); ``"hutchinson"`` the
    Hutchinson estimate (one GGN product). Refreshes happen at steps 0, k, 2k, …, inside a
    ``lax.cond``, so the other steps cost nothing extra; one whose batch has all weights (or all
    label masses) 0 is skipped (h and its count unchanged; before any refresh h = 0). As in the
    reference implementation there is no bias correction by default, so the first steps are
    mostly clipped (sign-like) steps; ``bias_correction=True`` corrects both averages as Adam
    does.

    ``update(grads, state, params, *, logits_fn, inputs, sample_weight=None, label_mass=1.0)``.
    Called eagerly, from its second call with the same ``logits_fn`` on ``update`` runs
    compiled and takes that function to be pure: what it reads besides its arguments is frozen
    at that call (docs/optax.md); pass what changes through ``inputs``.

    Args:
        b1: decay of the gradient average, in [0, 1).
        b2: decay of the curvature average, in [0, 1).
        gamma: γ > 0, the scale of the curvature in the denominator (Sophia's ρ).
        eps: ε > 0, the floor of the denominator.
        update_interval: integer k ≥ 1, steps between curvature refreshes.
        clip_threshold: c > 0, the per-coordinate bound of the update.
        estimator: ``"bartlett"`` (Sophia-G), ``"exact"`` or ``"hutchinson"``.
        seed: seed of the label samples / probes: an integer, or a key from ``jax.random.key``.
        bias_correction: divide m by 1 − b₁ᵗ after t steps and h by 1 − b₂ⁿ after n refreshes,
          as Adam does (not in the reference implementation; it helps short runs, where the
          averages start far below their values).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with state :class:`SophiaGState`; its updates
        follow the gradient's sign convention (scale by −learning rate afterwards).

    Raises:
        ValueError: for out-of-range hyperparameters or an unknown estimator, or at ``update`` if
          ``params``, ``logits_fn`` or ``inputs`` is missing.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jax.random.normal(jax.random.key(0), (32, 3))
        >>> W = jnp.zeros((3, 4))
        >>> transform = xj.scale_by_sophia_g(update_interval=2)
        >>> state = transform.init(W)
        >>> grad = jnp.ones((3, 4))
        >>> updates, state = transform.update(grad, state, W, logits_fn=linear, inputs=X)
        >>> bool(jnp.all(jnp.abs(updates) <= 1.0)), bool(jnp.all(state.hessian >= 0))
        (True, True)
    """
    _check("b1", b1, 0.0, 1.0, below_high=True)
    _check("b2", b2, 0.0, 1.0, below_high=True)
    _check("gamma", gamma, 0.0, closed=False, finite=True)
    _check("eps", eps, 0.0, closed=False)
    _check("update_interval", update_interval, 1.0, integer=True)
    _check("clip_threshold", clip_threshold, 0.0, closed=False)
    _check_estimator(estimator)
    _check_seed(seed)
    _check_flag("bias_correction", bias_correction)

    def init_fn(params: PyTree) -> SophiaGState:
        return SophiaGState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            hessian=_curvature_zeros(params),
            key=_key_data(seed),
            num_refreshes=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: SophiaGState,
        params: PyTree | None = None,
        *,
        logits_fn: LogitsFn | None = None,
        inputs: PyTree | None = None,
        sample_weight: jax.typing.ArrayLike | None = None,
        label_mass: jax.typing.ArrayLike = 1.0,
        **extra_args: Any,
    ) -> tuple[PyTree, SophiaGState]:
        del extra_args
        logits_fn = _require_model("scale_by_sophia_g", updates, params, logits_fn, inputs)
        if not jax.tree.leaves(params):  # an empty group: nothing to estimate, the model unread
            return updates, state._replace(count=optax.safe_increment(state.count))
        # In the moment's own dtype: float32 hyperparameters injected for float16 parameters
        # (`hyperparam_dtype`, as the check's message advises) promoted it, and a scan's carry
        # changed type.
        mu = jax.tree.map(
            lambda m, old: m.astype(old.dtype),
            optax.tree.update_moment(updates, state.mu, b1, 1),
            state.mu,
        )
        hessian, key, refreshed = _refresh(
            state.count,
            update_interval,
            state.hessian,
            b2,
            state.key,
            estimator,
            params,
            logits_fn,
            inputs,
            sample_weight,
            label_mass,
        )

        # Counted, not inferred from count and k: k may be injected and change between steps
        # (`optax.inject_hyperparams`), and ⌊count / k⌋ + 1 then corrected h 6× too little.
        num_refreshes = state.num_refreshes + refreshed
        if bias_correction:
            # m / (1 − b₁ᵗ) after t steps; h / (1 − b₂ⁿ) after n refreshes.
            mu_hat = optax.tree.bias_correction(mu, b1, optax.safe_increment(state.count))
            # No refresh yet (skipped ones): h = 0, and 1 − b₂⁰ = 0 would make it NaN.
            hessian_hat = optax.tree.bias_correction(hessian, b2, jnp.maximum(num_refreshes, 1))
        else:
            mu_hat, hessian_hat = mu, hessian

        def direction(m: jax.Array, h: jax.Array) -> jax.Array:
            # In h's dtype (at least float32): ε = 1e-12 is 0 in float16, and m/0 was NaN
            # wherever the gradient and the curvature were both 0 (an unused feature).
            ratio = m.astype(h.dtype) / jnp.maximum(gamma * h, eps)
            return jnp.clip(ratio, -clip_threshold, clip_threshold).astype(m.dtype)

        new_updates = jax.tree.map(direction, mu_hat, hessian_hat)
        new_state = SophiaGState(optax.safe_increment(state.count), mu, hessian, key, num_refreshes)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia_g(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.965,
    b2: float = 0.99,
    gamma: float = 0.05,
    weight_decay: float = 0.0,
    eps: float = 1e-12,
    update_interval: int = 10,
    clip_threshold: float = 1.0,
    estimator: str = "bartlett",
    seed: int | jax.Array = 0,
    bias_correction: bool = False,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G: :func:`scale_by_sophia_g`, decoupled weight decay, then −learning rate.

    θ ← θ − η (clip(m / max(γh, ε), −c, c) + λ_wd θ), as in the reference implementation
    (where decay is applied as θ ← (1 − ηλ_wd)θ). Each step costs one gradient (the caller's)
    and, every ``update_interval`` steps, one curvature estimate (see
    :func:`scale_by_sophia_g`). All numeric arguments can be injected with
    ``optax.inject_hyperparams(xj.sophia_g)(learning_rate=...)``.

    ``update(grads, state, params, *, logits_fn, inputs, sample_weight=None, label_mass=1.0)``.
    Called eagerly, from its second call with the same ``logits_fn`` on ``update`` runs
    compiled and takes that function to be pure: what it reads besides its arguments is frozen
    at that call (docs/optax.md); pass what changes through ``inputs``.

    Args:
        learning_rate: η, a number or an optax schedule.
        b1: decay of the gradient average.
        b2: decay of the curvature average.
        gamma: γ, the scale of the curvature in the denominator.
        weight_decay: λ_wd ≥ 0, decoupled weight decay.
        eps: floor of the denominator.
        update_interval: steps between curvature refreshes.
        clip_threshold: per-coordinate bound c of the preconditioned step.
        estimator: ``"bartlett"`` (Sophia-G), ``"exact"`` or ``"hutchinson"``.
        seed: seed of the label samples: an integer, or a key from ``jax.random.key``.
        bias_correction: divide m and h by 1 − b₁ᵗ and 1 − b₂ⁿ (n refreshes), as Adam does.
        mask: optional pytree or callable selecting the parameters to decay (as optax's).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (a chain; its state is a tuple whose first
        element is a :class:`SophiaGState`).

    Raises:
        ValueError: as :func:`scale_by_sophia_g`, or if ``weight_decay`` is negative.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jax.random.normal(jax.random.key(0), (64, 3))
        >>> y = jnp.argmax(X @ jnp.array([[1.0, -1, 0], [0, 1, -1], [1, 0, 1]]), -1)
        >>> optimizer = xj.sophia_g(learning_rate=0.1, update_interval=5)
        >>> loss_fn = lambda w: xj.mean_cross_entropy(linear, w, X, y)
        >>> @jax.jit
        ... def step(W, state):
        ...     grad = jax.grad(loss_fn)(W)
        ...     updates, state = optimizer.update(grad, state, W, logits_fn=linear, inputs=X)
        ...     return optax.apply_updates(W, updates), state
        >>> W = jnp.zeros((3, 3))
        >>> state = optimizer.init(W)
        >>> for _ in range(20):
        ...     W, state = step(W, state)
        >>> bool(loss_fn(W) < 0.5 * loss_fn(jnp.zeros((3, 3))))
        True
    """
    _check("weight_decay", weight_decay, 0.0)
    return optax.chain(
        scale_by_sophia_g(
            b1=b1,
            b2=b2,
            gamma=gamma,
            eps=eps,
            update_interval=update_interval,
            clip_threshold=clip_threshold,
            estimator=estimator,
            seed=seed,
            bias_correction=bias_correction,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


class ScaleByGGNDiagonalState(NamedTuple):
    """State of :func:`scale_by_ggn_diagonal`.

    Attributes:
        count: int32, steps taken.
        diagonal: the (averaged) estimate of diag(G), a pytree like params in at least float32.
        num_refreshes: int32, estimates averaged so far (for the bias correction).
        key: uint32 PRNG key data for the label samples / probes.
    """

    count: jax.Array
    diagonal: PyTree
    num_refreshes: jax.Array
    key: jax.Array


def scale_by_ggn_diagonal(
    damping: float = 1e-3,
    power: float = 1.0,
    decay: float = 0.0,
    update_interval: int = 1,
    estimator: str = "exact",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Diagonal Gauss-Newton preconditioning: u = g / (diag(G) + λ)^p, before any optimiser.

    diag(G) of the batch is computed (``estimator="exact"``, :func:`~xentropy_jax.ggn_diagonal`)
    or estimated (``"bartlett"``: sampled labels; ``"hutchinson"``: Rademacher probes) every
    ``update_interval`` steps (skipped for a batch whose weights or label masses are all 0),
    averaged as D ← decay·D + (1 − decay)·D̂ and bias-corrected by 1 − decay^n after n
    refreshes (as Adam's second moment), and used as max(D, 0) (Hutchinson's
    estimate can be negative, which would turn a step uphill). p = 1 is a diagonal Newton step
    (then chain ``optax.sgd(lr)`` with lr ≈ 1 or a line search); p = ½ gives Adam-like scale
    invariance with curvature in place of squared gradients. λ > 0 bounds the step where
    the curvature vanishes (every class-shift direction of the last layer has zero curvature).

    ``update(grads, state, params, *, logits_fn, inputs, sample_weight=None, label_mass=1.0)``.
    Called eagerly, from its second call with the same ``logits_fn`` on ``update`` runs
    compiled and takes that function to be pure: what it reads besides its arguments is frozen
    at that call (docs/optax.md); pass what changes through ``inputs``.

    Args:
        damping: λ > 0 added to the diagonal.
        power: p > 0.
        decay: average factor in [0, 1); 0 keeps only the latest estimate.
        update_interval: integer k ≥ 1, steps between refreshes.
        estimator: ``"exact"``, ``"bartlett"`` or ``"hutchinson"``.
        seed: seed of the estimator's samples: an integer, or a key from ``jax.random.key``.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByGGNDiagonalState`.

    Raises:
        ValueError: for out-of-range hyperparameters or an unknown estimator, or at ``update`` if
          ``params``, ``logits_fn`` or ``inputs`` is missing.

    Example:
        In front of SGD, for a linear model (where G is the Hessian):

        >>> import jax, jax.numpy as jnp, optax
        >>> import xentropy_jax as xj
        >>> def linear(W, X):
        ...     return X @ W
        >>> X = jax.random.normal(jax.random.key(0), (64, 3))
        >>> y = jnp.argmax(X @ jnp.array([[1.0, -1, 0], [0, 1, -1], [1, 0, 1]]), -1)
        >>> optimizer = optax.chain(xj.scale_by_ggn_diagonal(damping=1e-2), optax.sgd(0.5))
        >>> loss_fn = lambda w: xj.mean_cross_entropy(linear, w, X, y)
        >>> @jax.jit
        ... def step(W, state):
        ...     updates, state = optimizer.update(
        ...         jax.grad(loss_fn)(W), state, W, logits_fn=linear, inputs=X)
        ...     return optax.apply_updates(W, updates), state
        >>> W = jnp.zeros((3, 3))
        >>> state = optimizer.init(W)
        >>> for _ in range(10):
        ...     W, state = step(W, state)
        >>> bool(loss_fn(W) < 0.5 * loss_fn(jnp.zeros((3, 3))))
        True
    """
    _check("damping", damping, 0.0, closed=False, finite=True)
    _check("power", power, 0.0, closed=False, finite=True)
    _check("decay", decay, 0.0, 1.0, below_high=True)
    _check("update_interval", update_interval, 1.0, integer=True)
    _check_estimator(estimator)
    _check_seed(seed)

    def init_fn(params: PyTree) -> ScaleByGGNDiagonalState:
        return ScaleByGGNDiagonalState(
            count=jnp.zeros((), jnp.int32),
            diagonal=_curvature_zeros(params),
            num_refreshes=jnp.zeros((), jnp.int32),
            key=_key_data(seed),
        )

    def update_fn(
        updates: PyTree,
        state: ScaleByGGNDiagonalState,
        params: PyTree | None = None,
        *,
        logits_fn: LogitsFn | None = None,
        inputs: PyTree | None = None,
        sample_weight: jax.typing.ArrayLike | None = None,
        label_mass: jax.typing.ArrayLike = 1.0,
        **extra_args: Any,
    ) -> tuple[PyTree, ScaleByGGNDiagonalState]:
        del extra_args
        logits_fn = _require_model("scale_by_ggn_diagonal", updates, params, logits_fn, inputs)
        if not jax.tree.leaves(params):  # an empty group: nothing to estimate, the model unread
            return updates, state._replace(count=optax.safe_increment(state.count))
        diagonal, key, refreshed = _refresh(
            state.count,
            update_interval,
            state.diagonal,
            decay,
            state.key,
            estimator,
            params,
            logits_fn,
            inputs,
            sample_weight,
            label_mass,
        )
        num_refreshes = state.num_refreshes + refreshed

        def scale(g: jax.Array, d: jax.Array) -> jax.Array:
            # At least 1: before any refresh (all skipped) D = 0, and 1 − decay⁰ = 0 made it NaN.
            refreshes = jnp.maximum(num_refreshes, 1)
            correction = 1 - jax.lax.pow(jnp.asarray(decay, d.dtype), refreshes)
            # diag(G) >= 0; Hutchinson's unbiased estimate is not, and a negative entry would
            # turn the step uphill (p = 1) or NaN (p = ½). The average stays unclipped.
            curvature = jnp.maximum(d / correction, 0) + jnp.asarray(damping, d.dtype)
            wide = at_least_float32(g, curvature)
            step = g.astype(wide) / (curvature ** jnp.asarray(power, d.dtype)).astype(wide)
            return step.astype(g.dtype)

        new_state = ScaleByGGNDiagonalState(
            optax.safe_increment(state.count), diagonal, num_refreshes, key
        )
        return jax.tree.map(scale, updates, diagonal), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
