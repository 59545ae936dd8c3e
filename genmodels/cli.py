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

import torch
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
        if Path(ckpt_path).is_dir():  # a sharded (FSDP / distributed) checkpoint: Lightning's strategy reads it
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

    def test(self, model: Any, datamodule: Any = None, **kwargs: Any) -> Any:
        """``genmodels test``: a generator with an evaluator is judged on its own samples, so the
        test loop runs one placeholder batch (no data images are read) and the data module goes
        to the judge explicitly (a split reference); the config files LightningCLI parsed name
        the row."""
        evaluator = getattr(model, "evaluator", None)
        if evaluator is not None and evaluator.config_files is None:
            evaluator.config_files = [str(p) for p in (self.config["test"].get("config") or [])]
        if evaluator is None or not hasattr(model, "block_sampler"):
            return self.trainer.test(model, datamodule=datamodule, **kwargs)
        model.evaluation_datamodule = datamodule
        placeholder = torch.utils.data.DataLoader([torch.zeros(())], batch_size=1)
        return self.trainer.test(model, dataloaders=placeholder, **kwargs)


def evaluate_main(argv: list[str]) -> None:
    """``genmodels evaluate ...`` (genmodels/evaluation/cli.py): score samples made elsewhere."""
    from genmodels.evaluation.cli import evaluate_main as run

    run(argv)


def add_pipeline_source(ap: Any) -> None:
    """The pipeline options ``sample`` and ``edit`` share: ``--ckpt X`` or ``--official NAME``
    (``--weights DIR`` / ``--download``), the names listed from ``genmodels.pipeline.OFFICIAL``."""
    from genmodels.pipeline import OFFICIAL

    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a `genmodels fit` checkpoint of a GeneratorModule")
    src.add_argument("--official", help="an official model: " + ", ".join(sorted(OFFICIAL)))
    ap.add_argument("--weights", help="folder with the official files (with --official)")
    ap.add_argument("--download", action="store_true", help="fetch the official files into the cache (--official)")


def sample_main(argv: list[str]) -> None:
    """``genmodels sample --ckpt X --classes 1,7 --num 8 --out grid.png`` (or ``--official var-d16
    --weights DIR``): a grid, one row per class, of the first ``--num`` samples of each class by
    the pipeline's seeding rule (``genmodels.pipeline``). ``--set cfg=2.5`` overrides a knob."""
    import argparse

    import yaml

    from genmodels.errors import GenmodelsError
    from genmodels.pipeline import DEFAULT_BLOCK_SIZE, from_official, load
    from genmodels.utils.images import save_grid, write_adm_npz

    ap = argparse.ArgumentParser(prog="genmodels sample", description=sample_main.__doc__.split("\n")[0])
    add_pipeline_source(ap)
    ap.add_argument("--classes", default="0", help="comma-separated class ids (default 0)")
    ap.add_argument("--num", type=int, default=8, help="samples per class (default 8)")
    ap.add_argument("--out", default="samples.png", help="grid PNG (a .npz path writes the ADM .npz instead)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones (--ckpt)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="override a sampling knob, e.g. --set cfg=2.5 --set top_k=900 (YAML values)")
    a = ap.parse_args(argv)
    try:
        classes = [int(c) for c in a.classes.split(",") if c.strip()]
    except ValueError:
        raise GenmodelsError(f"--classes must be comma-separated integers, got {a.classes!r}") from None
    knobs = {}
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep:
            raise GenmodelsError(f"--set expects KNOB=VALUE, got {kv!r}")
        knobs[k.strip()] = yaml.safe_load(v)
    if a.ckpt:
        pipe = load(a.ckpt, ema=not a.no_ema, device=a.device)
    else:
        pipe = from_official(a.official, a.weights, download=a.download, device=a.device)
    n_cls = pipe.num_classes
    bad = [c for c in classes if not 0 <= c < max(n_cls, 1)]
    if bad:
        raise GenmodelsError(f"--classes: {bad} outside [0, {n_cls}) (the model's classes)")
    images, labels = pipe.sample_classes(classes, a.num, seed=a.seed, block_size=a.block_size, **knobs)
    out = Path(a.out)
    if out.suffix == ".npz":
        write_adm_npz(out, images, labels)
    else:
        save_grid(images.float() / 127.5 - 1, out, nrow=a.num)
    print(f"genmodels sample: {len(images)} images ({len(classes)} classes x {a.num}) -> {out}; knobs "
          f"{ {**pipe.sample_kwargs, **knobs} }")


def edit_main(argv: list[str]) -> None:
    """``genmodels edit --ckpt X --image in.png --mask mask.png --class 3 --out out.png`` (or
    ``--official var-d16 --weights DIR``): zero-shot in-/out-painting and class-conditional editing
    (``Pipeline.edit``). The mask is a PNG of the image's size, white = regenerate; ``--class``
    is the class to generate there (the image's own to in-/out-paint, another to edit the class).
    ``--set cfg=2.5`` overrides a knob."""
    import argparse

    import numpy as np
    import yaml
    from PIL import Image

    from genmodels.pipeline import from_official, load
    from genmodels.utils.images import load_png

    ap = argparse.ArgumentParser(prog="genmodels edit", description=edit_main.__doc__.split("\n")[0])
    add_pipeline_source(ap)
    ap.add_argument("--image", required=True, help="the image to edit (PNG / JPEG of the model's size)")
    ap.add_argument("--mask", required=True, help="mask image of the same size: white (> 127) = regenerate")
    ap.add_argument("--class", dest="class_id", type=int, required=True, help="class to generate in the masked region")
    ap.add_argument("--out", default="edited.png", help="output PNG (default edited.png)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--footprint", choices=("any", "all"), default="any",
                    help="a token is regenerated when any (default) / all of its pixels are masked")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA ones (--ckpt)")
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                    help="override a sampling knob, e.g. --set cfg=2.5 (YAML values)")
    a = ap.parse_args(argv)
    knobs = {}
    for kv in a.set:
        k, sep, v = kv.partition("=")
        if not sep:
            raise GenmodelsError(f"--set expects KNOB=VALUE, got {kv!r}")
        knobs[k.strip()] = yaml.safe_load(v)
    arrays = {}
    for field, path in (("--image", a.image), ("--mask", a.mask)):
        if not Path(path).is_file():
            raise GenmodelsError(f"{field}: file not found: {path}")
        try:
            arrays[field] = load_png(path) if field == "--image" else np.asarray(Image.open(path).convert("L"))
        except OSError as e:
            raise GenmodelsError(f"{field}: {path} is not an image ({one_line(e)[:200]})") from None
    image = torch.from_numpy(arrays["--image"].copy()).permute(2, 0, 1)[None]      # (1, 3, H, W) uint8
    mask = torch.from_numpy(arrays["--mask"] > 127)[None, None]                    # (1, 1, H, W) bool
    if tuple(mask.shape[2:]) != tuple(image.shape[2:]):
        raise GenmodelsError(f"--mask: {a.mask} is {mask.shape[2]}x{mask.shape[3]} but --image {a.image} is "
                             f"{image.shape[2]}x{image.shape[3]}; give a mask of the image's size")
    if a.ckpt:
        pipe = load(a.ckpt, ema=not a.no_ema, device=a.device)
    else:
        pipe = from_official(a.official, a.weights, download=a.download, device=a.device)
    if not 0 <= a.class_id < max(pipe.num_classes, 1):
        raise GenmodelsError(f"--class: {a.class_id} outside [0, {pipe.num_classes}) (the model's classes)")
    gen = torch.Generator(device=pipe.device).manual_seed(a.seed)
    out = pipe.edit(image, mask, [a.class_id], generator=gen, output="uint8", footprint=a.footprint, **knobs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out[0].permute(1, 2, 0).cpu().numpy()).save(a.out)
    print(f"genmodels edit: {int(mask.sum())} of {mask.numel()} pixels regenerated as class {a.class_id} -> {a.out}; "
          f"knobs { {**pipe.sample_kwargs, **knobs} }")


def compare_main(argv: list[str]) -> None:
    """``genmodels compare -c PRESET ...`` (genmodels/compare.py): its own argument parser, not LightningCLI."""
    from genmodels.compare import main as run

    code = run(argv)
    if code:
        sys.exit(code)


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
    from genmodels.training.quiet import silence_known_noise
    silence_known_noise()  # exact messages Lightning / torch print on every run (see genmodels/training/quiet.py)
    argv = sys.argv[1:] if args is None else list(args)
    extra = {"evaluate": evaluate_main, "sample": sample_main, "edit": edit_main,
             "compare": compare_main}  # beside LightningCLI's
    if argv[:1] and argv[0] in extra:
        return report_user_mistakes(lambda: extra[argv[0]](argv[1:]))
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
