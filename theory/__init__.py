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

# Numerical certification (issue 3). The sympy proofs live in ``theory.symbolic``; import that
# module explicitly (``from theory import symbolic``) -- it is not imported here, to keep
# ``import theory`` free of sympy's import cost.
from theory.certify import (  # noqa: E402
    adam_update_bound,
    box_min_entropy,
    entropy_lower_bound_mp,
    minimize_entropy,
    one_hot_counterexample,
)

__all__ += ["entropy_lower_bound_mp", "minimize_entropy", "box_min_entropy", "one_hot_counterexample",
            "adam_update_bound"]
