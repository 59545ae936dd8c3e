"""Linear layers on pre-transposed weights, for the CPU samplers' few-row matmuls.

``F.linear(x, w, b)`` hands MKL the weight as ``w.T``, a transposed (out, in) operand. With
the weight copied once to an (in, out)-contiguous matrix, the same ``addmm`` is 1.2-2x faster
at 8-128 rows on one or two threads (MKL's packing of a transposed operand dominates at few
rows), ~0.8x at 2 rows and no faster from a few hundred rows on
(``benchmarks/results/linear_layout.md``). The result is F.linear's up to float32 rounding:
bitwise equal here for 512 inputs at 16-128 rows (the DiffLoss MLP), the last bits of another
summation order at 8 rows or 1,024+ inputs. So a sampler transposes its weights once per call
and takes this path only in that row range.
Written here (not a library call): no library exposes MKL's layout choice.
"""
from __future__ import annotations

import torch
from torch import nn

#: rows (inclusive) where the pre-transposed weight is faster on the CPU (float32, MKL)
SMALL_ROWS = (8, 128)


def transposed(layers: list[nn.Linear]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each layer's (weight.T as an (in, out)-contiguous copy, bias): the ``linear_t`` operands.
    Take them once per sampling call (the copies do not follow later weight updates)."""
    return [(m.weight.t().contiguous(), m.bias) for m in layers]


def linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` given ``w_t = w.T`` contiguous: x (..., in) -> (..., out)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ w_t if b is None else torch.addmm(b, x2, w_t)
    return y.view(*x.shape[:-1], w_t.shape[1])


def pays_off(rows: int, weight: torch.Tensor) -> bool:
    """Whether ``linear_t`` is the faster path for ``rows`` rows with this weight: float32 on
    the CPU inside ``SMALL_ROWS``, and no autograd (the copies are not the parameters)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and SMALL_ROWS[0] <= rows <= SMALL_ROWS[1])
