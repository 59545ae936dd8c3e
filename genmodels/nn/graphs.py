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

from typing import Callable, Hashable

import torch


class StepGraphs:
    """One CUDA graph per step key: ``graphs(key, step, x) -> step(x)``.

    x: the step's only per-call input (any fixed shape per key); the output is the graph's
    static output tensor, valid until the same key is replayed again (read it before the next
    call with that key). ``captured`` counts the recorded graphs (0 on a CPU).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda"
        self._steps: dict[Hashable, tuple[torch.Tensor, torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self._pool = None
        self.captured = 0

    def __call__(self, key: Hashable, step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        entry = self._steps.get(key)
        if entry is None:
            entry = self._record(step, x.clone())
            self._steps[key] = entry
        static_x, graph, static_out = entry
        if static_x.shape != x.shape or static_x.dtype != x.dtype:
            raise ValueError(f"step {key!r} was recorded for {tuple(static_x.shape)} {static_x.dtype}, "
                             f"got {tuple(x.shape)} {x.dtype}")
        static_x.copy_(x)
        if graph is None:
            return step(static_x)
        graph.replay()
        return static_out

    def _record(self, step, static_x):
        if not self.capture:
            return static_x, None, None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the capture (the documented recipe)
            for _ in range(2):
                step(static_x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = step(static_x)
        self.captured += 1
        return static_x, graph, static_out
