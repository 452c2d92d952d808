"""Newton, Newton-CG and trust-region solvers for multinomial logistic regression."""

from ._fit import fit_logistic_regression as fit_logistic_regression
from ._loop import Solver as Solver
from ._loop import SolverOutput as SolverOutput
from ._newton import Newton as Newton
from ._newton_cg import NewtonCG as NewtonCG
from ._path import fit_regularization_path as fit_regularization_path
from ._result import CollinearityWarning as CollinearityWarning
from ._result import FitError as FitError
from ._result import FitResult as FitResult
from ._result import SeparationWarning as SeparationWarning
from ._result import Status as Status
from ._streamed_fit import fit_logistic_regression_streamed as fit_logistic_regression_streamed
from ._trust_region import TrustRegion as TrustRegion

__all__ = [
    "CollinearityWarning",
    "FitError",
    "FitResult",
    "Newton",
    "NewtonCG",
    "SeparationWarning",
    "Solver",
    "SolverOutput",
    "Status",
    "TrustRegion",
    "fit_logistic_regression",
    "fit_logistic_regression_streamed",
    "fit_regularization_path",
]
