"""Tile shapes of the kernels, as pure arithmetic on (dtype, padded head dim, device limits).

Forward (cuda_src/forward.cu): BLOCK_M query rows per block, a key tile of :func:`fwd_block_n` keys,
shared memory :func:`fwd_smem_bytes`. Backward (cuda_src/backward.cu): the ``KVTraits`` / ``QTraits``
of bwd_dkdv and bwd_dq, mirrored by :func:`kv_config` and :func:`q_config` (tests compare the two
through the ``bwd_info`` kernel); each has a default and a small-shared-memory variant (template
argument ``SMALL``: half the warps, a 16-row streamed tile), and :func:`choose_small` takes the default
where it fits. Norm (cuda_src/norm.cu): one warp per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..problem import Problem
from .limits import ITEMSIZE, SMEM_OPTIN_LIMIT, round_up, storage_dim

# ---------------------------------------------------------------------------------------------------
# Norm pre-pass.

NORM_THREADS = 128  # norm.cu THREADS: 4 warps, one row each
NORM_ROWS_PER_BLOCK = 4

# ---------------------------------------------------------------------------------------------------
# Forward.

FWD_BLOCK_M = 64  # query rows per block (forward.cu BLOCK_M)
FWD_THREADS = 128  # 4 warps

# Fixed-offset path (forward.cu Headroom): usable when q, k are normalized here, there is no bias,
# and every head's logit bound scale_h * groups is at most this (so exp(s - offset) stays in the
# dtype's normal range).
FIXED_OFFSET_MAX_BOUND = {"float16": 10.0, "bfloat16": 40.0, "float32": 40.0}


def fwd_head_dim_pad(D: int) -> int:
    """The forward kernel's template head dim: the storage dim (D rounded up to 16)."""
    return storage_dim(D)


def fwd_smem_bytes(dtype_name: str, dp: int, bn: int) -> int:
    """Dynamic shared memory of attn_fwd (forward.cu Smem::BYTES): Q, 2 x K, 2 x V (rows padded by
    one 16-byte chunk) and 2 x BN mask bytes."""
    size = ITEMSIZE[dtype_name]
    row = dp + 16 // size
    return (FWD_BLOCK_M + 4 * bn) * row * size + 2 * bn


def fwd_block_n(dtype_name: str, dp: int, smem_limit: int = SMEM_OPTIN_LIMIT) -> int:
    """Keys per K/V tile: as many as registers allow (see docs/kernels.md), halved (down to 16) while
    the tiles exceed the device's shared memory per block `smem_limit`."""
    if dtype_name == "float32":
        bn = 32 if dp <= 128 else 16
    else:
        bn = 64 if dp <= 128 else 32
    while bn > 16 and fwd_smem_bytes(dtype_name, dp, bn) > smem_limit:
        bn //= 2
    return bn


def fixed_offset_ok(prob: Problem, scale: np.ndarray) -> bool:
    """Whether the fixed-offset instantiation (no running max) is correct for this problem."""
    bound = float(np.max(scale)) * prob.groups  # |logit| <= scale_h * groups
    return bool(prob.fixed_offset_safe and bound <= FIXED_OFFSET_MAX_BOUND[prob.dtype_name])


# ---------------------------------------------------------------------------------------------------
# Backward.

PREP_THREADS = 128  # backward.cu PREP_WARPS * 32
PREP_ROWS = 32  # rows per bwd_prep block (PREP_WARPS * PREP_ROWS_PER_WARP)
NQ_PAD = 128  # lse2 / D rows are padded to a multiple of this (every query tile size divides it)
INFO_THREADS = 32  # bwd_info: one warp writes the traits
DQ_F32_MAX_COLS = 112  # backward.cu DQ_F32_MAX_COLS

# Split the query heads of a kv head over several blocks (partial dK/dV summed afterwards) when the
# dK/dV grid would otherwise fill fewer than WAVES waves of the device's SMs (one block per SM).
WAVES = 2
TARGET_BLOCKS = None  # a fixed block target instead of WAVES x SMs (tests)

def nq_padded(Nq: int) -> int:
    """Row length of the backward's lse2 / D buffers: Nq rounded up to NQ_PAD."""
    return round_up(Nq, NQ_PAD)


HEAD_DIM_PADS = tuple(range(16, 129, 16)) + (160, 192, 224, 256)  # every bwd_head_dim_pad value


def bwd_head_dim_pad(D: int) -> int:
    """The backward kernels' template head dim for a problem of head dim D: the storage dim rounded
    up to 16 (to 32 above 128, so that the two head-dim chunks of a block are whole mma tiles)."""
    ds = storage_dim(D)
    return max(16, round_up(ds, 16)) if ds <= 128 else round_up(ds, 32)


@dataclass(frozen=True)
class TileConfig:
    threads: int
    rows: int  # keys per block (dkdv) / queries per block (dq)
    tile: int  # streamed tile: queries (dkdv) / keys (dq)
    dc: int  # head-dim columns accumulated per block
    n_chunks: int
    smem: int


def chunk_cols(dp: int, limit: int) -> int:
    """backward.cu chunk_cols: the widest multiple of 16 dividing dp and at most limit."""
    c = min(limit, dp) // 16 * 16
    while dp % c:
        c -= 16
    return c


def _common(dtype_name: str, dp: int, small: bool) -> tuple[bool, int, int, int]:
    f32 = dtype_name == "float32"
    size = 4 if f32 else 2
    sk = dp + (4 if f32 else 8)
    nw = 2 if (f32 and dp > 128) else 4
    if small:
        nw //= 2
    return f32, size, sk, nw


def kv_config(dtype_name: str, dp: int, small: bool = False) -> TileConfig:
    """bwd_dkdv tiles (backward.cu KVTraits<T, DP, SMALL>). The small variant has half the warps and a
    16-row query tile; with one warp (fp32 above DP = 128) it has no dS^T tile of its own (DS_IN_DO:
    dS^T is staged in the current dO stage)."""
    f32, size, sk, nw = _common(dtype_name, dp, small)
    bc = 16 * nw
    br = 16 if (f32 or small) else (64 if dp <= 64 else 32)
    dc = chunk_cols(dp, 128)
    ds_tile = 0 if (small and nw == 1) else bc * (br + 8)
    smem = size * (2 * bc * sk + 4 * br * sk + ds_tile) + 4 * 4 * br + 4 * bc
    return TileConfig(32 * nw, bc, br, dc, dp // dc, smem)


def q_config(dtype_name: str, dp: int, small: bool = False) -> TileConfig:
    """bwd_dq tiles (backward.cu QTraits<T, DP, SMALL>). The small variant has half the warps and a
    16-row key tile."""
    f32, size, sk, nw = _common(dtype_name, dp, small)
    br = 16 * nw
    bc = 16 if (f32 or small) else (64 if dp <= 64 else 32)
    dc = chunk_cols(dp, DQ_F32_MAX_COLS if f32 else 128)
    smem = size * (2 * br * sk + 4 * bc * sk) + 4 * 2 * bc
    return TileConfig(32 * nw, br, bc, dc, dp // dc, smem)


def choose_small(dtype_name: str, dp: int, smem_limit: int) -> tuple[bool, bool]:
    """(bwd_dkdv small, bwd_dq small): each kernel takes its small variant only where its default
    tiles exceed the device's shared memory per block `smem_limit` (run_backward then raises if even
    the small one does not fit)."""
    return (kv_config(dtype_name, dp).smem > smem_limit, q_config(dtype_name, dp).smem > smem_limit)


def choose_nsplit(prob: Problem, n_x_blocks: int, sm_count: int = 132) -> int:
    """Query-head splits per kv head: the smallest divisor of H / Hk that gives the dK/dV grid at
    least WAVES x sm_count blocks (TARGET_BLOCKS when set; 1 when the grid is big enough unsplit)."""
    target = TARGET_BLOCKS or WAVES * sm_count
    qpk = prob.q_per_kv
    base = n_x_blocks * prob.B * prob.Hk
    for s in range(1, qpk + 1):
        if qpk % s == 0 and (base * s >= target or s == qpk):
            return s
    return qpk
