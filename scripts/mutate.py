#!/usr/bin/env python3
"""Mutation testing of the kernels and the launch layer: how many realistic bugs do the tests catch?

Each entry of MUTANTS is one realistic bug (a missing barrier, a cp.async wait off by one, ldmatrix
without .trans, swapped fragment registers, a causal or tail off-by-one, a wrong GQA head, an atomic
turned into a plain add, a dropped clamp, ...): an exact snippet of a source file that must occur
there exactly once, its replacement, the tests that should catch it (pytest arguments, as small a
selection as still kills it) and a one-line rationale. The script copies the repository (the files git
tracks or would track) into scratch directories, plants one mutant at a time, runs its tests under a
timeout (a hang counts as killed and is reported as such), restores the file, and prints the kill rate
and every survivor with its rationale.

    python3 scripts/mutate.py --list
    python3 scripts/mutate.py [--jobs 1] [--only ID ...] [--json out.json] [--timeout 1200]

Not part of CI (a full run takes about 30 minutes on two cores with --jobs 2); tests/test_mutate.py
checks in CI that every snippet still occurs exactly once in today's sources, so the list cannot
silently rot: a change to a kernel that breaks a snippet must come with an updated mutant. Every new
kernel comes with its mutants (docs/emulator.md, "Adding mutants"). Before the mutants, each distinct
test selection runs once on the unmutated copy (the baseline; skip it with --no-baseline): a selection
that fails there would count every mutant as killed. Emulator builds of a run go to their own cache
(--cache-dir, default a temporary directory), so the mutated modules do not accumulate in the shared
one. The latest result is recorded in docs/emulator.md ("Mutation testing").
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 1200
# pytest options of every run: stop at the first failure (a killed mutant costs one failing test), no
# cache writes into the scratch copy, slow and GPU tests out (the mutant's selection says what runs).
PYTEST_BASE = ("-x", "-q", "-rf", "-p", "no:cacheprovider", "-m", "not slow and not gpu")

FWD = "tests/test_kernels_forward.py"
BWD = "tests/test_kernels_backward.py"
CAUSAL = "tests/test_kernels_causal.py"

FORWARD_CU = "cuda_src/forward.cu"
BACKWARD_CU = "cuda_src/backward.cu"
NORM_CU = "cuda_src/norm.cu"
COMMON = "cuda_src/common.cuh"
TILES_CUH = "cuda_src/tiles.cuh"
FIXED_OFFSET = "cuda_src/fixed_offset.cuh"
DISPATCH = "cupy_cosattn/launch/dispatch.py"
TILES = "cupy_cosattn/launch/tiles.py"
STAGING = "cupy_cosattn/launch/staging.py"
LAUNCH_FWD = "cupy_cosattn/launch/forward.py"
LAUNCH_BWD = "cupy_cosattn/launch/backward.py"
ARRAYS = "cupy_cosattn/launch/arrays.py"


@dataclass(frozen=True)
class Mutant:
    """One planted bug: `original` (occurring exactly once in `file`) becomes `replacement`; `tests`
    are the pytest arguments that should catch it."""

    id: str
    file: str
    original: str
    replacement: str
    tests: tuple
    rationale: str
    timeout_s: Optional[int] = None  # per-mutant limit (mutants expected to hang); default --timeout
    env: tuple = ()  # (name, value) environment variables of its test runs, e.g. an emulator mode

    @property
    def selection(self) -> tuple:
        """What its test run depends on besides the sources: (pytest arguments, environment)."""
        return (self.tests, self.env)


def k(*files: str, expr: str) -> tuple:
    """pytest arguments: `files` filtered by the -k expression `expr`."""
    return tuple(files) + ("-k", expr)


# Test selections shared by several mutants. -k "float16 and not bfloat16" picks the float16 cases
# ("float16" is a substring of "bfloat16").
F16 = "float16 and not bfloat16"
FWD_F16 = k(FWD, expr=f"configs and {F16}")
FWD_BF16 = k(FWD, expr="configs and bfloat16")
FWD_F32 = k(FWD, expr="configs and float32")
FWD_CAUSAL = k(CAUSAL, FWD, expr="forward_causal_diff_sweep or small_smem_forward or (configs and causal)")
FWD_GRID_Y = (f"{FWD}::test_grid_yz_limit_loops",) + k(CAUSAL, expr="forward_grid_y")
FWD_NORM = k(FWD, expr="l2norm")
FWD_SYNC = ("tests/test_forward_sync.py",)
# The single-buffered loop run for real (small shared-memory devices): a planted-fault test cannot kill a
# mutant of the text it plants (its own check of that text then fails inside the expected failure).
FWD_SMALL = k(CAUSAL, FWD, expr="small_smem")
# The epilogue's drain and barrier matter where Q's copies can still be in flight there (fp32, whose Q
# fragments are not taken before the loop): the planted-fault test's seeds that expose a missing one.
FWD_EPILOGUE = k("tests/test_forward_sync.py", expr="epilogue_barrier")
BWD_F16 = k(BWD, expr=f"configs and {F16}")
BWD_F32 = k(BWD, expr="configs and float32")
BWD_CAUSAL = k(CAUSAL, expr="backward_causal_diff_sweep or bounds or never_read or other_tiles")
BWD_GRID_Y = (f"{BWD}::test_grid_yz_limit_loops",) + k(CAUSAL, expr="backward_grid_y")
BWD_GQA = k(BWD, CAUSAL, expr="gqa or splits or mqa or repeatable")
BWD_SMALL = k(BWD, CAUSAL, expr="small_shared_memory or small_smem or tile_config")
BWD_MASK = k(BWD, expr="fully_masked or invisible or (configs and mask)")
BWD_BIAS = k(BWD, expr="configs and (bias or per_head_scale or fully_masked_rows or merged_3d)")
# Races between blocks (a plain += where an atomicAdd belongs) are seen by the emulator's race check,
# not by results: these selections run with it on (fast-mode backward cases with several blocks
# adding to one dq row, and broadcast biases whose dS several blocks sum).
RACE_ENV = (("CUPY_COSATTN_EMU_RACE", "1"),)
# Non-finite semantics and the float16 range of dS (each file runs in about 20 s).
NONFINITE = ("tests/test_nonfinite.py",)
FP16_RANGE = ("tests/test_fp16_range.py",)
BWD_RACE = k(BWD, expr=f"configs and {F16} and (gqa or per_head_scale or merged_3d)")
# need_dscale=False: the probability loops without the per-pair test on tiles whose pairs are all visible.
LEAN = k(BWD, expr="without_dscale")
# One bwd_dkdv block walking four query heads with per-head scales (fast mode, float16).
HEAD_WALK = (f"{BWD}::test_head_walk_per_head_scale",)
# dscale relative to itself (rows whose S_ij are close: the c_i r_i correction matters).
DSCALE = "tests/test_dscale_accuracy.py"
# dscale's per-row sums c_i, r_i read from the kernels' buffer, row by row.
ROWS = "tests/test_dscale_rows.py"

# ----------------------------------------------------------------------------------------------------
# cuda_src/forward.cu

FORWARD_MUTANTS: tuple = (
    Mutant("fwd_sync_tile_ready", FORWARD_CU,
           "        __syncthreads();                       // ... for every thread's copies\n", "",
           FWD_F16, "no barrier after cp.async wait: warps read K/V chunks other threads' copies have not landed"),
    Mutant("fwd_sync_buffer_reuse", FORWARD_CU,
           "      if constexpr (KV_BUFS == 2) __syncthreads();  // every warp is done with these buffers before the "
           "next prefetch\n",
           "", FWD_F16,
           "no barrier before the prefetch refills a K/V buffer another warp may still read"),
    Mutant("fwd_wait_group_2", FORWARD_CU, "cp_async_wait<1>();                    // all but",
           "cp_async_wait<2>();                    // all but", FWD_F16,
           "wait_group 2 in the double-buffered loop: the current tile may still be in flight"),
    Mutant("fwd_epilogue_wait_1", FORWARD_CU, "    cp_async_wait<0>();\n    __syncthreads();\n    {",
           "    cp_async_wait<1>();\n    __syncthreads();\n    {", FWD_EPILOGUE,
           "epilogue drains all but one group: with no visible tile the Q copies are still in flight (fp32: the "
           "16-bit kernels wait for Q before their loop)"),
    Mutant("fwd_epilogue_sync", FORWARD_CU, "    cp_async_wait<0>();\n    __syncthreads();\n    {",
           "    cp_async_wait<0>();\n    {", FWD_EPILOGUE,
           "no barrier before O is staged in Q's rows: another warp's late Q copy can overwrite it"),
    Mutant("fwd_final_sync", FORWARD_CU,
           "    __syncthreads();  // the staging area is Q's: the next (batch, head) reloads it\n", "",
           FWD_GRID_Y, "grid-y loop: the next work item's Q load overwrites O staging another warp still copies out"),
    Mutant("fwd_syncwarp", FORWARD_CU, "      __syncwarp();\n      // 16-byte stores", "      // 16-byte stores",
           FWD_F16,
           "no __syncwarp between staging O in shared memory and the lanes' 16-byte copies of other lanes' rows"),
    Mutant("fwd_pv_no_trans", TILES_CUH, "    ldsm_x4_trans(b, b_lane + nn * 32);",
           "    ldsm_x4(b, b_lane + nn * 32);", FWD_F16, "V's B operand loaded without .trans"),
    Mutant("fwd_p_frag_order", TILES_CUH,
           "  a[1] = pack2<T>(c0[2], c0[3]);\n  a[2] = pack2<T>(c1[0], c1[1]);",
           "  a[1] = pack2<T>(c1[0], c1[1]);\n  a[2] = pack2<T>(c0[2], c0[3]);",
           FWD_F16, "P's A fragment registers a1/a2 swapped (rows g+8 vs keys 8..15)"),
    Mutant("fwd_k_b_frag", TILES_CUH, "mma_m16n8k16(acc[mt][2 * jj + 1], a[mt], b + 2, T());",
           "mma_m16n8k16(acc[mt][2 * jj + 1], a[mt], b, T());", FWD_BF16,
           "the second 8-key tile of S uses the first tile's B registers"),
    Mutant("fwd_f32_pv_layout", TILES_CUH,
           "  split_tf32(c[2], ab[1], as[1]);\n  split_tf32(c[1], ab[2], as[2]);",
           "  split_tf32(c[1], ab[1], as[1]);\n  split_tf32(c[2], ab[2], as[2]);", FWD_F32,
           "fp32 P fragment in the plain A layout, not the key-permuted one V's rows follow"),
    Mutant("fwd_f32_v_row", TILES_CUH, "split_tf32(lds_f32(b_lane + n * 32 + PITCH), bb[1], bs[1]);",
           "split_tf32(lds_f32(b_lane + n * 32 + 4 * PITCH), bb[1], bs[1]);", FWD_F32,
           "fp32 V fragment b1 from key 2t+4 instead of the permuted key 2t+1"),
    Mutant("fwd_causal_strict", TILES_CUH, "key_ok && kr - rr <= cdiff", "key_ok && kr - rr < cdiff",
           FWD_CAUSAL, "causal off-by-one: the diagonal key itself hidden (tiles.cuh visible(), the backward's too)"),
    Mutant("fwd_tail_unchecked", FORWARD_CU, "const bool check = keys_left < BN ||",
           "const bool check = keys_left < BN - 1 ||", k(FWD, expr=f"grid and {F16}"),
           "tail off-by-one: a last tile with one padding key is not checked (its zero key gets p > 0)"),
    Mutant("fwd_keys_left_le", FORWARD_CU, "return 8 * j + c < kl &&", "return 8 * j + c <= kl &&", FWD_F16,
           "tail off-by-one: the first key past Nk counted as visible"),
    Mutant("fwd_last_tile_causal", FORWARD_CU,
           "(int)(last_key / BN + 1 < n_tiles ? last_key / BN + 1 : n_tiles)",
           "(int)(last_key / BN < n_tiles ? last_key / BN : n_tiles)", FWD_CAUSAL,
           "causal tile bound drops the tile holding the block's last visible key"),
    Mutant("fwd_diag_sign", FORWARD_CU, "w.diag = p.Nk - p.Nq;",
           "w.diag = p.Nq - p.Nk;", FWD_CAUSAL, "causal diagonal offset with the wrong sign"),
    Mutant("fwd_qtile_reverse", FORWARD_CU, "(int)gridDim.x - 1 - (int)blockIdx.x", "(int)gridDim.x - (int)blockIdx.x",
           FWD_CAUSAL, "reversed causal query-tile order off by one"),
    Mutant("fwd_gqa_head", FORWARD_CU, "hk = h / (p.H / p.Hk);", "hk = h % p.Hk;", FWD_F16,
           "GQA kv head as h % Hk instead of h / (H / Hk)"),
    Mutant("fwd_kv_rows_left", FORWARD_CU,
           "      if (keys == BN) CopyKV::template copy<true>(dst, src, pitch, BN, tid_reread());\n"
           "      else CopyKV::template copy<false>(dst, src, pitch, keys, tid_reread());\n      if (w.mask",
           "      CopyKV::template copy<true>(dst, src, pitch, BN, tid_reread());\n      if (w.mask",
           k(FWD, expr="configs"),
           "K/V tile loads ignore rows_left: rows past Nk are read out of bounds"),
    Mutant("fwd_scores_unzeroed", FORWARD_CU, "for (int mt = 0; mt < MT; ++mt) fill_zero(s[mt]);",
           "for (int mt = 0; mt < MT; ++mt) (void)s[mt];", FWD_F16, "score accumulators not zeroed per tile"),
    Mutant("fwd_o_rescale", FORWARD_CU, "              o[mt][n][2 * r] *= alpha;\n              o[mt][n][2 * r + 1] *= "
                                        "alpha;",
           "              o[mt][n][2 * r] *= alpha;", k(FWD, expr=f"configs and bias and {F16}"),
           "running max: one column of O not rescaled when the max grows"),
    Mutant("fwd_m_use", FORWARD_CU, "const float m_use = m_new == neg_inf() ? 0.f : m_new;",
           "const float m_use = m_new;", k(FWD, expr=f"configs and (mask or bias) and {F16}"),
           "running max: a row with nothing visible yet computes exp2(-inf - -inf) = NaN"),
    Mutant("fwd_headroom", FIXED_OFFSET,
           "template <> struct Headroom<half_t> { static constexpr float value = 10.5f; };",
           "template <> struct Headroom<half_t> { static constexpr float value = 20.5f; };", FWD_F16,
           "fixed-offset headroom beyond fp16's range: P overflows to inf"),
    Mutant("fwd_scale_head0", FORWARD_CU, "w.scale = p.scale[h];",
           "w.scale = p.scale[0];", FWD_F16, "per-head scale read for head 0"),
    Mutant("fwd_mask_batch", FORWARD_CU, "p.mask ? p.mask + b * p.mask_sb : nullptr;", "p.mask ? p.mask : nullptr;",
           FWD_F16, "key mask without the batch offset"),
    Mutant("fwd_next_tile_stall", FORWARD_CU, "        next = next_tile(tile + 1);\n        if (next < n_tiles) {",
           "        next = next_tile(tile);\n        if (next < n_tiles) {", FWD_F16, "tile iterator never advances: "
                                                                                      "the kernel spins forever",
           timeout_s=300),
    Mutant("fwd_out_guard", FORWARD_CU, "if (erow0 + r < we.Nq) copy16(", "copy16(", FWD_F16,
           "output rows past Nq stored (out of bounds)"),
    Mutant("fwd_f32_row_sum", FORWARD_CU, "const float l = F32 ? quad_sum(lsum[mt][2 * r]) : lsum[mt][2 * r];",
           "const float l = lsum[mt][2 * r];", FWD_F32, "fp32 row sum not reduced across the quad"),
    # non-finite values (a NaN or Inf never reaches a row that cannot see it)
    Mutant("fwd_masked_v_not_zeroed", FORWARD_CU,
           "if (w.mask != nullptr) CopyKV::template copy<false, true>(dst, src, pitch, keys, tid_reread(), "
           "w.mask + (int64_t)j * BN);\n      else if (keys == BN)", "if (keys == BN)", NONFINITE,
           "masked keys' V rows loaded as they are: their NaN reaches P V through 0 * NaN"),
    Mutant("fwd_scrub_last_row", FORWARD_CU, "const bool scrub = p.causal && key0 + keys_left - 1 > wdiag - wrow;",
           "const bool scrub = p.causal && key0 + keys_left - 1 > wdiag - wrow + BM - 1;", NONFINITE,
           "V scrubbed only on tiles past the block's last row's diagonal, not its first row's"),
    Mutant("fwd_flag_running_max", FORWARD_CU, "if (vis(mt, j, e, bad)) {",
           "if (!RUNNING_MAX && vis(mt, j, e, bad)) {",
           k(CAUSAL, expr="running_max"), "running max: a visible key whose V was scrubbed does not poison the row"),
    Mutant("fwd_flag_row", FORWARD_CU, "pa[j / 2][mt][2 * (j % 2) + e / 2] |=", "pa[j / 2][mt][2 * (j % 2)] |=",
           k(CAUSAL, expr="nonfinite"), "16-bit: a flagged key's NaN written into row g's packed P, not row g + 8's "
           "(row g + 8 misses its poison, row g gets one it must not)"),
    Mutant("fwd_q_regs_wait", FORWARD_CU, "cp_async_wait<1>();  // Q landed", "cp_async_wait<2>();  // Q landed",
           FWD_SYNC, "Q's fragments taken into registers while its copies may still be in flight"),
    Mutant("fwd_q_regs_sync", FORWARD_CU, "      __syncthreads();     // ... for every thread's Q copies\n", "",
           FWD_SYNC, "Q's fragments taken into registers before other threads' Q copies are visible"),
    Mutant("fwd_q_regs_steps", FORWARD_CU, "load_a<MT, PITCH>(qf[kk], sQa + 32 * kk);",
           "load_a<MT, PITCH>(qf[kk], sQa);", FWD_F16, "every register-held k-step of Q is Q's first k-step"),
    Mutant("fwd_check_no_scrub", FORWARD_CU, "cdiff < BN - 1 || scrub;", "cdiff < BN - 1;", NONFINITE,
           "a warp that sees a whole scrubbed tile skips the per-element pass: its NaN V key no longer poisons"),
    Mutant("fwd_lse_poison", FORWARD_CU, "we.lse[row] = lse + poison;",
           "we.lse[row] = lse;", NONFINITE,
           "an Inf value row seen by a row leaves its lse finite"),
    # the single-buffered (staggered) loop, the 128-row tiles and the visibility bookkeeping
    Mutant("fwd1_wait_k", FORWARD_CU, "cp_async_wait<0>();                    // this tile's K landed",
           "cp_async_wait<1>();                    // this tile's K landed", FWD_SMALL,
           "single buffers: S reads K while its copies (the newest group) are still in flight"),
    Mutant("fwd1_wait_v", FORWARD_CU, "cp_async_wait<0>();  // this tile's V landed",
           "cp_async_wait<1>();  // this tile's V landed", FWD_SMALL,
           "single buffers: P V reads V while its copies (the newest group) are still in flight"),
    Mutant("fwd1_sync_k_ready", FORWARD_CU,
           "        __syncthreads();                       // ... for every thread; every warp is done with V\n", "",
           FWD_SMALL, "single buffers: no barrier after K landed, and V reloaded while other warps still read it"),
    Mutant("fwd_a_row_tile", TILES_CUH, "ldsm_x4(a[mt], a_lane + mt * 16 * PITCH);", "ldsm_x4(a[mt], a_lane);",
           FWD_F16, "128-row blocks: the second m16 row tile of a warp multiplies the first tile's Q rows"),
    Mutant("fwd_check_diag", FORWARD_CU, "cdiff < BN - 1 || scrub;", "cdiff < BN - 2 || scrub;", FWD_CAUSAL,
           "a tile whose last key is one past a warp's first row's diagonal skips the per-element causal test"),
    Mutant("fwd_vis_row_g", FORWARD_CU, "cd(cdiff - 2 * t + g)", "cd(cdiff - 2 * t)", FWD_CAUSAL,
           "causal bound without the thread's row g: rows g > 0 see too few keys"),
    Mutant("fwd_epilogue_row_tile", FORWARD_CU, "const int rr = 16 * mt + eg + 8 * r;", "const int rr = eg + 8 * r;",
           FWD_F16, "128-row blocks: the second row tile's O and lse stored over the first's rows"),
    Mutant("tiles_copy_wrap_row", TILES_CUH, "          s += src_pitch - CPR * 16;\n", "", k(FWD, expr="configs"),
           "tile copy (chunks not a multiple of the threads): the global row is not advanced when a chunk "
           "column wraps, so rows are read from the previous row"),
)


# ----------------------------------------------------------------------------------------------------
# cuda_src/norm.cu

NORM_MUTANTS: tuple = (
    Mutant("norm_eps_fwd", NORM_CU,
           "sqrtf(chunk_sum_sq(v, lane, lo, hi));\n        const float r = 1.f / fmaxf(n, EPS);",
           "sqrtf(chunk_sum_sq(v, lane, lo, hi));\n        const float r = 1.f / n;", FWD_NORM,
           "eps clamp dropped: a zero chunk divides by 0"),
    Mutant("norm_eps_bwd", NORM_CU,
           "sqrtf(chunk_sum_sq(x, lane, lo, hi));\n      const float r = 1.f / fmaxf(n, EPS);",
           "sqrtf(chunk_sum_sq(x, lane, lo, hi));\n      const float r = 1.f / n;", FWD_NORM,
           "eps clamp dropped in the gradient: a zero chunk gets dxhat / 0"),
    Mutant("norm_pad_cols", NORM_CU, "if (e < p.xhat_cols) y[e] = from_float<T>(v[i]);",
           "if (e < p.D) y[e] = from_float<T>(v[i]);", k(FWD, expr="l2norm or d24 or d33 or d40"),
           "padding columns D..DP of xhat not written (garbage reaches the logits on a GPU)"),
    Mutant("norm_chunk_hi", NORM_CU, "if (e >= lo && e < hi) s += v[i] * v[i];",
           "if (e >= lo && e <= hi) s += v[i] * v[i];", FWD_NORM, "group norm includes the next chunk's first element"),
    Mutant("norm_bwd_missing_r", NORM_CU, "dy[i] = (dot != 0.f ? dy[i] - x[i] * r * dot : dy[i]) * r;",
           "dy[i] = dot != 0.f ? dy[i] - x[i] * r * dot : dy[i];", FWD_NORM,
           "norm gradient not divided by the norm"),
    Mutant("norm_rnorm_index", NORM_CU, "p.rnorm[row * p.groups + g] = r;", "p.rnorm[row + g] = r;", FWD_NORM,
           "rnorm row index without the groups stride"),
    Mutant("norm_zero_nonfinite", NORM_CU, "v[i] = zero ? 0.f : v[i] * r;", "v[i] = v[i] * r;", NONFINITE,
           "the backward's qhat/khat keep non-finite rows: invisible pairs meet them in dQ = dS khat"),
    Mutant("norm_copy_nonfinite", NORM_CU, "v[i] = fabsf(v[i]) <= FLT_MAX_ ? v[i] : 0.f;", "v[i] = v[i];",
           NONFINITE, "the backward's v copy keeps NaN/Inf: masked keys' NaN reaches dP = dO V^T"),
    Mutant("norm_bwd_zero_dy", NORM_CU, "if (e >= lo && e < hi && dy[i] != 0.f) dot +=",
           "if (e >= lo && e < hi) dot +=", NONFINITE,
           "a masked key with a NaN k gets NaN dk through 0 * NaN in <xhat, dxhat>"),
)


# ----------------------------------------------------------------------------------------------------
# cuda_src/common.cuh

COMMON_MUTANTS: tuple = (
    Mutant("common_quad_sum", COMMON, "  x += __shfl_xor_sync(0xffffffffu, x, 2);\n  return x;",
           "  x += __shfl_xor_sync(0xffffffffu, x, 4);\n  return x;", FWD_F32,
           "quad reduction crosses into the neighbouring row group"),
    Mutant("common_quad_max", COMMON, "  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));\n", "",
           k(FWD, expr="configs and bias"), "running max over half the quad: lanes of a row disagree on the offset"),
    Mutant("common_warp_sum", COMMON, "for (int o = 16; o > 0; o >>= 1)", "for (int o = 8; o > 0; o >>= 1)",
           FWD_NORM, "warp reduction over half the warp"),
    Mutant("common_tf32_residual", COMMON, "  small = float_bits(x - bits_as_float(big)) & 0xffffe000u;",
           "  small = 0u;", FWD_F32,
           "3xTF32 without the residual: fp32 degraded to tf32 accuracy"),
    Mutant("common_3xtf32_term", COMMON, "  mma_m16n8k8_tf32(d, a_big, b_small);\n", "", FWD_F32,
           "3xTF32 missing the big*small term"),
    Mutant("common_bf16_truncate", COMMON, "  h.bits = emu::f32_to_bf16_rn(x);",
           "  { uint32_t u_; __builtin_memcpy(&u_, &x, 4); h.bits = (uint16_t)(u_ >> 16); }",
           k(FWD, expr="l2norm or (configs and bfloat16)"),
           "fp32 -> bf16 conversion truncates (cvt.rz) instead of rounding to nearest even"),
    Mutant("common_atomic_add2_operand", COMMON, "  atomicAdd(p + 1, b);", "  atomicAdd(p + 1, a);",
           ("tests/test_emu_atomic_add2.py",), "atomic_add2's second element gets the first value"),
)


# ----------------------------------------------------------------------------------------------------
# cuda_src/backward.cu

BACKWARD_MUTANTS: tuple = (
    Mutant("bwd_sok_sync", BACKWARD_CU, "    __syncthreads();\n    int any = 0, all_ok = 1;",
           "    int any = 0, all_ok = 1;", BWD_MASK,
           "no barrier between writing the key flags and every thread reading them"),
    Mutant("bwd_dkdv_stage_sync", BACKWARD_CU,
           "      __syncthreads();  // everyone is done with this stage (and sdS) before it is refilled\n", "",
           BWD_F16, "bwd_dkdv: no barrier before the next stage's prefetch overwrites Q/dO another warp reads"),
    Mutant("bwd_dkdv_wait_2", BACKWARD_CU,
           "        load_q_stage(h_next, i0_next, st ^ 1);\n        cp_async_wait<1>();",
           "        load_q_stage(h_next, i0_next, st ^ 1);\n        cp_async_wait<2>();", BWD_F16,
           "bwd_dkdv waits for all but two groups: the current stage may be in flight"),
    Mutant("bwd_dkdv_last_wait", BACKWARD_CU,
           "        cp_async_wait<0>();\n      }\n      __syncthreads();  // this stage's copies (every thread's)",
           "        cp_async_wait<1>();\n      }\n      __syncthreads();  // this stage's copies (every thread's)",
           BWD_F16,
           "bwd_dkdv's last iteration leaves its stage in flight"),
    Mutant("bwd_dq_wait_2", BACKWARD_CU, "        load_kv_stage(kt_next, st ^ 1);\n        cp_async_wait<1>();",
           "        load_kv_stage(kt_next, st ^ 1);\n        cp_async_wait<2>();", BWD_GQA,
           "bwd_dq waits for all but two groups: the current key tile may be in flight"),
    Mutant("bwd_ds_sync", BACKWARD_CU,
           "        __syncthreads();  // every warp's dS^T is staged before the dQ products read it\n", "", BWD_F16,
           "no barrier between staging dS^T and the dQ product reading other warps' rows"),
    Mutant("bwd_dq_stage_sync", BACKWARD_CU,
           "      __syncthreads();  // this stage may be refilled next iteration\n", "", BWD_GQA,
           "bwd_dq: no barrier before the prefetch refills a key tile another warp reads"),
    Mutant("bwd_dkdv_item_sync", BACKWARD_CU,
           "s * p.heads_per_split;\n\n    __syncthreads();  // the previous work item is done with shared memory\n",
           "s * p.heads_per_split;\n\n", BWD_GRID_Y,
           "grid-y loop of bwd_dkdv: after an item with nothing visible, the next item's key flags overwrite "
           "flags still being read"),
    # the backward's products (tiles.cuh's dtype-generic k-steps)
    Mutant("bwd_kn_no_trans", TILES_CUH,
           "  else return bk_lane_off<PITCH>(lane);  // (the layout mma_ab_step reads)",
           "  else return bn_lane_off<PITCH>(lane);  // (the layout mma_ab_step reads)", BWD_F16,
           "K, the B operand of the fast-mode dQ product (stored [k][n]), addressed as if stored [n][k]"),
    Mutant("bwd_km_no_trans", TILES_CUH, "    ldsm_x4_trans(a.big, p);", "    ldsm_x4(a.big, p);", BWD_F16,
           "dS^T read as the dQ product's A operand without .trans"),
    Mutant("bwd_b2_frag_swap", TILES_CUH, "    acc_to_a<T>(a[0], c[2 * ks], c[2 * ks + 1]);",
           "    acc_to_a<T>(a[0], c[2 * ks + 1], c[2 * ks]);", BWD_F16,
           "accumulators to A operand (dV, dK, deterministic dQ): the two n8 tiles' k halves exchanged"),
    Mutant("bwd_store2_order", BACKWARD_CU, "*reinterpret_cast<uint32_t*>(s) = pack2<T>(x0, x1);",
           "*reinterpret_cast<uint32_t*>(s) = pack2<T>(x1, x0);", BWD_F16,
           "dS^T staged with each column pair swapped"),
    Mutant("bwd_f32_kn_c", TILES_CUH, "  if constexpr (sizeof(T) == 4) return 2 * (lane % 4) * PITCH + (lane / 4) * 4;",
           "  if constexpr (sizeof(T) == 4) return (lane % 4) * PITCH + (lane / 4) * 4;", BWD_F32,
           "fp32 B rows (against accumulators) in the plain k order, not the one mma_pb_step_f32's permutation needs"),
    Mutant("bwd_f32_km", TILES_CUH,
           "    split_tf32(lds_f32(p + 32), a.big[1], a.small[1]);\n    split_tf32(lds_f32(p + 4 * PITCH_A), a.big[2], "
           "a.small[2]);",
           "    split_tf32(lds_f32(p + 4 * PITCH_A), a.big[1], a.small[1]);\n    split_tf32(lds_f32(p + 32), a.big[2], "
           "a.small[2]);",
           BWD_F32, "fp32 A fragment a1/a2 swapped (transposed load)"),
    Mutant("bwd_f32_kn_row", TILES_CUH, "      split_tf32(lds_f32(p + 32 * n + 4 * PITCH_B), bb[1], bs[1]);",
           "      split_tf32(lds_f32(p + 32 * n + PITCH_B), bb[1], bs[1]);", BWD_F32,
           "fp32 fast-mode dQ: K's second fragment row read one row on instead of four"),
    Mutant("bwd_f32_rowsum_perm", TILES_CUH, "    split_tf32(c[ks][2], a.big[1], a.small[1]);",
           "    split_tf32(c[ks][1], a.big[1], a.small[1]);", k(ROWS, expr="float32"),
           "fp32 deterministic r_i: the accumulator-to-A permutation mixes rows g and g + 8"),
    Mutant("bwd_copy_cols", TILES_CUH, "        const bool inside = (FULL || r < rows_left) && c < chunks_left;",
           "        const bool inside = FULL || r < rows_left;", k(BWD, expr="configs and (d200 or d256)"),
           "head dims padded past the storage dim (D_PAD > 128): the padding columns are read, not zero-filled"),
    Mutant("bwd_dkdv_causal_strict", BACKWARD_CU, "visible(key[e >> 1], i0 + col, cdiff, key_ok[e >> 1])",
           "visible(key[e >> 1], i0 + col, cdiff - 1, key_ok[e >> 1])",
           BWD_CAUSAL, "bwd_dkdv causal off-by-one"),
    Mutant("bwd_dq_causal_strict", BACKWARD_CU, "visible(j0 + col, row[r], cdiff, cOk[col] != 0)",
           "visible(j0 + col, row[r], cdiff - 1, cOk[col] != 0)",
           k(CAUSAL, expr="backward_causal_diff_sweep and deterministic"), "bwd_dq causal off-by-one"),
    Mutant("bwd_q_first_tight", BACKWARD_CU, "const int q_first = p.causal ? max(0, j0 - off) : 0;",
           "const int q_first = p.causal ? max(0, j0 - off + 1) : 0;", BWD_CAUSAL,
           "q_first one too late: the query tile holding the diagonal's first row is skipped when it starts a tile"),
    Mutant("bwd_q_first_loose", BACKWARD_CU, "const int q_first = p.causal ? max(0, j0 - off) : 0;",
           "const int q_first = p.causal ? max(0, j0 - off - 1) : 0;", BWD_CAUSAL,
           "q_first one too early: a query tile that sees none of the block's keys is read"),
    Mutant("bwd_k_end_tight", BACKWARD_CU, "min(i0 + BR, p.Nq) - 1 + off + 1)", "min(i0 + BR, p.Nq) - 1 + off)",
           k(CAUSAL, expr="deterministic and (backward_causal_diff_sweep or bounds)"),
           "k_end one short: the last visible key tile is dropped when the bound starts a tile"),
    Mutant("bwd_k_end_loose", BACKWARD_CU, "min(i0 + BR, p.Nq) - 1 + off + 1)", "min(i0 + BR, p.Nq) + off + 1)",
           k(CAUSAL, expr="never_read"), "k_end one too far: a key tile no query of the block sees is read"),
    Mutant("bwd_dq_gqa", BACKWARD_CU, "h = (int)(y % p.H), hk = h / qpk;", "h = (int)(y % p.H), hk = h % p.Hk;",
           BWD_GQA, "deterministic dQ reads kv head h % Hk instead of h / (H / Hk)"),
    Mutant("bwd_h_first_split", BACKWARD_CU, "const int h_first = hk * qpk + s * p.heads_per_split;",
           "const int h_first = hk * qpk + s;", BWD_GQA,
           "query-head split s starts at head s, not s * heads_per_split"),
    Mutant("bwd_head_of_iteration", BACKWARD_CU, "      h = h_next;\n", "", HEAD_WALK,
           "GQA head walk: h never advances, so bias, dbias, dQ and dscale rows use the first head for every head"),
    Mutant("bwd_dq_unscaled", BACKWARD_CU, "(acc_dp[n][e] - dvv[e >> 1]) * scale_h;", "(acc_dp[n][e] - dvv[e >> 1]);",
           BWD_GQA, "deterministic dQ without the scale_h factor"),
    Mutant("bwd_ds_no_dvec", BACKWARD_CU, "const float ds = acc_s[n][e] * (acc_dp[n][e] - cDv[col]);",
           "const float ds = acc_s[n][e] * acc_dp[n][e];", BWD_F16, "dS = P dP without subtracting D = rowsum(dO O)"),
    Mutant("bwd_dq_atomic_plain", BACKWARD_CU,
           "atomic_add2(dq_row[r] + x, acc[n][2 * r], acc[n][2 * r + 1]);",
           "{ dq_row[r][x] += acc[n][2 * r]; dq_row[r][x + 1] += acc[n][2 * r + 1]; }", BWD_RACE,
           "dQ accumulated by a plain += from many blocks (a race)", env=RACE_ENV),
    Mutant("bwd_dbias_atomic_plain", BACKWARD_CU, "atomicAdd(static_cast<float*>(p.dbias) + off, x);",
           "static_cast<float*>(p.dbias)[off] += x;", BWD_RACE, "broadcast dbias summed by a plain += (a race)",
           env=RACE_ENV),
    Mutant("bwd_dbias_every_chunk", BACKWARD_CU, "if (p.dbias_mode != 0) grad_s(chunk == 0);",
           "if (p.dbias_mode != 0) grad_s(true);", BWD_BIAS,
           "every head-dim chunk's block adds dS to dbias (counted twice above DP = 128)"),
    Mutant("bwd_dbias_transpose", BACKWARD_CU, "store_dbias<T>(p, dbb + i * p.dbias_sq + j, ds);",
           "store_dbias<T>(p, dbb + j * p.dbias_sq + i, ds);", BWD_BIAS, "dbias stored transposed"),
    Mutant("bwd_bias_frag_transpose", BACKWARD_CU, "return RowCol{i0 + n * 8 + 2 * t + (e & 1), key[e >> 1]};",
           "return RowCol{key[e >> 1], i0 + n * 8 + 2 * t + (e & 1)};", BWD_BIAS, "bwd_dkdv reads the bias transposed"),
    Mutant("bwd_prep_lse2_scale", BACKWARD_CU, "l2 = l < -3.0e38f ? pos_inf() : l * LOG2E;",
           "l2 = l < -3.0e38f ? pos_inf() : l;", BWD_F16, "lse2 in natural-log units while logits are in log2"),
    Mutant("bwd_prep_padding_rows", BACKWARD_CU, "      if (lane == 0) {\n        p.lse2[y * p.nq_pad + i] = l2;",
           "      if (lane == 0 && i < p.Nq) {\n        p.lse2[y * p.nq_pad + i] = l2;", BWD_F16,
           "lse2 / D of the padding rows past Nq never written (their +inf sentinel missing)"),
    Mutant("bwd_key_ok_warp", BACKWARD_CU, "key_ok[r] = sOk[16 * warp + g + 8 * r];", "key_ok[r] = sOk[g + 8 * r];",
           BWD_MASK, "key flags of warp 0 used by every warp"),
    Mutant("bwd_dq_stage_index", BACKWARD_CU, "const int so = st * C::KVST;",
           "const int so = (st ^ 1) * C::KVST;", BWD_GQA, "bwd_dq reads K and V from the stage being prefetched"),
    Mutant("bwd_dkdv_stage_index", BACKWARD_CU, "      const saddr_t dOK = qK + (C::DO_OFF - C::Q_OFF);",
           "      const saddr_t dOK = qK + (C::DO_OFF - C::Q_OFF) - so;", BWD_F16,
           "bwd_dkdv's dV product reads dO from stage 0 on every iteration"),
    Mutant("bwd_rows_valid", BACKWARD_CU,
           "load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::Q_OFF + st_ * C::QST, gq, p.q_sn, p.Nq - i0_, p.D, ld);",
           "load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::Q_OFF + st_ * C::QST, gq, p.q_sn, p.Nq - i0_ + 1, p.D, ld);",
           k(BWD, expr="configs"),
           "tile load off-by-one: the row past the valid ones is read (out of bounds at a tensor's end)"),
    Mutant("bwd_dkdv_store_rows", BACKWARD_CU, "if (j < p.Nk && d < p.D) {\n          const int64_t o = ob",
           "if (d < p.D) {\n          const int64_t o = ob", BWD_F16, "dK/dV rows past Nk stored (out of bounds)"),
    Mutant("bwd_split_offset", BACKWARD_CU, "((int64_t)hk * p.nsplit + s) * p.dkv_sh;", "(int64_t)hk * p.dkv_sh;",
           BWD_GQA, "partial dK/dV of every query-head split written to the same slot"),
    Mutant("bwd_dp_unzeroed", BACKWARD_CU,
           "      float acc_dp[NT][4];\n      fill_zero(acc_dp);\n#pragma unroll (C::U_ABT)\n      for (int ks = 0; ks "
           "< D_PAD / KS; ++ks) abt_step<T, BR, PITCH>(acc_dp, vA",
           "      float acc_dp[NT][4];\n#pragma unroll (C::U_ABT)\n      for (int ks = 0; ks < D_PAD / KS; ++ks) "
           "abt_step<T, BR, PITCH>(acc_dp, vA", BWD_F16,
           "dP^T accumulators not zeroed per query tile"),
    # hoisted per-tile visibility checks (taken when dscale is not needed)
    Mutant("bwd_dkdv_check_causal", BACKWARD_CU,
           "const bool check = !all_ok || (p.causal && j0 + BC - 1 > i0 + off);", "const bool check = !all_ok;",
           LEAN, "bwd_dkdv skips the per-pair test on causal tiles that cross the diagonal"),
    Mutant("bwd_dq_check_tail", BACKWARD_CU, "j0 + BC > p.Nk ||", "", LEAN,
           "bwd_dq skips the per-pair test on the partial last key tile: padding keys (cosine 0) get P > 0, "
           "Inf when every real key has a negative cosine at a large scale"),
    Mutant("bwd_all_ok_dropped", BACKWARD_CU, "      all_ok &= sOk[r];\n", "", LEAN,
           "bwd_dkdv treats every key tile as fully visible: masked keys get P > 0"),
    # GQA head walk of bwd_dkdv
    Mutant("bwd_head_scale_kept", BACKWARD_CU, "      if (head_ends && it + 1 < n_it) scale_h = p.scale[h_next];\n",
           "", HEAD_WALK, "the head walk keeps the first head's scale for every head"),
    Mutant("bwd_head_next_same", BACKWARD_CU, "const int h_next = head_ends ? h + 1 : h,", "const int h_next = h,",
           HEAD_WALK, "the head walk never leaves the first head: its query tiles are loaded for every head"),
    # paired dQ atomics
    Mutant("bwd_dq_pair_swapped", BACKWARD_CU,
           "atomic_add2(dq_row[r] + x, acc[n][2 * r], acc[n][2 * r + 1]);",
           "atomic_add2(dq_row[r] + x, acc[n][2 * r + 1], acc[n][2 * r]);", BWD_F16,
           "fast-mode dQ columns d, d + 1 exchanged"),
    # dscale's per-row sums c_i, r_i (cuda_src/backward.cu file comment)
    Mutant("bwd_dscale_c_plain", BACKWARD_CU, "atomicAdd(rows_c + col, cs[r]);", "rows_c[col] += cs[r];", BWD_RACE,
           "dscale's c_i summed over key-tile blocks by a plain += (a race)", env=RACE_ENV),
    Mutant("bwd_dscale_r_plain", BACKWARD_CU, "atomicAdd(rows_r + i, acc_r[2 * r]);", "rows_r[i] += acc_r[2 * r];",
           BWD_RACE, "dscale's r_i summed over key-tile blocks by a plain += (a race)", env=RACE_ENV),
    Mutant("bwd_rowsum_base", BACKWARD_CU, "      if (hi) base += HALF;", "      if (!hi) base += HALF;",
           k(ROWS, expr="fast"),
           "row-group reduce-scatter: lanes attribute their kept sums to the other half's query columns"),
    Mutant("bwd_rowsum_owner", BACKWARD_CU, "      if (hi) owner = false;\n", "", k(ROWS, expr="fast and float32"),
           "row-group reduction with fewer values than stages (fp32 16-query tiles): c_i added by two lanes"),
    Mutant("bwd_dq_rowsum_rescale", BACKWARD_CU, "        for (int e = 0; e < 4; ++e) acc_r[e] *= ratio;\n",
           "        for (int e = 0; e < 4; ++e) acc_r[e] *= 1.f;\n", k(ROWS, expr="shrinks"),
           "deterministic float16: r_i not rescaled when the range factor shrinks"),
    # fast paths of the tile loops
    Mutant("bwd_dkdv_bias_fast_path", BACKWARD_CU, "      } else if (p.bias != nullptr) {\n        probs(false, false, "
                                                   "true);",
           "      } else if (p.bias != nullptr) {\n        probs(false, false, false);", LEAN,
           "bwd_dkdv drops the bias on tiles whose pairs are all visible"),
    Mutant("bwd_dq_bias_fast_path", BACKWARD_CU, "      else if (p.bias != nullptr) probs(false, false, true);",
           "      else if (p.bias != nullptr) probs(false, false, false);", LEAN,
           "bwd_dq drops the bias on tiles whose pairs are all visible"),
    Mutant("bwd_ds_scaled_warp0", BACKWARD_CU,
           "          for (int w = 0; w < C::NW; ++w) scaled = scaled || sInvF[w] != 1.f;",
           "          for (int w = 0; w < 1; ++w) scaled = scaled || sInvF[w] != 1.f;", FP16_RANGE,
           "fast-mode float16 dQ takes the unscaled product when only another warp than warp 0 shrank its factor"),
    Mutant("bwd_ds_range_inf", BACKWARD_CU, "  if (mx > FMAX) {", "  if (false) {",
           k(*FP16_RANGE, *NONFINITE, expr="not hopper"),
           "float16 dS range: an Inf |scale_h dS| sets the factor (to 2^-115) instead of being left to propagate"),
)


# ----------------------------------------------------------------------------------------------------
# The launch layer (cupy_cosattn/launch/).

LAUNCH_MUTANTS: tuple = (
    # dispatch.py: kernels and grids
    Mutant("launch_fwd_grid_x", DISPATCH, "(cdiv(prob.Nq, ft.bm), _grid_y(BH), 1), tile=ft.bn",
           "(prob.Nq // ft.bm, _grid_y(BH), 1), tile=ft.bn", FWD_F16,
           "forward grid misses the last partial query tile"),
    Mutant("lb_dkdv_chunks", DISPATCH, "n_x = cdiv(Nk, kv.rows) * kv.n_chunks", "n_x = cdiv(Nk, kv.rows)",
           k(BWD, expr="configs and (d200 or d256)"), "bwd_dkdv grid without the head-dim chunks"),
    Mutant("lb_dq_chunks", DISPATCH, "(cdiv(Nq, qc.rows) * qc.n_chunks, _grid_y(B * H), 1)",
           "(cdiv(Nq, qc.rows), _grid_y(B * H), 1)", k(BWD, expr="configs and det"),
           "bwd_dq grid without the head-dim chunks"),
    Mutant("lb_tile_any_size", DISPATCH, "tile=qc.tile, n_y=B * H", "tile=qc.rows, n_y=B * H", BWD_MASK,
           "bwd_dq key-tile flags computed for tiles of its query rows, not its key tile (fp32: 64 vs 16 keys)"),
    # tiles.py: tile sizes, paths, variants
    Mutant("launch_fixed_offset_bound", TILES, 'FIXED_OFFSET_MAX_BOUND = {"float16": 10.0,',
           'FIXED_OFFSET_MAX_BOUND = {"float16": 20.0,', k(FWD, expr=f"fixed_offset or (configs and {F16})"),
           "fp16 fixed offset allowed for logit bounds that push P out of fp16's range"),
    Mutant("launch_fixed_offset_groups", TILES, "bound = float(np.max(scale)) * prob.groups",
           "bound = float(np.max(scale))", k(FWD, expr=f"fixed_offset or (configs and {F16})"),
           "logit bound without the l2norm groups factor"),
    Mutant("launch_fwd_bn_halving", TILES, "        if bn > 16:\n            bn //= 2",
           "        if bn > 32:\n            bn //= 2", k(FWD, CAUSAL, expr="small"),
           "key tile not halved below 32 on small-shared-memory devices"),
    Mutant("launch_fwd_mode_bias", TILES, "return FWD_BIAS if prob.has_bias else FWD_RUNNING_MAX",
           "return FWD_RUNNING_MAX", k(FWD, expr="configs and bias"),
           "a biased problem launched on the running-max kernel without the bias"),
    Mutant("lb_choose_small_swapped", TILES,
           "return (kv_config(dtype_name, dp).smem > smem_limit, q_config(dtype_name, dp).smem > smem_limit)",
           "return (q_config(dtype_name, dp).smem > smem_limit, kv_config(dtype_name, dp).smem > smem_limit)",
           BWD_SMALL, "small-variant choice of the two kernels swapped"),
    Mutant("lb_nq_pad", TILES, "return round_up(Nq, NQ_PAD)", "return round_up(Nq, PREP_ROWS)", BWD_F16,
           "lse2 / D rows padded to 32 while query tiles read 64 rows"),
    # staging.py, forward.py: the forward's buffers and parameters
    Mutant("launch_bias_strides", STAGING,
           "bias_sb=Hb * Nq * Nk if Bb > 1 else 0, bias_sh=Nq * Nk if Hb > 1 else 0,",
           "bias_sb=Hb * Nq * Nk, bias_sh=Nq * Nk,", k(FWD, expr=f"configs and bias and {F16}"),
           "broadcast bias dims given real strides (reads past the bias)"),
    Mutant("launch_fwd_tile_any", LAUNCH_FWD, "st = stage(dev, prob, inp, caps, tile=fwd.tile)",
           "st = stage(dev, prob, inp, caps, tile=64)",
           k(BWD, FWD, expr="fully_masked or (configs and mask and float32)"),
           "key-tile flags computed for 64-key tiles while fp32 tiles have 32 keys"),
    # backward.py: the backward's buffers and post-passes
    Mutant("lb_dq_uninitialized", LAUNCH_BWD,
           "dq = dev.empty(q_rows + (Ds,), F32) if prob.deterministic else dev.zeros(q_rows + (Ds,), F32)",
           "dq = dev.empty(q_rows + (Ds,), F32)", BWD_F16, "atomic dQ accumulates onto uninitialized memory"),
    Mutant("lb_dbias_strides", LAUNCH_BWD,
           "(Hb * Nq * Nk if Bb > 1 else 0, Nq * Nk if Hb > 1 else 0, Nk))", "(Hb * Nq * Nk, Nq * Nk, Nk))",
           BWD_BIAS, "broadcast dbias (atomic mode) given real strides: writes past the buffer"),
    Mutant("lb_split_sum", LAUNCH_BWD, "dk = dk.reshape(split).sum(axis=2)",
           "dk = dk.reshape(split)[:, :, 0]", BWD_GQA, "partial dK of query-head splits not summed"),
    Mutant("lb_dscale_unscaled", LAUNCH_BWD,
           "dscale = dev.to_host(dscale) / np.asarray(inp.scale, dtype=np.float64)", "dscale = dev.to_host(dscale)",
           BWD_F16, "dscale not divided by the scale"),
    Mutant("lb_dscale_no_row_correction", LAUNCH_BWD,
           "        dscale = dscale - xp.sum(cr[:, :, 0] * cr[:, :, 1], axis=(0, 2))\n", "",
           k(DSCALE, expr=F16), "dscale without - sum_i c_i r_i: the rounding of D_i through the stored O stays in"),
    # arrays.py
    Mutant("lb_bf16_cast_truncates", ARRAYS,
           "u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)",
           "u = u >> np.uint32(16)", k(BWD, expr="bfloat16_cast or (configs and bfloat16)"),
           "bf16 cast of the post-passes truncates"),
    # non-finite values and the float16 range of dS
    Mutant("bwd_prep_nan_dvec", BACKWARD_CU, "        if (!(fabsf(dsum) <= 3.402823466e38f)) dsum = 0.f;\n", "",
           NONFINITE, "a poisoned row's D = rowsum(dO O) stays NaN and reaches its invisible pairs"),
    Mutant("bwd_ds_range_dkdv", BACKWARD_CU,
           "      if constexpr (DsRange<T>::value) ds_range_f16(acc_dp, ds_f, acc_dk);  // acc_dp = scale_h dS f\n", "",
           FP16_RANGE, "bwd_dkdv rounds scale_h dS to float16 unscaled: large values overflow to Inf"),
    Mutant("bwd_ds_range_dq", BACKWARD_CU,
           "      if constexpr (DsRange<T>::value) ratio = ds_range_f16(acc_dp, ds_f, acc_dq);"
           "  // acc_dp = scale_h dS f\n", "",
           FP16_RANGE, "deterministic bwd_dq rounds scale_h dS to float16 unscaled"),
    Mutant("bwd_ds_range_no_rescale", BACKWARD_CU, "      for (int e = 0; e < 4; ++e) acc[n][e] *= ratio;\n",
           "      for (int e = 0; e < 4; ++e) {}\n", FP16_RANGE,
           "a shrinking factor leaves the accumulators in units of the old one"),
    Mutant("bwd_ds_range_target", BACKWARD_CU, "constexpr int DS_F16_TARGET_EXP = 13;",
           "constexpr int DS_F16_TARGET_EXP = 16;", FP16_RANGE,
           "the factor maps |scale_h dS| to [2^16, 2^17): rounded operands overflow float16"),
    Mutant("bwd_ds_inv_f_warp", BACKWARD_CU, "const float inv = sInvF[ks];", "const float inv = sInvF[warp];",
           FP16_RANGE, "fast-mode dQ undoes its own warp's factor, not that of the warp whose keys it sums"),
    Mutant("bwd_dk_factor_kept", BACKWARD_CU, "        for (int e = 0; e < 4; ++e) acc_dk[n][e] *= inv;\n",
           "        for (int e = 0; e < 4; ++e) {}\n", FP16_RANGE, "float16 dK stored still multiplied by the factor"),
    Mutant("bwd_dq_factor_kept", BACKWARD_CU, "gdq[i * p.dq_sn + d] = acc_dq[n][e] * inv_f;",
           "gdq[i * p.dq_sn + d] = acc_dq[n][e];", FP16_RANGE,
           "deterministic float16 dQ stored still multiplied by the factor"),
)

# ----------------------------------------------------------------------------------------------------
# KV-cache attention: cuda_src/decode.cu, its launch (cupy_cosattn/launch/decode.py) and host checks
# (cupy_cosattn/kvcache.py). tests/test_kvcache.py fills every unused cache slot and unmapped page
# with NaN, so a read past a sequence's length shows up as NaN.

DECODE_CU = "cuda_src/decode.cu"
LAUNCH_DECODE = "cupy_cosattn/launch/decode.py"
KVCACHE_PY = "cupy_cosattn/kvcache.py"
KVCACHE = "tests/test_kvcache.py"
KV_SPLITS = k(KVCACHE, expr="num_splits and not reference")
KV_QUERY_COUNTS = k(KVCACHE, expr="query_count")
KV_RUNNING_MAX = k(KVCACHE, expr="running_max")
KV_NONFINITE = k(KVCACHE, expr="nonfinite_values_poison and wm1")

DECODE_MUTANTS: tuple = (
    # decode.cu: synchronization
    Mutant("dec_sync_landed", DECODE_CU,
           "        __syncthreads();    // tile `tile` (and, on the first one, Q) has landed for every thread\n",
           "",
           KV_SPLITS,
           "no barrier after the cp.async wait: warps read K/V pieces other threads' copies have not landed"),
    Mutant("dec_sync_normalized", DECODE_CU,
           "        if (p.norm_qk || scrub) __syncthreads();",
           "",
           KV_SPLITS,
           "no barrier between the key/query normalization and the mma that reads the scales / rewritten rows"),
    Mutant("dec_sync_reuse", DECODE_CU,
           "else tile_pv<T, DP, KT>(o, lsum, s, sVw, lane);\n\n        __syncthreads();",
           "else tile_pv<T, DP, KT>(o, lsum, s, sVw, lane);\n",
           k(KVCACHE, expr="nonfinite_values_poison and wm4 and 1-fixed"),
           "no barrier before the prefetch refills a K/V buffer another warp (WM = 4) still reads"),
    Mutant("dec_sync_staged", DECODE_CU,
           "      }\n    }\n    __syncthreads();\n\n    // Join",
           "      }\n    }\n\n    // Join",
           KV_SPLITS,
           "no barrier between staging the warps' partial O/l/m and the join that reads other warps' rows"),
    Mutant("dec_wait_group_2", DECODE_CU,
           "        cp_async_wait<1>();\n        __syncthreads();    // tile",
           "        cp_async_wait<2>();\n        __syncthreads();    // tile",
           KV_SPLITS,
           "wait_group 2 in the double-buffered loop: the current tile may still be in flight"),
    # decode.cu: non-finite values
    Mutant("dec_scrub_missing", DECODE_CU,
           "        if (scrub) scrub_v<T, DP, BN, ROW>(sV + buf * KV);",
           "",
           KV_NONFINITE,
           "no scrub of V on tiles with causally hidden keys: 0 * NaN poisons rows that do not see the key"),
    Mutant("dec_scrub_tile_test", DECODE_CU,
           "const bool scrub = hidden_keys && tile * BN + BN > lim_lo;",
           "const bool scrub = hidden_keys && tile * BN > lim_lo;",
           KV_NONFINITE,
           "scrub only from the tile after the one holding the first hidden key (off by a tile)"),
    Mutant("dec_poison_missing", DECODE_CU,
           "+ quad_sum(poison);",
           ";",
           k(KVCACHE, expr="nonfinite_values_poison and wm1 and float16 and not bfloat16"),
           "a non-finite partial O (Inf value row) not turned into a NaN row"),
    Mutant("dec_combine_nan_l", DECODE_CU,
           "    const float inv = l == 0.f ? 0.f : 1.f / l;  // a poisoned split's NaN l makes the row NaN",
           "    const float inv = l > 0.f ? 1.f / l : 0.f;",
           k(KVCACHE, expr="nonfinite_values_poison and wm1 and 3-fixed"),
           "the combine treats a NaN l as 'no visible key': a poisoned row's finite columns come out 0"),
    Mutant("dec_vflags_bit", DECODE_CU,
           "<< (2 * j + c);",
           "<< (2 * j);",
           KV_NONFINITE,
           "the V flag of a thread's odd key lands on its even neighbour's bit"),
    # decode.cu: visibility, bounds, pages, splits, the combine, the append
    Mutant("dec_causal_limit", DECODE_CU,
           "      const int l = Lb - p.Nq + i + 1;",
           "      const int l = Lb - p.Nq + i;",
           KV_QUERY_COUNTS,
           "causal off-by-one: a query does not see its own (diagonal) key"),
    Mutant("dec_visible_le", DECODE_CU,
           "return key0 + 8 * j + 2 * t + (e & 1) < lim[e >> 1]; };",
           "return key0 + 8 * j + 2 * t + (e & 1) <= lim[e >> 1]; };",
           KV_QUERY_COUNTS,
           "per-element visibility lets a row see one key past its limit"),
    Mutant("dec_kend_read_past", DECODE_CU,
           "      const bool in = key_g + rr < kend && c < p.D;",
           "      const bool in = key_g + rr <= kend && c < p.D;",
           KV_SPLITS,
           "the tile load reads the slot just past the sequence's last key (NaN in the tests' caches)"),
    Mutant("dec_page_no_table", DECODE_CU,
           "  return {(int64_t)bt_row[lp], row};",
           "  return {(int64_t)lp, row};",
           k(KVCACHE, expr="num_splits and paged"),
           "logical page used as the physical page: the block table is ignored"),
    Mutant("dec_page_div_16", DECODE_CU,
           "key >> p.page_shift : key / p.page_size;",
           "key >> p.page_shift : key / 16;",
           k(KVCACHE, expr="page_size_not_a_power_of_two"),
           "the non-power-of-two page path assumes 16-slot pages"),
    Mutant("dec_split_floor", DECODE_CU,
           "    const int tps = (n_tiles + p.num_splits - 1) / p.num_splits;",
           "    const int tps = n_tiles / p.num_splits > 0 ? n_tiles / p.num_splits : 1;",
           KV_SPLITS,
           "tiles per split rounded down: the last tiles of a sequence belong to no split"),
    Mutant("dec_combine_drop_split", DECODE_CU,
           "      for (int s = 0; s < S; ++s) {",
           "      for (int s = 0; s < S - 1; ++s) {",
           KV_SPLITS,
           "the combine's numerator skips the last split"),
    Mutant("dec_combine_rm_weight", DECODE_CU,
           "    for (int s = lane; s < S; s += 32) l += weight(s) * p.lpart[s * p.part_rows + row];",
           "    for (int s = lane; s < S; s += 32) l += p.lpart[s * p.part_rows + row];",
           KV_RUNNING_MAX,
           "running-max combine: the denominators summed without their exp2(m_s - max m) weights"),
    Mutant("dec_combine_lse_offset", DECODE_CU,
           "      const float off = p.scale[h] * p.groups - Headroom<T>::value;",
           "      const float off = p.scale[h] * p.groups;",
           k(KVCACHE, expr="dtypes and float16 and not bfloat16"),
           "the combine's lse forgets the fp16 headroom of the fixed offset"),
    Mutant("dec_combine_head", DECODE_CU,
           "      const int h = (int)((row / p.Nq) % p.H);",
           "      const int h = (int)(row % p.H);",
           k(KVCACHE, expr="groups_and_per_head_scale"),
           "the combine's per-head scale (offset) read for the wrong head"),
    Mutant("dec_key_rnorm_column", DECODE_CU,
           "            for (int e = 0; e < 4; ++e) s[j][e] *= rn[e & 1];",
           "            for (int e = 0; e < 4; ++e) s[j][e] *= rn[0];",
           KV_SPLITS,
           "odd key columns scaled by their even neighbour's 1/||k||"),
    Mutant("dec_gqa_scale_head", DECODE_CU,
           "      const float sc = p.scale[hk * G + R / p.Nq];\n      scale_log2",
           "      const float sc = p.scale[hk + R / p.Nq];\n      scale_log2",
           k(KVCACHE, expr="groups_and_per_head_scale"),
           "per-head scale indexed without the GQA group offset"),
    Mutant("dec_gridy_bound", DECODE_CU,
           "  for (int64_t bk = blockIdx.y; bk < BHk; bk += gridDim.y) {",
           "  for (int64_t bk = blockIdx.y; bk < gridDim.y; bk += gridDim.y) {",
           k(KVCACHE, expr="grid_limits"),
           "no loop over (batch, kv head) pairs beyond the grid's y extent"),
    Mutant("dec_append_slot", DECODE_CU,
           "    const Slot s = locate(p, bt_row, b, p.seqlens[b] + i);",
           "    const Slot s = locate(p, bt_row, b, p.seqlens[b] + i - 1);",
           k(KVCACHE, expr="append_at_page_boundaries"),
           "the append writes one slot early, over the last cached key"),
    Mutant("dec_restrict_skipped", DECODE_CU,
           "          if (check) restrict_tile(0.f);\n",
           "",
           KV_QUERY_COUNTS,
           "fixed offset: no per-element visibility on tiles that need it (causally hidden keys get p > 0)"),
    Mutant("dec_stage_m", DECODE_CU,
           "        stM[warp * 16 + g + 8 * r] = row_m[r];",
           "        stM[warp * 16 + g + 8 * r] = 0.f;",
           KV_RUNNING_MAX,
           "running max: the warps' maxima are not staged, so the join weights the warps' partials wrongly"),
    # launch/decode.py and kvcache.py
    Mutant("launch_page_shift", LAUNCH_DECODE,
           "page_shift=(ps.bit_length() - 1) if",
           "page_shift=ps.bit_length() if",
           k(KVCACHE, expr="num_splits and paged"),
           "page shift off by one: log2(page_size) + 1"),
    Mutant("launch_n_row_tiles", LAUNCH_DECODE,
           "n_row_tiles=attn.grid[0] // splits,",
           "n_row_tiles=1,",
           KV_QUERY_COUNTS,
           "row tiles per kv head taken as 1: the split index of blocks past the first row tile is wrong"),
    Mutant("launch_new_keys", LAUNCH_DECODE,
           "new_keys=prob.new_keys,",
           "new_keys=0,",
           KV_SPLITS,
           "the kernel does not count the appended keys in L_b"),
    Mutant("launch_write_back", LAUNCH_DECODE,
           "        kc.write_back()\n",
           "",
           KV_SPLITS,
           "a staged NumPy k_cache is not written back after the append"),
    Mutant("kvcache_capacity", KVCACHE_PY,
           "    over = np.flatnonzero(lengths > capacity)",
           "    over = np.flatnonzero(lengths >= capacity)",
           k(KVCACHE, expr="auto_splits_use"),
           "a sequence that fills its cache exactly is refused"),
    Mutant("kvcache_unused_pages", KVCACHE_PY,
           "        bad_entry = in_use & ((table < 0) | (table >= num_pages))",
           "        bad_entry = (table < 0) | (table >= num_pages)",
           k(KVCACHE, expr="unused_table_entries"),
           "block-table entries past a sequence's pages are checked (they may hold anything)"),
)

# ----------------------------------------------------------------------------------------------------
# The Hopper forward: cuda_src/hopper_fwd.cu, through the emulator presenting itself as an H100 (the
# tests set it). Its synchronization faults (skipped full/empty waits, reads before wgmma.wait, the
# ping-pong hand-off, the fix-up's proxy fence, per-warpgroup release, expect_tx miscounts) are planted
# by tests/test_kernels_hopper.py::test_planted_fault_is_caught itself; these are the other bugs.
HOPPER_FWD_CU = "cuda_src/hopper_fwd.cu"
HOPPER = "tests/test_kernels_hopper.py"
HOP_GRID_F16 = k(HOPPER, expr=f"test_hopper_forward_grid and {F16}")  # fp16 D = 64, 128: every feature
HOP_GRID_Y = (f"{HOPPER}::test_hopper_forward_grid_y_loop",)
HOP_NONFINITE = k(HOPPER, "tests/test_nonfinite.py", expr="causally_invisible or hopper_forward_agrees")

HOPPER_MUTANTS: tuple = (
    Mutant("h90_causal_limit", HOPPER_FWD_CU, "    const int causal_limit = g + 8 * h + cdiff + 1;\n",
           "    const int causal_limit = g + 8 * h + cdiff;\n", HOP_GRID_F16,
           "causal off-by-one on diagonal tiles: each row loses its diagonal key"),
    Mutant("h90_gqa_head", HOPPER_FWD_CU, "    hk = h / (p.H / p.Hk);\n", "    hk = h % p.Hk;\n", HOP_GRID_F16,
           "GQA kv head as h % Hk instead of h / (H / Hk)"),
    Mutant("h90_scale_d_first_kstep", HOPPER_FWD_CU, "    wgmma_ss<BLOCK_N, T>(s, dq, dk, kk > 0);\n",
           "    wgmma_ss<BLOCK_N, T>(s, dq, dk, true);\n", HOP_GRID_F16,
           "scale-d set on the first k-step: S_j accumulates onto the previous tile's P"),
    Mutant("h90_v_desc_kstep", HOPPER_FWD_CU,
           "    const uint64_t dv = make_smem_desc(sV + ks * 16 * 128, L::KV_CB, 1024, Swizzle::B128);\n",
           "    const uint64_t dv = make_smem_desc(sV + ks * 8 * 128, L::KV_CB, 1024, Swizzle::B128);\n",
           HOP_GRID_F16, "V's MN-major descriptor advances 8 keys per k-step of 16"),
    Mutant("h90_o_not_rescaled", HOPPER_FWD_CU,
           "    for (int i = 0; i < DP / 2; ++i) r.o[i] *= r.alpha[(i >> 1) & 1];\n",
           "    for (int i = 0; i < DP / 2; ++i) r.o[i] *= 1.f;\n", HOP_GRID_F16,
           "running max: O not rescaled when a row's maximum grows"),
    Mutant("h90_tail_keys_visible", HOPPER_FWD_CU,
           "    vis[h] = mbits & prefix_bits(causal_limit < keys_left ? causal_limit : keys_left, t);\n",
           "    vis[h] = mbits & prefix_bits(causal_limit, t);\n", HOP_GRID_F16,
           "keys past Nk (the TMA's zero fill) count as visible on the last tile"),
    Mutant("h90_fast_path_ignores_mask", HOPPER_FWD_CU,
           "  if (keys_left == BLOCK_N && p.mask == nullptr && cdiff >= BLOCK_N - 1 && !scrubbed) {\n",
           "  if (keys_left == BLOCK_N && cdiff >= BLOCK_N - 1 && !scrubbed) {\n", HOP_GRID_F16,
           "full tiles take the unchecked exponentials even with a key mask"),
    Mutant("h90_running_max_empty_row", HOPPER_FWD_CU,
           "      const float m_use = m_new == neg_inf() ? 0.f : m_new;\n", "      const float m_use = m_new;\n",
           HOP_GRID_F16, "running max: a row with nothing visible yet computes (-inf) - (-inf) = NaN"),
    Mutant("h90_mask_bytes_past_nk", HOPPER_FWD_CU,
           "dst[r] = r < left ? w.mask[(int64_t)j * BLOCK_N + r] : 0;", "dst[r] = w.mask[(int64_t)j * BLOCK_N + r];",
           HOP_GRID_F16, "the mask warp reads mask bytes past Nk (out of the (B, Nk) mask's bounds)"),
    Mutant("h90_bias_column_past_nk", HOPPER_FWD_CU,
           "if constexpr (CHECK) kr = kr < keys_left ? kr : 0;", "", HOP_GRID_F16,
           "running max: the bias of keys past Nk is read (out of bounds on the last row)"),
    Mutant("h90_next_q_before_out_stored", HOPPER_FWD_CU,
           "    mbar_wait(bar.empty_q, (q_round & 1) ^ 1);", "", HOP_GRID_Y,
           "grid-y loop: the next Q lands in the buffer the out TMA stores still read"),
    Mutant("h90_launch_grid_x", DISPATCH, "(cdiv(prob.Nq, sm90.BLOCK_M), _grid_y(BH), 1)",
           "(prob.Nq // sm90.BLOCK_M, _grid_y(BH), 1)", HOP_GRID_F16,
           "the sm_90a forward's grid misses the last partial 128-row query tile"),
    Mutant("h90_lse_not_poisoned", HOPPER_FWD_CU,
           "        p.lse[w.b * p.lse_sb + w.h * p.lse_sh + row] = lse + poison;\n",
           "        p.lse[w.b * p.lse_sb + w.h * p.lse_sh + row] = lse;\n", HOP_NONFINITE,
           "a row poisoned by a visible NaN / Inf value keeps a finite lse"),
    Mutant("h90_scrub_flags_ignored", HOPPER_FWD_CU, "  if (scrubbed) bad = column_bits(sFlag, t);\n", "",
           HOP_NONFINITE, "a visible key whose non-finite V the fix-up zeroed no longer poisons its rows"),
    Mutant("h90_empty_v_before_pv_wait", HOPPER_FWD_CU,
           "          wgmma_wait<0>();\n          fence_regs(r.o);\n"
           "          release(&bar.empty_v[prev]);  // nor V_{j-1} and its flags\n",
           "          release(&bar.empty_v[prev]);  // nor V_{j-1} and its flags\n"
           "          wgmma_wait<0>();\n          fence_regs(r.o);\n", HOP_GRID_F16,
           "V_{j-1} released before the wait for P_{j-1} V_{j-1}: the producer may refill the stage by TMA while "
           "that wgmma still reads it"),
)


# Every mutant, one group per source file. A new kernel adds its group above and here.
# ----------------------------------------------------------------------------------------------------
# Packed variable-length batches: params.cuh SeqView, the VARLEN kernels' sequence index, the launch
# layer's packed launches (launch/packed.py, backward.py, staging.py), the checks and the packed model.
PARAMS_CUH = "cuda_src/params.cuh"
PACKED = "cupy_cosattn/launch/packed.py"
STAGING = "cupy_cosattn/launch/staging.py"
VARLEN_PY = "cupy_cosattn/varlen.py"
TRANSFORMER = "cupy_cosattn/transformer.py"
VARLEN = "tests/test_varlen.py"
VL_DENSE = k(VARLEN, expr="equals_dense_per_sequence and not gpu and float16")
VL_SPLIT = (f"{VARLEN}::test_batches_beyond_the_grid_limit_split_into_launches",)
VL_HEADS = (f"{VARLEN}::test_query_head_splits",)
VL_PACKED_MODEL = ("tests/test_transformer_packed.py",)

VARLEN_MUTANTS: tuple = (
    Mutant("vl_q_base", PARAMS_CUH, "p.q = rows_at(p.q, s.q_base, p.q_sn, e);",
           "p.q = rows_at(p.q, s.k_base, p.q_sn, e);", VL_DENSE, "a sequence's queries read from its keys' first row"),
    Mutant("vl_nk", PARAMS_CUH, "p.Nk = s.nk;", "p.Nk = s.nq;", VL_DENSE,
           "key count of a sequence taken as its query count"),
    Mutant("vl_nq", PARAMS_CUH, "p.Nq = s.nq;", "p.Nq = s.nk;", VL_DENSE,
           "query count of a sequence taken as its key count"),
    Mutant("vl_seq_start", PARAMS_CUH, "const int q0 = p.cu_seqlens_q[b], k0",
           "const int q0 = p.cu_seqlens_q[b] + 1, k0", VL_DENSE, "a sequence's first query row off by one"),
    Mutant("vl_lse_base", PARAMS_CUH, "p.lse = rows_at(p.lse, s.q_base, 1, 4);",
           "p.lse = rows_at(p.lse, s.k_base, 1, 4);", VL_DENSE, "lse rows of a sequence at its keys' offset"),
    Mutant("vl_dk_base", PARAMS_CUH, "p.dk = rows_at(p.dk, s.k_base,", "p.dk = rows_at(p.dk, s.q_base,", VL_DENSE,
           "dK rows of a sequence at its queries' offset"),
    Mutant("vl_dout_base", PARAMS_CUH, "p.dout = rows_at(p.dout, s.q_base,", "p.dout = rows_at(p.dout, s.k_base,",
           VL_DENSE, "dO rows of a sequence at its keys' offset"),
    Mutant("vl_dkdv_seq_index", BACKWARD_CU, "(int)(blockIdx.y / ((int64_t)params.nsplit * params.Hk))",
           "(int)(blockIdx.y / ((int64_t)params.H))", k(VARLEN, expr="without_a_split"),
           "bwd_dkdv's work item mapped to the wrong sequence"),
    Mutant("vl_launch_seqlens_offset", PACKED, 'cu_seqlens_q=fields["cu_seqlens_q"] + b0 * INT32_BYTES',
           'cu_seqlens_q=fields["cu_seqlens_q"] + b0 * 2 * INT32_BYTES', VL_SPLIT,
           "a later launch over sequences reads the wrong cu_seqlens entries"),
    Mutant("vl_launch_row_buffers", PACKED, "f[name] = fields[name] + b0 * per_batch * F32_BYTES",
           "f[name] = fields[name] + b0 * F32_BYTES", VL_SPLIT,
           "lse2 / D / dscale row buffers of a later launch overlap the first launch's"),
    Mutant("vl_lse_transpose", LAUNCH_BWD, "lse.T if prob.varlen else lse", "lse", VL_DENSE,
           "the packed (total_q, H) lse handed to the kernels without its (H, total_q) transpose"),
    Mutant("vl_k_row_stride", STAGING, "k_sn=Hk * Ds", "k_sn=H * Ds",
           k(VARLEN, expr="equals_dense_per_sequence and not gpu"),
           "packed key rows strided by the query heads (wrong under GQA)"),
    Mutant("vl_split_sum_axes", LAUNCH_BWD, "split = (prob.total_k, Hk, nsplit, Ds)",
           "split = (prob.total_k, nsplit, Hk, Ds)", VL_HEADS, "query-head splits' partial dK/dV summed over kv heads"),
    Mutant("vl_check_last_entry", VARLEN_PY, "if int(host[-1]) != total:", "if int(host[-1]) > total:",
           k(VARLEN, expr="bad_arguments"), "cu_seqlens ending before the last row accepted"),
    Mutant("vl_positions_restart", TRANSFORMER,
           "pos = torch.arange(T, device=tokens.device) - cu_seqlens.to(torch.int64)[doc]",
           "pos = torch.arange(T, device=tokens.device)", VL_PACKED_MODEL,
           "packed documents' positions do not restart at each document"),
    Mutant("vl_labels_across_documents", TRANSFORMER, "        labels = labels.masked_fill(last, -100)\n", "",
           VL_PACKED_MODEL, "the loss predicts a document's first token from the previous document"),
)


MUTANTS: tuple = (FORWARD_MUTANTS + NORM_MUTANTS + COMMON_MUTANTS + BACKWARD_MUTANTS + LAUNCH_MUTANTS + DECODE_MUTANTS
             + HOPPER_MUTANTS + VARLEN_MUTANTS)


# ---------------------------------------------------------------------------------------------------
# Planting.

class MutantError(RuntimeError):
    """A mutant that cannot be planted (its snippet does not occur exactly once)."""


def check_mutant(root: Path, m: Mutant) -> Optional[str]:
    """None when `m` can be planted in the tree at `root`, else what is wrong."""
    path = root / m.file
    if not path.is_file():
        return f"{m.id}: {m.file} does not exist"
    n = path.read_text().count(m.original)
    if n != 1:
        return f"{m.id}: its original snippet occurs {n} times in {m.file} (must be exactly once)"
    if m.original == m.replacement:
        return f"{m.id}: the replacement equals the original"
    return None


def check_mutants(root: Path = REPO, mutants: Sequence[Mutant] = MUTANTS) -> list:
    """Every problem with the mutant list against the sources at `root` (empty when all is well)."""
    problems = []
    ids = [m.id for m in mutants]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        problems.append(f"duplicate ids: {dup}")
    for m in mutants:
        p = check_mutant(root, m)
        if p:
            problems.append(p)
        for arg in m.tests:
            if arg.startswith("tests/") and not (root / arg.split("::")[0]).is_file():
                problems.append(f"{m.id}: test path {arg} does not exist")
    return problems


def plant(root: Path, m: Mutant) -> str:
    """Write mutant `m` into the tree at `root`; returns the file's original text (for restore)."""
    err = check_mutant(root, m)
    if err:
        raise MutantError(err)
    path = root / m.file
    text = path.read_text()
    path.write_text(text.replace(m.original, m.replacement, 1))
    return text


def restore(root: Path, m: Mutant, text: str):
    (root / m.file).write_text(text)


def copy_repo(dst: Path, src: Path = REPO) -> Path:
    """Copy the files git tracks or would track (untracked, not ignored) from `src` into `dst`."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=src, check=True,
                             capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(src)) for p in src.rglob("*")
                 if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
    for f in files:
        s = src / f
        if not s.is_file():  # deleted in the work tree but still in the index
            continue
        d = dst / f
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    return dst


# ---------------------------------------------------------------------------------------------------
# Running.

@dataclass
class Result:
    id: str
    status: str  # "killed", "survived", "timeout" (killed by a hang), "error" (could not be judged)
    seconds: float
    detail: str = ""  # the first failing test, or why the mutant could not be judged
    output_tail: str = field(default="", repr=False)

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")


def pytest_command(tests: Sequence[str]) -> list:
    return [sys.executable, "-m", "pytest", *PYTEST_BASE, *tests]


def run_command(cmd: Sequence[str], cwd: Path, env: dict, timeout_s: float) -> tuple:
    """(returncode | None on timeout, output). The command runs in its own process group, which is
    killed as a whole on timeout."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    lines = [ln for ln in output.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def scratch_env(root: Path, cache_dir: Path, emu_threads: Optional[int]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["CUPY_COSATTN_CACHE"] = str(cache_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if emu_threads:
        env["CUPY_COSATTN_EMU_THREADS"] = str(emu_threads)
    return env


def run_mutant(root: Path, m: Mutant, env: dict, timeout_s: float,
               command: Callable[[Mutant], Sequence[str]] = lambda m: pytest_command(m.tests)) -> Result:
    """Plant `m` at `root`, run its tests (`command(m)`, in `root`), restore the file. A non-zero exit
    kills the mutant (the baseline established that the selection passes unmutated); a timeout kills
    it as a hang."""
    text = plant(root, m)
    t0 = time.monotonic()
    try:
        rc, out = run_command(command(m), root, {**env, **dict(m.env)}, m.timeout_s or timeout_s)
    finally:
        restore(root, m, text)
    dt = time.monotonic() - t0
    tail = out[-4000:]
    if rc is None:
        return Result(m.id, "timeout", dt, f"no result after {m.timeout_s or timeout_s:.0f} s (hang)", tail)
    if rc == 0:
        return Result(m.id, "survived", dt, "", tail)
    if rc == 5:
        return Result(m.id, "error", dt, "no tests collected", tail)
    return Result(m.id, "killed", dt, first_failure(out), tail)


def check_import_location(root: Path, env: dict):
    """The scratch copy's package must be the one imported (not an installed one)."""
    code = "import cupy_cosattn, sys; sys.stdout.write(cupy_cosattn.__file__)"
    rc, out = run_command([sys.executable, "-c", code], root, env, 120)
    if rc != 0 or not Path(out.strip()).resolve().is_relative_to(root.resolve()):
        raise SystemExit(f"the scratch copy at {root} does not import its own cupy_cosattn (got {out.strip()!r})")


def run_all(mutants: Sequence[Mutant], *, jobs: int, timeout_s: float, cache_dir: Path, scratch: Path,
            baseline: bool, emu_threads: Optional[int], log=print) -> tuple:
    """Baseline (optional) then every mutant, `jobs` at a time, each in its own scratch copy.
    Returns (results in list order, baseline failures {selection: detail})."""
    roots = []
    for j in range(jobs):
        root = copy_repo(scratch / f"tree{j}")
        check_import_location(root, scratch_env(root, cache_dir, emu_threads))
        roots.append(root)
    free: queue.Queue[Path] = queue.Queue()
    for r in roots:
        free.put(r)

    def with_root(fn):
        root = free.get()
        try:
            return fn(root)
        finally:
            free.put(root)

    bad_baseline = {}
    if baseline:
        selections = list(dict.fromkeys(m.selection for m in mutants))
        log(f"baseline: {len(selections)} test selections on the unmutated sources")

        def base(sel):
            tests, extra_env = sel

            def go(root):
                t0 = time.monotonic()
                env = {**scratch_env(root, cache_dir, emu_threads), **dict(extra_env)}
                rc, out = run_command(pytest_command(tests), root, env, timeout_s)
                return sel, rc, time.monotonic() - t0, out
            return with_root(go)

        with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
            for sel, rc, dt, out in ex.map(base, selections):
                ok = rc == 0
                env_note = " ".join(f"{a}={b}" for a, b in sel[1])
                log(f"  {'ok  ' if ok else 'FAIL'} {dt:7.1f}s  {env_note + ' ' if env_note else ''}{' '.join(sel[0])}")
                if not ok:
                    bad_baseline[sel] = "timeout" if rc is None else first_failure(out)

    results = {}

    def one(m):
        if m.selection in bad_baseline:
            return Result(m.id, "error", 0.0, f"its tests fail unmutated: {bad_baseline[m.selection]}")
        return with_root(lambda root: run_mutant(root, m, scratch_env(root, cache_dir, emu_threads), timeout_s))

    with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(one, m): m for m in mutants}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            r = fut.result()
            results[r.id] = r
            log(f"[{i:3d}/{len(mutants)}] {r.id:28s} {r.status:9s} {r.seconds:7.1f}s  {r.detail}")
    return [results[m.id] for m in mutants], bad_baseline


def summarize(mutants: Sequence[Mutant], results: Sequence[Result]) -> dict:
    by_id = {m.id: m for m in mutants}
    judged = [r for r in results if r.status != "error"]
    killed = [r for r in judged if r.killed]
    return {
        "total": len(results), "judged": len(judged), "killed": len(killed),
        "kill_rate": (len(killed) / len(judged)) if judged else 0.0,
        "survivors": [{"id": r.id, "file": by_id[r.id].file, "rationale": by_id[r.id].rationale}
                      for r in judged if not r.killed],
        "hangs": [r.id for r in results if r.status == "timeout"],
        "errors": [{"id": r.id, "detail": r.detail} for r in results if r.status == "error"],
    }


def git_head(root: Path = REPO) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1; 2 at most on two cores)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per test run (a hang is a kill)")
    ap.add_argument("--json", metavar="PATH", help="write results and summary as JSON")
    ap.add_argument("--no-baseline", action="store_true", help="skip running the selections unmutated first")
    ap.add_argument("--cache-dir", help="emulator build cache for this run (default: a temporary directory)")
    ap.add_argument("--scratch", help="where the scratch copies go (default: a temporary directory, removed)")
    ap.add_argument("--emu-threads", type=int, default=None,
                    help="CUPY_COSATTN_EMU_THREADS for the tests (default: 1 when --jobs > 1, else unchanged)")
    args = ap.parse_args(argv)

    problems = check_mutants()
    if problems:
        print("the mutant list is out of sync with the sources:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutants})
        if unknown:
            print(f"unknown mutant ids: {unknown}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in set(args.only)]
    if args.list:
        for m in mutants:
            env_note = "".join(f" {a}={b}" for a, b in m.env)
            print(f"{m.id:28s} {m.file:32s} {m.rationale}\n{'':28s} tests:{env_note} {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0

    jobs = max(1, args.jobs)
    emu_threads = args.emu_threads if args.emu_threads is not None else (1 if jobs > 1 else None)
    scratch_ctx = tempfile.TemporaryDirectory(prefix="ca-mutate-") if not args.scratch else None
    scratch = Path(args.scratch) if args.scratch else Path(scratch_ctx.name)
    scratch.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else scratch / "emu-cache"
    started = _dt.datetime.now().astimezone()
    commit = git_head()  # of the sources the scratch copies are made from (before any later commit)
    t0 = time.monotonic()
    try:
        results, bad = run_all(mutants, jobs=jobs, timeout_s=args.timeout, cache_dir=cache_dir, scratch=scratch,
                               baseline=not args.no_baseline, emu_threads=emu_threads,
                               log=lambda s: print(s, flush=True))
    finally:
        if scratch_ctx is not None:
            scratch_ctx.cleanup()
    summary = summarize(mutants, results)
    wall = time.monotonic() - t0

    print(f"\n{summary['killed']}/{summary['judged']} mutants killed ({100 * summary['kill_rate']:.1f} %), "
          f"{len(summary['hangs'])} of them by a hang; {len(summary['errors'])} not judged; {wall / 60:.1f} min")
    for h in summary["hangs"]:
        print(f"  hang (counted as killed): {h}")
    for s in summary["survivors"]:
        print(f"  SURVIVED {s['id']:28s} {s['file']}: {s['rationale']}")
    for e in summary["errors"]:
        print(f"  NOT JUDGED {e['id']}: {e['detail']}")
    if args.json:
        doc = {"date": started.isoformat(timespec="seconds"), "commit": commit, "wall_s": round(wall, 1),
               "jobs": jobs, "summary": summary, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if not summary["survivors"] and not summary["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
