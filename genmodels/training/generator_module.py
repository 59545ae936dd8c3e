"""GeneratorModule: trains any ``Generator`` on the tokens of a frozen tokenizer.

Batches are ``(images, labels)`` (tokens computed on the fly by the frozen tokenizer) or
``{"tokens": ..., "labels": ...}`` from a cached-latents data module. The module owns
optimisation (AdamW, warm-up + cosine/constant LR), EMA (Lightning's
``EMAWeightAveraging``), per-step seeding (exact resume), sample grids at every
validation, ``predict`` (PNGs + an ADM-style ``.npz``) and the evaluation hooks;
the maths lives in the generator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter, EMAWeightAveraging

from genmodels.errors import GenmodelsError
from genmodels.evaluation import Evaluator
from genmodels.generators.base import Generator
from genmodels.tokenizers import load_tokenizer
from genmodels.tokenizers.base import Tokenizer
from genmodels.training.common import (check_checkpoint_fits, check_finite_losses, lr_lambda, on_setup,
                                       param_groups, seed_step)
from genmodels.utils.images import save_grid, save_pngs, to_uint8
from genmodels.utils.paths import run_dir


class GeneratorModule(LightningModule):
    """Args:
        generator: the generator to train (built for the tokenizer's TokenSpec).
        tokenizer_ckpt: checkpoint of a trained tokenizer (from ``genmodels fit`` with a
            TokenizerModule), loaded frozen. Or give ``tokenizer`` directly (e.g. pixels).
        lr, betas, weight_decay, warmup_steps, lr_schedule, min_lr_ratio: AdamW + schedule.
        ema_decay: EMA decay (None = off); ``ema_start``: first step of averaging.
        sample_kwargs: sampling knobs passed to ``generator.sample`` for grids, predict and
            evaluation (e.g. ``{cfg: 2.0, temperature: 1.0, num_steps: 8}``).
        grid_per_class: samples per class in each validation grid.
        seed: base of the per-step training seeds and of the sampling seeds.
        evaluator: a ``genmodels.evaluation.Evaluator`` used by ``genmodels test``.
    """

    def __init__(self, generator: Generator, tokenizer_ckpt: str | None = None, tokenizer: Tokenizer | None = None,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.05,
                 warmup_steps: int = 0, lr_schedule: str = "cosine", min_lr_ratio: float = 0.0,
                 ema_decay: float | None = 0.9999, ema_start: int = 0, sample_kwargs: dict[str, Any] | None = None,
                 grid_per_class: int = 4, grid_classes: int | None = None, seed: int = 0,
                 evaluator: Evaluator | None = None) -> None:
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

    def train(self, mode: bool = True) -> "GeneratorModule":
        super().train(mode)
        self.tokenizer.eval()  # frozen: never in training mode
        return self

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

    @torch.no_grad()
    def sample_images(self, labels: torch.Tensor, generator: torch.Generator | None = None,
                      **overrides: Any) -> torch.Tensor:
        """Generate images (B, 3, H, W) in [-1, 1] for class ``labels`` (B,)."""
        kwargs = {**self.sample_kwargs, **overrides}
        tokens = self.generator.sample(labels.to(self.device), generator=generator, **kwargs)
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def _seeded(self, offset: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.hparams.seed * 7919 + offset)

    def setup(self, stage: str) -> None:
        on_setup(self, self.tokenizer)  # atomic checkpoint writes; data image_size vs the tokenizer's

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, "generator")  # one line naming the field / key if it does not fit

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_step(self.hparams.seed, self.trainer.fit_loop.total_batch_idx, self.global_rank, self.trainer.world_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = self.tokens_and_labels(batch)
        out = self.generator.forward_loss(tokens, labels)
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
        if batch_idx == 0 and self.trainer.is_global_zero:
            self.write_grid()

    @torch.no_grad()
    def write_grid(self) -> Path:
        """One row per class (``grid_per_class`` samples each) -> PNG in the log folder.
        Runs inside validation, so with EMA on it shows the EMA weights."""
        n_cls = self.hparams.grid_classes or self.generator.num_classes
        k = self.hparams.grid_per_class
        labels = torch.arange(n_cls, device=self.device).repeat_interleave(k)
        images = self.sample_images(labels, generator=self._seeded(0))
        path = run_dir(self.trainer) / "samples" / (
            f"samples_epoch{self.current_epoch:04d}_step{self.global_step:07d}.png")
        return save_grid(images, path, nrow=k, scale=2)

    # ------------------------------------------------------------------ evaluation (genmodels test)
    def on_test_epoch_start(self) -> None:
        if self.evaluator is not None:  # load / compute / cache the reference before the test batches
            self.evaluator.begin(self)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self.evaluator is None:  # without an evaluator: the test loss only
            torch.manual_seed(batch_idx)
            tokens, labels = self.tokens_and_labels(batch)
            self.log("test/loss", self.generator.forward_loss(tokens, labels)["loss"], sync_dist=True)
            return
        if not isinstance(batch, dict):  # real images (cached-latent batches carry none); a no-op once cached
            self.evaluator.update_real(batch[0], batch[1])

    def on_test_epoch_end(self) -> None:
        if self.evaluator is not None:
            self.log_dict(self.evaluator.evaluate(self), sync_dist=False)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        labels, indices = batch
        # One seed per batch, from its first sample index: reproducible for a given predict batch size.
        images = self.sample_images(labels, generator=self._seeded(1 + int(indices[0])))
        return {"images": images.cpu(), "labels": labels.cpu(), "indices": indices.cpu()}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        no_decay = self.generator.no_weight_decay() if hasattr(self.generator, "no_weight_decay") else ()
        opt = torch.optim.AdamW(param_groups(self.generator, h.weight_decay, no_decay), lr=h.lr, betas=h.betas)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(h.lr_schedule, h.warmup_steps, total, h.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "step"}}

    def configure_callbacks(self) -> list:
        callbacks: list = [PredictionWriter()]
        if self.hparams.ema_decay is not None:
            # use_buffers=False: buffers here are constants (masks, ids); integer ones cannot be averaged.
            callbacks.append(EMAWeightAveraging(decay=self.hparams.ema_decay, use_buffers=False,
                                                update_starting_at_step=self.hparams.ema_start))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["genmodels"] = {"generator": self.generator.config, "tokenizer": self.tokenizer.config}


class PredictionWriter(BasePredictionWriter):
    """``genmodels predict``: every sample as ``{index:06d}_class{c}.png`` and, at the end,
    all samples as an ADM-style ``samples_NxHxWx3.npz`` (``arr_0`` uint8 NHWC, ``arr_1``
    labels) under ``<log_dir>/predictions`` (per-rank files under DDP)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._images: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def _dir(self, trainer: Any) -> Path:
        return run_dir(trainer) / "predictions"

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._images, self._labels = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        images, labels = prediction["images"], prediction["labels"]
        save_pngs(images, self._dir(trainer) / "png", indices=prediction["indices"], labels=labels)
        self._images.append(to_uint8(images).numpy())
        self._labels.append(labels.numpy())

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._images:
            return
        arr = np.concatenate(self._images)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = self._dir(trainer) / f"samples_{'x'.join(map(str, arr.shape))}{suffix}.npz"
        labels = np.concatenate(self._labels)
        np.savez(path, arr_0=arr, arr_1=labels)
        # one grid, a row per class (first 10 samples of each), for a quick look
        order = np.concatenate([np.flatnonzero(labels == c)[:10] for c in np.unique(labels)])
        grid = torch.from_numpy(arr[order]).permute(0, 3, 1, 2).float() / 127.5 - 1
        per_row = int(min(10, np.bincount(labels).max()))
        save_grid(grid, path.parent / f"grid{suffix}.png", nrow=per_row, scale=2)
        print(f"genmodels predict: wrote {len(arr)} samples to {path.parent} (grid{suffix}.png: a row per class)")
