"""Helpers for the course notebooks: sliders that fall back to a plain run, and exercise checks.

:func:`controls` draws a function's output once with its default arguments, as an ordinary cell
output (so an HTML export or a run without a widget front-end shows the plot), and adds sliders
below it when ipywidgets is installed.  :class:`Exercises` answers a student back: each exercise
of a notebook has a check cell that calls :meth:`Exercises.check` with the student's variables;
the check computes its own reference (it never reads a solution cell) and prints ``correct`` or
``not yet`` with a hint.  An answer still set to ``...`` (Ellipsis, the starting cells' value) is
*not answered*.  The notebook's closing cell prints :meth:`Exercises.verdict`, which says "all
claims hold" only when no exercise was answered wrongly.

Example
-------
>>> ex = Exercises("1")
>>> ex.check("1.1", allowed_norm=4.852, entropy_at_110=0.9)     # doctest: +ELLIPSIS
exercise 1.1: not yet. ...log T...
'not yet'
>>> "all claims" in ex.verdict("all claims of notebook 1 hold")
False
>>> ex.grade("1.1", allowed_norm=..., entropy_at_110=...)[0]
'not answered'
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import numpy as np

CORRECT, NOT_YET, OPEN = "correct", "not yet", "not answered"


def controls(fn: Callable, manual: bool = False, **params):
    """Run ``fn`` once with its default arguments, then add sliders for them (Jupyter only).

    The plain call's output (figures, prints) is an ordinary cell output, so it shows in an HTML
    export (``jupyter nbconvert --execute --to html``) and wherever no widget front-end runs.  When
    ipywidgets is installed, sliders follow; moving one redraws into an output area below them.

    Parameters
    ----------
    fn : callable
        The function to drive; called with keyword arguments.
    manual : bool
        Redraw only when a **Run** button is pressed (for slow functions, e.g. a training run).
    **params
        ``name=(low, high, step, default)`` for a slider, ``("log", low_exp, high_exp, step,
        default)`` for a log-scale slider, or a list of choices (the first is the default).

    Returns
    -------
    object
        What the plain call with the default values returned.

    Examples
    --------
    >>> controls(lambda s=1.0: 2 * s, s=(0.0, 4.0, 0.5, 1.5))   # doctest: +ELLIPSIS
    plain parameters (open the notebook in Jupyter for sliders): {'s': 1.5}
    3.0
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    for name, v in params.items():
        if not isinstance(v, (list, tuple)) or len(v) == 0:
            raise ValueError(f"{name}: expected (low, high, step, default), ('log', ...) or a list, got {v!r}")
    plain = {k: v[0] if isinstance(v, list) else v[-1] for k, v in params.items()}
    print("plain parameters (open the notebook in Jupyter for sliders):", plain)
    result = fn(**plain)
    try:
        import ipywidgets as widgets  # noqa: PLC0415
        from IPython import get_ipython  # noqa: PLC0415
        from IPython.display import display  # noqa: PLC0415
    except ImportError:
        return result
    if get_ipython() is None:   # a plain Python process (doctests): no front-end to draw sliders in
        return result

    def slider(v):
        if isinstance(v, list):
            return widgets.Dropdown(options=v, value=v[0])
        if v[0] == "log":
            return widgets.FloatLogSlider(min=v[1], max=v[2], step=v[3], value=v[4], continuous_update=False)
        kind = widgets.IntSlider if all(isinstance(x, int) for x in v) else widgets.FloatSlider
        return kind(min=v[0], max=v[1], step=v[2], value=v[3], continuous_update=False)

    sliders = {k: slider(v) for k, v in params.items()}
    for k, w in sliders.items():
        w.description = k
    out = widgets.Output()

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            fn(**{k: w.value for k, w in sliders.items()})

    items = list(sliders.values())
    if manual:
        button = widgets.Button(description="Run")
        button.on_click(redraw)
        items.append(button)
    else:
        for w in sliders.values():
            w.observe(redraw, names="value")
    print("above: the default values; in Jupyter, the controls below redraw underneath them")
    display(widgets.VBox([*items, out]))
    return result


def _answered(value) -> bool:
    return value is not Ellipsis


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            return None
        if arr.shape != ():
            return None
        value = arr
    value = float(value)
    return value if math.isfinite(value) else None


class Exercises:
    """The exercise checks of one notebook, and what the closing cell may claim.

    Parameters
    ----------
    notebook : str
        The notebook's number, as the exercises count it (``"1"`` for Exercises 1.1, 1.2).
    """

    def __init__(self, notebook: str):
        if not isinstance(notebook, str) or not notebook:
            raise ValueError(f"notebook must be a non-empty string, got {notebook!r}")
        self.notebook = notebook
        self.status: dict[str, str] = {}
        self.hints: dict[str, str] = {}

    def grade(self, exercise: str, **answers) -> tuple[str, str]:
        """``(status, message)`` for ``answers`` to ``exercise``, without recording it.

        ``status`` is ``"correct"``, ``"not yet"`` or ``"not answered"`` (some answer is still
        ``...``).  Extra objects a check needs from the notebook (a function, the runs) are passed
        as keywords as well (see :data:`CHECKS` for each exercise's names).
        """
        if exercise not in CHECKS:
            raise ValueError(f"exercise must be one of {sorted(CHECKS)}, got {exercise!r}")
        names, check = CHECKS[exercise]
        missing = [n for n in names if n not in answers]
        if missing:
            raise TypeError(f"exercise {exercise} needs the keywords {missing}")
        if not all(_answered(answers[n]) for n in names):
            return OPEN, "not answered yet: set " + ", ".join(n for n in names if not _answered(answers[n]))
        hint = check(**answers)
        return (CORRECT, "correct") if hint is None else (NOT_YET, hint)

    def check(self, exercise: str, **answers) -> str:
        """Grade, record and print the answer; returns the status."""
        status, message = self.grade(exercise, **answers)
        self.status[exercise] = status
        self.hints[exercise] = message
        if status == CORRECT:
            print(f"exercise {exercise}: correct.")
        elif status == NOT_YET:
            print(f"exercise {exercise}: not yet. {message}")
        else:
            print(f"exercise {exercise}: {message}")
        return status

    def verdict(self, claims: str) -> str:
        """``claims`` (e.g. "all claims of notebook 1 hold") followed by each exercise's status,
        unless some exercise was answered wrongly: then a line that says which, without ``claims``."""
        wrong = [e for e, s in self.status.items() if s == NOT_YET]
        if wrong:
            return (f"notebook {self.notebook}: not every answer holds yet, exercise(s) "
                    + ", ".join(wrong) + " not yet correct: " + "; ".join(self.hints[e] for e in wrong))
        done = ", ".join(f"{e} {s}" for e, s in sorted(self.status.items()))
        return claims + (f" (exercises: {done})" if done else "")


# ---------------------------------------------------------------------------------------------
# the checks, one per exercise: each returns None (correct) or a hint, and computes its own
# reference from the package (never from a solution cell)

def _close(a, b, rtol=1e-6, atol=0.0) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


def _check_1_1(allowed_norm, entropy_at_110):
    from theory.bound import entropy_lower_bound, max_logit_norm  # noqa: PLC0415

    T = 128
    ref = float(max_logit_norm(1.0, T))
    s = _number(allowed_norm)
    if s is None:
        return f"allowed_norm must be a finite number, got {allowed_norm!r}"
    if _close(s, math.log(T), rtol=1e-3):
        return (f"log T = {math.log(T):.3f} is not it: at a logit norm of log T a row may still keep "
                f"h_T(log T) = {float(entropy_lower_bound(math.log(T), T)):.2f} nats. You need the norm at which "
                "the least entropy h_T falls to 1 nat (the inverse of the bound: max_logit_norm).")
    if not _close(s, ref):
        return (f"at a norm of {s:.4g} the least possible entropy is h_T = {float(entropy_lower_bound(s, T)):.4f} "
                "nats, not 1: solve h_T(s) = 1 for s at T = 128 (max_logit_norm).")
    e = _number(entropy_at_110)
    want = float(entropy_lower_bound(1.1 * ref, T))
    if e is None or not _close(e, want, rtol=1e-6):
        return (f"allowed_norm is right; entropy_at_110 should be the entropy of the extremal row "
                f"(extremal_logits) at 1.1 x allowed_norm, got {entropy_at_110!r}")
    return None


def _check_1_2(z_rand, norm_needed, larger):
    from scipy.optimize import brentq  # noqa: PLC0415

    from theory.bound import max_logit_norm, softmax_entropy  # noqa: PLC0415

    z = np.asarray(z_rand, dtype=float)
    z = z - z.mean()
    c = brentq(lambda c: float(softmax_entropy(c * z)) - 0.1, 1e-3, 1e4, xtol=1e-14)
    ref = float(np.linalg.norm(c * z))
    n = _number(norm_needed)
    if n is None:
        return f"norm_needed must be a finite number, got {norm_needed!r}"
    if _close(n, float(max_logit_norm(0.1, len(z))), rtol=1e-6):
        return ("that is max_logit_norm(0.1, 32), the extremal row's norm; norm_needed is the centred norm of the "
                "random row once it is scaled to 0.1 nats")
    if not _close(n, ref, rtol=1e-5):
        return (f"scaling z_rand (centred) to 0.1 nats needs a centred norm of about {ref:.1f}: check that you "
                "centre the row and measure the norm of the scaled row")
    if larger not in ("random", "extremal"):
        return f"larger must be 'random' or 'extremal', got {larger!r}"
    if larger != "random":
        return ("the extremal row is the cheapest way to low entropy: any other row needs at least its norm, "
                "so the random row's norm is the larger")
    return None


def _check_2_1(first_mu, centred_there, instance):
    from theory.instances import row_entropy_bounds  # noqa: PLC0415

    mus = np.arange(0.0, 4.01, 0.25)
    theorem, centred = [], []
    for m in mus:
        X, W_Q, W_K, scale = instance(64, shared=m, gen=np.random.default_rng(3))
        hb = row_entropy_bounds(X, W_Q, W_K, scale=scale)
        theorem.append(hb["theorem"].mean())
        centred.append(hb["centered"].mean())
    j = int(np.argmax(np.array(theorem) < 0.1))
    m = _number(first_mu)
    if m is None:
        return f"first_mu must be a number from the grid 0, 0.25, ..., 4, got {first_mu!r}"
    if not _close(m, float(mus[j]), atol=1e-9):
        k = int(np.argmin(np.abs(mus - m)))
        return (f"at |mu| = {m:g} the theorem's mean row bound is {theorem[k]:.3f} nats; find the first grid "
                "value where it is below 0.1 (each with instance(64, shared=m, gen=np.random.default_rng(3)))")
    c = _number(centred_there)
    if c is None or not _close(c, float(centred[j]), rtol=1e-6):
        return f"first_mu is right; centred_there should be the mean centred bound at |mu| = {m:g}"
    return None


def _check_2_2(best_k, H_best, H_one_hot):
    from theory.certify import box_min_entropy  # noqa: PLC0415

    ref = box_min_entropy(0.5, 100)
    k = _number(best_k)
    if k is None:
        return f"best_k must be a whole number of keys, got {best_k!r}"
    if k == 1:
        return ("k = 1 is the one-hot row, the tempting guess: in a box with small b, putting more keys at +b "
                "gives less entropy. Evaluate H_k of eq. (11) for every k = 1, ..., 99 and take the smallest.")
    if k != ref.n_high:
        return f"H_k at k = {k:g} is not the smallest: evaluate eq. (11) for every k = 1, ..., 99"
    if not _close(_number(H_best), ref.value, rtol=1e-9):
        return f"best_k is right; H_best should be the entropy of that vertex, got {H_best!r}"
    if not _close(_number(H_one_hot), float(ref.vertex_values[1]), rtol=1e-9):
        return f"H_one_hot should be H_1, the one-hot row's entropy in the box, got {H_one_hot!r}"
    return None


def _check_3_1(predicted_forwards, measured_forwards, power_iteration_errors):
    err, *_ = power_iteration_errors(0.5, 30)
    predicted = 1 + int(np.ceil(np.log(1e-6 / err[0]) / np.log(0.5 ** 4)))
    measured = 1 + int(np.argmax(err < 1e-6))
    p, m = _number(predicted_forwards), _number(measured_forwards)
    if p is None or m is None:
        return "predicted_forwards and measured_forwards must be whole numbers of forwards"
    if abs(p - predicted) > 1:
        wrong_rate = 1 + int(np.ceil(np.log(1e-6 / err[0]) / np.log(0.5 ** 2)))
        if abs(p - wrong_rate) <= 1:
            return ("that prediction uses the vectors' rate (sigma_2/sigma_1)^2; the estimate of sigma converges "
                    "at the fourth power")
        return ("predict from the error after the first forward: each further forward multiplies it by "
                "(sigma_2/sigma_1)^4 = 1/16; count the forwards until it is below 1e-6")
    if m != measured:
        return ("measure with power_iteration_errors(0.5, 30): the first forward (counting from 1) whose "
                "relative error is below 1e-6")
    return None


def _gap_experiment():
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    from sigma_core.reparam import sigma_reparam, sigma_reparam_state  # noqa: PLC0415

    torch.manual_seed(0)
    lay = sigma_reparam(nn.Linear(64, 64, bias=False), gamma_init="sigma")
    opt = torch.optim.Adam(lay.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(64, generator=g), torch.randn(64, generator=g)
    gap = []
    for _ in range(30):
        opt.zero_grad()
        (-(u @ lay.weight @ v)).backward()
        opt.step()
        gam = sigma_reparam_state(lay)["weight"]["gamma"]
        gap.append(abs(torch.linalg.matrix_norm(lay.weight.detach(), ord=2).item() - gam) / gam)
    return np.array(gap)


def _check_3_2(gap_per_step, widest_step):
    ref = _gap_experiment()
    try:
        gap = np.asarray(gap_per_step, dtype=float).ravel()
    except (TypeError, ValueError):
        return f"gap_per_step must be 30 numbers, got {type(gap_per_step).__name__}"
    if gap.shape != ref.shape:
        return f"gap_per_step must hold one relative gap per Adam step (30), got {gap.size}"
    if not np.allclose(gap, ref, rtol=1e-3, atol=1e-6):
        return ("the gaps differ from the experiment: torch.manual_seed(0) before building the layer, "
                "torch.Generator().manual_seed(1) for u then v, and |svd norm - gamma| / gamma after each step")
    w = _number(widest_step)
    if w is None or w != 1 + int(np.argmax(ref)):
        return "widest_step is the step (counting from 1) with the largest gap"
    return None


def _check_4_1(run_dir_lr3e3, least_entropy_lr3e3):
    from sigma_core.experiments.report import read_config, summarise_run  # noqa: PLC0415

    try:
        cfg = read_config(run_dir_lr3e3)
    except (OSError, TypeError, ValueError) as err:
        return f"run_dir_lr3e3 must be the folder the run wrote ({err})"
    if cfg.get("preset") != "classroom" or cfg.get("reparam") != "none":
        return "train the classroom baseline (preset 'classroom', reparam 'none')"
    if not _close(float(cfg.get("lr", 0)), 3e-3, rtol=1e-9):
        return f"that run used lr {cfg.get('lr')}; the exercise asks for 3e-3, ten times smaller than 3e-2"
    want = summarise_run(run_dir_lr3e3)["entropy_min_head"]
    if not _close(_number(least_entropy_lr3e3), want, rtol=1e-9):
        return (f"least_entropy_lr3e3 should be the run's least head entropy at its end (summary "
                f"'entropy_min_head'), got {least_entropy_lr3e3!r}")
    return None


def _low_fractions(runs):
    from sigma_core.experiments.report import load_samples  # noqa: PLC0415

    out = {}
    for name, d in runs.items():
        _, rows = load_samples(d)
        keep = rows["n_keys"] >= rows["n_keys"].max() // 2
        out[name] = [float(np.mean(rows["entropy"][keep & (rows["layer"] == layer)] < 0.1))
                     for layer in np.unique(rows["layer"])]
    return out


def _check_4_2(low_fraction, most_collapsed_layer, runs):
    ref = _low_fractions(runs)
    if not isinstance(low_fraction, dict) or set(low_fraction) != set(ref):
        return f"low_fraction must be a dict with one entry per run: {sorted(ref)}"
    for name, want in ref.items():
        got = np.asarray(low_fraction[name], dtype=float).ravel()
        if got.shape != (len(want),) or not np.allclose(got, want, atol=1e-9):
            return (f"{name}: the fraction per layer differs; keep the rows with at least T/2 keys and count "
                    "those below 0.1 nats, layer by layer")
    layer = _number(most_collapsed_layer)
    if layer is None or layer != int(np.argmax(ref["baseline"])):
        return "most_collapsed_layer is the baseline's layer with the largest fraction (counting from 0)"
    return None


def _check_5_1(n_records_checked, largest_difference, chosen):
    from sigma_core.experiments.report import read_metrics  # noqa: PLC0415

    n, worst = 0, 0.0
    for d in chosen:
        for r in read_metrics(d):
            if r.get("entropy"):
                n += 1
                worst = max(worst, abs(min(min(layer) for layer in r["entropy"]) - r["entropy_min_head"]))
    got = _number(n_records_checked)
    if got != n:
        return f"there are {n} records with per-head entropies in the chosen runs, not {n_records_checked!r}: every record of every run"
    diff = _number(largest_difference)
    if diff is None or abs(diff - worst) > 1e-12 + 1e-9 * worst:
        return "largest_difference is the largest |min over the lists - entropy_min_head| over those records"
    return None


def _growth(chosen):
    from sigma_core.experiments.report import read_metrics  # noqa: PLC0415

    out = {}
    for d in chosen:
        recs = [r for r in read_metrics(d) if r.get("entropy")]
        hit = next((r for r in recs if r["entropy_min_head"] < 0.1), None)
        if hit is None:
            continue
        layer, head = np.unravel_index(np.argmin(hit["entropy"]), np.shape(hit["entropy"]))
        out[d.name] = hit["sigma"][layer][head] / recs[0]["sigma"][layer][head]
    return out


def _check_5_2(growth, chosen):
    ref = _growth(chosen)
    if not isinstance(growth, dict):
        return f"growth must be a dict run name -> factor, got {type(growth).__name__}"
    if set(growth) != set(ref):
        return f"growth needs exactly the runs that collapsed (a head below 0.1 nats): {sorted(ref)}"
    for name, want in ref.items():
        if not _close(_number(growth[name]), want, rtol=1e-6):
            return (f"{name}: take the least-entropy head at the first record below 0.1 nats and divide its sigma_h "
                    "there by the same head's sigma_h at the first record")
    return None



@functools.lru_cache(maxsize=4)
def _ledger_runs(root: str):
    """The committed runs the ledger reads (``results/claims`` and ``results/cpu-demo``) and the sweep's."""
    from sigma_core.experiments import claims  # noqa: PLC0415

    base = Path(root)
    runs = [r for top in ("results/claims", "results/cpu-demo") if (base / top).exists()
            for r in claims.load_runs(base / top)]
    sweep_dir = base / "results" / "compare-cpu" / "runs"
    return runs, (claims.load_runs(sweep_dir) if sweep_dir.exists() else [])


def _check_6_1(verdict_persist_1, n_unstable_persist_1, flips, root):
    from sigma_core.experiments import claims  # noqa: PLC0415
    from sigma_core.experiments import definitions as defs  # noqa: PLC0415

    runs, sweep = _ledger_runs(str(root))
    ref = claims.verdict_claim1(runs + sweep, dataclasses.replace(defs.DEFAULT, spike_persist=1))
    want = ref["verdict"]
    if _number(n_unstable_persist_1) != ref["numbers"]["unstable"]:
        return ("n_unstable_persist_1 counts the committed runs (ledger, demo and sweep) that have a spike or diverge "
                f"when a single logged step above best + 0.5 nats is a spike, got {n_unstable_persist_1!r}")
    default = claims.verdict_claim1(runs + sweep, defs.DEFAULT)["verdict"]
    if verdict_persist_1 != want:
        return ("verdict_persist_1 is the verdict string (e.g. 'partly reproduced') that the claim-1 rule gives "
                f"when one logged step above best + 0.5 nats already counts as a spike, got {verdict_persist_1!r}")
    if not isinstance(flips, (bool, np.bool_)) or bool(flips) != (want != default):
        return "flips is True when that verdict differs from the one under the default persistence of 3 steps"
    return None


def _check_6_2(baseline_lr, sigma_lr, root):
    from sigma_core.experiments import claims  # noqa: PLC0415
    from sigma_core.experiments.compare import largest_stable_lr  # noqa: PLC0415

    best = largest_stable_lr(claims.sweep_table(_ledger_runs(str(root))[1]))
    for name, method in (("baseline_lr", "baseline"), ("sigma_lr", "sigma-reparam")):
        got, want = {"baseline_lr": baseline_lr, "sigma_lr": sigma_lr}[name], best.get(method)
        if want is None:
            if got is not None:
                return f"{name}: no swept learning rate is stable for every seed of {method}: the answer is None"
        elif not _close(_number(got), want, rtol=1e-9):
            return (f"{name} is the largest learning rate at which every seed of {method} learned (final validation "
                    f"loss 0.05 nats below log 256) and none collapsed or diverged, got {got!r}")
    return None


#: exercise -> (the keywords its check reads, the check); answers first, then what the notebook passes
CHECKS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "1.1": (("allowed_norm", "entropy_at_110"), _check_1_1),
    "1.2": (("z_rand", "norm_needed", "larger"), _check_1_2),
    "2.1": (("first_mu", "centred_there", "instance"), _check_2_1),
    "2.2": (("best_k", "H_best", "H_one_hot"), _check_2_2),
    "3.1": (("predicted_forwards", "measured_forwards", "power_iteration_errors"), _check_3_1),
    "3.2": (("gap_per_step", "widest_step"), _check_3_2),
    "4.1": (("run_dir_lr3e3", "least_entropy_lr3e3"), _check_4_1),
    "4.2": (("low_fraction", "most_collapsed_layer", "runs"), _check_4_2),
    "5.1": (("n_records_checked", "largest_difference", "chosen"), _check_5_1),
    "5.2": (("growth", "chosen"), _check_5_2),
    "6.1": (("verdict_persist_1", "n_unstable_persist_1", "flips", "root"), _check_6_1),
    "6.2": (("baseline_lr", "sigma_lr", "root"), _check_6_2),
}
