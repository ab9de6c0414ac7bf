"""Which implementation runs a call of the torch op: the `backend=` keyword and the CPU-backend setting."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from .. import problem as _problem
from .bridge import CupyBridge, NumpyBridge
from .checks import FLOAT64_HINT, np_dtype

CPU_BACKENDS = ("torch", "emulator", "reference")
_cpu_backend = "torch"


def get_cpu_backend() -> str:
    """What runs CPU tensors: "torch" (default), or a NumPy kernel backend, see `set_cpu_backend`."""
    return _cpu_backend


def set_cpu_backend(name: str) -> str:
    """Choose what runs CPU tensors; returns the previous choice.

    "torch" (default): the chunked torch implementation (all dtypes incl. float64; fast).
    "emulator": the package's CUDA kernels run on the CPU by the emulator, through the same glue as the
    CUDA path (tensor -> array views, preallocated out/lse, gradients handed back without a copy) -- slow,
    for testing that glue and the kernels on small problems; float16, bfloat16 and float32 only.
    "reference": the NumPy reference, which computes in float64 (and takes float64 tensors)."""
    global _cpu_backend
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu backend must be one of {CPU_BACKENDS}, got {_problem._quote(name)}")
    prev, _cpu_backend = _cpu_backend, name
    return prev


@contextlib.contextmanager
def cpu_backend(name: str) -> Iterator[None]:
    """Context manager form of `set_cpu_backend`."""
    prev = set_cpu_backend(name)
    try:
        yield
    finally:
        set_cpu_backend(prev)


# The `backend=` keyword: the NumPy/CuPy API's values, plus "torch" (the torch CPU implementation).
BACKENDS = ("auto", "cuda", "torch", "emulator", "reference")


def check_backend(backend: Any, q: Tensor) -> None:
    """Raise ValueError, naming `backend`, for an unknown value or one that cannot run q's device."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {_problem._quote(backend)}")
    dev = q.device.type
    if backend == "cuda" and dev != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA tensors, but q is on {q.device} "
                         f"(use backend='auto', 'torch', 'emulator' or 'reference')")
    if backend in CPU_BACKENDS and dev == "cuda":
        raise ValueError(f"backend={backend!r} runs CPU tensors, but q is on {q.device} (use backend='auto' or 'cuda')")
    if backend in ("emulator", "reference") and dev != "cpu":
        raise ValueError(f"backend={backend!r} runs CPU tensors, but q is on {q.device}")


def bridge_for(q: Tensor, backend: str = "auto") -> type[CupyBridge] | NumpyBridge | None:
    """The bridge to a kernel backend for this call, or None for the torch CPU implementation.

    backend "auto": CUDA tensors run the fused kernels, others what `set_cpu_backend` chose ("torch" by
    default); "cuda", "torch", "emulator", "reference" force that implementation (`check_backend`)."""
    check_backend(backend, q)
    if q.device.type == "cuda":
        return CupyBridge
    name = _cpu_backend if backend == "auto" else backend
    if name == "torch":
        return None
    if name == "emulator":  # the reference takes float64 too
        _problem.check_kernel_dtype(np_dtype("q", q.dtype), name, FLOAT64_HINT)
    if q.device.type != "cpu":
        raise ValueError(f"the {name!r} CPU backend runs CPU tensors, but q is on {q.device}")
    return NumpyBridge(name)

