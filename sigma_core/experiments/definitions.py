"""The rules every verdict uses, fixed before the runs: collapse, instability, divergence, a stable
learning rate, "competitive", and the grid of reasonable alternatives used to test sensitivity.

One set of definitions serves the run report (:mod:`sigma_core.experiments.report`), the
stabiliser sweep (:mod:`sigma_core.experiments.compare`) and the claims ledger
(:mod:`sigma_core.experiments.claims`).  Every function reads the records of a run's
``metrics.jsonl`` (the *logged* steps: every ``log_every`` steps, plus the first and the last),
so every time it returns is known to that resolution.  The defaults live in :data:`DEFAULT`, a
:class:`Definitions`; :func:`alternatives` gives the small grid of other reasonable choices, each
changing one parameter, under which the ledger recomputes every verdict (a verdict that changes
across them is reported as "sensitive to the definition").

Collapse
    A head's *entropy* is its mean over the attention rows that see at least half the keys
    (``entropy[l][h]`` of a record; ``entropy_min_head`` is the least over heads).  A run has
    *collapsed* at the first logged step from which ``entropy_min_head`` stays below the
    threshold for ``collapse_persist`` consecutive logged steps (default 1: the first logged step
    below it).  The threshold is ``collapse_nats`` (default 0.1 nats, a head that puts nearly all
    its weight on one key: one key at probability 0.99 among T = 64 gives 0.10 nats), or, when
    ``collapse_fraction`` is set, ``collapse_fraction * log T`` (the live monitor's
    :class:`~sigma_core.monitor.CollapseDetector` rule, 0.05 log T).  ``collapse_at="end"``
    instead asks whether a head is below the threshold at the last logged step.
Instability
    A run becomes *unstable* at the first logged step whose training loss exceeds the lowest
    earlier logged loss by more than ``spike_nats`` (default 0.5) *and stays above that level*
    for ``spike_persist`` consecutive logged steps (default 3), so that one hard batch is not
    instability; or at divergence, whichever comes first.
Divergence
    A non-finite training loss or gradient norm at a logged step (the trainer then stops and
    writes a ``diverged`` record), a run that crashed (no ``summary.json``), or a final held-out
    loss that is missing or non-finite.
Learning
    A run *learned* when its final held-out loss is below the chance loss (log of the number of
    classes: log 256 for the byte-level GPT, log 10 for the digits, log V for the sequence task)
    by at least ``learn_margin`` nats (default 0.05).  A run that never leaves its initialisation
    is neither unstable nor collapsed: it did not learn.
Stable learning rate
    A run is *stable* when it learned and neither collapsed nor diverged.  A learning rate is stable for a
    method when ``stable_seeds`` of its seeds are (default ``"all"``; alternative ``"majority"``).
Spread and difference
    The *spread* of a setting's per-seed scores is their range, max - min (``spread="range"``,
    default) or twice their sample standard deviation (``"2sd"``).  Two settings differ only when
    their means differ by more than the larger of the two spreads; a smaller difference is no
    difference.
Competitive
    A candidate is *competitive* with a reference when its mean score is at most
    ``competitive_points`` (default 2 accuracy points) below the reference's, or when the two do
    not differ (above).  The alternative ``competitive_by_spread=False`` drops the second part:
    only the points count, so a setting whose seeds scatter widely (some at chance, some at the
    reference) cannot be competitive through its own spread.  It was added to the sensitivity
    grid after the runs of claim 4, whose depth-6 verdict rests on the no-difference part; being an
    alternative, it can only mark a verdict as sensitive, never change the default one.

Example
-------
>>> recs = [{"step": s, "train_loss": l, "entropy_min_head": e} for s, l, e in
...         [(1, 3.0, 2.0), (2, 2.0, 1.0), (3, 2.9, 0.05), (4, 2.0, 0.5), (5, 2.8, 0.04), (6, 2.9, 0.03),
...          (7, 3.0, 0.02)]]
>>> first_instability_step(recs), first_instability_step(recs, spike_persist=1)  # step 3 is one bad batch
(5, 3)
>>> first_collapse_step(recs), first_collapse_step(recs, collapse_persist=3)
(3, 5)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

#: the defaults (module docstring): a head below this many nats has collapsed
COLLAPSE_NATS = 0.1
#: a loss this many nats above the run's best earlier logged loss is a spike
SPIKE_NATS = 0.5
#: ... and it must stay there for this many consecutive logged steps to be instability
SPIKE_PERSIST = 3
#: a run learned when its final held-out loss is this far below the chance loss
LEARN_MARGIN = 0.05
#: accuracy points within which a candidate counts as competitive
COMPETITIVE_POINTS = 2.0


@dataclass(frozen=True)
class Definitions:
    """One choice of every rule's parameters (module docstring); :data:`DEFAULT` is the ledger's.

    >>> Definitions(spike_persist=1).name
    'spike_persist=1'
    >>> DEFAULT.name
    'default'
    """

    collapse_nats: float = COLLAPSE_NATS
    collapse_fraction: float | None = None
    collapse_persist: int = 1
    collapse_at: str = "any"
    spike_nats: float = SPIKE_NATS
    spike_persist: int = SPIKE_PERSIST
    learn_margin: float = LEARN_MARGIN
    stable_seeds: str = "all"
    spread: str = "range"
    competitive_points: float = COMPETITIVE_POINTS
    competitive_by_spread: bool = True

    def __post_init__(self):
        for name in ("collapse_nats", "spike_nats", "competitive_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if isinstance(self.learn_margin, bool) or not isinstance(self.learn_margin, (int, float)) \
                or not (self.learn_margin >= 0 and math.isfinite(self.learn_margin)):
            raise ValueError(f"learn_margin must be a finite number >= 0, got {self.learn_margin!r}")
        if self.collapse_fraction is not None and not (
                isinstance(self.collapse_fraction, (int, float)) and 0 < self.collapse_fraction < 1):
            raise ValueError(f"collapse_fraction must be None or in (0, 1), got {self.collapse_fraction!r}")
        for name in ("collapse_persist", "spike_persist"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.collapse_at not in ("any", "end"):
            raise ValueError(f"collapse_at must be 'any' or 'end', got {self.collapse_at!r}")
        if self.stable_seeds not in ("all", "majority"):
            raise ValueError(f"stable_seeds must be 'all' or 'majority', got {self.stable_seeds!r}")
        if self.spread not in ("range", "2sd"):
            raise ValueError(f"spread must be 'range' or '2sd', got {self.spread!r}")
        if not isinstance(self.competitive_by_spread, bool):
            raise ValueError(f"competitive_by_spread must be a bool, got {self.competitive_by_spread!r}")

    @property
    def name(self) -> str:
        """``"default"`` or the fields that differ from :data:`DEFAULT`, e.g. ``"spike_persist=1"``."""
        diff = [f"{f.name}={getattr(self, f.name):g}" if isinstance(getattr(self, f.name), float)
                else f"{f.name}={getattr(self, f.name)}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(diff) or "default"

    def collapse_threshold(self, seq_len: int | None = None) -> float:
        """The collapse threshold in nats: ``collapse_nats``, or ``collapse_fraction * log T``.

        >>> round(Definitions(collapse_fraction=0.05).collapse_threshold(64), 3)
        0.208
        """
        if self.collapse_fraction is None:
            return float(self.collapse_nats)
        if seq_len is None or int(seq_len) < 2:
            raise ValueError(f"seq_len must be an integer >= 2 for a relative threshold, got {seq_len!r}")
        return float(self.collapse_fraction) * math.log(int(seq_len))


#: the ledger's definitions
DEFAULT = Definitions()


def alternatives() -> list[Definitions]:
    """The sensitivity grid: :data:`DEFAULT` first, then one alternative per line, each changing one
    parameter to another reasonable value.

    >>> [d.name for d in alternatives()][:4]
    ['default', 'collapse_nats=0.05', 'collapse_nats=0.2', 'collapse_fraction=0.05']
    >>> len(alternatives())
    15
    """
    return [DEFAULT] + [dataclasses.replace(DEFAULT, **change) for change in (
        {"collapse_nats": 0.05}, {"collapse_nats": 0.2}, {"collapse_fraction": 0.05},
        {"collapse_persist": 3}, {"collapse_at": "end"},
        {"spike_nats": 0.25}, {"spike_nats": 1.0}, {"spike_persist": 1}, {"spike_persist": 5},
        {"stable_seeds": "majority"}, {"spread": "2sd"},
        {"competitive_points": 1.0}, {"competitive_points": 5.0}, {"competitive_by_spread": False})]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_records(records) -> list[dict]:
    if not isinstance(records, (list, tuple)) or not all(isinstance(r, dict) and "step" in r for r in records):
        raise TypeError("records must be a list of metric records (dicts with a 'step')")
    return list(records)


def first_collapse_step(records, *, seq_len: int | None = None, definitions: Definitions = DEFAULT,
                        **overrides) -> int | None:
    """First logged step from which the least head entropy stays below the collapse threshold for
    ``collapse_persist`` logged steps (``collapse_at="end"``: the last logged step when a head is
    below it there), or ``None``.  ``overrides`` replace fields of ``definitions``.

    >>> recs = [{"step": 1, "entropy_min_head": 2.0}, {"step": 5, "entropy_min_head": 0.08},
    ...         {"step": 10, "entropy_min_head": 0.3}]
    >>> first_collapse_step(recs), first_collapse_step(recs, collapse_at="end")
    (5, None)
    """
    d = dataclasses.replace(definitions, **overrides) if overrides else definitions
    recs = [r for r in _check_records(records) if _finite(r.get("entropy_min_head"))]
    thr = d.collapse_threshold(seq_len)
    below = [r["entropy_min_head"] < thr for r in recs]
    if d.collapse_at == "end":
        return recs[-1]["step"] if below and below[-1] else None
    k = d.collapse_persist
    for i in range(len(recs)):
        window = below[i:i + k]
        # a run that ends below the threshold counts even when fewer than k logged steps remain
        if window and all(window) and (len(window) == k or i + len(window) == len(recs)):
            return recs[i]["step"]
    return None


def diverged_step(records, summary: dict | None = None) -> int | None:
    """The step of the first non-finite training loss or gradient norm (or ``diverged`` record),
    else the summary's ``diverged_step``, else ``None``.

    >>> diverged_step([{"step": 1, "train_loss": 2.0, "grad_norm": 1.0}, {"step": 2, "train_loss": float("nan")}])
    2
    """
    for r in _check_records(records):
        if r.get("diverged"):
            return r["step"]
        for key in ("train_loss", "grad_norm"):
            if key in r and not _finite(r[key]):
                return r["step"]
    return (summary or {}).get("diverged_step")


def diverged(records, summary: dict | None) -> bool:
    """True when the run diverged (:func:`diverged_step`), crashed (``summary`` is ``None``) or
    ends without a finite held-out loss.

    >>> diverged([{"step": 1, "train_loss": 2.0, "val_loss": 1.9}], {"diverged": False})
    False
    >>> diverged([{"step": 1, "train_loss": 2.0, "val_loss": 1.9}], None)  # crashed: no summary
    True
    """
    records = _check_records(records)
    if summary is None or summary.get("diverged") or diverged_step(records, summary) is not None:
        return True
    val = final_heldout_loss(records)
    return not _finite(val)


def final_heldout_loss(records) -> float | None:
    """The last logged held-out (validation) loss, or ``None``."""
    return next((r["val_loss"] for r in reversed(_check_records(records)) if "val_loss" in r), None)


def first_instability_step(records, *, summary: dict | None = None, definitions: Definitions = DEFAULT,
                           **overrides) -> int | None:
    """First logged step of a persistent loss spike (module docstring) or of divergence, or ``None``.

    A spike at step s: ``loss(s) > best + spike_nats``, ``best`` the lowest logged loss before s,
    and the loss stays above ``best + spike_nats`` at the following ``spike_persist - 1`` logged
    steps (a run that ends, or diverges, before that counts: its spike never came back down).
    """
    d = dataclasses.replace(definitions, **overrides) if overrides else definitions
    records = _check_records(records)
    div = diverged_step(records, summary)
    recs = [r for r in records if not r.get("diverged") and _finite(r.get("train_loss"))
            and (div is None or r["step"] < div)]
    losses = [r["train_loss"] for r in recs]
    spike, best = None, math.inf
    for i, loss in enumerate(losses):
        level = best + d.spike_nats
        if loss > level:
            window = losses[i:i + d.spike_persist]
            if all(x > level for x in window) and (len(window) == d.spike_persist or i + len(window) == len(losses)):
                spike = recs[i]["step"]
                break
        best = min(best, loss)
    return min((s for s in (spike, div) if s is not None), default=None)


def learned(final_loss, chance_loss: float, *, definitions: Definitions = DEFAULT) -> bool:
    """True when ``final_loss`` is finite and below ``chance_loss - learn_margin``.

    >>> learned(2.30, math.log(10)), learned(0.5, math.log(10)), learned(float("nan"), 1.0)
    (False, True, False)
    """
    if not _finite(chance_loss) or chance_loss <= 0:
        raise ValueError(f"chance_loss must be a positive finite number, got {chance_loss!r}")
    return _finite(final_loss) and final_loss < chance_loss - definitions.learn_margin


def chance_loss(config: dict) -> float:
    """The held-out loss of a uniform prediction: log 10 for the digits ViT, log(2B - 1) for the
    self-supervised ViT (NT-Xent over batches of B = ``batch_size`` images), log ``vocab_size``
    otherwise (the byte-level GPT: log 256; the sequence task: log V).

    >>> round(chance_loss({"model": "vit"}), 4), round(chance_loss({"model": "gpt", "vocab_size": 256}), 4)
    (2.3026, 5.5452)
    """
    if config.get("model") == "vit":
        return math.log(10)
    if config.get("model") == "vit-simclr":  # NT-Xent with batches of B images: log(2B - 1)
        return math.log(2 * int(config.get("batch_size", 60)) - 1)
    return math.log(int(config.get("vocab_size", 256)))


def stable_run(records, summary: dict | None, config: dict, *, definitions: Definitions = DEFAULT) -> bool:
    """Learned (:func:`learned`, against :func:`chance_loss` of ``config``) and neither collapsed
    (:func:`first_collapse_step`, with T = ``config["block_size"]``) nor diverged (:func:`diverged`).

    >>> recs = [{"step": 1, "train_loss": 5.0, "entropy_min_head": 3.0}, {"step": 2, "train_loss": 2.0,
    ...          "entropy_min_head": 0.05, "val_loss": 2.1}]
    >>> stable_run(recs, {}, {"model": "gpt", "vocab_size": 256, "block_size": 64})  # collapsed at step 2
    False
    """
    return (not diverged(records, summary)
            and learned(final_heldout_loss(records), chance_loss(config), definitions=definitions)
            and first_collapse_step(records, seq_len=config.get("block_size"), definitions=definitions) is None)


def stable_setting(per_seed_stable, *, definitions: Definitions = DEFAULT) -> bool:
    """Whether a setting (one method at one lr) is stable from its seeds' :func:`stable_run` values:
    all of them (``stable_seeds="all"``) or more than half (``"majority"``).

    >>> stable_setting([True, True, False]), stable_setting([True, True, False], definitions=Definitions(stable_seeds="majority"))
    (False, True)
    """
    flags = [bool(x) for x in per_seed_stable]
    if not flags:
        raise ValueError("per_seed_stable must hold at least one seed")
    if definitions.stable_seeds == "all":
        return all(flags)
    return sum(flags) * 2 > len(flags)


def largest_stable_lr(stable_by_lr: dict[float, bool]) -> float | None:
    """The largest learning rate whose setting is stable, or ``None`` (it says nothing about rates
    between or beyond the swept ones).

    >>> largest_stable_lr({0.01: True, 0.03: False, 0.1: True})
    0.1
    """
    ok = [float(lr) for lr, s in stable_by_lr.items() if s]
    return max(ok) if ok else None


def mean(xs) -> float:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("xs must hold at least one score")
    return sum(xs) / len(xs)


def spread(xs, *, definitions: Definitions = DEFAULT) -> float:
    """The spread of per-seed scores: max - min, or twice the sample standard deviation; 0 for one seed.

    >>> spread([0.90, 0.92, 0.97]), round(spread([0.90, 0.92, 0.97], definitions=Definitions(spread="2sd")), 4)
    (0.07, 0.0721)
    """
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("xs must hold at least one score")
    if len(xs) < 2:
        return 0.0
    if definitions.spread == "range":
        return round(max(xs) - min(xs), 12)
    m = mean(xs)
    return 2 * math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def differ(a, b, *, definitions: Definitions = DEFAULT) -> bool:
    """True when the means of the per-seed scores ``a`` and ``b`` differ by more than the larger
    spread of the two (a smaller difference is no difference).

    >>> differ([0.90, 0.92, 0.94], [0.93, 0.95, 0.97]), differ([0.90, 0.91, 0.92], [0.96, 0.97, 0.98])
    (False, True)
    """
    return abs(mean(a) - mean(b)) > max(spread(a, definitions=definitions), spread(b, definitions=definitions))


def competitive(candidate, reference, *, scale: float = 100.0, definitions: Definitions = DEFAULT) -> bool:
    """True when the candidate's per-seed scores are within ``competitive_points`` of the
    reference's mean (scores times ``scale``: accuracies in points) or, unless
    ``competitive_by_spread`` is False, do not differ from them.

    >>> competitive([0.91, 0.92, 0.93], [0.925, 0.93, 0.935]), competitive([0.80, 0.81, 0.82], [0.92, 0.93, 0.94])
    (True, False)
    >>> wide = [0.098, 0.105, 1.0]  # two seeds at chance, one at the reference
    >>> competitive(wide, [1.0, 1.0, 1.0]), competitive(wide, [1.0, 1.0, 1.0], definitions=Definitions(competitive_by_spread=False))
    (True, False)
    """
    gap = scale * (mean(reference) - mean(candidate))
    if gap <= definitions.competitive_points:
        return True
    return definitions.competitive_by_spread and not differ(candidate, reference, definitions=definitions)
