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
    """Eigendecomposition of the weighted feature Gram A = X̃ᵀŴX̃, computed once per fit."""

    eigenvalues: jax.Array
    eigenvectors: jax.Array


def feature_basis(gram: jax.Array) -> FeatureBasis:
    """Eigendecomposition of `_linear.feature_gram` (O(d³), once per fit)."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    return FeatureBasis(jnp.maximum(eigenvalues, 0), eigenvectors)


def kronecker(
    objective: LogisticObjective, evaluation: Evaluation, basis: FeatureBasis
) -> Preconditioner:
    """M = A ⊗ B + l2·I with A = X̃ᵀŴX̃ (fixed) and B = Σᵢ ŵᵢ(diag sᵢ − sᵢsᵢᵀ) (per iteration).

    H = Σᵢ ŵᵢ x̃ᵢx̃ᵢᵀ ⊗ Dᵢ + l2·I_W; replacing each Dᵢ by their weighted mean B keeps the
    feature correlations that make H ill-conditioned (a diagonal cannot), and
    M⁻¹ = (Qa ⊗ Qb)·diag(1/(λa·μb + l2))·(Qa ⊗ Qb)ᵀ costs O(d²K + dK²) per use after an
    O(N·K² + K³) update per outer iteration. Far fewer CG iterations than the diagonal when
    features are correlated; needs the d̃ × d̃ Gram (so d up to a few thousand).
    """
    kf = objective.num_free_classes
    curvature_values, curvature_vectors = jnp.linalg.eigh(class_curvature(objective, evaluation))
    curvature_values = jnp.maximum(
        curvature_values, _EIGENVALUE_FLOOR * jnp.max(curvature_values, initial=0)
    )
    feature_vectors = basis.eigenvectors
    spectrum = basis.eigenvalues[:, None] * curvature_values[None, :] + objective.l2
    spectrum = jnp.maximum(spectrum, jnp.finfo(spectrum.dtype).tiny)

    def transform(vector, scale):
        block = vector.reshape(-1, kf)
        rotated = feature_vectors.T @ block @ curvature_vectors
        return (feature_vectors @ (rotated * scale) @ curvature_vectors.T).reshape(-1)

    return Preconditioner(
        solve=lambda v: transform(v, 1 / spectrum), apply=lambda v: transform(v, spectrum)
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
