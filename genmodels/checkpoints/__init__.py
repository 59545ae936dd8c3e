"""Load the official checkpoints of each seed paper into genmodels modules.

``from_official(kind, state_dict, **official_kwargs)`` builds our module for the size
the official constructor would build with the same keyword arguments and loads the
official state dict strictly. Each paper's converter registers its kinds here.
"""
from __future__ import annotations

from typing import Any, Callable

from genmodels.checkpoints.common import CheckpointMismatchError, load_strict, read_checkpoint
from genmodels.errors import GenmodelsError

_CONVERTERS: dict[str, Callable[..., Any]] = {}


def register(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _CONVERTERS[kind] = fn
        return fn
    return deco


def _import_converters() -> None:
    import importlib
    for name in ("var", "mar", "fractal", "titok"):
        try:
            importlib.import_module(f"genmodels.checkpoints.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"genmodels.checkpoints.{name}":
                raise


def from_official(kind: str, state_dict: Any, **official_kwargs: Any) -> Any:
    """Build our module for ``kind`` with the official constructor's kwargs and load ``state_dict``.

    ``state_dict`` may also be a path to the official file (read with ``read_checkpoint``:
    ``trust_pickle=True`` among ``official_kwargs`` allows a file that pickles arbitrary objects).
    Unknown keyword arguments raise a ``GenmodelsError`` naming them.
    """
    _import_converters()
    if kind not in _CONVERTERS:
        raise GenmodelsError(f"from_official: unknown official checkpoint kind {kind!r}; known: {sorted(_CONVERTERS)}")
    trust_pickle = official_kwargs.pop("trust_pickle", None)
    if not isinstance(state_dict, dict):
        state_dict = read_checkpoint(state_dict, trust_pickle=trust_pickle)
    return _CONVERTERS[kind](state_dict, **official_kwargs)


__all__ = ["CheckpointMismatchError", "from_official", "load_strict", "read_checkpoint", "register"]
