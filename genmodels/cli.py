"""``genmodels fit|validate|test|predict --config A.yaml --config B.yaml ...``

LightningCLI over any LightningModule (``genmodels.training.TokenizerModule`` or
``GeneratorModule``) and any LightningDataModule, chosen by ``class_path`` in YAML.
Several ``--config`` files compose (later ones override earlier keys); OmegaConf
interpolation (``${...}``) is resolved over the merged config ("omegaconf+" mode).

User mistakes (``genmodels.errors.GenmodelsError``) are printed as one line,
``genmodels: error: ...``, with exit code 2; any other exception is a bug and keeps its
traceback. ``GENMODELS_DEBUG=1`` shows the traceback of user mistakes too.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.cli import LightningCLI

from genmodels.checkpoints import common as checkpoint_common
from genmodels.errors import GenmodelsError
from genmodels.utils.config import flatten_config, plain
from genmodels.utils.paths import check_writable

# --ckpt_path values Lightning resolves itself (not file names)
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def user_mistake(e: BaseException) -> GenmodelsError | None:
    """The ``GenmodelsError`` behind ``e`` (jsonargparse wraps a constructor's error in its own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, GenmodelsError):
            return e
        seen.add(id(e))
        e = e.__cause__
    return None


def one_line(e: BaseException) -> str:
    """The message of a user mistake as one line (a DataLoader worker wraps it in a traceback)."""
    msg = str(e).strip()
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: the last line is ours
        last = msg.splitlines()[-1]
        msg = re.sub(r"^[\w.]+: ", "", last)  # "genmodels.errors.GenmodelsError: <message>"
    return " ".join(msg.split())


class GenmodelsCLI(LightningCLI):
    """LightningCLI whose config (YAML files + command line) always wins over a checkpoint.

    Lightning's CLI (2.3+) merges the ``hyper_parameters`` stored in ``--ckpt_path`` *over* the
    parsed config, so ``genmodels test ... --model.init_args.sample_kwargs.cfg=4 --ckpt_path X``
    would silently sample with the checkpoint's cfg. Here the config is the source of truth (the
    weights must still fit it: the modules check that when the checkpoint loads, see
    ``genmodels.training.common.check_checkpoint_fits``), and every hyper-parameter, generator or
    tokenizer field that differs from the checkpoint's is named on stderr.

    ``--trust_pickle``: load checkpoints that pickle arbitrary Python objects (``--ckpt_path``
    and ``tokenizer_ckpt`` alike); without it such files are refused.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--trust_pickle", type=bool, default=False,
                            help="load checkpoint files that pickle arbitrary Python objects (this runs their code: "
                                 "only for files from a source you trust)")

    def instantiate_classes(self) -> None:
        """Build the config's objects. A constructor rejecting its arguments is a config mistake:
        its ``GenmodelsError`` -- or a ``ValueError`` raised by the constructor itself while
        building, the argument checks of modules not yet converted -- becomes one line; any
        other exception keeps its traceback."""
        try:
            super().instantiate_classes()
        except Exception as e:
            found = user_mistake(e)
            if found is not None:
                raise found
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            if type(root) is ValueError and root is not e:  # jsonargparse wrapped a constructor's check
                raise GenmodelsError(f"invalid config: {one_line(root)}") from e
            raise

    def before_instantiate_classes(self) -> None:
        """Refuse an output folder that cannot be written before any work is done."""
        sub = self.config.get("subcommand")
        trainer = self.config[sub].get("trainer") if sub else None
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or os.getcwd()
        check_writable(root, "trainer.default_root_dir")
        loggers = trainer.get("logger")
        for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
            save_dir = (plain(logger).get("init_args") or {}).get("save_dir") if hasattr(logger, "get") else None
            if isinstance(save_dir, str):
                field = "trainer.logger" + (f"[{i}]" if isinstance(loggers, list) else "") + ".init_args.save_dir"
                check_writable(save_dir, field)

    def _parse_ckpt_path(self) -> None:  # overrides a private LightningCLI hook (lightning 2.3 - 2.6)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        trust = bool(cfg.get("trust_pickle"))
        if trust:
            checkpoint_common.TRUST_PICKLE_DEFAULT = True
            if cfg.get("weights_only") is None and "weights_only" in cfg:
                cfg["weights_only"] = False
        ckpt_path = cfg.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
            return
        if not Path(ckpt_path).is_file():
            raise GenmodelsError(f"--ckpt_path: checkpoint file not found: {ckpt_path}")
        ckpt = self._read_ckpt(Path(ckpt_path), trust)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise GenmodelsError(f"--ckpt_path: {ckpt_path} is not a checkpoint written by `genmodels fit` (no "
                                 "'state_dict'); official weights load through genmodels.from_official")
        self._note_overrides(cfg, ckpt, ckpt_path)

    @staticmethod
    def _read_ckpt(path: Path, trust: bool) -> Any:
        import torch

        try:
            if trust:
                return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            # mmap: only the pickled metadata is read, not every tensor of a large checkpoint
            return checkpoint_common._weights_only_load(path, mmap=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise GenmodelsError("--ckpt_path: " + checkpoint_common.refused_pickle_message(
                    path, e, "--trust_pickle")) from None
            raise GenmodelsError(f"--ckpt_path: {path} is not a PyTorch checkpoint ({one_line(e)[:200]})") from None
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise GenmodelsError(f"--ckpt_path: {path} is not a PyTorch checkpoint "
                                 f"({type(e).__name__}: {one_line(e)[:200]})") from None

    def _note_overrides(self, cfg: Any, ckpt: dict, ckpt_path: str) -> None:
        """Name on stderr every hyper-parameter / generator / tokenizer field the config changes."""
        model = cfg.get("model")
        init = plain(model.get("init_args") or {}) if model is not None else {}
        config = flatten_config(init)
        stored = {k: v for k, v in flatten_config(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        # the architectures (not hyper-parameters: GeneratorModule ignores its generator there)
        for part, arch in (ckpt.get("genmodels") or {}).items():
            if isinstance(init.get(part), dict):
                stored.update(flatten_config(arch, part))
        tok_ckpt, tok_arch = init.get("tokenizer_ckpt"), (ckpt.get("genmodels") or {}).get("tokenizer")
        if isinstance(tok_ckpt, str) and tok_arch is not None and Path(tok_ckpt).is_file():
            try:  # the tokenizer the config loads vs the one the checkpoint was trained on
                theirs = checkpoint_common._weights_only_load(Path(tok_ckpt), mmap=True)["genmodels"]["tokenizer"]
            except Exception:  # an unreadable tokenizer_ckpt is reported when it is loaded
                theirs = None
            if theirs is not None:
                key = "tokenizer (of tokenizer_ckpt)"
                stored.update(flatten_config(tok_arch, key))
                config.update(flatten_config(theirs, key))
        diffs = [f"  {k}: {stored[k]!r} (checkpoint) -> {config[k]!r} (config)"
                 for k in sorted(stored) if k in config and config[k] != stored[k]]
        if diffs and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"genmodels: note: the config overrides these hyper-parameters of {ckpt_path}:\n"
                  + "\n".join(diffs), file=sys.stderr)


def report_user_mistakes(run: Callable[[], Any]) -> Any:
    """Run ``run()`` (a subcommand); a user mistake (``GenmodelsError``, also when wrapped by
    jsonargparse or a DataLoader worker) becomes one line ``genmodels: error: ...`` on stderr
    and exit code 2 (``GENMODELS_DEBUG=1``: the traceback instead); any other exception
    propagates with its traceback. ``--trust_pickle`` holds for this run only."""
    trust_default = checkpoint_common.TRUST_PICKLE_DEFAULT
    try:
        return run()
    except Exception as e:
        found = user_mistake(e)
        if found is None or os.environ.get("GENMODELS_DEBUG"):
            raise
        print(f"genmodels: error: {one_line(found)}", file=sys.stderr)
        sys.exit(2)
    finally:
        checkpoint_common.TRUST_PICKLE_DEFAULT = trust_default


def main(args: list[str] | None = None) -> None:
    report_user_mistakes(lambda: GenmodelsCLI(
        model_class=None, subclass_mode_model=True,
        datamodule_class=None, subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
        args=args,
    ))


if __name__ == "__main__":
    main()
