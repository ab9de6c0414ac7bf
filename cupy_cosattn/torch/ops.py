"""The torch custom ops ``cupy_cosattn::attn_fwd`` / ``attn_bwd`` and their autograd.

Each op has a fake (meta) implementation and the backward is wired through
``torch.library.register_autograd``, so ``torch.compile(fullgraph=True)`` sees one opaque node per
call and no graph break. Every output of both ops is contiguous whatever the inputs' strides
(``outputs``); the fake implementations return exactly those shapes, dtypes and strides.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import bridge_for, check_backend
from .bridge import kernel_backward, kernel_forward
from .checks import check, check_scale_values, is_static
from .cpu import cpu_backward, cpu_forward
from .outputs import empty_grad

OP_FORWARD = "cupy_cosattn::attn_fwd"
OP_BACKWARD = "cupy_cosattn::attn_bwd"

@torch.library.custom_op(OP_FORWARD, mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], attn_bias: Optional[Tensor],
              scale_t: Optional[Tensor], scale: float, attn_bias_batch_dim: bool, groups: int, causal: bool,
              l2norm_qk: bool, deterministic: bool, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(out, lse): out like q, lse float32 of shape q.shape[:-1]. scale_t (if given) overrides scale."""
    prob, shapes = check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim,
                          groups, causal, l2norm_qk, deterministic)
    bridge = bridge_for(q, backend)
    if bridge is not None:  # kernel_inputs checks the scale's values on the host copy it makes anyway
        return kernel_forward(bridge, prob, shapes, q, k, v, mask, attn_bias, scale_t, scale)
    if scale_t is not None:
        check_scale_values(scale_t, prob)
    return cpu_forward(prob, shapes, q, k, v, mask, attn_bias, scale_t, scale)


@_attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, mask, attn_bias, scale_t, scale, attn_bias_batch_dim, groups, causal, l2norm_qk,
                   deterministic, backend="auto"):
    check_backend(backend, q)
    if is_static(q, k, v, mask, attn_bias, scale_t):  # trace-time errors under torch.compile
        check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim, groups, causal,
               l2norm_qk, deterministic)
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)  # new_empty: contiguous


@torch.library.custom_op(OP_BACKWARD, mutates_args=())
def _attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
              attn_bias: Optional[Tensor], scale_t: Optional[Tensor], scale: float, attn_bias_batch_dim: bool,
              groups: int, causal: bool, l2norm_qk: bool, deterministic: bool,
              backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias, dscale); dbias is empty without a bias, dscale empty for a float scale."""
    prob, shapes = check(q, k, v, mask, attn_bias, scale if scale_t is None else scale_t, attn_bias_batch_dim,
                          groups, causal, l2norm_qk, deterministic)
    bridge = bridge_for(q, backend)
    if bridge is not None:
        return kernel_backward(bridge, prob, shapes, dout, q, k, v, out, lse, mask, attn_bias, scale_t, scale)
    if scale_t is not None:
        check_scale_values(scale_t, prob)
    return cpu_backward(prob, shapes, dout, q, k, v, mask, attn_bias, scale_t, scale)


@_attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, mask, attn_bias, scale_t, scale, attn_bias_batch_dim, groups, causal,
                   l2norm_qk, deterministic, backend="auto"):
    check_backend(backend, q)
    dbias = empty_grad(q) if attn_bias is None else attn_bias.new_empty(attn_bias.shape)
    dscale = empty_grad(q) if scale_t is None else scale_t.new_empty(scale_t.shape)
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

