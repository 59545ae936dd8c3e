"""``genmodels fit|validate|test|predict --config A.yaml --config B.yaml ...``

LightningCLI over any LightningModule (``genmodels.training.TokenizerModule`` or
``GeneratorModule``) and any LightningDataModule, chosen by ``class_path`` in YAML.
Several ``--config`` files compose (later ones override earlier keys); OmegaConf
interpolation (``${...}``) is resolved over the merged config ("omegaconf+" mode).
"""
from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from genmodels.checkpoints.common import CheckpointMismatchError


def main(args: list[str] | None = None) -> None:
    try:
        LightningCLI(
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
