"""The objective interface that the Newton solvers drive: a small `Protocol`.

A solver needs four things of a smooth convex objective f(θ) over a flat parameter vector θ [P]:

* ``evaluate(theta, predictor)``: f and ∇f at θ, with whatever the curvature products at θ
  reuse (for logistic regression: the probabilities), as an object with ``loss`` and ``grad``;
* ``hessian_product(evaluation, tangent)``: H·v at that point (H symmetric positive
  semidefinite; a Gauss-Newton matrix will do);
* ``loss_change(theta, evaluation, direction, direction_predictor, scale)``: f(θ + tΔ) − f(θ),
  accurate to its own size, not to f's rounding (the line search and the trust-region ratio
  compare changes far below eps·|f| near the optimum);
* ``predictor(theta)``: a pytree **linear in θ** that ``evaluate`` and ``loss_change`` consume
  (the logits XW + b of a linear model). The solvers compute it once per direction and move it
  along the step, η(θ + tΔ) = η(θ) + t·η(Δ), so a line-search trial costs no product with X.
  An objective without such a structure returns θ itself, or ``()``.

and ``diverged(evaluation, predictor)``: a certificate that no minimiser exists (for
unpenalised logistic regression, logits that separate the data), or ``False``.

Optional capabilities, used when a solver or preconditioner asks for them:

* ``hessian(evaluation)``: the explicit [P, P] Hessian (the `Newton` solver), and
  ``hessian_null_space(matrix)``: a [P, P] positive semi-definite matrix on the directions
  along which f is exactly flat, scaled like the Hessian ``matrix`` (or None), which `Newton`
  adds to H before factorising; and ``feature_shift(dominant=True)``: column means μ [d] (or
  None), with which, below float64, `Newton` asks ``hessian(evaluation, μ)`` and the
  diagonal preconditioner ``hessian_diagonal(evaluation, μ)`` for the Hessian (diagonal) in
  the centred variables (W, b + μᵀW) of a linear model with an intercept, θ's layout
  [d + 1, Kf];
* ``hessian_diagonal(evaluation)``: diag(H) [P] (the "diagonal" preconditioner);
* ``remove_class_shift(vector)``: the orthogonal projection onto a subspace that holds the
  gradient, every H·v and a minimiser (for logistic regression: W and b centred over the
  classes, as a common shift of every class changes no probability). The preconditioners
  follow M⁻¹ by it, so that CG does not wander along directions where f is (nearly) flat, and
  the solvers project each new θ by it, so that rounding does not drift θ out of it. It must
  not increase f, and the predictor of θ must serve for the projected θ (for logistic
  regression they differ by a common shift of each row's logits);
* the Kronecker factors of `LogisticObjective` (``feature_gram``, ``class_curvature``) for the
  "kronecker" and "ekfac" preconditioners;
* ``astype(dtype)``: the objective with its data in another floating dtype, for
  ``product_dtype``; without it every floating leaf of the pytree is cast.

`LogisticObjective` (in-memory rows, dense or sparse X) is one implementation; an objective
whose rows are sharded over devices, streamed from disk, or that has nothing to do with
logistic regression is another, and needs no change to any solver.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

PyTree = Any


@runtime_checkable
class Evaluation(Protocol):
    """What `Objective.evaluate` returns: at least the value and the gradient at θ."""

    @property
    def loss(self) -> jax.Array:
        """Scalar f(θ)."""
        ...

    @property
    def grad(self) -> jax.Array:
        """[P] ∇f(θ)."""
        ...


@runtime_checkable
class Objective(Protocol):
    """A smooth convex objective f(θ), θ [P], as the solvers drive it (a pytree).

    See the module's docstring for the contract of each method; a user-defined objective is
    fitted with ``solver.minimize(objective, theta0, tol=..., max_iter=...)`` of any of
    `Newton`, `NewtonCG` and `TrustRegion`.

    Example:
        A strictly convex quadratic f(θ) = ½θᵀAθ − bᵀθ, written as an objective and minimised
        by Newton-CG without a preconditioner:

        >>> import dataclasses
        >>> from typing import NamedTuple
        >>> import jax, jax.numpy as jnp
        >>> import xentropy_jax as xj
        >>> class Point(NamedTuple):
        ...     loss: jax.Array
        ...     grad: jax.Array
        >>> @jax.tree_util.register_dataclass
        ... @dataclasses.dataclass(frozen=True)
        ... class Quadratic:
        ...     matrix: jax.Array
        ...     target: jax.Array
        ...     num_params = property(lambda self: self.target.shape[0])
        ...     dtype = property(lambda self: self.target.dtype)
        ...     def predictor(self, theta):
        ...         return ()
        ...     def evaluate(self, theta, predictor):
        ...         grad = self.matrix @ theta - self.target
        ...         return Point(0.5 * theta @ (grad - self.target), grad)
        ...     def hessian_product(self, evaluation, tangent):
        ...         return self.matrix @ tangent
        ...     def loss_change(self, theta, evaluation, direction, direction_predictor, t):
        ...         return t * evaluation.grad @ direction + 0.5 * t**2 * (
        ...             direction @ self.matrix @ direction)
        ...     def diverged(self, evaluation, predictor):
        ...         return jnp.zeros((), bool)
        >>> objective = Quadratic(jnp.array([[3.0, 1.0], [1.0, 2.0]]), jnp.array([1.0, 1.0]))
        >>> isinstance(objective, xj.Objective)
        True
        >>> output = xj.NewtonCG(preconditioner="none").minimize(
        ...     objective, jnp.zeros(2), tol=1e-6, max_iter=10)
        >>> xj.Status(int(output.status)).name
        'CONVERGED'
        >>> bool(jnp.allclose(output.theta, jnp.linalg.solve(objective.matrix, objective.target)))
        True
    """

    @property
    def num_params(self) -> int:
        """P, the length of θ (static)."""
        ...

    @property
    def dtype(self) -> Any:
        """Floating dtype of θ and of the computation."""
        ...

    def predictor(self, theta: jax.Array) -> PyTree:
        """A pytree linear in θ that `evaluate` and `loss_change` reuse (e.g. the logits)."""
        ...

    def evaluate(self, theta: jax.Array, predictor: PyTree) -> Evaluation:
        """Value, gradient and what curvature products reuse, at θ with η = predictor(θ)."""
        ...

    def hessian_product(self, evaluation: Evaluation, tangent: jax.Array) -> jax.Array:
        """H·v [P] at the point of `evaluation` (H symmetric positive semidefinite)."""
        ...

    def loss_change(
        self,
        theta: jax.Array,
        evaluation: Evaluation,
        direction: jax.Array,
        direction_predictor: PyTree,
        scale: jax.Array,
    ) -> jax.Array:
        """f(θ + t·Δ) − f(θ), accurate relative to its own size; η(Δ) = predictor(Δ)."""
        ...

    def diverged(self, evaluation: Evaluation, predictor: PyTree) -> jax.Array:
        """Boolean scalar: a certificate that f has no minimiser (the fit diverges)."""
        ...
