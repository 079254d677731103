"""The rules of sigma_core/experiments/definitions.py: one hard batch is not instability, collapse
and its step come from one rule, bad parameters are refused by name, and the sensitivity grid
changes one parameter at a time."""
import dataclasses
import math

import pytest

from sigma_core.experiments import definitions as defs


def recs(losses, ents=None):
    ents = ents or [2.0] * len(losses)
    return [{"step": 2 * (i + 1), "train_loss": l, "grad_norm": 1.0, "entropy_min_head": e}
            for i, (l, e) in enumerate(zip(losses, ents))]


def test_one_hard_batch_is_not_instability_a_lasting_rise_is():
    hard_batch = recs([3.0, 2.0, 1.8, 2.6, 1.8, 1.7, 1.7])  # step 8 alone is 0.8 nats above the best
    assert defs.first_instability_step(hard_batch) is None
    assert defs.first_instability_step(hard_batch, spike_persist=1) == 8
    lasting = recs([3.0, 2.0, 1.8, 2.6, 2.5, 2.7, 2.4])
    assert defs.first_instability_step(lasting) == 8
    assert defs.first_instability_step(lasting, spike_nats=1.0) is None


def test_divergence_is_instability_and_wins_when_earlier():
    r = recs([3.0, 2.0, 2.0]) + [{"step": 8, "diverged": True, "train_loss": None}]
    assert defs.diverged_step(r) == 8 == defs.first_instability_step(r)
    assert defs.diverged(r, {"diverged": True})
    assert defs.first_instability_step(recs([3.0, float("inf")])) == 4


def test_collapse_persistence_end_and_relative_threshold():
    r = recs([2.0] * 5, [3.0, 0.09, 0.5, 0.08, 0.07])
    assert defs.first_collapse_step(r) == 4
    assert defs.first_collapse_step(r, collapse_persist=2) == 8
    assert defs.first_collapse_step(r, collapse_at="end") == 10
    assert defs.first_collapse_step(r, collapse_nats=0.05) is None
    # 0.05 log 64 = 0.208: the step-6 value 0.5 is above it, 0.09 below
    assert defs.first_collapse_step(r, seq_len=64, collapse_fraction=0.05) == 4
    with pytest.raises(ValueError, match="seq_len"):
        defs.first_collapse_step(r, collapse_fraction=0.05)


def test_learned_stable_and_competitive():
    assert not defs.learned(math.log(10), math.log(10)) and defs.learned(1.0, math.log(10))
    assert defs.stable_setting([True, True, True]) and not defs.stable_setting([True, True, False])
    # a difference inside the spread is no difference, however large the margin rule
    a, b = [0.60, 0.90, 0.75], [0.85, 0.86, 0.87]
    assert not defs.differ(a, b) and defs.competitive(a, b)
    assert not defs.competitive([0.60, 0.61, 0.62], [0.85, 0.86, 0.87])
    assert defs.competitive([0.84], [0.85]) and not defs.competitive([0.84], [0.85],
                                                                     definitions=defs.Definitions(competitive_points=0.5))


@pytest.mark.parametrize("field,value", [("collapse_nats", 0), ("collapse_nats", float("nan")),
                                         ("spike_persist", 0), ("collapse_persist", 1.5),
                                         ("collapse_at", "last"), ("stable_seeds", "some"),
                                         ("spread", "sd"), ("collapse_fraction", 1.0), ("learn_margin", -1)])
def test_bad_parameters_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        defs.Definitions(**{field: value})


def test_records_must_be_records():
    with pytest.raises(TypeError, match="records"):
        defs.first_collapse_step([1, 2])


def test_the_grid_changes_one_parameter_at_a_time():
    grid = defs.alternatives()
    assert grid[0] == defs.DEFAULT and len({d.name for d in grid}) == len(grid)
    for d in grid[1:]:
        changed = [f.name for f in dataclasses.fields(d) if getattr(d, f.name) != getattr(defs.DEFAULT, f.name)]
        assert len(changed) == 1 and d.name.startswith(changed[0])
