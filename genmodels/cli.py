"""``genmodels fit|validate|test|predict --config A.yaml --config B.yaml ...``

LightningCLI over any LightningModule (``genmodels.training.TokenizerModule`` or
``GeneratorModule``) and any LightningDataModule, chosen by ``class_path`` in YAML.
Several ``--config`` files compose (later ones override earlier keys); OmegaConf
interpolation (``${...}``) is resolved over the merged config ("omegaconf+" mode).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from genmodels.checkpoints.common import CheckpointMismatchError


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts / Namespaces -> {"a.b.c": leaf}."""
    if hasattr(d, "as_dict"):
        d = d.as_dict()
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class GenmodelsCLI(LightningCLI):
    """LightningCLI whose config (YAML files + command line) always wins over a checkpoint.

    Lightning's CLI (2.3+) merges the ``hyper_parameters`` stored in ``--ckpt_path`` *over* the
    parsed config, so ``genmodels test ... --model.init_args.sample_kwargs.cfg=4 --ckpt_path X``
    would silently sample with the checkpoint's cfg. Here the config is the source of truth (the
    weights must still fit it: the state dict loads strictly), and every hyper-parameter that
    differs from the checkpoint's is named on stderr.
    """

    def _parse_ckpt_path(self) -> None:  # overrides a private LightningCLI hook (lightning 2.3 - 2.6)
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        try:
            # mmap: only the pickled hyper-parameters are read, not every tensor of a large checkpoint
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            hparams = ckpt.get("hyper_parameters") or {}
        except Exception:  # not a checkpoint: the loop that loads it reports that
            return
        model = self.config[sub].get("model")
        config = _flat(model.get("init_args") or {}) if model is not None else {}
        stored = {k: v for k, v in _flat(hparams).items() if not k.startswith("_")}
        diffs = [f"  {k}: {stored[k]!r} (checkpoint) -> {config[k]!r} (config)"
                 for k in sorted(stored) if k in config and config[k] != stored[k]]
        if diffs and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"genmodels: note: the config overrides these hyper-parameters of {ckpt_path}:\n"
                  + "\n".join(diffs), file=sys.stderr)


def _compare(argv: list[str]) -> None:
    """``genmodels compare -c PRESET ...`` (genmodels/compare.py): its own argument parser, not LightningCLI."""
    from genmodels.compare import main as compare_main
    from genmodels.errors import GenmodelsError

    try:
        code = compare_main(argv)
    except GenmodelsError as e:
        if os.environ.get("GENMODELS_DEBUG"):
            raise
        print(f"genmodels: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:
        return _compare(argv[1:])
    try:
        GenmodelsCLI(
            model_class=None, subclass_mode_model=True,
            datamodule_class=None, subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
            args=args,
        )
    except (FileNotFoundError, CheckpointMismatchError, KeyError, ValueError) as e:
        if os.environ.get("GENMODELS_DEBUG"):
            raise
        print(f"genmodels: error: {e}\n(set GENMODELS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
