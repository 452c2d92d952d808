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

Larger fits are read off their own coefficients (`separation_along_fit`): a certificate as
exact where found, which can miss a separation that a fit stopped at a loose `tol` has not yet
made visible.
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
# A Δ read off a fit (`separation_along_fit`) also lowers no margin by more than PAIR_SLACK of
# ‖x̃ᵢ‖·‖Δ‖: its exact projections fall by about 1e-15 of that, data whose optimum exists (rows
# 1e-9 on the wrong side, in float64) by about 3e-10.
PAIR_SLACK = 1e-11


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
    rows = _Rows.of(dense, labels, fit_intercept)
    if rows is None:
        return None
    num_columns, num_classes = rows.scaled.shape[1], rows.num_classes
    # One constraint per pair (row i, class k ≠ yᵢ): −x̃ᵢ·Δ_{yᵢ} + x̃ᵢ·Δₖ + sᵢₖ ≤ 0, with Δ
    # flattened as [d̃, K] (class fastest) and s after it.
    row, other = rows.row, rows.other
    pairs = row.size
    size = num_columns * num_classes
    column = np.arange(num_columns)[None, :] * num_classes
    values = rows.scaled[row].reshape(-1)
    constraint = np.repeat(np.arange(pairs), num_columns)
    matrix = scipy.sparse.csr_matrix(
        (
            np.concatenate([-values, values, np.ones(pairs)]),
            (
                np.concatenate([constraint, constraint, np.arange(pairs)]),
                np.concatenate(
                    [
                        (column + rows.labels[row][:, None]).reshape(-1),
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
    return rows.certified(result.x[:size].reshape(num_columns, num_classes))


def separation_along_fit(
    features, labels, num_classes: int, fit_intercept: bool, params
) -> Separation | None:
    """A separation read off an unpenalised fit's coefficients, or None where none is found.

    For fits too large for the linear program (`along_fit_checked` bounds this one). Far along a
    separating Δ the fit has driven the margins Δ raises to large values: the pairs (i, k)
    whose fitted margin z_{i,yᵢ} − z_{ik} exceeds a threshold T are taken as raised, and every
    other pair as one that Δ must leave unchanged. The Δ that do so are the null space of those
    other pairs' constraints, x̃ᵢ·(Δ_{yᵢ} − Δₖ) = 0, found from the float64 Gram of their rows;
    the fitted coefficients, projected onto it, are the candidate, certified on every pair as
    the linear program's Δ is (`SLACK`, `RISE`), with each row's falls also bounded by its own
    size (`PAIR_SLACK`). T is tried at 0, 2.5 and 10, each Gram adding the pairs between it and
    the last: a loose `tol` stops fits at small margins, and raised pairs of rows near the
    boundary (|x̃ᵢ·Δ| small) keep small margins at any tol; a higher T takes fewer confident
    pairs of the rest as raised, which can leave directions in the null space that spoil the
    projection. No Δ is reported that is not certified; a separation can be missed where the fit
    stopped before the margins it raises stood out (iris at tol 1e-4).

    Args:
        features: [N, d] float64 rows of positive weight, dense or SciPy CSR.
        labels: [N] integer labels of those rows in [0, num_classes).
        num_classes: K (classes without rows are left out).
        fit_intercept: whether an intercept is fitted (X̃ = [X, 1]).
        params: the fit's (W [d, K], b [K]).

    Returns:
        The `Separation`, as `quasi_separation` gives it, or None.
    """
    rows = _Rows.of(features, labels, fit_intercept)
    if rows is None:
        return None
    weights, intercepts = (np.asarray(value, np.float64) for value in params)
    coefficients = np.vstack([weights, intercepts[None]]) if fit_intercept else weights
    # In the scaled columns, for the classes that have rows, relative to the first of them.
    coefficients = coefficients[:, rows.present] * rows.rms[:, None]
    coefficients = coefficients - coefficients[:, :1]
    logits = rows.times(coefficients)
    margins = logits[rows.row, rows.labels[rows.row]] - logits[rows.row, rows.other]
    # Thresholds rising, so that each Gram adds the pairs between it and the last.
    gram = 0.0
    lower = -np.inf
    for threshold in _THRESHOLDS:
        gram = gram + rows.gram((lower < margins) & (margins <= threshold))
        lower = threshold
        null = _null_space(gram)
        if null.shape[1] == 0:
            continue
        change = np.zeros_like(coefficients)
        projected = null @ (null.T @ coefficients[:, 1:].reshape(-1))
        change[:, 1:] = projected.reshape(change[:, 1:].shape)
        separation = rows.certified(change, own_scale=True)
        if separation is not None:
            return separation
    return None


# The margins above which `separation_along_fit` takes a pair as one the separation raises.
_THRESHOLDS = (0.0, 2.5, 10.0)


def _null_space(gram: np.ndarray) -> np.ndarray:
    """An orthonormal basis of a float64 Gram's null space (eigenvalues zero to rounding)."""
    import scipy.linalg

    values = scipy.linalg.eigvalsh(gram)  # ascending; 15× faster than eigenvectors at 1,290
    rounding = 100 * np.finfo(np.float64).eps * len(values) * max(values[-1], 1.0)
    nullity = np.count_nonzero(values <= rounding)
    if nullity == 0:
        return np.zeros((len(values), 0))
    return scipy.linalg.eigh(gram, subset_by_index=[0, nullity - 1])[1]


def along_fit_checked(num_rows: int, num_columns: int, num_classes: int) -> bool:
    """Whether `separation_along_fit` runs on a fit of this size.

    Where its Gram, N·(K − 1)·d̃² multiply-adds, is at most `MAX_GRAM_WORK`, and the Gram's
    order d̃(K − 1) at most `MAX_NULL_SIZE`.
    """
    size = num_columns * (num_classes - 1)
    work = num_rows * (num_classes - 1) * num_columns**2
    return size <= MAX_NULL_SIZE and work <= MAX_GRAM_WORK


MAX_GRAM_WORK = 2**27
MAX_NULL_SIZE = 512


class _Rows(NamedTuple):
    """The rows of a separation check: X̃'s columns scaled to unit RMS, and their pairs."""

    scaled: object  # [N, d̃] dense or CSR
    rms: np.ndarray  # [d̃]
    labels: np.ndarray  # [N] in [0, K') over the K' classes that have rows
    present: np.ndarray  # [K'] those classes
    row: np.ndarray  # [N(K' − 1)] the pairs (row, other class), row-major
    other: np.ndarray
    num_features: int
    lengths: np.ndarray  # [N] ‖x̃ᵢ‖ of the scaled rows

    @property
    def num_classes(self) -> int:
        return self.present.size

    @classmethod
    def of(cls, features, labels, fit_intercept: bool) -> _Rows | None:
        """None for no rows or fewer than two classes with rows."""
        import scipy.sparse

        num_rows, num_features = features.shape
        # Only the classes that have rows: a class without any has no finite intercept either,
        # which the fit warns of on its own (and the estimator's folds fit silently).
        present, labels = np.unique(np.asarray(labels), return_inverse=True)
        num_classes = present.size
        if num_rows == 0 or num_classes < 2:
            return None
        sparse = scipy.sparse.issparse(features)
        if fit_intercept:
            ones = np.ones((num_rows, 1))
            features = (
                scipy.sparse.hstack([features, ones], format="csr")
                if sparse
                else np.hstack([features, ones])
            )
        rms = np.sqrt(np.asarray(_squares(features).mean(axis=0)).reshape(-1))
        rms = np.where(rms > 0, rms, 1)
        scaled = features @ scipy.sparse.diags(1 / rms) if sparse else features / rms
        classes = np.arange(num_classes)
        others = np.broadcast_to(classes, (num_rows, num_classes))
        other = others[classes[None, :] != labels[:, None]]
        row = np.repeat(np.arange(num_rows), num_classes - 1)
        lengths = np.sqrt(np.asarray(_squares(scaled).sum(axis=1)).reshape(-1))
        return cls(scaled, rms, labels, present, row, other, num_features, lengths)

    def times(self, change: np.ndarray) -> np.ndarray:
        """X̃ Δ, dense [N, K']."""
        return np.asarray(self.scaled @ change)

    def gram(self, kept: np.ndarray) -> np.ndarray:
        """Σ over the `kept` pairs (i, c) of x̃ᵢx̃ᵢᵀ ⊗ (e_{yᵢ} − e_c)(e_{yᵢ} − e_c)ᵀ.

        Over Δ with the first class's held at 0: [d̃(K' − 1), d̃(K' − 1)]. Its null space is the
        Δ that leave those pairs' margins unchanged.
        """
        num_rows, num_columns = self.scaled.shape
        num_classes = self.num_classes
        taken = np.zeros((num_rows, num_classes))
        taken[self.row, self.other] = kept
        # parts[b, :, c, :] = Σ over rows of label b whose pair with class c is kept of x̃x̃ᵀ,
        # from rows taken in chunks of at most 2²² entries ([n, K', d̃]; CSR rows made dense).
        parts = np.zeros((num_classes, num_columns, num_classes, num_columns))
        chunk = max(1, 2**22 // (num_classes * num_columns))
        active = np.flatnonzero(taken.any(axis=1))
        order = active[np.argsort(self.labels[active], kind="stable")]
        starts = np.searchsorted(self.labels[order], np.arange(num_classes + 1))
        for label in range(num_classes):
            group = order[starts[label] : starts[label + 1]]
            for begin in range(0, group.size, chunk):
                chosen = group[begin : begin + chunk]
                rows = self.scaled[chosen]
                rows = rows.toarray() if hasattr(rows, "toarray") else rows
                weighted = rows[:, None, :] * taken[chosen][:, :, None]
                parts[label] += np.tensordot(rows, weighted, axes=(0, 0))
        # Each pair adds its x̃x̃ᵀ to the blocks (b, b) and (c, c), and subtracts it from (b, c)
        # and (c, b); the gram is indexed [d̃, K', d̃, K'].
        gram = -parts.transpose(1, 0, 3, 2) - parts.transpose(1, 2, 3, 0)
        own, other = parts.sum(axis=2), parts.sum(axis=0).transpose(1, 0, 2)
        for label in range(num_classes):
            gram[:, label, :, label] += own[label] + other[label]
        size = num_columns * (num_classes - 1)
        return gram[:, 1:, :, 1:].reshape(size, size)

    def certified(self, change: np.ndarray, own_scale: bool = False) -> Separation | None:
        """The `Separation` of Δ [d̃, K'] if it certifies one (`_verified`), else None.

        `own_scale` also bounds each row's falls by `PAIR_SLACK`·‖x̃ᵢ‖·‖Δ‖ (Δ centred over the
        classes), for a Δ of unbounded size: one row of a far outlier (a column holding 1e10
        among unit values) rose by 2.8e8 along a projected fit, which let falls of 0.06
        elsewhere pass the test relative to the largest rise.
        """
        logits = self.times(change)
        labels = self.labels[self.row]
        rises = logits[self.row, labels] - logits[self.row, self.other]
        if not _verified(rises):
            return None
        if own_scale:
            size = np.linalg.norm(change - change.mean(axis=1, keepdims=True))
            if np.any(rises < -PAIR_SLACK * size * self.lengths[self.row]):
                return None
        separated = np.zeros(self.labels.size, bool)
        separated[self.row[rises > SLACK * rises.max()]] = True
        # The class shift (one vector added to every class) moves no margin: centred out.
        carried = np.linalg.norm(change - change.mean(axis=1, keepdims=True), axis=1)
        return Separation(
            columns=np.flatnonzero(carried >= 0.1 * carried.max()).tolist(),
            num_features=self.num_features,
            rows=int(np.count_nonzero(separated)),
            num_rows=self.labels.size,
        )


def _squares(matrix):
    """The entries squared, dense or CSR (as given)."""
    return matrix.multiply(matrix) if hasattr(matrix, "multiply") else np.square(matrix)


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
