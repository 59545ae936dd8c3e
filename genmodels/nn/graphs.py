"""CUDA graphs for the fixed-shape steps of a sampler (issue 17's GPU tier).

A sampler step whose shapes depend only on its step index (VAR's scale ``si``: the same
token count and key/value length at every call) can be recorded once as a CUDA graph and
replayed: one launch instead of hundreds of small kernels, which is what batch-1 sampling on a
GPU spends its time on. Replaying needs every tensor the step reads or writes at a fixed
address: the step's input is copied into a static buffer, and everything else it reads
(weights, a preallocated ``KVCache``, per-call conditioning copied into static buffers by the
caller) must already live at fixed addresses.

torch's ``torch.cuda.graph`` does the recording; this module only keeps one graph per step
key, warms each step up outside the capture (cuBLAS / attention workspaces), and shares one
memory pool across the graphs of a sampler. On a CPU (or any non-CUDA device) ``StepGraphs``
runs the step eagerly on the same static buffers, so the bookkeeping is tested without a GPU.
A step must be idempotent given its input (VAR's rewinds its caches to the step's first
position), because warm-up and capture run it more than once.
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

import torch
from torch import nn

T = TypeVar("T")


class StepGraphs:
    """One CUDA graph per step key: ``graphs(key, step, *xs) -> step(*xs)``.

    xs: the step's per-call inputs (fixed shapes per key), copied into static buffers; the output is the graph's
    static output tensor, valid until the same key is replayed again (read it before the next
    call with that key). ``captured`` counts the recorded graphs (0 on a CPU).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda"
        self._steps: dict[Hashable, tuple[torch.Tensor, torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._pool = None
        self.captured = 0

    def __call__(self, key: Hashable, step: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        entry = self._steps.get(key)
        if entry is None:
            entry = self._record(step, [x.clone() for x in xs])
            self._steps[key] = entry
        static_xs, graph, static_out = entry
        for s, x in zip(static_xs, xs):
            if s.shape != x.shape or s.dtype != x.dtype:
                raise ValueError(f"step {key!r} was recorded for {tuple(s.shape)} {s.dtype}, "
                                 f"got {tuple(x.shape)} {x.dtype}")
            s.copy_(x)
        if graph is None:
            return step(*static_xs)
        graph.replay()
        return static_out

    def _record(self, step, static_xs):
        if not self.capture:
            return static_xs, None, None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (the documented recipe)
            for _ in range(2):
                step(*static_xs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = step(*static_xs)
        self.captured += 1
        return static_xs, graph, static_out


_STATES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def static_state(model: nn.Module, key: tuple, build: Callable[[], T]) -> T:
    """A sampler's static state for ``model`` (``StepGraphs``, caches, conditioning buffers):
    ``build()`` once, then the same object while ``key`` (e.g. batch size, dtype, device) and
    the weights' addresses stay the same; a move, cast or reload of the weights builds anew.
    One state per model at a time (graphs hold their memory pool). Kept outside the model, so
    that copies of it (deepcopy, the bf16 tier's copy, pickling) never carry CUDA graphs."""
    full = key + (tuple(p.data_ptr() for p in model.parameters()),)
    states = _STATES.setdefault(model, {})
    if full not in states:
        states.clear()
        states[full] = build()
    return states[full]
