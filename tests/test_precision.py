"""Every matrix product of a fit runs at full precision, whatever the caller's default.

On GPUs and TPUs JAX's default float32 product rounds its inputs (tensor-float-32, bfloat16
passes); CPUs ignore the setting, so these tests read the precision that the lowered programs
carry rather than the numbers. Each call runs under `jax.default_matmul_precision` set to
"tensorfloat32", so a product that escaped `full_precision` would carry HIGH, and JAX writes
every program it lowers (eager operations included) to a folder that the test then reads.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.experimental import sparse

import xentropy_jax as xj
from xentropy_jax.sklearn import LogisticRegression

RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 4))
LABELS = RNG.integers(0, 3, 60)


def _product_precisions(call, folder) -> list[str]:
    """The precision of every matrix product in the programs that `call` lowers."""
    jax.config.update("jax_dump_ir_to", str(folder))
    try:
        with jax.default_matmul_precision("tensorfloat32"):
            jax.block_until_ready(jax.tree.leaves(call()))
    finally:
        jax.config.update("jax_dump_ir_to", "")
    precisions = []
    for path in folder.rglob("*.mlir"):
        for line in path.read_text().splitlines():
            if "stablehlo.dot_general" in line:
                found = re.search(r"precision = \[([A-Z]+), ([A-Z]+)\]", line)
                precisions.append(found.group(0) if found else "default")
    return precisions


def _collinear_estimator():
    duplicated = np.hstack([X, X[:, :1]])
    with pytest.warns(xj.CollinearityWarning):
        model = LogisticRegression(C=np.inf).fit(duplicated, LABELS)
    return model.coef_


def _inference(method, **subsets):
    fit = xj.fit_logistic_regression(X, LABELS, 3)
    result = xj.logit_inference(fit, X, LABELS, marginal_effects=True, method=method, **subsets)
    return result.bse, result.margins.bse


CALLS = {
    "fit": lambda: xj.fit_logistic_regression(X, LABELS, 3, l2=0.1).params,
    "sparse fit": lambda: (
        xj.fit_logistic_regression(sparse.BCOO.fromdense(X), LABELS, 3, l2=0.1).params
    ),
    "gradient of a fit": lambda: jax.grad(
        lambda X: xj.fit_logistic_regression(X, LABELS, 3, l2=0.1).loss
    )(X),
    "path": lambda: xj.fit_regularization_path(X, LABELS, 3, [0.1, 0.01]).params,
    "streamed fit": lambda: (
        xj.fit_logistic_regression_streamed(X, LABELS, 3, l2=0.1, chunk_rows=16).params
    ),
    "collinear columns, estimator": _collinear_estimator,
    "inference": lambda: _inference("dense"),
    "inference by CG": lambda: _inference("cg", subset="all", margins_subset="all"),
}


@pytest.mark.parametrize("name", CALLS)
def test_every_product_is_at_full_precision(name, tmp_path):
    precisions = _product_precisions(CALLS[name], tmp_path)
    assert precisions, "no program was lowered: the check would pass vacuously"
    assert set(precisions) == {"precision = [HIGHEST, HIGHEST]"}, sorted(set(precisions))
