"""Strict, explained loading of state dicts (ours and the official repos').

The common user mistake is a checkpoint of one size loaded into a model of another
(VAR#136: a d20 file into a d16 model; MAR#68: a DiffLoss depth that differs from the
file). ``load_strict`` refuses it with an error that names the first mismatching key,
both shapes and, when the caller knows how to tell, the size the file was made for.
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from genmodels.errors import GenmodelsError


class CheckpointMismatchError(GenmodelsError):
    """A checkpoint does not fit the requested architecture (a user mistake: wrong file or size)."""


# What the official files pickle besides tensors and containers: MAR / FractalGen save their
# training ``args`` as an ``argparse.Namespace``. Nothing else is ever unpickled by default.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Set by ``genmodels --trust_pickle``; ``read_checkpoint(trust_pickle=None)`` follows it.
TRUST_PICKLE_DEFAULT = False


def _weights_only_load(path: Path, **kw: Any) -> Any:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True, **kw)


def refused_pickle_message(path: str | Path, error: Exception, opt_in: str) -> str:
    """One line: ``path`` pickles an object outside the allow-list, named from torch's message."""
    msg = str(error)
    found = re.search(r"(?:Unsupported global|unsupported global|GLOBAL) ?:? ?(?:GLOBAL )?([\w.]+)", msg)
    what = f" ({found.group(1)})" if found else ""
    return (f"{path} holds a pickled object outside the allow-list{what}; unpickling it could run arbitrary code, so "
            f"genmodels refuses to load it; if you trust this file, pass {opt_in}")


def read_checkpoint(path: str | Path, *, trust_pickle: bool | None = None) -> Any:
    """``torch.load`` a checkpoint on CPU, never running pickled code unless asked.

    Loads with ``weights_only=True``, allow-listing exactly ``SAFE_GLOBALS``
    (``argparse.Namespace``: the official MAR/FractalGen files pickle their ``args``). A file
    that pickles anything else is refused with a ``GenmodelsError`` naming the file and the
    opt-in: ``trust_pickle=True`` (or ``genmodels ... --trust_pickle``), which loads it with
    ``weights_only=False`` -- only for files from a source you trust. ``trust_pickle=None``
    follows ``TRUST_PICKLE_DEFAULT`` (set by the CLI flag). Also reads ``.safetensors`` files.
    Other unreadable files get a ``GenmodelsError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise GenmodelsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise GenmodelsError(f"{path} is not a readable safetensors file: {_first_line(e)}") from e
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK..); the legacy format starts with a pickle protocol byte
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise GenmodelsError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}; an HTML error page or "
                             "a partial download?)")
    trust = TRUST_PICKLE_DEFAULT if trust_pickle is None else trust_pickle
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return _weights_only_load(path)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise GenmodelsError(refused_pickle_message(path, e, "trust_pickle=True (--trust_pickle)")) from None
        raise GenmodelsError(f"{path} is not a PyTorch checkpoint (unpickling failed: {_first_line(e)})") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise GenmodelsError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_kwargs(kind: str, given: Mapping[str, Any], *targets: Callable[..., Any]) -> None:
    """``from_official(kind, ..., **given)``: a ``GenmodelsError`` naming the keyword arguments
    that none of ``targets`` (the converter and what it forwards ``**kwargs`` to) accepts."""
    import inspect

    accepted: set[str] = set()
    for fn in targets:
        params = inspect.signature(fn).parameters.values()
        accepted |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(given) - accepted - {"self", "state_dict"})
    if unknown:
        raise GenmodelsError(f"from_official({kind!r}): unknown keyword argument(s) {', '.join(unknown)}; accepted: "
                             f"{', '.join(sorted(accepted - {'self', 'state_dict'}))}")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "checkpoint",
                made_for: Callable[[Mapping[str, torch.Tensor]], str] | None = None,
                ignore: tuple[str, ...] = ()) -> None:
    """Load ``state_dict`` into ``module`` with no missing, unexpected or mis-shaped keys.

    ``made_for(state_dict)`` may return a description of the architecture the file was
    made for (e.g. ``"depth=20 (VAR-d20)"``), added to the error. Keys whose names
    contain any string in ``ignore`` are dropped from both sides' comparison.
    """
    own = module.state_dict()
    sd = {k: v for k, v in state_dict.items() if not any(s in k for s in ignore)}
    own_keys = [k for k in own if not any(s in k for s in ignore)]
    hint = ""
    if made_for is not None:
        try:
            hint = f"; the {what} looks made for {made_for(state_dict)}"
        except Exception:  # the description is a courtesy, never the error itself
            hint = ""
    for k in own_keys:
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape):
            raise CheckpointMismatchError(
                f"{what} does not fit {type(module).__name__}: key {k!r} has shape {tuple(sd[k].shape)} in the "
                f"file but {tuple(own[k].shape)} in the model{hint}")
    missing = [k for k in own_keys if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        raise CheckpointMismatchError(f"{what} does not fit {type(module).__name__}: " + ", ".join(parts) + hint)
    module.load_state_dict(sd, strict=not ignore)
