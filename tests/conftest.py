"""Shared test configuration: Hypothesis profiles.

``ci`` (selected when the ``CI`` environment variable is set): derandomized, no deadline, so a
CI run is reproducible and not flaky on a loaded 2-core machine.  ``dev``: random, no deadline.
``soak``: many more examples (selected by ``HYPOTHESIS_PROFILE=soak``).
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile(
    "soak", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
