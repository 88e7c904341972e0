"""Timing on a CUDA stream the way trtexec does it, through PyTorch's CUDA bindings.

Each run is bracketed by two CUDA events recorded on the stream, so a time is the GPU's
own time for that run; inputs and outputs stay on the device, and nothing is copied or
synchronised inside a block. A run may be replayed from a captured CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from conv2attn.errors import InputError


class CudaTimer:
    """Runs ``run`` on ``stream`` and times it with CUDA events."""

    def __init__(self, torch: ModuleType, run: Callable[[], object], cuda_graph: bool = False):
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self._run = run
        self.graph = None
        if cuda_graph:
            self.capture()

    def capture(self) -> None:
        """Capture one run as a CUDA graph; later runs replay it (one launch per run)."""
        torch = self.torch
        with torch.cuda.stream(self.stream):
            self._run()  # one eager run first: lazy initialisation must not be captured
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._run()
        except RuntimeError as error:
            # an operation that a capture does not allow: torch says which
            reason = str(error).strip().splitlines()[0] if str(error).strip() else "no reason"
            raise InputError(
                f"--cuda-graph: the model cannot be captured as a CUDA graph ({reason}); "
                "run it without --cuda-graph"
            ) from None
        self.graph = graph

    def run(self) -> None:
        with self.torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._run()
        self.stream.synchronize()

    def timed_block(self, count: int) -> list[float]:
        """Seconds of GPU time of each of ``count`` back-to-back runs."""
        torch = self.torch
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(count)
        ]
        with torch.cuda.stream(self.stream):
            for start, end in events:
                start.record(self.stream)
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._run()
                end.record(self.stream)
        self.stream.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
