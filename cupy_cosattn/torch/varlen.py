"""Packed variable-length batches in torch: ``varlen_cosine_sim_attention`` and the custom ops
``cupy_cosattn::varlen_fwd`` / ``varlen_bwd`` (autograd, fake implementations, no graph break under
``torch.compile(fullgraph=True)``).

Layout and semantics are the NumPy API's (cupy_cosattn/varlen.py): q (total_q, H, D), k and v
(total_k, Hk, D), cu_seqlens_q / cu_seqlens_k int32 (batch + 1,) tensors on q's device; lse float32
(total_q, H). CUDA tensors run the kernels' packed-batch instantiations on zero-copy views; CPU
tensors run the torch CPU implementation sequence by sequence (or the emulator / reference, as chosen
by ``backend=`` or ``set_cpu_backend``). The arguments, cu_seqlens values included, are checked by
``varlen.canonicalize_varlen`` on views of the tensors, when the op runs (eager or compiled): the
values need the host copy of cu_seqlens that the launch reads anyway. While tracing, the fake
implementations check the shapes.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import api as _api
from .. import problem as _problem
from .. import varlen as _varlen
from ..launch.arrays import copy_into
from ..problem import Problem
from .backends import bridge_for, check_backend
from .bridge import Bridge, NumpyBridge
from .cpu import cpu_backward, cpu_forward
from .functional import _autocast, _autocast_available
from .outputs import as_output, empty_grad, user_dscale

OP_VARLEN_FORWARD = "cupy_cosattn::varlen_fwd"
OP_VARLEN_BACKWARD = "cupy_cosattn::varlen_bwd"


def _canonical(arr, q, k, v, cu_q, cu_k, scale_t, scale, max_q, max_k, groups, causal, l2norm_qk,
               deterministic) -> tuple[Problem, _problem.Inputs]:
    """canonicalize_varlen on array views (`arr`: a bridge's to_array) of the tensors: every check."""
    scale_host = float(scale) if scale_t is None else scale_t.detach().to(torch.float64).cpu().numpy()
    try:
        return _varlen.canonicalize_varlen(
            arr(q.contiguous()), arr(k.contiguous()), arr(v.contiguous()), arr(cu_q.contiguous()),
            arr(cu_k.contiguous()), max_seqlen_q=max_q, max_seqlen_k=max_k, scale=scale_host, groups=groups,
            causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic)
    except TypeError as e:
        msg = str(e)
        if msg.endswith(_problem.FLOAT64_NOTE):
            raise TypeError(msg[:-len(_problem.FLOAT64_NOTE)] + "and float64 on CPU tensors") from None
        raise


def _sequences(prob: Problem, inp: _problem.Inputs):
    """(b, query rows, key rows) of each sequence that has queries and keys."""
    for b in range(prob.B):
        qs = slice(int(inp.cu_seqlens_q[b]), int(inp.cu_seqlens_q[b + 1]))
        ks = slice(int(inp.cu_seqlens_k[b]), int(inp.cu_seqlens_k[b + 1]))
        if qs.stop > qs.start and ks.stop > ks.start:
            yield b, qs, ks


def _dense(x: Tensor, rows: slice) -> Tensor:
    """Rows of a packed (total, heads, D) tensor as a dense (1, heads, n, D) one."""
    return x[rows].transpose(0, 1).unsqueeze(0)


def _sub(prob: Problem, nq: int, nk: int) -> tuple[Problem, dict]:
    sub = Problem(B=1, H=prob.H, Hk=prob.Hk, Nq=nq, Nk=nk, D=prob.D, dtype=prob.dtype, groups=prob.groups,
                  causal=prob.causal, l2norm_qk=prob.l2norm_qk, per_head_scale=prob.per_head_scale,
                  deterministic=prob.deterministic)
    shapes = dict(q=(1, prob.H, nq, prob.D), k=(1, prob.Hk, nk, prob.D), v=(1, prob.Hk, nk, prob.D), bias=None)
    return sub, shapes


def _cpu_forward(prob, inp, q, k, v, scale_t, scale) -> tuple[Tensor, Tensor]:
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for _, qs, ks in _sequences(prob, inp):
        sub, shapes = _sub(prob, qs.stop - qs.start, ks.stop - ks.start)
        o, ls = cpu_forward(sub, shapes, _dense(q, qs), _dense(k, ks), _dense(v, ks), None, None, scale_t, scale)
        out[qs] = o[0].transpose(0, 1)
        lse[qs] = ls[0].T
    return out, lse


def _cpu_backward(prob, inp, dout, q, k, v, scale_t, scale) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv = (torch.zeros(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    dscale = None
    for _, qs, ks in _sequences(prob, inp):
        sub, shapes = _sub(prob, qs.stop - qs.start, ks.stop - ks.start)
        g = cpu_backward(sub, shapes, _dense(dout, qs), _dense(q, qs), _dense(k, ks), _dense(v, ks), None, None,
                         scale_t, scale)
        dq[qs], dk[ks], dv[ks] = (x[0].transpose(0, 1) for x in g[:3])
        dscale = g[4] if dscale is None else dscale + g[4]
    if scale_t is None:
        return dq, dk, dv, empty_grad(q)
    return dq, dk, dv, torch.zeros_like(scale_t) if dscale is None else dscale


def _kernel_forward(bridge: Bridge, q, k, v, cu_q, cu_k, scale_t, scale, flags) -> tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    with bridge.context(q.device):
        prob, inp = _canonical(bridge.to_array, q, k, v, cu_q, cu_k, scale_t, scale, *flags)
        out_a, lse_a = bridge.to_array(out), bridge.to_array(lse)
        o, ls = _api.varlen_forward_canonical(prob, inp, bridge.backend, out=out_a, lse=lse_a)
        if bridge.ptr(o) != bridge.ptr(out_a):  # a backend that did not write in place
            copy_into(out_a, o)
        if bridge.ptr(ls) != bridge.ptr(lse_a):
            copy_into(lse_a, ls)
    return out, lse


def _kernel_backward(bridge: Bridge, dout, q, k, v, out, lse, cu_q, cu_k, scale_t, scale,
                     flags) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with bridge.context(q.device):
        prob, inp = _canonical(bridge.to_array, q, k, v, cu_q, cu_k, scale_t, scale, *flags)
        arr = bridge.to_array
        dq, dk, dv, dscale = _api.varlen_backward_canonical(
            prob, inp, arr(dout.contiguous()), arr(out.contiguous()), arr(lse.contiguous()), bridge.backend,
            need_dscale=scale_t is not None)
        dq = bridge.to_tensor(dq, q.dtype, q.shape)
        dk = bridge.to_tensor(dk, k.dtype, k.shape)
        dv = bridge.to_tensor(dv, v.dtype, v.shape)
    if scale_t is None:
        return dq, dk, dv, empty_grad(q)
    dscale = torch.as_tensor(np.asarray(dscale, dtype=np.float64)).to(q.device)
    return dq, dk, dv, user_dscale(dscale, scale_t, q)


@torch.library.custom_op(OP_VARLEN_FORWARD, mutates_args=())
def _varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, scale_t: Optional[Tensor],
                scale: float, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], groups: int, causal: bool,
                l2norm_qk: bool, deterministic: bool, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(out like q, lse float32 (total_q, H)). scale_t (if given) overrides scale."""
    flags = (max_seqlen_q, max_seqlen_k, groups, causal, l2norm_qk, deterministic)
    bridge = bridge_for(q, backend)
    if bridge is not None:
        return _kernel_forward(bridge, q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t, scale, flags)
    prob, inp = _canonical(NumpyBridge.to_array, q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t, scale, *flags)
    out, lse = _cpu_forward(prob, inp, q, k, v, scale_t, scale)
    return as_output(out, q.dtype, q.shape), lse


def _check_fake_shapes(q, k, v, cu_q, cu_k) -> None:
    if all(type(s) is int for t in (q, k, v, cu_q, cu_k) for s in t.shape):  # trace-time shape errors
        _varlen.check_varlen_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(cu_q.shape),
                                    tuple(cu_k.shape))


@_varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t, scale, max_seqlen_q, max_seqlen_k, groups, causal,
                     l2norm_qk, deterministic, backend="auto"):
    check_backend(backend, q)
    _check_fake_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)  # new_empty: contiguous


@torch.library.custom_op(OP_VARLEN_BACKWARD, mutates_args=())
def _varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
                cu_seqlens_k: Tensor, scale_t: Optional[Tensor], scale: float, max_seqlen_q: Optional[int],
                max_seqlen_k: Optional[int], groups: int, causal: bool, l2norm_qk: bool, deterministic: bool,
                backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dscale); dscale is empty for a float scale."""
    flags = (max_seqlen_q, max_seqlen_k, groups, causal, l2norm_qk, deterministic)
    bridge = bridge_for(q, backend)
    if bridge is not None:
        return _kernel_backward(bridge, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale_t, scale, flags)
    prob, inp = _canonical(NumpyBridge.to_array, q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t, scale, *flags)
    dq, dk, dv, dscale = _cpu_backward(prob, inp, dout, q, k, v, scale_t, scale)
    return as_output(dq, q.dtype, q.shape), as_output(dk, k.dtype, k.shape), as_output(dv, v.dtype, v.shape), dscale


@_varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale_t, scale, max_seqlen_q, max_seqlen_k,
                     groups, causal, l2norm_qk, deterministic, backend="auto"):
    check_backend(backend, q)
    dscale = empty_grad(q) if scale_t is None else scale_t.new_empty(scale_t.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dscale


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, scale_t, *flags = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, scale_t, out, lse)
    ctx.flags = flags
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, cu_q, cu_k, scale_t, out, lse = ctx.saved_tensors
    dq, dk, dv, dscale = torch.ops.cupy_cosattn.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale_t, *ctx.flags)
    return (dq, dk, dv, None, None, None if scale_t is None else dscale) + (None,) * len(ctx.flags)


_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                   max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                   scale: float | Tensor = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                   l2norm_qk: bool = True, deterministic: bool = False, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(out, lse) of `varlen_cosine_sim_attention`, with autograd through out (lse has no gradient)."""
    named = (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {_problem._describe(t)} "
                            f"(cupy_cosattn.varlen_forward takes NumPy/CuPy arrays)")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}")
    dev = q.device.type
    if _autocast_available(dev) and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        q, k, v = _autocast(q, dt), _autocast(k, dt), _autocast(v, dt)
    scale_t = scale if isinstance(scale, Tensor) else None
    if scale_t is None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a float or a torch.Tensor of shape (H,), got {_problem._describe(scale)}")
    if scale_t is not None and scale_t.device != q.device:
        raise ValueError(f"scale is on device {scale_t.device} but q is on {q.device}")
    check_backend(backend, q)
    if not torch.compiler.is_compiling():  # eager: the shapes now, the values when the op runs
        _varlen.check_varlen_shapes(tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(cu_seqlens_q.shape),
                                    tuple(cu_seqlens_k.shape))
    scale_f = 1.0 if scale_t is not None else float(scale)
    return torch.ops.cupy_cosattn.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t, scale_f, max_seqlen_q,
                                             max_seqlen_k, int(groups), bool(causal), bool(l2norm_qk),
                                             bool(deterministic), backend)


def varlen_cosine_sim_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                                max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                                scale: float | Tensor = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                                l2norm_qk: bool = True, deterministic: bool = False,
                                backend: str = "auto") -> Tensor:
    """Cosine-sim attention over a packed batch of variable-length sequences, with autograd.

    q (total_q, H, D); k, v (total_k, Hk, D) with H % Hk == 0; cu_seqlens_q, cu_seqlens_k int32
    (batch + 1,) tensors on q's device, starting at 0, non-decreasing, ending at total_q / total_k.
    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] attending to its own keys
    k[cu_seqlens_k[b]:cu_seqlens_k[b+1]] only; causal is bottom-right per sequence; empty sequences
    are allowed. max_seqlen_q / _k: optional upper bounds, checked. scale: a float or a tensor of
    shape (H,) or () that receives a gradient. Other keywords as `cosine_sim_attention`.

    Returns out (total_q, H, D) in q's dtype. Checking cu_seqlens reads it on the host (one
    device-to-host copy per call on CUDA, which the launch needs anyway for its grid).
    """
    return varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                          scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                          deterministic=deterministic, backend=backend)[0]
