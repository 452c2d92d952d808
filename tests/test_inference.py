"""Inference of unpenalised logit fits against statsmodels' MNLogit / Logit and direct formulas."""

import dataclasses
import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jaxprs import nested_jaxprs
from sklearn.datasets import make_classification
from sklearn.exceptions import ConvergenceWarning

import xentropy_jax as xj
from xentropy_jax import _inference_core as core

sm = pytest.importorskip("statsmodels.api")

RTOL = 1e-6


def _close(ours, theirs, rtol=RTOL, atol=0.0):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=rtol, atol=atol)


def _simulate(seed, n, d, k):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    coef = rng.normal(size=(d, k))
    logits = X @ coef
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    y = (probs.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return X, y


def _fit(X, y, k, **kwargs):
    return xj.fit_logistic_regression(
        X, y, k, reference_class=True, solver="newton", tol=1e-12, **kwargs
    )


def _statsmodels(X, y, **kwargs):
    exog = np.column_stack([X, np.ones(len(y))])  # intercept last, as our params
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sm.MNLogit(y, exog).fit(method="newton", disp=0, tol=1e-12, maxiter=100, **kwargs)


def _cov_permutation(num_terms, kf):
    """Our index (term m, class k) -> statsmodels' class-major index k·d̃ + m."""
    return np.array([m * kf + k for k in range(kf) for m in range(num_terms)])


X4, Y4 = _simulate(0, 300, 3, 4)
FIT4 = _fit(X4, Y4, 4)
SM4 = _statsmodels(X4, Y4)


def test_model_based_matches_mnlogit():
    assert SM4.mle_retvals["converged"]
    result = xj.logit_inference(FIT4, X4, Y4, marginal_effects=True)
    _close(result.params, SM4.params)
    _close(result.bse, SM4.bse)
    _close(result.zvalues, SM4.tvalues)
    _close(result.pvalues, SM4.pvalues)
    lower, upper = np.split(np.asarray(SM4.conf_int()).reshape(-1, 2), 2, axis=1)
    ours_lower = result.conf_int_lower.T.reshape(-1, 1)
    _close(ours_lower, lower)
    _close(result.conf_int_upper.T.reshape(-1, 1), upper)
    for name in ("llf", "llnull", "aic", "bic", "prsquared"):
        _close(getattr(result, name), getattr(SM4, name))
    perm = _cov_permutation(4, 3)
    _close(result.cov_params[np.ix_(perm, perm)], SM4.cov_params(), atol=1e-12)
    margins = SM4.get_margeff()
    _close(result.margins.effects, margins.margeff)
    _close(result.margins.bse, margins.margeff_se)
    _close(result.margins.pvalues, margins.pvalues)
    np.testing.assert_allclose(result.margins.effects.sum(axis=1), 0, atol=1e-12)


@pytest.mark.parametrize("cov_type", ["HC0", "cluster"])
def test_robust_matches_mnlogit(cov_type):
    groups = np.arange(len(Y4)) % 23
    kwds = {"groups": groups} if cov_type == "cluster" else None
    theirs = _statsmodels(X4, Y4, cov_type=cov_type, cov_kwds=kwds)
    ours = xj.logit_inference(FIT4, X4, Y4, cov_type=cov_type, groups=groups)
    assert not np.allclose(ours.bse, SM4.bse, rtol=1e-3)  # a different estimator indeed
    _close(ours.bse, theirs.bse)
    _close(ours.pvalues, theirs.pvalues)
    perm = _cov_permutation(4, 3)
    _close(ours.cov_params[np.ix_(perm, perm)], theirs.cov_params(), atol=1e-12)
    # The CG path computes the same quadratic forms without any P x P matrix.
    by_cg = xj.logit_inference(
        FIT4,
        X4,
        Y4,
        cov_type=cov_type,
        groups=groups,
        method="cg",
        subset="all",
        marginal_effects=True,
    )
    assert by_cg.cov_params is None
    _close(by_cg.bse, ours.bse, rtol=1e-8)
    # Robust marginal effects' errors: J H⁻¹MH⁻¹Jᵀ from one solve per effect.
    dense = xj.logit_inference(
        FIT4, X4, Y4, cov_type=cov_type, groups=groups, marginal_effects=True
    )
    assert not np.allclose(dense.margins.bse, SM4.get_margeff().margeff_se, rtol=1e-3)
    _close(by_cg.margins.bse, dense.margins.bse, rtol=1e-8)


def test_cg_subset_matches_dense():
    dense = xj.logit_inference(FIT4, X4, Y4)
    indices = np.array([0, 5, 11])
    by_cg = xj.logit_inference(FIT4, X4, Y4, method="cg", subset=indices)
    computed = np.zeros(12, bool)
    computed[indices] = True
    _close(by_cg.bse.ravel()[computed], dense.bse.ravel()[computed], rtol=1e-8)
    assert np.all(np.isnan(by_cg.bse.ravel()[~computed]))
    assert np.all(by_cg.cg_relative_residual.ravel()[computed] <= 1e-10)
    assert "(not computed)" in by_cg.summary()
    _close(by_cg.llf, dense.llf, rtol=1e-12)


def test_cg_marginal_effects_match_dense_and_statsmodels():
    dense = xj.logit_inference(FIT4, X4, Y4, marginal_effects=True)
    by_cg = xj.logit_inference(FIT4, X4, Y4, marginal_effects=True, method="cg", subset="all")
    margins = by_cg.margins
    assert margins.cov is None and dense.margins.cov is not None
    _close(margins.effects, dense.margins.effects, rtol=1e-12)
    _close(margins.bse, dense.margins.bse, rtol=1e-8)
    _close(margins.pvalues, dense.margins.pvalues, rtol=1e-6)
    theirs = SM4.get_margeff()
    _close(margins.effects, theirs.margeff)
    _close(margins.bse, theirs.margeff_se)
    assert margins.cg_steps.shape == (3, 4) and np.all(margins.cg_steps > 0)
    assert np.all(margins.cg_relative_residual <= 1e-10)
    assert dense.margins.cg_steps is None


def test_cg_marginal_effects_subsets():
    dense = xj.logit_inference(FIT4, X4, Y4, marginal_effects=True).margins
    # Flat indices into effects.ravel() [d = 3, K = 4]: (0, 1), (1, 3), (2, 0).
    indices = np.array([1, 7, 8])
    picked = xj.logit_inference(
        FIT4, X4, Y4, marginal_effects=True, method="cg", subset=[0], margins_subset=indices
    ).margins
    computed = np.zeros(12, bool)
    computed[indices] = True
    _close(picked.bse.ravel()[computed], dense.bse.ravel()[computed], rtol=1e-8)
    assert np.all(np.isnan(picked.bse.ravel()[~computed]))
    assert np.all(picked.cg_steps.ravel()[~computed] == -1)
    _close(picked.effects, dense.effects, rtol=1e-12)  # the effects are always all computed
    assert "(not computed)" in picked.summary()
    mask = np.zeros((3, 4), bool)
    mask[2] = True
    by_mask = xj.logit_inference(
        FIT4, X4, Y4, marginal_effects=True, method="cg", subset=[0], margins_subset=mask
    ).margins
    _close(by_mask.bse[2], dense.bse[2], rtol=1e-8)
    assert np.all(np.isnan(by_mask.bse[:2]))
    # Default: every class of the features whose coefficients are asked for (row 1 here:
    # params.ravel() index 4 is feature 1, class 2); an intercept coefficient adds none.
    default = xj.logit_inference(
        FIT4, X4, Y4, marginal_effects=True, method="cg", subset=[4, 10]
    ).margins
    _close(default.bse[1], dense.bse[1], rtol=1e-8)
    assert np.all(np.isnan(default.bse[[0, 2]]))
    none = xj.logit_inference(FIT4, X4, Y4, marginal_effects=True, method="cg", subset=[9]).margins
    assert np.all(np.isnan(none.bse)) and np.all(np.isfinite(none.effects))


def test_bad_margins_subset():
    cases = [
        ("some", "margins_subset must be 'all'"),
        (np.ones((3, 3), bool), r"boolean margins_subset must have the shape .* \(3, 4\)"),
        (np.array([0, 12]), r"margins_subset indices must lie in \[-12, 12\)"),
        (np.array([0.5]), "flat indices into the marginal effects"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            xj.logit_inference(
                FIT4, X4, Y4, marginal_effects=True, method="cg", subset="all", margins_subset=bad
            )
    with pytest.raises(ValueError, match="marginal_effects is False"):
        xj.logit_inference(FIT4, X4, Y4, method="cg", subset="all", margins_subset="all")


def test_sparse_features_get_a_clear_error():
    # The fit accepts them; the inference used to fail deep in its checks ("ufunc 'isfinite'
    # not supported").
    import scipy.sparse
    from jax.experimental import sparse

    for matrix in (scipy.sparse.csr_matrix(X4), sparse.BCOO.fromdense(jnp.asarray(X4))):
        with pytest.raises(TypeError, match="logit_inference needs dense X"):
            xj.logit_inference(FIT4, matrix, Y4)


def _output_sizes(jaxpr) -> list[int]:
    """Element counts of every value a jaxpr computes, nested jaxprs (scan bodies) included."""
    return [
        int(np.prod(v.aval.shape))
        for inner in nested_jaxprs(jaxpr)
        for eqn in inner.eqns
        for v in eqn.outvars
    ]


def test_margin_sums_array_sizes():
    """No intermediate of margin_sums (scan body included) is near N x K x P."""
    n, d, k, chunk = 1000, 6, 5, 64
    X, y = _simulate(5, n, d, k)
    theta = jnp.asarray(np.random.default_rng(6).normal(size=(d + 1) * (k - 1)) * 0.1)
    args = (jnp.asarray(X), jnp.asarray(y, jnp.int32), jnp.ones(n), theta)
    num_params = (d + 1) * (k - 1)
    for selected in (None, jnp.asarray([4, 1], jnp.int32)):
        r = d if selected is None else 2
        jaxpr = jax.make_jaxpr(
            lambda *a, s=selected: core.margin_sums(
                *a, s, num_classes=k, fit_intercept=True, chunk=chunk
            )
        )(*args)
        sizes = _output_sizes(jaxpr.jaxpr)
        padded = -(-n // chunk) * chunk  # the rows, split into whole chunks
        bound = max(chunk * core.margin_width(d, k, True, r), r * k * k * (d + 1), padded * (d + 1))
        assert bound < n * k * num_params / 4
        assert max(sizes) <= bound, (max(sizes), bound)
        effects, jac = core.margin_sums(
            *args, selected, num_classes=k, fit_intercept=True, chunk=chunk
        )
        assert jac.shape == (r * k, num_params)


def test_binary_matches_logit():
    X, y = _simulate(1, 250, 3, 2)
    fit = _fit(X, y, 2)
    ours = xj.logit_inference(fit, X, y, marginal_effects=True)
    exog = np.column_stack([X, np.ones(len(y))])
    theirs = sm.Logit(y, exog).fit(method="newton", disp=0, tol=1e-12)
    _close(ours.params[:, 0], theirs.params)
    _close(ours.bse[:, 0], theirs.bse)
    _close(ours.pvalues[:, 0], theirs.pvalues)
    for name in ("llf", "llnull", "aic", "bic", "prsquared"):
        _close(getattr(ours, name), getattr(theirs, name))
    margins = theirs.get_margeff()
    _close(ours.margins.effects[:, 1], margins.margeff)
    _close(ours.margins.bse[:, 1], margins.margeff_se)
    _close(ours.margins.effects[:, 0], -margins.margeff)
    pytest.importorskip("sklearn")
    from xentropy_jax.sklearn import LogisticRegression

    clf = LogisticRegression(penalty=None, tol=1e-12).fit(X, y)
    by_estimator = clf.inference(X, y)
    _close(by_estimator.params[:, 0], np.append(clf.coef_[0], clf.intercept_[0]), rtol=1e-12)
    _close(by_estimator.bse[:, 0], theirs.bse, rtol=1e-6)


def test_anes96_real_dataset_matches_mnlogit():
    data = sm.datasets.anes96.load_pandas()
    X = data.exog.to_numpy(float)
    y = data.endog.to_numpy().astype(int)
    theirs = _statsmodels(X, y)
    assert theirs.mle_retvals["converged"]
    fit = xj.fit_logistic_regression(X, y, 7, reference_class=True, solver="newton", tol=1e-10)
    ours = xj.logit_inference(fit, X, y, marginal_effects=True, term_names=list(data.exog.columns))
    _close(ours.params, theirs.params)
    _close(ours.bse, theirs.bse)
    _close(ours.pvalues, theirs.pvalues)
    _close(ours.llf, theirs.llf)
    _close(ours.bic, theirs.bic)
    margins = theirs.get_margeff()
    _close(ours.margins.effects, margins.margeff)
    _close(ours.margins.bse, margins.margeff_se)
    assert "selfLR" in ours.summary()


def test_estimator_on_iris_matches_functional_and_statsmodels():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris

    from xentropy_jax.sklearn import LogisticRegression

    X, y = load_iris(return_X_y=True)
    X = X[:, :1]  # sepal length; more features separate setosa from the rest
    clf = LogisticRegression(penalty=None, tol=1e-12).fit(X, y)
    ours = clf.inference(X, y, marginal_effects=True)
    theirs = _statsmodels(X, y)
    _close(ours.params, theirs.params, rtol=1e-6)
    _close(ours.bse, theirs.bse, rtol=1e-6)
    _close(ours.margins.bse, theirs.get_margeff().margeff_se, rtol=1e-6)
    by_cg = clf.inference(
        X, y, marginal_effects=True, method="cg", subset="all", margins_subset=[2]
    ).margins
    _close(by_cg.bse[0, 2], ours.margins.bse[0, 2], rtol=1e-8)
    assert np.all(np.isnan(by_cg.bse[0, :2]))
    # The documented map to coef_: params[j, k-1] = coef_[k, j] - coef_[0, j].
    _close(ours.params[:1], (clf.coef_[1:] - clf.coef_[:1]).T, rtol=1e-12)
    with pytest.warns(xj.InferenceWarning, match="separation"):
        separated = load_iris().data[:, :2]
        LogisticRegression(penalty=None).fit(separated, y).inference(separated, y)
    assert clf.summary(X, y).count("std err") == 2
    with pytest.raises(xj.InferenceError, match="penalised"):
        LogisticRegression(C=1.0).fit(X, y).inference(X, y)


def test_estimator_inference_weighs_classes_as_the_fit_did():
    # class_weight multiplies each row's sample weight: the inference of a class-weighted fit
    # equals that of the same fit written with those row weights.
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris

    from xentropy_jax.sklearn import LogisticRegression

    X, y = load_iris(return_X_y=True)
    X = X[:, :1]
    per_class = {0: 2.0, 1: 1.0, 2: 0.5}
    rows = np.array([per_class[label] for label in y]) * np.linspace(0.5, 1.5, y.size)
    by_class = LogisticRegression(penalty=None, tol=1e-12, class_weight=per_class)
    by_class.fit(X, y, sample_weight=np.linspace(0.5, 1.5, y.size))
    by_rows = LogisticRegression(penalty=None, tol=1e-12).fit(X, y, sample_weight=rows)
    ours = by_class.inference(X, y, sample_weight=np.linspace(0.5, 1.5, y.size))
    expected = by_rows.inference(X, y, sample_weight=rows)
    _close(ours.params, expected.params, rtol=1e-8)
    _close(ours.bse, expected.bse, rtol=1e-8)
    # Parameters set after the fit do not change the model whose errors are computed: they
    # were read at inference (a fit at C = 100 set to C = inf was taken as unpenalised).
    by_class.set_params(class_weight={0: 1.0, 1: np.nan, 2: 1.0}, C=1.0, penalty="l2")
    again = by_class.inference(X, y, sample_weight=np.linspace(0.5, 1.5, y.size))
    _close(again.bse, ours.bse, rtol=0)
    penalised = LogisticRegression(C=100.0, tol=1e-12).fit(X, y)
    penalised.set_params(C=np.inf)
    with pytest.raises(xj.InferenceError, match="penalised"):
        penalised.inference(X, y)


def test_symmetric_fit():
    symmetric = xj.fit_logistic_regression(X4, Y4, 4, solver="newton", tol=1e-12)
    reference = xj.logit_inference(FIT4, X4, Y4)
    _close(xj.logit_inference(symmetric, X4, Y4).bse, reference.bse, rtol=1e-8)


@pytest.mark.parametrize("cov_type", ["nonrobust", "HC0", "cluster"])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_frequency_weights_equal_repeated_rows(cov_type, method):
    # A row of weight w counts as w observations, for every covariance: the sandwich's meat
    # weighs each row's score by w (not w², which made HC0 errors 1.5× too large here), and
    # rows of weight 0, and groups made only of them, change nothing.
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 4, size=len(Y4))
    counts[:4] = 1  # every class keeps some weight
    groups = rng.integers(0, 25, size=len(Y4))
    groups[counts == 0] = 99  # a cluster without weight
    weighted_fit = _fit(X4, Y4, 4, sample_weight=counts.astype(float))
    options = dict(cov_type=cov_type, method=method, marginal_effects=True)
    if method == "cg":
        options["subset"] = "all"
    weighted = xj.logit_inference(
        weighted_fit, X4, Y4, sample_weight=counts, groups=groups, **options
    )
    repeated = np.repeat(np.arange(len(Y4)), counts)
    expanded = xj.logit_inference(
        weighted_fit, X4[repeated], Y4[repeated], groups=groups[repeated], **options
    )
    _close(weighted.bse, expanded.bse, rtol=1e-9)
    _close(weighted.margins.bse, expanded.margins.bse, rtol=1e-9)
    _close(weighted.llf, expanded.llf, rtol=1e-12)
    assert weighted.nobs == counts.sum()
    if cov_type == "HC0" and method == "dense":  # and statsmodels on the repeated rows
        theirs = _statsmodels(X4[repeated], Y4[repeated], cov_type="HC0")
        _close(weighted.bse.T.ravel(), np.asarray(theirs.bse).T.ravel(), rtol=1e-6)


@pytest.mark.parametrize("d, k", [(3, 4), (5, 3)])
def test_margin_jacobian_against_autodiff(d, k):
    """Both ways of summing R: directly (r < K features) and from the third moment T."""
    X, y = _simulate(3, 60, d, k)
    fit = _fit(X, y, k)
    weights = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2, size=60))
    W, b = fit.params
    theta = jnp.concatenate([(W - W[:, :1])[:, 1:].ravel(), (b - b[0])[1:]])
    num_params = (d + 1) * (k - 1)

    def naive(theta):  # AME from the formula dP_k/dx_j = s_k (B_jk - Σ_l B_jl s_l), per row
        coef = jnp.pad(theta[: d * (k - 1)].reshape(d, k - 1), ((0, 0), (1, 0)))
        intercept = jnp.pad(theta[d * (k - 1) :], (1, 0))
        probs = jax.nn.softmax(X @ coef + intercept[None, :])
        rows = probs[:, None, :] * (coef[None] - (probs @ coef.T)[:, :, None])
        return jnp.einsum("n,njk->jk", weights, rows) / weights.sum()

    # The reference jitted: one compilation, instead of one per primitive of eager jacfwd.
    expected = jax.jit(jax.jacfwd(naive))(theta).reshape(d * k, num_params)
    args = (jnp.asarray(X), jnp.asarray(y), weights, theta)
    chunk = 7  # full chunks through the scan, then a ragged last chunk
    effects, jac = core.margin_sums(*args, num_classes=k, fit_intercept=True, chunk=chunk)
    _close(effects, jax.jit(naive)(theta), rtol=1e-12, atol=1e-15)
    _close(jac, expected, rtol=1e-10, atol=1e-14)
    # The rows of selected features only, in the order asked, by either way of summing R.
    for picked in ([2, 0], [2, 0, 1, 2]):
        _, rows = core.margin_sums(
            *args, jnp.asarray(picked, jnp.int32), num_classes=k, fit_intercept=True, chunk=chunk
        )
        _close(
            rows,
            expected.reshape(d, k, -1)[np.array(picked)].reshape(-1, num_params),
            rtol=1e-10,
            atol=1e-14,
        )


def test_chunked_sums_and_compile_once():
    theta = jnp.asarray(xj.logit_inference(FIT4, X4, Y4).params.ravel())
    args = (
        jnp.asarray(X4),
        jnp.asarray(Y4, jnp.int32),
        jnp.ones(300),
        jnp.zeros(300, jnp.int32),
        theta,
    )
    small = core.dense_sums(
        *args, num_classes=4, fit_intercept=True, cov_type="HC0", num_groups=1, chunk=64
    )
    whole = core.dense_sums(
        *args, num_classes=4, fit_intercept=True, cov_type="HC0", num_groups=1, chunk=512
    )
    for key in whole:
        _close(small[key], whole[key], rtol=1e-11, atol=1e-11)
    before = core.dense_sums._cache_size()
    xj.logit_inference(FIT4, X4 + 0.0, Y4)
    xj.logit_inference(FIT4, X4 + 0.0, Y4)
    assert core.dense_sums._cache_size() <= before + 1


def test_float32():
    with jax.enable_x64(False):
        fit = xj.fit_logistic_regression(
            X4.astype(np.float32), Y4, 4, reference_class=True, solver="newton", tol=1e-6
        )
        ours = xj.logit_inference(fit, X4.astype(np.float32), Y4, marginal_effects=True)
        by_cg = xj.logit_inference(
            fit, X4.astype(np.float32), Y4, method="cg", subset="all", cov_type="HC0"
        )
        cg_margins = xj.logit_inference(
            fit, X4.astype(np.float32), Y4, method="cg", subset="all", marginal_effects=True
        ).margins
    assert fit.params[0].dtype == jnp.float32
    _close(ours.bse, SM4.bse, rtol=1e-3)
    _close(ours.margins.bse, SM4.get_margeff().margeff_se, rtol=1e-3)
    _close(cg_margins.effects, SM4.get_margeff().margeff, rtol=1e-3, atol=1e-6)
    _close(cg_margins.bse, SM4.get_margeff().margeff_se, rtol=1e-3)
    assert np.all(cg_margins.cg_relative_residual <= 1e-5)
    _close(by_cg.bse, _statsmodels(X4, Y4, cov_type="HC0").bse, rtol=1e-3)


def test_weights_that_overflow_the_sums_get_a_clear_error_or_a_warning():
    # Weights of 1e20 overflowed the float32 cluster meat: a ValueError from inside SciPy's
    # triangular solve; weights of 1e38 read as separation ("Hessian singular"). The CG path
    # never forms the meat and stays in range; where only the log-likelihood's sum overflows,
    # the standard errors stand and a warning says llf is not finite.
    X, groups = X4.astype(np.float32), np.arange(len(Y4)) % 20
    n = len(Y4)

    def inference(fit, X, weight, dtype=np.float32, **options):
        weights = np.full(n, weight, dtype)
        return xj.logit_inference(fit, X, Y4, sample_weight=weights, check_optimum=False, **options)

    cluster = dict(cov_type="cluster", groups=groups)
    with jax.enable_x64(False):
        fit = xj.fit_logistic_regression(X, Y4, 4, reference_class=True, tol=1e-6)
        unit = xj.logit_inference(fit, X, Y4, **cluster)
        # Cluster standard errors do not depend on the weights' scale, up to (nobs−1)/(nobs−P).
        _close(inference(fit, X, 1e10, **cluster).bse, unit.bse, rtol=2e-2)
        _close(inference(fit, X, 1e20, method="cg", subset="all", **cluster).bse, unit.bse, 2e-2)
        with pytest.raises(xj.InferenceError, match="overflow float32.*method='cg'.*float64"):
            inference(fit, X, 1e20, **cluster)
        for options in ({}, dict(method="cg", subset=[0, 1])):
            with pytest.raises(xj.InferenceError, match="overflow float32"):
                inference(fit, X, 1e38, **options)
        plain = xj.logit_inference(fit, X, Y4)
        with pytest.warns(xj.InferenceWarning, match="log-likelihood overflows float32"):
            only_llf = inference(fit, X, 2e36)  # −ℓ ≈ 2e36 · 239 > 3.4e38
        assert only_llf.llf == -np.inf
        _close(only_llf.bse * np.sqrt(2e36), plain.bse, rtol=1e-5)
    fit = _fit(X4, Y4, 4)
    with pytest.raises(xj.InferenceError, match="overflow float64.*method='cg'") as raised:
        inference(fit, X4, 1e160, np.float64, **cluster)
    assert "float64 data" not in str(raised.value)


def test_float32_offset_columns_of_full_rank_keep_their_standard_errors():
    # Columns scaled 0.1 to 10 and offset -5 to 50 (singular-value ratio 2.7e-3 after
    # scaling): float32 refused them as "collinear to float32 precision … rank 29 < 31" on
    # both paths (a pivot line of 10·eps·P, a Gram line of 100·eps·n·λmax), where the
    # float32 Hessian's inverse is 1e-3 from float64's.
    N, d, K = 2000, 30, 10
    X, y = make_classification(N, d, n_informative=8, n_redundant=0, n_classes=K, random_state=0)
    X = X * np.linspace(0.1, 10, d) + np.linspace(-5, 50, d)
    fit = xj.fit_logistic_regression(X, y, K, tol=1e-10)
    reference = xj.logit_inference(fit, X, y).bse
    with jax.enable_x64(False):
        fit = xj.fit_logistic_regression(X.astype(np.float32), y, K)
        for method, rtol in (("dense", 1e-2), ("cg", 1e-3)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", xj.InferenceWarning)
                result = xj.logit_inference(
                    fit, X.astype(np.float32), y, method=method, subset="all"
                )
            np.testing.assert_allclose(result.bse, reference, rtol=rtol)


def test_well_conditioned_float32_designs_are_not_called_ill_conditioned():
    # The warning's line was 1e4·eps·P, which every float32 correlation matrix of P ≥ 840
    # falls below: independent standard-normal columns at P = 287 (pivot² 0.29 below 0.34)
    # were told their standard errors "carry few correct digits"; they are within 1e-5.
    n, d, K = 3000, 40, 8
    rng = np.random.default_rng(13)
    X = rng.normal(size=(n, d))
    y = (X @ rng.normal(size=(d, K)) * 0.2 + rng.gumbel(size=(n, K))).argmax(1)
    reference = xj.logit_inference(_fit(X, y, K), X, y).bse
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error", xj.InferenceWarning)
        fit = xj.fit_logistic_regression(X.astype(np.float32), y, K, reference_class=True)
        bse = xj.logit_inference(fit, X.astype(np.float32), y).bse
    _close(bse, reference, rtol=1e-4)


def test_columns_collinear_only_to_float32_precision_are_told_apart():
    # Correlation 1 − 5e-7: float64 gives standard errors; float32 refuses, and said the
    # columns "are collinear … drop or combine them". At 1 − 4e-6 float32 resolves them: the
    # standard errors come with the ill-conditioning warning, within 2% of float64's.
    rng = np.random.default_rng(21)
    x = rng.normal(size=2000)
    noise, others = rng.normal(size=2000), rng.normal(size=2000)
    y = rng.integers(0, 3, 2000)
    for scale in (3e-3, 1e-3):
        X = np.column_stack([x, x + scale * noise, others])
        fit = xj.fit_logistic_regression(X, y, 3, reference_class=True, tol=1e-10, throw=False)
        reference = xj.logit_inference(fit, X, y).bse
        assert np.all(np.isfinite(reference))
        with jax.enable_x64(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = xj.fit_logistic_regression(
                X.astype(np.float32), y, 3, reference_class=True, throw=False
            )
        for method in ("dense", "cg"):
            with jax.enable_x64(False):
                run = functools.partial(
                    xj.logit_inference, fit, X.astype(np.float32), y, method=method, subset="all"
                )
                if scale == 1e-3:
                    with pytest.raises(
                        xj.InferenceError, match=r"x0.*x1.*collinear to float32 precision"
                    ):
                        run()
                    continue
                with pytest.warns(xj.InferenceWarning, match="ill-conditioned"):
                    bse = run().bse
            np.testing.assert_allclose(bse, reference, rtol=0.02)
    # An exactly collinear column beside the pair: each named for what it is (the exact one
    # hid the pair's float32-only collinearity): the pair at 1 − 5e-7.
    mixed = np.column_stack([X, np.zeros(2000)])
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = xj.fit_logistic_regression(
            mixed.astype(np.float32), y, 3, reference_class=True, throw=False
        )
        with pytest.raises(xj.InferenceError, match=r"\['x3'\] are collinear.*\['x0', 'x1'\] col"):
            xj.logit_inference(fit, mixed.astype(np.float32), y)
    exact = np.column_stack([x, 2 * x])
    fit = xj.fit_logistic_regression(exact, y, 3, reference_class=True, l2=1e-3)
    with pytest.raises(xj.InferenceError, match=r"are collinear \(") as raised:
        xj.logit_inference(fit, exact, y, check_optimum=False)
    assert "float32" not in str(raised.value)


def test_refusals_and_warnings():
    with pytest.raises(xj.InferenceError, match="penalised"):
        xj.logit_inference(FIT4, X4, Y4, l2=0.1)
    penalised = xj.fit_logistic_regression(X4, Y4, 4, l2=0.05, solver="newton")
    with pytest.raises(xj.InferenceError, match="not at the maximum"):
        xj.logit_inference(penalised, X4, Y4)  # l2 not declared: the gradient check refuses
    early = _fit(X4, Y4, 4, max_iter=1, throw=False)
    with pytest.warns(xj.InferenceWarning, match="did not converge"):
        with pytest.raises(xj.InferenceError, match="not at the maximum"):
            xj.logit_inference(early, X4, Y4)
    # Separable data: the solver reports DIVERGED, and the inference refuses.
    X = np.array([[-2.0], [-1.0], [0.0], [1.0], [2.0], [0.5]])
    separable = np.array([0, 0, 1, 2, 2, 1])
    diverged = xj.fit_logistic_regression(X, separable, 3, throw=False)
    with pytest.raises(xj.InferenceError, match="separable"):
        xj.logit_inference(diverged, X, separable)
    # The estimator's inference gave the coefficients alone, and the refusal read "not at the
    # maximum ... Refit with l2=0 to convergence" after an unpenalised fit.
    from xentropy_jax.sklearn import LogisticRegression

    with pytest.warns(ConvergenceWarning, match="separable"):
        estimator = LogisticRegression(C=np.inf).fit(X, separable)
    with pytest.raises(xj.InferenceError, match="the data are separable"):
        estimator.inference(X, separable)
    # A duplicated column: the Hessian is singular and the message names the columns.
    collinear = np.column_stack([X4, X4[:, 1] * 2.0])
    coef = np.vstack([np.asarray(FIT4.params[0]), np.zeros((1, 4))])
    with pytest.raises(xj.InferenceError, match=r"x1.*x3.*collinear"):
        xj.logit_inference((coef, FIT4.params[1]), collinear, Y4)
    with pytest.raises(xj.InferenceError, match="subset"):
        xj.logit_inference(FIT4, X4, Y4, method="cg")
    with pytest.raises(ValueError, match="cov_type"):
        xj.logit_inference(FIT4, X4, Y4, cov_type="HC3")
    with pytest.raises(ValueError, match="groups"):
        xj.logit_inference(FIT4, X4, Y4, cov_type="cluster")
    with pytest.raises(ValueError, match="alpha"):
        xj.logit_inference(FIT4, X4, Y4, alpha=1.5)
    with pytest.raises(ValueError, match="X must be"):
        xj.logit_inference(FIT4, X4[:, :2], Y4)
    with pytest.raises(ValueError, match="X has no rows"):
        xj.logit_inference(FIT4, X4[:0], Y4[:0])
    # An intercept-only model (d = 0) crashed inside JAX; the fit refuses it, and so does this.
    with pytest.raises(ValueError, match="X has no feature columns"):
        xj.logit_inference((np.zeros((0, 2)), np.array([0.0, 0.4])), np.zeros((5, 0)), Y4[:5] % 2)
    # Collinear columns on the CG path too (it used to give finite errors and a warning).
    with pytest.raises(xj.InferenceError, match=r"x1.*x3.*collinear"):
        xj.logit_inference((coef, FIT4.params[1]), collinear, Y4, method="cg", subset=[0])
    batch = jax.tree.map(lambda a: jnp.stack([a, a]), FIT4)
    with pytest.raises(ValueError, match="not a batch of fits: index one"):
        xj.logit_inference(batch, X4, Y4)


@pytest.mark.parametrize("seed", [1, 6])
def test_exactly_collinear_columns_with_offsets_are_refused_on_the_dense_path(seed):
    # x2 = 0.8·x0 + 0.04·x1 − 0.25 with columns far from 0 and of different scales: rounding
    # lifted the Cholesky pivot of the singular Hessian above the singular line, and the dense
    # path gave standard errors up to 3e5 with an "ill-conditioned ... separation" warning.
    rng = np.random.default_rng(seed)
    x0, x1 = rng.normal(-20, 10, 300), rng.normal(-50, 60, 300)
    X = np.column_stack([x0, x1, 0.8 * x0 + 0.04 * x1 - 0.25])
    logits = np.column_stack([np.zeros(300), 0.05 * x0, 0.01 * x1])
    y = (logits + rng.gumbel(size=(300, 3))).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xj.CollinearityWarning)
        fit = xj.fit_logistic_regression(X, y, 3)
    for method in ("dense", "cg"):
        with pytest.raises(xj.InferenceError, match=r"\['x0', 'x1', 'x2', 'intercept'\] are col"):
            xj.logit_inference(fit, X, y, method=method, subset="all")


def test_a_float32_year_column_beside_the_intercept_keeps_its_standard_errors():
    # Ill-conditioned but of full rank: answered with a warning, within 4% of float64 (the
    # collinearity check on the ill-conditioned branch had refused it as "collinear to float32
    # precision").
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 400)
    y = (rng.uniform(size=400) < 1 / (1 + np.exp(-(x - 5) / 2))).astype(np.int32)
    X = np.stack([x, 2000 + rng.integers(0, 20, 400) + 0.0], axis=1)
    fit = xj.fit_logistic_regression(X, y, 2, reference_class=True, tol=1e-12)
    reference = xj.logit_inference(fit, X, y).bse
    with jax.enable_x64(False):
        X32 = X.astype(np.float32)
        fit32 = xj.fit_logistic_regression(X32, y, 2, reference_class=True)
        with pytest.warns(xj.InferenceWarning, match="ill-conditioned"):
            bse = xj.logit_inference(fit32, X32, y).bse
    _close(bse, reference, rtol=0.1)


def test_estimator_inference_after_a_fit_short_of_convergence_warns():
    # The estimator passes its coefficients alone, which read as converged: no warning, and
    # "Converged: True" in the summary of a fit stopped after 4 iterations.
    from xentropy_jax.sklearn import LogisticRegression

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 3))
    y = (X @ rng.normal(size=(3, 3)) + rng.gumbel(size=(2000, 3))).argmax(1)
    with pytest.warns(ConvergenceWarning):
        estimator = LogisticRegression(penalty=None, max_iter=4).fit(X, y)
    with pytest.warns(xj.InferenceWarning, match="did not converge"):
        result = estimator.inference(X, y)
    assert result.converged is False and "Converged: False" in result.summary()
    converged = LogisticRegression(penalty=None).fit(X, y).inference(X, y)
    assert converged.converged is True
    # The same through LogisticRegressionCV's refit.
    from xentropy_jax.sklearn import LogisticRegressionCV

    with pytest.warns(ConvergenceWarning):
        searched = LogisticRegressionCV(Cs=[np.inf], cv=3, max_iter=4).fit(X, y)
    with pytest.warns(xj.InferenceWarning, match="did not converge"):
        assert searched.inference(X, y).converged is False


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_quasi_separation_in_a_multiclass_fit_warns(dtype):
    # Rows with D = 1 are never in class 1: the coefficient of D for class 1 has no finite
    # maximum, but the fit converges (to −17 at tol 1e-8, −26 at 1e-12) and its standard error
    # is finite (6e2 to 6e4). No row's own label is fitted near 1, so the saturation count says
    # nothing: the check moves along each suspect's profile and finds the likelihood flat.
    rng = np.random.default_rng(0)
    x, dummy = rng.normal(size=600), (rng.random(600) < 0.3).astype(float)
    logits = np.column_stack([np.zeros(600), 0.8 * x, -0.5 * x])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = (probs.cumsum(1) > rng.uniform(size=(600, 1))).argmax(1)
    X = np.column_stack([x, dummy]).astype(dtype)
    tol = 1e-8 if dtype == np.float64 else 1e-5
    well_posed = _fit(X, y, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", xj.InferenceWarning)
        for cov_type in ("nonrobust", "HC0"):
            xj.logit_inference(well_posed, X, y, cov_type=cov_type)
    # A row of weight 0 with a huge value: it bounded the steps to 1e-8 standard errors, where
    # the fit's rounding read as a flat likelihood (large errors here: a nearly collinear pair,
    # which float32 does not resolve).
    if dtype == np.float64:
        from sklearn.datasets import make_classification

        Xc, yc = make_classification(
            300, 4, n_informative=3, n_redundant=0, n_classes=3, random_state=1
        )
        Xc = np.column_stack([Xc, Xc[:, 0] + 1e-3 * rng.normal(size=300)]).astype(dtype)
        Xc, yc = np.vstack([Xc, np.full((1, 5), 1e7, dtype)]), np.append(yc, 0)
        weights = np.append(np.ones(300), 0.0)
        fit = xj.fit_logistic_regression(Xc, yc, 3, sample_weight=weights, tol=tol)
        with warnings.catch_warnings():
            warnings.simplefilter("error", xj.InferenceWarning)
            xj.logit_inference(fit, Xc, yc, sample_weight=weights)
    y[(dummy == 1) & (y == 1)] = 2
    separated = xj.fit_logistic_regression(X, y, 3, reference_class=True, tol=tol)
    assert bool(separated.converged)
    for cov_type in ("nonrobust", "HC0"):
        flat = r"flat away from the estimates of 1:x1 .*separation"
        with pytest.warns(xj.InferenceWarning, match=flat):
            inference = xj.logit_inference(separated, X, y, cov_type=cov_type)
        if cov_type == "nonrobust":  # (the sandwich's is small: its scores there are ~0)
            assert inference.bse[1, 0] > 50 * inference.bse[0, 0]


def test_cluster_labels_and_their_count():
    codes = np.arange(len(Y4)) % 7
    reference = xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=codes).bse
    # Any hashable labels: None among strings, tuples, a list of mixed types.
    names = np.array(["a", None, "b", "c", "d", "e", "f"], dtype=object)[codes]
    pairs = [(int(c), "x") for c in codes]
    mixed = [int(c) if c % 2 else str(c) for c in codes]
    for groups in (names, pairs, mixed):
        _close(
            xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=groups).bse,
            reference,
            rtol=1e-12,
        )
    # 1 and "1" are two clusters (np.asarray wrote both as "1", and the 14 clusters became 7).
    half = np.arange(len(Y4)) >= len(Y4) // 2
    fourteen = codes + 7 * half
    apart = [str(c) if late else int(c) for c, late in zip(codes, half, strict=True)]
    _close(
        xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=apart).bse,
        xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=fourteen).bse,
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match=r"groups must have shape \(300,\)"):
        xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=codes[:-1])
    with pytest.raises(ValueError, match="hashable"):
        xj.logit_inference(FIT4, X4, Y4, cov_type="cluster", groups=[[c] for c in codes])
    # Two groups, one of them without weight: one cluster, refused.
    weights = (codes < 3).astype(float)
    with pytest.raises(ValueError, match="at least 2 groups with positive weight"):
        xj.logit_inference(
            FIT4, X4, Y4, sample_weight=weights, cov_type="cluster", groups=codes >= 3
        )
    # Weights normalised to sum to 1: nobs = 1 < P, where the correction is undefined (it
    # gave zero or NaN standard errors).
    normalised = np.full(len(Y4), 1 / len(Y4))
    with pytest.raises(xj.InferenceError, match=r"nobs = Σw = 1 > P = 12"):
        xj.logit_inference(FIT4, X4, Y4, sample_weight=normalised, cov_type="cluster", groups=codes)


def test_structured_output_and_intervals(monkeypatch):
    result = xj.logit_inference(FIT4, X4, Y4, alpha=0.1)
    frame = result.to_frame()
    _close(frame.loc[("2", "x1"), "std_err"], result.bse[1, 1], rtol=0)
    lower, upper = result.conf_int(0.1)
    _close(lower, result.conf_int_lower, rtol=1e-14)
    _close(result.conf_int_upper - result.params, 1.6448536269514722 * result.bse, rtol=1e-12)
    # A level so high that 1 − alpha/2 rounds to 1: z = Φ⁻¹(1 − 5e-18) = 8.5739 (mpmath).
    lower, upper = result.conf_int(1e-17)
    _close(upper - result.params, 8.573944076720883 * result.bse, rtol=1e-9)
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas stays optional
    plain = result.to_frame()
    assert isinstance(plain, dict) and plain["coef"].shape == (12,)
    _close(plain["p_value"], result.pvalues.T.ravel(), rtol=0)
    # Whole numbers of observations in full, also where the weights' sum rounds off them.
    assert "Observations: 300 " in result.summary()
    # Term names are printed in full: two that share their first 20 characters were one label.
    names = ["income_per_capita_2019", "income_per_capita_2020"]
    long = xj.logit_inference(FIT4, X4, Y4, term_names=[*names, "x2"]).summary()
    lines = long.splitlines()
    assert all(sum(line.startswith(name + " ") for line in lines) == 3 for name in names)
    assert len({len(line) for line in lines if line.startswith(("=", "-"))}) == 1
    for nobs, shown in ((1234566.9999999995, "1234567"), (2.5, "2.5"), (1234567.5, "1.23457e+06")):
        assert f"Observations: {shown} " in dataclasses.replace(result, nobs=nobs).summary()
