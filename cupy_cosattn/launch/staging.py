"""What the forward and the backward launch both do: stage a problem's inputs on the device, fill the
``AttnParams`` part of their records, and hand results back.

The kernels read every tensor as contiguous rows of ``storage_dim(D)`` elements, zero past D, each row
16-byte aligned (docs/kernels.md); :func:`stage` makes them so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..problem import Inputs, Problem
from .arrays import copy_into
from .devices import Device
from .dispatch import NORM_K, NORM_Q, select
from .limits import DeviceCaps, cdiv, storage_dim
from .norm import l2norm
from .params import NORM_MODE_COPY, NORM_MODE_ZERO_NONFINITE


@dataclass
class Staged:
    """Device buffers of one problem that every attention kernel reads."""

    q: Any  # (B, H, Nq, Ds): qhat (the norm pre-pass output) or q, zero-padded to Ds columns
    k: Any  # (B, Hk, Nk, Ds): khat or k
    v: Any  # (B, Hk, Nk, Ds)
    scale: Any  # (H,) float32
    mask: Any  # (B, Nk) uint8, or None
    tile_any: Any  # (B, cdiv(Nk, tile)) uint8, or None
    tile: int  # keys per tile_any flag
    bias: Any  # contiguous (Bb, Hb, Nq, Nk), or None
    bias_f32: bool
    cu_seqlens_q: Any = None  # packed batches: int32 (B + 1,) on the device, else None
    cu_seqlens_k: Any = None

    @property
    def cols(self) -> int:
        """Ds: the row length of q, k, v (and of o, dout where the runners pad them)."""
        return int(self.q.shape[-1])


def padded(dev: Device, x: Any, cols: int) -> Any:
    """Contiguous device copy of x (..., D) with rows zero-padded to `cols` elements (x itself when
    it already is a contiguous device array of `cols` columns)."""
    if x.shape[-1] == cols:
        return dev.to_device(x)
    out = dev.zeros(tuple(x.shape[:-1]) + (cols,), x.dtype)
    copy_into(out[..., : x.shape[-1]], x)
    return out


def tile_any(dev: Device, mask: Any, block_n: int) -> Any:
    """(B, ceil(Nk / block_n)) uint8 flags: whether key tile j of batch b has any unmasked key.
    Kernels skip the flagged-off tiles entirely (no loads, no math)."""
    xp = dev.xp
    B, Nk = mask.shape
    nt = cdiv(Nk, block_n)
    flags = xp.zeros((B, nt * block_n), dtype=np.bool_)
    flags[:, :Nk] = mask
    return dev.to_device(flags.reshape(B, nt, block_n).any(axis=-1).astype(np.uint8))


def stage(dev: Device, prob: Problem, inp: Inputs, caps: DeviceCaps, tile: int,
          zero_nonfinite: bool = False) -> Staged:
    """The device buffers of `prob`: q, k through the norm pre-pass when prob.l2norm_qk (else
    zero-padded copies), v, the float32 scale, the mask as bytes and, for a key tile of `tile` keys
    (0: none), its tile flags. zero_nonfinite (the backward's operands): what is not finite in q, k
    and v becomes 0, through the norm kernel (which then also copies v, and q, k without l2norm_qk)."""
    Ds = storage_dim(prob.D)
    zero = NORM_MODE_ZERO_NONFINITE if zero_nonfinite else 0
    if prob.l2norm_qk or zero_nonfinite:
        mode = zero | (0 if prob.l2norm_qk else NORM_MODE_COPY)
        q, _ = l2norm(dev, dev.to_device(inp.q), prob.groups, Ds, choice=select(prob, caps, NORM_Q), mode=mode)
        k, _ = l2norm(dev, dev.to_device(inp.k), prob.groups, Ds, choice=select(prob, caps, NORM_K), mode=mode)
    else:
        q, k = padded(dev, inp.q, Ds), padded(dev, inp.k, Ds)
    if zero_nonfinite:
        v, _ = l2norm(dev, dev.to_device(inp.v), 1, Ds, mode=zero | NORM_MODE_COPY)
    else:
        v = padded(dev, inp.v, Ds)
    mask = flags = None
    if prob.has_mask:
        m = inp.mask
        mask = dev.to_device(m.view(np.uint8) if m.dtype == np.bool_ else m.astype(np.uint8))
        flags = tile_any(dev, m, tile) if tile else None
    bias = dev.to_device(inp.bias) if prob.has_bias else None
    cu_q = cu_k = None
    if prob.varlen:
        cu_q = dev.to_device(dev.xp.asarray(inp.cu_seqlens_q, dtype=np.int32))
        cu_k = dev.to_device(dev.xp.asarray(inp.cu_seqlens_k, dtype=np.int32))
    return Staged(q=q, k=k, v=v, scale=dev.to_device(dev.xp.asarray(inp.scale, dtype=np.float32)),
                  mask=mask, tile_any=flags, tile=tile, bias=bias,
                  bias_f32=prob.has_bias and np.dtype(inp.bias.dtype) == np.float32, cu_seqlens_q=cu_q,
                  cu_seqlens_k=cu_k)


def attn_fields(dev: Device, prob: Problem, st: Staged, o: Any, lse: Any) -> dict[str, int]:
    """The AttnParams fields (cuda_src/params.cuh) of `prob` with staged inputs `st`, output (or, in
    the backward, the forward's output) `o` (B, H, Nq, Ds) and `lse` (B, H, Nq) float32; for a packed
    batch o (total_q, H, Ds) and lse (H, total_q)."""
    B, H, Hk, Nq, Nk = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk
    Ds = st.cols
    if prob.varlen:  # batch strides 0: each kernel moves its pointers to its sequence (params.cuh seq_view)
        return dict(
            q=dev.ptr(st.q), k=dev.ptr(st.k), v=dev.ptr(st.v), o=dev.ptr(o), lse=dev.ptr(lse), scale=dev.ptr(st.scale),
            mask=0, tile_any=0, bias=0, cu_seqlens_q=dev.ptr(st.cu_seqlens_q), cu_seqlens_k=dev.ptr(st.cu_seqlens_k),
            q_sb=0, q_sh=Ds, q_sn=H * Ds, k_sb=0, k_sh=Ds, k_sn=Hk * Ds, v_sb=0, v_sh=Ds, v_sn=Hk * Ds,
            o_sb=0, o_sh=Ds, o_sn=H * Ds, lse_sb=0, lse_sh=prob.total_q,
            bias_sb=0, bias_sh=0, bias_sq=0, mask_sb=0, tile_any_sb=0,
            B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=Ds, causal=int(prob.causal), bias_f32=0,
        )
    Bb, Hb = prob.bias_shape[:2] if prob.has_bias else (1, 1)
    return dict(
        q=dev.ptr(st.q), k=dev.ptr(st.k), v=dev.ptr(st.v), o=dev.ptr(o), lse=dev.ptr(lse), scale=dev.ptr(st.scale),
        mask=dev.ptr(st.mask), tile_any=dev.ptr(st.tile_any), bias=dev.ptr(st.bias), cu_seqlens_q=0, cu_seqlens_k=0,
        q_sb=H * Nq * Ds, q_sh=Nq * Ds, q_sn=Ds,
        k_sb=Hk * Nk * Ds, k_sh=Nk * Ds, k_sn=Ds,
        v_sb=Hk * Nk * Ds, v_sh=Nk * Ds, v_sn=Ds,
        o_sb=H * Nq * Ds, o_sh=Nq * Ds, o_sn=Ds,
        lse_sb=H * Nq, lse_sh=Nq,
        # a broadcast bias dim has stride 0; keys are contiguous
        bias_sb=Hb * Nq * Nk if Bb > 1 else 0, bias_sh=Nq * Nk if Hb > 1 else 0, bias_sq=Nk if prob.has_bias else 0,
        mask_sb=Nk if prob.has_mask else 0, tile_any_sb=cdiv(Nk, st.tile) if st.tile_any is not None else 0,
        B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=Ds, causal=int(prob.causal), bias_f32=int(st.bias_f32),
    )


def deliver(dev: Device, src: Any, dst: Optional[Any]) -> Any:
    """A kernel result for the caller: copied into the caller's preallocated `dst` (returned), or with
    dst None a plain contiguous array of the device's library."""
    if dst is None:
        return dev.export(src)
    copy_into(dst, src)
    return dst
