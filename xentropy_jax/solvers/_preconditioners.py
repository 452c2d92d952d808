"""Preconditioners for the CG inner solves: the Hessian diagonal and two Kronecker forms.

"kronecker" is A ⊗ B + l2·I with one mean class curvature B; "ekfac" keeps A's and B's
eigenbases but refits the eigenvalues per (feature direction, class direction) pair;
"diagonal" is Jacobi; "none" is the identity; "auto" is what the objective prefers (its
`default_preconditioner`; for logistic regression a choice from the static shapes), see
`resolve`. The Kronecker forms need the objective's Kronecker factors (`feature_gram`,
`class_curvature`, `design_matrix`, `num_free_classes`, `l2`), the diagonal its
`hessian_diagonal`; any `Objective` can use "none".

A preconditioner is a pair of linear maps on θ [P]: `solve` applies M⁻¹ (each CG iteration)
and `apply` applies M (the trust-region norm ‖s‖_M = √(sᵀMs)). Both are symmetric positive
definite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .._batch_cond import batch_cond
from .._manual import cond
from .._objective import Evaluation, Objective
from .._rowsums import column_sums_by_chunks
from .._sparse_products import matmul
from ._linalg import cholesky, cholesky_solve, eigh, jacobi_scaled, null_cutoff

# Eigenvalues of B below this fraction of the largest are raised to it: B·1 = 0 without a
# reference class, and the preconditioner must stay positive definite.
_EIGENVALUE_FLOOR = 1e-3


class Preconditioner(NamedTuple):
    """M and M⁻¹ as functions of a vector [P]."""

    solve: Callable[[jax.Array], jax.Array]
    apply: Callable[[jax.Array], jax.Array]


def identity() -> Preconditioner:
    """M = I: plain CG."""
    return Preconditioner(solve=lambda v: v, apply=lambda v: v)


def diagonal(
    objective: Objective,
    evaluation: Evaluation,
    mix: float = 1.0,
    project: Callable[[jax.Array], jax.Array] | None = None,
) -> Preconditioner:
    """M = D = (1 − mix)·mean(diag H) + mix·diag(H) (Jacobi for mix = 1; TRON uses a small mix).

    Below float64, on a dense X with an intercept (`centring_of`), D is the diagonal of CᵀHC,
    the Hessian in the centred variables (W, b + μᵀW) of the columns whose mean dominates
    their spread, and M⁻¹ = C·D⁻¹·Cᵀ.

    With a projection Π that subtracts group means (`remove_class_shift`: the mean over the
    classes of each row of [W; b]), CG runs on Π's range: `solve` is Π·D⁻¹·Π and `apply` its
    inverse there, E = D − D·1(1ᵀD1)⁻¹1ᵀD per group (E·Π·D⁻¹·Π = Π), so that the trust region
    measures its steps in the norm that CG's preconditioner induces.

    Cost: one GEMM with X² per outer iteration (X² formed on the fly, O(N·d)), O(P) per use.
    """
    shift = centring_of(objective)
    if shift is None:
        values = objective.hessian_diagonal(evaluation)
    else:
        values = objective.hessian_diagonal(evaluation, shift)
    values = jnp.where(values > 0, values, jnp.max(values, initial=1.0))
    if mix != 1.0:
        values = (1 - mix) * jnp.mean(values) + mix * values
    if project is None:
        jacobi = Preconditioner(solve=lambda v: v / values, apply=lambda v: v * values)
    else:
        # v − Π(v) is v's group mean, repeated over the group: (1ᵀD1) per group is that of
        # D's. (With Π = I, as for a reference class, the correction below is 0/1.)
        group_values = values - project(values)
        group_values = jnp.where(group_values > 0, group_values, 1)

        def apply(vector):
            scaled = vector * values
            return scaled - values * (scaled - project(scaled)) / group_values

        jacobi = Preconditioner(solve=lambda v: project(project(v) / values), apply=apply)
    if shift is None:
        return jacobi

    def centred(vector, inverse, transpose):
        return centring_flat(vector, shift, inverse, transpose)

    # C and Π act on the two axes of θ's [d̃, Kf] view and commute: M⁻¹ = C·(Π·D_c⁻¹·Π)·Cᵀ,
    # M = C⁻ᵀ·E_c·C⁻¹ on Π's range.
    return Preconditioner(
        solve=lambda v: centred(jacobi.solve(centred(v, False, True)), False, False),
        apply=lambda v: centred(jacobi.apply(centred(v, True, False)), True, True),
    )


def centring_of(objective: Objective) -> jax.Array | None:
    """The shift μ that `Newton` and the diagonal preconditioner centre by, or None.

    The objective's `feature_shift` (a dense X with an intercept) for the columns whose mean
    dominates their spread, below float64. In float32 the explicit Hessian and its diagonal
    of a column c + δ·z beside the intercept round the centred curvature, of relative size
    δ²/c², away: `newton` (scikit-learn's "newton-cholesky") stopped CONVERGED 1.4e-4 to
    6.5e-4 above the optimum with a column of mean 1e4 (2,000 × 20, 5 classes, 3 draws), and
    Newton-CG with this preconditioner up to 1.35e-4, where Newton-CG with the centred
    Kronecker preconditioner reached 1e-8 to 6.5e-8; centred, 6.5e-8 to 1.8e-7 and 2.8e-8
    to 8e-8. Float64 fits are not centred, as the Kronecker preconditioner's are not.
    """
    shift = getattr(objective, "feature_shift", None)
    if shift is None or objective.dtype == jnp.float64:
        return None
    return shift(dominant=True)


class FeatureBasis(NamedTuple):
    """Eigendecomposition of the feature Gram A = X̃ᵀŴX̃, computed once per fit.

    Either of A itself (`scale` all ones, `penalty` all ones: the L2 term l2·I is then exact in
    the eigenbasis) or of the Jacobi-scaled S = D·A·D with D = diag(A)^(-1/2) (`scale` holds
    D's diagonal, `penalty` the L2 term's Rayleigh quotients in S's eigenbasis, exact only
    when the columns have equal scales). See `feature_basis`. With `shift` μ (not None), A is
    the centred Gram A_c of X̃·C, C = [[I, 0], [−μᵀ, 1]] (`centred_feature_gram`), the basis
    is in the variables C⁻¹·θ (`centring`), and the L2 term is the penalty's own, l2·P with P
    the projection on W (the intercept unpenalised), which C leaves as it is: CᵀPC = P.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    scale: jax.Array
    penalty: jax.Array
    shift: jax.Array | None = None


def centring(
    block: jax.Array, shift: jax.Array | None, inverse: bool, transpose: bool
) -> jax.Array:
    """C·Y, C⁻¹·Y, Cᵀ·Y or C⁻ᵀ·Y for C = [[I, 0], [−μᵀ, 1]] and Y [d̃, ...] (intercept last).

    C maps the centred variables θ_c = (W, b + μᵀW) to θ; each product is O(d̃) per column of
    Y. The identity when `shift` μ is None.
    """
    if shift is None:
        return block
    sign = 1 if inverse else -1
    shift = shift.astype(block.dtype)
    if transpose:  # the feature rows get ∓μ times the intercept's row
        return block.at[:-1].add(sign * jnp.tensordot(shift, block[-1], axes=0))
    return block.at[-1].add(sign * jnp.tensordot(shift, block[:-1], axes=1))


def centring_flat(
    vector: jax.Array, shift: jax.Array | None, inverse: bool, transpose: bool
) -> jax.Array:
    """`centring` applied to a flat θ through its [d̃, Kf] view (intercept row last)."""
    if shift is None:
        return vector
    return centring(vector.reshape(shift.size + 1, -1), shift, inverse, transpose).reshape(-1)


def penalised_rows(size: int, shift: jax.Array | None, dtype) -> jax.Array:
    """The diagonal of the L2 term's matrix [d̃]: ones (l2·I), the intercept's 0 when centred."""
    rows = jnp.ones(size, dtype)
    return rows if shift is None else rows.at[-1].set(0)


def feature_basis(
    gram: jax.Array, scaled: bool = True, shift: jax.Array | None = None
) -> FeatureBasis:
    """Eigendecomposition of the feature Gram, Jacobi-scaled or not (O(d³), once per fit).

    Scaled, columns of very different sizes stay resolved (an eigendecomposition of A itself
    loses the small ones, in float32 above all), which an unpenalised fit needs to tell
    collinear columns from small ones; there the L2 term is zero and the scaled form exact.
    With a penalty, the unscaled basis keeps l2·I exact, and its eigenvalue errors (about
    eps·λ_max) matter only where they exceed l2. On raw, unstandardised columns the scaled
    form's approximate L2 term made CG several times longer (float64, tol = 1e-6: raw digits
    at l2 = 1e-3 took 1,278 Hessian products scaled and 444 unscaled; columns scaled by
    10^±3, 327 and 25), and standardised data is unaffected (docs/solvers.md). `gram` is the
    centred Gram when `shift` is given (scaled only), and `penalty` the quotients of l2·P, the
    intercept's row left out: l2·I in the centred variables would be l2·CᵀC, whose μ·μᵀ
    (1e8 for two float32 columns of mean 1e4) broke the class blocks' Cholesky factorisation.
    """
    if not scaled:
        eigenvalues, eigenvectors = eigh(gram)
        ones = jnp.ones_like(eigenvalues)
        return FeatureBasis(jnp.maximum(eigenvalues, 0), eigenvectors, ones, ones, shift)
    scaled_gram, scale = jacobi_scaled(gram)
    eigenvalues, eigenvectors = eigh(scaled_gram)
    # In the scaled variables θ = D·θ' the L2 term l2·I becomes l2·D²; its Rayleigh quotient
    # on each eigenvector keeps M ⊗-structured (exact when the columns have equal scales).
    rows = eigenvectors.shape[0] - (shift is not None)  # the intercept's row is unpenalised
    penalty = jnp.square(eigenvectors[:rows]).T @ jnp.square(scale[:rows])
    return FeatureBasis(jnp.maximum(eigenvalues, 0), eigenvectors, scale, penalty, shift)


def class_eigenbasis(curvature: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(eigenvalues, eigenvectors) of the class curvature B; (b, None) for a diagonal b [Kf].

    `class_curvature` gives the diagonal from many classes on; its eigenbasis is the identity.
    """
    if curvature.ndim == 1:
        return curvature, None
    return eigh(curvature)


def rotate_classes(block: jax.Array, vectors: jax.Array | None, inverse: bool = False):
    """block·Q (or block·Qᵀ), the class axis in B's eigenbasis; the identity when Q is None."""
    if vectors is None:
        return block
    return block @ (vectors.T if inverse else vectors)


def kronecker(objective: Objective, evaluation: Evaluation, basis: FeatureBasis) -> Preconditioner:
    """M ≈ A ⊗ B + l2·I with A = X̃ᵀŴX̃ (fixed) and B = Σᵢ ŵᵢ(diag sᵢ − sᵢsᵢᵀ) (per iteration).

    H = Σᵢ ŵᵢ x̃ᵢx̃ᵢᵀ ⊗ Dᵢ + l2·I_W; replacing each Dᵢ by their weighted mean B keeps the
    feature correlations that make H ill-conditioned (a diagonal cannot), and
    in the Jacobi-scaled variables (S = D·A·D = U·diag(λ)·Uᵀ, B = Q·diag(μ)·Qᵀ)
    M⁻¹ = (D ⊗ I)(U ⊗ Q)·diag(1/(λ·μ + l2·(UᵀD²U)ᵢᵢ))·(U ⊗ Q)ᵀ(D ⊗ I) costs O(d²K + dK²) per
    use after an O(N·K² + K³) update per outer iteration. With `basis` unscaled (D = I, see
    `feature_basis`) the L2 term is exact: M = A ⊗ B + l2·I. Far fewer CG iterations than the
    diagonal when features are correlated; needs the d̃ × d̃ Gram (so d up to a few thousand).
    Where `class_curvature` gives B's diagonal b (many classes, no reference class), Q = I:
    M = A ⊗ diag(b) + l2·I, O(N·K) per outer iteration and O(d²K) per use.

    With a centred basis (`FeatureBasis.shift`) the L2 term is the penalty's own l2·P (the
    intercept unpenalised): M = A ⊗ B + l2·P.

    With the scaled basis and l2 > 0 (float32 only, see `_exact_penalty_basis`) the L2 term's
    stand-in is replaced, within `CLASS_BLOCK_MAX_ENTRIES` and `CLASS_BLOCK_MAX_FLOPS`, by M's
    exact class blocks (`class_block_inverses`): O(Kf·d̃³) per outer iteration, O(Kf·d̃²) per
    use.
    """
    kf = objective.num_free_classes
    curvature_values, curvature_vectors = class_eigenbasis(objective.class_curvature(evaluation))
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
    # d̃·eps (`null_cutoff` of one row), not d̃·√N·eps: nothing checks these directions against
    # X here, and at the looser cutoff columns that X resolves (x and x + 1e-2·noise in float32
    # at N = 10⁴) lost their curvature, so that Newton-CG stopped 0.027 above the optimum.
    cutoff = null_cutoff(values.size, 1, values.dtype)
    feature_null = values <= cutoff * jnp.max(values, initial=0)
    null = feature_null[:, None] & (objective.l2 == 0)
    spectrum = jnp.maximum(spectrum, jnp.finfo(spectrum.dtype).tiny)
    inverse = jnp.where(null, 0, 1 / spectrum)
    spectrum = jnp.where(null, 0, spectrum)

    shift = basis.shift

    def transform(vector, values, outer, inverse):
        # M⁻¹ = C·(…)·Cᵀ and M = C⁻ᵀ·(…)·C⁻¹ in the centred variables (`centring`).
        block = centring(vector.reshape(-1, kf), shift, inverse, transpose=not inverse) * outer
        rotated = rotate_classes(feature_vectors.T @ block, curvature_vectors)
        back = rotate_classes(feature_vectors @ (rotated * values), curvature_vectors, inverse=True)
        return centring(outer * back, shift, inverse, transpose=inverse).reshape(-1)

    # M = (D⁻¹ ⊗ I)(U ⊗ Q)·diag(spectrum)·(U ⊗ Q)ᵀ(D⁻¹ ⊗ I), and M⁻¹ with D and 1/spectrum.
    eigen = Preconditioner(
        solve=lambda v: transform(v, inverse, scale, inverse=False),
        apply=lambda v: transform(v, spectrum, 1 / scale, inverse=True),
    )
    if not _factors_class_blocks(objective, basis):
        return eigen
    # The scaled basis with l2 > 0 (float32): l2·D² is not diagonal in S's eigenbasis, so
    # factorise each class's block instead (see `class_block_inverses`).
    factored = (objective.l2 > 0) & jnp.any(basis.scale != 1)
    operands = (basis.eigenvalues, feature_vectors, basis.scale, curvature_values, objective.l2)
    operands = operands + (shift,)
    size, dtype = basis.eigenvalues.size, spectrum.dtype
    # The branches close over no traced array (see `batch_cond`): the jaxpr keeps its batching
    # rule, and through it a closed-over `spectrum` kept the whole trace alive.
    inverses = batch_cond(
        factored,
        class_block_inverses,
        lambda *_: jnp.zeros((kf, size, size), dtype),
        *operands,
    )

    def rotated(vector):  # Y·Q, [d̃, Kf]
        return rotate_classes(vector.reshape(-1, kf), curvature_vectors)

    def back(block):  # Z·Qᵀ as θ
        return rotate_classes(block, curvature_vectors, inverse=True).reshape(-1)

    def blocks_solve(vector):
        # C·(μ_m·A_c + l2·P)⁻¹·Cᵀ per class; C commutes with the class rotation.
        block = centring(rotated(vector), shift, inverse=False, transpose=True)
        solved = jnp.einsum("mij,jm->im", inverses, block)
        return back(centring(solved, shift, inverse=False, transpose=False))

    rows = penalised_rows(basis.eigenvalues.size, shift, dtype)[:, None]

    def blocks_apply(vector):
        # C⁻ᵀ·μ_m·A_c·C⁻¹·R_m + l2·P·R_m per class, with A_c = D⁻¹·U·diag(λ)·Uᵀ·D⁻¹.
        block = rotated(vector)
        centred = centring(block, shift, inverse=True, transpose=False)
        features = feature_vectors.T @ (centred / scale)
        gram_block = feature_vectors @ (basis.eigenvalues[:, None] * features) / scale
        gram_block = centring(gram_block, shift, inverse=True, transpose=True)
        return back(gram_block * curvature_values[None, :] + objective.l2 * rows * block)

    return Preconditioner(
        solve=lambda v: cond(factored, blocks_solve, eigen.solve, v),
        apply=lambda v: cond(factored, blocks_apply, eigen.apply, v),
    )


# In float32 the Kronecker form factorises the class blocks (`class_block_inverses`) when its
# basis is the scaled one and l2 > 0, while they hold at most this many entries (Kf·d̃²: 128 MiB
# in float32) and cost at most this many flops (Kf·d̃³, about a second on 2 cores) per outer
# iteration.
CLASS_BLOCK_MAX_ENTRIES = 2**25
CLASS_BLOCK_MAX_FLOPS = 2**33


def _factors_class_blocks(objective: Objective, basis: FeatureBasis) -> bool:
    """Whether `kronecker` may factorise its class blocks (static: dtype and sizes).

    A float64 basis never needs to (also under float32 products, `product_dtype`): it is A's
    own whenever l2 > 0, and with l2 = 0 the scaled basis is exact.
    """
    size, kf = basis.eigenvalues.size, objective.num_free_classes
    return (
        basis.eigenvalues.dtype != jnp.float64
        and kf * size**2 <= CLASS_BLOCK_MAX_ENTRIES
        and kf * size**3 <= CLASS_BLOCK_MAX_FLOPS
    )


def class_block_inverses(
    eigenvalues: jax.Array,
    eigenvectors: jax.Array,
    scale: jax.Array,
    class_values: jax.Array,
    l2: jax.Array,
    shift: jax.Array | None = None,
) -> jax.Array:
    """(μ_m·A + l2·I)⁻¹ = D·(μ_m·S + l2·D²)⁻¹·D for each class eigenvalue μ_m: [Kf, d̃, d̃].

    M = A ⊗ B + l2·I is block diagonal in B's eigenbasis, one block μ_m·A + l2·I per class
    direction. In the Jacobi-scaled variables (S = D·A·D = U·diag(λ)·Uᵀ, from the scaled
    basis) a block is μ_m·S + l2·D², whose Cholesky factor keeps its digits whatever the
    columns' scales, where neither basis does: A's own eigendecomposition loses eigenvalues
    below eps·λ_max(A) (float32: about 1e-7 of the largest), and S's does not diagonalise
    l2·D². Kf factorisations of d̃ × d̃ per outer iteration, one class at a time. S gets
    d̃·eps·λ_max(S) added to its diagonal, so that rounding cannot make a block indefinite.

    float32, tol = 1e-6, against S's eigenbasis with l2·D² replaced by its diagonal there: raw
    breast cancer (l2 = 1e-2) 54 Hessian products against 1,749; digits with columns scaled
    by 10^U(−3, 3) 473 against 23,933 (MAX_ITER); docs/solvers.md has the table.

    With `shift` μ, A and S are centred (`FeatureBasis`) and the blocks are those of the
    centred variables, (μ_m·A_c + l2·P)⁻¹, with the intercept unpenalised.
    """
    size = eigenvalues.size
    identity = jnp.eye(size, dtype=eigenvalues.dtype)
    jitter = size * jnp.finfo(eigenvalues.dtype).eps * jnp.max(eigenvalues, initial=0)
    gram = (eigenvectors * eigenvalues[None, :]) @ eigenvectors.T + jitter * identity
    penalty = jnp.diag(l2 * jnp.square(scale) * penalised_rows(size, shift, scale.dtype))

    def one(value):
        inverse = cholesky_solve(cholesky(value * gram + penalty), identity)
        return scale[:, None] * inverse * scale[None, :]

    return lax.map(one, class_values)


class ProjectedBasis(NamedTuple):
    """The Gram's eigenbasis and the features in it, X̃·Qa [N, d̃] (once per fit, for "ekfac")."""

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    projected: jax.Array


def ekfac(objective: Objective, evaluation: Evaluation, basis: ProjectedBasis) -> Preconditioner:
    """Kronecker eigenbasis, per-pair eigenvalues: M = (Qa ⊗ Qb)·diag(D)·(Qa ⊗ Qb)ᵀ + l2·I.

    Qa are the eigenvectors of A = X̃ᵀŴX̃ (fixed), Qb those of the mean class curvature B (per
    iteration; the class axes where `class_curvature` gives B's diagonal); D is the exact
    diagonal of H in that basis,

        D[j, m] = Σᵢ ŵᵢ·(x̃ᵢ·qa_j)²·(qb_mᵀ(diag sᵢ − sᵢsᵢᵀ)qb_m),

    so that each (feature, class) direction gets its own curvature instead of λa_j·μb_m
    (George et al., 2018, "eigenvalue-corrected" K-FAC). Measured on Gaussian class means
    (K = 30 to 200) it conditions H no better than "kronecker" (κ(M⁻¹H) 221 against 209 at
    K = 30; the same CG count at K = 100), at twice the cost per outer iteration, so "auto"
    does not choose it: the coupling between classes, not the per-class scale, is what is
    left. Cost per outer iteration:
    two GEMMs [N, Kf] × [Kf, Kf] and one [d̃, N] × [N, Kf] (about one Hessian product),
    O(d²K + dK²) per use; X̃·Qa is formed once per fit.
    """
    kf = objective.num_free_classes
    curvature = objective.class_curvature(evaluation)
    if curvature.ndim == 1:  # B's diagonal: the class axes are its eigenbasis
        curvature_vectors = jnp.eye(kf, dtype=curvature.dtype)
    else:
        _, curvature_vectors = eigh(curvature)
    probs = evaluation.probs
    rotated_probs = probs @ curvature_vectors
    row_curvature = probs @ jnp.square(curvature_vectors) - jnp.square(rotated_probs)
    row_curvature = objective.weights[:, None] * jnp.maximum(row_curvature, 0)
    spectrum = jnp.square(basis.projected).T @ row_curvature
    floor = _EIGENVALUE_FLOOR * jnp.max(spectrum, initial=0)
    spectrum = jnp.maximum(spectrum, floor) + objective.l2
    spectrum = jnp.maximum(spectrum, jnp.finfo(spectrum.dtype).tiny)
    feature_vectors = basis.eigenvectors

    def transform(vector, scale):
        block = vector.reshape(-1, kf)
        rotated = feature_vectors.T @ block @ curvature_vectors
        return (feature_vectors @ (rotated * scale) @ curvature_vectors.T).reshape(-1)

    return Preconditioner(
        solve=lambda v: transform(v, 1 / spectrum), apply=lambda v: transform(v, spectrum)
    )


KINDS = ("auto", "kronecker", "ekfac", "diagonal", "none")

# What each kind needs of the objective beyond the `Objective` protocol.
_NEEDS = {
    "kronecker": ("feature_gram", "class_curvature"),
    "ekfac": ("feature_gram", "class_curvature", "design_matrix"),
    "diagonal": ("hessian_diagonal",),
    "none": (),
}


def resolve(kind: str, objective: Objective) -> str:
    """The concrete preconditioner for `kind` on this objective ("auto" decides statically).

    "auto" is the objective's `default_preconditioner` when it has one, else "diagonal" when
    it has `hessian_diagonal`, else "none".

    Raises:
        ValueError: the objective lacks what the requested kind needs.
    """
    if kind == "auto":
        kind = getattr(objective, "default_preconditioner", None)
        if kind is None:
            kind = "diagonal" if hasattr(objective, "hessian_diagonal") else "none"
    missing = [name for name in _NEEDS[kind] if not hasattr(objective, name)]
    if missing:
        raise ValueError(
            f'preconditioner="{kind}" needs the objective to have {missing}; '
            f'{type(objective).__name__} does not: choose another preconditioner ("none" '
            "works for any objective)."
        )
    return kind


def _exact_penalty_basis(objective: Objective, gram: jax.Array) -> bool | jax.Array:
    """Whether the Kronecker basis is A's own (see `feature_basis`) rather than the scaled one.

    Only with l2 > 0: known when the program is built (`LogisticObjective.penalised`), or
    decided at run time for an l2 that may be 0 (traced: `vmap` over a grid of l2, or l2 a
    `jit` argument). Without that run-time test such fits kept the scaled basis, and in
    float32 on digits / 16 at l2 = 1e-2 and 1e-1 stopped with LINE_SEARCH_FAILED after 19–27
    iterations where a concrete l2 converged in 5–8.

    Then in float64 always. In float32, when l2 covers the rounding of A's eigenvalues, about
    eps·λ_max(A), times B's largest eigenvalue (at most 1/2): l2 >= eps·trace(A)/2
    (trace(A) >= λ_max), decided at run time. Then l2·I is exact in the basis and the rounding
    errors sit below it; otherwise (columns of very different scales) the unscaled
    eigendecomposition loses the small columns and the scaled one is kept, with the class
    blocks factorised where affordable (`class_block_inverses`). Raw digits at l2 = 1e-3:
    eps·trace(A)/2 = 2.3e-4, unscaled; columns spread over 10^±3: about 0.06, scaled.
    """
    if objective.dtype == jnp.float64:
        covered = True
    else:
        covered = objective.l2 >= 0.5 * jnp.finfo(objective.dtype).eps * jnp.trace(gram)
    if getattr(objective, "penalised", False):
        return covered
    return (objective.l2 > 0) & covered


def setup_basis(kind: str, objective: Objective) -> FeatureBasis | ProjectedBasis | None:
    """What a preconditioner of this kind needs once per fit (the Gram's eigenbasis).

    A regularisation path passes its objective at its weakest l2, which decides the basis.
    Below float64 the scaled Kronecker basis is the centred Gram's where the objective has one
    (`centred_feature_gram`: a dense X with an intercept), see `_kronecker_basis`.
    """
    kind = resolve(kind, objective)
    if kind in ("diagonal", "none"):
        return None
    if kind == "kronecker":
        return _null_checked_with_features(objective, _kronecker_basis(objective))
    gram = objective.feature_gram()
    basis = _basis(_exact_penalty_basis(objective, gram), gram)
    projected = objective.design_matrix() @ basis.eigenvectors
    return ProjectedBasis(basis.eigenvalues, basis.eigenvectors, projected)


def _basis(exact: bool | jax.Array, gram: jax.Array) -> FeatureBasis:
    """A's own eigenbasis where `exact` holds, the scaled one where not (`feature_basis`)."""
    if isinstance(exact, bool):
        return feature_basis(gram, scaled=not exact)
    return batch_cond(
        exact,
        lambda matrix: feature_basis(matrix, scaled=False),
        lambda matrix: feature_basis(matrix, scaled=True),
        gram,
    )


def _kronecker_basis(objective: Objective) -> FeatureBasis:
    """The Kronecker form's basis: A's own where the L2 term is exact in it, else scaled.

    Below float64 the scaled basis (every unpenalised fit's; l2 < eps·trace(A)/2) is the
    centred Gram A_c's (`centred_feature_gram`): in float32 a column 7 + 1e-3·z beside the
    intercept has a scaled eigenvalue in A below eps, so that the basis dropped it as collinear
    and Newton-CG stopped 3e-2 above the optimum (CONVERGED or LINE_SEARCH_FAILED) where Newton
    reached it. A itself (for the test of `_exact_penalty_basis` and the unscaled basis)
    is then C⁻ᵀ·A_c·C⁻¹, one Gram pass in all. Float64 fits are not centred: A resolves such a
    column down to δ/c of about 1e-8 there, and centred, a float64 path with l2 = 0 in its
    grid took 8 to 100 times the products at δ/c = 1e-9 to 1e-13 (the stand-in for l2·D²·P
    with D's huge entry), fits at δ/c ≤ 1e-12 ended LINE_SEARCH_FAILED, and the streamed fit
    failed at 1e-9.
    """
    centred = getattr(objective, "centred_feature_gram", None)
    if centred is None or objective.dtype == jnp.float64:
        gram = objective.feature_gram()
        return _basis(_exact_penalty_basis(objective, gram), gram)
    centred_gram, shift = centred()
    if shift is None:
        return _basis(_exact_penalty_basis(objective, centred_gram), centred_gram)
    half = centring(centred_gram, shift, inverse=True, transpose=True)  # C⁻ᵀ·A_c
    gram = centring(half.T, shift, inverse=True, transpose=True).T  # (C⁻ᵀ·(C⁻ᵀ·A_c)ᵀ)ᵀ = A
    exact = _exact_penalty_basis(objective, gram)
    return batch_cond(
        exact,
        lambda gram, _, shift: feature_basis(gram, scaled=False, shift=jnp.zeros_like(shift)),
        lambda _, centred_gram, shift: feature_basis(centred_gram, scaled=True, shift=shift),
        gram,
        centred_gram,
        shift,
    )


def _null_checked_with_features(objective: Objective, basis: FeatureBasis) -> FeatureBasis:
    """The basis with the eigenvalues of exact dependences of X̃'s columns set to 0.

    `kronecker` drops the directions whose scaled-Gram eigenvalue is below d̃·eps of the
    largest, the cutoff where nothing checks them against X here. The Gram's own rounding
    (√N·eps per entry) can leave an exact dependence above it: float32 columns 3·1 beside the
    intercept at N = 300, whose eigenvalue 1/(λ·μ) then amplified, so that Newton-CG moved
    ±1e4 along the dependence on rounding decreases of the loss, and the fit returned
    intercepts of 1e9, CONVERGED. Below the looser d̃·√N·eps each direction is measured with X
    itself (the weighted norm of X̃·D·u, one product with X once per fit, only when an
    unpenalised fit is possible): a dependence exact to X's rounding has a norm of a few eps,
    columns that X resolves (x and x + 1e-2·noise) far more. In a centred basis the product is
    with X − 1·μᵀ, row chunk by row chunk (exact where it matters: a column within a factor
    of two of its mean loses no digit, where X·w − μᵀw would cancel).
    """
    features = getattr(objective, "features", None)
    if features is None or getattr(objective, "penalised", True):
        return basis
    values = basis.eigenvalues
    top = jnp.max(values, initial=0)
    loose = values <= null_cutoff(values.size, features.shape[0], values.dtype) * top
    directions = (basis.scale[:, None] * basis.eigenvectors).astype(features.dtype)  # D·U
    num_features, shift = features.shape[1], basis.shift

    def squares(rows, weights):  # Σᵢ ŵᵢ·(x̃ᵢ·D·u)² over these rows, per direction u
        if shift is not None:
            rows = rows - shift.astype(rows.dtype)[None, :]
        images = matmul(rows, directions[:num_features])
        if directions.shape[0] > num_features:  # the intercept's row
            images = images + directions[num_features][None, :]
        return weights @ jnp.square(images)

    chunk = getattr(objective, "row_chunk", None)
    norms = jnp.sqrt(column_sums_by_chunks(squares, features, objective.weights, chunk))
    exact = norms <= 8 * values.size * jnp.finfo(values.dtype).eps * jnp.sqrt(top)
    return basis._replace(eigenvalues=jnp.where(loose & exact, 0, values))


def build(
    kind: str,
    objective: Objective,
    evaluation: Evaluation,
    basis: FeatureBasis | ProjectedBasis | None,
    mix: float = 1.0,
) -> Preconditioner:
    """The preconditioner of this kind at the point of `evaluation`.

    When the objective has a `remove_class_shift` projection Π (the common shift of every
    class, along which logistic regression without a reference class is flat), the
    preconditioner acts on Π's range, where the gradient, every H·v and a minimiser lie: `solve`
    is Π·M⁻¹·Π, and `apply` its inverse there (M itself for the Kronecker forms and the
    identity, which commute with Π; see `diagonal` for Jacobi). Without the projection the
    diagonal, which scales the classes of a row differently, moves θ along the shift, which
    only the penalty's weak pull (l2 per unit) brings back: on a 12-feature, 5-class problem
    with columns of unequal scale, Jacobi-preconditioned Newton-CG took 26 iterations and
    1,343 products without it, 9 and 178 with it.
    """
    kind = resolve(kind, objective)
    project = getattr(objective, "remove_class_shift", None)
    if kind == "diagonal":
        return diagonal(objective, evaluation, mix, project)
    if kind == "kronecker":
        preconditioner = kronecker(objective, evaluation, basis)
    elif kind == "ekfac":
        preconditioner = ekfac(objective, evaluation, basis)
    else:
        preconditioner = identity()
    if project is None:
        return preconditioner
    return preconditioner._replace(solve=lambda v: project(preconditioner.solve(project(v))))
