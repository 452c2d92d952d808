"""xentropy_jax: closed-form derivatives, curvature and Newton solvers for softmax cross-entropy."""

from ._curvature import ggn_operator as ggn_operator
from ._curvature import ggn_vp as ggn_vp
from ._curvature import hessian_vp as hessian_vp
from ._curvature import mean_cross_entropy as mean_cross_entropy
from ._diagonals import ggn_diagonal as ggn_diagonal
from ._diagonals import ggn_diagonal_bartlett as ggn_diagonal_bartlett
from ._diagonals import ggn_diagonal_hutchinson as ggn_diagonal_hutchinson
from ._linear_head import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from ._linear_head import (
    linear_softmax_cross_entropy_ggn_vp as linear_softmax_cross_entropy_ggn_vp,
)
from ._losses import softmax_cross_entropy as softmax_cross_entropy
from ._losses import softmax_cross_entropy_hessian as softmax_cross_entropy_hessian
from ._losses import softmax_cross_entropy_hvp as softmax_cross_entropy_hvp
from ._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from .solvers import FitError as FitError
from .solvers import FitResult as FitResult
from .solvers import Newton as Newton
from .solvers import NewtonCG as NewtonCG
from .solvers import Status as Status
from .solvers import TrustRegion as TrustRegion
from .solvers import fit_logistic_regression as fit_logistic_regression

__version__ = "0.1.0"

__all__ = [
    "FitError",
    "FitResult",
    "Newton",
    "NewtonCG",
    "Status",
    "TrustRegion",
    "fit_logistic_regression",
    "ggn_diagonal",
    "ggn_diagonal_bartlett",
    "ggn_diagonal_hutchinson",
    "ggn_operator",
    "ggn_vp",
    "hessian_vp",
    "linear_softmax_cross_entropy",
    "linear_softmax_cross_entropy_ggn_vp",
    "mean_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_hessian",
    "softmax_cross_entropy_hvp",
    "softmax_cross_entropy_with_integer_labels",
]
