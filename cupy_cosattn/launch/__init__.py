"""The launch layer (docs/design.md section 3): one code path runs the kernels of cuda_src/ on a GPU and,
through the emulator, on the CPU.

Modules, each importing only those above it:

- ``limits``: device limits, :class:`DeviceCaps`, dimension arithmetic;
- ``tiles``: tile shapes of every kernel (pure arithmetic); ``sm90``: the sm_90a (Hopper) forward's
  tiles, when it runs, and its argument record (tensor maps + FwdParams);
- ``registry``: every instantiation the package can launch and its name expression;
- ``dispatch``: :func:`select`, the one function that picks a kernel, its grid and its tile;
- ``sources``: the kernel sources with project headers inlined; ``params``: the parameter records;
- ``arrays``: 2-byte-float-safe copies and casts;
- ``devices``: the device adapters (:class:`CudaDevice`, :class:`EmulatedDevice`);
- ``norm``, ``staging``: the l2 norm passes and what forward and backward both stage;
- ``forward``, ``backward``: :func:`run_forward`, :func:`run_backward`;
- ``decode``: :func:`run_kvcache` (KV-cache attention: append, split-KV attention, combine).

Importing this package imports neither CuPy nor the emulator: creating a :class:`CudaDevice` imports
CuPy, an :class:`EmulatedDevice` the emulator. docs/architecture.md shows how a call flows through it.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..kvcache import KVCacheInputs, KVCacheProblem
from ..problem import Inputs, Problem
from . import packed
from .backward import run_backward
from .decode import run_kvcache
from .devices import CudaDevice, Device, EmulatedDevice
from .dispatch import KernelChoice, select
from .forward import run_forward
from .limits import DeviceCaps
from .registry import KernelSpec, kernel_registry
from .sources import compile_options, load_source

__all__ = ["KernelBackend", "Device", "CudaDevice", "EmulatedDevice", "DeviceCaps", "KernelChoice", "KernelSpec",
           "select", "kernel_registry", "load_source", "compile_options", "run_forward", "run_backward",
           "run_kvcache"]


class KernelBackend:
    """The fused kernels on one device: what ``api`` runs for the "cuda" and "emulator" backends."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def forward(self, prob: Problem, inp: Inputs, out: Optional[Any] = None,
                lse: Optional[Any] = None) -> tuple[Any, Any]:
        """(out (B, H, Nq, D), lse (B, H, Nq) float32): :func:`run_forward`; a packed batch's out
        (total_q, H, D) and lse (total_q, H) (``packed``)."""
        if prob.varlen and not packed.in_kernel(prob):
            return packed.forward_by_sequence(run_forward, self.device, prob, inp, out=out, lse=lse)
        return run_forward(self.device, prob, inp, out=out, lse=lse)

    def backward(self, prob: Problem, inp: Inputs, dout: Any, out: Any, lse: Any,
                 need_dscale: bool = True) -> tuple[Any, Any, Any, Optional[Any], Optional[np.ndarray]]:
        """(dq, dk, dv, dbias | None, dscale float64 (H,) | None): :func:`run_backward`."""
        if prob.varlen and not packed.in_kernel(prob):
            return packed.backward_by_sequence(run_backward, self.device, prob, inp, dout, out, lse, need_dscale)
        return run_backward(self.device, prob, inp, dout, out, lse, need_dscale=need_dscale)

    def kvcache(self, prob: KVCacheProblem, inp: KVCacheInputs) -> tuple[Any, Any]:
        """KV-cache attention (out (B, H, Nq, D), lse (B, H, Nq) float32; the caches appended to in
        place): :func:`run_kvcache`."""
        return run_kvcache(self.device, prob, inp)
