"""Tensors <-> kernel-backend arrays, and the kernel backends' forward and backward on tensors.

- ``CupyBridge``: CUDA tensors as zero-copy CuPy views (DLPack), launched on torch's current stream,
  with CuPy's allocations served by torch's caching allocator.
- ``NumpyBridge``: CPU tensors as zero-copy NumPy views, for the "emulator" and "reference" backends,
  through exactly the glue the CUDA path uses.

Importing this module does not import CuPy.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import api as _api
from .. import problem as _problem
from ..launch.arrays import copy_into
from .outputs import as_output, empty_grad, user_dscale


class _TorchMemory:
    """A CuPy allocator whose blocks are torch.empty uint8 tensors (torch's caching allocator); each
    block's tensor is kept alive by the CuPy memory object that points into it."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, nbytes: int):
        import cupy

        t = torch.empty((max(int(nbytes), 1),), dtype=torch.uint8, device=self.device)
        mem = cupy.cuda.UnownedMemory(t.data_ptr(), int(nbytes), t, self.device.index)
        return cupy.cuda.MemoryPointer(mem, 0)


def cupy_stream(cupy: Any, ts: torch.cuda.Stream, device_index: int) -> Any:
    """CuPy's handle on torch stream `ts` (of device `device_index`, which is current).

    `cupy.cuda.Stream.from_external` (CuPy >= 14) takes any object with the CUDA stream protocol
    (`__cuda_stream__`); it is used only when CuPy has it *and* torch's stream implements the protocol.
    Otherwise the raw handle is wrapped in `cupy.cuda.ExternalStream`. Either way CuPy launches on
    torch's stream and neither side owns the other's stream object."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(ts, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(ts)
    return cupy.cuda.ExternalStream(ts.cuda_stream, device_index)


@contextlib.contextmanager
def _torch_stream_and_memory(device: torch.device):
    """CuPy on `device`, on torch's current stream, allocating from torch's caching allocator."""
    import cupy

    ts = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index):  # the stream is wrapped with its own device current
        with cupy_stream(cupy, ts, device.index), cupy.cuda.using_allocator(_TorchMemory(device)):
            yield cupy


def to_cupy(t: Optional[Tensor], shape: Optional[tuple[int, ...]] = None) -> Any:
    """A zero-copy CuPy view of contiguous tensor `t`, reshaped to `shape`.

    bfloat16 travels as int16 bits and is viewed back as ``ml_dtypes.bfloat16`` (CuPy 14 has no
    bfloat16 arithmetic and DLPack import of it is not guaranteed, but a CuPy array of that 2-byte
    dtype is a valid buffer for the raw kernels); bool falls back to uint8 bits the same way."""
    if t is None:
        return None
    import cupy

    if t.dtype == torch.bfloat16:
        a = cupy.from_dlpack(t.view(torch.int16)).view(_problem.BFLOAT16)
    elif t.dtype == torch.bool:
        try:
            a = cupy.from_dlpack(t)
        except (TypeError, ValueError, BufferError, RuntimeError, NotImplementedError):
            a = cupy.from_dlpack(t.view(torch.uint8)).view(cupy.bool_)
    else:
        a = cupy.from_dlpack(t)
    return a if shape is None else a.reshape(shape)


def to_torch(a: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """A zero-copy tensor view of CuPy array `a` (memory from torch's allocator), as `dtype`, `shape`."""
    if dtype == torch.bfloat16 and a.dtype.itemsize == 2:  # bfloat16 bits (see to_cupy)
        t = torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_dlpack(a)
    return as_output(t, dtype, shape)  # the kernels' arrays are contiguous: no copy


class CupyBridge:
    """CUDA tensors <-> CuPy arrays: zero-copy DLPack, torch's stream, torch's caching allocator."""

    backend = "cuda"

    @staticmethod
    def context(device: torch.device) -> contextlib.AbstractContextManager:
        return _torch_stream_and_memory(device)

    to_array = staticmethod(to_cupy)
    to_tensor = staticmethod(to_torch)

    @staticmethod
    def ptr(a: Any) -> int:
        return int(a.data.ptr)


class NumpyBridge:
    """CPU tensors <-> NumPy arrays (zero-copy both ways), for running the kernel backends ("emulator",
    "reference") on CPU tensors through exactly the glue the CUDA path uses."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    @staticmethod
    def context(device: torch.device) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def to_array(t: Optional[Tensor], shape: Optional[tuple[int, ...]] = None) -> Optional[np.ndarray]:
        if t is None:
            return None
        a = t.view(torch.int16).numpy().view(_problem.BFLOAT16) if t.dtype == torch.bfloat16 else t.numpy()
        return a if shape is None else a.reshape(shape)

    @staticmethod
    def to_tensor(a: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        a = np.ascontiguousarray(a)
        if dtype == torch.bfloat16 and a.dtype.itemsize == 2:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return as_output(t, dtype, shape)

    @staticmethod
    def ptr(a: np.ndarray) -> int:
        return int(a.__array_interface__["data"][0])


# Either bridge: the CupyBridge class (static methods) or a NumpyBridge instance.
Bridge = type[CupyBridge] | NumpyBridge


def kernel_inputs(bridge: Bridge, prob: _problem.Problem, shapes: dict, q: Tensor, k: Tensor, v: Tensor,
                  mask: Optional[Tensor], bias: Optional[Tensor], scale_t: Optional[Tensor],
                  scale: float) -> _problem.Inputs:
    scale_host = float(scale) if scale_t is None else scale_t.detach().to(torch.float64).cpu().numpy()
    _, scale_vec = _problem._scale_vector(scale_host, prob.H, prob.merged)  # values: finite and > 0
    arr = bridge.to_array
    return _problem.Inputs(
        q=arr(q.contiguous(), shapes["q"]), k=arr(k.contiguous(), shapes["k"]), v=arr(v.contiguous(), shapes["v"]),
        mask=arr(None if mask is None else mask.contiguous()),
        bias=arr(None if bias is None else bias.contiguous(), shapes["bias"]), scale=scale_vec)


def kernel_forward(bridge: Bridge, prob: _problem.Problem, shapes: dict, q: Tensor, k: Tensor, v: Tensor,
                   mask: Optional[Tensor], bias: Optional[Tensor], scale_t: Optional[Tensor],
                   scale: float) -> tuple[Tensor, Tensor]:
    """Forward on a kernel backend: out and lse are allocated by torch and written by the backend."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    canon = (prob.B, prob.H, prob.Nq, prob.D)
    with bridge.context(q.device):
        inp = kernel_inputs(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale)
        out_a, lse_a = bridge.to_array(out, canon), bridge.to_array(lse, canon[:-1])
        o, ls = _api.forward_canonical(prob, inp, bridge.backend, out=out_a, lse=lse_a)
        if bridge.ptr(o) != bridge.ptr(out_a):  # a backend that did not write in place
            copy_into(out_a, o)
        if bridge.ptr(ls) != bridge.ptr(lse_a):
            copy_into(lse_a, ls)
    return out, lse


def kernel_backward(bridge: Bridge, prob: _problem.Problem, shapes: dict, dout: Tensor, q: Tensor, k: Tensor, v: Tensor,
                    out: Tensor, lse: Tensor, mask: Optional[Tensor], bias: Optional[Tensor], scale_t: Optional[Tensor],
                    scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward on a kernel backend; the gradients it allocates come back to torch without a copy."""
    canon = (prob.B, prob.H, prob.Nq, prob.D)
    with bridge.context(q.device):
        inp = kernel_inputs(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale)
        arr = bridge.to_array
        # dscale only for a tensor scale: otherwise the kernels skip it and, on the GPU, the
        # backward's only device-to-host copy with it
        dq, dk, dv, dbias, dscale = _api.backward_canonical(
            prob, inp, arr(dout.contiguous(), canon), arr(out.contiguous(), canon), arr(lse.contiguous(), canon[:-1]),
            bridge.backend, need_dscale=scale_t is not None)
        dq = bridge.to_tensor(dq, q.dtype, q.shape)
        dk = bridge.to_tensor(dk, k.dtype, k.shape)
        dv = bridge.to_tensor(dv, v.dtype, v.shape)
        dbias = empty_grad(q) if bias is None else bridge.to_tensor(dbias, bias.dtype, bias.shape)
    if scale_t is None:
        return dq, dk, dv, dbias, empty_grad(q)
    dscale = torch.as_tensor(np.asarray(dscale, dtype=np.float64)).to(q.device)
    return dq, dk, dv, dbias, user_dscale(dscale, scale_t, q)

