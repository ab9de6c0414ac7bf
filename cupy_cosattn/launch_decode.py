"""Launch layer of the KV-cache attention (cuda_src/decode.cu): tile and split choice, the parameter
record, and :func:`run_kvcache`, which runs a checked call (kvcache.check_kvcache) on a kernel backend
(launch.Backend "cuda" or "emulator") with the same code for both.

One call launches up to three kernels on one stream:

1. ``kv_append<T>`` (with k_new / v_new): the new rows into their cache slots, in place;
2. ``decode_fwd<T, DP, BN, WM, RUNNING_MAX>``: grid (row tiles x splits, batch x kv heads);
3. ``decode_combine<T, RUNNING_MAX>`` (more than one split): the partials into out and lse.

Tiles (:func:`decode_config`): a kv head's G*Nq query rows (G = H / Hk) up to 16 fit one mma row tile,
shared by the 4 warps, which split each 64-key tile between them (WM = 1: the decode shape); more rows
take the forward's shape (WM = 4: 64 rows, the forward's key tile). Splits (:func:`choose_num_splits`,
the "fill the SMs" heuristic) when num_splits = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import launch as _launch
from .kvcache import MAX_NUM_SPLITS, KVCacheInputs, KVCacheProblem, dense_problem
from .launch import (CTYPES, DTYPE_NAMES, GRID_X_LIMIT, GRID_YZ_LIMIT, ITEMSIZE, MAX_HEAD_DIM,
                     SMEM_OPTIN_BY_ARCH, Backend, KernelSpec, cdiv, fixed_offset_ok, fwd_block_n, head_dim_pad,
                     make_record)

SOURCE = "decode.cu"
DECODE_THREADS = 128  # decode.cu THREADS: 4 warps
COMBINE_WARPS = 4  # decode.cu COMBINE_WARPS: one warp per output row
APPEND_THREADS = 128
SPLIT_KEYS_BLOCK_N = 64  # WM = 1: keys per tile, 16 per warp
MMA_ROWS = 16  # rows of one mma tile: WM = 1 when a kv head's G*Nq rows fit it
ROW_GROUP = 16  # slots per group the tile load locates at once (pages hold whole groups)
WM1_SMEM_CAP = SMEM_OPTIN_BY_ARCH["sm_80"]  # largest WM = 1 tile set: fp32 above DP = 144 takes WM = 4

# The split heuristic (choose_num_splits): blocks resident per SM it plans for (a WM = 1 block of fp16
# D = 128 takes 74 KB of shared memory and at most 255 registers x 128 threads: 2 per SM on A100, 3 on
# H100), the fewest key tiles a split keeps (below that the prologue, epilogue and combine outweigh the
# keys), and the share of the best wave efficiency a smaller split count must reach to be preferred.
SPLIT_BLOCKS_PER_SM = 2
SPLIT_MIN_TILES = 2
SPLIT_FULL_GRID = 0.8  # no split when the unsplit grid already fills this share of the resident slots
SPLIT_EFFICIENCY = 0.85

_PTR = np.uint64
DECODE_PARAMS = np.dtype(
    [(f, _PTR) for f in ("q", "k", "v", "k_new", "v_new", "seqlens", "block_table", "scale", "o", "lse", "opart",
                         "lpart", "mpart")]
    + [(f, np.int64) for f in ("q_sn", "k_sp", "k_sh", "k_sn", "v_sp", "v_sh", "v_sn", "o_sn", "bt_sb", "part_rows")]
    + [(f, np.int32) for f in ("B", "H", "Hk", "Nq", "D", "new_keys", "page_size", "page_shift", "num_splits",
                               "n_row_tiles", "causal", "groups", "norm_qk", "pad_")],
    align=True,
)


# ---------------------------------------------------------------------------------------------------
# Tiles and the registry.


def decode_smem_bytes(dtype_name: str, dp: int, bn: int, wm: int) -> int:
    """Dynamic shared memory of decode_fwd: Q (16 WM rows) and 2 x K, 2 x V (BN rows), rows padded by
    one 16-byte chunk (the forward's pitch), and 2 x BN fp32 key scales 1/||k||. The epilogue's
    staging reuses it."""
    size = ITEMSIZE[dtype_name]
    return (16 * wm + 4 * bn) * (dp + 16 // size) * size + 2 * bn * 4


def decode_config(dtype_name: str, dp: int, rows: int, smem_limit: int) -> tuple:
    """(WM, BN) of decode_fwd for a kv head's `rows` = G*Nq query rows on a device allowing
    `smem_limit` bytes of shared memory per block: WM = 1 with 64-key tiles split over the 4 warps
    when the rows fit one mma tile and its tiles fit the device (and sm_80's limit, WM1_SMEM_CAP, so
    that every instantiation compiles for every architecture); else WM = 4 with the forward's key
    tile (fwd_block_n)."""
    wm1 = decode_smem_bytes(dtype_name, dp, SPLIT_KEYS_BLOCK_N, 1)
    if rows <= MMA_ROWS and wm1 <= min(smem_limit, WM1_SMEM_CAP):
        return 1, SPLIT_KEYS_BLOCK_N
    return 4, fwd_block_n(dtype_name, dp, smem_limit)


def decode_name(dtype_name: str, dp: int, bn: int, wm: int, running_max: bool) -> str:
    return f"ca::dec::decode_fwd<{CTYPES[dtype_name]}, {dp}, {bn}, {wm}, {'true' if running_max else 'false'}>"


def combine_name(dtype_name: str, running_max: bool) -> str:
    return f"ca::dec::decode_combine<{CTYPES[dtype_name]}, {'true' if running_max else 'false'}>"


def append_name(dtype_name: str) -> str:
    return f"ca::dec::kv_append<{CTYPES[dtype_name]}>"


def kernel_specs() -> list:
    """Every decode.cu instantiation some architecture of SMEM_OPTIN_BY_ARCH picks: decode_fwd for
    both row regimes (few rows: WM = 1; many: WM = 4) and both softmax variants, the combines and the
    appends."""
    specs = []
    for dt in DTYPE_NAMES:
        for dp in range(16, MAX_HEAD_DIM + 1, 16):
            configs = set()
            for lim in SMEM_OPTIN_BY_ARCH.values():
                for rows in (1, MMA_ROWS + 1):
                    wm, bn = decode_config(dt, dp, rows, lim)
                    if decode_smem_bytes(dt, dp, bn, wm) <= lim:
                        configs.add((wm, bn))
            for wm, bn in sorted(configs):
                for rm in (False, True):
                    specs.append(KernelSpec(SOURCE, decode_name(dt, dp, bn, wm, rm), DECODE_THREADS,
                                            decode_smem_bytes(dt, dp, bn, wm)))
        for rm in (False, True):
            specs.append(KernelSpec(SOURCE, combine_name(dt, rm), COMBINE_WARPS * 32))
        specs.append(KernelSpec(SOURCE, append_name(dt), APPEND_THREADS))
    return specs


# ---------------------------------------------------------------------------------------------------
# Splits.


def choose_num_splits(base_blocks: int, n_key_tiles: int, sm_count: int) -> int:
    """The "fill the SMs" split heuristic for num_splits = 0.

    base_blocks: blocks of the unsplit grid (row tiles x batch x kv heads); n_key_tiles: key tiles of
    the longest sequence. No split when the unsplit grid already fills SPLIT_FULL_GRID of the
    resident slots (SMs x SPLIT_BLOCKS_PER_SM) or the keys are too few to share. Otherwise, among
    1 ... min(MAX_NUM_SPLITS, n_key_tiles / SPLIT_MIN_TILES) splits, the smallest whose wave efficiency
    (waves / ceil(waves), waves = blocks / slots) reaches SPLIT_EFFICIENCY of the best: enough blocks
    to keep every SM streaming keys, no more partials than that takes."""
    slots = max(1, sm_count * SPLIT_BLOCKS_PER_SM)
    max_splits = min(MAX_NUM_SPLITS, n_key_tiles // SPLIT_MIN_TILES)
    if base_blocks <= 0 or base_blocks >= SPLIT_FULL_GRID * slots or max_splits <= 1:
        return 1
    eff = {}
    for s in range(1, max_splits + 1):
        waves = base_blocks * s / slots
        eff[s] = waves / np.ceil(waves)
    best = max(eff.values())
    return min(s for s, e in eff.items() if e >= SPLIT_EFFICIENCY * best)


# ---------------------------------------------------------------------------------------------------
# Running a call.


def _chunk(dtype_name: str) -> int:
    return 16 // ITEMSIZE[dtype_name]


def check_kernel_support(prob: KVCacheProblem):
    """Raise ValueError for what the decode kernels cannot run (nothing launched or written yet)."""
    chunk = _chunk(prob.dtype_name)
    if prob.D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={prob.D} is not supported by the KV-cache kernels (at most {MAX_HEAD_DIM}); "
                         f"use backend='reference'")
    if prob.D % chunk:
        raise ValueError(f"the KV-cache kernels read whole 16-byte pieces of a cache row: head dim D={prob.D} must be "
                         f"a multiple of {chunk} for {prob.dtype_name}; use backend='reference'")


def _element_strides(name: str, x, chunk: int, itemsize: int) -> tuple:
    """Element strides of cache `x` over (page, kv head, slot); ValueError unless the kernels can use
    it in place (last axis contiguous, every row 16-byte aligned)."""
    st = tuple(int(s) for s in x.strides)
    if x.shape[-1] > 1 and st[-1] != itemsize:
        raise ValueError(f"{name} must be contiguous in its last axis (head dim) for the KV-cache kernels, got "
                         f"strides {st} (bytes)")
    el = [s // itemsize for s in st[:3]]
    if any(s % itemsize for s in st[:3]) or any(e % chunk for e, n in zip(el, x.shape[:3]) if n > 1):
        raise ValueError(f"{name}'s rows must start 16-byte aligned for the KV-cache kernels: strides {st} (bytes) "
                         f"must be multiples of 16")
    if ROW_GROUP * abs(el[2]) >= 2**31:  # the kernels step through a 16-slot group in 32-bit arithmetic
        raise ValueError(f"{name}'s row stride of {el[2]} elements is too large for the KV-cache kernels "
                         f"({ROW_GROUP} rows must span fewer than 2^31 elements)")
    return tuple(el)


class _Cache:
    """One cache array as the kernels see it: the device array they read and write (the caller's
    own, or an emulator copy that is written back after an append) and its element strides."""

    def __init__(self, be: Backend, name: str, x, prob: KVCacheProblem):
        chunk, size = _chunk(prob.dtype_name), ITEMSIZE[prob.dtype_name]
        self.user, self.copied = x, False
        if be.name == "cuda":
            if int(x.data.ptr) % 16:
                raise ValueError(f"{name} must start 16-byte aligned for the KV-cache kernels")
            self.dev, self.strides = x, _element_strides(name, x, chunk, size)
        elif be._emu.is_device_array(x) and be.ptr(x) % 16 == 0:
            self.dev, self.strides = x, _element_strides(name, x, chunk, size)
        else:  # a plain NumPy cache: the emulator works on a guarded copy
            _element_strides(name, x, chunk, size)  # the same layout rules as on the GPU
            self.dev, self.copied = be.to_device(x), True
            self.strides = tuple(int(s) // size for s in self.dev.strides[:3])

    def write_back(self):
        if self.copied:
            _launch.copy_into(self.user, self.dev)


@dataclass(frozen=True)
class DecodePlan:
    """How a call runs: decode_fwd's tile (WM, BN, padded head dim DP), its shared memory, row tiles
    per kv head, key-range splits and softmax variant."""

    wm: int
    bn: int
    dp: int
    smem: int
    n_row_tiles: int
    splits: int
    running_max: bool


def plan_kvcache(prob: KVCacheProblem, inp: KVCacheInputs, caps) -> DecodePlan:
    """The launch plan of a checked call on a device of capabilities `caps` (no arrays touched)."""
    dt = prob.dtype_name
    dp = head_dim_pad(prob.D)
    rows = prob.q_per_kv * prob.Nq
    wm, bn = decode_config(dt, dp, rows, caps.smem_optin)
    max_len = int(inp.lengths.max()) if prob.B else 0
    n_row_tiles = cdiv(rows, 16 * wm)
    splits = prob.num_splits or choose_num_splits(n_row_tiles * prob.B * prob.Hk, cdiv(max_len, bn), caps.sm_count)
    running_max = not fixed_offset_ok(dense_problem(prob, max_len, prob.B), inp.scale)
    return DecodePlan(wm, bn, dp, decode_smem_bytes(dt, dp, bn, wm), n_row_tiles, splits, running_max)


def run_kvcache(be: Backend, prob: KVCacheProblem, inp: KVCacheInputs):
    """Run a checked KV-cache call on kernel backend `be`. Returns (out (B, H, Nq, D) in prob.dtype,
    lse (B, H, Nq) float32) as arrays of be's library; the caches are appended to in place."""
    check_kernel_support(prob)
    caps = be.device_caps()
    caps.check()
    dt, B, H, Hk, Nq, D = prob.dtype_name, prob.B, prob.H, prob.Hk, prob.Nq, prob.D
    xp = be.xp
    if B == 0 or Nq == 0:
        return (xp.zeros((B, H, Nq, D), dtype=prob.dtype), xp.full((B, H, Nq), -np.inf, dtype=np.float32))
    plan = plan_kvcache(prob, inp, caps)
    if plan.smem > caps.smem_optin:
        raise ValueError(f"the KV-cache kernel for head dim D={D} in {dt} needs {plan.smem} bytes of shared memory "
                         f"per block; this device allows {caps.smem_optin}. Use backend='reference'")
    splits, n_row_tiles = plan.splits, plan.n_row_tiles
    if n_row_tiles * splits > GRID_X_LIMIT:
        raise ValueError(f"{n_row_tiles} row tiles x {splits} splits exceed the grid's x limit")

    # Every layout check is above: from here on arrays are staged, written and launched.
    kc, vc = _Cache(be, "k_cache", inp.k_cache, prob), _Cache(be, "v_cache", inp.v_cache, prob)
    q = be.to_device(inp.q)
    seqlens = be.to_device(inp.cache_seqlens)
    table = be.to_device(inp.block_table) if prob.paged else None
    k_new = be.to_device(inp.k_new) if prob.append else None
    v_new = be.to_device(inp.v_new) if prob.append else None
    scale = be.device_scale(inp.scale)
    out = be.empty((B, H, Nq, D), prob.dtype)
    lse = be.empty((B, H, Nq), np.float32)
    part_rows = B * H * Nq
    opart = lpart = mpart = None
    if splits > 1:
        opart = be.empty((splits, part_rows, D), np.float32)
        lpart = be.empty((splits, part_rows), np.float32)
        mpart = be.empty((splits, part_rows), np.float32) if plan.running_max else None

    ps = prob.page_size
    fields = dict(
        q=be.ptr(q), k=be.ptr(kc.dev), v=be.ptr(vc.dev), k_new=be.ptr(k_new), v_new=be.ptr(v_new),
        seqlens=be.ptr(seqlens), block_table=be.ptr(table), scale=be.ptr(scale), o=be.ptr(out), lse=be.ptr(lse),
        opart=be.ptr(opart), lpart=be.ptr(lpart), mpart=be.ptr(mpart),
        q_sn=D, k_sp=kc.strides[0], k_sh=kc.strides[1], k_sn=kc.strides[2],
        v_sp=vc.strides[0], v_sh=vc.strides[1], v_sn=vc.strides[2], o_sn=D,
        bt_sb=prob.max_pages if prob.paged else 0, part_rows=part_rows,
        B=B, H=H, Hk=Hk, Nq=Nq, D=D, new_keys=prob.new_keys, page_size=ps,
        page_shift=(ps.bit_length() - 1) if prob.paged and ps & (ps - 1) == 0 else -1,
        num_splits=splits, n_row_tiles=n_row_tiles, causal=int(prob.causal), groups=prob.groups,
        norm_qk=int(prob.l2norm_qk),
    )
    rec = make_record(DECODE_PARAMS, **fields)

    if prob.append:
        total = B * Hk * Nq * (D // _chunk(dt))
        be.launch(be.kernel(SOURCE, append_name(dt)), (min(cdiv(total, APPEND_THREADS), GRID_X_LIMIT), 1, 1),
                  (APPEND_THREADS, 1, 1), rec)
    kern = be.kernel(SOURCE, decode_name(dt, plan.dp, plan.bn, plan.wm, plan.running_max), plan.smem)
    be.launch(kern, (n_row_tiles * splits, min(B * Hk, GRID_YZ_LIMIT), 1), (DECODE_THREADS, 1, 1), rec, plan.smem)
    if splits > 1:
        be.launch(be.kernel(SOURCE, combine_name(dt, plan.running_max)),
                  (min(cdiv(part_rows, COMBINE_WARPS), GRID_X_LIMIT), 1, 1), (COMBINE_WARPS * 32, 1, 1), rec)
    if prob.append:
        kc.write_back()
        vc.write_back()
    _keep_alive = (q, seqlens, table, k_new, v_new, scale, opart, lpart, mpart)  # noqa: F841
    return be.to_host_into(out, None), be.to_host_into(lse, None)
