"""A function of no arguments replayed as a CUDA graph (``--cuda-graphs``).

Why: a GPT-2 decoding step at a small batch is some hundred short kernels, and on a fast GPU
launching them from Python takes longer than running them. A CUDA graph records the launches
once and replays them with one call. The function must read and write only tensors it holds
(its inputs are copied into them before each call) and never read a value back to the host, so
that every replay does the same work on new data: :class:`captioners.gpt2_decoder.StaticSteps`.
"""

from __future__ import annotations

from typing import Callable

import torch

Step = Callable[[], torch.Tensor]


def cuda_capture(function: Step) -> Step:
    """Record ``function``'s kernels into a CUDA graph without running them; returns the replay.
    The replay's result is the tensor the recording returned, rewritten by every replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


class GraphedCall:
    """``function()``, run for real on its first call and replayed from a CUDA graph after that.

    The first call runs on a side stream, as PyTorch asks before a capture: it initialises cuBLAS
    and the allocator's pools for these shapes. The second call records the graph (recording runs
    nothing) and replays it; every later call replays. So each call does the function's work once,
    and any state the function advances (a cache index) advances once per call.
    """

    def __init__(self, function: Step, capture: Callable[[Step], Step] = cuda_capture):
        self.function, self.capture = function, capture
        self.replay: Step | None = None
        self.warmed_up = False

    def __call__(self) -> torch.Tensor:
        if not self.warmed_up:
            self.warmed_up = True
            return self._warm_up()
        if self.replay is None:
            self.replay = self.capture(self.function)
        return self.replay()

    def _warm_up(self) -> torch.Tensor:
        if not torch.cuda.is_available():  # a CPU stand-in for the tests: no streams to switch
            return self.function()
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            output = self.function()
        main.wait_stream(side)
        if output.is_cuda:  # allocated on the side stream, read on the main one
            output.record_stream(main)
        return output
