"""Typed training configuration and its presets.

One flat dataclass, :class:`TrainConfig`, holds everything a run needs (model shape, optimiser,
data, logging); the ``train`` command maps its flags onto the fields and every run saves the
whole config next to its metrics.  Presets are named starting points:

- ``cpu-smoke``: a tiny model that trains in seconds (used by the tests);
- ``cpu-demo``: the reference CPU setting (d=128, 4 layers, 4 heads, T=128, batch 32) at the
  collapsing learning rate 3e-2, a minute or two per run on two cores;
- ``cpu-compare``: the stabiliser sweep of ``entropy-collapse compare`` on two CPU cores
  (d=64, 2 layers, 4 heads, T=64, batch 16, 200 steps: a few seconds per run);
- ``classroom``: a live demonstration that fits in a lecture (d=64, 2 layers, 4 heads, T=64,
  batch 16, 150 steps at lr 3e-2, entropy logged every 5 steps, one CPU thread, so that the
  numbers do not depend on the machine's core count): with ``reparam="none"`` some head
  ends below 0.1 nats (0.026 on an AVX2 CPU, 0.017 on an AVX-512 one), with ``reparam="sigma"`` every head stays above 1 nat (2.00); about
  11 s of CPU time per run (notebook 04; tests/test_notebooks.py checks it);
- ``classroom-spike``: the classroom model at lr 3e-1 for 80 steps, logged every step, meant for an
  instability demonstration (no notebook trains it).  It does not show the paper's Figure 1 order
  by the rules of :mod:`sigma_core.experiments.definitions`: with ``reparam="none"`` the training
  loss jumps from 5.5 to 18.7 nats in the first four steps (unstable from step 2) while a head's
  entropy falls below 0.1 nats at step 3, so the spike comes first; with ``reparam="sigma"`` no
  head collapses but the instability rule flags a rise of the loss at step 14 (one thread on an
  AMD EPYC; tests/test_course.py checks the order); about 8-9 s of CPU time per run.  The course
  shows Figure 1's order from a committed run instead: notebook 05 ("Reading the committed runs"),
  section 6, reads claim 5's speech baseline ``results/claims/speech/baseline/lr_0.1/seed_0``
  (preset ``speech-digits``, SGD: collapse at step 5, instability at step 10, divergence at step 20)
  beside its sigmaReparam twin;
- ``h200``: the reference GPU setting (d=256, 6 layers, 8 heads, T=256, batch 64, 1000 steps)
  at lr 1e-2, where the baseline collapses and sigmaReparam does not;
- ``vit-digits``: a ViT (d=64, 4 layers, 4 heads, 2x2 patches) on scikit-learn's 8x8 digits with
  the standard recipe (pre-LN, AdamW, 30 warm-up steps, weight decay 0.05, cosine, 300 steps);
- ``vit-digits-sgd``: the same ViT with the paper's harsh recipe: sigmaReparam, no LayerNorm,
  SGD with momentum 0.9, no warm-up, no weight decay (``reparam="none"``: the baseline under it);
- ``seq2seq-reverse``: a post-LN encoder-decoder (6 + 6 layers, d=32) reversing 8 symbols of
  10, SGD with momentum 0.9, no warm-up, constant lr 0.1, 200 steps (``n_layer`` sets the depth);
- ``speech-digits``: a post-LN Transformer encoder with CTC (8 layers, d=64, 80 ms tokens) on
  espeak-ng spoken digit strings (:mod:`sigma_core.experiments.speech`), SGD with momentum 0.9,
  no warm-up, cosine decay, 300 steps;
- ``vit-digits-simclr``: a smaller ViT (d=32, 3 layers, 4 heads, 2x2 patches) trained
  self-supervised on the digits (``model="vit-simclr"``: SimCLR views, NT-Xent, a linear probe on
  the frozen class token at evaluation, :mod:`sigma_core.experiments.ssl_task`), pre-LN, AdamW, no
  warm-up, no weight decay, cosine decay, batch 60, 300 steps;
- ``vit-smoke``, ``seq2seq-smoke``, ``speech-smoke``: the same models at test size (seconds).

Example
-------
>>> cfg = preset("cpu-demo", reparam="sigma")
>>> (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.block_size, cfg.lr, cfg.reparam)
(128, 4, 4, 128, 0.03, 'sigma')
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

MODELS = ("gpt", "vit", "seq2seq", "speech", "vit-simclr")
#: the largest seed (the run's generators are seeded with seed, seed + 1 and seed + 2)
SEED_MAX = 2**63 - 3
NORMS = ("pre", "post", "none")
REPARAMS = ("none", "sigma", "spectral")
GAMMA_INITS = ("sigma", "one")
#: how a run under torchrun spreads the model: "ddp" (replicated, DistributedDataParallel) or
#: "fsdp" (FSDP2 fully_shard per transformer block and at the root); one process ignores it
DISTRIBUTED_MODES = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
SEQ_TASKS = ("reverse", "copy")


#: annotation -> (check, description) for the type check of :meth:`TrainConfig.validate`
_TYPE_CHECKS = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
}
_TYPE_NAMES = {"int": "an integer", "float": "a real number", "str": "a string", "bool": "a bool"}


@dataclass
class TrainConfig:
    """Everything one training run needs.

    Model (``model``): ``"gpt"``, a byte-level causal GPT (``vocab_size`` 256) on the stdlib
    bytes; ``"vit"``, a Vision Transformer on scikit-learn's bundled 8x8 digits (patches of
    ``patch_size`` pixels, a class token, no dropout); ``"seq2seq"``, an encoder-decoder
    Transformer on a synthetic ``seq_task`` (``"reverse"`` or ``"copy"`` a sequence of
    ``block_size`` symbols drawn from ``vocab_size``).  Each has ``n_layer`` blocks (for
    seq2seq: ``n_layer`` encoder and ``n_layer`` decoder blocks) of width ``d_model``, ``n_head``
    heads and normalisation placement ``norm`` (``"pre"``, ``"post"`` or ``"none"``).
    ``reparam`` chooses the weight reparametrisation of every linear layer (and of the ViT's
    patch-embedding convolution): ``"none"``,
    ``"sigma"`` (sigmaReparam, W_hat = gamma/sigma(W) * W, with ``gamma_init`` ``"one"``, as in
    the paper's text and official JAX code, or ``"sigma"``, so that W_hat = W_0 at the start, as
    in the official PyTorch code) or ``"spectral"`` (``torch.nn.utils.parametrizations.spectral_norm``).
    Training defaults to ``gamma_init="one"`` (the layer API :func:`~sigma_core.reparam.sigma_reparam`
    keeps ``"sigma"``): with this model's GPT-2 initialisation (std 0.02, so sigma(W_0) is about
    0.45) ``"sigma"`` starts every attention head near-uniform and, on ``cpu-demo`` (lr 3e-2, 400
    steps), ends at val loss 2.34 with sigma_h 0.26, against 2.20 and sigma_h 0.50 for ``"one"``
    (README, "Choosing gamma_init").
    ``qk_norm`` adds QK-LayerNorm and ``logit_softcap`` > 0 soft-caps the attention logits
    (``c tanh(a / c)``; 0 is off); see :class:`sigma_core.models.gpt.CausalSelfAttention`.
    Optimiser (``optimizer``): ``"adamw"`` with ``betas`` (default (0.9, 0.95)) or ``"sgd"`` with
    ``momentum`` (0: plain SGD); ``weight_decay`` on every parameter (default 0); the learning
    rate rises linearly over ``warmup_steps`` (0: no warm-up) to ``lr`` and then stays
    (``lr_schedule="constant"``, the default) or follows a half cosine to 0 at ``steps``
    (``"cosine"``); ``grad_clip`` 0 disables clipping (the gradient norm is logged either way).
    Runtime: ``checkpoint_every`` steps a checkpoint is written (0: only at the end of the run);
    ``compile`` runs the steps that are not recorded under ``torch.compile`` with the backend
    ``compile_backend`` (``"inductor"``, torch's default, which on the CPU needs a C++ compiler;
    ``"aot_eager"`` traces and runs AOT autograd without generating code).
    Data: ``test_split`` holds out a test split besides the validation split (see
    :mod:`sigma_core.experiments.tasks`), evaluated once, at the last step (``test_loss``,
    ``test_accuracy``), so that a learning rate chosen on validation is reported on unseen data.
    """

    preset: str = "custom"
    # model
    model: str = "gpt"
    vocab_size: int = 256
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    block_size: int = 128
    norm: str = "pre"
    mlp_ratio: int = 4
    reparam: str = "none"
    gamma_init: str = "one"
    qk_norm: bool = False
    logit_softcap: float = 0.0
    patch_size: int = 2
    seq_task: str = "reverse"
    # optimisation
    optimizer: str = "adamw"
    lr: float = 3e-2
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 0.0
    batch_size: int = 32
    steps: int = 200
    seed: int = 0
    # data
    corpus_bytes: int = 8 * 2**20
    val_fraction: float = 0.1
    test_split: bool = False
    # logging and evaluation
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    sample_steps: tuple[int, ...] = field(default_factory=tuple)
    sample_batch: int = 2
    # runtime
    device: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    distributed: str = "ddp"
    threads: int = 0
    progress: bool = True
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.sample_steps = tuple(int(s) for s in self.sample_steps)
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError`` naming the first field of the wrong type (by its annotation: an
        int, a finite real, a str, a bool) and ``ValueError`` naming the first one out of range."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind in _TYPE_CHECKS and not _TYPE_CHECKS[kind](value):
                raise TypeError(f"{f.name} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
            if kind == "float" and not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        positive = ("vocab_size", "d_model", "n_layer", "n_head", "block_size", "mlp_ratio",
                    "batch_size", "steps", "corpus_bytes", "log_every", "eval_every",
                    "eval_batches", "sample_batch")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if self.model == "gpt":
            from sigma_core.experiments.data import CORPUS_SIZE  # noqa: PLC0415

            if self.vocab_size < 256:
                raise ValueError(f"vocab_size must be at least 256 for model 'gpt' (its corpus is bytes), "
                                 f"got {self.vocab_size!r}")
            if self.corpus_bytes > CORPUS_SIZE:
                raise ValueError(f"corpus_bytes must be at most {CORPUS_SIZE} (the shipped corpus), "
                                 f"got {self.corpus_bytes!r}")
            smallest = math.ceil((self.block_size + 2) / min(self.val_fraction, 1 - self.val_fraction)) \
                if 0 < self.val_fraction < 1 else 0
            if self.corpus_bytes < smallest:
                raise ValueError(f"corpus_bytes must be at least {smallest} (training and validation parts "
                                 f"each hold more than block_size + 1 = {self.block_size + 1} bytes), "
                                 f"got {self.corpus_bytes!r}")
        elif self.model == "seq2seq" and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 for model 'seq2seq', got {self.vocab_size!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.seq_task not in SEQ_TASKS:
            raise ValueError(f"seq_task must be one of {SEQ_TASKS}, got {self.seq_task!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0: no warm-up), got {self.warmup_steps!r}")
        if self.patch_size < 1 or 8 % self.patch_size:
            raise ValueError(f"patch_size must divide the 8x8 digits images (1, 2, 4 or 8), got {self.patch_size!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.reparam not in REPARAMS:
            raise ValueError(f"reparam must be one of {REPARAMS}, got {self.reparam!r}")
        if not self.compile_backend:
            raise ValueError("compile_backend must name a torch.compile backend (e.g. 'inductor', 'aot_eager'), "
                             "got ''")
        if self.distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"distributed must be one of {DISTRIBUTED_MODES}, got {self.distributed!r}")
        if self.gamma_init not in GAMMA_INITS:
            raise ValueError(f"gamma_init must be one of {GAMMA_INITS}, got {self.gamma_init!r}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be a bool, got {self.qk_norm!r}")
        if isinstance(self.logit_softcap, bool) or not 0.0 <= self.logit_softcap < float("inf"):
            raise ValueError(f"logit_softcap must be a finite number >= 0 (0: off), got {self.logit_softcap!r}")
        if not (self.lr > 0 and self.lr < float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        if any(s < 1 for s in self.sample_steps):
            raise ValueError(f"sample_steps must be positive step numbers, got {self.sample_steps!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 keeps torch's default), got {self.threads!r}")
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) \
                or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0: only at the end), "
                             f"got {self.checkpoint_every!r}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens processed by one optimiser step, ``batch_size * block_size``."""
        return self.batch_size * self.block_size

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        out["sample_steps"] = list(self.sample_steps)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**data)


PRESETS: dict[str, dict] = {
    "cpu-smoke": dict(d_model=32, n_layer=2, n_head=2, block_size=32, batch_size=8, steps=30,
                      lr=3e-2, corpus_bytes=2**20, log_every=5, eval_every=15, eval_batches=2,
                      sample_steps=(30,), progress=False),
    "cpu-demo": dict(d_model=128, n_layer=4, n_head=4, block_size=128, batch_size=32, steps=400,
                     lr=3e-2, log_every=10, eval_every=50, eval_batches=4,
                     sample_steps=(400,)),
    "cpu-compare": dict(d_model=64, n_layer=2, n_head=4, block_size=64, batch_size=16, steps=200,
                        lr=3e-2, corpus_bytes=2**21, log_every=10, eval_every=100, eval_batches=4,
                        sample_steps=(200,), progress=False),
    "classroom": dict(d_model=64, n_layer=2, n_head=4, block_size=64, batch_size=16, steps=150,
                      lr=3e-2, corpus_bytes=2**21, log_every=5, eval_every=75, eval_batches=4,
                      sample_steps=(150,), checkpoint_every=0, threads=1),
    # the classroom model at ten times its learning rate, logged every step: the baseline's loss spikes in its
    # first steps, before its entropy falls below 0.1 nats (not the order of the paper's Figure 1, which notebook 05,
    # section 6, shows from a committed speech run)
    "classroom-spike": dict(d_model=64, n_layer=2, n_head=4, block_size=64, batch_size=16, steps=80,
                            lr=3e-1, corpus_bytes=2**21, log_every=1, eval_every=40, eval_batches=4,
                            sample_steps=(80,), checkpoint_every=0, threads=1),
    "h200": dict(d_model=256, n_layer=6, n_head=8, block_size=256, batch_size=64, steps=1000,
                 lr=1e-2, log_every=10, eval_every=100, eval_batches=8,
                 sample_steps=(100, 1000), compile=False),
    # ViT on the 8x8 digits: the standard recipe (pre-LN, AdamW, warm-up, weight decay, cosine)
    "vit-digits": dict(model="vit", d_model=64, n_layer=4, n_head=4, patch_size=2, norm="pre",
                       optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05,
                       warmup_steps=30, lr_schedule="cosine", batch_size=64, steps=300,
                       val_fraction=0.2, log_every=5, eval_every=50, sample_batch=8,
                       sample_steps=(300,), progress=False, checkpoint_every=0),
    # ... and the paper's harsh recipe: sigmaReparam, no LayerNorm, SGD (momentum), no warm-up,
    # no weight decay (run it with --reparam none for the baseline under the same recipe)
    "vit-digits-sgd": dict(model="vit", d_model=64, n_layer=4, n_head=4, patch_size=2, norm="none",
                           reparam="sigma", optimizer="sgd", momentum=0.9, lr=0.1, weight_decay=0.0,
                           warmup_steps=0, lr_schedule="cosine", batch_size=64, steps=300,
                           val_fraction=0.2, log_every=5, eval_every=50, sample_batch=8,
                           sample_steps=(300,), progress=False, checkpoint_every=0),
    # deep post-LN encoder-decoder on sequence reversal, SGD with momentum, no warm-up
    "seq2seq-reverse": dict(model="seq2seq", vocab_size=10, block_size=8, d_model=32, n_layer=6,
                            n_head=4, norm="post", optimizer="sgd", momentum=0.9, lr=0.1,
                            warmup_steps=0, batch_size=32, steps=200, eval_batches=8,
                            log_every=4, eval_every=50, sample_batch=4, sample_steps=(200,),
                            progress=False, checkpoint_every=0),
    # deep post-LN CTC encoder on espeak-ng spoken digit strings (log-mel frames), SGD with
    # momentum, no warm-up, cosine decay (sigma_core.experiments.speech)
    "speech-digits": dict(model="speech", vocab_size=11, block_size=34, d_model=64, n_layer=8, n_head=4,
                          norm="post", optimizer="sgd", momentum=0.9, lr=0.1, warmup_steps=0,
                          lr_schedule="cosine", batch_size=32, steps=300, log_every=5, eval_every=100,
                          sample_batch=4, sample_steps=(300,), progress=False, checkpoint_every=0),
    # self-supervised (SimCLR, NT-Xent on two augmented views, linear probe at evaluation) small ViT
    # on the digits, pre-LN, AdamW, no warm-up, no weight decay, cosine (sigma_core.experiments.ssl_task)
    # (block_size records the 17 tokens of an attention row: 16 patches + the class token)
    "vit-digits-simclr": dict(model="vit-simclr", block_size=17, d_model=32, n_layer=3, n_head=4, patch_size=2, norm="pre",
                              optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0,
                              warmup_steps=0, lr_schedule="cosine", batch_size=60, steps=300,
                              val_fraction=0.2, log_every=5, eval_every=100, sample_batch=8,
                              sample_steps=(300,), progress=False, checkpoint_every=0),
    # smoke-size versions for the tests (seconds)
    "vit-smoke": dict(model="vit", d_model=16, n_layer=2, n_head=2, patch_size=4, norm="pre",
                      optimizer="adamw", lr=3e-3, warmup_steps=3, lr_schedule="cosine",
                      weight_decay=0.05, batch_size=16, steps=12, val_fraction=0.2, log_every=3,
                      eval_every=6, sample_batch=4, sample_steps=(12,), progress=False),
    "seq2seq-smoke": dict(model="seq2seq", vocab_size=8, block_size=6, d_model=16, n_layer=2,
                          n_head=2, norm="post", optimizer="sgd", momentum=0.9, lr=0.1, batch_size=8,
                          steps=12, eval_batches=2, log_every=3, eval_every=6, sample_batch=2,
                          sample_steps=(12,), progress=False),
    "speech-smoke": dict(model="speech", vocab_size=11, block_size=34, d_model=16, n_layer=2, n_head=2,
                         norm="post", optimizer="sgd", momentum=0.9, lr=0.1, batch_size=8, steps=6,
                         log_every=3, eval_every=6, sample_batch=2, sample_steps=(6,), progress=False),
}

#: the preset a model starts from when the command line names none
DEFAULT_PRESET = {"gpt": "cpu-demo", "vit": "vit-digits", "seq2seq": "seq2seq-reverse", "speech": "speech-digits",
                  "vit-simclr": "vit-digits-simclr"}


def preset(name: str, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of preset ``name`` with ``overrides`` applied.

    ``sample_steps`` beyond the run's ``steps`` are dropped, and the final step is always
    sampled, so a shortened preset still records the rows the confirmation figure needs.
    """
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    own = PRESETS[name].get("model", "gpt")
    if overrides.get("model", own) != own:
        raise ValueError(f"model={overrides['model']!r} does not fit preset {name!r} (a {own} preset); "
                         f"choose a {overrides['model']} preset, e.g. {DEFAULT_PRESET[overrides['model']]!r}"
                         if overrides["model"] in DEFAULT_PRESET else
                         f"model must be one of {MODELS}, got {overrides['model']!r}")
    values = dict(PRESETS[name], preset=name)
    values.update(overrides)
    steps = values.get("steps", TrainConfig.steps)
    if "sample_steps" not in overrides:
        samples = {s for s in values.get("sample_steps", ()) if s <= steps}
        values["sample_steps"] = tuple(sorted(samples | {steps}))
    return TrainConfig(**values)
