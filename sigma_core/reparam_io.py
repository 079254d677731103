"""Save and load a model converted with σReparam, keys unchanged (safetensors + a JSON index)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1


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
        The safetensors file written by :func:`save_sigma_reparam`.

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
