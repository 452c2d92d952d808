"""xentropy_jax: closed-form derivatives, curvature and Newton solvers for softmax cross-entropy."""

from ._losses import softmax_cross_entropy as softmax_cross_entropy
from ._losses import softmax_cross_entropy_hessian as softmax_cross_entropy_hessian
from ._losses import softmax_cross_entropy_hvp as softmax_cross_entropy_hvp
from ._losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)

__version__ = "0.1.0"

__all__ = [
    "softmax_cross_entropy",
    "softmax_cross_entropy_hessian",
    "softmax_cross_entropy_hvp",
    "softmax_cross_entropy_with_integer_labels",
]
