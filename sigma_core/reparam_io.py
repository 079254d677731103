"""Save and load a model converted with σReparam, keys unchanged (safetensors + a JSON index).

For a Hugging Face model converted as a whole, ``convert_to_sigma_reparam`` also gives that
instance a ``save_pretrained`` that writes the folded model (read by ``from_pretrained`` of the
plain class) plus its σReparam state, and a load_state_dict pre-hook that maps the legacy key
names transformers 5 writes back to the model's own (docs/reparam.md, "Saving and loading").
"""
from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1
STATE_FILE = "sigma_reparam.safetensors"  # what a converted model's save_pretrained writes beside its weights


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
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    index = {
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sigma_reparam": _sigma_options(model),
        "keys": _shapes(model),
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
    if problems:
        raise ValueError("path: the file does not match model (convert it as the saved model was "
                         "converted): " + "; ".join(problems))
    with torch.no_grad():
        load_model(model, os.fspath(path), strict=True)
    return model


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
    records ``"sigma_reparam"``.  Saving copies the model once.
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
        save_sigma_reparam(source, Path(save_directory) / STATE_FILE)
    return cls_save(folded, save_directory, **kwargs)


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
    ``encoder.layer.0.attention.attention.query``, σReparam keys included) are renamed to the
    model's own before anything loads, strict or not; plain ``...weight`` keys then load into the
    σReparam weights as pretrained weights do."""
    own = set(module.state_dict())
    unknown = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in own]
    if not unknown:
        return
    cache = module.__dict__.get("_sigma_legacy_names")
    if cache is None or cache[0] != own:
        cache = (own, _legacy_names(module))
        module.__dict__["_sigma_legacy_names"] = cache
    names = cache[1]
    for k in unknown:
        new = names.get(k[len(prefix):])
        if new is not None and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(k)
