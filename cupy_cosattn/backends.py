"""Backend names: which ones exist, which array library each runs on, and what implements each.

This is the one place that maps a backend name to an implementation (and so to a device adapter of
the launch layer); everything below it receives an object, never a name.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from . import problem as _problem
from .problem import Inputs, Problem

BACKENDS = ("auto", "cuda", "emulator", "reference")
_RUNS_ON = {"cuda": "cupy", "emulator": "numpy", "reference": "numpy"}  # backend -> its array library
_AUTO = {"cupy": "cuda", "numpy": "reference"}  # array library -> the backend "auto" picks
_LIBRARY_NAMES = {"cupy": "CuPy", "numpy": "NumPy"}
_HINTS = {"cuda": " (use backend='emulator' to run the same kernels on the CPU)"}
# Backends that compute in float64 and so take float64 input too (the kernels take 16- and 32-bit floats).
_TAKES_FLOAT64 = {"cuda": False, "emulator": False, "reference": True}
# Whether the backward takes each row's softmax from the given lse (the kernels), rather than
# recomputing it from the keys it is given (the reference): ring attention needs the former.
_BACKWARD_USES_LSE = {"cuda": True, "emulator": True, "reference": False}


def resolve_backend(backend: Any, lib: str) -> str:
    """The concrete backend for arrays of library `lib` ('numpy' or 'cupy'); raises ValueError for an
    unknown name and TypeError for a backend that does not run `lib` arrays."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {_problem._quote(backend)}")
    name = _AUTO[lib] if backend == "auto" else backend
    if _RUNS_ON[name] != lib:
        raise TypeError(f"backend={name!r} runs on {_LIBRARY_NAMES[_RUNS_ON[name]]} arrays, got {lib} arrays"
                        f"{_HINTS.get(name, '')}")
    return name


def check_backend_dtype(prob: Any, name: str) -> None:
    """Raise TypeError when backend `name` cannot run prob's dtype (float64 runs on the reference only);
    prob is a Problem or a kvcache.KVCacheProblem."""
    if not _TAKES_FLOAT64[name]:
        _problem.check_kernel_dtype(prob.dtype, name)


def backward_uses_lse(name: str) -> bool:
    """Whether backend `name`'s backward reads the forward's lse (so a partial key set gives the partial
    gradient of the whole row's softmax)."""
    return _BACKWARD_USES_LSE[name]


class ReferenceBackend:
    """The float64 NumPy reference (cupy_cosattn.reference) behind the kernel backends' interface."""

    def forward(self, prob: Problem, inp: Inputs, out: Optional[Any] = None,
                lse: Optional[Any] = None) -> tuple[Any, Any]:
        if prob.varlen:
            from .varlen import VarlenReference

            return VarlenReference.forward(prob, inp, out=out, lse=lse)
        from . import reference

        return reference.forward(prob, inp, out=out, lse=lse)

    def backward(self, prob: Problem, inp: Inputs, dout: Any, out: Any, lse: Any,
                 need_dscale: bool = True) -> tuple[Any, Any, Any, Optional[Any], np.ndarray]:
        """The reference computes dscale whether or not it is needed (it has no copy to save)."""
        if prob.varlen:
            from .varlen import VarlenReference

            return VarlenReference.backward(prob, inp, dout)
        from . import reference

        return reference.backward(prob, inp, dout, out, lse)

    def kvcache(self, prob: Any, inp: Any) -> tuple[Any, Any]:
        """KV-cache attention (kvcache.KVCacheProblem, KVCacheInputs): kvcache.reference_kvcache, which
        appends on the caller's arrays."""
        from . import kvcache

        return kvcache.reference_kvcache(prob, inp)


def _cuda() -> Any:
    from .launch import CudaDevice, KernelBackend

    return KernelBackend(CudaDevice())


def _emulator() -> Any:
    from .launch import EmulatedDevice, KernelBackend

    return KernelBackend(EmulatedDevice())


_IMPLEMENTATIONS: dict[str, Callable[[], Any]] = {"reference": ReferenceBackend, "cuda": _cuda, "emulator": _emulator}


def backend_impl(name: str) -> Any:
    """The implementation of concrete backend `name` (imported lazily: CuPy only for 'cuda'), with
    ``forward(prob, inp, out=None, lse=None)`` and ``backward(prob, inp, dout, out, lse, need_dscale=True)``."""
    return _IMPLEMENTATIONS[name]()
