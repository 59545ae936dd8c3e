"""Pieces shared by the LightningModules: optimiser groups, LR schedule, step seeding."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


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


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at optimiser step ``s``: linear warm-up over
    ``warmup_steps``, then ``constant`` (MAR), ``cosine`` or ``linear`` decay to
    ``min_lr_ratio`` at ``total_steps``."""
    if schedule not in ("constant", "cosine", "linear"):
        raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)

    return fn


def seed_step(seed: int, step: int, rank: int = 0, world_size: int = 1) -> None:
    """Seed torch's global RNG from (seed, step, rank) before each training step.

    Every random draw of a step (masking ratios, label dropout, diffusion noise, dropout)
    then depends only on the step, so a run resumed from a checkpoint follows the same
    loss curve as an uninterrupted one, and DDP ranks draw different masks.
    """
    torch.manual_seed((seed * 1_000_003 + step * world_size + rank) % (2 ** 63 - 1))
