"""TokenizerModule: trains any ``Tokenizer`` (VQ-VAE, multi-scale VQ-VAE, KL-VAE, ...).

The tokenizer's own ``losses`` give reconstruction + commitment / KL; this module adds
the optional LPIPS term and the PatchGAN hinge loss with VQGAN's adaptive weight
(``genmodels.losses``). With a discriminator it switches to manual optimisation (two
optimisers, generator step then discriminator step per batch).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging

from genmodels.errors import GenmodelsError
from genmodels.evaluation import Evaluator
from genmodels.evaluation.results import model_metadata
from genmodels.losses.gan import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from genmodels.losses.perceptual import LPIPS
from genmodels.tokenizers.base import Tokenizer
from genmodels.training.common import (adamw, check_checkpoint_fits, check_finite_losses, lr_lambda, on_setup,
                                       param_groups, seed_step)
from genmodels.training.quiet import ignore_frozen_eval_modules
from genmodels.utils.images import save_grid
from genmodels.utils.paths import run_dir


class TokenizerModule(LightningModule):
    """Args:
        tokenizer: the model to train.
        lr, betas, weight_decay, warmup_steps, lr_schedule, min_lr_ratio: AdamW + schedule
            (stepped per batch; ``total`` = the trainer's estimated stepping batches).
        perceptual_weight / perceptual_weights: LPIPS term, needs a local weights file.
        disc_weight: weight of the hinge GAN loss (0 = no discriminator);
        disc_start: batch index from which the GAN terms are on;
        disc_adaptive: VQGAN's adaptive weight (eq. 7) times ``disc_weight``;
        disc_ndf, disc_layers, disc_lr: PatchGAN size and LR (default: ``lr``).
        ema_decay: EMA of the weights through Lightning's EMAWeightAveraging (None = off).
        seed: base of the per-step seeds (see ``seed_step``).
        grid_images: how many validation images go into each reconstruction grid.
        evaluator: a ``genmodels.evaluation.Evaluator``: ``genmodels test`` then scores the
            reconstructions (rFID, rIS, precision, recall) and writes a results row.
    """

    def __init__(self, tokenizer: Tokenizer, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.9),
                 weight_decay: float = 0.0, warmup_steps: int = 0, lr_schedule: str = "constant",
                 min_lr_ratio: float = 0.0, perceptual_weight: float = 0.0, perceptual_weights: str | None = None,
                 disc_weight: float = 0.0, disc_start: int = 0, disc_adaptive: bool = True, disc_ndf: int = 64,
                 disc_layers: int = 3, disc_lr: float | None = None, ema_decay: float | None = None, seed: int = 0,
                 grid_images: int = 16, evaluator: Evaluator | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer", "evaluator"])
        self.tokenizer = tokenizer
        self.evaluator = evaluator
        lr_lambda(lr_schedule, 0, 1)  # validate the name early
        self.perceptual = None
        if perceptual_weight > 0:
            if perceptual_weights is None:
                raise GenmodelsError("perceptual_weight > 0 needs perceptual_weights: a local LPIPS/VGG16 weights file "
                                     "(genmodels never downloads weights); set perceptual_weight: 0 to train without it")
            self.perceptual = LPIPS(perceptual_weights)
        self.discriminator = PatchDiscriminator(3, disc_ndf, disc_layers) if disc_weight > 0 else None
        self.automatic_optimization = self.discriminator is None

    def on_fit_start(self) -> None:  # frozen LPIPS / evaluator in eval mode are intended: no warning
        self._unignore_frozen = ignore_frozen_eval_modules(self, ("perceptual", "evaluator"))

    def on_train_start(self) -> None:
        getattr(self, "_unignore_frozen", lambda: None)()

    # ------------------------------------------------------------------ helpers
    def _batch_index(self) -> int:
        """Batches seen so far in this fit (restored on resume); GAN-safe unlike global_step."""
        return self.trainer.fit_loop.total_batch_idx

    def _losses(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.tokenizer.losses(images)
        if self.perceptual is not None:
            out["perceptual"] = self.perceptual(images, out["recon"]).mean()
            out["loss"] = out["loss"] + self.hparams.perceptual_weight * out["perceptual"]
            out["rec_loss"] = out["rec_loss"] + self.hparams.perceptual_weight * out["perceptual"]
        return out

    def _log(self, prefix: str, out: dict[str, Any], **kw: Any) -> None:
        scalars = {f"{prefix}/{k}": v.detach().float() for k, v in out.items()
                   if k not in ("recon", "loss") and torch.is_tensor(v) and v.numel() == 1}
        self.log_dict(scalars, **kw)

    def setup(self, stage: str) -> None:
        on_setup(self, self.tokenizer)  # atomic checkpoint writes; data image_size vs the tokenizer's

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, "tokenizer")  # one line naming the field / key if it does not fit

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_step(self.hparams.seed, self._batch_index(), self.global_rank, self.trainer.world_size)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        images = batch[0]
        out = self._losses(images)
        check_finite_losses(out, self._batch_index(), self.trainer.strategy)
        if self.automatic_optimization:
            self._log("train", out)
            self.log("train/loss", out["loss"].detach(), prog_bar=True)
            return out["loss"]

        opt_g, opt_d = self.optimizers()
        sch_g, sch_d = self.lr_schedulers()
        loss = out["loss"]
        gan_on = self._batch_index() >= self.hparams.disc_start
        if gan_on:
            g_loss = generator_loss(self.discriminator(out["recon"]))
            weight = self.hparams.disc_weight
            last = self.tokenizer.last_layer()
            if self.hparams.disc_adaptive and last is not None and torch.is_grad_enabled():
                weight = weight * adaptive_weight(out["rec_loss"], g_loss, last)
            loss = loss + weight * g_loss
            out.update(g_loss=g_loss, disc_factor=torch.as_tensor(float(weight)))
            check_finite_losses({"g_loss": g_loss, "loss": loss}, self._batch_index(), self.trainer.strategy)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.trainer.gradient_clip_val)
        opt_g.step()
        sch_g.step()
        if gan_on:
            d_loss = hinge_d_loss(self.discriminator(images.detach()), self.discriminator(out["recon"].detach()))
            check_finite_losses({"d_loss": d_loss}, self._batch_index(), self.trainer.strategy)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            out["d_loss"] = d_loss
        with warnings.catch_warnings():  # the D schedule follows the batch index, also before disc_start
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            sch_d.step()
        self._log("train", out)
        self.log("train/loss", loss.detach(), prog_bar=True)
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images = batch[0]
        torch.manual_seed(batch_idx)  # identical validation draws at every epoch
        out = self._losses(images)
        self._log("val", out, sync_dist=True)
        self.log("val/loss", out["loss"].detach(), sync_dist=True, prog_bar=True)
        if batch_idx == 0 and self.trainer.is_global_zero:
            n = min(self.hparams.grid_images, images.shape[0])
            pairs = torch.stack([images[:n], out["recon"][:n].clamp(-1, 1)], dim=1).flatten(0, 1)
            save_grid(pairs, self.grid_dir() / f"recon_epoch{self.current_epoch:04d}_step{self.global_step:07d}.png",
                      nrow=2 * min(n, 8))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(batch_idx)
        out = self._losses(batch[0])
        self._log("test", out, sync_dist=True)
        self.log("test/loss", out["loss"].detach(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        if self.evaluator is not None:  # reconstruction FID / IS / precision / recall + a results row
            ev, tok, dm = self.evaluator, self.tokenizer, self.trainer.datamodule
            split = "test" if ev.reference_spec.endswith(".npz") else ev.reference_spec
            if dm is None or not hasattr(dm, "reference_dataset"):
                raise ValueError("TokenizerModule evaluation needs a data module with reference_dataset(split)")
            self.log_dict(ev.evaluate_reconstructions(
                lambda x: tok.decode(tok.encode(x)), dm.reference_dataset(split), datamodule=dm,
                metadata={**model_metadata(None, tok), "ckpt_path": self.trainer.ckpt_path},
                out_dir=run_dir(self.trainer), device=self.device), sync_dist=False)

    def grid_dir(self) -> Path:
        return run_dir(self.trainer) / "samples"

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        h = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        fn = lr_lambda(h.lr_schedule, h.warmup_steps, total, h.min_lr_ratio)
        opt = adamw(param_groups(self.tokenizer, h.weight_decay), self._trainer, lr=h.lr, betas=h.betas)
        sch = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, fn), "interval": "step"}
        if self.discriminator is None:
            return {"optimizer": opt, "lr_scheduler": sch}
        opt_d = adamw(self.discriminator.parameters(), self._trainer, lr=h.disc_lr or h.lr, betas=h.betas,
                      weight_decay=0.0)
        sch_d = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_d, fn), "interval": "step"}
        return [opt, opt_d], [sch, sch_d]

    def configure_callbacks(self) -> list:
        if self.hparams.ema_decay is None:
            return []
        # use_buffers=False: integer buffers (BatchNorm counters) cannot be averaged.
        return [EMAWeightAveraging(decay=self.hparams.ema_decay, use_buffers=False)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What genmodels.tokenizers.load_tokenizer needs to rebuild the tokenizer alone.
        checkpoint["genmodels"] = {"tokenizer": self.tokenizer.config}
