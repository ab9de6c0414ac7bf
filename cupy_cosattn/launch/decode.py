"""KV-cache attention on any device: cuda_src/decode.cu after kvcache.check_kvcache.

One call launches up to three kernels on one stream (their choice: dispatch.select with the
DECODE_KINDS):

1. ``kv_append<T>`` (with k_new / v_new): the new rows into their cache slots, in place;
2. ``decode_fwd<T, DP, BN, WM, RUNNING_MAX>``: grid (row tiles x key-range splits, batch x kv heads);
   with one split it writes out and lse, else fp32 partials;
3. ``decode_combine<T, RUNNING_MAX>`` (more than one split): the partials into out and lse.

The caches are the caller's arrays, used in place where the device holds them (every CuPy array; an
emulator device array); a plain NumPy cache on the emulator is staged in guarded memory and written
back after an append. Either way their layout must suit the kernels (last axis contiguous, rows
16-byte aligned), so that the emulator refuses what the GPU would.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..kvcache import KVCacheInputs, KVCacheProblem
from .arrays import copy_into
from .devices import Device
from .dispatch import DECODE, DECODE_COMBINE, KV_APPEND, decode_fixed_offset, select
from .limits import GRID_X_LIMIT, ITEMSIZE, MAX_HEAD_DIM, check_smem
from .params import DECODE_PARAMS, make_record
from .staging import deliver
from .tiles import ROW_GROUP


def check_kernel_support(prob: KVCacheProblem) -> None:
    """Raise ValueError for what the decode kernels cannot run (nothing launched or written yet)."""
    chunk = 16 // ITEMSIZE[prob.dtype_name]
    if prob.D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={prob.D} is not supported by the KV-cache kernels (at most {MAX_HEAD_DIM}); "
                         f"use backend='reference'")
    if prob.D % chunk:
        raise ValueError(f"the KV-cache kernels read whole 16-byte pieces of a cache row: head dim D={prob.D} must be "
                         f"a multiple of {chunk} for {prob.dtype_name}; use backend='reference'")


def element_strides(name: str, x: Any, prob: KVCacheProblem) -> tuple[int, int, int]:
    """Element strides of cache `x` over (page, kv head, slot); ValueError unless the kernels can use
    its layout (last axis contiguous, every row 16-byte aligned, 16 rows within 2^31 elements)."""
    size = ITEMSIZE[prob.dtype_name]
    chunk = 16 // size
    st = tuple(int(s) for s in x.strides)
    if x.shape[-1] > 1 and st[-1] != size:
        raise ValueError(f"{name} must be contiguous in its last axis (head dim) for the KV-cache kernels, got "
                         f"strides {st} (bytes)")
    el = tuple(s // size for s in st[:3])
    if any(s % size for s in st[:3]) or any(e % chunk for e, n in zip(el, x.shape[:3]) if n > 1):
        raise ValueError(f"{name}'s rows must start 16-byte aligned for the KV-cache kernels: strides {st} (bytes) "
                         f"must be multiples of 16")
    if ROW_GROUP * abs(el[2]) >= 2**31:  # the kernels step through a 16-slot group in 32-bit arithmetic
        raise ValueError(f"{name}'s row stride of {el[2]} elements is too large for the KV-cache kernels "
                         f"({ROW_GROUP} rows must span fewer than 2^31 elements)")
    return el


class DeviceCache:
    """One cache array as the kernels see it: the array they read and write (the caller's own where the
    device holds it, else a staged copy written back by :meth:`write_back`) and its element strides."""

    def __init__(self, dev: Device, name: str, x: Any, prob: KVCacheProblem) -> None:
        strides = element_strides(name, x, prob)
        self.user, self.dev = x, x
        self.staged = not (dev.holds(x) and dev.address(x) % 16 == 0)
        if self.staged:
            self.dev = dev.to_device(x)
            strides = tuple(int(s) // ITEMSIZE[prob.dtype_name] for s in self.dev.strides[:3])
        self.strides = strides

    def write_back(self) -> None:
        if self.staged:
            copy_into(self.user, self.dev)


def run_kvcache(dev: Device, prob: KVCacheProblem, inp: KVCacheInputs) -> tuple[Any, Any]:
    """Run a checked KV-cache call on `dev`. Returns (out (B, H, Nq, D) in prob.dtype, lse (B, H, Nq)
    float32) as arrays of dev's library; the caches are appended to in place."""
    check_kernel_support(prob)
    caps = dev.capabilities()
    caps.check()
    B, H, Hk, Nq, D = prob.B, prob.H, prob.Hk, prob.Nq, prob.D
    if B == 0 or Nq == 0:
        return dev.xp.zeros((B, H, Nq, D), dtype=prob.dtype), dev.xp.full((B, H, Nq), -np.inf, dtype=np.float32)
    attn = select(prob, caps, DECODE, scale=inp.scale)
    check_smem("the KV-cache kernel", prob.dense(prob.max_len, B), attn.smem, caps)
    splits = attn.nsplit
    if attn.grid[0] > GRID_X_LIMIT:
        raise ValueError(f"{attn.grid[0] // splits} row tiles x {splits} splits exceed the grid's x limit")
    running_max = not decode_fixed_offset(prob, inp.scale)
    kc, vc = DeviceCache(dev, "k_cache", inp.k_cache, prob), DeviceCache(dev, "v_cache", inp.v_cache, prob)

    # Every check is above: from here on arrays are staged, written and launched.
    q = dev.to_device(inp.q)
    seqlens = dev.to_device(inp.cache_seqlens)
    table = dev.to_device(inp.block_table) if prob.paged else None
    k_new = dev.to_device(inp.k_new) if prob.append else None
    v_new = dev.to_device(inp.v_new) if prob.append else None
    scale = dev.to_device(dev.xp.asarray(inp.scale, dtype=np.float32))
    out = dev.empty((B, H, Nq, D), prob.dtype)
    lse = dev.empty((B, H, Nq), np.float32)
    part_rows = B * H * Nq
    opart = lpart = mpart = None
    if splits > 1:
        opart = dev.empty((splits, part_rows, D), np.float32)
        lpart = dev.empty((splits, part_rows), np.float32)
        mpart = dev.empty((splits, part_rows), np.float32) if running_max else None

    ps = prob.page_size
    rec = make_record(
        DECODE_PARAMS,
        q=dev.ptr(q), k=dev.ptr(kc.dev), v=dev.ptr(vc.dev), k_new=dev.ptr(k_new), v_new=dev.ptr(v_new),
        seqlens=dev.ptr(seqlens), block_table=dev.ptr(table), scale=dev.ptr(scale), o=dev.ptr(out), lse=dev.ptr(lse),
        opart=dev.ptr(opart), lpart=dev.ptr(lpart), mpart=dev.ptr(mpart),
        q_sn=D, k_sp=kc.strides[0], k_sh=kc.strides[1], k_sn=kc.strides[2],
        v_sp=vc.strides[0], v_sh=vc.strides[1], v_sn=vc.strides[2], o_sn=D,
        bt_sb=prob.max_pages if prob.paged else 0, part_rows=part_rows,
        B=B, H=H, Hk=Hk, Nq=Nq, D=D, new_keys=prob.new_keys, page_size=ps,
        page_shift=(ps.bit_length() - 1) if prob.paged and ps & (ps - 1) == 0 else -1,
        num_splits=splits, n_row_tiles=attn.grid[0] // splits, causal=int(prob.causal), groups=prob.groups,
        norm_qk=int(prob.l2norm_qk),
    )
    if prob.append:
        dev.launch(select(prob, caps, KV_APPEND), rec)
    dev.launch(attn, rec)
    if splits > 1:
        dev.launch(select(prob, caps, DECODE_COMBINE, scale=inp.scale), rec)
    if prob.append:
        kc.write_back()
        vc.write_back()
    _keep_alive = (q, seqlens, table, k_new, v_new, scale, opart, lpart, mpart)  # noqa: F841
    return deliver(dev, out, None), deliver(dev, lse, None)
