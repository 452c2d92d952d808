"""Preconditioners for the CG inner solves: the Hessian diagonal and a Kronecker factorisation.

A preconditioner is a pair of linear maps on θ [P]: `solve` applies M⁻¹ (each CG iteration)
and `apply` applies M (the trust-region norm ‖s‖_M = √(sᵀMs)). Both are symmetric positive
definite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._linear import (
    Evaluation,
    LogisticObjective,
    class_curvature,
    feature_gram,
    hessian_diagonal,
)

# Eigenvalues of B below this fraction of the largest are raised to it: B·1 = 0 without a
# reference class, and the preconditioner must stay positive definite.
_EIGENVALUE_FLOOR = 1e-3


class Preconditioner(NamedTuple):
    """M and M⁻¹ as functions of a vector [P]."""

    solve: Callable[[jax.Array], jax.Array]
    apply: Callable[[jax.Array], jax.Array]


def diagonal(
    objective: LogisticObjective, evaluation: Evaluation, mix: float = 1.0
) -> Preconditioner:
    """M = (1 − mix)·mean(diag H) + mix·diag(H) (Jacobi for mix = 1; TRON uses a small mix).

    Cost: one GEMM with X² per outer iteration (X² formed on the fly, O(N·d)), O(P) per use.
    """
    values = hessian_diagonal(objective, evaluation)
    values = jnp.where(values > 0, values, jnp.max(values, initial=1.0))
    if mix != 1.0:
        values = (1 - mix) * jnp.mean(values) + mix * values
    return Preconditioner(solve=lambda v: v / values, apply=lambda v: v * values)


class FeatureBasis(NamedTuple):
    """Eigendecomposition of the Jacobi-scaled feature Gram S = D·A·D, computed once per fit.

    A = X̃ᵀŴX̃ and D = diag(A)^(-1/2): the scaling keeps columns of very different sizes
    resolved (an eigendecomposition of A itself loses the small ones, in float32 above all).
    `scale` holds D's diagonal and `penalty` the diagonal of Uᵀ·D²·U (the L2 term in S's
    eigenbasis).
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    scale: jax.Array
    penalty: jax.Array


def feature_basis(gram: jax.Array) -> FeatureBasis:
    """Eigendecomposition of `_linear.feature_gram` after Jacobi scaling (O(d³), once per fit)."""
    diagonal = jnp.diag(gram)
    scale = jnp.where(diagonal > 0, jax.lax.rsqrt(jnp.where(diagonal > 0, diagonal, 1)), 1)
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram * scale[:, None] * scale[None, :])
    # In the scaled variables θ = D·θ' the L2 term l2·I becomes l2·D²; its Rayleigh quotient
    # on each eigenvector keeps M ⊗-structured (exact when the columns have equal scales).
    penalty = jnp.square(eigenvectors).T @ jnp.square(scale)
    return FeatureBasis(jnp.maximum(eigenvalues, 0), eigenvectors, scale, penalty)


def kronecker(
    objective: LogisticObjective, evaluation: Evaluation, basis: FeatureBasis
) -> Preconditioner:
    """M ≈ A ⊗ B + l2·I with A = X̃ᵀŴX̃ (fixed) and B = Σᵢ ŵᵢ(diag sᵢ − sᵢsᵢᵀ) (per iteration).

    H = Σᵢ ŵᵢ x̃ᵢx̃ᵢᵀ ⊗ Dᵢ + l2·I_W; replacing each Dᵢ by their weighted mean B keeps the
    feature correlations that make H ill-conditioned (a diagonal cannot), and
    in the Jacobi-scaled variables (S = D·A·D = U·diag(λ)·Uᵀ, B = Q·diag(μ)·Qᵀ)
    M⁻¹ = (D ⊗ I)(U ⊗ Q)·diag(1/(λ·μ + l2·(UᵀD²U)ᵢᵢ))·(U ⊗ Q)ᵀ(D ⊗ I) costs O(d²K + dK²) per
    use after an O(N·K² + K³) update per outer iteration. Far fewer CG iterations than the diagonal when
    features are correlated; needs the d̃ × d̃ Gram (so d up to a few thousand).
    """
    kf = objective.num_free_classes
    curvature_values, curvature_vectors = jnp.linalg.eigh(class_curvature(objective, evaluation))
    curvature_values = jnp.maximum(
        curvature_values, _EIGENVALUE_FLOOR * jnp.max(curvature_values, initial=0)
    )
    feature_vectors, scale = basis.eigenvectors, basis.scale[:, None]
    spectrum = basis.eigenvalues[:, None] * curvature_values[None, :]
    spectrum = spectrum + objective.l2 * basis.penalty[:, None]
    # Collinear features without a penalty make A (and H) singular: there M is the pseudo-
    # inverse (zero on the null directions of the scaled Gram), so CG never moves along
    # directions that change no logit (rounding there would otherwise be amplified by 1/tiny);
    # the minimum-norm projection at the end of the fit does the rest. With l2 > 0 every
    # direction is curved and nothing is dropped.
    values = basis.eigenvalues
    feature_null = values <= values.size * jnp.finfo(values.dtype).eps * jnp.max(values, initial=0)
    null = feature_null[:, None] & (objective.l2 == 0)
    spectrum = jnp.maximum(spectrum, jnp.finfo(spectrum.dtype).tiny)
    inverse = jnp.where(null, 0, 1 / spectrum)
    spectrum = jnp.where(null, 0, spectrum)

    def transform(vector, values, outer):
        block = vector.reshape(-1, kf) * outer
        rotated = feature_vectors.T @ block @ curvature_vectors
        return (outer * (feature_vectors @ (rotated * values) @ curvature_vectors.T)).reshape(-1)

    # M = (D⁻¹ ⊗ I)(U ⊗ Q)·diag(spectrum)·(U ⊗ Q)ᵀ(D⁻¹ ⊗ I), and M⁻¹ with D and 1/spectrum.
    return Preconditioner(
        solve=lambda v: transform(v, inverse, scale),
        apply=lambda v: transform(v, spectrum, 1 / scale),
    )


KINDS = ("kronecker", "diagonal")


def setup_basis(kind: str, objective: LogisticObjective) -> FeatureBasis | None:
    """What a preconditioner of this kind needs once per fit (the Gram's eigenbasis)."""
    return feature_basis(feature_gram(objective)) if kind == "kronecker" else None


def build(
    kind: str,
    objective: LogisticObjective,
    evaluation: Evaluation,
    basis: FeatureBasis | None,
    mix: float = 1.0,
) -> Preconditioner:
    """The preconditioner of this kind at the point of `evaluation`."""
    if kind == "kronecker":
        return kronecker(objective, evaluation, basis)
    return diagonal(objective, evaluation, mix)
