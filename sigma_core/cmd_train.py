"""``entropy-collapse train``: train the GPT on the stdlib bytes and write a run directory.

Flags map onto :class:`~sigma_core.config.TrainConfig`: ``--preset`` picks the starting point
and every other flag overrides one field (``--lr 1e-2 --reparam sigma --steps 400``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from sigma_core.config import GAMMA_INITS, NORMS, PRESETS, REPARAMS, TrainConfig, preset

#: flags that are not plain scalar fields of TrainConfig
_SPECIAL = {"preset", "betas", "sample_steps", "compile", "progress"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (default: the preset's value)."""
    choices = {"norm": NORMS, "reparam": REPARAMS, "gamma_init": GAMMA_INITS}
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SPECIAL:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("int", int):
            kind = int if f.name in ("threads", "seed") else _positive_int
        elif f.type in ("float", float):
            kind = _positive_float if f.name == "lr" else float
        else:
            kind = str
        parser.add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name), default=None,
                            help=f"TrainConfig.{f.name} (preset value by default)")
    parser.add_argument("--sample-steps", dest="sample_steps", type=_positive_int, nargs="+", default=None,
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
        return preset(args.preset, **overrides)
    except ValueError as exc:
        if parser is None:
            raise
        parser.error(str(exc))


def _run(args: argparse.Namespace) -> int:
    from sigma_core.train import Trainer

    cfg = config_from_args(args, args._parser)
    summary = Trainer(cfg, args.out).run()
    print(json.dumps(summary, indent=2))
    print(f"run written to {args.out}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    parser = subparsers.add_parser("train", help="train the GPT (baseline or sigmaReparam) and log entropy",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run directory (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo", help="starting configuration")
    add_config_arguments(parser)
    parser.set_defaults(func=_run, _parser=parser)
    return parser
