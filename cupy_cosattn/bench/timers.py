"""Timers: CUDA events per call on the GPU, the wall clock in the CPU smoke mode."""
from __future__ import annotations

import time

import torch

# --------------------------------------------------------------------------------------------------
# Timers


class CudaTimer:
    """Per-call CUDA events on the current stream; the median of the per-call times."""

    kind = "cuda-events"

    def __init__(self) -> None:
        self.pairs = []

    def start(self) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def stop(self, token: torch.cuda.Event) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs.append((token, e))

    def sync(self) -> None:
        torch.cuda.synchronize()

    def results_ms(self) -> list[float]:
        self.sync()
        return [a.elapsed_time(b) for a, b in self.pairs]


class WallTimer:
    """CPU smoke mode: wall clock around each (synchronous) call."""

    kind = "wall-clock"

    def __init__(self) -> None:
        self.times = []

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, token: float) -> None:
        self.times.append((time.perf_counter() - token) * 1e3)

    def sync(self) -> None:
        pass

    def results_ms(self) -> list[float]:
        return list(self.times)


