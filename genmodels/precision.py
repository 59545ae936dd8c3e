"""The bf16 tier for sampling: a copy of a model whose heavy parts hold bfloat16 weights.

``torch.autocast`` re-casts every float32 weight it meets and converts activations at every
op boundary; on a CPU with AMX-BF16 (or a GPU with tensor cores) that bookkeeping, not the
matmuls, becomes the cost. ``bf16_for_sampling(model)`` instead returns a deep copy in which
the modules a model lists in ``BF16_PARTS`` (its transformer trunk and MAR's DiffLoss MLP, a
tokenizer's decoder) are cast to bfloat16 once, while everything that decides a token stays
float32: embeddings, the AdaLN-before-head, the head, the logits, filtering and the draw (no
bf16 ties at the top-k boundary), and the DiffLoss chain's x_t and its updates. The models' own
code casts at the seams (``VAR.trunk_dtype``, ``MAR._blocks``, ``DiffLoss.sample``, the tokenizers'
decoders), so the copy is used like the original::

    fast = bf16_for_sampling(var)                  # var untouched; fast.blocks are bfloat16
    images = fast.sample_images(labels, cfg=2.5, top_k=900, top_p=0.96, generator=g)

Tokens differ from the float32 sampler's for a few percent of positions (rounding moves
logits near a decision boundary); speed and the FID change on digits:
``benchmarks/results/speed_bf16_approx.md`` (section 2b).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from genmodels.errors import GenmodelsError


def bf16_parts(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` (itself or its bound tokenizer) that the bf16 tier casts."""
    parts = []
    bound = getattr(model, "_tokenizer", None)  # a generator keeps its tokenizer in a 1-tuple
    for owner in (model, bound[0] if isinstance(bound, tuple) and bound else bound):
        if owner is None:
            continue
        for name in getattr(type(owner), "BF16_PARTS", ()):
            part = owner
            for attr in name.split("."):  # "diffloss.net"; a part the model does not have (None) is skipped
                part = getattr(part, attr, None) if part is not None else None
            if part is not None:
                parts.append(part)
    return parts


def bf16_for_sampling(*models: nn.Module) -> nn.Module | tuple[nn.Module, ...]:
    """Deep copies of ``models`` (copied together, so a generator's bound tokenizer stays the
    copied tokenizer) in eval mode with their ``BF16_PARTS`` (and a bound tokenizer's) cast to
    bfloat16; the originals keep their float32 weights. One model in, one copy out."""
    if not any(bf16_parts(m) for m in models):
        names = ", ".join(type(m).__name__ for m in models)
        raise GenmodelsError(f"precision bf16: {names} has no bf16 sampling path (BF16_PARTS); "
                             "use autocast (evaluator.autocast: bf16) instead")
    copies = copy.deepcopy(models)
    for m in copies:
        m.eval()
        for part in bf16_parts(m):
            part.to(torch.bfloat16)
    return copies[0] if len(copies) == 1 else copies
