"""Tokenizers: images <-> tokens (see ``base.py`` for the contract)."""
from __future__ import annotations

from pathlib import Path

from genmodels.tokenizers.base import Tokenizer, TokenSpec

__all__ = ["Tokenizer", "TokenSpec", "load_tokenizer"]


def load_tokenizer(path: str | Path, *, field: str = "tokenizer_ckpt") -> Tokenizer:
    """Rebuild a trained tokenizer from a genmodels checkpoint (written by
    ``TokenizerModule``; EMA weights when EMA was on) and freeze it.

    ``field`` names the config field the path came from, for the error messages.
    """
    from genmodels.checkpoints.common import load_strict, read_checkpoint
    from genmodels.errors import GenmodelsError
    from genmodels.utils.config import instantiate

    path = Path(path)
    if not path.is_file():
        raise GenmodelsError(f"{field}: tokenizer checkpoint not found: {path} (train one with "
                             "`genmodels fit --config configs/experiments/<...>_tokenizer.yaml` first)")
    try:
        ckpt = read_checkpoint(path)
    except GenmodelsError as e:
        raise GenmodelsError(f"{field}: {e}") from None
    if isinstance(ckpt, dict) and "generator" in (ckpt.get("genmodels") or {}):
        raise GenmodelsError(f"{field}: {path} is a generator checkpoint (from a GeneratorModule fit), not a tokenizer "
                             "checkpoint; give the tokenizer's own checkpoint here, and a generator checkpoint as "
                             "--ckpt_path (to resume or evaluate it)")
    if not isinstance(ckpt, dict) or "genmodels" not in ckpt or "tokenizer" not in ckpt["genmodels"]:
        raise GenmodelsError(f"{field}: {path} is not a genmodels tokenizer checkpoint (no 'genmodels.tokenizer' "
                             "entry; it must come from `genmodels fit` with a TokenizerModule)")
    tokenizer = instantiate(ckpt["genmodels"]["tokenizer"])
    prefix = "tokenizer."
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    load_strict(tokenizer, sd, what=f"{field}: tokenizer checkpoint {path}")
    return tokenizer.requires_grad_(False).eval()
