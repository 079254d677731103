"""``entropy-collapse train``: train the GPT on the stdlib bytes and write a run directory.

Flags map onto :class:`~sigma_core.experiments.config.TrainConfig`: ``--preset`` picks the starting point
and every other flag overrides one field (``--lr 1e-2 --reparam sigma --steps 400``).

``--resume RUN_DIR`` continues the run in RUN_DIR from its ``checkpoint.pt`` with the config
stored there (only ``--device``, ``--threads``, ``--compile``, ``--progress`` and
``--checkpoint-every`` may be given again).  Under ``torchrun`` the run is data-parallel.

Exit status: 0 when the run finished or diverged (divergence is a result: the message names the
step and ``summary.json`` has ``"diverged": true``); 2 for a bad flag, path or checkpoint
(truncated, corrupted or of another config); 128 + the signal number (130 for SIGINT, 143 for
SIGTERM) when a signal stopped the run after writing its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from sigma_core.cli.argtypes import finite_float, nonnegative_int, positive_float, positive_int
from sigma_core.experiments.config import GAMMA_INITS, NORMS, PRESETS, REPARAMS, TrainConfig, preset

#: flags that are not plain scalar fields of TrainConfig
_SPECIAL = {"preset", "betas", "sample_steps", "compile", "progress"}


def _device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against what this machine has."""
    if text == "auto":
        return text
    import torch  # noqa: PLC0415

    try:
        dev = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"device must be auto, cpu or cuda[:N], got {text!r}")
    return text


def _out_dir(text: str) -> Path:
    """A new or empty run directory (an existing run must be continued with --resume)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    from sigma_core.experiments.train import CHECKPOINT_NAME, METRICS_NAME  # noqa: PLC0415

    if any((path / n).exists() for n in (CHECKPOINT_NAME, METRICS_NAME)):
        raise argparse.ArgumentTypeError(f"{text} already holds a run: continue it with --resume {text} "
                                         f"or choose a new --out")
    return path


def _resume_dir(text: str) -> Path:
    """An existing run directory holding ``checkpoint.pt``."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    from sigma_core.experiments.train import CHECKPOINT_NAME  # noqa: PLC0415

    if not (path / CHECKPOINT_NAME).is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no {CHECKPOINT_NAME}: nothing to resume")
    return path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (default: the preset's value)."""
    choices = {"norm": NORMS, "reparam": REPARAMS, "gamma_init": GAMMA_INITS}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SPECIAL:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "device":
            kind = _device
        elif f.type in ("int", int):
            kind = {"seed": int, "threads": nonnegative_int,
                    "checkpoint_every": nonnegative_int}.get(f.name, positive_int)
        elif f.type in ("float", float):
            kind = positive_float if f.name == "lr" else finite_float
        elif f.type in ("bool", bool):
            kind = None  # boolean fields get --flag/--no-flag below
        else:
            kind = str
        if kind is None:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"TrainConfig.{f.name} (preset value by default)")
            continue
        parser.add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name), default=None,
                            help=f"TrainConfig.{f.name} (preset value by default)")
    parser.add_argument("--sample-steps", dest="sample_steps", type=positive_int, nargs="+", default=None,
                        help="steps at which every attention row of a held-out batch is saved")
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model for the unobserved steps")
    parser.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The preset of ``args.preset`` with every flag given on the command line applied."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "preset" and getattr(args, f.name, None) is not None}
    try:
        return preset(args.preset or "cpu-demo", **overrides)
    except ValueError as exc:
        if parser is None:
            raise
        parser.error(str(exc))


def _resume(args: argparse.Namespace):
    """The :class:`~sigma_core.experiments.train.Trainer` of ``--resume``; bad flags or checkpoints exit 2."""
    from sigma_core.experiments.train import RUNTIME_FIELDS, CheckpointError, Trainer  # noqa: PLC0415

    parser = args._parser
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    fixed = sorted(set(given) - set(RUNTIME_FIELDS))
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        parser.error(f"{flags}: the config of a resumed run comes from its checkpoint; only "
                     + ", ".join("--" + n.replace("_", "-") for n in RUNTIME_FIELDS) + " may be given")
    try:
        return Trainer.resume(args.resume, **given)
    except CheckpointError as exc:
        parser.error(f"--resume {args.resume}: {exc}")


def _run(args: argparse.Namespace) -> int:
    from sigma_core.experiments import distributed  # noqa: PLC0415
    from sigma_core.experiments.train import Trainer, TrainingInterrupted  # noqa: PLC0415

    try:
        if args.resume is not None:
            trainer = _resume(args)
            run_dir = args.resume
        else:
            cfg = config_from_args(args, args._parser)
            trainer = Trainer(cfg, args.out)
            run_dir = args.out
        try:
            summary = trainer.run()
        except TrainingInterrupted as exc:
            if trainer.is_main:
                print(f"entropy-collapse train: {exc}", file=sys.stderr)
            return 128 + exc.signum
        if not trainer.is_main:
            return 0
        print(json.dumps(summary, indent=2))
        if summary["diverged"]:
            print(f"entropy-collapse train: {trainer.diverged}; the run stopped there, the last good "
                  f"checkpoint is kept in {run_dir} and metrics.jsonl ends with a diverged record",
                  file=sys.stderr)
        print(f"run written to {run_dir}")
        return 0
    finally:
        distributed.teardown()


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser("train", help="train the GPT (baseline or sigmaReparam) and log entropy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=_out_dir, help="run directory (created; must not hold a run)")
    where.add_argument("--resume", type=_resume_dir, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="starting configuration (default cpu-demo)")
    add_config_arguments(parser)
    parser.set_defaults(func=_run, _parser=parser)
    return parser
