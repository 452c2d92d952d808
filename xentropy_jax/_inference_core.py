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

from ._cg import plain_cg
from ._linear import (
    LogisticObjective,
    evaluate,
    feature_gram,
    hessian_vector_product,
)
from ._precision import full_precision
from ._rowsums import row_chunk_sum
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


def _extended(features, fit_intercept):
    if fit_intercept:
        return jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
    return features


def pair_indices(num: int) -> tuple:
    """Upper-triangle index pairs (k <= m) of a num × num matrix, as two int tuples."""
    rows = [k for k in range(num) for _ in range(k, num)]
    cols = [m for k in range(num) for m in range(k, num)]
    return tuple(rows), tuple(cols)


def _pair_gram(pair_weights, left, right):
    """Σᵢ cᵢₚ·leftᵢₐ·rightᵢ_b [pairs, a, b] as one GEMM [n, pairs·a]ᵀ·[n, b]."""
    n = left.shape[0]
    scaled = (pair_weights[:, :, None] * left[:, None, :]).reshape(n, -1)
    return (scaled.T @ right).reshape(pair_weights.shape[1], left.shape[1], right.shape[1])


def pair_width(num_features: int, num_classes: int, fit_intercept: bool) -> int:
    """Widest per-row array of `dense_sums`, in elements, to size row chunks."""
    num_terms = num_features + int(fit_intercept)
    pairs = num_classes * (num_classes + 1) // 2
    return max(pairs * num_terms, num_terms * (num_classes - 1), num_features * num_classes)


def margin_width(num_features: int, num_classes: int, fit_intercept: bool, selected: int) -> int:
    """Widest per-row array of `margin_sums` with `selected` features' Jacobian, in elements."""
    pairs = num_classes * (num_classes + 1) // 2
    return max(
        pairs * min(num_classes, selected),
        num_features * num_classes,
        num_features + int(fit_intercept),
    )


def _hessian_from_blocks(blocks, num_free):
    """Assemble H [P, P] (θ layout: term major, class minor) from its upper class blocks."""
    rows, cols = (jnp.asarray(i) for i in pair_indices(num_free))
    num_terms = blocks.shape[1]
    full = jnp.zeros((num_free, num_free, num_terms, num_terms), blocks.dtype)
    full = full.at[cols, rows].set(jnp.swapaxes(blocks, 1, 2)).at[rows, cols].set(blocks)
    return jnp.transpose(full, (2, 0, 3, 1)).reshape(num_terms * num_free, -1)


def _scores(objective: LogisticObjective, probs_all: jax.Array, scale: jax.Array) -> jax.Array:
    """Per-row scores scaleᵢ·x̃ᵢ ⊗ (sᵢ − yᵢ)[1:] as [n, P] (sign irrelevant for gᵢgᵢᵀ)."""
    onehot = jax.nn.one_hot(objective.labels, objective.num_classes, dtype=probs_all.dtype)
    residual = (scale[:, None] * (probs_all - onehot))[:, 1:]
    features = objective.features
    if objective.fit_intercept:
        features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
    return (features[:, :, None] * residual[:, None, :]).reshape(features.shape[0], -1)


@functools.partial(
    jax.jit, static_argnames=("num_classes", "fit_intercept", "cov_type", "num_groups", "chunk")
)
@full_precision
def dense_sums(
    features,
    labels,
    weights,
    groups,
    theta,
    *,
    num_classes,
    fit_intercept,
    cov_type,
    num_groups,
    chunk,
):
    """Total −ℓ, its gradient, Hessian [P, P], class masses and the sandwich meat [P, P].

    The Hessian's class blocks (k, l) are X̃ᵀ·diag(wᵢ(δₖₗsᵢₖ − sᵢₖsᵢₗ))·X̃; only the upper
    triangle k <= l is summed (one GEMM per chunk), half the flops of the full P × P product.
    With uᵢ = x̃ᵢ ⊗ (sᵢ − yᵢ)[1:] the score of one unweighted row, the meat is Σᵢ wᵢuᵢuᵢᵀ for
    "HC0" (frequency weights: a row of weight w counts as w copies, each its own cluster) and
    Σ_g (Σ_{i∈g} wᵢuᵢ)(Σ_{i∈g} wᵢuᵢ)ᵀ for "cluster" (zeros for "nonrobust"). Cost: O(N·P²)
    flops in GEMMs over row chunks, O(chunk·P + P²) memory.
    """
    kf = num_classes - 1
    rows, cols = pair_indices(kf)
    diagonal = jnp.asarray([float(k == m) for k, m in zip(rows, cols, strict=True)])

    def partial(x, y, w, g):
        objective = _objective(x, y, w, num_classes, fit_intercept)
        evaluation = evaluate(objective, theta, objective.free_logits(theta))
        probs = evaluation.probs  # [n, K−1]
        pair_probs = probs[:, rows] * probs[:, cols]
        on_diagonal = diagonal.astype(x.dtype)[None, :]
        pair_weights = w[:, None] * (on_diagonal * probs[:, rows] - pair_probs)
        extended = _extended(x, fit_intercept)
        out = {
            "loss": evaluation.loss,
            "grad": evaluation.grad,
            "blocks": _pair_gram(pair_weights, extended, extended),
            "mass": jnp.zeros((num_classes,), x.dtype).at[y].add(w),
            "saturated": _saturated(evaluation.log_probs, y, w),
        }
        if cov_type == "HC0":
            scores = _scores(objective, jnp.exp(evaluation.log_probs), jnp.sqrt(w))
            out["meat"] = scores.T @ scores
        elif cov_type == "cluster":
            scores = _scores(objective, jnp.exp(evaluation.log_probs), w)
            out["cluster_scores"] = jax.ops.segment_sum(scores, g, num_segments=num_groups)
        return out

    sums = row_chunk_sum(partial, (features, labels, weights, groups), chunk)
    sums["hessian"] = _hessian_from_blocks(sums.pop("blocks"), kf)
    if cov_type == "cluster":
        cluster_scores = sums.pop("cluster_scores")
        sums["meat"] = cluster_scores.T @ cluster_scores
    return sums


@functools.partial(jax.jit, static_argnames=("num_classes", "fit_intercept", "chunk"))
@full_precision
def value_grad_mass(features, labels, weights, theta, *, num_classes, fit_intercept, chunk):
    """(−ℓ(θ), gradient [P], class masses Σᵢ wᵢ[yᵢ = k] [K], saturated rows): O(N·d·K)."""

    def partial(x, y, w):
        objective = _objective(x, y, w, num_classes, fit_intercept)
        evaluation = evaluate(objective, theta, objective.free_logits(theta))
        mass = jnp.zeros((num_classes,), x.dtype).at[y].add(w)
        return evaluation.loss, evaluation.grad, mass, _saturated(evaluation.log_probs, y, w)

    return row_chunk_sum(partial, (features, labels, weights), chunk)


@jax.jit
@full_precision
def column_scales(features, weights):
    """Per column: the weighted RMS √(Σᵢ wᵢxᵢⱼ²/Σᵢ wᵢ) and maxᵢ |xᵢⱼ| over rows of weight > 0.

    (A row of weight 0 with a value of 1e7 shrank the flatness check's steps to 1e-8 standard
    errors, where the fit's own rounding read as a flat likelihood.)
    """
    largest = jnp.abs(jnp.where(weights[:, None] > 0, features, 0)).max(axis=0)
    return jnp.sqrt(weights @ jnp.square(features) / weights.sum()), largest


@functools.partial(jax.jit, static_argnames=("num_classes", "fit_intercept", "chunk"))
@full_precision
def loss_changes(features, labels, weights, theta, moves, *, num_classes, fit_intercept, chunk):
    """−ℓ(θ + δ_b) + ℓ(θ) for each row δ_b of `moves` [B, P]: one GEMM per chunk.

    Row i's change is log1p(Σₖ sᵢₖ·expm1(Δᵢₖ)) − Δᵢ,yᵢ, with sᵢ its probabilities at θ and
    Δᵢ = x̃ᵢ·δ the move of its logits (0 for the reference class): exact relative to the change
    itself, where the difference of two losses keeps only a few ulps of the losses (and of the
    totals, of order N·ε·|ℓ| in float32).
    """
    kf = num_classes - 1

    def partial(x, y, w):
        objective = _objective(x, y, w, num_classes, fit_intercept)
        probs = jax.nn.softmax(objective.logits(theta), axis=-1)[:, 1:]  # [n, K−1]
        extended = _extended(x, fit_intercept)  # [n, d̃]
        num_moves, num_terms = moves.shape[0], extended.shape[1]
        by_term = moves.reshape(num_moves, num_terms, kf).transpose(1, 0, 2)
        shifts = (extended @ by_term.reshape(num_terms, -1)).reshape(-1, num_moves, kf)
        spread = jnp.log1p((probs[:, None, :] * jnp.expm1(shifts)).sum(axis=-1))
        all_shifts = jnp.pad(shifts, ((0, 0), (0, 0), (1, 0)))  # [n, B, K]
        own = jnp.take_along_axis(all_shifts, y[:, None, None], axis=2)[..., 0]
        return jnp.where(w[:, None] > 0, spread - own, 0).T @ w  # (padding rows: weight 0)

    return row_chunk_sum(partial, (features, labels, weights), chunk)


@functools.partial(jax.jit, static_argnames=("num_classes", "fit_intercept", "chunk"))
@full_precision
def margin_sums(
    features, labels, weights, theta, selected=None, *, num_classes, fit_intercept, chunk
):
    """Average marginal effects dP(y=k)/dx_j [d, K] and their Jacobian in θ [r·K, P].

    `selected` [r] (default all d features) picks the features j whose rows of the Jacobian
    are formed, in that order; the effects [d, K] are always all computed.

    With B the full coefficients [d, K] (class 0's column zero), sᵢ the probabilities,
    β̄ᵢ = B·sᵢ [d] and Dᵢⱼₖ = Bⱼₖ − β̄ᵢⱼ, the effect is AMEⱼₖ = Σᵢ ŵᵢ sᵢₖ Dᵢⱼₖ and, for the
    coefficient of term m (feature or intercept) in class l,

        ∂AMEⱼₖ/∂θₘₗ = Σᵢ ŵᵢ [δₖₗ sᵢₖ Dᵢⱼₖ x̃ᵢₘ − sᵢₖ sᵢₗ x̃ᵢₘ (Dᵢⱼₖ + Dᵢⱼₗ)
                           + δⱼₘ (δₖₗ sᵢₖ − sᵢₖ sᵢₗ)]
                    = δₖₗ Aⱼₖₘ − (Bⱼₖ + Bⱼₗ) Qₖₗₘ + 2 Rⱼₖₗₘ + δⱼₘ (δₖₗ mₖ − Sₖₗ).

    Everything is a contraction of B with moments of the probabilities against x̃:
    Mₖₘ = Σᵢ ŵᵢ sᵢₖ x̃ᵢₘ, Qₖₗₘ = Σᵢ ŵᵢ sᵢₖ sᵢₗ x̃ᵢₘ, Tₖₗₚₘ = Σᵢ ŵᵢ sᵢₖ sᵢₗ sᵢₚ x̃ᵢₘ (k <= l
    summed), m = Σᵢ ŵᵢ sᵢ, S = Σᵢ ŵᵢ sᵢsᵢᵀ:

        Aⱼₖₘ = Σᵢ ŵᵢ sᵢₖ Dᵢⱼₖ x̃ᵢₘ = Bⱼₖ Mₖₘ − Σₚ Bⱼₚ Qₖₚₘ,
        Rⱼₖₗₘ = Σᵢ ŵᵢ sᵢₖ sᵢₗ β̄ᵢⱼ x̃ᵢₘ = Σₚ Bⱼₚ Tₖₗₚₘ.

    The row sums are GEMMs over row chunks: T costs N·d̃·K²(K+1)/2 multiply-adds, whatever
    the number of features; when r < K, R is summed directly instead (N·d̃·r·K(K+1)/2,
    the row factor β̄ᵢⱼ of the r features). The effects take one O(N·d·K) pass. The widest
    per-row array has K(K+1)/2·min(K, r), d·K or d + 1 elements (chunks sized by
    `margin_width`): never an [N, K, P] array. The Jacobian takes O(r·K·P) memory.
    """
    d = features.shape[1]
    kf = num_classes - 1
    rows, cols = pair_indices(num_classes)
    objective = _objective(features[:1], labels[:1], weights[:1], num_classes, fit_intercept)
    coef, _ = objective.expand(theta)  # [d, K]
    selected = jnp.arange(d) if selected is None else jnp.asarray(selected, jnp.int32)
    r = selected.shape[0]
    coef_selected = coef[selected]  # [r, K]
    third_moment = num_classes <= r  # R from T (K classes) or directly (r features)

    def partial(x, y, w):
        sub = _objective(x, y, w, num_classes, fit_intercept)
        probs = jax.nn.softmax(sub.logits(theta), axis=-1)  # [n, K]
        extended = _extended(x, fit_intercept)
        mean_coef = probs @ coef.T  # β̄ [n, d]
        weighted_probs = w[:, None] * probs
        pair_weights = weighted_probs[:, rows] * probs[:, cols]  # ŵ sₖ sₗ, k <= l
        out = {
            # Σᵢ ŵᵢ sᵢₖ (Bⱼₖ − β̄ᵢⱼ), differences formed row by row (no cancellation of sums).
            "effects": jnp.einsum(
                "nk,njk->jk", weighted_probs, coef[None, :, :] - mean_coef[:, :, None]
            ),
            "first": weighted_probs.T @ extended,  # M [K, d̃]
            "pair_terms": pair_weights.T @ extended,  # Q [pairs, d̃]
            "mass": jnp.sum(weighted_probs, axis=0),
            "second": weighted_probs.T @ probs,
        }
        if third_moment:
            out["third"] = _pair_gram(pair_weights, probs, extended)  # T [pairs, K, d̃]
        else:
            out["cross"] = _pair_gram(pair_weights, mean_coef[:, selected], extended)  # R
        return out

    sums = row_chunk_sum(partial, (features, labels, weights), chunk)
    total = jnp.sum(weights)
    num_terms = d + int(fit_intercept)
    rows_j, cols_j = jnp.asarray(rows), jnp.asarray(cols)

    def symmetric(pairs):  # [pairs, ...] -> [K, K, ...]
        full = jnp.zeros((num_classes, num_classes) + pairs.shape[1:], pairs.dtype)
        return full.at[cols_j, rows_j].set(pairs).at[rows_j, cols_j].set(pairs)

    terms = symmetric(sums["pair_terms"])  # Q [K, K, d̃]
    if third_moment:
        cross = jnp.einsum("jp,klpm->jklm", coef_selected, symmetric(sums["third"]))
    else:
        cross = jnp.moveaxis(symmetric(sums["cross"]), 2, 0)  # R [r, K, K, d̃]
    diagonal_part = coef_selected[:, :, None] * sums["first"][None] - jnp.einsum(
        "jp,kpm->jkm", coef_selected, terms
    )  # A [r, K, d̃]
    eye = jnp.eye(num_classes, dtype=features.dtype)
    jac = jnp.einsum("kl,jkm->jklm", eye, diagonal_part) + 2 * cross
    jac = jac - (coef_selected[:, :, None, None] + coef_selected[:, None, :, None]) * terms[None]
    class_part = jnp.diag(sums["mass"]) - sums["second"]  # [K, K]
    jac = jac.at[jnp.arange(r), :, :, selected].add(class_part[None])
    # θ's layout: term m major, free class l = 1..K−1 minor.
    jac = jnp.transpose(jac, (0, 1, 3, 2))[..., 1:].reshape(r * num_classes, num_terms * kf)
    return sums["effects"] / total, jac / total


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_classes",
        "fit_intercept",
        "cov_type",
        "num_groups",
        "max_steps",
        "preconditioner",
        "batch",
    ),
)
@full_precision
def cg_variances(
    features,
    labels,
    weights,
    groups,
    theta,
    coordinates,
    directions,
    rtol,
    *,
    num_classes,
    fit_intercept,
    cov_type,
    num_groups,
    max_steps,
    preconditioner,
    batch,
):
    """vᵀCv for unit vectors and given directions by preconditioned CG on the matrix-free H.

    The vectors v are first the unit vectors e_c for c in `coordinates` [R₁] (coefficients;
    each formed inside the loop, so no [R₁, P] array exists), then the rows of `directions`
    [R₂, P] (marginal-effect Jacobian rows, the gradient).

    Solves H·a = v (H the Hessian of −ℓ, a Σw multiple of the mean objective's) to
    ‖v − H·a‖ <= rtol·‖v‖, then returns vᵀa (model-based), or with uᵢ as in `dense_sums`
    Σᵢ wᵢ(uᵢᵀa)² (HC0) or Σ_g (Σ_{i∈g} wᵢuᵢᵀa)² (cluster), without any P × P matrix. Cost per
    direction: (CG steps + 1) × two GEMMs over X. Returns (vᵀH⁻¹v, the chosen form, CG steps,
    achieved relative residuals), each [R₁ + R₂], and the eigenvalues of the Jacobi-scaled
    weighted feature Gram (a correlation matrix: a zero eigenvalue means collinear columns)
    with the Kronecker preconditioner, which computes them; an empty array otherwise.
    """
    total = jnp.sum(weights)
    objective = _objective(features, labels, weights / total, num_classes, fit_intercept)
    evaluation = evaluate(objective, theta, objective.free_logits(theta))
    if preconditioner == "kronecker":
        basis = feature_basis(feature_gram(objective))
        precond = kronecker(objective, evaluation, basis)
        gram_eigenvalues = basis.eigenvalues
    else:
        precond = diagonal(objective, evaluation)
        gram_eigenvalues = jnp.zeros((0,), theta.dtype)
    probs_all = jnp.exp(evaluation.log_probs)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=probs_all.dtype)
    residual = (probs_all - onehot)[:, 1:]  # uᵢ's class part, unweighted

    def matvec(v):
        return hessian_vector_product(objective, evaluation, v)

    def one(direction):
        result = plain_cg(
            matvec, direction, preconditioner=precond.solve, rtol=rtol, max_steps=max_steps
        )
        solution = result.solution / total  # H_total⁻¹ v
        achieved = jnp.linalg.norm(result.residual) / jnp.linalg.norm(direction)
        model = jnp.vdot(direction, solution)
        if cov_type == "nonrobust":
            variance = model
        else:
            # uᵢᵀa = (sᵢ − yᵢ)[1:] · (x̃ᵢ A), A = a as [d̃, K−1]: one GEMM.
            per_row = jnp.sum(residual * objective.free_logits(solution), axis=1)
            if cov_type == "cluster":
                per_group = jax.ops.segment_sum(weights * per_row, groups, num_segments=num_groups)
                variance = jnp.vdot(per_group, per_group)
            else:
                variance = jnp.vdot(weights * per_row, per_row)
        return model, variance, result.num_steps, achieved

    def unit(coordinate):
        return one(jnp.zeros((theta.shape[0],), theta.dtype).at[coordinate].set(1))

    first = lax.map(unit, coordinates, batch_size=batch)
    second = lax.map(one, directions, batch_size=batch)
    results = tuple(jnp.concatenate(pair) for pair in zip(first, second, strict=True))
    return results + (gram_eigenvalues,)
