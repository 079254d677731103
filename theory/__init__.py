"""The mathematics of attention entropy collapse (numpy/scipy/sympy/mpmath only; never torch)."""
