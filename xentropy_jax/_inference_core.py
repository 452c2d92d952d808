"""Compiled sums behind statistical inference: log-likelihood, Hessian, scores, margins, CG.

All functions take the reference-class parameters θ [P] (classes 1..K−1 free, layout of
`LogisticObjective` with `reference_class=True`: W row-major [d, K−1], then b [K−1]) and raw
(unnormalised) row weights w, so that every sum is of the total log-likelihood
ℓ(θ) = Σᵢ wᵢ·log sᵢ,yᵢ. Rows are processed in chunks (`_rowsums`): no [N, P] array is formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._linear import (
    LogisticObjective,
    evaluate,
    feature_gram,
    hessian,
    hessian_vector_product,
)
from ._rowsums import row_chunk_sum
from .solvers._cg import conjugate_gradient
from .solvers._preconditioners import diagonal, feature_basis, kronecker


def _objective(features, labels, weights, num_classes, fit_intercept, l2=0.0):
    return LogisticObjective(
        features=features,
        labels=labels,
        weights=weights,
        l2=jnp.asarray(l2, features.dtype),
        num_classes=num_classes,
        fit_intercept=fit_intercept,
        reference_class=True,
    )


# A row whose label has fitted probability above 1 − 1e-8 is predicted (almost) perfectly:
# with many of them the estimates may be drifting to infinity (quasi-separation).
_SATURATED_LOG_PROB = -1e-8


def _saturated(log_probs, labels, weights):
    """Number of weighted rows with log P(yᵢ) > −1e-8."""
    label_log_probs = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return jnp.sum((label_log_probs > _SATURATED_LOG_PROB) & (weights > 0))


def _scores(objective: LogisticObjective, probs_all: jax.Array) -> jax.Array:
    """Per-row scores gᵢ = wᵢ·x̃ᵢ ⊗ (sᵢ − yᵢ)[1:] as [n, P] (sign irrelevant for gᵢgᵢᵀ)."""
    onehot = jax.nn.one_hot(objective.labels, objective.num_classes, dtype=probs_all.dtype)
    residual = (objective.weights[:, None] * (probs_all - onehot))[:, 1:]
    features = objective.features
    if objective.fit_intercept:
        features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
    return (features[:, :, None] * residual[:, None, :]).reshape(features.shape[0], -1)


@functools.partial(
    jax.jit, static_argnames=("num_classes", "fit_intercept", "cov_type", "num_groups", "chunk")
)
def dense_sums(
    features, labels, weights, groups, theta, *, num_classes, fit_intercept, cov_type, num_groups,
    chunk,
):
    """Total −ℓ, its gradient, Hessian [P, P], class masses and the sandwich meat [P, P].

    The meat is Σᵢ gᵢgᵢᵀ for "HC0" and Σ_g (Σ_{i∈g} gᵢ)(Σ_{i∈g} gᵢ)ᵀ for "cluster" (zeros
    for "nonrobust"). Cost: O(N·P²) flops in GEMMs over row chunks, O(chunk·P + P²) memory.
    """

    def partial(x, y, w, g):
        objective = _objective(x, y, w, num_classes, fit_intercept)
        evaluation = evaluate(objective, theta, objective.free_logits(theta))
        out = {
            "loss": evaluation.loss,
            "grad": evaluation.grad,
            "hessian": hessian(objective, evaluation),
            "mass": jnp.zeros((num_classes,), x.dtype).at[y].add(w),
            "saturated": _saturated(evaluation.log_probs, y, w),
        }
        if cov_type == "HC0":
            scores = _scores(objective, jnp.exp(evaluation.log_probs))
            out["meat"] = scores.T @ scores
        elif cov_type == "cluster":
            scores = _scores(objective, jnp.exp(evaluation.log_probs))
            out["cluster_scores"] = jax.ops.segment_sum(scores, g, num_segments=num_groups)
        return out

    sums = row_chunk_sum(partial, (features, labels, weights, groups), chunk)
    if cov_type == "cluster":
        cluster_scores = sums.pop("cluster_scores")
        sums["meat"] = cluster_scores.T @ cluster_scores
    return sums


@functools.partial(jax.jit, static_argnames=("num_classes", "fit_intercept", "chunk"))
def value_grad_mass(features, labels, weights, theta, *, num_classes, fit_intercept, chunk):
    """(−ℓ(θ), gradient [P], class masses Σᵢ wᵢ[yᵢ = k] [K], saturated rows): O(N·d·K)."""

    def partial(x, y, w):
        objective = _objective(x, y, w, num_classes, fit_intercept)
        evaluation = evaluate(objective, theta, objective.free_logits(theta))
        mass = jnp.zeros((num_classes,), x.dtype).at[y].add(w)
        return evaluation.loss, evaluation.grad, mass, _saturated(evaluation.log_probs, y, w)

    return row_chunk_sum(partial, (features, labels, weights), chunk)


@functools.partial(jax.jit, static_argnames=("num_classes", "fit_intercept", "chunk"))
def margin_sums(features, labels, weights, theta, *, num_classes, fit_intercept, chunk):
    """Average marginal effects dP(y=k)/dx_j [d, K] and their Jacobian in θ [d·K, P].

    With B the full coefficients [d, K] (class 0's column zero), sᵢ the probabilities and
    Dᵢⱼₖ = Bⱼₖ − Σₗ Bⱼₗ sᵢₗ, the effect is AMEⱼₖ = Σᵢ ŵᵢ sᵢₖ Dᵢⱼₖ and, for the coefficient of
    term m (feature or intercept) in class l,

        ∂AMEⱼₖ/∂θₘₗ = Σᵢ ŵᵢ [δₖₗ sᵢₖ Dᵢⱼₖ x̃ᵢₘ − sᵢₖ sᵢₗ x̃ᵢₘ (Dᵢⱼₖ + Dᵢⱼₗ)
                           + δⱼₘ (δₖₗ sᵢₖ − sᵢₖ sᵢₗ)].

    With Eᵢ = ŵᵢ sᵢₖ Dᵢⱼₖ [d·K] and Fᵢ = sᵢₗ x̃ᵢₘ [K·d̃] the second term is the GEMM EᵀF and its
    transpose in (k, l): O(N·d·K) per row chunk and pass, never an [N, K, P] array.
    """
    d = features.shape[1]
    kf = num_classes - 1
    objective = _objective(features[:1], labels[:1], weights[:1], num_classes, fit_intercept)
    coef, _ = objective.expand(theta)  # [d, K]

    def partial(x, y, w):
        sub = _objective(x, y, w, num_classes, fit_intercept)
        probs = jax.nn.softmax(sub.logits(theta), axis=-1)  # [n, K]
        extended = x
        if fit_intercept:
            extended = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
        mean_coef = probs @ coef.T  # [n, d]
        deviation = coef[None, :, :] - mean_coef[:, :, None]  # [n, d, K]
        weighted = (w[:, None] * probs)[:, None, :] * deviation  # E [n, d, K]
        flat = weighted.reshape(x.shape[0], -1)
        outer = (probs[:, :, None] * extended[:, None, :]).reshape(x.shape[0], -1)  # F
        return {
            "effects": jnp.sum(weighted, axis=0),
            "diagonal": flat.T @ extended,  # [dK, d̃]
            "cross": flat.T @ outer,  # [dK, K d̃]
            "mass": jnp.sum(w[:, None] * probs, axis=0),
            "second": (w[:, None] * probs).T @ probs,
        }

    sums = row_chunk_sum(partial, (features, labels, weights), chunk)
    total = jnp.sum(weights)
    num_terms = d + int(fit_intercept)
    eye = jnp.eye(num_classes, dtype=features.dtype)
    diagonal_part = sums["diagonal"].reshape(d, num_classes, num_terms)
    cross = sums["cross"].reshape(d, num_classes, num_classes, num_terms)
    jac = jnp.einsum("kl,jkm->jklm", eye, diagonal_part)
    jac = jac - cross - jnp.swapaxes(cross, 1, 2)
    class_part = jnp.diag(sums["mass"]) - sums["second"]  # [K, K]
    jac = jac.at[jnp.arange(d), :, :, jnp.arange(d)].add(class_part[None])
    # θ's layout: term m major, free class l = 1..K−1 minor.
    jac = jnp.transpose(jac, (0, 1, 3, 2))[..., 1:].reshape(d * num_classes, num_terms * kf)
    return sums["effects"] / total, jac / total


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_classes", "fit_intercept", "cov_type", "num_groups", "max_steps", "preconditioner",
        "batch",
    ),
)
def cg_variances(
    features, labels, weights, groups, theta, directions, rtol, *, num_classes, fit_intercept,
    cov_type, num_groups, max_steps, preconditioner, batch,
):
    """vᵀCv for each row v of `directions` [R, P] by preconditioned CG on the matrix-free H.

    Solves H·a = v (H the Hessian of −ℓ, a Σw multiple of the mean objective's) to
    ‖v − H·a‖ <= rtol·‖v‖, then returns vᵀa (model-based) or Σ_g (Σ_{i∈g} gᵢᵀa)² (HC0:
    each row its own group; cluster) without any P × P matrix. Cost per direction: (CG steps
    + 1) × two GEMMs over X. Returns (vᵀH⁻¹v, the chosen form, CG steps, achieved relative
    residuals), each [R].
    """
    total = jnp.sum(weights)
    objective = _objective(features, labels, weights / total, num_classes, fit_intercept)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    if preconditioner == "kronecker":
        precond = kronecker(objective, evaluation, feature_basis(feature_gram(objective)))
    else:
        precond = diagonal(objective, evaluation)
    probs_all = jnp.exp(evaluation.log_probs)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=probs_all.dtype)
    residual = (weights[:, None] * (probs_all - onehot))[:, 1:]

    def matvec(v):
        return hessian_vector_product(objective, evaluation, v)

    def one(direction):
        result = conjugate_gradient(matvec, direction, precond, rtol=rtol, max_steps=max_steps)
        solution = result.solution / total  # H_total⁻¹ v
        achieved = jnp.linalg.norm(result.residual) / jnp.linalg.norm(direction)
        model = jnp.vdot(direction, solution)
        if cov_type == "nonrobust":
            variance = model
        else:
            # gᵢᵀa = wᵢ (sᵢ − yᵢ)[1:] · (x̃ᵢ A), A = a as [d̃, K−1]: one GEMM.
            per_row = jnp.sum(residual * objective.free_logits(solution), axis=1)
            if cov_type == "cluster":
                per_row = jax.ops.segment_sum(per_row, groups, num_segments=num_groups)
            variance = jnp.vdot(per_row, per_row)
        return model, variance, result.n_steps, achieved

    return lax.map(one, directions, batch_size=batch)
