"""The mathematics of attention entropy collapse (numpy/scipy/sympy/mpmath only; never torch).

Equation numbers in docstrings refer to ``theory/README.md``.
"""
from theory.bound import entropy_lower_bound, extremal_logits, max_logit_norm, softmax_entropy
from theory.instances import (
    VARIANTS,
    TheoremBound,
    extremal_instance,
    row_entropy_bounds,
    row_logit_norm_bounds,
    theorem_bound,
)

__all__ = [
    "softmax_entropy", "entropy_lower_bound", "max_logit_norm", "extremal_logits",
    "TheoremBound", "theorem_bound", "row_logit_norm_bounds", "row_entropy_bounds",
    "extremal_instance", "VARIANTS",
]
