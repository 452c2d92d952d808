"""Quasi-separation: whether an unpenalised fit stopped along a direction its loss keeps falling.

Without a penalty the maximum-likelihood estimate exists only if no change Δ of the
coefficients raises some row's margin mᵢ = zᵢ,yᵢ − max_{k≠yᵢ} zᵢ,ₖ while lowering none: along
such a Δ every row's loss falls or stays, for ever. Where the fitted logits themselves classify
every row correctly (complete separation) the solvers stop with `Status.DIVERGED`. Where a Δ
only raises some rows' margins and leaves the others' (quasi-complete separation: a class alone
where an indicator is 1, setosa in the iris data) the loss falls ever more slowly, the gradient
test passes, and the fit reported CONVERGED at coefficients that grow as `tol` shrinks: 114,
869 and 2,200 at tol 1e-4, 1e-8 and 1e-12 on the data of the tests.

Far along such a Δ the gradient and the curvature along it both decay like e^{−t}, and their
ratio does not: the Newton step stays a step of about one unit of margin on the rows it
separates, and dominates the step wherever the rest of the fit has converged. The check takes
that step, p = −(H + c·I)⁻¹·g (Jacobi-scaled; c a rounding floor, so that the vanishing
curvature along Δ and the class shift cannot make it singular), at the returned point, in
float64 on the host whatever the fit's precision (float32's Hessian rounds the curvature along
Δ away), and flags the fit when p lowers no weighted row's margin by more than
`SEPARATION_SLACK` of the largest rise, and the rows it raises most are already predicted with
probability above 1 − `SATURATED`. At an optimum that exists p is rounding of the gradient, and
lowers some rows' margins by a fair fraction of the rise (on the tests' finite fits by 0.24 of
it or more); on the quasi-separated ones by 2e-4 of it or less.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg

# A finite optimum's step lowers some margin by 0.24 of the largest rise or more (the tests'
# fits), a quasi-separated fit's by 2e-4 or less (at tol 1e-4; less at tighter tol).
SEPARATION_SLACK = 1e-2
# The rows the step raises most are predicted to within this of probability 1.
SATURATED = 1e-3
# Checked up to this many coefficients d̃·K, and this many multiply-adds N·(d̃·K)² for the
# float64 Hessian (about a second on two cores); bigger fits are not checked.
MAX_CHECKED_PARAMS = 1024
MAX_CHECKED_WORK = 2**32
# Rows per block of the Hessian's accumulation (a block holds rows × d̃·K values).
_BLOCK_VALUES = 2**22


class Separation(NamedTuple):
    """Facts of a quasi-separation found by `quasi_separation` (the message's arguments)."""

    columns: list[int]
    num_features: int
    rows: int
    num_rows: int
    largest: float


def quasi_separation(
    features, labels, weights, coefficients, intercept, fit_intercept: bool
) -> Separation | None:
    """Whether the fitted (W, b) lies far along a direction of quasi-separation (module doc).

    Args:
        features: [N, d] float64 rows of positive weight, dense or SciPy CSR.
        labels: [N] integer labels of those rows.
        weights: [N] their positive weights.
        coefficients: [d, K] fitted W.
        intercept: [K] fitted b (zeros without an intercept).
        fit_intercept: whether b was fitted (X̃ = [X, 1]).

    Returns:
        The `Separation` (the columns of X̃ the step moves most, index d the intercept; the
        rows it raises by at least half the largest rise; the largest |W|), or None.
    """
    coefficients = np.asarray(coefficients, np.float64)
    theta = coefficients
    if fit_intercept:
        theta = np.vstack([coefficients, np.asarray(intercept, np.float64)[None, :]])
    num_columns, num_classes = theta.shape
    size = num_columns * num_classes
    num_rows = features.shape[0]
    if num_rows == 0 or size > MAX_CHECKED_PARAMS or num_rows * size**2 > MAX_CHECKED_WORK:
        return None
    labels = np.asarray(labels)
    weights = np.asarray(weights, np.float64)
    weights = weights / np.sum(weights)
    is_label = labels[:, None] == np.arange(num_classes)[None, :]

    def rows(start, stop):
        block = features[start:stop]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        if fit_intercept:
            block = np.hstack([block, np.ones((block.shape[0], 1))])
        return block

    # The gradient Σᵢ ŵᵢ·x̃ᵢ ⊗ (sᵢ − yᵢ) and the Hessian Σᵢ ŵᵢ·(x̃ᵢx̃ᵢᵀ) ⊗ (diag(sᵢ) − sᵢsᵢᵀ), by
    # blocks of rows, the class index running fastest (as θ.ravel()): −Σᵢ ŵᵢ·(x̃ᵢ ⊗ sᵢ)(x̃ᵢ ⊗ sᵢ)ᵀ
    # in one GEMM, its class-diagonal blocks then replaced by Σᵢ ŵᵢ·sᵢₖ(1 − sᵢₖ)·x̃ᵢx̃ᵢᵀ: as
    # s − s² they kept a saturated row's 1 − s only to eps, whose Jacobi scaling then made the
    # scaled Hessian indefinite.
    grad = np.zeros((num_columns, num_classes))
    hessian = np.zeros((size, size))
    diagonal_blocks = np.zeros((num_classes, num_columns, num_columns))
    complement = np.zeros(num_rows)
    step = max(1, _BLOCK_VALUES // size)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        block, w = rows(start, stop), weights[start:stop]
        probs, others = _probabilities(block @ theta)
        label_block = is_label[start:stop]
        complement[start:stop] = np.sum(np.where(label_block, others, 0), axis=1)
        grad += block.T @ (w[:, None] * np.where(label_block, -others, probs))
        outer = (block[:, :, None] * probs[:, None, :]).reshape(len(block), size)
        hessian -= outer.T @ (w[:, None] * outer)
        for k in range(num_classes):
            diagonal_blocks[k] += block.T @ ((w * probs[:, k] * others[:, k])[:, None] * block)
    hessian = hessian.reshape(num_columns, num_classes, num_columns, num_classes)
    for k in range(num_classes):
        hessian[:, k, :, k] = diagonal_blocks[k]
    grad, hessian = grad.ravel(), hessian.reshape(size, size)
    diagonal = np.diag(hessian)
    scale = np.where(diagonal > 0, 1 / np.sqrt(np.where(diagonal > 0, diagonal, 1)), 1.0)
    floor = 64 * size * np.finfo(np.float64).eps
    scaled = hessian * scale[:, None] * scale[None, :] + floor * np.eye(size)
    try:
        factor = scipy.linalg.cho_factor(scaled)
    except np.linalg.LinAlgError:
        return None
    solved = scipy.linalg.cho_solve(factor, scale * grad)
    step_theta = -(scale * solved).reshape(num_columns, num_classes)

    # Each row's margin change under p, by blocks (X̃·p is [N, K]).
    rise = np.empty(num_rows)
    for start in range(0, num_rows, max(1, _BLOCK_VALUES // num_columns)):
        stop = min(start + max(1, _BLOCK_VALUES // num_columns), num_rows)
        change = rows(start, stop) @ step_theta
        label_block = is_label[start:stop]
        own = np.sum(np.where(label_block, change, 0), axis=1)
        rise[start:stop] = own - np.max(np.where(label_block, -np.inf, change), axis=1)
    largest_rise = float(np.max(rise))
    if not largest_rise > 0 or np.min(rise) < -SEPARATION_SLACK * largest_rise:
        return None
    raised = rise >= largest_rise / 2
    if np.max(complement[raised]) > SATURATED:
        return None
    # The columns that carry p: each row of p (centred over the classes, a free shift) by its
    # column's root mean square.
    centred = step_theta - step_theta.mean(axis=1, keepdims=True)
    squares = np.asarray(
        features.multiply(features).mean(axis=0)
        if hasattr(features, "multiply")
        else np.mean(np.square(features), axis=0)
    ).reshape(-1)
    if fit_intercept:
        squares = np.append(squares, 1.0)
    carried = np.linalg.norm(centred, axis=1) * np.sqrt(squares)
    columns = np.flatnonzero(carried >= 0.1 * np.max(carried)).tolist()
    return Separation(
        columns=columns,
        num_features=coefficients.shape[0],
        rows=int(np.count_nonzero(raised)),
        num_rows=num_rows,
        largest=float(np.max(np.abs(coefficients), initial=0.0)),
    )


def _probabilities(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(s, 1 − s) [N, K] of a softmax, 1 − s to its own relative precision where s ≈ 1."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    total = shifted.sum(axis=1, keepdims=True)
    top = np.argmax(logits, axis=1)[:, None] == np.arange(logits.shape[1])[None, :]
    rest = np.sum(np.where(top, 0, shifted), axis=1, keepdims=True)  # the others of the top
    probs = shifted / total
    return probs, np.where(top, rest / total, 1 - probs)


def separation_message(
    separation: Separation,
    unpenalised: str = "l2 = 0",
    penalise: str = "set l2 > 0",
) -> str:
    """The `SeparationWarning`'s text; `unpenalised` and `penalise` name the caller's options."""
    names = [
        "intercept" if column == separation.num_features else str(column)
        for column in separation.columns
    ]
    return (
        f"The data are quasi-separated and {unpenalised}: no finite maximum-likelihood estimate "
        f"exists. Changing the coefficients, chiefly those of columns [{', '.join(names)}], "
        f"raises the margins of {separation.rows} of {separation.num_rows} rows (already "
        "predicted with probability ~1) and lowers no other row's, so the loss keeps falling "
        "as they grow: the fit stopped where the gradient test passed, and those coefficients "
        f"(now up to |W| = {separation.largest:.3g}) grow without bound as tol shrinks, while "
        f"the predicted probabilities settle. For finite estimates {penalise}, or drop or "
        "merge what separates the classes."
    )
