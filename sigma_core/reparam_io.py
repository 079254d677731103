"""Save and load a model converted with σReparam, keys unchanged (safetensors + a JSON index).

For a Hugging Face model converted as a whole, ``convert_to_sigma_reparam`` also gives that
instance a ``save_pretrained`` that writes the folded model (read by ``from_pretrained`` of the
plain class) plus its σReparam state, and a load_state_dict pre-hook that maps the legacy key
names transformers 5 writes back to the model's own and, when transformers' Trainer loads a
checkpoint directory (``resume_from_checkpoint``, ``load_best_model_at_end``), restores the exact
σReparam state from that directory instead of the folded weights.  σReparam registered by hand
on a Hugging Face model makes transformers' own ``save_pretrained`` raise, saying what to do
(docs/reparam.md, "Saving and loading").
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1
STATE_FILE = "sigma_reparam.safetensors"  # what a converted model's save_pretrained writes beside its weights
FOLDED_DIGESTS = "folded_sha256"  # index entry: {plain key: SHA-256 of the folded weight save_pretrained wrote}


def _index_path(path) -> Path:
    return Path(os.fspath(path) + ".json")


def _sigma_options(model: nn.Module) -> dict[str, dict]:
    from .reparam import _sigma_modules

    opts = {}
    for qualname, _module, name, p in _sigma_modules(model):
        key = f"{qualname}.{name}" if qualname else name
        opts[key] = {"n_chunks": p.n_chunks, "dim": p.dim, "n_power_iterations": p.n_power_iterations,
                     "eps": p.eps}
    return opts


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_sigma_reparam(model: nn.Module, path) -> Path:
    """Write ``model``'s state_dict (σReparam's raw weights, γ, ``_u``, ``_v`` included) to ``path``.

    The tensors go to a safetensors file (``safetensors.torch.save_model``: a tensor shared by
    tied weights is written once), with the model's own keys: unlike ``save_pretrained``,
    which renames keys to legacy names on some Hugging Face models, nothing is rewritten.  Beside
    it, ``path + ".json"`` holds the format version, the model class, the options of every
    σReparam weight and every key with its shape.  Read it back with :func:`load_sigma_reparam`.

    Parameters
    ----------
    model : nn.Module
        Usually converted by ``convert_to_sigma_reparam``.
    path : str or os.PathLike
        The safetensors file to write.

    Returns
    -------
    pathlib.Path
        The JSON index written beside ``path``.

    Examples
    --------
    >>> import tempfile, os
    >>> from sigma_core.reparam import convert_to_sigma_reparam
    >>> net = convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3)))
    >>> d = tempfile.mkdtemp()
    >>> save_sigma_reparam(net, os.path.join(d, "net.safetensors")).name
    'net.safetensors.json'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return _write_state(model, path, {})


def _write_state(model: nn.Module, path, extra: dict) -> Path:
    from safetensors.torch import save_model

    index = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sigma_reparam": _sigma_options(model),
        "keys": _shapes(model),
        **extra,
    }
    save_model(model, os.fspath(path), metadata={"format": "pt", "sigma_reparam_format": str(FORMAT_VERSION)},
               force_contiguous=True)
    out = _index_path(path)
    out.write_text(json.dumps(index, indent=1))
    return out


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def load_sigma_reparam(model: nn.Module, path) -> nn.Module:
    """Load a file of :func:`save_sigma_reparam` into ``model``, strictly, in place.

    ``model`` must have been built and converted the same way as the saved one (call
    ``convert_to_sigma_reparam`` with the same options first).  Keys, shapes and the
    options of every σReparam weight are compared with the JSON index before anything is
    loaded; a difference raises a ``ValueError`` naming the first differing keys.  Then every
    tensor is loaded (``safetensors.torch.load_model``, strict; tied weights restored).

    Parameters
    ----------
    model : nn.Module
        The freshly converted model to fill.
    path : str or os.PathLike
        The safetensors file written by :func:`save_sigma_reparam`, or a directory written by
        the ``save_pretrained`` of a converted Hugging Face model (its ``sigma_reparam.safetensors``).

    Returns
    -------
    nn.Module
        ``model``.

    Examples
    --------
    >>> import tempfile, os
    >>> from sigma_core.reparam import convert_to_sigma_reparam
    >>> f = os.path.join(tempfile.mkdtemp(), "net.safetensors")
    >>> _ = save_sigma_reparam(convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3))), f)
    >>> net = load_sigma_reparam(convert_to_sigma_reparam(nn.Sequential(nn.Linear(3, 3))), f)
    >>> try:
    ...     load_sigma_reparam(nn.Sequential(nn.Linear(3, 3)), f)  # not converted
    ... except ValueError as e:
    ...     print(str(e).split(": ")[-1].split(",")[0])
    0.weight
    """
    from safetensors.torch import load_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if Path(path).is_dir():
        path = Path(path) / STATE_FILE
    index_file = _index_path(path)
    if not Path(path).is_file() or not index_file.is_file():
        raise ValueError(f"path: {os.fspath(path)!r} and its index {str(index_file)!r} must both exist "
                         f"(written by save_sigma_reparam)")
    index = json.loads(index_file.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"path: format_version {index.get('format_version')!r} is not {FORMAT_VERSION}")
    problems = _mismatch(index, model)
    if problems:
        raise ValueError("path: the file does not match model (convert it as the saved model was "
                         "converted): " + "; ".join(problems))
    with torch.no_grad():
        load_model(model, os.fspath(path), strict=True)
    return model


def _mismatch(index: dict, model: nn.Module) -> list[str]:
    """What differs between a saved index and ``model``: keys, shapes, sigmaReparam options."""
    saved, here = index["keys"], _shapes(model)
    problems = []
    if set(saved) - set(here):
        problems.append(f"keys missing from model: {_first(set(saved) - set(here))}")
    if set(here) - set(saved):
        problems.append(f"keys of model not in the file: {_first(set(here) - set(saved))}")
    shape = [k for k in saved if k in here and saved[k] != here[k]]
    if shape:
        problems.append("shapes differ: " + ", ".join(f"{k} {tuple(saved[k])} in the file, {tuple(here[k])} "
                                                      f"in model" for k in shape[:5]))
    opts_saved, opts_here = index.get("sigma_reparam", {}), _sigma_options(model)
    opts = [k for k in opts_saved if k in opts_here and opts_saved[k] != opts_here[k]]
    if opts:
        problems.append("sigmaReparam options differ: " + ", ".join(
            f"{k} {opts_saved[k]} in the file, {opts_here[k]} in model" for k in opts[:5]))
    return problems


# -- Hugging Face: save_pretrained / from_pretrained / load_state_dict of a converted model ---------
def _is_hf_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def install_hf_io(model: nn.Module) -> None:
    """Called by ``convert_to_sigma_reparam`` on a Hugging Face model: give this instance (not
    its class, nothing global) a ``save_pretrained`` that writes a checkpoint ``from_pretrained``
    reads correctly, and a load_state_dict pre-hook that maps transformers' legacy key names
    back to the model's own.  Idempotent."""
    if not _is_hf_model(model):
        return
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    if not model.__dict__.get("_sigma_legacy_hook"):
        model.register_load_state_dict_pre_hook(_legacy_keys_pre_hook)
        model.__dict__["_sigma_legacy_hook"] = True


def uninstall_hf_io(model: nn.Module) -> None:
    """Called by ``fold_sigma_reparam``: a folded model is plain and saves as one."""
    m = model.__dict__.get("save_pretrained")
    if isinstance(m, types.MethodType) and m.__func__ is _save_pretrained:
        del model.__dict__["save_pretrained"]


def _save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
    """``save_pretrained`` of a model converted by ``convert_to_sigma_reparam``.

    Writes (1) the folded model (every σReparam weight replaced by its Ŵ, as an eval forward
    computes it) with transformers' own ``save_pretrained``, so that ``from_pretrained`` of the
    plain class gives the converted model's eval function, and (2) the full σReparam state
    (raw weights, γ, ``_u``, ``_v``, under the model's own keys) with :func:`save_sigma_reparam`
    to ``sigma_reparam.safetensors`` in the same directory, to resume training with
    ``load_sigma_reparam(convert_to_sigma_reparam(model), save_directory)``.  ``config.json``
    records ``"sigma_reparam"``; the index of (2) also holds a SHA-256 digest of every folded
    weight written in (1), so that a Trainer resuming from the directory can tell that the two
    files belong together (:func:`_restore_exactly`).  Saving copies the model once.
    """
    from .reparam import _sigma_modules, fold_sigma_reparam

    cls_save = type(self).save_pretrained
    if args:
        raise TypeError("save_pretrained of a sigmaReparam model: pass its options by keyword "
                        "(save_pretrained(save_directory, is_main_process=..., ...))")
    if not any(True for _ in _sigma_modules(self)):  # sigmaReparam removed by hand: a plain model
        return cls_save(self, save_directory, state_dict=state_dict, **kwargs)
    if kwargs.get("save_original_format") is False:
        raise ValueError("save_original_format: False is not supported for a sigmaReparam model "
                         "(it writes the folded model in transformers' format); use "
                         "save_sigma_reparam(model, path) for the model's own keys")
    source = self
    if state_dict is not None:  # e.g. the Trainer passes model.state_dict(): save those values
        mine = set(self.state_dict())
        if set(state_dict) != mine:
            raise ValueError(
                "state_dict: its keys are not this sigmaReparam model's keys (missing: "
                f"{_first(mine - set(state_dict))}; extra: {_first(set(state_dict) - mine)}); pass "
                "the model's own state_dict or none")
        source = copy.deepcopy(self)
        source.load_state_dict(state_dict)
    folded = fold_sigma_reparam(copy.deepcopy(source))
    folded.config.sigma_reparam = {"format_version": FORMAT_VERSION, "weights": "folded",
                                   "state_file": STATE_FILE}
    os.makedirs(save_directory, exist_ok=True)
    if kwargs.get("is_main_process", True):
        plain = folded.state_dict()
        digests = {key: _digest(plain[key]) for key in _sigma_keys(source)}
        _write_state(source, Path(save_directory) / STATE_FILE, {FOLDED_DIGESTS: digests})
    return cls_save(folded, save_directory, **kwargs)


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (as safetensors stores them)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)} ".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sigma_keys(model: nn.Module) -> dict[str, list[str]]:
    """{plain key of each σReparam weight (``a.b.weight``): its keys in ``model``'s state_dict
    (``a.b.parametrizations.weight.original``, ``...0.gamma``, ``...0._u``, ``...0._v``)}."""
    from .reparam import _sigma_modules

    out = {}
    for qualname, _module, name, _p in _sigma_modules(model):
        head = f"{qualname}." if qualname else ""
        base = f"{head}parametrizations.{name}."
        out[head + name] = [base + "original"] + [f"{base}0.{k}" for k in ("gamma", "_u", "_v")]
    return out


def _legacy_names(model: nn.Module) -> dict[str, str]:
    """{name transformers writes on save: the model's own name}, for each key the model has and,
    for a σReparam weight, its plain ``...weight`` too (one call of transformers' own
    ``revert_weight_conversion``; renamed keys only, a converted (merged/split) key is left out)."""
    from transformers.core_model_loading import revert_weight_conversion

    from .reparam import _sigma_modules

    own = dict(model.state_dict())
    for qualname, module, name, p in _sigma_modules(model):
        own[f"{qualname}.{name}" if qualname else name] = module.parametrizations[name].original.detach()
    views = {k: v.view_as(v) for k, v in own.items()}  # one distinct object per key (ties share a tensor)
    by_id = {id(v): k for k, v in views.items()}
    out = revert_weight_conversion(model, views)
    return {new: by_id[id(v)] for new, v in out.items() if id(v) in by_id and by_id[id(v)] != new}


def _legacy_keys_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """Load-state-dict pre-hook of a converted Hugging Face model: keys under the legacy names
    that transformers 5's ``save_pretrained`` writes (GPT-NeoX ``embed_out``, ViT
    ``encoder.layer.0.attention.attention.key``, σReparam keys included) are renamed to the
    model's own before anything loads, strict or not.  Plain ``...weight`` keys for σReparam
    weights (a folded save) then load as pretrained weights do (γ = σ(W)), except when
    transformers' Trainer is loading a checkpoint directory (``resume_from_checkpoint``,
    ``load_best_model_at_end``, a sharded checkpoint): there the exact σReparam state comes from
    the directory's ``sigma_reparam.safetensors`` (:func:`_restore_exactly`)."""
    own = set(module.state_dict())
    unknown = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own]
    if unknown:
        names = _legacy_names_cached(module, own)
        for k in unknown:
            new = names.get(k[len(prefix):])
            if new is not None and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(k)
    groups = _sigma_keys(module)
    folded = [k for k, ks in groups.items() if prefix + k in state_dict and prefix + ks[0] not in state_dict]
    if folded:
        found = _checkpoint_being_loaded()
        if found is not None:
            _restore_exactly(module, state_dict, prefix, groups, folded, *found)


def _legacy_names_cached(module: nn.Module, own: set) -> dict[str, str]:
    cache = module.__dict__.get("_sigma_legacy_names")
    if cache is None or cache[0] != own:
        cache = (own, _legacy_names(module))
        module.__dict__["_sigma_legacy_names"] = cache
    return cache[1]


#: transformers functions that load a checkpoint directory into the model with load_state_dict,
#: and where they keep the directory: {function name: local variable, or None for
#: ``self.state.best_model_checkpoint``}; the first is the one that loads shard by shard
_CHECKPOINT_LOADERS = {"load_sharded_checkpoint": "folder", "_load_from_checkpoint": "resume_from_checkpoint",
                       "_load_best_model": None}


def _checkpoint_being_loaded():
    """``(directory, sharded)`` of the checkpoint that transformers' Trainer is loading into the
    model, read from the call stack (transformers passes load_state_dict the tensors, never the
    directory); None outside such a load.  A Trainer method not in :data:`_CHECKPOINT_LOADERS`
    that loads a folded save into a converted model raises (a renamed method in a later
    transformers must not bring the silent, inexact resume back)."""
    trainer_cls = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_name
        if f.f_globals.get("__name__", "").startswith("transformers.") and name in _CHECKPOINT_LOADERS:
            where = _CHECKPOINT_LOADERS[name]
            directory = (f.f_locals.get(where) if where else
                         getattr(getattr(f.f_locals.get("self"), "state", None), "best_model_checkpoint", None))
            if isinstance(directory, (str, os.PathLike)):
                return Path(directory), name == "load_sharded_checkpoint"
        if trainer_cls is not None and "load" in name and isinstance(f.f_locals.get("self"), trainer_cls):
            raise RuntimeError(
                f"{type(f.f_locals['self']).__name__}.{name} loads the folded weights of a saved "
                "sigmaReparam model into a converted model from a checkpoint directory sigma_core does "
                "not know how to find: gamma and the raw weights would restart from the folded ones "
                "(an inexact resume).  Load the exact state with load_sigma_reparam(model, "
                "checkpoint_dir) instead (docs/reparam.md, 'Saving and loading')")
        f = f.f_back
    return None


def _restore_exactly(module: nn.Module, state_dict, prefix: str, groups: dict[str, list[str]],
                     folded: list[str], directory: Path, sharded: bool) -> None:
    """Replace the folded weights ``folded`` (plain keys, renamed) of ``state_dict``, read from
    the checkpoint ``directory``, by the exact σReparam state (raw weight, γ, ``_u``, ``_v``)
    that the converted model's ``save_pretrained`` wrote beside them to ``sigma_reparam.safetensors``.

    A folded weight must have the SHA-256 that file's index recorded for it (else the two files
    come from different saves: refused by name); the options, keys and shapes of the index must
    match ``module`` (else refused, as :func:`load_sigma_reparam` refuses them).  A directory
    without that file loads as pretrained weights do, unless its ``config.json`` says it was
    written by a converted model (then refused: the σReparam state is lost).  σReparam weights
    that the checkpoint holds under no name this model maps back (transformers merged or split
    them on save) are restored too, so that none is left as it was."""
    from safetensors import safe_open

    state = directory / STATE_FILE
    if not state.is_file() or not _index_path(state).is_file():
        config = directory / "config.json"
        if config.is_file() and "sigma_reparam" in json.loads(config.read_text()):
            raise RuntimeError(
                f"{os.fspath(directory)!r} was saved by a sigmaReparam model but holds no {STATE_FILE} "
                f"(+ .json): its model.safetensors has the folded weights only, and loading them would "
                f"restart gamma and the raw weights (an inexact resume).  Restore that file, or load the "
                f"folded weights as a new start: model.load_state_dict(safetensors.torch.load_file(...))")
        return  # a plain model's checkpoint: pretrained weights (gamma = sigma(W))
    index = json.loads(_index_path(state).read_text())
    problems = ([f"format_version {index.get('format_version')!r} is not {FORMAT_VERSION}"]
                if index.get("format_version") != FORMAT_VERSION else _mismatch(index, module))
    if problems:
        raise RuntimeError(f"{os.fspath(state)!r} does not match the model being loaded (convert it as the "
                           f"saved model was converted): " + "; ".join(problems))
    digests = index.get(FOLDED_DIGESTS)  # absent in files of the first format-1 writer: not checked
    if digests is not None:
        stale = [k for k in folded if digests.get(k) != _digest(state_dict[prefix + k])]
        if stale:
            raise RuntimeError(
                f"{os.fspath(directory)!r}: the folded weights of its model.safetensors are not those of its "
                f"{STATE_FILE} ({_first(stale)}): the two files come from different saves.  Save the "
                f"model again, or load one of them by hand (load_sigma_reparam(model, directory) for the "
                f"sigmaReparam state)")
    if sharded:
        every = _checkpoint_keys(directory)
        names = _legacy_names_cached(module, set(module.state_dict()))
        every = {names.get(k, k) for k in every}
    else:
        every = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    lost = [k for k, ks in groups.items() if k not in every and ks[0] not in every]
    with safe_open(os.fspath(state), framework="pt", device="cpu") as f:
        stored = set(f.keys())
        for plain in folded + lost:
            if not set(groups[plain]) <= stored:
                raise RuntimeError(f"{os.fspath(state)!r} lacks {_first(set(groups[plain]) - stored)}")
            state_dict.pop(prefix + plain, None)
            for key in groups[plain]:
                state_dict[prefix + key] = f.get_tensor(key)


def _checkpoint_keys(directory: Path) -> set[str]:
    """Every key of a sharded checkpoint, from its index (safetensors or torch)."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / name).is_file():
            return set(json.loads((directory / name).read_text())["weight_map"])
    return set()


# -- σReparam registered by hand on a Hugging Face model: its own save_pretrained is refused ------
def refuse_plain_hf_save(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook that :func:`~sigma_core.reparam.sigma_reparam` registers on every
    module it reparametrises: inside transformers' own ``save_pretrained`` of a model that
    ``convert_to_sigma_reparam`` did not convert as a whole (``sigma_reparam(module)`` by hand,
    or a converted submodule), raise a ``ValueError`` saying what to do.  That save would write
    the raw weight, γ, ``_u`` and ``_v``, which ``from_pretrained`` of the plain class reports as
    unexpected while it initialises the weight at random.  Everywhere else (``state_dict()``,
    ``torch.save``, the ``save_pretrained`` of a converted model) it does nothing."""
    from .reparam import _find

    if "transformers.modeling_utils" not in sys.modules or not any(
            _find(module, name) is not None for name in getattr(module, "parametrizations", {})):
        return
    saved = _saving_with_transformers()
    if saved is None:
        return
    where = prefix[:-1] or "the model"
    raise ValueError(
        f"save_pretrained of {type(saved).__name__}: {where} carries sigmaReparam registered by hand "
        f"(sigma_reparam(module), or convert_to_sigma_reparam on a submodule), and transformers' own "
        f"save_pretrained would write its raw weight, gamma, _u and _v, which from_pretrained drops "
        f"(it initialises that weight at random); nothing of the weights was written.  Before saving, "
        f"call convert_to_sigma_reparam(model, exclude=['*']) once (it converts nothing more and gives "
        f"the model a save_pretrained that writes the folded model plus sigma_reparam.safetensors, "
        f"which the Trainer resumes from exactly), or fold_sigma_reparam(model) for a plain model, or "
        f"save_sigma_reparam(model, path) for the sigmaReparam state")


def _saving_with_transformers():
    """The model whose transformers ``save_pretrained`` is taking this state_dict, if that model
    has no ``save_pretrained`` of :func:`install_hf_io`; else None (read from the call stack)."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _save_pretrained.__code__:
            return None
        if f.f_code.co_name == "save_pretrained" and f.f_globals.get("__name__") == "transformers.modeling_utils":
            model = f.f_locals.get("self")
            own = getattr(model, "__dict__", {}).get("save_pretrained")
            if isinstance(own, types.MethodType) and own.__func__ is _save_pretrained:
                return None  # type(model).save_pretrained(model) called on purpose on a converted model
            return model
        f = f.f_back
    return None
