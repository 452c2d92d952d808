"""Quasi-separation: whether the data of an unpenalised fit have no finite optimum.

Without a penalty the maximum-likelihood estimate exists exactly when no change Δ of the
coefficients raises some pairwise margin x̃ᵢ·(Δ_{yᵢ} − Δₖ), k ≠ yᵢ, while lowering none (Albert
and Anderson, 1984, for every pair of a row's label with another class): along such a Δ every
row's loss log Σₖ exp(zᵢₖ − zᵢ,yᵢ) falls or stays, for ever. Where the fitted logits themselves
classify every row correctly (complete separation) the solvers stop with `Status.DIVERGED`.
Otherwise (quasi-complete separation: a class alone where an indicator is 1, a class never seen
at some level of one, setosa in the iris data) the loss falls ever more slowly, the gradient
test passes, and the fit reports CONVERGED at coefficients that grow as `tol` shrinks: 114,
869 and 2,200 at tol 1e-4, 1e-8 and 1e-12 on the tests' example.

The check is a linear program, as R's safeBinaryRegression and detectseparation pose it
(Konis, 2007), extended to K classes: over Δ ∈ [−1, 1]^{d̃×K} and s ∈ [0, 1]^{N×(K−1)},
maximise Σ sᵢₖ subject to sᵢₖ ≤ x̃ᵢ·(Δ_{yᵢ} − Δₖ), with X̃'s columns scaled to unit root mean
square. The optimum is 0 where no such Δ exists; a positive one comes with its Δ, which is then
verified in float64 (`_verified`): no pairwise margin falls by more than `SLACK` of the largest
rise, and that rise exceeds `RISE` (HiGHS's own tolerances are 1e-7). It is exact where a
heuristic is not: the Newton step at the returned point, tried first as Δ, took nearly
separated data with an optimum for separated (a row on the wrong side by 1e-3 lowered by 0.1%
of the rise) and missed a class absent from one level of an indicator (only the margins against
that class rise). Cost: ms for iris; on N(K − 1) constraints of 2d̃ + 1 entries, 0.2-0.7 s at 6·10⁴
entries and 4 s at 1.5·10⁵ (non-separable data, the slow case); run up to `MAX_LP_ENTRIES`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Checked up to this many constraint entries N·(K − 1)·d̃; bigger fits are not. At 2¹⁷ the
# program took 1.4 s (4,000 × 15, K = 3), 5.1 s (16,000 × 3, K = 3) and 11.3 s (660 × 3, K = 50).
MAX_LP_ENTRIES = 2**15
# The verified Δ lowers no pairwise margin by more than SLACK of its largest rise, which
# exceeds RISE (margins of columns scaled to unit RMS, Δ within [−1, 1]).
SLACK = 1e-9
RISE = 1e-6


class Separation(NamedTuple):
    """Facts of a quasi-separation found by `quasi_separation` (the message's arguments)."""

    columns: list[int]
    num_features: int
    rows: int
    num_rows: int
    converged: bool = True


def lp_entries(num_rows: int, num_columns: int, num_classes: int) -> int:
    """The linear program's constraint entries, N·(K − 1)·d̃ (`MAX_LP_ENTRIES` bounds them)."""
    return num_rows * (num_classes - 1) * num_columns


def quasi_separation(features, labels, num_classes: int, fit_intercept: bool) -> Separation | None:
    """The separation of these rows (module docstring), or None where the optimum is finite.

    Args:
        features: [N, d] float64 rows of positive weight, dense or SciPy CSR.
        labels: [N] integer labels of those rows in [0, num_classes).
        num_classes: K (classes without rows are left out).
        fit_intercept: whether an intercept is fitted (X̃ = [X, 1]).

    Returns:
        The `Separation`: the columns of X̃ (index d the intercept) that carry Δ, at least a
        tenth of the largest, and the rows Δ separates from some class. None also when the
        linear program fails.
    """
    import scipy.optimize
    import scipy.sparse

    dense = features.toarray() if hasattr(features, "toarray") else np.asarray(features)
    num_rows, num_features = dense.shape
    if fit_intercept:
        dense = np.hstack([dense, np.ones((num_rows, 1))])
    num_columns = dense.shape[1]
    # Only the classes that have rows: a class without any has no finite intercept either,
    # which the fit warns of on its own (and the estimator's folds fit silently).
    present, labels = np.unique(np.asarray(labels), return_inverse=True)
    num_classes = present.size
    if num_rows == 0 or num_classes < 2:
        return None
    rms = np.sqrt(np.mean(np.square(dense), axis=0))
    dense = dense / np.where(rms > 0, rms, 1)
    # One constraint per pair (row i, class k ≠ yᵢ): −x̃ᵢ·Δ_{yᵢ} + x̃ᵢ·Δₖ + sᵢₖ ≤ 0, with Δ
    # flattened as [d̃, K] (class fastest) and s after it.
    classes = np.arange(num_classes)
    other = np.broadcast_to(classes, (num_rows, num_classes))[classes[None, :] != labels[:, None]]
    row = np.repeat(np.arange(num_rows), num_classes - 1)
    pairs = row.size
    size = num_columns * num_classes
    column = np.arange(num_columns)[None, :] * num_classes
    values = dense[row].reshape(-1)
    constraint = np.repeat(np.arange(pairs), num_columns)
    matrix = scipy.sparse.csr_matrix(
        (
            np.concatenate([-values, values, np.ones(pairs)]),
            (
                np.concatenate([constraint, constraint, np.arange(pairs)]),
                np.concatenate(
                    [
                        (column + labels[row][:, None]).reshape(-1),
                        (column + other[:, None]).reshape(-1),
                        size + np.arange(pairs),
                    ]
                ),
            ),
        ),
        shape=(pairs, size + pairs),
    )
    bounds = np.concatenate([np.tile([[-1.0, 1.0]], (size, 1)), np.tile([[0.0, 1.0]], (pairs, 1))])
    result = scipy.optimize.linprog(
        np.concatenate([np.zeros(size), -np.ones(pairs)]),
        A_ub=matrix,
        b_ub=np.zeros(pairs),
        bounds=bounds,
        method="highs",
    )
    if result.status != 0 or not -result.fun > RISE:
        return None
    change = result.x[:size].reshape(num_columns, num_classes)
    logits = dense @ change
    rises = logits[row, labels[row]] - logits[row, other]
    if not _verified(rises):
        return None
    separated = np.zeros(num_rows, bool)
    separated[row[rises > SLACK * rises.max()]] = True
    # The class shift (one vector added to every class) moves no margin: centred out.
    carried = np.linalg.norm(change - change.mean(axis=1, keepdims=True), axis=1)
    return Separation(
        columns=np.flatnonzero(carried >= 0.1 * carried.max()).tolist(),
        num_features=num_features,
        rows=int(np.count_nonzero(separated)),
        num_rows=num_rows,
    )


def _verified(rises: np.ndarray) -> bool:
    """Whether pairwise margin changes certify a separation: none falls, and some rise."""
    largest = float(rises.max(initial=0.0))
    return largest > RISE and float(rises.min(initial=0.0)) >= -SLACK * largest


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
    outcome = (
        "the fit stopped where the gradient test passed, and those coefficients grow without "
        "bound as tol shrinks, while the predicted probabilities settle"
        if separation.converged
        else "this is why the fit did not converge (its coefficients grow without bound)"
    )
    return (
        f"The data are quasi-separated and {unpenalised}: no finite maximum-likelihood estimate "
        f"exists. A change of the coefficients, chiefly those of columns [{', '.join(names)}], "
        f"raises the margin of the label over some other class on {separation.rows} of "
        f"{separation.num_rows} rows and lowers no margin, so the loss keeps falling as they "
        f"grow: {outcome}. For finite estimates {penalise}, or drop or merge what separates "
        "the classes."
    )
