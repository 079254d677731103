"""The experiments: data, typed configs and presets, the training loop, reports and sweeps.

Not needed to use sigmaReparam or the entropy monitor in your own model; those live in
``sigma_core.reparam``, ``sigma_core.entropy``, ``sigma_core.monitor`` and ``sigma_core.probe``.
"""
