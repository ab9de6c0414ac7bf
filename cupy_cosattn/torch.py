"""PyTorch autograd for cosine-sim attention, registered as torch custom ops.

    import cupy_cosattn.torch as cat
    out = cat.cosine_sim_attention(q, k, v, causal=True)      # same keywords as the NumPy API

Two custom ops do the work (``torch.ops.cupy_cosattn.attn_fwd`` / ``attn_bwd``), each with a fake
(meta) implementation and the backward wired through ``torch.library.register_autograd``, so
``torch.compile(fullgraph=True)`` sees one opaque node per call and no graph break.

- CUDA tensors run the fused kernels (``api.forward_canonical`` / ``api.backward_canonical`` with
  backend "cuda") on zero-copy DLPack views (``cupy.from_dlpack``), on torch's current stream. ``out``
  and ``lse`` are allocated by torch and written in place by the kernel; CuPy's own allocations in the
  backward (the gradients, any temporaries) are served by torch's caching allocator.
- Other tensors (the CPU) run a plain torch implementation of the same math, chunked over queries so
  that only a (chunk, Nk) block of scores exists at a time; the backward recomputes the scores chunk by
  chunk. It computes in float32 (float64 for float64 inputs, which the CPU path accepts so that
  ``torch.autograd.gradcheck`` works).

Arguments are checked by ``problem.canonicalize`` itself, run on zero-memory NumPy stand-ins with the
tensors' shapes and dtypes, so every message matches the NumPy/CuPy API. Importing this module does
not import CuPy.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import api as _api
from . import launch as _launch
from . import problem as _problem

__all__ = ["cosine_sim_attention", "forward", "OP_FORWARD", "OP_BACKWARD", "BACKENDS", "CPU_BACKENDS",
           "get_cpu_backend", "set_cpu_backend", "cpu_backend"]

OP_FORWARD = "cupy_cosattn::attn_fwd"
OP_BACKWARD = "cupy_cosattn::attn_bwd"

# Scores per block of the CPU path: a (B, H, chunk, Nk) block holds at most this many elements.
_CPU_BLOCK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------
# argument checking (shared with the NumPy API through NumPy stand-ins)
# --------------------------------------------------------------------------------------------------

# torch dtypes with a NumPy twin (a static table: this also runs under FakeTensorMode, where no tensor
# can be turned into a NumPy array).
_NUMPY_OF_TORCH = {
    torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_,
    torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.complex64: np.complex64, torch.complex128: np.complex128,
}


def _np_dtype(name: str, dt: torch.dtype, cpu: bool):
    """The NumPy dtype that stands in for torch dtype `dt` when problem.canonicalize checks it.

    float64 is accepted on the CPU path (it is checked as float32, the dtype rules being the same)."""
    if dt == torch.bfloat16:
        if _problem.BFLOAT16 is None:  # pragma: no cover - ml_dtypes is a dependency
            raise TypeError(f"{name} is bfloat16, which needs the ml_dtypes package")
        return _problem.BFLOAT16
    if dt == torch.float64 and cpu:
        return np.dtype(np.float32)
    if dt in _NUMPY_OF_TORCH:
        return np.dtype(_NUMPY_OF_TORCH[dt])
    raise TypeError(f"{name} has dtype {dt}; supported are float16, bfloat16 and float32"
                    f"{' (and float64 on the CPU)' if cpu else ''}")


def _stand_in(shape, dtype):
    """A read-only NumPy array of `shape` and `dtype` backed by a single element (all strides 0)."""
    base = np.zeros((1,), dtype=dtype)
    return np.lib.stride_tricks.as_strided(base, shape=tuple(shape), strides=(0,) * len(shape), writeable=False)


def _check_signature(q_sig, k_sig, v_sig, mask_sig, bias_sig, scale_sig, attn_bias_batch_dim, groups, causal,
                     l2norm_qk, deterministic, cpu, arg_types=None):
    """(Problem, canonical shapes {q, k, v, bias}) for tensor signatures; raises like canonicalize.
    `arg_types` only keys the cache (so causal=1 is not served the answer cached for causal=True)."""
    def arr(name, sig):
        return None if sig is None else _stand_in(sig[0], _np_dtype(name, sig[1], cpu))

    if isinstance(scale_sig, tuple):  # a tensor: its shape and dtype are checked here, its values elsewhere
        scale = np.ones(scale_sig[0], dtype=_np_dtype("scale", scale_sig[1], cpu=True))
    else:
        scale = scale_sig
    try:
        prob, inp = _problem.canonicalize(
            arr("q", q_sig), arr("k", k_sig), arr("v", v_sig), mask=arr("mask", mask_sig),
            attn_bias=arr("attn_bias", bias_sig), attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
            groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic)
    except TypeError as e:
        if cpu and "dtype" in str(e) and "supported" in str(e):
            raise TypeError(f"{e} (CPU tensors also accept float64)") from None
        raise
    shapes = dict(q=inp.q.shape, k=inp.k.shape, v=inp.v.shape, bias=None if inp.bias is None else inp.bias.shape)
    return prob, shapes


_check_cached = functools.lru_cache(maxsize=512)(_check_signature)


def _sig(x):
    return None if x is None else (tuple(int(s) for s in x.shape), x.dtype)


def _check(q, k, v, mask, attn_bias, scale, attn_bias_batch_dim, groups, causal, l2norm_qk, deterministic):
    """Check every argument (tensors or fake tensors); returns (Problem, canonical shapes)."""
    named = (("q", q), ("k", k), ("v", v), ("mask", mask), ("attn_bias", attn_bias))
    for name, t in named:
        if t is None and name in ("mask", "attn_bias"):
            continue
        if not isinstance(t, Tensor):
            like = " like q" if name != "q" else ""
            raise TypeError(f"{name} must be a torch.Tensor{like}, got {type(t).__name__} "
                            f"(cupy_cosattn.cosine_sim_attention takes NumPy/CuPy arrays)")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}")
    if isinstance(scale, Tensor):
        if scale.device != q.device:
            raise ValueError(f"scale is on device {scale.device} but q is on {q.device}")
        scale_sig = _sig(scale)
    elif isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_)):
        scale_sig = float(scale)
    else:
        scale_sig = scale  # canonicalize says what is wrong with it
    flags = (attn_bias_batch_dim, groups, causal, l2norm_qk, deterministic)
    key = (_sig(q), _sig(k), _sig(v), _sig(mask), _sig(attn_bias), scale_sig, *flags, q.device.type != "cuda",
           tuple(type(f) for f in flags))
    try:
        hash(key)
    except TypeError:  # an unhashable (hence wrong) argument: check it uncached for the message
        return _check_signature(*key)
    return _check_cached(*key)


def _static(*tensors) -> bool:
    """True when every shape is concrete (not symbolic), so the NumPy check can run on it."""
    return all(t is None or all(type(s) is int for s in t.shape) for t in tensors)


# --------------------------------------------------------------------------------------------------
# CPU path: plain torch, chunked over queries
# --------------------------------------------------------------------------------------------------

def _compute_dtype(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _grouped_l2norm(x: Tensor, groups: int):
    """(x̂, n): each of `groups` chunks of the last dim divided by max(‖chunk‖, 1e-12); n the norms."""
    shape = x.shape
    xs = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    n = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    return (xs / n.clamp_min(_problem.NORM_EPS)).reshape(shape), n


def _grouped_l2norm_backward(xhat: Tensor, n: Tensor, dxhat: Tensor, groups: int) -> Tensor:
    """dx = (dx̂ − x̂⟨x̂, dx̂⟩)/n per chunk, or dx̂/1e-12 where the norm was clamped."""
    shape = xhat.shape
    xs = xhat.reshape(*shape[:-1], groups, shape[-1] // groups)
    dxs = dxhat.reshape(xs.shape)
    big = n > _problem.NORM_EPS
    proj = (xs * dxs).sum(-1, keepdim=True)
    dx = torch.where(big, (dxs - xs * proj) / torch.where(big, n, torch.ones_like(n)), dxs / _problem.NORM_EPS)
    return dx.reshape(shape)


class _Canon:
    """Canonical views (compute dtype) of one call for the CPU path, and its per-chunk scores."""

    def __init__(self, prob, shapes, q, k, v, mask, bias, scale_t, scale):
        cd = _compute_dtype(q.dtype)
        self.prob, self.cd = prob, cd
        self.q = q.reshape(shapes["q"]).to(cd)
        self.k = k.reshape(shapes["k"]).to(cd)
        self.v = v.reshape(shapes["v"]).to(cd)
        self.mask = mask
        self.bias = None if bias is None else bias.reshape(shapes["bias"]).to(cd)
        H = prob.H
        if scale_t is None:
            self.scale = torch.full((H,), float(scale), dtype=cd, device=q.device)
        else:
            self.scale = scale_t.detach().reshape(-1).to(cd).expand(H)
        if prob.l2norm_qk:
            self.qh, self.qn = _grouped_l2norm(self.q, prob.groups)
            self.kh, self.kn = _grouped_l2norm(self.k, prob.groups)
        else:
            self.qh, self.qn, self.kh, self.kn = self.q, None, self.k, None
        self.qs = self.qh * self.scale.view(1, H, 1, 1)  # scale_h·q̂: the scale folded into the queries
        # Can a row end up with no visible key (softmax of all -inf gives NaN, which must become 0)?
        self.may_be_empty = mask is not None or bias is not None or (prob.causal and prob.Nq > prob.Nk)

    def chunks(self):
        """(i0, i1, kend): query rows [i0, i1) see at most keys [0, kend) (causal trims the rest)."""
        p = self.prob
        rows = max(1, _CPU_BLOCK_ELEMS // max(1, p.B * p.H * p.Nk))
        for i0 in range(0, p.Nq, rows):
            i1 = min(p.Nq, i0 + rows)
            kend = min(p.Nk, max(0, i1 + p.Nk - p.Nq)) if p.causal else p.Nk
            yield i0, i1, kend

    def grouped(self, x):
        """(B, H, C, X) -> (B, Hk, G, C, X): the query heads that share a kv head side by side."""
        p = self.prob
        return x.reshape(p.B, p.Hk, p.q_per_kv, x.shape[-2], x.shape[-1])

    def logits(self, i0, i1, kend):
        """s = scale_h·⟨q̂_i, k̂_j⟩ + bias_ij for rows [i0, i1) and keys [0, kend), -inf where excluded."""
        p = self.prob
        B, H, C = p.B, p.H, i1 - i0
        s = (self.grouped(self.qs[:, :, i0:i1]) @ self.kh[:, :, :kend].unsqueeze(2).transpose(-1, -2))
        s = s.reshape(B, H, C, kend)
        if self.bias is not None:
            s = s + self.bias[:, :, i0:i1, :kend]
        vis = None
        if p.causal:
            rows = torch.arange(i0, i1, device=s.device).unsqueeze(1)
            cols = torch.arange(kend, device=s.device).unsqueeze(0)
            vis = (cols <= rows + (p.Nk - p.Nq)).view(1, 1, C, kend)
        if self.mask is not None:
            m = self.mask[:, :kend].view(B, 1, 1, kend)
            vis = m if vis is None else vis & m
        if vis is not None:
            s = s.masked_fill(~vis, float("-inf"))
        return s

    def probs(self, s):
        """Softmax over the visible keys; 0 for a row without any."""
        P = torch.softmax(s, dim=-1)
        return torch.nan_to_num(P, nan=0.0) if self.may_be_empty else P


def _cpu_forward(prob, shapes, q, k, v, mask, bias, scale_t, scale):
    c = _Canon(prob, shapes, q, k, v, mask, bias, scale_t, scale)
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    out = torch.zeros((B, H, Nq, D), dtype=c.cd, device=q.device)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    for i0, i1, kend in c.chunks():
        if kend == 0:
            continue  # no key visible to any row of this chunk: out 0, lse -inf
        s = c.logits(i0, i1, kend)
        o = c.grouped(c.probs(s)) @ c.v[:, :, :kend].unsqueeze(2)  # (B, Hk, G, C, D)
        out[:, :, i0:i1] = o.reshape(B, H, i1 - i0, D)
        lse[:, :, i0:i1] = torch.logsumexp(s, dim=-1).to(torch.float32)  # -inf for a row without a key
    return out.to(q.dtype).reshape(q.shape), lse.reshape(q.shape[:-1])


def _cpu_backward(prob, shapes, dout, q, k, v, mask, bias, scale_t, scale):
    """Gradients by recomputing each query chunk's probabilities (DESIGN.md section 1, backward)."""
    c = _Canon(prob, shapes, q, k, v, mask, bias, scale_t, scale)
    B, H, Nq, D = prob.B, prob.H, prob.Nq, prob.D
    do = dout.reshape(B, H, Nq, D).to(c.cd)
    dqh = torch.zeros_like(c.q)
    dkh = torch.zeros_like(c.k)
    dv = torch.zeros_like(c.v)
    dbias = None if c.bias is None else torch.zeros_like(c.bias)
    dscale = torch.zeros((H,), dtype=c.cd, device=q.device)
    for i0, i1, kend in c.chunks():
        if kend == 0:
            continue
        C = i1 - i0
        P = c.probs(c.logits(i0, i1, kend))
        dog = c.grouped(do[:, :, i0:i1])  # (B, Hk, G, C, D)
        kh, vv = c.kh[:, :, :kend].unsqueeze(2), c.v[:, :, :kend].unsqueeze(2)  # (B, Hk, 1, kend, D)
        dP = (dog @ vv.transpose(-1, -2)).reshape(B, H, C, kend)
        dS = torch._softmax_backward_data(dP, P, -1, P.dtype)  # P ∘ (dP − rowsum(P ∘ dP))
        dSg = c.grouped(dS)
        dv[:, :, :kend] += (c.grouped(P).transpose(-1, -2) @ dog).sum(2)
        g = (dSg @ kh).reshape(B, H, C, D)  # dS·K̂ = dq̂ / scale_h
        dqh[:, :, i0:i1] = g * c.scale.view(1, H, 1, 1)
        dkh[:, :, :kend] += (dSg.transpose(-1, -2) @ c.grouped(c.qs[:, :, i0:i1])).sum(2)
        dscale += (g * c.qh[:, :, i0:i1]).sum(dim=(0, 2, 3))  # Σ dS_ij ⟨q̂_i, k̂_j⟩
        if dbias is not None:
            axes = tuple(ax for ax in (0, 1) if c.bias.shape[ax] == 1)
            dbias[:, :, i0:i1, :kend] = dS.sum(dim=axes, keepdim=True) if axes else dS
    if prob.l2norm_qk:
        dq = _grouped_l2norm_backward(c.qh, c.qn, dqh, prob.groups)
        dk = _grouped_l2norm_backward(c.kh, c.kn, dkh, prob.groups)
    else:
        dq, dk = dqh, dkh
    dq = dq.to(q.dtype).reshape(q.shape)
    dk = dk.to(k.dtype).reshape(k.shape)
    dv = dv.to(v.dtype).reshape(v.shape)
    dbias = _empty(q) if bias is None else dbias.to(bias.dtype).reshape(bias.shape)
    return dq, dk, dv, dbias, _user_dscale(dscale, scale_t, q)


def _empty(q):
    return q.new_empty((0,), dtype=torch.float32)


def _user_dscale(dscale: Tensor, scale_t: Optional[Tensor], q: Tensor) -> Tensor:
    """The (H,) gradient of the scale reduced to scale_t's shape and dtype (empty for a float scale)."""
    if scale_t is None:
        return _empty(q)
    if scale_t.numel() == 1:
        dscale = dscale.sum()
    return dscale.to(device=scale_t.device, dtype=scale_t.dtype).reshape(scale_t.shape)


# --------------------------------------------------------------------------------------------------
# CUDA path: the fused kernels through zero-copy DLPack, on torch's stream and allocator
# --------------------------------------------------------------------------------------------------

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


def _cupy_stream(cupy, ts, device_index: int):
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
        with _cupy_stream(cupy, ts, device.index), cupy.cuda.using_allocator(_TorchMemory(device)):
            yield cupy


def _to_cupy(t: Optional[Tensor], shape=None):
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


def _to_torch(a, dtype: torch.dtype, shape) -> Tensor:
    """A zero-copy tensor view of CuPy array `a` (memory from torch's allocator), as `dtype`, `shape`."""
    if dtype == torch.bfloat16 and a.dtype.itemsize == 2:  # bfloat16 bits (see _to_cupy)
        t = torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_dlpack(a)
    return (t if t.dtype == dtype else t.to(dtype)).reshape(shape)


class _CupyBridge:
    """CUDA tensors <-> CuPy arrays: zero-copy DLPack, torch's stream, torch's caching allocator."""

    backend = "cuda"

    @staticmethod
    def context(device):
        return _torch_stream_and_memory(device)

    to_array = staticmethod(_to_cupy)
    to_tensor = staticmethod(_to_torch)

    @staticmethod
    def ptr(a) -> int:
        return int(a.data.ptr)


class _NumpyBridge:
    """CPU tensors <-> NumPy arrays (zero-copy both ways), for running the kernel backends ("emulator",
    "reference") on CPU tensors through exactly the glue the CUDA path uses."""

    def __init__(self, backend: str):
        self.backend = backend

    @staticmethod
    def context(device):
        return contextlib.nullcontext()

    @staticmethod
    def to_array(t: Optional[Tensor], shape=None):
        if t is None:
            return None
        a = t.view(torch.int16).numpy().view(_problem.BFLOAT16) if t.dtype == torch.bfloat16 else t.numpy()
        return a if shape is None else a.reshape(shape)

    @staticmethod
    def to_tensor(a, dtype: torch.dtype, shape) -> Tensor:
        a = np.ascontiguousarray(a)
        if dtype == torch.bfloat16 and a.dtype.itemsize == 2:
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        return (t if t.dtype == dtype else t.to(dtype)).reshape(shape)

    @staticmethod
    def ptr(a) -> int:
        return int(a.__array_interface__["data"][0])


def _kernel_inputs(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale):
    scale_host = float(scale) if scale_t is None else scale_t.detach().to(torch.float64).cpu().numpy()
    _, scale_vec = _problem._scale_vector(scale_host, prob.H, prob.merged)  # values: finite and > 0
    arr = bridge.to_array
    return _problem.Inputs(
        q=arr(q.contiguous(), shapes["q"]), k=arr(k.contiguous(), shapes["k"]), v=arr(v.contiguous(), shapes["v"]),
        mask=arr(None if mask is None else mask.contiguous()),
        bias=arr(None if bias is None else bias.contiguous(), shapes["bias"]), scale=scale_vec)


def _kernel_forward(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale):
    """Forward on a kernel backend: out and lse are allocated by torch and written by the backend."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    canon = (prob.B, prob.H, prob.Nq, prob.D)
    with bridge.context(q.device):
        inp = _kernel_inputs(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale)
        out_a, lse_a = bridge.to_array(out, canon), bridge.to_array(lse, canon[:-1])
        o, l = _api.forward_canonical(prob, inp, bridge.backend, out=out_a, lse=lse_a)
        if bridge.ptr(o) != bridge.ptr(out_a):  # a backend that did not write in place
            _launch.copy_into(out_a, o)
        if bridge.ptr(l) != bridge.ptr(lse_a):
            _launch.copy_into(lse_a, l)
    return out, lse


def _kernel_backward(bridge, prob, shapes, dout, q, k, v, out, lse, mask, bias, scale_t, scale):
    """Backward on a kernel backend; the gradients it allocates come back to torch without a copy."""
    canon = (prob.B, prob.H, prob.Nq, prob.D)
    with bridge.context(q.device):
        inp = _kernel_inputs(bridge, prob, shapes, q, k, v, mask, bias, scale_t, scale)
        arr = bridge.to_array
        # dscale only for a tensor scale: otherwise the kernels skip it and, on the GPU, the
        # backward's only device-to-host copy with it
        dq, dk, dv, dbias, dscale = _api.backward_canonical(
            prob, inp, arr(dout.contiguous(), canon), arr(out.contiguous(), canon), arr(lse.contiguous(), canon[:-1]),
            bridge.backend, need_dscale=scale_t is not None)
        dq = bridge.to_tensor(dq, q.dtype, q.shape)
        dk = bridge.to_tensor(dk, k.dtype, k.shape)
        dv = bridge.to_tensor(dv, v.dtype, v.shape)
        dbias = _empty(q) if bias is None else bridge.to_tensor(dbias, bias.dtype, bias.shape)
    if scale_t is None:
        return dq, dk, dv, dbias, _empty(q)
    dscale = torch.as_tensor(np.asarray(dscale, dtype=np.float64)).to(q.device)
    return dq, dk, dv, dbias, _user_dscale(dscale, scale_t, q)


# --------------------------------------------------------------------------------------------------
# which implementation runs a call
# --------------------------------------------------------------------------------------------------

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
    for testing that glue and the kernels on small problems. "reference": the float64 NumPy reference.
    The kernel backends take float16, bfloat16 and float32 only."""
    global _cpu_backend
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu backend must be one of {CPU_BACKENDS}, got {name!r}")
    prev, _cpu_backend = _cpu_backend, name
    return prev


@contextlib.contextmanager
def cpu_backend(name: str):
    """Context manager form of `set_cpu_backend`."""
    prev = set_cpu_backend(name)
    try:
        yield
    finally:
        set_cpu_backend(prev)


# The `backend=` keyword: the NumPy/CuPy API's values, plus "torch" (the torch CPU implementation).
BACKENDS = ("auto", "cuda", "torch", "emulator", "reference")


def _check_backend(backend, q: Tensor) -> None:
    """Raise ValueError, naming `backend`, for an unknown value or one that cannot run q's device."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = q.device.type
    if backend == "cuda" and dev != "cuda":
        raise ValueError(f"backend='cuda' runs CUDA tensors, but q is on {q.device} "
                         f"(use backend='auto', 'torch', 'emulator' or 'reference')")
    if backend in CPU_BACKENDS and dev == "cuda":
        raise ValueError(f"backend={backend!r} runs CPU tensors, but q is on {q.device} (use backend='auto' or 'cuda')")
    if backend in ("emulator", "reference") and dev != "cpu":
        raise ValueError(f"backend={backend!r} runs CPU tensors, but q is on {q.device}")


def _bridge_for(q: Tensor, backend: str = "auto"):
    """The bridge to a kernel backend for this call, or None for the torch CPU implementation.

    backend "auto": CUDA tensors run the fused kernels, others what `set_cpu_backend` chose ("torch" by
    default); "cuda", "torch", "emulator", "reference" force that implementation (`_check_backend`)."""
    _check_backend(backend, q)
    if q.device.type == "cuda":
        return _CupyBridge
    name = _cpu_backend if backend == "auto" else backend
    if name == "torch":
        return None
    if q.dtype == torch.float64:
        raise TypeError(f"float64 tensors run only on the 'torch' CPU backend, not {name!r}")
    if q.device.type != "cpu":
        raise ValueError(f"the {name!r} CPU backend runs CPU tensors, but q is on {q.device}")
    return _NumpyBridge(name)


# --------------------------------------------------------------------------------------------------
# the custom ops
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op(OP_FORWARD, mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], attn_bias: Optional[Tensor],
              scale_t: Optional[Tensor], scale: float, attn_bias_batch_dim: bool, groups: int, causal: bool,
              l2norm_qk: bool, deterministic: bool, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(out, lse): out like q, lse float32 of shape q.shape[:-1]. scale_t (if given) overrides scale."""
    prob, shapes = _check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim,
                          groups, causal, l2norm_qk, deterministic)
    bridge = _bridge_for(q, backend)
    if bridge is not None:
        return _kernel_forward(bridge, prob, shapes, q, k, v, mask, attn_bias, scale_t, scale)
    return _cpu_forward(prob, shapes, q, k, v, mask, attn_bias, scale_t, scale)


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, mask, attn_bias, scale_t, scale, attn_bias_batch_dim, groups, causal, l2norm_qk,
                   deterministic, backend="auto"):
    _check_backend(backend, q)
    if _static(q, k, v, mask, attn_bias, scale_t):  # trace-time errors under torch.compile
        _check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim, groups, causal,
               l2norm_qk, deterministic)
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(OP_BACKWARD, mutates_args=())
def _attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
              attn_bias: Optional[Tensor], scale_t: Optional[Tensor], scale: float, attn_bias_batch_dim: bool,
              groups: int, causal: bool, l2norm_qk: bool, deterministic: bool,
              backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias, dscale); dbias is empty without a bias, dscale empty for a float scale."""
    prob, shapes = _check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim,
                          groups, causal, l2norm_qk, deterministic)
    bridge = _bridge_for(q, backend)
    if bridge is not None:
        return _kernel_backward(bridge, prob, shapes, dout, q, k, v, out, lse, mask, attn_bias, scale_t, scale)
    return _cpu_backward(prob, shapes, dout, q, k, v, mask, attn_bias, scale_t, scale)


@_attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, mask, attn_bias, scale_t, scale, attn_bias_batch_dim, groups, causal,
                   l2norm_qk, deterministic, backend="auto"):
    _check_backend(backend, q)
    dbias = _empty(q) if attn_bias is None else attn_bias.new_empty(attn_bias.shape)
    dscale = _empty(q) if scale_t is None else scale_t.new_empty(scale_t.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dscale


def _setup_context(ctx, inputs, output):
    q, k, v, mask, attn_bias, scale_t, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, attn_bias, scale_t, out, lse)
    ctx.flags = flags
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, mask, attn_bias, scale_t, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias, dscale = torch.ops.cupy_cosattn.attn_bwd(dout, q, k, v, out, lse, mask, attn_bias, scale_t,
                                                                *ctx.flags)
    return (dq, dk, dv, None, None if attn_bias is None else dbias, None if scale_t is None else dscale,
            None, None, None, None, None, None, None)


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------

def _autocast(x: Optional[Tensor], dtype: Optional[torch.dtype], keep_float32: bool = False):
    """x cast to the autocast dtype (float32/16 tensors only, as autocast does; a float32 bias may stay)."""
    if x is None or dtype is None or not x.is_floating_point() or x.dtype in (dtype, torch.float64):
        return x
    if keep_float32 and x.dtype == torch.float32:
        return x
    return x.to(dtype)


def _autocast_available(device_type: str) -> bool:
    """Whether autocast knows this device type (torch.is_autocast_enabled raises for e.g. "meta")."""
    check = getattr(torch.amp, "is_autocast_available", None)
    return True if check is None else bool(check(device_type))


def forward(q, k, v, *, mask=None, attn_bias=None, attn_bias_batch_dim=False, scale=_problem.DEFAULT_SCALE,
            groups=1, causal=False, l2norm_qk=True, deterministic=False, backend="auto"):
    """(out, lse) with autograd through out; see `cosine_sim_attention`. lse (q.shape[:-1], float32) is
    the log-sum-exp of each row's visible logits (-inf for a row without one); it has no gradient."""
    if isinstance(q, Tensor):
        dev = q.device.type
        if _autocast_available(dev) and torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            q, k, v = _autocast(q, dt), _autocast(k, dt), _autocast(v, dt)
            attn_bias = _autocast(attn_bias, dt, keep_float32=True)
    scale_t = scale if isinstance(scale, Tensor) else None
    if not torch.compiler.is_compiling():  # eager: check here, before autograd records anything
        _check(q, k, v, mask, attn_bias, scale, attn_bias_batch_dim, groups, causal, l2norm_qk, deterministic)
        if scale_t is None and not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or a torch.Tensor of shape (H,), got {type(scale).__name__}")
    _check_backend(backend, q)  # also while tracing: the value is a constant of the graph
    scale_f = 1.0 if scale_t is not None else float(scale)
    return torch.ops.cupy_cosattn.attn_fwd(q, k, v, mask, attn_bias, scale_t, scale_f, bool(attn_bias_batch_dim),
                                           int(groups), bool(causal), bool(l2norm_qk), bool(deterministic), backend)


def cosine_sim_attention(q, k, v, *, mask=None, attn_bias=None, attn_bias_batch_dim=False,
                         scale=_problem.DEFAULT_SCALE, groups=1, causal=False, l2norm_qk=True, deterministic=False,
                         backend="auto"):
    """Cosine-sim attention with autograd (DESIGN.md section 1).

    q: (B, H, Nq, D) or merged (BH, Nq, D); k, v: (B, Hk, Nk, D) with H % Hk == 0, (B, Nk, D) (one shared
    kv head) or, with a merged q, (BH, Nk, D). mask: bool (B, Nk) (merged: (BH, Nk)), True = may attend.
    attn_bias: (H, Nq, Nk), (B, Nq, Nk) with attn_bias_batch_dim=True, or (B, H, Nq, Nk) (merged:
    (BH, Nq, Nk)); q's dtype or float32; receives a gradient. scale: a float, or a tensor of shape (H,)
    (or one element) that receives a gradient. groups: l2-normalize `groups` chunks of the head dim.
    causal: bottom-right aligned (query i sees key j iff j <= i + Nk - Nq). l2norm_qk=False: q, k are
    already normalized. Rows without a visible key give 0 and contribute no gradient.

    backend: "auto" (default): CUDA tensors run the fused kernels, CPU tensors the torch implementation
    (or what `set_cpu_backend` chose). "cuda": the fused kernels (CUDA tensors only). "torch": the torch
    implementation, "emulator" / "reference": the package's kernels on the CPU emulator / the float64
    NumPy reference (CPU tensors only). Anything else raises ValueError.

    Returns out with q's shape and dtype. Under autocast, q, k, v (and a non-float32 bias) are cast to
    the autocast dtype first. CUDA tensors run the fused kernels; CPU tensors a torch implementation
    (float16, bfloat16, float32, and float64 for gradcheck).
    """
    return forward(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
                   groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic,
                   backend=backend)[0]
