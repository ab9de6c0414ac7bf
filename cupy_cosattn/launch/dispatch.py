"""Which kernel runs a problem, and how it is launched: :func:`select`.

``select(prob, caps, kind)`` maps dtype x head dim x flags x device capabilities to one
:class:`KernelChoice` (the registry entry, its grid, its tile), for every kernel a call launches:

====================  =======================================================================
kind                  kernel
====================  =======================================================================
``NORM_Q``/``NORM_K`` norm.cu l2norm_fwd over the rows of q / k (the l2norm_qk pre-pass)
``FORWARD``           hopper_fwd.cu attn_fwd_sm90 on a compute capability 9.0 device where it covers
                      the problem (:func:`hopper_forward`), else forward.cu attn_fwd of the tile and
                      mode for the problem (:func:`portable_forward`): needs the scale vector
``PREP``              backward.cu bwd_prep
``DKDV``              backward.cu bwd_dkdv (with its query-head split ``nsplit``)
``DQ``                backward.cu bwd_dq (``deterministic=True``)
``NORM_BWD_Q``/``_K`` norm.cu l2norm_bwd of the fp32 dq-hat / dk-hat
``DECODE``            decode.cu decode_fwd (a kvcache.KVCacheProblem; its key-range split ``nsplit``)
``DECODE_COMBINE``    decode.cu decode_combine of the splits' partials (KVCacheProblem)
``KV_APPEND``         decode.cu kv_append of k_new / v_new into the cache (KVCacheProblem)
====================  =======================================================================

A packed batch (``prob.varlen``) gets the VARLEN instantiations (registry.VARLEN_DTYPES; the launch
layer runs other dtypes' packed batches one sequence at a time, launch/packed.py). It never raises:
whether the choice fits the device is checked by the runner (``check_smem``), so
that a forward and a backward report their own kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..kvcache import MAX_NUM_SPLITS, KVCacheProblem
from ..problem import Problem
from . import limits, sm90
from .limits import DeviceCaps, cdiv
from .registry import (
    BACKWARD_SOURCE,
    DECODE_SOURCE,
    FORWARD_SOURCE,
    NORM_SOURCE,
    KernelSpec,
    append_name,
    bwd_name,
    combine_name,
    decode_name,
    fwd_name,
    norm_bwd_name,
    norm_fwd_name,
    sm90_fwd_name,
)
from .tiles import (
    APPEND_THREADS,
    COMBINE_WARPS,
    DECODE_THREADS,
    FWD_THREADS,
    NORM_ROWS_PER_BLOCK,
    NORM_THREADS,
    PREP_ROWS,
    PREP_THREADS,
    bwd_head_dim_pad,
    choose_nsplit,
    choose_num_splits,
    choose_small,
    decode_config,
    decode_smem_bytes,
    fixed_offset_ok,
    fwd_head_dim_pad,
    fwd_mode,
    fwd_smem_bytes,
    fwd_tile,
    kv_config,
    nq_padded,
    q_config,
)

NORM_Q, NORM_K, FORWARD, PREP, DKDV, DQ, NORM_BWD_Q, NORM_BWD_K = (
    "norm_q", "norm_k", "forward", "prep", "dkdv", "dq", "norm_bwd_q", "norm_bwd_k")
KINDS = (NORM_Q, NORM_K, FORWARD, PREP, DKDV, DQ, NORM_BWD_Q, NORM_BWD_K)
DECODE, DECODE_COMBINE, KV_APPEND = "decode", "decode_combine", "kv_append"
DECODE_KINDS = (DECODE, DECODE_COMBINE, KV_APPEND)  # kinds of a kvcache.KVCacheProblem


@dataclass(frozen=True)
class KernelChoice:
    """One kernel launch: the registry entry (source, name, threads, dynamic shared memory), the grid,
    and what the launch layer needs to fill the kernel's parameters."""

    spec: KernelSpec
    grid: tuple[int, int, int]
    tile: int = 0  # keys per tile_any flag (attn_fwd: its key tile; bwd_dq: its key tile); 0: none
    n_y: int = 0  # work items along grid y (the kernel loops past gridDim.y)
    n_chunks: int = 1  # head-dim chunks per row (backward kernels)
    nsplit: int = 1  # query-head splits per kv head (bwd_dkdv); key-range splits per sequence (decode_fwd)

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.spec.threads, 1, 1)

    @property
    def smem(self) -> int:
        return self.spec.smem


def norm_choice(dtype_name: str, rows: int, grad_dtype_name: Optional[str] = None) -> KernelChoice:
    """The norm kernel over `rows` rows: l2norm_fwd, or l2norm_bwd reading a gradient of
    `grad_dtype_name`."""
    name = norm_fwd_name(dtype_name) if grad_dtype_name is None else norm_bwd_name(dtype_name, grad_dtype_name)
    blocks = min(cdiv(rows, NORM_ROWS_PER_BLOCK), limits.GRID_X_LIMIT)
    return KernelChoice(KernelSpec(NORM_SOURCE, name, NORM_THREADS), (blocks, 1, 1), n_y=rows)


def _grid_y(n: int) -> int:
    return min(n, limits.GRID_YZ_LIMIT)


def portable_forward(prob: Problem, caps: DeviceCaps, scale: np.ndarray) -> KernelChoice:
    """forward.cu attn_fwd for `prob` on a device of capabilities `caps` (any architecture): the mode
    (fixed offset, running max, bias) and the tile that fits the device."""
    dt = prob.dtype_name
    dp = fwd_head_dim_pad(prob.D)
    mode = fwd_mode(prob, scale)
    ft = fwd_tile(dt, dp, caps.smem_optin, mode)
    spec = KernelSpec(FORWARD_SOURCE, fwd_name(dt, dp, ft, mode, prob.varlen), FWD_THREADS,
                      fwd_smem_bytes(dt, dp, ft))
    BH = prob.B * prob.H
    return KernelChoice(spec, (cdiv(prob.Nq, ft.bm), _grid_y(BH), 1), tile=ft.bn, n_y=BH)


def hopper_forward(prob: Problem, caps: DeviceCaps, scale: np.ndarray) -> Optional[KernelChoice]:
    """hopper_fwd.cu attn_fwd_sm90 for `prob` on a compute capability 9.0 device, or None where it does
    not cover the problem or the device (sm90.fallback_reason)."""
    dt, dp, BH = prob.dtype_name, fwd_head_dim_pad(prob.D), prob.B * prob.H
    if sm90.fallback_reason(dt, prob.D, dp, BH, caps.compute_capability, caps.smem_optin) is not None:
        return None
    spec = KernelSpec(sm90.SOURCE, sm90_fwd_name(dt, dp, not fixed_offset_ok(prob, scale)), sm90.THREADS,
                      sm90.smem_bytes(dp), sm90.ARCH)
    return KernelChoice(spec, (cdiv(prob.Nq, sm90.BLOCK_M), _grid_y(BH), 1), tile=sm90.BLOCK_N, n_y=BH)


def decode_fixed_offset(prob: KVCacheProblem, scale: np.ndarray) -> bool:
    """Whether decode_fwd's fixed-offset instantiation is correct for `prob` (the forward's rule)."""
    return fixed_offset_ok(prob.dense(prob.max_len, prob.B), scale)


def _select_decode(prob: KVCacheProblem, caps: DeviceCaps, kind: str, scale: Optional[np.ndarray]) -> KernelChoice:
    dt = prob.dtype_name
    if kind == KV_APPEND:
        pieces = prob.B * prob.Hk * prob.Nq * (prob.D * limits.ITEMSIZE[dt] // 16)
        spec = KernelSpec(DECODE_SOURCE, append_name(dt), APPEND_THREADS)
        return KernelChoice(spec, (max(1, min(cdiv(pieces, APPEND_THREADS), limits.GRID_X_LIMIT)), 1, 1), n_y=pieces)
    if scale is None:
        raise TypeError(f"select(..., {kind.upper()}) needs the scale vector")
    running_max = not decode_fixed_offset(prob, scale)
    rows = prob.B * prob.H * prob.Nq
    if kind == DECODE_COMBINE:
        spec = KernelSpec(DECODE_SOURCE, combine_name(dt, running_max), COMBINE_WARPS * 32)
        return KernelChoice(spec, (max(1, min(cdiv(rows, COMBINE_WARPS), limits.GRID_X_LIMIT)), 1, 1), n_y=rows)
    dp = fwd_head_dim_pad(prob.D)
    wm, bn = decode_config(dt, dp, prob.q_per_kv * prob.Nq, caps.smem_optin)
    n_row_tiles = cdiv(prob.q_per_kv * prob.Nq, 16 * wm)
    base = n_row_tiles * prob.B * prob.Hk
    splits = prob.num_splits or choose_num_splits(base, cdiv(prob.max_len, bn), caps.sm_count, MAX_NUM_SPLITS)
    spec = KernelSpec(DECODE_SOURCE, decode_name(dt, dp, bn, wm, running_max), DECODE_THREADS,
                      decode_smem_bytes(dt, dp, bn, wm))
    return KernelChoice(spec, (n_row_tiles * splits, _grid_y(prob.B * prob.Hk), 1), tile=bn, n_y=prob.B * prob.Hk,
                        nsplit=splits)


def select(prob: Problem | KVCacheProblem, caps: DeviceCaps, kind: str,
           scale: Optional[np.ndarray] = None) -> KernelChoice:
    """The kernel of `kind` for `prob` on a device of capabilities `caps`: one of KINDS for a Problem,
    of DECODE_KINDS for a kvcache.KVCacheProblem. FORWARD, DECODE and DECODE_COMBINE need the (H,)
    scale vector: the fixed-offset instantiations are correct only below a logit bound. DECODE's grid
    x is its row tiles times its key-range splits (``nsplit``: prob.num_splits, or the split heuristic
    :func:`~.tiles.choose_num_splits`), its ``tile`` the key tile."""
    if isinstance(prob, KVCacheProblem):
        if kind not in DECODE_KINDS:
            raise ValueError(f"a KV-cache problem's kernel kind must be one of {DECODE_KINDS}, got {kind!r}")
        return _select_decode(prob, caps, kind, scale)
    dt = prob.dtype_name
    B, H, Hk, Nq, Nk = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk
    if kind in (NORM_Q, NORM_BWD_Q):
        return norm_choice(dt, prob.q_rows, "float32" if kind == NORM_BWD_Q else None)
    if kind in (NORM_K, NORM_BWD_K):
        return norm_choice(dt, prob.k_rows, "float32" if kind == NORM_BWD_K else None)
    if kind == FORWARD:
        if scale is None:
            raise TypeError("select(..., FORWARD) needs the scale vector")
        hopper = None if prob.varlen else hopper_forward(prob, caps, scale)  # no packed-batch Hopper kernel
        return hopper or portable_forward(prob, caps, scale)
    dp = bwd_head_dim_pad(prob.D)
    kv_small, q_small = choose_small(dt, dp, caps.smem_optin)
    if kind == PREP:
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("prep", dt, dp, varlen=prob.varlen), PREP_THREADS)
        return KernelChoice(spec, (nq_padded(Nq) // PREP_ROWS, _grid_y(B * H), 1), n_y=B * H)
    if kind == DKDV:
        kv = kv_config(dt, dp, kv_small)
        n_x = cdiv(Nk, kv.rows) * kv.n_chunks
        nsplit = choose_nsplit(prob, n_x, caps.sm_count)
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("dkdv", dt, dp, kv_small, prob.varlen), kv.threads, kv.smem)
        return KernelChoice(spec, (n_x, _grid_y(B * Hk * nsplit), 1), n_y=B * Hk * nsplit, n_chunks=kv.n_chunks,
                            nsplit=nsplit)
    if kind == DQ:
        qc = q_config(dt, dp, q_small)
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("dq", dt, dp, q_small, prob.varlen), qc.threads, qc.smem)
        return KernelChoice(spec, (cdiv(Nq, qc.rows) * qc.n_chunks, _grid_y(B * H), 1), tile=qc.tile, n_y=B * H,
                            n_chunks=qc.n_chunks)
    raise ValueError(f"kernel kind must be one of {KINDS}, got {kind!r}")
