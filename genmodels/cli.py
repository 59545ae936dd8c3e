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


def _user_command(fn, argv: list[str]) -> None:
    """Run a subcommand that is not LightningCLI's (``evaluate``, ``sample``): a user mistake
    (``GenmodelsError``, a missing file) is one line; anything else keeps its traceback."""
    from genmodels.errors import GenmodelsError

    try:
        fn(argv)
    except (GenmodelsError, FileNotFoundError) as e:
        if os.environ.get("GENMODELS_DEBUG"):
            raise
        print(f"genmodels: error: {e}", file=sys.stderr)
        sys.exit(2)


def evaluate_main(argv: list[str]) -> None:
    """``genmodels evaluate ...`` (genmodels/evaluation/cli.py): score samples made elsewhere."""
    from genmodels.evaluation.cli import evaluate_main as run

    run(argv)


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
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a `genmodels fit` checkpoint of a GeneratorModule")
    src.add_argument("--official", help="an official model: var-d16 .. var-d30, mar-base / mar-large / mar-huge")
    ap.add_argument("--weights", help="folder with the official files (with --official)")
    ap.add_argument("--download", action="store_true", help="fetch the official files into the cache (--official)")
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


def compare_main(argv: list[str]) -> None:
    """``genmodels compare -c PRESET ...`` (genmodels/compare.py): its own argument parser, not LightningCLI."""
    from genmodels.compare import main as run

    code = run(argv)
    if code:
        sys.exit(code)


def main(args: list[str] | None = None) -> None:
    from genmodels.training.quiet import silence_known_noise
    silence_known_noise()  # exact messages Lightning / torch print on every run (see genmodels/training/quiet.py)
    argv = sys.argv[1:] if args is None else list(args)
    extra = {"evaluate": evaluate_main, "sample": sample_main, "compare": compare_main}  # beside LightningCLI's
    if argv[:1] and argv[0] in extra:
        return _user_command(extra[argv[0]], argv[1:])
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
