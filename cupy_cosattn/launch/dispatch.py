"""Which kernel runs a problem, and how it is launched: :func:`select`.

``select(prob, caps, kind)`` maps dtype x head dim x flags x device capabilities to one
:class:`KernelChoice` (the registry entry, its grid, its tile), for every kernel a call launches:

====================  =======================================================================
kind                  kernel
====================  =======================================================================
``NORM_Q``/``NORM_K`` norm.cu l2norm_fwd over the rows of q / k (the l2norm_qk pre-pass)
``FORWARD``           forward.cu attn_fwd (fixed offset or running max: needs the scale vector)
``PREP``              backward.cu bwd_prep
``DKDV``              backward.cu bwd_dkdv (with its query-head split ``nsplit``)
``DQ``                backward.cu bwd_dq (``deterministic=True``)
``NORM_BWD_Q``/``_K`` norm.cu l2norm_bwd of the fp32 dq-hat / dk-hat
====================  =======================================================================

It never raises: whether the choice fits the device is checked by the runner (``check_smem``), so
that a forward and a backward report their own kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..problem import Problem
from . import limits
from .limits import DeviceCaps, cdiv
from .registry import (
    BACKWARD_SOURCE,
    FORWARD_SOURCE,
    NORM_SOURCE,
    KernelSpec,
    bwd_name,
    fwd_name,
    norm_bwd_name,
    norm_fwd_name,
)
from .tiles import (
    FWD_BLOCK_M,
    FWD_THREADS,
    NORM_ROWS_PER_BLOCK,
    NORM_THREADS,
    PREP_ROWS,
    PREP_THREADS,
    bwd_head_dim_pad,
    choose_nsplit,
    choose_small,
    fixed_offset_ok,
    fwd_block_n,
    fwd_head_dim_pad,
    fwd_smem_bytes,
    kv_config,
    nq_padded,
    q_config,
)

NORM_Q, NORM_K, FORWARD, PREP, DKDV, DQ, NORM_BWD_Q, NORM_BWD_K = (
    "norm_q", "norm_k", "forward", "prep", "dkdv", "dq", "norm_bwd_q", "norm_bwd_k")
KINDS = (NORM_Q, NORM_K, FORWARD, PREP, DKDV, DQ, NORM_BWD_Q, NORM_BWD_K)


@dataclass(frozen=True)
class KernelChoice:
    """One kernel launch: the registry entry (source, name, threads, dynamic shared memory), the grid,
    and what the launch layer needs to fill the kernel's parameters."""

    spec: KernelSpec
    grid: tuple[int, int, int]
    tile: int = 0  # keys per tile_any flag (attn_fwd: its key tile; bwd_dq: its key tile); 0: none
    n_y: int = 0  # work items along grid y (the kernel loops past gridDim.y)
    n_chunks: int = 1  # head-dim chunks per row (backward kernels)
    nsplit: int = 1  # query-head splits per kv head (bwd_dkdv)

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


def select(prob: Problem, caps: DeviceCaps, kind: str, scale: Optional[np.ndarray] = None) -> KernelChoice:
    """The kernel of `kind` (one of KINDS) for `prob` on a device of capabilities `caps`. FORWARD needs
    the (H,) scale vector: the fixed-offset instantiation is correct only below a logit bound."""
    dt = prob.dtype_name
    B, H, Hk, Nq, Nk = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk
    if kind in (NORM_Q, NORM_BWD_Q):
        return norm_choice(dt, B * H * Nq, "float32" if kind == NORM_BWD_Q else None)
    if kind in (NORM_K, NORM_BWD_K):
        return norm_choice(dt, B * Hk * Nk, "float32" if kind == NORM_BWD_K else None)
    if kind == FORWARD:
        if scale is None:
            raise TypeError("select(..., FORWARD) needs the scale vector")
        dp = fwd_head_dim_pad(prob.D)
        bn = fwd_block_n(dt, dp, caps.smem_optin)
        spec = KernelSpec(FORWARD_SOURCE, fwd_name(dt, dp, bn, not fixed_offset_ok(prob, scale)), FWD_THREADS,
                          fwd_smem_bytes(dt, dp, bn))
        return KernelChoice(spec, (cdiv(Nq, FWD_BLOCK_M), _grid_y(B * H), 1), tile=bn, n_y=B * H)
    dp = bwd_head_dim_pad(prob.D)
    kv_small, q_small = choose_small(dt, dp, caps.smem_optin)
    if kind == PREP:
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("prep", dt, dp), PREP_THREADS)
        return KernelChoice(spec, (nq_padded(Nq) // PREP_ROWS, _grid_y(B * H), 1), n_y=B * H)
    if kind == DKDV:
        kv = kv_config(dt, dp, kv_small)
        n_x = cdiv(Nk, kv.rows) * kv.n_chunks
        nsplit = choose_nsplit(prob, n_x, caps.sm_count)
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("dkdv", dt, dp, kv_small), kv.threads, kv.smem)
        return KernelChoice(spec, (n_x, _grid_y(B * Hk * nsplit), 1), n_y=B * Hk * nsplit, n_chunks=kv.n_chunks,
                            nsplit=nsplit)
    if kind == DQ:
        qc = q_config(dt, dp, q_small)
        spec = KernelSpec(BACKWARD_SOURCE, bwd_name("dq", dt, dp, q_small), qc.threads, qc.smem)
        return KernelChoice(spec, (cdiv(Nq, qc.rows) * qc.n_chunks, _grid_y(B * H), 1), tile=qc.tile, n_y=B * H,
                            n_chunks=qc.n_chunks)
    raise ValueError(f"kernel kind must be one of {KINDS}, got {kind!r}")
