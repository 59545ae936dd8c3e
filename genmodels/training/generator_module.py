"""GeneratorModule: trains any ``Generator`` on the tokens of a frozen tokenizer.

Batches are ``(images, labels)`` (tokens computed on the fly by the frozen tokenizer) or
``{"tokens": ..., "labels": ...}`` from a cached-latents data module. The module owns
optimisation (AdamW, warm-up + cosine/constant LR), EMA (Lightning's
``EMAWeightAveraging``), per-step seeding (exact resume), sample grids at every
validation, ``predict`` (PNGs + an ADM-style ``.npz``) and the evaluation hooks;
the maths lives in the generator. Every image it makes (grids, predict, test) comes from
one ``genmodels.pipeline.Pipeline`` by its seeding rule (blocks of ``sample_block_size``
samples per class seeded by ``seed_for(seed, class, block)``), so sample i of class c is
the same image in all three. Checkpoints hold the tokenizer's config and weights once
(``genmodels.tokenizer_state_dict``), so ``genmodels.load(ckpt)`` needs no other file.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, EMAWeightAveraging

from genmodels.errors import GenmodelsError
from genmodels.evaluation import Evaluator
from genmodels.evaluation.results import model_metadata
from genmodels.generators.base import Generator
from genmodels.tokenizers import load_tokenizer
from genmodels.tokenizers.base import Tokenizer
from genmodels.training.common import (adamw, check_checkpoint_fits, check_finite_losses, clip_bf16_fused,
                                       lr_lambda, on_setup, param_groups, seed_step)
from genmodels.pipeline import DEFAULT_BLOCK_SIZE, Pipeline
from genmodels.training.quiet import ignore_frozen_eval_modules
from genmodels.utils.images import quantize_uint8, save_grid, save_pngs, to_uint8, write_adm_npz
from genmodels.utils.paths import run_dir


class GeneratorModule(LightningModule):
    """Args:
        generator: the generator to train (built for the tokenizer's TokenSpec).
        tokenizer_ckpt: checkpoint of a trained tokenizer (from ``genmodels fit`` with a
            TokenizerModule), loaded frozen. Or give ``tokenizer`` directly (e.g. pixels).
        lr, betas, weight_decay, warmup_steps, lr_schedule, min_lr_ratio, start_lr_ratio: AdamW +
            schedule (``genmodels.training.common.lr_lambda``: constant / cosine / linear, or VAR's
            ``var_lin0`` ...; ``start_lr_ratio`` = the LR at the first warm-up step over the peak).
        ema_decay: EMA decay (None = off); ``ema_start``: first step of averaging.
        sample_kwargs: sampling knobs passed to ``generator.sample`` for grids, predict and
            evaluation (e.g. ``{cfg: 2.0, temperature: 1.0, num_steps: 8}``).
        grid_per_class: samples per class in each validation grid.
        grid_classes: at most this many classes (the first ones) in each validation grid
            (0 = no grid, None = every class). Kept small: on ImageNet the grid is drawn on
            rank 0 while the other ranks wait.
        grid_sample_kwargs: knobs that override ``sample_kwargs`` for the grids only (a cheap
            setting, e.g. MAR ``{num_steps: 32, num_sampling_steps: 50}``); None = the same.
        seed: base of the per-step training seeds and of the sampling seeds.
        sample_block_size: S of the seeding rule (``genmodels.pipeline``): samples are made in
            per-class blocks of S; grids, predict and test all use it (a grid costs
            ``grid_classes * S`` samples).
        evaluator: a ``genmodels.evaluation.Evaluator`` used by ``genmodels test``.
        compile: ``torch.compile`` the generator's training loss (``forward_loss``; inductor
            fuses the element-wise ops of forward and backward): opt-in, it costs a compilation
            at the first step (minutes on a CPU) and a recompilation when the shapes change;
            random draws inside the loss (masks, noise) then come from inductor's generator
            (same distributions and seeding, other numbers); the speed-up is measured in
            ``benchmarks/results/speed.md``.
    """

    def __init__(self, generator: Generator, tokenizer_ckpt: str | None = None, tokenizer: Tokenizer | None = None,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.05,
                 warmup_steps: int = 0, lr_schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 start_lr_ratio: float = 0.0, ema_decay: float | None = 0.9999, ema_start: int = 0,
                 sample_kwargs: dict[str, Any] | None = None,
                 grid_per_class: int = 4, grid_classes: int | None = 10,
                 grid_sample_kwargs: dict[str, Any] | None = None, seed: int = 0,
                 evaluator: Evaluator | None = None, sample_block_size: int = DEFAULT_BLOCK_SIZE,
                 compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "tokenizer", "evaluator"])
        lr_lambda(lr_schedule, 0, 1)  # validate the name early
        if (tokenizer_ckpt is None) == (tokenizer is None):
            raise GenmodelsError("GeneratorModule needs exactly one of tokenizer_ckpt (a trained tokenizer checkpoint) "
                                 "or tokenizer (a tokenizer config, e.g. pixels)")
        if tokenizer is None:
            tokenizer = load_tokenizer(tokenizer_ckpt, field="model.init_args.tokenizer_ckpt")
        self.tokenizer = tokenizer.requires_grad_(False).eval()
        generator.check_spec(self.tokenizer.spec)
        if hasattr(generator, "bind_tokenizer"):
            generator.bind_tokenizer(self.tokenizer)
        self.generator = generator
        self.sample_kwargs = dict(sample_kwargs or {})
        self.evaluator = evaluator
        self._pipeline = Pipeline(self.generator, self.tokenizer, self.sample_kwargs)

    def train(self, mode: bool = True) -> "GeneratorModule":
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

    def on_fit_start(self) -> None:  # the frozen tokenizer in eval mode is intended: no warning for it
        self._unignore_frozen = ignore_frozen_eval_modules(self, ("tokenizer", "evaluator"))

    def on_train_start(self) -> None:
        getattr(self, "_unignore_frozen", lambda: None)()
        self._total_steps = self.trainer.estimated_stepping_batches

    # ------------------------------------------------------------------ data -> tokens
    @torch.no_grad()
    def tokens_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            tokens, labels = batch["tokens"], batch["labels"]
        else:
            images, labels = batch[0], batch[1]
            tokens = self.tokenizer.encode(images)
        self.generator.check_training_labels(labels)  # the null class is never a data label
        return tokens, labels.long()

    @property
    def pipeline(self) -> Pipeline:
        """The module's generator + tokenizer + ``sample_kwargs`` (shared modules, no copies)."""
        self._pipeline.sample_kwargs = self.sample_kwargs
        return self._pipeline

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                      **overrides: Any) -> torch.Tensor:
        """Generate images (B, 3, H, W) in [-1, 1] for class ``labels`` (B,)."""
        return self.pipeline.sample(labels.to(self.device), generator=generator, **overrides)

    def block_sampler(self, seed: int | None = None, precision: str | None = None, **overrides: Any):
        """``fn(class_id, block) -> uint8 (S, 3, H, W)``: ``Pipeline.sample_block`` with this
        module's seed (or ``seed``), ``sample_block_size`` and ``sample_kwargs`` (+ ``overrides``)
        -- the one generation path of grids, ``predict`` and ``test``. ``fn.block_size`` is S.
        ``precision="bf16"``: on the bf16 tier's copy (``Pipeline.bf16``)."""
        pipe = self.pipeline.bf16() if precision == "bf16" else self.pipeline
        fn = functools.partial(pipe.sample_block, seed=self.hparams.seed if seed is None else seed,
                               block_size=self.hparams.sample_block_size, **{**self.sample_kwargs, **overrides})
        fn.block_size = self.hparams.sample_block_size  # type: ignore[attr-defined]
        return fn

    def setup(self, stage: str) -> None:
        on_setup(self, self.tokenizer)  # atomic checkpoint writes; data image_size vs the tokenizer's

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_step(self.hparams.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank, self.trainer.world_size)
        if hasattr(self.generator, "set_train_progress"):  # e.g. VAR's progressive training (pg > 0)
            total = getattr(self, "_total_steps", None) or self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise GenmodelsError("progressive training needs a finite run length: set trainer.max_steps or "
                                     "trainer.max_epochs")
            # optimizer steps (global_step), like the LR schedule: resumed runs follow the same stages
            self.generator.set_train_progress(self.global_step, int(total), self.hparams.warmup_steps)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = self.tokens_and_labels(batch)
        if self.hparams.get("compile") and getattr(self, "_compiled_loss", None) is None:
            self._compiled_loss = torch.compile(self.generator.forward_loss)
        out = (getattr(self, "_compiled_loss", None) or self.generator.forward_loss)(tokens, labels)
        check_finite_losses(out, self.global_step, self.trainer.strategy)
        self.log_dict({f"train/{k}": v.detach().float() for k, v in out.items()
                       if k != "loss" and torch.is_tensor(v) and v.numel() == 1})
        self.log("train/loss", out["loss"].detach(), prog_bar=True)
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(batch_idx)  # identical masks / noise at every validation
        tokens, labels = self.tokens_and_labels(batch)
        out = self.generator.forward_loss(tokens, labels)
        self.log("val/loss", out["loss"].detach(), sync_dist=True, prog_bar=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.hparams.grid_classes != 0:
            self.write_grid()

    @torch.no_grad()
    def write_grid(self) -> Path:
        """One row per class (its first ``grid_per_class`` samples by the seeding rule, the
        same images ``predict`` and ``test`` make) -> PNG in the log folder. Runs inside
        validation, so with EMA on it shows the EMA weights."""
        n_cls = min(self.hparams.grid_classes or self.generator.num_classes, self.generator.num_classes)
        k = self.hparams.grid_per_class
        images, _ = self.pipeline.sample_classes(range(n_cls), k, seed=self.hparams.seed,
                                                 block_size=self.hparams.sample_block_size,
                                                 **(self.hparams.grid_sample_kwargs or {}))
        images = images.float() / 127.5 - 1
        path = run_dir(self.trainer) / "samples" / (
            f"samples_epoch{self.current_epoch:04d}_step{self.global_step:07d}.png")
        return save_grid(images, path, nrow=k, scale=2)

    # ------------------------------------------------------------------ evaluation (genmodels test)
    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self.evaluator is not None:  # the judge generates its own samples: test batches are not used
            return
        torch.manual_seed(batch_idx)
        tokens, labels = self.tokens_and_labels(batch)
        self.log("test/loss", self.generator.forward_loss(tokens, labels)["loss"], sync_dist=True)

    def on_test_epoch_end(self) -> None:
        trainer = self.trainer
        datamodule = trainer.datamodule or getattr(self, "evaluation_datamodule", None)
        bpd = self.test_bits_per_dim(datamodule)
        if self.evaluator is None:
            if bpd is not None:
                self.log("test/bits_per_dim", bpd)
            return
        ev = self.evaluator
        metadata = {**model_metadata(self.generator, self.tokenizer), "sampling": dict(self.sample_kwargs),
                    "ckpt_path": trainer.ckpt_path, "config_saved": str(run_dir(trainer) / "config.yaml")}
        if ev.seed is None:
            ev.seed = self.hparams.seed  # the judge's samples are predict's: same seed, same blocks
        sampler = self.block_sampler(seed=ev.seed, precision=ev.precision, **ev.sample_kwargs)
        metrics = ev.evaluate(sampler, sampler.block_size,
                              num_classes=int(getattr(self.generator, "num_classes", 0) or 0) or 1,
                              datamodule=datamodule, metadata=metadata, out_dir=run_dir(trainer),
                              device=self.device, extra_metrics=None if bpd is None else {"bits_per_dim": bpd})
        self.log_dict(metrics, sync_dist=False)

    @torch.no_grad()
    def test_bits_per_dim(self, datamodule: Any = None) -> float | None:
        """Unconditional NLL of the whole test split in bits per dimension (the null class as
        label), when the generator has a likelihood (``nll``: FractalGen, causal AR); else None.
        ``datamodule``: default the trainer's."""
        datamodule = datamodule if datamodule is not None else getattr(self.trainer, "datamodule", None)
        if (getattr(type(self.generator), "nll", Generator.nll) is Generator.nll or datamodule is None
                or not hasattr(datamodule, "test_dataloader")):
            return None
        if hasattr(datamodule, "setup"):
            datamodule.setup("test")
        torch.manual_seed(self.hparams.seed)  # the stochastic estimates (FractalMAR) are reproducible
        total, count = 0.0, 0
        for batch in datamodule.test_dataloader():
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            tokens, labels = self.tokens_and_labels(batch)
            bpd = self.generator.nll(tokens, torch.full_like(labels, self.generator.num_classes))
            total += float(bpd.double().mean()) * labels.shape[0]
            count += labels.shape[0]
        return total / max(count, 1)

    def on_predict_start(self) -> None:
        """Assign every predict index a (class, per-class index) by the seeding rule.

        The predict set's labels (the data module's ``(labels, indices)``) fix how many samples
        of each class are made; index i is the i-th of the enumeration "block 0 of every class,
        then block 1 of every class, ...", so consecutive indices share blocks and a block is
        generated once per batch that needs it (under DDP's strided sampler each rank may
        regenerate blocks it shares with other ranks: same images, more compute)."""
        loader = self.trainer.predict_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        ds = loader.dataset  # the whole set (not this rank's share): every rank gets the same enumeration
        labels = ds.tensors[0] if hasattr(ds, "tensors") else torch.as_tensor([int(ds[i][0]) for i in range(len(ds))])
        labels = labels.reshape(-1).long()
        counts = torch.bincount(labels).tolist() if labels.numel() else []
        S = self.hparams.sample_block_size
        order = []
        for b in range((max(counts, default=0) + S - 1) // S):
            for c, n in enumerate(counts):
                order += [(c, j) for j in range(b * S, min((b + 1) * S, n))]
        self._predict_order = torch.tensor(order, dtype=torch.long).reshape(-1, 2)
        self._predict_blocks: dict[tuple[int, int], torch.Tensor] = {}

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        _, indices = batch
        cj = self._predict_order[indices.cpu()]
        S, sampler = self.hparams.sample_block_size, self.block_sampler()
        needed = sorted({(int(c), int(j) // S) for c, j in cj.tolist()})
        blocks = {key: self._predict_blocks.get(key) for key in needed}
        for (c, b), img in blocks.items():
            if img is None:
                blocks[(c, b)] = sampler(c, b).cpu()
        self._predict_blocks = blocks  # keep this batch's blocks for the next one
        images = torch.stack([blocks[(int(c), int(j) // S)][int(j) % S] for c, j in cj.tolist()])
        return {"images": images.float() / 127.5 - 1, "labels": cj[:, 0], "indices": indices.cpu(),
                "class_index": cj[:, 1]}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        no_decay = self.generator.no_weight_decay() if hasattr(self.generator, "no_weight_decay") else ()
        opt = adamw(param_groups(self.generator, h.weight_decay, no_decay), self._trainer, bf16_clip_safe=True,
                    lr=h.lr, betas=h.betas)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(h.lr_schedule, h.warmup_steps, total, h.min_lr_ratio,
                                                               h.start_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        model = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and hasattr(model, "clip_grad_norm_"):
            # FSDP (configs/trainer/fsdp.yaml): the norm over every shard; Lightning's FSDPPrecision refuses 'norm'
            model.clip_grad_norm_(gradient_clip_val)
            return
        if clip_bf16_fused(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_callbacks(self) -> list:
        callbacks: list = [PredictionWriter()]
        if self.hparams.ema_decay is not None:
            # use_buffers=False: buffers here are constants (masks, ids); integer ones cannot be averaged.
            callbacks.append(EMAWeightAveraging(decay=self.hparams.ema_decay, use_buffers=False,
                                                update_starting_at_step=self.hparams.ema_start))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the configs, the default knobs and the frozen tokenizer's weights ONCE
        (``genmodels.tokenizer_state_dict``): they are dropped from ``state_dict`` and from the
        EMA callback's ``current_model_state`` (Lightning runs callbacks' hooks first), except in
        an FSDP sharded checkpoint, whose shards must hold every module key."""
        checkpoint["genmodels"] = {"generator": self.generator.config, "tokenizer": self.tokenizer.config,
                                   "sample_kwargs": dict(self.sample_kwargs)}
        if getattr(getattr(self._trainer, "strategy", None), "_state_dict_type", None) == "sharded":
            return  # FSDP's sharded save/load reads every module key from the shards: the tokenizer stays there
        checkpoint["genmodels"]["tokenizer_state_dict"] = {k: v.detach().cpu() for k, v in
                                                           self.tokenizer.state_dict().items()}
        for key in ("state_dict", "current_model_state"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {k: v for k, v in checkpoint[key].items() if not k.startswith("tokenizer.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the stored tokenizer weights back into the state dicts Lightning loads (an older
        checkpoint keeps them inside ``state_dict``), then check the file fits this model: one
        line naming the config field and the first mismatching key if it does not."""
        tok = (checkpoint.get("genmodels") or {}).get("tokenizer_state_dict")
        for key in ("state_dict", "current_model_state"):
            if tok is not None and isinstance(checkpoint.get(key), dict):
                checkpoint[key].update({f"tokenizer.{k}": v for k, v in tok.items()})
        check_checkpoint_fits(self, checkpoint, "generator")


class PredictionWriter(BasePredictionWriter):
    """``genmodels predict``: every sample as ``{index:06d}_class{c}.png`` and, at the end,
    all samples as an ADM-style ``samples_NxHxWx3.npz`` (``arr_0`` uint8 NHWC, ``arr_1``
    labels, in index order; ``genmodels.utils.images.write_adm_npz``) under
    ``<log_dir>/predictions`` (per-rank files under DDP). Index i is the sample of
    ``GeneratorModule.on_predict_start``'s enumeration, the class in its file name."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._images: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []

    def _dir(self, trainer: Any) -> Path:
        return run_dir(trainer) / "predictions"

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._images, self._labels, self._indices = [], [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        images, labels = prediction["images"], prediction["labels"]
        save_pngs(images, self._dir(trainer) / "png", indices=prediction["indices"], labels=labels)
        self._images.append(quantize_uint8(images))
        self._labels.append(labels)
        self._indices.append(prediction["indices"])

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._images:
            return
        order = torch.cat(self._indices).argsort()
        images, labels = torch.cat(self._images)[order], torch.cat(self._labels)[order]
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        shape = (images.shape[0], images.shape[2], images.shape[3], images.shape[1])
        path = write_adm_npz(self._dir(trainer) / f"samples_{'x'.join(map(str, shape))}{suffix}.npz", images, labels)
        labels = labels.numpy()
        # one grid, a row per class (first 10 samples of each), for a quick look
        order = np.concatenate([np.flatnonzero(labels == c)[:10] for c in np.unique(labels)])
        grid = images[torch.from_numpy(order)].float() / 127.5 - 1
        per_row = int(min(10, np.bincount(labels).max()))
        save_grid(grid, path.parent / f"grid{suffix}.png", nrow=per_row, scale=2)
        print(f"genmodels predict: wrote {len(images)} samples to {path.parent} (grid{suffix}.png: a row per class)")
