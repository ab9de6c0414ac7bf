"""Tile shapes of the kernels, as pure arithmetic on (dtype, padded head dim, device limits).

Forward (cuda_src/forward.cu): the tile shape :func:`fwd_tile` (query rows per block, keys per tile,
K/V buffers), shared memory :func:`fwd_smem_bytes`. Decode (cuda_src/decode.cu): :func:`decode_config`
(rows per block WM x 16, key tile BN: :func:`decode_block_n`), :func:`decode_smem_bytes`, and the
split heuristic :func:`choose_num_splits`. Backward (cuda_src/backward.cu): the ``KVTraits`` / ``QTraits``
of bwd_dkdv and bwd_dq, mirrored by :func:`kv_config` and :func:`q_config` (tests compare the two
through the ``bwd_info`` kernel); each has a default and a small-shared-memory variant (template
argument ``SMALL``: half the warps, a 16-row streamed tile), and :func:`choose_small` takes the default
where it fits. Norm (cuda_src/norm.cu): one warp per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..problem import Problem
from .limits import ITEMSIZE, SMEM_OPTIN_BY_ARCH, SMEM_OPTIN_LIMIT, round_up, storage_dim

# ---------------------------------------------------------------------------------------------------
# Norm pre-pass.

NORM_THREADS = 128  # norm.cu THREADS: 4 warps, one row each
NORM_ROWS_PER_BLOCK = 4

# ---------------------------------------------------------------------------------------------------
# Forward.

FWD_THREADS = 128  # forward.cu THREADS: 4 warps
SMEM_RESERVED_PER_BLOCK = 1024  # shared memory the hardware reserves per resident block (sm_80, sm_90)
FWD_MIN_BLOCKS_PER_SM = 2  # K/V double-buffering is taken only where this many blocks still fit
# attn_fwd's MODE (forward.cu): the fixed offset, the running max without a bias, the running max with a
# bias (the bias's loads take the registers that the others spend on 32 rows per warp).
FWD_FIXED, FWD_RUNNING_MAX, FWD_BIAS = 0, 1, 2
FWD_MODES = (FWD_FIXED, FWD_RUNNING_MAX, FWD_BIAS)

# Fixed-offset path (forward.cu Headroom): usable when q, k are normalized here, there is no bias,
# and every head's logit bound scale_h * groups is at most this (so exp(s - offset) stays in the
# dtype's normal range).
FIXED_OFFSET_MAX_BOUND = {"float16": 10.0, "bfloat16": 40.0, "float32": 40.0}


@dataclass(frozen=True)
class FwdTile:
    """attn_fwd's tile shape (its template arguments BM, BN, KV_BUFS): `bm` query rows per block (4
    warps of bm / 4 rows), `bn` keys per K/V tile, `kv_bufs` buffers each of K and V (2: the next tile
    prefetched whole; 1: V and the next K loads staggered against the two halves of the tile's work)."""

    bm: int
    bn: int
    kv_bufs: int


def fwd_head_dim_pad(D: int) -> int:
    """The forward kernel's template head dim: the storage dim (D rounded up to 16)."""
    return storage_dim(D)


def fwd_smem_bytes(dtype_name: str, dp: int, tile: FwdTile) -> int:
    """Dynamic shared memory of attn_fwd (forward.cu Layout::BYTES): Q (bm rows), kv_bufs x (K, V) of
    bn rows (rows padded by one 16-byte chunk) and 2 x bn mask bytes."""
    size = ITEMSIZE[dtype_name]
    pitch = (dp + 16 // size) * size
    return (tile.bm + 2 * tile.kv_bufs * tile.bn) * pitch + 2 * tile.bn


def fwd_tile(dtype_name: str, dp: int, smem_limit: int = SMEM_OPTIN_LIMIT, mode: int = FWD_FIXED) -> FwdTile:
    """The forward's tile for `mode` on a device with `smem_limit` bytes of shared memory per block
    (opt-in; an SM has that plus the 1 KB reserved per block).

    Rows: 128 per block (32 per warp: each K/V fragment feeds 4 mma) for 16-bit types up to DP = 128
    without a bias, else 64 (the O accumulators of 32 rows x DP > 128, or the bias loads, do not fit in
    registers besides; fp32 keeps 3 fragments per operand). Keys: with 128 rows 64 up to DP = 64 and
    32 up to DP = 128 (the scores of 32 rows x 64 keys besides O of DP = 128 would spill); with 64 rows
    32, and 16 above DP = 128 for fp32 and the bias kernel. Buffers: K/V
    double-buffered where FWD_MIN_BLOCKS_PER_SM blocks still fit on an SM, else single buffers with
    staggered loads where those fit; where neither gives that many blocks, the largest tile that fits
    one block (halving the keys, then the rows, down to 16 keys and 64 rows)."""
    if dtype_name == "float32":
        bm, bn = 64, (32 if dp <= 128 else 16)
    elif dp > 128:
        bm, bn = 64, (16 if mode == FWD_BIAS else 32)
    elif mode == FWD_BIAS:
        bm, bn = 64, 32
    else:
        bm, bn = 128, (64 if dp <= 64 else 32)
    per_sm = smem_limit + SMEM_RESERVED_PER_BLOCK
    # fp32 above DP = 192: O takes DP / 2 registers, and the single-buffered loop's state besides
    # spills; those head dims run double-buffered only
    buf_choices = (2,) if dtype_name == "float32" and dp > 192 else (2, 1)
    for bufs in buf_choices:
        tile = FwdTile(bm, bn, bufs)
        if FWD_MIN_BLOCKS_PER_SM * (fwd_smem_bytes(dtype_name, dp, tile) + SMEM_RESERVED_PER_BLOCK) <= per_sm:
            return tile
    while True:
        for bufs in buf_choices:
            tile = FwdTile(bm, bn, bufs)
            if fwd_smem_bytes(dtype_name, dp, tile) <= smem_limit:
                return tile
        if bn > 16:
            bn //= 2
        elif bm > 64:
            bm, bn = 64, 16
        else:
            return tile  # too large for this device: the runner's check_smem raises


def fwd_block_n(dtype_name: str, dp: int, smem_limit: int = SMEM_OPTIN_LIMIT, mode: int = FWD_FIXED) -> int:
    """Keys per K/V tile of the forward (:func:`fwd_tile`): the unit of its tile_any flags."""
    return fwd_tile(dtype_name, dp, smem_limit, mode).bn


def fixed_offset_ok(prob: Problem, scale: np.ndarray) -> bool:
    """Whether the fixed-offset instantiation (no running max) is correct for this problem."""
    bound = float(np.max(scale)) * prob.groups  # |logit| <= scale_h * groups
    return bool(prob.fixed_offset_safe and bound <= FIXED_OFFSET_MAX_BOUND[prob.dtype_name])


def fwd_mode(prob: Problem, scale: np.ndarray) -> int:
    """attn_fwd's MODE for this problem: the fixed offset where it is correct, else the running max
    (with the bias, when there is one)."""
    if fixed_offset_ok(prob, scale):
        return FWD_FIXED
    return FWD_BIAS if prob.has_bias else FWD_RUNNING_MAX


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


# ---------------------------------------------------------------------------------------------------
# Decode (KV-cache attention).

DECODE_THREADS = 128  # decode.cu THREADS: 4 warps
COMBINE_WARPS = 4  # decode.cu COMBINE_WARPS: one warp per output row
APPEND_THREADS = 128  # decode.cu APPEND_THREADS
SPLIT_KEYS_BLOCK_N = 64  # WM = 1: keys per tile, 16 per warp
MMA_ROWS = 16  # rows of one mma tile: WM = 1 when a kv head's G*Nq rows fit it
ROW_GROUP = 16  # slots the tile load locates at once (a page holds whole groups)
WM1_SMEM_CAP = SMEM_OPTIN_BY_ARCH["sm_80"]  # largest WM = 1 tile set: fp32 above DP = 144 takes WM = 4

# The split heuristic (choose_num_splits): blocks resident per SM it plans for (decode_fwd declares
# __launch_bounds__(128, 2); a WM = 1 block of fp16 D = 128 takes 74.5 KB of shared memory, two per SM
# on A100), the fewest key tiles a split keeps (below that the prologue, epilogue and combine outweigh
# the keys), the share of the resident slots an unsplit grid must fill to stay unsplit, and the share
# of the best wave efficiency a smaller split count must reach to be preferred.
SPLIT_BLOCKS_PER_SM = 2
SPLIT_MIN_TILES = 2
SPLIT_FULL_GRID = 0.8
SPLIT_EFFICIENCY = 0.85


def decode_smem_bytes(dtype_name: str, dp: int, bn: int, wm: int) -> int:
    """Dynamic shared memory of decode_fwd: Q (16 WM rows) and 2 x K, 2 x V (BN rows), rows padded by
    one 16-byte chunk (the forward's pitch), and 2 x BN fp32 key scales 1/||k||. The epilogue's
    staging reuses it."""
    size = ITEMSIZE[dtype_name]
    return (16 * wm + 4 * bn) * (dp + 16 // size) * size + 2 * bn * 4


def decode_block_n(dtype_name: str, dp: int, smem_limit: int) -> int:
    """Keys per K/V tile of decode_fwd with WM = 4 (64 rows, each warp all BN keys, K/V double-buffered):
    as many as registers allow beside O (64 up to DP = 128, else 32; fp32 half that), halved (down to
    16) while decode_smem_bytes exceeds the device's shared memory per block `smem_limit`."""
    if dtype_name == "float32":
        bn = 32 if dp <= 128 else 16
    else:
        bn = SPLIT_KEYS_BLOCK_N if dp <= 128 else 32
    while bn > 16 and decode_smem_bytes(dtype_name, dp, bn, 4) > smem_limit:
        bn //= 2
    return bn


def decode_config(dtype_name: str, dp: int, rows: int, smem_limit: int) -> tuple[int, int]:
    """(WM, BN) of decode_fwd for a kv head's `rows` = G*Nq query rows on a device allowing
    `smem_limit` bytes of shared memory per block: WM = 1 with 64-key tiles split over the 4 warps
    when the rows fit one mma tile and its tiles fit the device (and sm_80's limit, WM1_SMEM_CAP, so
    that every instantiation compiles for every architecture); else WM = 4 with
    :func:`decode_block_n` keys per tile."""
    wm1 = decode_smem_bytes(dtype_name, dp, SPLIT_KEYS_BLOCK_N, 1)
    if rows <= MMA_ROWS and wm1 <= min(smem_limit, WM1_SMEM_CAP):
        return 1, SPLIT_KEYS_BLOCK_N
    return 4, decode_block_n(dtype_name, dp, smem_limit)


def choose_num_splits(base_blocks: int, n_key_tiles: int, sm_count: int, max_splits: int) -> int:
    """The "fill the SMs" split heuristic for num_splits = 0.

    base_blocks: blocks of the unsplit grid (row tiles x batch x kv heads); n_key_tiles: key tiles of
    the longest sequence; max_splits: the largest count allowed. No split when the unsplit grid
    already fills SPLIT_FULL_GRID of the resident slots (SMs x SPLIT_BLOCKS_PER_SM) or the keys are
    too few to share. Otherwise, among 1 ... min(max_splits, n_key_tiles / SPLIT_MIN_TILES) splits,
    the smallest whose wave efficiency (waves / ceil(waves), waves = blocks / slots) reaches
    SPLIT_EFFICIENCY of the best: enough blocks to keep every SM streaming keys, no more partials than
    that takes."""
    slots = max(1, sm_count * SPLIT_BLOCKS_PER_SM)
    top = min(max_splits, n_key_tiles // SPLIT_MIN_TILES)
    if base_blocks <= 0 or base_blocks >= SPLIT_FULL_GRID * slots or top <= 1:
        return 1
    eff = {}
    for s in range(1, top + 1):
        waves = base_blocks * s / slots
        eff[s] = waves / np.ceil(waves)
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= SPLIT_EFFICIENCY * best)
