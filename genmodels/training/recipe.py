"""Callbacks of the paper recipes (``configs/experiments/imagenet*.yaml``): ``GlobalBatch`` (the global batch
and learning-rate rule, checked at the start of fit) and ``WeightDecayAnnealing`` (VAR's weight-decay schedule).

A recipe (``configs/experiments/imagenet256_*.yaml``) fixes the global batch

    global_batch = devices x nodes x per-device batch x gradient accumulation

and a learning rate scaled with it (MAR ``main_mar.py``: ``lr = blr * eff_batch_size / 256``;
VAR ``utils/arg_util.py``: ``tlr = ac * tblr * glb_batch_size / 256``; LDM ``main.py``:
``lr = accumulate * ngpu * batch * base_lr``). Run the same YAML on another machine layout and
the global batch silently changes, and with it the optimisation. ``GlobalBatch`` compares the
run's layout with the recipe and stops with one line naming the fields to change.
"""
from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback

from genmodels.errors import GenmodelsError


class GlobalBatch(Callback):
    """Args:
        global_batch: the recipe's global batch (images per optimiser step, all ranks).
        base_lr: the recipe's base learning rate; with it, ``model.init_args.lr`` must equal
            ``base_lr * global_batch / base_batch`` (``base_batch=1``: LDM's rule).
        base_batch: the batch the base LR refers to (256 for VAR, MAR, MaskGIT).
    """

    def __init__(self, global_batch: int, base_lr: float | None = None, base_batch: int = 256) -> None:
        if global_batch < 1 or base_batch < 1:
            raise GenmodelsError(f"GlobalBatch: global_batch and base_batch must be >= 1, got {global_batch}, "
                                 f"{base_batch}")
        self.global_batch, self.base_lr, self.base_batch = int(global_batch), base_lr, int(base_batch)

    def expected_lr(self) -> float | None:
        return None if self.base_lr is None else self.base_lr * self.global_batch / self.base_batch

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        per_device = getattr(trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise GenmodelsError("GlobalBatch: the data module has no batch_size (data.init_args.batch_size)")
        accumulate = trainer.accumulate_grad_batches
        actual = trainer.num_devices * trainer.num_nodes * per_device * accumulate
        if actual != self.global_batch:
            per_step = trainer.num_devices * trainer.num_nodes * per_device
            hint = (f"set trainer.accumulate_grad_batches={self.global_batch // per_step}"
                    if self.global_batch % per_step == 0 else "change data.init_args.batch_size")
            raise GenmodelsError(
                f"global batch is {trainer.num_devices} devices x {trainer.num_nodes} nodes x batch_size {per_device} "
                f"x accumulate_grad_batches {accumulate} = {actual}, but the recipe's is {self.global_batch} "
                f"(GlobalBatch.global_batch): {hint}")
        want = self.expected_lr()
        lr = getattr(pl_module.hparams, "lr", None)
        if want is not None and lr is not None and not math.isclose(lr, want, rel_tol=1e-6):
            raise GenmodelsError(
                f"model.init_args.lr={lr:g} but the recipe's rule gives base_lr {self.base_lr:g} x global batch "
                f"{self.global_batch} / {self.base_batch} = {want:g} (GlobalBatch.base_lr)")


class WeightDecayAnnealing(Callback):
    """VAR's weight-decay annealing (FoundationVision/VAR utils/lr_control.py ``lr_wd_annealing``: ``twd`` ->
    ``twde``, the README's VAR-d30 command sets ``--twde=0.08``): before every optimiser step ``s`` of the run's
    ``T`` (``trainer.estimated_stepping_batches``) each decaying parameter group gets

        wd(s) = end + (start - end) (1 + cos(pi s / (T - 1))) / 2     (``common.weight_decay_at``)

    and groups without weight decay (biases, norms, ``no_weight_decay()``) keep 0. The value follows the
    optimiser step, so a resumed run continues the same curve. LambdaLR can only scale the LR, hence a callback.

    Args:
        start: the weight decay at step 0; must equal ``model.init_args.weight_decay``.
        end: the weight decay at the last step.
    """

    def __init__(self, start: float, end: float) -> None:
        if start < 0 or end < 0:
            raise GenmodelsError(f"WeightDecayAnnealing: start and end must be >= 0, got {start}, {end}")
        self.start, self.end = float(start), float(end)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        wd = getattr(pl_module.hparams, "weight_decay", None)
        if stage == "fit" and wd is not None and not math.isclose(wd, self.start, rel_tol=1e-9):
            raise GenmodelsError(f"WeightDecayAnnealing.start={self.start:g} but model.init_args.weight_decay={wd:g}: "
                                 "the annealing starts from the model's weight decay")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from genmodels.training.common import weight_decay_at
        wd = weight_decay_at(trainer.global_step, int(trainer.estimated_stepping_batches), self.start, self.end)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                # 1 for the decaying groups, 0 for the others; kept in the group (and its checkpoint)
                scale = group.setdefault("wd_scale", 1.0 if group["weight_decay"] > 0 else 0.0)
                group["weight_decay"] = wd * scale
