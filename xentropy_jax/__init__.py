"""xentropy_jax: closed-form derivatives, curvature and Newton solvers for softmax cross-entropy."""

from ._cg import CGResult as CGResult
from ._cg import CGStatus as CGStatus
from ._cg import cg as cg
from ._cg import steihaug_cg as steihaug_cg
from ._curvature import ggn_operator as ggn_operator
from ._curvature import ggn_vp as ggn_vp
from ._curvature import hessian_vp as hessian_vp
from ._curvature import mean_cross_entropy as mean_cross_entropy
from ._diagonals import ggn_diagonal as ggn_diagonal
from ._diagonals import ggn_diagonal_bartlett as ggn_diagonal_bartlett
from ._diagonals import ggn_diagonal_hutchinson as ggn_diagonal_hutchinson
from ._inference import InferenceError as InferenceError
from ._inference import InferenceWarning as InferenceWarning
from ._inference import LogitInference as LogitInference
from ._inference import MarginalEffects as MarginalEffects
from ._inference import logit_inference as logit_inference
from ._linear_head import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from ._linear_head import (
    linear_softmax_cross_entropy_ggn_vp as linear_softmax_cross_entropy_ggn_vp,
)
from ._losses import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from ._losses import softmax_cross_entropy as softmax_cross_entropy
from ._losses import softmax_cross_entropy_hessian as softmax_cross_entropy_hessian
from ._losses import softmax_cross_entropy_hvp as softmax_cross_entropy_hvp
from ._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from ._objective import Objective as Objective
from ._optax import GaussNewtonState as GaussNewtonState
from ._optax import ScaleByGGNDiagonalState as ScaleByGGNDiagonalState
from ._optax import SophiaGState as SophiaGState
from ._optax import gauss_newton as gauss_newton
from ._optax import scale_by_ggn_diagonal as scale_by_ggn_diagonal
from ._optax import scale_by_sophia_g as scale_by_sophia_g
from ._optax import sophia_g as sophia_g
from .solvers import CollinearityWarning as CollinearityWarning
from .solvers import FitError as FitError
from .solvers import FitResult as FitResult
from .solvers import Newton as Newton
from .solvers import NewtonCG as NewtonCG
from .solvers import SeparationWarning as SeparationWarning
from .solvers import Solver as Solver
from .solvers import SolverOutput as SolverOutput
from .solvers import Status as Status
from .solvers import TrustRegion as TrustRegion
from .solvers import fit_logistic_regression as fit_logistic_regression
from .solvers import fit_logistic_regression_streamed as fit_logistic_regression_streamed
from .solvers import fit_regularization_path as fit_regularization_path

__version__ = "0.1.0"

__all__ = [
    "CGResult",
    "CGStatus",
    "CollinearityWarning",
    "FitError",
    "FitResult",
    "GaussNewtonState",
    "InferenceError",
    "InferenceWarning",
    "LogitInference",
    "MarginalEffects",
    "Newton",
    "NewtonCG",
    "Objective",
    "ScaleByGGNDiagonalState",
    "SeparationWarning",
    "Solver",
    "SolverOutput",
    "SophiaGState",
    "Status",
    "TrustRegion",
    "cg",
    "fit_logistic_regression",
    "fit_logistic_regression_streamed",
    "fit_regularization_path",
    "gauss_newton",
    "ggn_diagonal",
    "ggn_diagonal_bartlett",
    "ggn_diagonal_hutchinson",
    "ggn_operator",
    "ggn_vp",
    "hessian_vp",
    "linear_softmax_cross_entropy",
    "linear_softmax_cross_entropy_ggn_vp",
    "logit_inference",
    "mean_cross_entropy",
    "safe_softmax_cross_entropy",
    "scale_by_ggn_diagonal",
    "scale_by_sophia_g",
    "softmax_cross_entropy",
    "softmax_cross_entropy_hessian",
    "softmax_cross_entropy_hvp",
    "softmax_cross_entropy_with_integer_labels",
    "sophia_g",
    "steihaug_cg",
]
