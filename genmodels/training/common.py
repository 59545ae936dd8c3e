"""Pieces shared by the LightningModules: optimiser groups, LR schedule, step seeding, and run
safety (non-finite losses, checkpoints that do not fit, atomic checkpoint writes)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from genmodels.errors import GenmodelsError
from genmodels.utils.config import flatten_config


def param_groups(module: nn.Module, weight_decay: float, no_decay_names: Iterable[str] = ()) -> list[dict]:
    """AdamW groups: no weight decay on 1-D tensors (norms, biases), embeddings' position
    tables and any parameter whose name contains one of ``no_decay_names`` (a model may
    list them in ``no_weight_decay()``, e.g. VAR's ``pos_1LC``/``scale_mul``)."""
    no_decay_names = tuple(no_decay_names)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or any(s in name for s in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(groups: Iterable, trainer: Any = None, *, bf16_clip_safe: bool = False, **kwargs: Any
          ) -> torch.optim.AdamW:
    """``torch.optim.AdamW(groups, **kwargs)``, fused (one vectorised kernel for all tensors)
    when every parameter is a plain CPU tensor and the trainer's precision is not mixed: on
    the CPU torch otherwise steps parameter by parameter (MAR 31M: 0.18 s -> 0.04 s per step,
    1 thread). Lightning refuses gradient clipping with optimizers that unscale internally
    (fused ones do) under mixed precision, so those keep the default -- except ``bf16-mixed``
    when the caller clips with ``clip_bf16_fused`` (``bf16_clip_safe=True``): bfloat16 has no
    loss scaler, so there is nothing to unscale and the refusal does not apply."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
    fused = (bool(params) and ("mixed" not in precision or (bf16_clip_safe and precision == "bf16-mixed"))
             and all(type(p.data) is torch.Tensor and p.device.type == "cpu" for p in params))
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def clip_bf16_fused(module: Any, optimizer: Any, clip_val: float | None, algorithm: str | None) -> bool:
    """Clip gradients for a fused optimizer under ``bf16-mixed`` (no loss scaler) with Lightning's
    own base-precision clipping (``clip_grad_norm_`` / ``clip_grad_value_`` over the optimizer's
    parameters), which its mixed-precision plugin refuses for fused optimizers; returns whether
    it handled the call."""
    trainer = module.trainer
    plugin = trainer.precision_plugin
    if (str(trainer.precision) != "bf16-mixed" or getattr(plugin, "scaler", None) is not None
            or not optimizer.defaults.get("fused")):
        return False
    from lightning.pytorch.plugins.precision import Precision

    if clip_val:
        Precision.clip_gradients(plugin, optimizer, clip_val, algorithm or "norm")
    return True


LR_SCHEDULES = ("constant", "cosine", "linear", "var_lin0", "var_lin", "var_lin00", "var_cos", "var_lin<T>")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
              start_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at optimiser step ``s`` (0-based) of ``total_steps`` (a ``LambdaLR``).

    ``constant`` (MAR), ``cosine``, ``linear``: linear warm-up ``a + (1 - a)(s + 1) / W`` over
    ``W = warmup_steps`` (``a = start_lr_ratio``), then constant, or cosine / linear decay to
    ``min_lr_ratio`` at ``total_steps``.

    ``var_*``: VAR's ``lr_wd_annealing`` (FoundationVision/VAR utils/lr_control.py, its ``sche``
    names), with ``a = start_lr_ratio`` (VAR's ``wp0``, 0.005) and ``m = min_lr_ratio`` (``wpe``):
    warm-up ``a + (1 - a) s / W`` for ``s < W``, then with ``p = (s - W) / (total_steps - 1 - W)``

    * ``var_lin0`` (VAR's default): 1 while ``p < 0.05``, then ``m + (1 - m)(1 - p) / 0.95``
      (linear to ``m`` at the last step); ``var_lin``: the same with 0.15;
    * ``var_lin00``: ``m + (1 - m)(1 - p)``; ``var_cos``: ``m + (1 - m)(1 + cos(pi p)) / 2``;
    * ``var_lin<T>`` (e.g. ``var_lin0.5``; VAR switches to ``lin<pg>`` under progressive training):
      linear from 1 to ``h = (1 + m + (1 - m)(1 - T)) / 2`` over ``p < T``, then linear from ``h``
      to ``m`` at ``p = 1``.
    The weight-decay half of ``lr_wd_annealing`` is ``weight_decay_at`` (``recipe.WeightDecayAnnealing``).
    """
    flat = {"var_lin0": 0.05, "var_lin": 0.15}
    T = None
    if schedule.startswith("var_lin") and schedule not in flat and schedule != "var_lin00":
        try:
            T = float(schedule[len("var_lin"):])
        except ValueError:
            T = None
        if T is None or not 0 < T < 1:
            raise GenmodelsError(f"lr_schedule {schedule!r}: var_lin<T> needs 0 < T < 1 (e.g. var_lin0.5)")
    elif schedule not in LR_SCHEDULES:
        raise GenmodelsError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    a, m, W = start_lr_ratio, min_lr_ratio, warmup_steps

    def var(step: int) -> float:
        if step < W:
            return a + (1 - a) * step / W
        p = (step - W) / max(1, total_steps - 1 - W)
        if schedule == "var_cos":
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
        if schedule == "var_lin00":
            return m + (1 - m) * (1 - p)
        if T is None:  # var_lin0 / var_lin: flat, then linear to m
            t = flat[schedule]
            return 1.0 if p < t else m + (1 - m) * (1 - p) / (1 - t)
        h = (1 + m + (1 - m) * (1 - T)) / 2
        return 1 + (h - 1) * p / T if p < T else m + (h - m) * (1 - p) / (1 - T)

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return a + (1 - a) * (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)

    return var if schedule.startswith("var_") else fn


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """VAR's weight-decay annealing (utils/lr_control.py ``lr_wd_annealing``; ``twd`` -> ``twde``):
    ``end + (start - end)(1 + cos(pi s / (total_steps - 1))) / 2`` at optimiser step ``s``."""
    p = step / max(1, total_steps - 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def seed_step(seed: int, step: int, rank: int = 0, world_size: int = 1) -> None:
    """Seed torch's global RNG from (seed, step, rank) before each training step.

    Every random draw of a step (masking ratios, label dropout, diffusion noise, dropout)
    then depends only on the step, so a run resumed from a checkpoint follows the same
    loss curve as an uninterrupted one, and DDP ranks draw different masks.
    """
    torch.manual_seed((seed * 1_000_003 + step * world_size + rank) % (2 ** 63 - 1))


# ---------------------------------------------------------------------- run safety
class NonFiniteLossError(GenmodelsError):
    """A loss term became NaN / inf: training stops (the last checkpoint written before is kept)."""


def check_finite_losses(losses: Mapping[str, Any], step: int, strategy: Any = None) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` and the first non-finite scalar term of ``losses``.

    One device sync per call (``torch.isfinite`` over all scalar terms at once); with a
    multi-process ``strategy`` the decision is shared (one boolean all-reduce), so every rank
    stops together instead of the others waiting forever in the gradient all-reduce. Raising
    inside ``training_step`` stops the run before the optimiser applies the step, so the
    checkpoints written before stay the last good ones (Lightning saves none on an exception).
    """
    terms = {k: v for k, v in losses.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel() == 1}
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]) if terms else torch.zeros(1)
    finite = torch.isfinite(values)
    ok = bool(finite.all())
    if strategy is not None and getattr(strategy, "world_size", 1) > 1:
        ok = bool(strategy.reduce_boolean_decision(ok, all=True))
    if ok:
        return
    bad = [(k, float(x)) for (k, x), good in zip(zip(terms, values.tolist()), finite.tolist()) if not good]
    what = (f"loss term {bad[0][0]!r} is {bad[0][1]}" + (f" (also non-finite: {', '.join(k for k, _ in bad[1:])})"
                                                         if len(bad) > 1 else "")) if bad else \
        "a loss term is non-finite on another process"
    raise NonFiniteLossError(
        f"training stopped at step {step}: {what}"
        + "; the last checkpoint written before this step is kept (resume with --ckpt_path .../last.ckpt after "
          "lowering model.init_args.lr or adding trainer.gradient_clip_val)")


def _ckpt_name(module: Any) -> str:
    trainer = getattr(module, "_trainer", None)
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    return f"--ckpt_path {path}" if path else "the checkpoint"


def check_checkpoint_fits(module: Any, checkpoint: Mapping[str, Any], trains: str) -> None:
    """``on_load_checkpoint``: refuse, in one line, a checkpoint of the other kind (a tokenizer
    checkpoint given to a GeneratorModule or the reverse) or of another architecture, naming
    the config fields that differ and the first mismatching key with both shapes.

    ``trains``: ``"generator"`` (GeneratorModule) or ``"tokenizer"`` (TokenizerModule).
    """
    name = _ckpt_name(module)
    info = checkpoint.get("genmodels") or {}
    kind = "generator" if "generator" in info else "tokenizer" if "tokenizer" in info else None
    if trains == "generator" and kind == "tokenizer":
        raise GenmodelsError(f"{name} is a tokenizer checkpoint (from a TokenizerModule fit): give it to the "
                             "GeneratorModule as model.init_args.tokenizer_ckpt; --ckpt_path takes a generator "
                             "checkpoint")
    if trains == "tokenizer" and kind == "generator":
        raise GenmodelsError(f"{name} is a generator checkpoint (from a GeneratorModule fit): use it with a "
                             "GeneratorModule config (model.class_path: genmodels.training.GeneratorModule); a "
                             "TokenizerModule's --ckpt_path takes a tokenizer checkpoint")
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        return  # a sharded (FSDP) checkpoint: the strategy loads the module state from the shards itself
    sd = checkpoint["state_dict"]
    own = module.state_dict()
    first = None
    for k, v in own.items():
        if k in sd and tuple(sd[k].shape) != tuple(v.shape):
            first = f"key {k!r} has shape {tuple(sd[k].shape)} in the checkpoint but {tuple(v.shape)} in the model"
            break
    if first is None:
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if missing:
            first = (f"key {missing[0]!r} (shape {tuple(own[missing[0]].shape)} in the model) is not in the "
                     f"checkpoint ({len(missing)} missing)")
        elif unexpected:
            first = (f"the checkpoint's key {unexpected[0]!r} (shape {tuple(sd[unexpected[0]].shape)}) is not in "
                     f"the model ({len(unexpected)} unexpected)")
    if first is None:
        return
    fields = []
    for part in ("generator", "tokenizer"):
        mine, theirs = getattr(module, part, None), info.get(part)
        if theirs is None or not hasattr(mine, "config"):
            continue
        a, b = flatten_config(theirs), flatten_config(mine.config)
        from_file = part == "tokenizer" and (getattr(module, "hparams", None) or {}).get("tokenizer_ckpt")
        where = "the tokenizer of model.init_args.tokenizer_ckpt: " if from_file else f"model.init_args.{part}."
        fields += [f"{where}{k}={a.get(k)!r} in the checkpoint but {b.get(k)!r} in the config"
                   for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    differ = fields[0] + (f" (and {len(fields) - 1} more field(s))" if len(fields) > 1 else "") if fields else ""
    raise GenmodelsError(f"{name} does not fit the model: " + (differ + "; " if differ else "") + first)


def check_image_size(datamodule: Any, tokenizer: Any) -> None:
    """The data's ``image_size`` must be the size the tokenizer's token grid was built for
    (its stride x its finest token grid); a ``GenmodelsError`` naming both otherwise."""
    want = getattr(getattr(tokenizer, "spec", None), "image_size", None)
    got = getattr(datamodule, "image_size", None)
    if not want or not got or int(want) == int(got):
        return
    stride = getattr(tokenizer, "downsample", None)
    why = f" (stride {stride} x a {'x'.join(map(str, tokenizer.spec.grid))} token grid)" if stride else ""
    divides = f"; the stride {stride} does not divide {got}" if stride and got % stride else ""
    raise GenmodelsError(f"data.init_args.image_size={got}, but the tokenizer {type(tokenizer).__name__} encodes "
                         f"{want}x{want} images{why}{divides}; set data.init_args.image_size: {want}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic on a local file system: the checkpoint
    goes to a temporary file in the target's own folder, is flushed to disk (fsync) and
    renamed over the target (``os.replace``). A run killed while writing leaves the previous
    checkpoint intact (and a stray ``.<name>.tmp-<pid>`` file). Lightning's own save buffers
    the whole file in memory and moves a temp file from the system temp folder, a copy (not
    atomic) when that folder is on another file system, as on most clusters. Remote paths
    (``s3://``...) fall back to Lightning's save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _write(self, checkpoint: dict[str, Any], f: Any) -> None:
        torch.save(checkpoint, f)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Swap the strategy's default ``TorchCheckpointIO`` for ``AtomicCheckpointIO`` (a custom
    or distributed checkpoint IO is left alone)."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def on_setup(module: Any, tokenizer: Any) -> None:
    """What both LightningModules do in ``setup``: atomic checkpoint writes, image size check."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return
    use_atomic_checkpoint_io(trainer)
    check_image_size(getattr(trainer, "datamodule", None), tokenizer)
