"""Strict, explained loading of state dicts (ours and the official repos').

The common user mistake is a checkpoint of one size loaded into a model of another
(VAR#136: a d20 file into a d16 model; MAR#68: a DiffLoss depth that differs from the
file). ``load_strict`` refuses it with an error that names the first mismatching key,
both shapes and, when the caller knows how to tell, the size the file was made for.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the requested architecture."""


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a checkpoint on CPU with a clear error for files that are not checkpoints.

    Tries ``weights_only=True`` first, allow-listing ``argparse.Namespace`` (the official
    MAR/FractalGen files pickle their ``args``); falls back to ``weights_only=False``
    only for objects the safe loader refuses -- do not load files from untrusted sources.
    Also reads ``.safetensors`` files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK..); the legacy format starts with a pickle protocol byte
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}; an HTML error page or "
                         "a partial download?)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ValueError(f"{path} is not a PyTorch checkpoint (unpickling failed: {str(e).splitlines()[0]})") from e
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ValueError(f"{path} could not be loaded even with weights_only=False: {e2}") from e2
    except (RuntimeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


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
