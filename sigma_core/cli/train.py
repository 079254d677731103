"""``entropy-collapse train``: train one model and write a run folder.

Every flag maps onto one field of :class:`~sigma_core.experiments.config.TrainConfig`; ``--preset``
picks the starting values.  :data:`DESCRIPTION` and :data:`FIELD_HELP` are the plain-text help;
:func:`format_summary` is what a finished run prints (the full numbers stay in ``summary.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from sigma_core.cli.argtypes import finite_float, integer, nonnegative_float, nonnegative_int, positive_float, positive_int
from sigma_core.experiments import config as _config
from sigma_core.experiments.config import GAMMA_INITS, NORMS, PRESETS, REPARAMS, TrainConfig, preset

DESCRIPTION = """\
Train one model and write a run folder: config.json (the whole configuration, git commit,
package versions, corpus SHA-256), metrics.jsonl (loss, per-head attention entropy, sigma_h
and bound violations at every logged step), samples/, summary.json and checkpoint.pt.
At the end it prints a short summary; `entropy-collapse report RUN_DIR` draws the figures.

--preset picks the starting values (the table below); every other flag overrides one of them:
  entropy-collapse train --out runs/base  --preset cpu-demo
  entropy-collapse train --out runs/sigma --preset cpu-demo --reparam sigma
  entropy-collapse train --resume runs/sigma     (continue from its checkpoint)

A resumed run keeps its stored configuration; only --device, --threads, --compile,
--compile-backend, --distributed, --progress and --checkpoint-every may be given again.  Under torchrun the run
is data-parallel and --batch-size is the global batch: --distributed ddp (default) replicates
the model, --distributed fsdp shards it (FSDP2, per transformer block and at the root).

Exit status: 0 when the run finished or diverged (divergence is a result: the message names
the step and summary.json says "diverged": true); 2 for a bad flag, folder or checkpoint;
130 (Ctrl-C) or 143 (SIGTERM) after the checkpoint of an interrupted run is written."""

#: the help line of each TrainConfig field (a field missing here gets a generic line)
FIELD_HELP = {
    "model": "which model: gpt (byte-level GPT on the shipped corpus), vit (ViT on 8x8 digits), "
             "seq2seq (encoder-decoder on a synthetic task), speech (CTC encoder on spoken digits) or "
             "vit-simclr (ViT trained self-supervised on 8x8 digits, SimCLR, scored by a linear probe)",
    "vocab_size": "vocabulary size (256 bytes for the GPT)",
    "d_model": "model width d",
    "n_layer": "number of Transformer blocks",
    "n_head": "attention heads per block (must divide --d-model)",
    "block_size": "sequence length T",
    "norm": "LayerNorm placement: pre, post or none",
    "mlp_ratio": "MLP hidden width as a multiple of d",
    "reparam": "weight reparametrisation of every linear layer: none, sigma (sigmaReparam) or "
               "spectral (torch's spectral_norm)",
    "gamma_init": "sigmaReparam's initial gamma: one (gamma = 1) or sigma (gamma = sigma(W0), "
                  "the layer computes what it did before)",
    "qk_norm": "LayerNorm on each head's queries and keys (QK-LayerNorm)",
    "logit_softcap": "soft-cap the attention logits at c*tanh(a/c); 0 is off",
    "patch_size": "ViT patch size in pixels (1, 2, 4 or 8)",
    "seq_task": "seq2seq task: reverse or copy",
    "optimizer": "adamw or sgd",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay on every parameter",
    "warmup_steps": "linear warm-up steps (0: none)",
    "lr_schedule": "constant or cosine (to 0 at the last step)",
    "grad_clip": "clip the gradient norm at this value; 0 is off",
    "batch_size": "sequences per step (the global batch under torchrun)",
    "steps": "optimiser steps",
    "seed": "random seed (weights and data order)",
    "corpus_bytes": "bytes of the shipped corpus to use (at most 8388608)",
    "val_fraction": "fraction of the data held out for the validation loss",
    "test_split": "also hold out a test split, evaluated at the last step (test_loss, test_accuracy)",
    "log_every": "record entropy and metrics every N steps",
    "eval_every": "validation loss every N steps",
    "eval_batches": "batches per validation loss",
    "sample_batch": "sequences whose every attention row is saved at --sample-steps",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "torch CPU threads; 0 keeps torch's default",
    "distributed": "under torchrun: ddp (replicate the model, DistributedDataParallel) or fsdp "
                   "(shard it with FSDP2 fully_shard per block and at the root)",
    "checkpoint_every": "write checkpoint.pt every N steps; 0: only at the end",
    "compile_backend": "torch.compile backend of --compile: inductor (generates C++ on the CPU, needs "
                       "a C++ compiler) or aot_eager (no code generation, compiles in seconds)",
}

#: help sections, in order; fields not listed go to the last one
_GROUPS = (
    ("model", ("model", "vocab_size", "d_model", "n_layer", "n_head", "block_size", "norm",
               "mlp_ratio", "reparam", "gamma_init", "qk_norm", "logit_softcap", "patch_size", "seq_task")),
    ("optimisation", ("optimizer", "lr", "momentum", "weight_decay", "warmup_steps", "lr_schedule",
                      "grad_clip", "batch_size", "steps", "seed")),
    ("data and logging", ("corpus_bytes", "val_fraction", "test_split", "log_every", "eval_every", "eval_batches",
                          "sample_steps", "sample_batch")),
    ("runtime", ()),
)

#: the preset whose value a flag's help shows: the model's default preset
_SHOWN_PRESET = {"patch_size": "vit-digits", "seq_task": "seq2seq-reverse", "momentum": "vit-digits-sgd"}


#: the placeholder a flag's value shows in the help
_METAVARS = {"lr": "LR", "device": "DEVICE", "model": "NAME", "compile_backend": "NAME", "optimizer": "NAME", "lr_schedule": "NAME",
             "seq_task": "NAME", integer: "N", positive_int: "N", nonnegative_int: "N", str: "TEXT"}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _preset_value(name: str) -> str:
    where = _SHOWN_PRESET.get(name, "cpu-demo")
    if where not in PRESETS:
        where = "cpu-demo"
    return f"{where}: {_shown(getattr(preset(where), name))}"


def preset_table() -> str:
    """The presets' main values as a plain-text table (the epilog of ``train --help``)."""
    cols = ("model", "d_model", "n_layer", "n_head", "block_size", "batch_size", "steps", "lr", "reparam")
    head = ("preset", "model", "d", "layers", "heads", "T", "batch", "steps", "lr", "reparam")
    if not hasattr(TrainConfig, "model"):  # a config with one model only
        cols, head = cols[1:], head[:1] + head[2:]
    rows = [head]
    for name in PRESETS:
        cfg = preset(name)
        values = [_shown(getattr(cfg, c, "")) for c in cols]
        if getattr(cfg, "model", "gpt") == "vit":
            values[cols.index("block_size")] = "-"  # images: T comes from the patch size
        rows.append((name, *values))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    notes = ("cpu-smoke: seconds (the tests).  cpu-demo: what `demo` trains on a CPU; at lr 3e-2 the\n"
             "baseline collapses.  cpu-compare: one run of the `compare` sweep.  classroom: a\n"
             "baseline/sigmaReparam pair in under a minute.  h200: what `demo` trains on a GPU.")
    return "presets (flags override any value):\n  " + "\n  ".join(lines) + "\n" + notes


def flag_of(field_name: str) -> str:
    """``weight_decay`` -> ``--weight-decay``."""
    return "--" + field_name.replace("_", "-")


def flags_in_message(message: str) -> str:
    """A config error message with the TrainConfig field names it is about written as flags.

    >>> flags_in_message("d_model (30) must be divisible by n_head (4)")
    '--d-model (30) must be divisible by --n-head (4)'
    >>> flags_in_message("lr=0.5 does not fit preset 'cpu-demo' (a gpt preset)")
    "--lr=0.5 does not fit preset 'cpu-demo' (a gpt preset)"
    """
    names = sorted((f.name for f in dataclasses.fields(TrainConfig)), key=len, reverse=True)
    # only where the name is the subject of the sentence ("lr must ...", "d_model (30) ...",
    # "model='vit' ..."), not inside prose ("a gpt preset")
    return re.sub(r"(?<![-\w'])(" + "|".join(names) + r")(?= must| \(|=)", lambda m: flag_of(m.group(1)), message)

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
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty folder name would train into the current directory")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    from sigma_core.experiments.train import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, SUMMARY_NAME  # noqa: PLC0415

    if (path / CHECKPOINT_NAME).exists():
        raise argparse.ArgumentTypeError(f"{text} already holds a run: continue it with --resume {text} "
                                         f"or choose a new --out")
    if (path / METRICS_NAME).exists() or (path / CONFIG_NAME).exists():
        raise argparse.ArgumentTypeError(f"{text} already holds a run that stopped before its first "
                                         f"checkpoint: start it again with --restart {text}, or choose a new --out")
    taken = [n for n in (SUMMARY_NAME, "samples") if (path / n).exists() or (path / n).is_symlink()]
    if taken:
        raise argparse.ArgumentTypeError(f"{text} holds {', '.join(taken)}, which a run would overwrite: "
                                         f"choose a new --out")
    return path


def _resume_dir(text: str) -> Path:
    """An existing run directory holding ``checkpoint.pt``."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    from sigma_core.experiments.train import CHECKPOINT_NAME, CONFIG_NAME  # noqa: PLC0415

    if not (path / CHECKPOINT_NAME).is_file():
        if (path / CONFIG_NAME).is_file():
            raise argparse.ArgumentTypeError(f"{text} holds no {CHECKPOINT_NAME}: the run stopped before its "
                                             f"first checkpoint; start it again with --restart {text}")
        raise argparse.ArgumentTypeError(f"{text} holds no {CHECKPOINT_NAME}: nothing to resume")
    return path


def _restart_dir(text: str) -> Path:
    """A run directory whose run stopped before its first checkpoint (it has a config.json and no
    checkpoint.pt): the run is started again from step 0 with the config in its config.json."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    from sigma_core.experiments.train import CHECKPOINT_NAME, CONFIG_NAME  # noqa: PLC0415

    if (path / CHECKPOINT_NAME).exists():
        raise argparse.ArgumentTypeError(f"{text} holds a {CHECKPOINT_NAME}: continue it with --resume {text}")
    if not (path / CONFIG_NAME).is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no {CONFIG_NAME} of a run to start again")
    return path


def _restart(args: argparse.Namespace):
    """The fresh :class:`~sigma_core.experiments.train.Trainer` of ``--restart``: the config of the
    folder's config.json (runtime flags may change), the files the stopped run wrote removed."""
    from sigma_core.experiments.train import (CONFIG_NAME, METRICS_NAME, RUNTIME_FIELDS, SUMMARY_NAME,  # noqa: PLC0415
                                              Trainer)

    parser, run_dir = args._parser, args.restart
    try:
        stored = json.loads((run_dir / CONFIG_NAME).read_text())
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        given = {n: getattr(args, n) for n in RUNTIME_FIELDS if getattr(args, n, None) is not None}
        cfg = TrainConfig.from_dict({**{k: v for k, v in stored.items() if k in names}, **given})
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        parser.error(f"--restart {run_dir}: its {CONFIG_NAME} does not hold a usable run config ({exc})")
    for name in (METRICS_NAME, SUMMARY_NAME):
        (run_dir / name).unlink(missing_ok=True)
    for sample in (run_dir / "samples").glob("step_*.npz") if (run_dir / "samples").is_dir() else ():
        sample.unlink()
    return Trainer(cfg, run_dir, allow_dirty=args.allow_dirty)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (default: the preset's value), in sections."""
    choices = {"norm": NORMS, "reparam": REPARAMS, "gamma_init": GAMMA_INITS,
               "distributed": getattr(_config, "DISTRIBUTED_MODES", ("ddp",))}
    for name, attr in (("model", "MODELS"), ("optimizer", "OPTIMIZERS"), ("lr_schedule", "LR_SCHEDULES"),
                       ("seq_task", "SEQ_TASKS")):
        if hasattr(_config, attr):
            choices[name] = getattr(_config, attr)
    groups = {title: parser.add_argument_group(title) for title, _ in _GROUPS}
    group_of = {name: groups[title] for title, names in _GROUPS for name in names}
    runtime = groups[_GROUPS[-1][0]]
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SPECIAL:
            continue
        flag = flag_of(f.name)
        where = group_of.get(f.name, runtime)
        text = FIELD_HELP.get(f.name, f"the config field {f.name}")
        if f.name == "device":
            kind = _device
        elif f.type in ("int", int):
            kind = {"seed": integer, "threads": nonnegative_int, "warmup_steps": nonnegative_int,
                    "checkpoint_every": nonnegative_int}.get(f.name, positive_int)
        elif f.type in ("float", float):
            kind = positive_float if f.name == "lr" else finite_float
        elif f.type in ("bool", bool):
            kind = None  # boolean fields get --flag/--no-flag below
        else:
            kind = str
        shown = f" ({_preset_value(f.name)})" if f.name != "device" else " (default: auto, CUDA when available)"
        if kind is None:
            where.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text + shown)
            continue
        where.add_argument(flag, dest=f.name, type=kind, choices=choices.get(f.name), default=None,
                           metavar=None if f.name in choices else _METAVARS.get(f.name, _METAVARS.get(kind, "X")),
                           help=text + shown)
    groups["data and logging"].add_argument(
        "--sample-steps", dest="sample_steps", type=positive_int, nargs="+", default=None, metavar="STEP",
        help="steps at which every attention row of a held-out batch is saved; the last step "
             "always is (cpu-demo: 400)")
    runtime.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the model for the steps that are not recorded (default off)")
    runtime.add_argument("--progress", dest="progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar (default: on when the output is a terminal)")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """The preset of ``args.preset`` with every flag given on the command line applied."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name != "preset" and getattr(args, f.name, None) is not None}
    try:
        default = getattr(_config, "DEFAULT_PRESET", {}).get(overrides.get("model", "gpt"), "cpu-demo")
        return preset(args.preset or default, **overrides)
    except (TypeError, ValueError) as exc:
        if parser is None:
            raise
        parser.error(flags_in_message(str(exc)).replace("name must be one of", "--preset must be one of"))


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
        return Trainer.resume(args.resume, allow_dirty=args.allow_dirty, **given)
    except CheckpointError as exc:
        parser.error(f"--resume {args.resume}: {exc}")


def _run(args: argparse.Namespace) -> int:
    from sigma_core.experiments import distributed  # noqa: PLC0415
    from sigma_core.experiments.train import (CompileBackendError, DirtyTreeError, RunFolderError,  # noqa: PLC0415
                                              TooLargeError, Trainer, TrainingInterrupted)

    if args.progress is None:
        args.progress = sys.stderr.isatty()  # the bar (tqdm) writes to stderr
    if args.tensorboard is not None:
        try:
            import tensorboard  # noqa: F401, PLC0415
        except ImportError:
            args._parser.error("--tensorboard needs the tensorboard package: pip install 'entropy-collapse[tensorboard]'")
    try:
        if args.resume is not None:
            trainer = _resume(args)
            run_dir = args.resume
            if trainer.finished:
                print(f"entropy-collapse train: {run_dir} is a finished run ({trainer.step} of "
                      f"{trainer.cfg.steps} steps); nothing changed", file=sys.stderr)
        elif args.restart is not None:
            trainer = _restart(args)
            run_dir = args.restart
        else:
            cfg = config_from_args(args, args._parser)
            try:
                trainer = Trainer(cfg, args.out, allow_dirty=args.allow_dirty)
            except DirtyTreeError as exc:
                args._parser.error(f"--out {args.out}: {exc}")
            except TooLargeError as exc:
                args._parser.error(flags_in_message(str(exc)))
            run_dir = args.out
        trainer.stop_timeout = args.stop_timeout
        trainer.exit_when_stuck = True  # a step stuck in one long operation must not outlive the signal
        trainer.tensorboard = args.tensorboard
        try:
            summary = trainer.run()
        except TrainingInterrupted as exc:  # TrainingAborted too: the step was abandoned
            if trainer.is_main:
                print(f"entropy-collapse train: {exc}", file=sys.stderr)
            return 128 + exc.signum
        except RunFolderError as exc:
            args._parser.error(str(exc))
        except OSError as exc:  # a full disk, a read-only folder: say so, never a traceback
            print(f"entropy-collapse train: cannot write the run folder {run_dir}: {exc.strerror or exc}"
                  f"{f' ({exc.filename})' if exc.filename else ''}; the last checkpoint written, if any, "
                  f"is intact", file=sys.stderr)
            return 1
        if not trainer.is_main:
            return 0
        print(format_summary(summary, run_dir))
        if summary["diverged"]:
            print(f"entropy-collapse train: {trainer.diverged}; the run stopped there, the last good "
                  f"checkpoint is kept in {run_dir} and metrics.jsonl ends with a diverged record",
                  file=sys.stderr)
        return 0
    except CompileBackendError as exc:  # (raised by the Trainer, before anything is built or run)
        args._parser.error(flags_in_message(str(exc)))
    finally:
        distributed.teardown()


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_summary(summary: dict, run_dir) -> str:
    """The few lines ``train`` prints at the end; the full numbers are in ``run_dir/summary.json``.

    >>> print(format_summary({"steps": 400, "diverged": False, "final_train_loss": 2.0312,
    ...     "final_val_loss": 2.2, "entropy_mean": 2.51, "entropy_min_head": 1.4801, "sigma_max": 0.5,
    ...     "bound_violations": 0, "train_time_s": 133.2, "tokens_per_s": 12299.6}, "runs/sigma"))
    finished 400 steps in 2 min 13 s (12 300 tokens/s)
      loss              train 2.031, validation 2.200
      attention entropy mean 2.51 nats, lowest head 1.48 nats
      largest sigma_h   0.5
      bound violations  0
      run folder        runs/sigma  (summary.json holds every number)
      figures           entropy-collapse report runs/sigma
    """
    steps = summary.get("steps")
    head = (f"stopped by divergence at step {summary.get('diverged_step')}" if summary.get("diverged")
            else f"finished {steps} steps")
    speed = summary.get("tokens_per_s")
    lines = [f"{head} in {_duration(summary.get('train_time_s') or 0.0)}"
             + (f" ({speed:,.0f} tokens/s)".replace(",", " ") if speed else "")]
    loss = f"train {_num(summary.get('final_train_loss'), '.3f')}"
    if summary.get("final_val_loss") is not None:
        loss += f", validation {summary['final_val_loss']:.3f}"
    if summary.get("final_val_accuracy") is not None:
        loss += f", validation accuracy {summary['final_val_accuracy']:.1%}"
    lines.append(f"  loss              {loss}")
    lines.append(f"  attention entropy mean {_num(summary.get('entropy_mean'), '.3g')} nats, lowest head "
                 f"{_num(summary.get('entropy_min_head'), '.3g')} nats")
    lines.append(f"  largest sigma_h   {_num(summary.get('sigma_max'), '.3g')}")
    lines.append(f"  bound violations  {summary.get('bound_violations')}")
    if summary.get("mfu") is not None:
        lines.append(f"  MFU               {summary['mfu']:.1%}")
    lines.append(f"  run folder        {run_dir}  (summary.json holds every number)")
    lines.append(f"  figures           entropy-collapse report {run_dir}")
    return "\n".join(lines)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command."""
    from sigma_core.cli import HelpFormatter  # noqa: PLC0415

    parser = subparsers.add_parser(
        "train", help="train one model; record each head's attention entropy, sigma_h and the bound",
        description=DESCRIPTION, epilog=preset_table(), formatter_class=HelpFormatter,
        usage="entropy-collapse train (--out RUN_DIR | --resume RUN_DIR | --restart RUN_DIR) [--preset NAME] [options]")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=_out_dir, metavar="RUN_DIR",
                       help="new run folder (created; must not hold a run)")
    where.add_argument("--resume", type=_resume_dir, metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its checkpoint")
    where.add_argument("--restart", type=_restart_dir, metavar="RUN_DIR",
                       help="start again from step 0 the run in RUN_DIR that stopped before its first "
                            "checkpoint (its config.json; its metrics, summary and samples are replaced)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                        help="starting values, one of: " + ", ".join(PRESETS) + " (default cpu-demo; with "
                             "--model vit or seq2seq: vit-digits or seq2seq-reverse)")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write into the checkout's results/ even when tracked files differ from the "
                             "commit (the run is marked git_dirty; refused otherwise)")
    parser.add_argument("--stop-timeout", type=nonnegative_float, default=10.0, metavar="S",
                        help="after SIGINT/SIGTERM the step in progress is finished and the checkpoint "
                             "written; a step not done S seconds after the signal is abandoned instead "
                             "(the last checkpoint stays as it was; default 10)")
    parser.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                        help="also write each logged step's per-head entropy, sigma_h, bound margins, violations "
                             "and losses, and a layer x head entropy heatmap every 10th logged step, as "
                             "TensorBoard event files in DIR (needs the tensorboard package)")
    add_config_arguments(parser)
    parser.set_defaults(func=_run, _parser=parser)
    return parser
