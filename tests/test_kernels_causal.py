"""The causal diagonal, forward and backward, on the CPU emulator.

Causal attention lets query i see key j iff j <= i + (Nk - Nq). Where that diagonal cuts a tile
depends on diff = Nk - Nq modulo the tile sizes of each kernel: the forward's key tile BN and its
warp slabs (BM / 4 rows: 16 or 32), bwd_dkdv's key block and streamed query tile, bwd_dq's query block and streamed
key tile. Every one of those sizes is a power of two dividing TILE_PERIOD = 64 (asserted below from
the launch layer's tile choices), so the sweeps run every residue of diff modulo 64, plus negative
diffs (more queries than keys: the first -diff query rows see no key at all, so they must be exactly
0 with lse = -inf, and get exactly zero gradient) and diffs beyond a tile. The per-warp offsets
(warps sit 16 or 32 rows / 16 keys apart inside a block) then put the diagonal at every position of every
warp's slab.

The sweeps use tiny problems (D = 16, Nq = 70: one or two forward query tiles of 128 or 64 rows, the last
partial) so each
case costs milliseconds; larger head dims (other tiles), other lengths and every residue for every
configuration are behind ``@pytest.mark.slow``. Further: the (batch, head) loops over grid y when
B*H exceeds the grid's limit, the causal tile bounds of the backward (bwd_dkdv's first query tile
q_first, bwd_dq's key end k_end: tiles outside them are never read), GQA in deterministic mode and
the small-shared-memory variants of a 99 KB device (sm_86), each in at least two independent tests.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupy_cosattn import api, emulator, problem
from cupy_cosattn.launch import limits, tiles

import kernel_cases
from kernel_cases import DTYPES
from test_kernels_backward import GRAD_TOL, GRADS, check_grads, reference_grads, run_backward
from test_kernels_forward import check_forward

TILE_PERIOD = 64
NQ = 70
# diff = Nk - Nq beyond the residues 0..63: negative (rows with no visible key) around multiples of 16
# and 64, down to Nk = 2 (with Nk = 1 every visible row has p = 1 and dS = 0: the gradients are
# rounding noise around an exact 0, which relative errors cannot judge), and positive past one and two
# key tiles.
NEGATIVE_DIFFS = (-1, -2, -15, -16, -17, -31, -32, -33, -47, -48, -49, -63, -64, -65, -(NQ - 2))
LARGE_DIFFS = (64, 65, 79, 127, 128, 129)
SWEEP_DIFFS = tuple(range(TILE_PERIOD)) + NEGATIVE_DIFFS + LARGE_DIFFS
# The backward sweeps of bfloat16 and float32 in CI: every residue modulo 16 and the edges of the
# 32- and 64-row tiles. bfloat16 runs float16's kernels with another element type (same tiles, which
# the float16 sweep covers modulo 64); float32's query tiles (bwd_dkdv) and key tiles (bwd_dq) are 16
# rows, so its causal bounds q_first and k_end depend on diff modulo 16 only.
SHORT_DIFFS = tuple(range(16)) + (31, 32, 33, 47, 48, 63, 64, 65) + (-1, -16, -17, -33, -64, -(NQ - 2))
SM86 = limits.DeviceCaps((8, 6), limits.SMEM_OPTIN_BY_ARCH["sm_86"], 84)


def kernel_tiles(dtype: str, D: int, caps: limits.DeviceCaps = limits.EMULATED_DEVICE) -> dict:
    """The tile sizes the diagonal's position is taken modulo, as the launch layer picks them on
    `caps`: forward key tile and warp slab, bwd_dkdv key block / query tile, bwd_dq query block / key
    tile."""
    dp = tiles.fwd_head_dim_pad(D)
    bdp = tiles.bwd_head_dim_pad(D)
    kv_small, q_small = tiles.choose_small(dtype, bdp, caps.smem_optin)
    kv, q = tiles.kv_config(dtype, bdp, kv_small), tiles.q_config(dtype, bdp, q_small)
    ft = tiles.fwd_tile(dtype, dp, caps.smem_optin)
    return {"fwd_bn": ft.bn, "fwd_warp_rows": ft.bm // (tiles.FWD_THREADS // 32), "dkdv_keys": kv.rows,
            "dkdv_queries": kv.tile, "dq_queries": q.rows, "dq_keys": q.tile}


@pytest.mark.parametrize("caps", [limits.EMULATED_DEVICE, SM86], ids=["sm80", "sm86"])
def test_tile_period_covers_every_kernel_tile(caps):
    """Residues modulo TILE_PERIOD are residues modulo every tile size of every kernel (so the sweeps
    below cover each tile's every diagonal position)."""
    for dtype in DTYPES:
        for D in (16, 64, 96, 128, 160, 192, 256):
            for name, size in kernel_tiles(dtype, D, caps).items():
                assert TILE_PERIOD % size == 0, (dtype, D, name, size)


def _seed(seed: int, diff: int, D: int) -> int:
    """A distinct non-negative random seed per (seed, diff, head dim)."""
    return seed + 1000 * (diff + 1000) + D


def _forward_case(dtype, diff, variant, *, D=16, Nq=NQ, seed=0):
    """(args, kw) of a causal forward case: "plain" (fixed offset, GQA) or "bias_mask" (running max,
    per-head bias, a random mask with one batch row fully masked and, when Nk >= 96, another row
    masked on its first 64 keys: whole key tiles skipped on top of the causal bound)."""
    extra = dict(B=1, H=2, Hk=1) if variant == "plain" else dict(B=2, H=2, bias="head", mask="random")
    return kernel_cases.make_case(_seed(seed, diff, D), Nq=Nq, Nk=Nq + diff, D=D, dtype=dtype, causal=True, **extra)


def _sweep_forward(dtype, diffs, *, D=16, Nq=NQ, variants=("plain", "bias_mask")):
    failures = []
    for diff in diffs:
        if Nq + diff < 1:
            continue
        for variant in variants:
            args, kw = _forward_case(dtype, diff, variant, D=D, Nq=Nq)
            try:
                check_forward(args, kw)
            except AssertionError as e:
                failures.append(f"{diff=} {variant}: {e}")
    assert not failures, f"{len(failures)} failing diffs:\n" + "\n".join(failures)


def _backward_case(dtype, diff, deterministic, *, D=16, Nq=NQ, B=2, seed=0):
    """(args, kw, dout): causal, GQA (two query heads on one kv head), a per-batch bias (summed by
    atomics in the default mode, from a full buffer in deterministic mode)."""
    return kernel_cases.make_case(_seed(seed, diff, D) + deterministic, B=B, H=2, Hk=1, Nq=Nq, Nk=Nq + diff, D=D,
                                  dtype=dtype, causal=True, bias="batch", deterministic=deterministic, with_dout=True)


def _check_empty_rows_zero(args, kw, dout, diff):
    """Query rows i < -diff see no key: their dq (and dbias rows) are exactly 0."""
    dq, _, _, dbias, _ = run_backward(args, kw, dout)
    n = min(-diff, dq.shape[2])
    assert np.all(np.asarray(dq[:, :, :n], dtype=np.float64) == 0), "dq of rows without a visible key"
    assert np.all(np.asarray(dbias[..., :n, :], dtype=np.float64) == 0), "dbias of rows without a visible key"


def _sweep_backward(dtype, diffs, *, D=16, Nq=NQ, B=2, modes=(False, True)):
    failures = []
    for diff in diffs:
        if Nq + diff < 1:
            continue
        for det in modes:
            args, kw, dout = _backward_case(dtype, diff, det, D=D, Nq=Nq, B=B)
            try:
                check_grads(args, kw, dout)
                if diff < 0:
                    _check_empty_rows_zero(args, kw, dout, diff)
            except AssertionError as e:
                failures.append(f"{diff=} deterministic={det}: {e}")
    assert not failures, f"{len(failures)} failing diffs:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------
# Sweeps over diff = Nk - Nq (CI: D = 16, every residue modulo 64, negative and large diffs).

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_causal_diff_sweep(dtype):
    """Every residue of Nk - Nq modulo 64 and negative / large diffs, fixed-offset (GQA) and
    running-max (bias, mask) instantiations: out and lse meet the contract, empty rows are 0 / -inf."""
    _sweep_forward(dtype, SWEEP_DIFFS)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_causal_diff_sweep(dtype, deterministic):
    """float16: every residue of Nk - Nq modulo 64 and negative / large diffs; bfloat16, float32:
    SHORT_DIFFS (the full sweep is in the slow grid). GQA with a per-batch bias, in each backward mode:
    every gradient meets the contract; rows without a visible key get exactly 0."""
    _sweep_backward(dtype, SWEEP_DIFFS if dtype == "float16" else SHORT_DIFFS, modes=(deterministic,))


@pytest.mark.parametrize("dtype,D", [("float16", 96), ("float32", 160)])
def test_causal_diffs_other_tiles(dtype, D):
    """Head dims with other tiles (fp16 D=96: bwd_dkdv 32-query tiles, bwd_dq 32-key tiles; fp32
    D=160: forward 16-key tiles, 2-warp backward blocks of 32 rows, two head-dim chunks), at diffs
    where a tile edge meets the diagonal (residues 0, 1, 15, 16, 17, 31, 33 and negatives); Nq = 40
    spans two 32-row blocks."""
    diffs = (0, 1, 15, 16, 17, 31, 33, -1, -17, -33)
    _sweep_forward(dtype, diffs, D=D, Nq=40)
    _sweep_backward(dtype, diffs, D=D, Nq=40, B=1)


@pytest.mark.slow
@pytest.mark.parametrize("D,Nq", [(16, 70), (16, 130), (16, 16), (96, 40), (160, 40)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_causal_diff_grid_exhaustive(dtype, D, Nq):
    """Every diff from -(Nq - 2) (Nk = 2) to 2 * 64 + 1, for head dims with other tiles (D = 96:
    32-row backward tiles in fp16/bf16; D = 160: two head-dim chunks, fp32 16-key forward tiles and
    32-key backward blocks) and query lengths of one, two and three query blocks, forward (both
    instantiations) and backward (both modes)."""
    diffs = tuple(range(-(Nq - 2), 2 * TILE_PERIOD + 2))
    _sweep_forward(dtype, diffs, D=D, Nq=Nq)
    _sweep_backward(dtype, diffs, D=D, Nq=Nq)


# ---------------------------------------------------------------------------------------------------
# The backward's causal tile bounds: tiles outside them are skipped, never read.

def _nan_invisible_dout_case(dtype, deterministic, D=16):
    """A causal case with Nk - Nq = -T, T a multiple of every backward query tile: query rows i < T see
    no key, and their dout rows are NaN. Those rows fill whole query tiles of both kernels, which lie
    before bwd_dkdv's first query tile q_first (for every key block) and have bwd_dq's key end k_end = 0,
    so a kernel that reads them has NaN in its results."""
    t = kernel_tiles(dtype, D)
    T = max(t["dkdv_queries"], t["dq_queries"])
    Nq = 2 * T + 21
    args, kw, dout = kernel_cases.make_case(50 + deterministic, B=2, H=2, Hk=1, Nq=Nq, Nk=Nq - T, D=D, dtype=dtype,
                                            causal=True, bias="head", deterministic=deterministic, with_dout=True)
    dout = dout.copy()
    dout[:, :, :T] = np.nan
    return args, kw, dout, T


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_query_tiles_before_the_causal_bound_are_never_read(dtype, deterministic):
    """bwd_dkdv starts each key block at the query tile of q_first = max(0, j0 - diff) and bwd_dq ends
    each query tile's keys at k_end: whole query tiles that see no key are never loaded. With NaN dout
    on exactly those rows every gradient is finite, the rows' dq is exactly 0, and the rest equals the
    reference computed on the remaining rows (whose gradients do not depend on the dropped ones)."""
    args, kw, dout, T = _nan_invisible_dout_case(dtype, deterministic)
    got = run_backward(args, kw, dout)
    for name, g in zip(GRADS, got):
        assert np.isfinite(np.asarray(g, dtype=np.float64)).all(), f"NaN/Inf in {name}"
    dq, dk, dv, dbias, _ = (np.asarray(g, dtype=np.float64) for g in got)
    assert np.all(dq[:, :, :T] == 0) and np.all(dbias[..., :T, :] == 0)
    # The reference of the same problem with dout 0 on the invisible rows: identical gradients (those
    # rows see nothing, so their dout never enters any gradient).
    clean = np.where(np.isnan(np.asarray(dout, dtype=np.float64)), 0.0, np.asarray(dout, dtype=np.float64))
    ref = reference_grads(args, kw, clean.astype(dout.dtype))
    tol = GRAD_TOL[dtype]
    for name, g, r in zip(GRADS[:4], (dq, dk, dv, dbias), ref[:4]):
        err = kernel_cases.rel_err(g, r)
        assert err <= tol, f"{name} rel err {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_bounds_at_tile_edges(dtype):
    """Diffs that put the causal bound exactly on, one before and one after a tile edge of each
    backward kernel (bwd_dkdv: q_first = j0 - diff at a query-tile edge; bwd_dq: k_end = i0 + BR + diff
    at a key-tile edge), over three query blocks (Nq = 2 blocks + 5), both modes."""
    t = kernel_tiles(dtype, 16)
    Nq = 2 * max(t["dkdv_queries"], t["dq_queries"]) + 5
    edges = sorted({e + s for e in (t["dkdv_queries"], t["dq_keys"], t["dkdv_keys"]) for s in (-1, 0, 1)})
    diffs = [d for e in edges for d in (e, -e)]
    _sweep_backward(dtype, diffs, Nq=Nq, B=1)


# ---------------------------------------------------------------------------------------------------
# (batch, head) loops over grid y: GRID_YZ_LIMIT shrunk so that blocks take several work items.

def test_forward_grid_y_loop_causal_gqa_per_head_scale(monkeypatch):
    """B*H = 8 work items on a grid y of 3 (blocks take 3, 3, 2): per-head scales, GQA and the causal
    bound (with Nq != Nk) are recomputed per work item."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 3)
    args, kw = kernel_cases.make_case(61, B=2, H=4, Hk=2, Nq=70, Nk=90, D=32, dtype="float16", causal=True,
                                      per_head_scale=True, scale=2.0)
    check_forward(args, kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forward_grid_y_loop_single_row_of_blocks(monkeypatch, dtype):
    """Grid y of 1: each block runs every (batch, head) in turn, with a full bias and a mask (running
    max; the staging area of one work item's output is the next one's Q tile)."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 1)
    args, kw = kernel_cases.make_case(62, B=2, H=3, Nq=40, Nk=75, D=32, dtype=dtype, causal=True, bias="full",
                                      mask="random")
    check_forward(args, kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_grid_y_loop_causal_gqa(monkeypatch, deterministic):
    """Every backward kernel loops over its y work items (grid y 3 for 8 (b, h) items, and for bwd_dkdv
    8 (b, kv head, query-head split) items), causal with more queries than keys, GQA and a per-batch
    bias (atomics in the default mode)."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 3)
    args, kw, dout = kernel_cases.make_case(63 + deterministic, B=2, H=4, Hk=2, Nq=70, Nk=50, D=32, dtype="float16",
                                            causal=True, bias="batch", deterministic=deterministic, with_dout=True)
    check_grads(args, kw, dout)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_backward_grid_y_loop_head_splits(monkeypatch, deterministic):
    """Grid y of 1 with query-head splits (bwd_dkdv work items are (b, hk, split)): each block walks
    every item, fp32, with a mask."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 1)
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 10**9)
    args, kw, dout = kernel_cases.make_case(65 + deterministic, B=2, H=4, Hk=1, Nq=33, Nk=70, D=32, dtype="float32",
                                            mask="random", causal=True, deterministic=deterministic, with_dout=True)
    prob, _ = problem.canonicalize(*args, **kw)
    assert tiles.choose_nsplit(prob, 1) == 4
    check_grads(args, kw, dout)


# ---------------------------------------------------------------------------------------------------
# Non-finite values on the diagonal's tiles, running-max instantiation (test_nonfinite.py covers the
# fixed-offset one): V rows of a tile that some row of the block must not see are scrubbed, and a
# visible scrubbed key must still poison its rows.

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_causal_nonfinite_value_poisons_its_rows_under_running_max(dtype):
    """A bias (so the running-max kernel), causal with Nq - Nk = 60: a NaN or Inf in v_j makes out and
    lse NaN on exactly the rows that see key j (keys in the first, a middle and the last key tile);
    every other row is bitwise its clean value."""
    Nq, Nk = 130, 70
    args, kw = kernel_cases.make_case(80, B=1, H=2, Hk=1, Nq=Nq, Nk=Nk, D=32, dtype=dtype, causal=True, bias="head")
    prob, _ = problem.canonicalize(*args, **kw)
    assert not prob.fixed_offset_safe
    clean_o, clean_l = (np.asarray(x, dtype=np.float64) for x in api.forward(*args, backend="emulator", **kw))
    q, k, v = args
    for j, value in ((1, np.nan), (31, np.inf), (65, -np.inf)):
        pv = v.copy()
        pv[0, 0, j, 3] = value
        out, lse = (np.asarray(x, dtype=np.float64) for x in api.forward(q, k, pv, backend="emulator", **kw))
        sees = j <= np.arange(Nq) + (Nk - Nq)
        assert sees.any() and not sees.all()
        assert np.all(np.isnan(out[:, :, sees])) and np.all(np.isnan(lse[:, :, sees])), f"v[{j}] = {value}"
        assert np.array_equal(out[:, :, ~sees], clean_o[:, :, ~sees]), f"v[{j}] = {value}"
        assert np.array_equal(lse[:, :, ~sees], clean_l[:, :, ~sees]), f"v[{j}] = {value}"


# ---------------------------------------------------------------------------------------------------
# Deterministic GQA.

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_deterministic_gqa_causal_is_exact_and_repeatable(dtype):
    """Deterministic mode with three query heads per kv head, causal with Nq > Nk and Nq < Nk: the
    gradients meet the contract and are bitwise equal under two emulator interleavings."""
    for seed, (Nq, Nk) in enumerate(((80, 45), (45, 110))):
        args, kw, dout = kernel_cases.make_case(70 + seed, B=2, H=6, Hk=2, Nq=Nq, Nk=Nk, D=32, dtype=dtype, causal=True,
                                                bias="head", deterministic=True, with_dout=True)
        check_grads(args, kw, dout)
        runs = []
        for s in (3, 777):
            with emulator.interleave(s):
                runs.append(run_backward(args, kw, dout))
        for name, a, b in zip(GRADS, *runs):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name} differs between interleavings"


def test_deterministic_mqa_single_kv_head_masked():
    """Deterministic MQA (a 3-D k/v shared by every query head) with a mask and a per-head bias: dk, dv
    sum every query head's contribution in the block, dq is per head."""
    args, kw, dout = kernel_cases.make_case(72, B=2, H=3, kv_3d=True, Nq=50, Nk=100, D=64, dtype="float16",
                                            mask="random", bias="head", deterministic=True, with_dout=True)
    check_grads(args, kw, dout)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_query_head_splits_with_several_heads_per_split(monkeypatch, deterministic):
    """GQA with 4 query heads per kv head split in 2 blocks of 2 heads each (heads_per_split = 2): each
    block walks its own two heads, the launch layer sums the two partial dK/dV."""
    args, kw, dout = kernel_cases.make_case(74 + deterministic, B=1, H=8, Hk=2, Nq=40, Nk=70, D=32, dtype="float32",
                                            causal=True, bias="head", deterministic=deterministic, with_dout=True)
    prob, _ = problem.canonicalize(*args, **kw)
    kv = tiles.kv_config("float32", tiles.bwd_head_dim_pad(32))
    base = limits.cdiv(prob.Nk, kv.rows) * kv.n_chunks * prob.B * prob.Hk
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 2 * base)
    assert tiles.choose_nsplit(prob, limits.cdiv(prob.Nk, kv.rows) * kv.n_chunks) == 2
    check_grads(args, kw, dout)


# ---------------------------------------------------------------------------------------------------
# Small-shared-memory variants (an emulated 99 KB sm_86): other tiles (backward) and K/V buffering (forward).

@pytest.mark.parametrize("dtype,D", [("float16", 96), ("float32", 160)])
def test_small_smem_forward_causal_diffs(monkeypatch, dtype, D):
    """Forward with the other K/V buffering an sm_86 picks (the same rows and keys per tile: single
    buffers with staggered loads for float16 D = 96, double buffers for float32 D = 160), at every
    residue of the diff modulo 16 and negative diffs, both instantiations."""
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    dp = tiles.fwd_head_dim_pad(D)
    assert tiles.fwd_tile(dtype, dp, SM86.smem_optin).kv_bufs != tiles.fwd_tile(dtype, dp).kv_bufs
    _sweep_forward(dtype, tuple(range(16)) + (-1, -16, -17, 33), D=D, Nq=37)


@pytest.mark.parametrize("dtype,D", [("float32", 128), ("bfloat16", 192)])
def test_small_smem_backward_causal_diffs(monkeypatch, dtype, D):
    """Backward with the small variants an sm_86 picks (2-warp blocks, 16-row streamed tiles), at
    every residue of the diff modulo 16 and negative diffs in deterministic mode (which runs both
    kernels, so both causal bounds), and at tile edges in the default mode."""
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    assert tiles.choose_small(dtype, tiles.bwd_head_dim_pad(D), SM86.smem_optin) == (True, True)
    edges = (0, 1, 15, 16, 17, -1, -17)
    diffs = tuple(range(16)) + (-1, -16, -17, 33) if dtype == "float32" else edges
    _sweep_backward(dtype, diffs, D=D, Nq=37, modes=(True,))
    _sweep_backward(dtype, edges, D=D, Nq=37, modes=(False,))
