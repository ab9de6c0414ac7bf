"""Emulator self-tests, part 3: the sm_90a primitives of cuda_src/hopper.cuh, checked against layouts and
rules re-written here (independently of the C++) from the PTX ISA and the CUDA documentation:

- wgmma.mma_async.m64nNk16 register fragments (PTX ISA "Matrix Fragments for wgmma.mma_async.m64nNk16";
  warpgroup of 4 warps, w = warp in the warpgroup, g = lane >> 2, t = lane % 4):
    A: element i (register i // 2, low half first): row 16w + g + 8*((i >> 1) & 1), col 2t + (i & 1) + 8*(i >> 2)
    D: register i: row 16w + g + 8*((i >> 1) & 1), col 8*(i >> 2) + 2t + (i & 1)
- Matrix descriptor (PTX ISA "Matrix Descriptor Format"): bits 13-0 start address, 29-16 leading
  dimension byte offset, 45-32 stride dimension byte offset, each encoded (x & 0x3FFFF) >> 4; 51-49 base
  offset; 63-62 swizzle 0 none, 1 128B, 2 64B, 3 32B.
- Canonical layouts (PTX ISA "Canonical Layouts", CuTe notation, T = 8 for 16-bit elements, strides in
  elements), the element at (mn, k) found by evaluating these layouts and then the swizzle
  Swizzle<B,4,3> (B = 0, 1, 2, 3 for none, 32B, 64B, 128B) on its shared byte address:
    MN-major: none ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO));  W = span/16: ((T,W,m),(8,k)):((1,T,LBO),(W*T,SBO))
    K-major:  none ((8,m),(T,2k)):((1T,SBO),(1,LBO));     W: ((8,m),(T,2k)):((W*T,SBO),(1,T))
  and the ISA's worked bf16 examples (exact layouts with their LBO / SBO).
- TMA swizzle (CUDA Programming Guide, "TMA Swizzle"): with 128-byte rows y and 16-byte chunks x,
  smem[y][x] <-> smem[y][((y + offset) % P) ^ x], offset = (shared address / 128) % P, P = 8, 4, 2 for
  128B, 64B, 32B; the box is dense in shared memory (innermost dimension first); out-of-bound elements
  are zeros; TMA loads complete their byte count on an mbarrier.
- mbarrier (PTX ISA "mbarrier"): a phase completes when its pending arrival count and its tx-count are both
  zero; try_wait.parity(P) succeeds once the phase of parity P has completed, i.e. when the current
  phase's parity differs from P.

Each kernel loads per-thread registers or shared-memory images from global memory, runs the primitive and
stores what it produced, so the tests see registers and bytes themselves.
"""
import os

import ml_dtypes
import numpy as np
import pytest

from cupy_cosattn import emulator as emu
from cupy_cosattn import tensormap

BF16 = ml_dtypes.bfloat16
DYN_BASE = 1024  # the emulator's shared address of dynamic shared memory (checked by test_emu_smem_addr)

SRC = r"""
#include "hopper.cuh"
using namespace ca::sm90;

// ---- descriptors and swizzle (pure arithmetic) ----
extern "C" __global__ void t_desc_bits(const uint32_t* args, int n, unsigned long long* out, uint32_t* swz) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint32_t* a = args + 5 * i;
    out[i] = make_smem_desc(a[0], a[1], a[2], (Swizzle)a[3], a[4]);
    swz[i] = swizzle_address(a[0], (Swizzle)a[3]);
  }
}

extern "C" __global__ void t_smem_addr(uint32_t* out) {
  CA_DYNAMIC_SHARED(smem);
  out[threadIdx.x] = window_addr(smem + 16 * threadIdx.x);
}

// ---- wgmma: a shared-memory image, per-thread registers in, per-thread accumulators out ----
struct WgParams {
  uint32_t img_bytes, a_off, a_lbo, a_sbo, a_swz, b_off, b_lbo, b_sbo, b_swz;
  int scale_d, a_regs;
};

template <int N, class T, int MA, int MB, int NA, int NB>
__global__ void t_wgmma(const unsigned char* img, const uint32_t* a_regs, const float* c_in, float* d_out,
                        WgParams p) {
  CA_DYNAMIC_SHARED(smem);
  (void)window_addr(smem);  // a Hopper primitive first: later plain stores need fence.proxy.async
  for (uint32_t i = threadIdx.x; i < p.img_bytes; i += blockDim.x) smem[i] = img[i];
  fence_proxy_async_shared();
  __syncthreads();
  const int R = N / 2;
  float d[R];
  for (int i = 0; i < R; ++i) d[i] = c_in[threadIdx.x * R + i];
  uint32_t a[4];
  for (int i = 0; i < 4; ++i) a[i] = a_regs[threadIdx.x * 4 + i];
  uint64_t da = make_smem_desc(smem + p.a_off, p.a_lbo, p.a_sbo, (Swizzle)p.a_swz);
  uint64_t db = make_smem_desc(smem + p.b_off, p.b_lbo, p.b_sbo, (Swizzle)p.b_swz);
  wgmma_fence();
  if (p.a_regs)
    wgmma_rs<N, T, (Major)MB, NA != 0, NB != 0>(d, a, db, p.scale_d != 0);
  else
    wgmma_ss<N, T, (Major)MA, (Major)MB, NA != 0, NB != 0>(d, da, db, p.scale_d != 0);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < R; ++i) d_out[threadIdx.x * R + i] = d[i];
}

// ---- TMA ----
template <int R>
__device__ void load_r(void* dst, const TensorMap* tm, uint64_t* bar, const int* c) {
  if constexpr (R == 1) tma_load(dst, tm, bar, c[0]);
  if constexpr (R == 2) tma_load(dst, tm, bar, c[0], c[1]);
  if constexpr (R == 3) tma_load(dst, tm, bar, c[0], c[1], c[2]);
  if constexpr (R == 4) tma_load(dst, tm, bar, c[0], c[1], c[2], c[3]);
  if constexpr (R == 5) tma_load(dst, tm, bar, c[0], c[1], c[2], c[3], c[4]);
}
template <int R>
__device__ void store_r(const TensorMap* tm, const void* src, const int* c) {
  if constexpr (R == 1) tma_store(tm, src, c[0]);
  if constexpr (R == 2) tma_store(tm, src, c[0], c[1]);
  if constexpr (R == 3) tma_store(tm, src, c[0], c[1], c[2]);
  if constexpr (R == 4) tma_store(tm, src, c[0], c[1], c[2], c[3]);
  if constexpr (R == 5) tma_store(tm, src, c[0], c[1], c[2], c[3], c[4]);
}

// Loads one box at shared offset dst_off, then copies `nbytes` of shared memory from there out.
template <int R>
__global__ void t_tma_load(const __grid_constant__ TensorMap tm, const int* coords, uint32_t dst_off,
                           uint32_t expect_tx, uint32_t nbytes, unsigned char* out, uint32_t* base) {
  CA_DYNAMIC_SHARED(smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) {
    base[0] = window_addr(smem);  // the swizzle depends on it
    mbar_init(bar, 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, expect_tx);
    load_r<R>(smem + dst_off, &tm, bar, coords);
  }
  mbar_wait(bar, 0);
  for (uint32_t i = threadIdx.x; i < nbytes; i += blockDim.x) out[i] = smem[dst_off + i];
}

// Writes a shared-memory image with plain stores, then stores one box from src_off to global memory.
template <int R>
__global__ void t_tma_store(const __grid_constant__ TensorMap tm, const int* coords, const unsigned char* img,
                            uint32_t src_off, uint32_t nbytes, int fence) {
  CA_DYNAMIC_SHARED(smem);
  (void)window_addr(smem);
  for (uint32_t i = threadIdx.x; i < nbytes; i += blockDim.x) smem[src_off + i] = img[i];
  if (fence) fence_proxy_async_shared();
  __syncthreads();
  if (threadIdx.x == 0) {
    store_r<R>(&tm, smem + src_off, coords);
    tma_store_commit();
    tma_store_wait_read<0>();
  }
}

// ---- TMA + wgmma, end to end: C (64 x 64) = A (64 x 64) B^T, both K-major with 128B swizzle ----
extern "C" __global__ void t_gemm64(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb,
                                    float* c) {
  CA_DYNAMIC_SHARED(smem);
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* sa = smem + 1024;
  unsigned char* sb = smem + 1024 + 8192;
  if (threadIdx.x == 0) mbar_init(bar, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(bar, 2 * 8192);
    tma_load(sa, &ta, bar, 0, 0);
    tma_load(sb, &tb, bar, 0, 0);
  }
  mbar_wait(bar, 0);
  float d[32];
  wgmma_fence();
  for (int kk = 0; kk < 4; ++kk)
    wgmma_ss<64, ca::bf16_t>(d, make_smem_desc(sa + 32 * kk, 16, 1024, Swizzle::B128),
                             make_smem_desc(sb + 32 * kk, 16, 1024, Swizzle::B128), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_operand(d);
  int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
  for (int i = 0; i < 32; ++i) c[(16 * w + g + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t + (i & 1)] = d[i];
}

// ---- a producer warp and a consumer warpgroup over a 2-stage ring (C = A B^T, K = 64 * ktiles) ----
// WAIT_EMPTY = false plants the fault: the producer refills a stage without waiting for its release.
// RELEASE_EARLY = true plants another: the consumer releases a stage before its wgmmas have completed.
template <bool WAIT_EMPTY, bool RELEASE_EARLY>
__global__ void t_pipeline(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb, float* c,
                           int ktiles) {
  CA_DYNAMIC_SHARED(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + 2;
  unsigned char* stage = smem + 1024;  // 2 stages of A (8 KB) + B (8 KB)
  if (threadIdx.x == 0)
    for (int s = 0; s < 2; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
  __syncthreads();
  if (threadIdx.x >= 128) {  // the producer warp
    if (elect_one_sync())
      for (int kt = 0; kt < ktiles; ++kt) {
        int s = kt % 2;
        if (WAIT_EMPTY) mbar_wait(&empty[s], ((kt / 2) & 1) ^ 1);
        mbar_arrive_expect_tx(&full[s], 16384);
        tma_load(stage + s * 16384, &ta, &full[s], 64 * kt, 0);
        tma_load(stage + s * 16384 + 8192, &tb, &full[s], 64 * kt, 0);
      }
    return;
  }
  float d[32];
  wgmma_fence();
  for (int kt = 0; kt < ktiles; ++kt) {
    int s = kt % 2;
    mbar_wait(&full[s], (kt / 2) & 1);
    unsigned char* sa = stage + s * 16384;
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss<64, ca::bf16_t>(d, make_smem_desc(sa + 32 * kk, 16, 1024, Swizzle::B128),
                               make_smem_desc(sa + 8192 + 32 * kk, 16, 1024, Swizzle::B128), kt > 0 || kk > 0);
    wgmma_commit();
    if (RELEASE_EARLY && threadIdx.x == 0) mbar_arrive(&empty[s]);
    named_barrier_sync(1, 128);  // the consumer warps meet (as ping-pong schedules do) before the wait
    wgmma_wait<0>();
    if (!RELEASE_EARLY && threadIdx.x == 0) mbar_arrive(&empty[s]);
    wgmma_fence();
  }
  int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
  for (int i = 0; i < 32; ++i) c[(16 * w + g + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t + (i & 1)] = d[i];
}

// ---- overwriting a wgmma's operand: how the writer learns that the wgmma is complete ----
// A consumer warpgroup computes C = A B^T (4 wgmmas reading A and B from shared memory); then warp 4
// overwrites B, by a TMA load (PLAIN = false) or by plain stores (PLAIN = true). ORDER: the writer
// learns of the wgmmas' completion through 0 an mbarrier every consumer thread arrives on after its
// wgmma.wait_group, 2 a named barrier, 4 __syncthreads, all after the wait; 1, 3, 5 the same before
// the wait (the fault: the overwrite may land while the wgmmas still read B).
template <int ORDER, bool PLAIN>
__global__ void t_reuse(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb, float* c) {
  CA_DYNAMIC_SHARED(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + 1;
  unsigned char* sa = smem + 1024;
  unsigned char* sb = smem + 1024 + 8192;
  if (threadIdx.x == 0) {
    mbar_init(full, 1);
    mbar_init(empty, 128);
  }
  __syncthreads();
  const bool writer = threadIdx.x >= 128;
  if (writer && elect_one_sync()) {
    mbar_arrive_expect_tx(full, 2 * 8192);
    tma_load(sa, &ta, full, 0, 0);
    tma_load(sb, &tb, full, 0, 0);
  }
  float d[32];
  if (!writer) {
    mbar_wait(full, 0);
    wgmma_fence();
    for (int kk = 0; kk < 4; ++kk)
      wgmma_ss<64, ca::bf16_t>(d, make_smem_desc(sa + 32 * kk, 16, 1024, Swizzle::B128),
                               make_smem_desc(sb + 32 * kk, 16, 1024, Swizzle::B128), kk > 0);
    wgmma_commit();
    if (ORDER == 1) mbar_arrive(empty);
  }
  if (ORDER == 3) named_barrier_sync(1, 160);
  if (ORDER == 5) __syncthreads();
  if (!writer) {
    wgmma_wait<0>();
    fence_operand(d);
    if (ORDER == 0) mbar_arrive(empty);
  }
  if (ORDER == 2) named_barrier_sync(1, 160);
  if (ORDER == 4) __syncthreads();
  if (writer) {
    if (ORDER <= 1) mbar_wait(empty, 0);
    if (PLAIN) {
      for (int i = threadIdx.x % 32; i < 2048; i += 32) reinterpret_cast<uint32_t*>(sb)[i] = 0;
    } else if (elect_one_sync()) {
      mbar_arrive_expect_tx(full, 8192);
      tma_load(sb, &tb, full, 64, 0);
      mbar_wait(full, 1);
    }
    return;
  }
  int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
  for (int i = 0; i < 32; ++i) c[(16 * w + g + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t + (i & 1)] = d[i];
}

// ---- a wgmma reading a tile whose TMA load is still in flight (no wait on its full barrier first) ----
extern "C" __global__ void t_read_in_flight(const __grid_constant__ TensorMap ta, const __grid_constant__ TensorMap tb,
                                            float* c) {
  CA_DYNAMIC_SHARED(smem);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  unsigned char* sa = smem + 1024;
  unsigned char* sb = smem + 1024 + 8192;
  if (threadIdx.x == 0) mbar_init(full, 1);
  __syncthreads();
  if (threadIdx.x >= 128) {
    if (elect_one_sync()) {
      mbar_arrive_expect_tx(full, 2 * 8192);
      tma_load(sa, &ta, full, 0, 0);
      tma_load(sb, &tb, full, 0, 0);
    }
    named_barrier_sync(1, 160);
    return;
  }
  named_barrier_sync(1, 160);  // the loads are issued, not necessarily landed
  float d[32];
  wgmma_fence();
  for (int kk = 0; kk < 4; ++kk)
    wgmma_ss<64, ca::bf16_t>(d, make_smem_desc(sa + 32 * kk, 16, 1024, Swizzle::B128),
                             make_smem_desc(sb + 32 * kk, 16, 1024, Swizzle::B128), kk > 0);
  wgmma_commit();
  mbar_wait(full, 0);  // too late: the wgmmas may already have read the tiles
  wgmma_wait<0>();
  fence_operand(d);
  int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, t = l % 4;
  for (int i = 0; i < 32; ++i) c[(16 * w + g + 8 * ((i >> 1) & 1)) * 64 + 8 * (i >> 2) + 2 * t + (i & 1)] = d[i];
}

// ---- wgmma asynchrony faults ----
// mode 0: correct; 1: accumulators read before wgmma.wait_group; 2: no wgmma.fence at all;
// 3: accumulators rescaled after a wait and used by the next wgmma without a fence;
// 4: exits with a wgmma in flight; 5: A registers changed before the wait
extern "C" __global__ void t_wgmma_async(const unsigned char* img, float* out, int mode) {
  CA_DYNAMIC_SHARED(smem);
  (void)window_addr(smem);
  for (int i = threadIdx.x; i < 10240; i += blockDim.x) smem[i] = img[i];
  fence_proxy_async_shared();
  __syncthreads();
  uint64_t da = make_smem_desc(smem, 16, 1024, Swizzle::B128);
  uint64_t db = make_smem_desc(smem + 8192, 16, 1024, Swizzle::B128);
  float d[8];
  for (int i = 0; i < 8; ++i) d[i] = 1.0f;
  uint32_t a[4] = {0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u};  // bf16 ones
  if (mode != 2) wgmma_fence();
  if (mode == 5) wgmma_rs<16, ca::bf16_t>(d, a, db, true);
  else wgmma_ss<16, ca::bf16_t>(d, da, db, true);
  wgmma_commit();
  if (mode == 4) return;
  if (mode == 5)
    for (int i = 0; i < 4; ++i) a[i] = 0;
  float early[8];
  for (int i = 0; i < 8; ++i) early[i] = d[i];
  wgmma_wait<0>();
  if (mode == 3) {
    for (int i = 0; i < 8; ++i) d[i] *= 0.5f;
    wgmma_ss<16, ca::bf16_t>(d, da, db, true);
    wgmma_commit();
    wgmma_wait<0>();
  }
  for (int i = 0; i < 8; ++i) out[threadIdx.x * 8 + i] = mode == 1 ? early[i] : d[i];
}

// ---- descriptor faults: a wgmma whose B descriptor starts at shared offset `off` with `swz` ----
extern "C" __global__ void t_desc_fault(uint32_t off, uint32_t swz, uint32_t sbo, uint32_t base_offset, float* out) {
  CA_DYNAMIC_SHARED(smem);  // 16 KB: A (64 rows, 128B swizzle) at 0, B from `off`
  for (int i = threadIdx.x; i < 16384; i += blockDim.x) smem[i] = 0;
  fence_proxy_async_shared();
  __syncthreads();
  float d[8];
  uint64_t da = make_smem_desc(smem, 16, 1024, Swizzle::B128);
  uint64_t db = make_smem_desc(window_addr(smem) + off, 16, sbo, (Swizzle)swz, base_offset);
  wgmma_fence();
  wgmma_ss<16, ca::bf16_t>(d, da, db, false);
  wgmma_commit();
  wgmma_wait<0>();
  out[threadIdx.x] = d[0];
}

// ---- wgmma collective faults ----
// mode 1: threads of the warpgroup disagree on the B descriptor; 2: only warp 0 issues;
// 3: a block of 96 threads (an incomplete warpgroup)
extern "C" __global__ void t_wgmma_collective(int mode, float* out) {
  CA_DYNAMIC_SHARED(smem);
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) smem[i] = 0;
  fence_proxy_async_shared();
  __syncthreads();
  float d[8];
  uint64_t da = make_smem_desc(smem, 16, 1024, Swizzle::B128);
  uint64_t db = make_smem_desc(smem + (mode == 1 && threadIdx.x == 77 ? 1024 : 2048), 16, 1024, Swizzle::B128);
  if (mode == 2 && threadIdx.x >= 32) return;
  wgmma_fence();
  wgmma_ss<16, ca::bf16_t>(d, da, db, false);
  wgmma_commit();
  wgmma_wait<0>();
  out[threadIdx.x] = d[0];
}

// ---- the async proxy: a tile written with plain stores is visible to wgmma only after the fence ----
extern "C" __global__ void t_proxy_fence(const unsigned char* img, float* out, int fence) {
  CA_DYNAMIC_SHARED(smem);
  (void)window_addr(smem);
  for (int i = threadIdx.x; i < 10240; i += blockDim.x) smem[i] = img[i];
  if (fence) fence_proxy_async_shared();
  __syncthreads();
  float d[8];
  wgmma_fence();
  wgmma_ss<16, ca::bf16_t>(d, make_smem_desc(smem, 16, 1024, Swizzle::B128),
                           make_smem_desc(smem + 8192, 16, 1024, Swizzle::B128), false);
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 8; ++i) out[threadIdx.x * 8 + i] = d[i];
}

// ---- mbarrier ----
// Thread 0 arrives with expect_tx(total) and delivers the bytes in pieces with complete_tx, setting
// flag[k] before piece k; thread 32 waits for phase 0 and records the flags it sees.
extern "C" __global__ void t_mbar_tx(const uint32_t* pieces, int npieces, uint32_t total, int* seen) {
  __shared__ uint64_t bar;
  __shared__ volatile int flag[8];
  if (threadIdx.x == 0) {
    mbar_init(&bar, 1);
    for (int k = 0; k < 8; ++k) flag[k] = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbar_arrive_expect_tx(&bar, total);
    for (int k = 0; k < npieces; ++k) {
      flag[k] = 1;
      mbar_complete_tx(&bar, pieces[k]);
    }
  } else if (threadIdx.x == 32) {
    mbar_wait(&bar, 0);
    for (int k = 0; k < 8; ++k) seen[k] = flag[k];
  }
}

// Phases and parities: 4 producer->consumer rounds through one mbarrier of count 2 (warps 0 and 1 each
// arrive once per round); warp 2 waits for every phase in turn; the parity of the phase before the first
// is complete at once.
extern "C" __global__ void t_mbar_phases(int rounds, int* out) {
  __shared__ uint64_t bar, back;
  __shared__ int value;
  if (threadIdx.x == 0) {
    mbar_init(&bar, 2);
    mbar_init(&back, 32);
  }
  __syncthreads();
  int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (w == 2) out[128] = mbar_try_wait(&bar, 1);  // the phase "before" phase 0 counts as complete
  __syncthreads();
  for (int r = 0; r < rounds; ++r) {
    if (w < 2) {
      if (r > 0) mbar_wait(&back, (r - 1) & 1);
      if (lane == 0) {
        if (w == 0) value = 100 + r;
        mbar_arrive(&bar);
      }
    } else if (w == 2) {
      mbar_wait(&bar, r & 1);
      out[r * 32 + lane] = value;
      mbar_arrive(&back);
    }
  }
}

// mbarrier.try_wait on a phase nobody completes returns false once its time limit expires; a wait loop
// on it is a deadlock.
extern "C" __global__ void t_mbar_timeout(int* out, int loop) {
  __shared__ uint64_t bar;
  if (threadIdx.x == 0) mbar_init(&bar, 2);
  __syncthreads();
  if (threadIdx.x == 0) mbar_arrive(&bar);
  out[threadIdx.x] = mbar_try_wait(&bar, 0);
  if (loop) mbar_wait(&bar, 0);
}

// mbarrier faults: 1 never initialized, 2 overwritten by a plain store, 3 an arrival beyond the count
// while the phase waits for bytes, 4 a wait for phase 1, which nobody completes, 5 init count 0
extern "C" __global__ void t_mbar_fault(int mode) {
  __shared__ uint64_t bar;
  if (threadIdx.x == 0 && mode != 1) mbar_init(&bar, mode == 5 ? 0 : 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    if (mode == 2) bar = 0;
    if (mode == 3) mbar_arrive_expect_tx(&bar, 16);
    mbar_arrive(&bar);
  }
  mbar_wait(&bar, 0);
  if (mode == 4) mbar_wait(&bar, 1);
}

// ---- named barriers ----
// Warp 0 publishes a value and bar.arrive(1, 64); warp 1 bar.sync(1, 64) and reads it. Warps 2 and 3
// meet at barrier 2 (count 64) without warps 0 and 1. mode 1: warp 1 waits for count 96 (never reached);
// mode 2: a count that is not a multiple of 32
extern "C" __global__ void t_named(int* out, int rounds, int mode) {
  __shared__ volatile int box[2];
  int w = threadIdx.x / 32;
  for (int r = 0; r < rounds; ++r) {
    if (w == 0) {
      if (threadIdx.x == 0) box[0] = 1000 + r;
      named_barrier_arrive(1, mode == 2 ? 48 : 64);
      named_barrier_sync(3, 64);  // wait until warp 1 has read
    } else if (w == 1) {
      named_barrier_sync(mode == 1 ? 5 : 1, 64);
      out[r * 96 + threadIdx.x - 32] = box[0];
      named_barrier_arrive(3, 64);
    } else {
      if (threadIdx.x == 64) box[1] = 2000 + r;
      named_barrier_sync(2, 64);
      out[r * 96 + threadIdx.x - 32] = box[1];
      named_barrier_sync(4, 64);  // nobody rewrites box[1] before both warps have read it
    }
  }
}

// ---- elect.sync and setmaxnreg ----
extern "C" __global__ void t_elect(int* out) {
  bool a = elect_one_sync();
  bool b = elect_one_sync();
  out[threadIdx.x] = (a ? 1 : 0) | (b ? 2 : 0);
}

// mode 0: warpgroup 0 raises to 232, warpgroup 1 lowers to 40 (uniform); 1: thread 200 asks for 48;
// 2: warpgroup 0 lowers to 40 and then "raises" to 32
extern "C" __global__ void t_setmaxnreg(int mode, int* out) {
  if (threadIdx.x < 128) {
    if (mode == 2) {
      setmaxnreg_dec<40>();
      setmaxnreg_inc<32>();
    } else {
      setmaxnreg_inc<232>();
    }
  } else if (mode == 1 && threadIdx.x == 200) {
    setmaxnreg_dec<48>();
  } else {
    setmaxnreg_dec<40>();
  }
  out[threadIdx.x] = 1;
}
"""

WG_KINDS = [(n, t, ma, mb, na, nb) for (n, t, ma, mb, na, nb) in [
    (8, "half_t", 0, 0, 0, 0), (16, "bf16_t", 0, 0, 0, 0), (32, "half_t", 0, 0, 0, 0), (64, "bf16_t", 0, 0, 0, 0),
    (128, "half_t", 0, 0, 0, 0), (256, "bf16_t", 0, 0, 0, 0), (256, "half_t", 0, 0, 0, 0),
    (16, "bf16_t", 1, 1, 0, 0), (32, "bf16_t", 1, 0, 0, 0), (32, "bf16_t", 0, 1, 0, 0), (32, "half_t", 1, 1, 0, 0),
    (16, "bf16_t", 0, 0, 1, 0), (16, "bf16_t", 0, 0, 0, 1), (16, "bf16_t", 0, 0, 1, 1), (64, "half_t", 0, 1, 0, 0),
    (16, "bf16_t", 0, 1, 0, 0), (32, "bf16_t", 1, 1, 0, 0), (32, "bf16_t", 0, 0, 0, 0)]]
NAMES = ([f"t_wgmma<{n}, ca::{t}, {ma}, {mb}, {na}, {nb}>" for (n, t, ma, mb, na, nb) in WG_KINDS]
         + [f"t_tma_load<{r}>" for r in range(1, 6)] + [f"t_tma_store<{r}>" for r in range(1, 6)]
         + [f"t_pipeline<{a}, {b}>" for a, b in [("true", "false"), ("false", "false"), ("true", "true")]]
         + [f"t_reuse<{o}, {p}>" for o in range(6) for p in ("false", "true")])  # + t_read_in_flight (extern "C")

WG_PARAMS = np.dtype([(name, np.uint32) for name in
                      ("img_bytes", "a_off", "a_lbo", "a_sbo", "a_swz", "b_off", "b_lbo", "b_sbo", "b_swz")]
                     + [("scale_d", np.int32), ("a_regs", np.int32)], align=True)


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17",), name_expressions=NAMES)


def _u16(x):
    return np.asarray(x).view(np.uint16)


# ------------------------------------------------------------------------------------------------
# The reference layouts, written from the ISA text.

def d_frag(thread, i):
    """(row, col) of accumulator register i of warpgroup thread `thread` (0..127)."""
    w, lane = divmod(thread, 32)
    g, t = lane >> 2, lane & 3
    return 16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * t + (i & 1)


def a_frag(thread, i):
    """(row, col) of A element i (0..7; register i // 2, low half first) of thread `thread`."""
    w, lane = divmod(thread, 32)
    g, t = lane >> 2, lane & 3
    return 16 * w + g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def to_frags(C, n):
    """(128, n/2) registers holding the 64 x n matrix C."""
    out = np.zeros((128, n // 2), np.float32)
    for th in range(128):
        for i in range(n // 2):
            out[th, i] = C[d_frag(th, i)]
    return out


def from_frags(regs, n):
    C = np.full((64, n), np.nan, np.float32)
    for th in range(128):
        for i in range(n // 2):
            C[d_frag(th, i)] = regs[th, i]
    return C


def a_registers(A):
    """(128, 4) uint32 registers of the 64 x 16 matrix A (16-bit elements)."""
    bits = _u16(A).astype(np.uint32)
    regs = np.zeros((128, 4), np.uint32)
    for th in range(128):
        for i in range(8):
            regs[th, i // 2] |= bits[a_frag(th, i)] << (16 * (i & 1))
    return regs


def cute_offset(shape, stride, coord):
    """Evaluate a rank-2 CuTe layout (nested shape / stride tuples) at (mode-0 index, mode-1 index):
    each mode's index is split colexicographically (first sub-mode fastest)."""
    off = 0
    for sh, st, c in zip(shape, stride, coord):
        sh = sh if isinstance(sh, tuple) else (sh,)
        st = st if isinstance(st, tuple) else (st,)
        for s, d in zip(sh, st):
            off += (c % s) * d
            c //= s
        assert c == 0, "coordinate outside the layout"
    return off


def canonical_layout(major, span, m, k, lbo, sbo, T=8):
    """The ISA's canonical layout for `major` ("K" or "MN") and a swizzle span (0, 32, 64, 128 bytes);
    m, k: repeats along MN and K; lbo / sbo in elements."""
    W = span // 16
    if major == "MN":
        if span == 0:
            return ((T, 1, m), (8, k)), ((1, T, sbo), (1 * T, lbo))
        return ((T, W, m), (8, k)), ((1, T, lbo), (W * T, sbo))
    if span == 0:
        return ((8, m), (T, 2 * k)), ((1 * T, sbo), (1, lbo))
    return ((8, m), (T, 2 * k)), ((W * T, sbo), (1, T))


def cute_swizzle(addr, span):
    """Swizzle<B,4,3> (B = 1, 2, 3 for 32, 64, 128 bytes) on a byte address: bits [7, 7+B) XORed into [4, 4+B)."""
    b = {0: 0, 32: 1, 64: 2, 128: 3}[span]
    yyy = ((1 << b) - 1) << 7
    return addr ^ ((addr & yyy) >> 3)


def place(img, base, mat, layout, span):
    """Write mat (MN x 16, 16-bit) into the shared-memory image (index 0 = shared address DYN_BASE) at
    the element offsets of `layout`, from byte address `base`."""
    shape, stride = layout
    bits = _u16(mat)
    for mn in range(mat.shape[0]):
        for k in range(16):
            addr = cute_swizzle(DYN_BASE + base + 2 * cute_offset(shape, stride, (mn, k)), span)
            i = addr - DYN_BASE
            img[i:i + 2] = np.frombuffer(bits[mn, k].tobytes(), np.uint8)


def run_wgmma(mod, n, dt, ma, mb, A, B, C, img, p, na=0, nb=0, a_regs=None):
    tname = "half_t" if dt == np.float16 else "bf16_t"
    k = mod.get_function(f"t_wgmma<{n}, ca::{tname}, {ma}, {mb}, {na}, {nb}>")
    regs = a_registers(A) if a_regs is None else a_regs
    out = emu.device_zeros((128, n // 2), np.float32)
    k((1,), (128,), (emu.to_device(img), emu.to_device(regs), emu.to_device(to_frags(C, n)), out, p),
      shared_mem=len(img))
    return emu.to_host(out)


def wg_params(img, **kw):
    p = np.zeros((), WG_PARAMS)
    p["img_bytes"] = len(img)
    for key, v in kw.items():
        p[key] = v
    return p[()]


def sw128_kmajor(rows):
    """The K-major 128B-swizzled canonical layout of a `rows` x 16 slice of a tile whose rows are 128
    bytes (64 16-bit elements) and whose 8-row groups are 1024 bytes apart: the layout a TMA box
    (64, rows) with SWIZZLE_128B writes (LBO unused, encoded 1)."""
    return canonical_layout("K", 128, rows // 8, 1, 16 // 2, 1024 // 2)


# ------------------------------------------------------------------------------------------------
# Descriptors, swizzle, shared addresses

def test_emu_matrix_descriptor_bits_and_swizzle(mod):
    rng = np.random.default_rng(1)
    cases = [(0x400, 256, 128, 0, 0), (0x400, 16, 1024, 128, 0), (0x12340, 0x3FFF0, 0x10, 64, 0),
             (0x3FFF0, 512, 2048, 32, 5), (0x1B20, 4096, 8192, 128, 7)]
    cases += [(int(a) * 16, int(lb) * 16, int(sb) * 16, int(sw), int(bo)) for a, lb, sb, sw, bo in zip(
        rng.integers(0, 2**14, 40), rng.integers(0, 2**14, 40), rng.integers(0, 2**14, 40),
        rng.choice([0, 32, 64, 128], 40), rng.integers(0, 8, 40))]
    args = np.array(cases, np.uint32)
    out = emu.device_zeros(len(cases), np.uint64)
    swz = emu.device_zeros(len(cases), np.uint32)
    mod.get_function("t_desc_bits")((1,), (32,), (emu.to_device(args), np.int32(len(cases)), out, swz))
    code = {0: 0, 128: 1, 64: 2, 32: 3}
    enc = lambda x: (x & 0x3FFFF) >> 4  # noqa: E731  (PTX ISA: matrix-descriptor-encode)
    for (a, lbo, sbo, sw, bo), got, s in zip(cases, out, swz):
        exp = enc(a) | enc(lbo) << 16 | enc(sbo) << 32 | bo << 49 | code[sw] << 62
        assert int(got) == exp, (a, lbo, sbo, sw, bo, hex(int(got)), hex(exp))
        # Programming Guide: 128-byte row y, 16-byte chunk x -> chunk ((y % P) ^ x), P = span / 16
        if sw:
            y, x = a // 128, (a % 128) // 16
            assert int(s) == y * 128 + (((y % (sw // 16)) ^ x) * 16) + a % 16
        else:
            assert int(s) == a
    # the ISA's worked example: LBO 64 * sizeof(tf32) encodes as 16, SBO 32 * sizeof(tf32) as 8
    assert (int(out[0]) >> 16) & 0x3FFF == 16 and (int(out[0]) >> 32) & 0x3FFF == 8


def test_emu_smem_addr(mod):
    out = emu.device_zeros(32, np.uint32)
    mod.get_function("t_smem_addr")((1,), (32,), (out,), shared_mem=1024)
    np.testing.assert_array_equal(out, DYN_BASE + 16 * np.arange(32))
    assert DYN_BASE % 1024 == 0


# ------------------------------------------------------------------------------------------------
# wgmma: register fragments

def _simple_image(A, B, n):
    """A (64 x 16) and B (16 x n, stored as n rows of K) K-major without swizzle: A's core matrices
    at LBO 128 / SBO 256 from 0, B's at LBO 16n / SBO 128 from 4096."""
    img = np.zeros(4096 + 32 * n, np.uint8)
    place(img, 0, A, canonical_layout("K", 0, 8, 1, 128 // 2, 256 // 2), 0)
    place(img, 4096, B.T, canonical_layout("K", 0, n // 8, 1, 16 * n // 2, 128 // 2), 0)
    return img, dict(a_off=0, a_lbo=128, a_sbo=256, a_swz=0, b_off=4096, b_lbo=16 * n, b_sbo=128, b_swz=0)


@pytest.mark.parametrize("n,dt", [(8, np.float16), (16, BF16), (32, np.float16), (64, BF16), (128, np.float16),
                                  (256, BF16), (256, np.float16)])
def test_emu_wgmma_accumulator_registers(mod, n, dt):
    rng = np.random.default_rng(n)
    A = rng.standard_normal((64, 16)).astype(dt)
    B = rng.standard_normal((16, n)).astype(dt)
    C = rng.standard_normal((64, n)).astype(np.float32)
    img, lay = _simple_image(A, B, n)
    regs = run_wgmma(mod, n, dt, 0, 0, A, B, C, img, wg_params(img, scale_d=1, **lay))
    exp = A.astype(np.float64) @ B.astype(np.float64) + C
    # register by register: thread th's register i holds D[d_frag(th, i)]
    np.testing.assert_allclose(regs, to_frags(exp, n), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [16, 64, 256])
def test_emu_wgmma_single_product_lands_in_its_register(mod, n):
    """One nonzero product A[r, kk] * B[kk, c] appears in exactly one register: the one d_frag names."""
    dt = BF16 if n != 256 else np.float16
    for r, kk, c in [(0, 0, 0), (17, 9, n - 1), (63, 15, n // 2 + 3), (40, 4, 9)]:
        A = np.zeros((64, 16), dt)
        B = np.zeros((16, n), dt)
        A[r, kk], B[kk, c] = 3.0, -2.0
        img, lay = _simple_image(A, B, n)
        regs = run_wgmma(mod, n, dt, 0, 0, A, B, np.zeros((64, n), np.float32), img, wg_params(img, scale_d=1, **lay))
        th, i = np.argwhere(regs != 0)[0]
        assert np.count_nonzero(regs) == 1 and regs[th, i] == -6.0
        assert d_frag(th, i) == (r, c)


@pytest.mark.parametrize("n,dt", [(16, BF16), (32, np.float16), (256, BF16)])
def test_emu_wgmma_a_from_registers(mod, n, dt):
    rng = np.random.default_rng(100 + n)
    A = rng.standard_normal((64, 16)).astype(dt)
    B = rng.standard_normal((16, n)).astype(dt)
    C = rng.standard_normal((64, n)).astype(np.float32)
    img, lay = _simple_image(np.zeros_like(A), B, n)  # A only in registers
    regs = run_wgmma(mod, n, dt, 0, 0, A, B, C, img, wg_params(img, scale_d=1, a_regs=1, **lay))
    np.testing.assert_allclose(from_frags(regs, n), A.astype(np.float64) @ B.astype(np.float64) + C, rtol=1e-6,
                               atol=1e-6)
    # one element of A at a time: thread th's element i of A is A[a_frag(th, i)]
    for th, i in [(0, 0), (5, 3), (37, 6), (127, 7), (66, 1)]:
        A1 = np.zeros((64, 16), dt)
        r, kcol = a_frag(th, i)
        A1[r, kcol] = 1.0
        regs1 = np.zeros((128, 4), np.uint32)
        regs1[th, i // 2] = int(_u16(np.array(1.0, dt))) << (16 * (i & 1))
        out = from_frags(run_wgmma(mod, n, dt, 0, 0, A1, B, np.zeros((64, n), np.float32), img,
                                   wg_params(img, scale_d=1, a_regs=1, **lay), a_regs=regs1), n)
        np.testing.assert_array_equal(out[r], B[kcol].astype(np.float32))
        assert np.count_nonzero(np.delete(out, r, axis=0)) == 0


@pytest.mark.parametrize("na,nb", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("a_regs", [0, 1])
def test_emu_wgmma_scale_d_and_negate(mod, na, nb, a_regs):
    rng = np.random.default_rng(7 + 2 * na + nb)
    A = rng.standard_normal((64, 16)).astype(BF16)
    B = rng.standard_normal((16, 16)).astype(BF16)
    C = rng.standard_normal((64, 16)).astype(np.float32)
    img, lay = _simple_image(A, B, 16)
    prod = ((-1) ** na * A.astype(np.float64)) @ ((-1) ** nb * B.astype(np.float64))
    for scale_d in (1, 0):
        regs = run_wgmma(mod, 16, BF16, 0, 0, A, B, C, img, wg_params(img, scale_d=scale_d, a_regs=a_regs, **lay),
                         na=na, nb=nb)
        exp = prod + (C if scale_d else 0)
        np.testing.assert_allclose(from_frags(regs, 16), exp, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# wgmma: descriptor-addressed operands in every canonical layout

def _layout_case(major, span, rows):
    """(layout in elements, start offset in bytes, lbo, sbo) for an operand of `rows` x 16: a layout
    with gaps, so that LBO / SBO are not what a dense tile would give by accident."""
    W = span // 16
    start = 32 if major == "K" and span >= 64 else 0  # step to the second 16-wide K slice of the row
    if major == "K":
        if span == 0:
            lbo, sbo = rows * 16 + 256, 128
        else:
            lbo, sbo = 16, 16 * span
        return canonical_layout("K", span, rows // 8, 1, lbo // 2, sbo // 2), start, lbo, sbo
    if span == 0:
        lbo, sbo = (rows // 8) * 128 + 128, 128
        return canonical_layout("MN", 0, rows // 8, 2, lbo // 2, sbo // 2), start, lbo, sbo
    m = max(1, rows // (8 * W))
    lbo, sbo = 16 * span, 16 * span * m
    return canonical_layout("MN", span, m, 2, lbo // 2, sbo // 2), start, lbo, sbo


@pytest.mark.parametrize("span", [0, 32, 64, 128])
@pytest.mark.parametrize("major", ["K", "MN"])
@pytest.mark.parametrize("operand", ["A", "B"])
def test_emu_wgmma_descriptor_layouts(mod, operand, major, span):
    n = 32
    rng = np.random.default_rng(100 * (operand == "B") + 10 * (major == "MN") + span)
    A = rng.standard_normal((64, 16)).astype(BF16)
    B = rng.standard_normal((16, n)).astype(BF16)
    img = np.zeros(49152, np.uint8)
    region = {"A": 0, "B": 24576}
    kw = {}
    for name, mat, rows in (("A", A, 64), ("B", B.T, n)):
        if name == operand:
            layout, start, lbo, sbo = _layout_case(major, span, rows)
            sw = span
        else:
            layout, start, lbo, sbo, sw = canonical_layout("K", 0, rows // 8, 1, 64, 128), 0, 128, 256, 0
        place(img, region[name] + start, mat, layout, sw)
        kw.update({f"{name.lower()}_off": region[name] + start, f"{name.lower()}_lbo": lbo,
                   f"{name.lower()}_sbo": sbo, f"{name.lower()}_swz": sw})
    ma = int(operand == "A" and major == "MN")
    mb = int(operand == "B" and major == "MN")
    exp = A.astype(np.float64) @ B.astype(np.float64)
    regs = run_wgmma(mod, n, BF16, ma, mb, A, B, np.zeros((64, n), np.float32), img, wg_params(img, scale_d=0, **kw))
    np.testing.assert_allclose(from_frags(regs, n), exp, rtol=1e-6, atol=1e-6)
    if operand == "B":  # the same B with A from registers
        regs = run_wgmma(mod, n, BF16, ma, mb, A, B, np.zeros((64, n), np.float32), img,
                         wg_params(img, scale_d=0, a_regs=1, **kw))
        np.testing.assert_allclose(from_frags(regs, n), exp, rtol=1e-6, atol=1e-6)


# The PTX ISA's worked bf16 MN-major examples: exact layouts (elements) with their LBO / SBO (bytes).
ISA_EXAMPLES = [
    ("no swizzle", 0, ((8, 1, 2), (8, 2)), ((1, 8, 64), (8, 128)), 128 * 2, 64 * 2, "B", 16),
    ("32B", 32, ((8, 2, 2), (8, 2)), ((1, 8, 128), (16, 256)), 128 * 2, 256 * 2, "B", 32),
    ("64B", 64, ((8, 4, 2), (8, 2)), ((1, 8, 256), (32, 512)), 256 * 2, 512 * 2, "A", 32),
]


@pytest.mark.parametrize("name,span,shape,stride,lbo,sbo,operand,n", ISA_EXAMPLES, ids=[e[0] for e in ISA_EXAMPLES])
def test_emu_wgmma_isa_mn_major_examples(mod, name, span, shape, stride, lbo, sbo, operand, n):
    rng = np.random.default_rng(span)
    A = rng.standard_normal((64, 16)).astype(BF16)
    B = rng.standard_normal((16, n)).astype(BF16)
    img = np.zeros(16384, np.uint8)
    simple = lambda rows: canonical_layout("K", 0, rows // 8, 1, 64, 128)  # noqa: E731  LBO 128 B, SBO 256 B
    if operand == "A":
        place(img, 0, A, (shape, stride), span)
        place(img, 8192, B.T, simple(n), 0)
        kw = dict(a_off=0, a_lbo=lbo, a_sbo=sbo, a_swz=span, b_off=8192, b_lbo=128, b_sbo=256, b_swz=0)
        ma, mb = 1, 0
    else:
        place(img, 0, A, simple(64), 0)
        place(img, 8192, B.T, (shape, stride), span)
        kw = dict(a_off=0, a_lbo=128, a_sbo=256, a_swz=0, b_off=8192, b_lbo=lbo, b_sbo=sbo, b_swz=span)
        ma, mb = 0, 1
    regs = run_wgmma(mod, n, BF16, ma, mb, A, B, np.zeros((64, n), np.float32), img, wg_params(img, scale_d=0, **kw))
    np.testing.assert_allclose(from_frags(regs, n), A.astype(np.float64) @ B.astype(np.float64), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# TMA

def tma_image(G, box_np, coords_np, es_np, dst_addr, span):
    """Expected shared-memory bytes of a TMA load of global array G (numpy order): the dense box with
    zeros out of bounds, then the Programming Guide's swizzle on 128-byte rows of shared memory.
    Returns (bytes from dst_addr over whole 128-byte lines, mask of the bytes the box writes)."""
    n = [(b + e - 1) // e for b, e in zip(box_np, es_np)]
    n[-1] = box_np[-1]  # the innermost element stride is ignored
    dense = np.zeros(n, G.dtype)
    for idx in np.ndindex(*n):
        gi = [c + j * (e if d < G.ndim - 1 else 1) for d, (c, j, e) in enumerate(zip(coords_np, idx, es_np))]
        if all(0 <= x < s for x, s in zip(gi, G.shape)):
            dense[idx] = G[tuple(gi)]
    raw = dense.tobytes()
    size = (len(raw) + 127) // 128 * 128
    out = np.zeros(size, np.uint8)
    written = np.zeros(size, bool)
    period = max(span // 16, 1)
    for o in range(0, len(raw), 16):
        a = dst_addr + o
        y, x = a // 128, (a % 128) // 16
        a2 = y * 128 + ((y % period) ^ x) * 16
        out[a2 - dst_addr:a2 - dst_addr + 16] = np.frombuffer(raw[o:o + 16], np.uint8)
        written[a2 - dst_addr:a2 - dst_addr + 16] = True
    return out, written


TMA_CASES = [
    # rank, dtype, global shape (numpy order), box (numpy order), coords (numpy order), elem strides, swizzle
    (1, np.float32, (100,), (32,), (80,), (1,), 128),
    (1, BF16, (64,), (16,), (-8,), (1,), 32),
    (2, BF16, (70, 64), (64, 64), (10, 0), (1, 1), 128),
    (2, np.float16, (40, 48), (16, 32), (-5, 24), (1, 1), 64),
    (2, np.float32, (33, 20), (8, 8), (30, 16), (1, 1), 32),
    (2, BF16, (64, 64), (8, 64), (0, 0), (1, 1), 0),
    (3, BF16, (5, 20, 64), (2, 8, 64), (4, -3, 0), (1, 1, 1), 128),
    (3, np.float32, (6, 9, 16), (4, 5, 16), (0, 1, 0), (1, 2, 1), 64),
    (4, np.float16, (3, 4, 10, 32), (2, 2, 8, 32), (2, 3, 5, 0), (1, 1, 1, 1), 64),
    (5, BF16, (2, 3, 4, 6, 16), (2, 2, 2, 4, 16), (1, 2, 3, 3, 0), (1, 1, 1, 1, 1), 32),
    (5, np.float32, (2, 2, 3, 4, 8), (1, 2, 2, 4, 8), (0, -1, 2, 1, 0), (1, 1, 2, 1, 1), 0),
]


def _tma_id(c):
    return f"{c[0]}d-{np.dtype(c[1]).name}-sw{c[6]}"


@pytest.mark.parametrize("dst_off", [1024, 1024 + 384])
@pytest.mark.parametrize("case", TMA_CASES, ids=[_tma_id(c) for c in TMA_CASES])
def test_emu_tma_load(mod, case, dst_off):
    rank, dt, shape, box, coords, es, span = case
    rng = np.random.default_rng(rank * 10 + span)
    G = (rng.standard_normal(shape) * 10).astype(dt)
    dG = emu.to_device(G)
    tm = tensormap.from_array(dG, box, swizzle=span, element_strides=es, target="emulator")
    exp, written = tma_image(G, box, coords, es, DYN_BASE + dst_off, span)
    nbox = int(np.prod([(b + e - 1) // e if i < rank - 1 else b for i, (b, e) in enumerate(zip(box, es))]))
    nbytes = nbox * np.dtype(dt).itemsize
    assert written.sum() == nbytes
    out = emu.device_zeros(len(exp), np.uint8)
    base = emu.device_zeros(1, np.uint32)
    smem = dst_off + len(exp)
    for seed in (None, 3):
        with emu.interleave(seed):
            mod.get_function(f"t_tma_load<{rank}>")(
                (1,), (128,), (tm, emu.to_device(np.array(coords[::-1], np.int32)), np.uint32(dst_off),
                               np.uint32(nbytes), np.uint32(len(exp)), out, base), shared_mem=smem)
        assert base[0] == DYN_BASE
        np.testing.assert_array_equal(emu.to_host(out)[written], exp[written], err_msg=f"seed {seed}")


def test_emu_tma_load_nan_fill(mod):
    G = np.arange(32 * 16, dtype=np.float32).reshape(32, 16)
    dG = emu.to_device(G)
    tm = tensormap.from_array(dG, (8, 16), oob_fill="nan", target="emulator")
    out = emu.device_zeros(512, np.uint8)
    mod.get_function("t_tma_load<2>")((1,), (32,), (tm, emu.to_device(np.array([0, 28], np.int32)), np.uint32(1024),
                                                    np.uint32(512), np.uint32(512), out,
                                                    emu.device_zeros(1, np.uint32)), shared_mem=1536)
    box = emu.to_host(out).view(np.float32).reshape(8, 16)
    np.testing.assert_array_equal(box[:4], G[28:])
    assert np.isnan(box[4:]).all()


STORE_CASES = [
    (1, BF16, (48,), (32,), (24,), 64),
    (2, BF16, (70, 64), (64, 64), (10, 0), 128),
    (2, np.float32, (20, 24), (8, 8), (-3, 20), 32),
    (3, np.float16, (4, 9, 32), (2, 4, 32), (3, 7, 0), 64),
    (4, np.float32, (2, 3, 4, 8), (2, 2, 2, 8), (1, 2, 3, 0), 0),
    (5, BF16, (2, 2, 3, 3, 16), (1, 2, 2, 2, 16), (1, 1, 2, -1, 0), 32),
]


@pytest.mark.parametrize("case", STORE_CASES, ids=[f"{c[0]}d-{np.dtype(c[1]).name}-sw{c[5]}" for c in STORE_CASES])
def test_emu_tma_store(mod, case):
    rank, dt, shape, box, coords, span = case
    rng = np.random.default_rng(50 + rank)
    Bx = (rng.standard_normal(box) * 10).astype(dt)
    sentinel = np.array(-77.0, dt)
    G = np.full(shape, sentinel, dt)
    dG = emu.to_device(G)
    tm = tensormap.from_array(dG, box, swizzle=span, target="emulator")
    src_off = 2048
    # the swizzled shared image of the box: a load from an array holding exactly the box
    img, _ = tma_image(Bx, box, (0,) * rank, (1,) * rank, DYN_BASE + src_off, span)
    for seed in (None, 5):
        dG[...] = G
        with emu.interleave(seed):
            mod.get_function(f"t_tma_store<{rank}>")(
                (1,), (128,), (tm, emu.to_device(np.array(coords[::-1], np.int32)), emu.to_device(img),
                               np.uint32(src_off), np.uint32(len(img)), np.int32(1)), shared_mem=src_off + len(img))
        exp = G.copy()
        sl_g, sl_b = [], []
        for c, b, s in zip(coords, box, shape):
            lo, hi = max(c, 0), min(c + b, s)
            sl_g.append(slice(lo, hi))
            sl_b.append(slice(lo - c, hi - c))
        exp[tuple(sl_g)] = Bx[tuple(sl_b)]
        np.testing.assert_array_equal(emu.to_host(dG).view(np.uint8), exp.view(np.uint8), err_msg=f"seed {seed}")


def test_emu_tma_store_needs_the_proxy_fence(mod):
    """The box written with plain stores reaches the TMA (async proxy) only through fence.proxy.async."""
    box = (16, 32)
    Bx = np.arange(512, dtype=np.float32).reshape(box).astype(BF16)
    dG = emu.device_zeros(box, BF16)
    tm = tensormap.from_array(dG, box, swizzle=64, target="emulator")
    img, _ = tma_image(Bx, box, (0, 0), (1, 1), DYN_BASE + 1024, 64)
    k = mod.get_function("t_tma_store<2>")
    args = (tm, emu.to_device(np.zeros(2, np.int32)), emu.to_device(img), np.uint32(1024), np.uint32(len(img)))
    k((1,), (128,), args + (np.int32(1),), shared_mem=1024 + len(img))
    np.testing.assert_array_equal(emu.to_host(dG), Bx)
    dG[...] = 0
    k((1,), (128,), args + (np.int32(0),), shared_mem=1024 + len(img))
    assert not np.array_equal(emu.to_host(dG), Bx)


def _tma_fault(mod, dst_off, expect_tx):
    dG = emu.to_device(np.ones((64, 64), BF16))
    tm = tensormap.from_array(dG, (64, 64), swizzle=128, target="emulator")
    out = emu.device_zeros(8192, np.uint8)
    mod.get_function("t_tma_load<2>")((1,), (128,), (tm, emu.to_device(np.zeros(2, np.int32)), np.uint32(dst_off),
                                                     np.uint32(expect_tx), np.uint32(8192), out,
                                                     emu.device_zeros(1, np.uint32)), shared_mem=dst_off + 8192)


@pytest.mark.parametrize("seed", [None, 2])
def test_emu_tma_expect_tx_too_large_is_a_deadlock(mod, seed):
    with emu.interleave(seed), pytest.raises(emu.EmulatorError) as ei:
        _tma_fault(mod, 1024, 2 * 8192)
    msg = str(ei.value)
    assert "deadlock" in msg and "1 of 1 arrivals, tx-count 8192 bytes" in msg, msg
    assert "threads 0-127 wait on the mbarrier at shared address 0x400" in msg and "no TMA load in flight" in msg, msg


@pytest.mark.parametrize("seed", [None, 2])
def test_emu_tma_expect_tx_too_small(mod, seed):
    with emu.interleave(seed), pytest.raises(emu.EmulatorError, match="smaller than the bytes its copies deliver"):
        _tma_fault(mod, 1024, 4096)


def test_emu_tma_destination_must_be_128_byte_aligned(mod):
    with pytest.raises(emu.EmulatorError, match="0xc50 is not 128-byte aligned"):
        _tma_fault(mod, 1024 + 1024 + 80, 8192)


# ------------------------------------------------------------------------------------------------
# End to end: TMA-loaded 128B-swizzled tiles read by wgmma through descriptors

@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_emu_tma_wgmma_gemm_64x64(mod, seed):
    rng = np.random.default_rng(11)
    A = rng.standard_normal((64, 64)).astype(BF16)
    B = rng.standard_normal((64, 64)).astype(BF16)
    dA, dB = emu.to_device(A), emu.to_device(B)  # the maps hold their addresses, not the arrays
    ta = tensormap.from_array(dA, (64, 64), swizzle=128, target="emulator")
    tb = tensormap.from_array(dB, (64, 64), swizzle=128, target="emulator")
    c = emu.device_zeros((64, 64), np.float32)
    with emu.interleave(seed):
        mod.get_function("t_gemm64")((1,), (128,), (ta, tb, c), shared_mem=1024 + 16384)
    np.testing.assert_allclose(c, A.astype(np.float64) @ B.astype(np.float64).T, rtol=1e-5, atol=1e-5)


def _pipeline(mod, wait_empty, release_early, seed, ktiles=4):
    rng = np.random.default_rng(12)
    A = rng.standard_normal((64, 64 * ktiles)).astype(BF16)
    B = rng.standard_normal((64, 64 * ktiles)).astype(BF16)
    dA, dB = emu.to_device(A), emu.to_device(B)
    ta = tensormap.from_array(dA, (64, 64), swizzle=128, target="emulator")
    tb = tensormap.from_array(dB, (64, 64), swizzle=128, target="emulator")
    c = emu.device_zeros((64, 64), np.float32)
    with emu.interleave(seed):
        mod.get_function(f"t_pipeline<{str(wait_empty).lower()}, {str(release_early).lower()}>")(
            (1,), (160,), (ta, tb, c, np.int32(ktiles)), shared_mem=1024 + 2 * 16384)
    return emu.to_host(c), A.astype(np.float64) @ B.astype(np.float64).T


def test_emu_pipeline_with_mbarriers(mod):
    for seed in (None, 1, 2, 3, 4):
        c, exp = _pipeline(mod, True, False, seed)
        np.testing.assert_allclose(c, exp, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")


def _caught(mod, wait_empty, release_early, seeds):
    caught = 0
    for seed in seeds:
        try:
            c, exp = _pipeline(mod, wait_empty, release_early, seed)
        except emu.EmulatorError:
            caught += 1
            continue
        if not np.allclose(c, exp, rtol=1e-5, atol=1e-4):
            caught += 1
    return caught


def test_emu_pipeline_producer_overwriting_an_unreleased_stage_is_caught(mod):
    """Planted fault: the producer refills a stage without waiting on its empty barrier. Deterministically
    reported (the refill's expect_tx arrives on a phase that still waits for bytes), and caught, by error
    or wrong result, under every interleaving."""
    with emu.interleave(None), pytest.raises(emu.EmulatorError, match="already has all 1 of its expected arrivals"):
        _pipeline(mod, False, False, None)
    assert _caught(mod, False, False, range(1, 6)) == 5


def test_emu_pipeline_stage_released_before_its_wgmma_completed_is_reported(mod):
    """Planted fault: the consumer releases a stage (empty barrier) right after committing its wgmmas,
    before wgmma.wait_group: the refill may land while the wgmmas still read the stage. Reported at the
    refill's issue in every order."""
    for seed in (None, 1, 2, 3, 4, 5):
        with pytest.raises(emu.EmulatorError, match=r"cp\.async\.bulk\.tensor \(load\) by thread \(1[2-5]\d,0,0\) "
                           r"\[warp 4 lane \d+\] into shared .* which wgmma\.mma_async #[1-4] of warpgroup 0"):
            _pipeline(mod, True, True, seed)


REUSE_ORDERS = {0: "mbarrier", 2: "named barrier", 4: "__syncthreads"}  # + 1: the same before the wait


def _reuse(mod, order, plain, seed):
    """t_reuse<order, plain> (A, B 64 x 64 bf16, B then overwritten by its next 64 columns or zeros):
    (C, A B^T with the first B)."""
    rng = np.random.default_rng(13)
    A = rng.standard_normal((64, 64)).astype(BF16)
    B = rng.standard_normal((64, 128)).astype(BF16)
    dA, dB = emu.to_device(A), emu.to_device(B)
    ta = tensormap.from_array(dA, (64, 64), swizzle=128, target="emulator")
    tb = tensormap.from_array(dB, (64, 64), swizzle=128, target="emulator")
    c = emu.device_zeros((64, 64), np.float32)
    with emu.interleave(seed), emu.race_check(plain):
        mod.get_function(f"t_reuse<{order}, {str(plain).lower()}>")((1,), (160,), (ta, tb, c),
                                                                   shared_mem=1024 + 2 * 8192)
    return emu.to_host(c), A.astype(np.float64) @ B[:, :64].astype(np.float64).T


@pytest.mark.parametrize("plain", [False, True], ids=["tma", "plain_store"])
@pytest.mark.parametrize("order", sorted(REUSE_ORDERS), ids=REUSE_ORDERS.get)
def test_emu_operand_overwritten_after_the_wait_is_clean(mod, order, plain):
    """The wgmmas' waits come before the release (each consumer thread waits, then arrives or meets the
    writer), so the writer knows they are complete: no report, the result is the first B's."""
    for seed in (None, 1, 2, 3):
        c, exp = _reuse(mod, order, plain, seed)
        np.testing.assert_allclose(c, exp, rtol=1e-5, atol=1e-4, err_msg=f"seed {seed}")


@pytest.mark.parametrize("plain", [False, True], ids=["tma", "plain_store"])
@pytest.mark.parametrize("order", sorted(REUSE_ORDERS), ids=REUSE_ORDERS.get)
def test_emu_operand_overwritten_before_the_wait_is_reported(mod, order, plain):
    """Planted fault: the release comes before the waits. Whether or not the emulator has performed the
    wgmmas by then (the first thread to wait performs them), no wait is ordered before the overwrite:
    reported in every order, naming the writer and the wgmma (plain stores: in race mode)."""
    what = "a plain store" if plain else r"cp\.async\.bulk\.tensor \(load\)"
    for seed in (None, 1, 2, 3):
        with pytest.raises(emu.EmulatorError, match=rf"{what} by thread \(1[2-5]\d,0,0\) \[warp 4 lane \d+\] into "
                           r"shared .* which wgmma\.mma_async #[1-4] of warpgroup 0 \(m64n64k16\) reads"):
            _reuse(mod, order + 1, plain, seed)


def test_emu_wgmma_reading_a_tile_still_in_flight_is_reported(mod):
    """Planted fault: the consumer issues its wgmmas on tiles whose TMA loads it has not waited for. In the
    deterministic order the loads land once every thread waits, while the wgmmas are not yet waited for:
    reported at the landing, naming the load's issuer and the wgmma."""
    rng = np.random.default_rng(14)
    A, B = (rng.standard_normal((64, 64)).astype(BF16) for _ in range(2))
    dA, dB = emu.to_device(A), emu.to_device(B)
    ta = tensormap.from_array(dA, (64, 64), swizzle=128, target="emulator")
    tb = tensormap.from_array(dB, (64, 64), swizzle=128, target="emulator")
    c = emu.device_zeros((64, 64), np.float32)
    with emu.interleave(None), pytest.raises(
            emu.EmulatorError, match=r"the TMA load issued by thread \(128,0,0\) \[warp 4 lane 0\] into shared "
            r"\[0x[0-9a-f]+, 0x[0-9a-f]+\) lands while a wgmma\.mma_async of warpgroup 0 \(m64n64k16\), issued "
            r"while the load was in flight, still reads"):
        mod.get_function("t_read_in_flight")((1,), (160,), (ta, tb, c), shared_mem=1024 + 2 * 8192)


# ------------------------------------------------------------------------------------------------
# wgmma asynchrony and its misuse

def _async_image(rng):
    A = rng.standard_normal((64, 16)).astype(BF16)
    B = rng.standard_normal((16, 16)).astype(BF16)
    img = np.zeros(10240, np.uint8)
    place(img, 0, A, sw128_kmajor(64), 128)
    place(img, 8192, B.T, sw128_kmajor(16), 128)
    return A, B, img


def _run_async(mod, img, mode, seed):
    out = emu.device_zeros((128, 8), np.float32)
    with emu.interleave(seed):
        mod.get_function("t_wgmma_async")((1,), (128,), (emu.to_device(img), out, np.int32(mode)), shared_mem=10240)
    return from_frags(emu.to_host(out), 16)


def test_emu_wgmma_async_correct_use(mod):
    A, B, img = _async_image(np.random.default_rng(21))
    exp = A.astype(np.float64) @ B.astype(np.float64) + 1.0
    for seed in (None, 1, 2, 3, 4):
        np.testing.assert_allclose(_run_async(mod, img, 0, seed), exp, rtol=1e-6, atol=1e-6, err_msg=f"seed {seed}")


def test_emu_wgmma_accumulators_read_before_the_wait(mod):
    """Planted fault: the accumulators are read between commit and wait. The wgmma is performed at the
    wait in the deterministic mode (stale values seen every time) and at a seeded point otherwise."""
    A, B, img = _async_image(np.random.default_rng(22))
    exp = A.astype(np.float64) @ B.astype(np.float64) + 1.0
    np.testing.assert_array_equal(_run_async(mod, img, 1, None), np.ones((64, 16), np.float32))
    wrong = sum(not np.allclose(_run_async(mod, img, 1, seed), exp, rtol=1e-6) for seed in range(1, 9))
    assert wrong >= 3, f"early accumulator read exposed under only {wrong} of 8 seeds"


def test_emu_wgmma_a_registers_changed_before_the_wait(mod):
    A, B, img = _async_image(np.random.default_rng(23))
    ones = np.ones((64, 16))
    exp = ones @ B.astype(np.float64) + 1.0
    assert not np.allclose(_run_async(mod, img, 5, None), exp, rtol=1e-6)
    wrong = sum(not np.allclose(_run_async(mod, img, 5, seed), exp, rtol=1e-6) for seed in range(1, 9))
    assert wrong >= 3, f"A registers changed before the wait exposed under only {wrong} of 8 seeds"


@pytest.mark.parametrize("mode,match", [
    (2, "without a wgmma.fence since the start of the kernel"),
    (3, "without a wgmma.fence since its last wgmma.wait_group"),
    (4, r"exited with 1 wgmma.mma_async not waited for"),
])
def test_emu_wgmma_ordering_errors(mod, mode, match):
    _, _, img = _async_image(np.random.default_rng(24))
    for seed in (None, 3):
        with pytest.raises(emu.EmulatorError, match=match):
            _run_async(mod, img, mode, seed)


@pytest.mark.parametrize("off,swz,sbo,base,match", [
    (8192 + 128, 128, 1024, 0, r"points at shared address 0x2480, whose 1024-byte swizzle pattern starts at 0x2480, "
                               r"not on a 1024-byte boundary"),
    (8192 + 256, 64, 512, 0, r"512-byte swizzle pattern starts at 0x2500, not on a 512-byte boundary"),
    (16384 - 1024, 128, 1024, 0, r"descriptor of B .* reaches shared address 0x4400 for element \(n 8, k 0\), "
                                 r"outside dynamic shared memory \[0x400, 0x4400\)"),
    (8192, 128, 1024, 3, "matrix base offset 3"),
])
def test_emu_wgmma_descriptor_faults(mod, off, swz, sbo, base, match):
    with pytest.raises(emu.EmulatorError, match=match):
        mod.get_function("t_desc_fault")((1,), (128,), (np.uint32(off), np.uint32(swz), np.uint32(sbo), np.uint32(base),
                                                        emu.device_zeros(128, np.float32)), shared_mem=16384)


def test_emu_wgmma_descriptor_aligned_swizzle_modes_pass(mod):
    """A 64B-swizzled tile on a 512-byte boundary and a 32B one on 256 are correctly aligned."""
    for off, swz, sbo in [(8192 + 512, 64, 512), (8192 + 256, 32, 256), (8192 + 1024, 128, 1024)]:
        out = emu.device_zeros(128, np.float32)
        mod.get_function("t_desc_fault")((1,), (128,), (np.uint32(off), np.uint32(swz), np.uint32(sbo), np.uint32(0),
                                                        out), shared_mem=16384)
        assert (emu.to_host(out) == 0).all()


@pytest.mark.parametrize("mode,block,match", [
    (1, 128, "threads disagree on their operands .* descriptor of B"),
    (2, 128, "partial warpgroup: thread .* exited while threads .* of warpgroup 0 wait for it at wgmma.mma_async"),
    (3, 96, "warpgroup 0 .* is incomplete in a block of 96 threads"),
])
def test_emu_wgmma_is_a_warpgroup_collective(mod, mode, block, match):
    with pytest.raises(emu.EmulatorError, match=match):
        mod.get_function("t_wgmma_collective")((1,), (block,), (np.int32(mode), emu.device_zeros(128, np.float32)),
                                               shared_mem=4096)


def test_emu_async_proxy_fence(mod):
    """A tile written with plain stores reaches wgmma (the async proxy) only after fence.proxy.async."""
    A, B, img = _async_image(np.random.default_rng(25))
    out = emu.device_zeros((128, 8), np.float32)
    k = mod.get_function("t_proxy_fence")
    k((1,), (128,), (emu.to_device(img), out, np.int32(1)), shared_mem=10240)
    np.testing.assert_allclose(from_frags(emu.to_host(out), 16), A.astype(np.float64) @ B.astype(np.float64),
                               rtol=1e-6, atol=1e-6)
    k((1,), (128,), (emu.to_device(img), out, np.int32(0)), shared_mem=10240)
    assert np.isnan(emu.to_host(out)).all()  # the async proxy still sees fresh shared memory (0xFF bytes)


# ------------------------------------------------------------------------------------------------
# mbarrier

@pytest.mark.parametrize("pieces", [[128], [100, 28], [16, 16, 32, 64]])
def test_emu_mbarrier_tx_count_completes_the_phase(mod, pieces):
    """The phase completes with the last byte: the waiter sees every flag set before each piece."""
    for seed in (None, 1, 2, 3):
        seen = emu.device_zeros(8, np.int32)
        with emu.interleave(seed):
            mod.get_function("t_mbar_tx")((1,), (64,), (emu.to_device(np.array(pieces, np.uint32)),
                                                        np.int32(len(pieces)), np.uint32(sum(pieces)), seen))
        np.testing.assert_array_equal(seen, [1] * len(pieces) + [0] * (8 - len(pieces)), err_msg=f"seed {seed}")


def test_emu_mbarrier_expect_tx_too_small_is_reported(mod):
    """expect_tx(100) but 128 bytes delivered: the phase completes early (the waiter may miss the last
    piece), and the surplus bytes are reported when the block ends."""
    for seed in (None, 1):
        with emu.interleave(seed), pytest.raises(emu.EmulatorError, match="holding 28 delivered bytes"):
            mod.get_function("t_mbar_tx")((1,), (64,), (emu.to_device(np.array([100, 28], np.uint32)), np.int32(2),
                                                        np.uint32(100), emu.device_zeros(8, np.int32)))


def test_emu_mbarrier_try_wait_time_limit(mod):
    """try_wait suspends only up to a time limit: on a phase that cannot complete (1 of 2 arrivals) it
    returns false once no thread can run; a loop on it is then reported as a deadlock."""
    for seed in (None, 2):
        out = emu.device_zeros(64, np.int32)
        with emu.interleave(seed):
            mod.get_function("t_mbar_timeout")((1,), (64,), (out, np.int32(0)))
        assert (emu.to_host(out) == 0).all()
        with emu.interleave(seed), pytest.raises(emu.EmulatorError, match=r"deadlock: .*threads 0-63 wait on the "
                                                                        r"mbarrier .* has 1 of 2 arrivals"):
            mod.get_function("t_mbar_timeout")((1,), (64,), (out, np.int32(1)))


def test_emu_mbarrier_phases_and_parity(mod):
    rounds = 4
    for seed in (None, 1, 2, 3, 4):
        out = emu.device_zeros(129, np.int32)
        with emu.interleave(seed):
            mod.get_function("t_mbar_phases")((1,), (96,), (np.int32(rounds), out))
        want = np.repeat(100 + np.arange(rounds), 32).reshape(rounds, 32)
        np.testing.assert_array_equal(out[:128].reshape(rounds, 32), want,
                                      err_msg=f"seed {seed}")
        assert out[128] == 1


@pytest.mark.parametrize("mode,match", [
    (1, r"by thread .* on the mbarrier at .* \(static __shared__\), which was never initialized"),
    (2, "was overwritten by a plain store"),
    (3, r"phase 0 already has all 1 of its expected arrivals \(it waits for 16 more bytes\)"),
    (4, r"deadlock: .*; threads 0-63 wait on the mbarrier at .* for the phase of parity 1: phase 1 \(parity 1\) has "
        r"0 of 1 arrivals, tx-count 0 bytes"),
    (5, "mbarrier.init by thread .* with count 0"),
])
@pytest.mark.parametrize("seed", [None, 6])
def test_emu_mbarrier_misuse(mod, mode, match, seed):
    with emu.interleave(seed), pytest.raises(emu.EmulatorError, match=match):
        mod.get_function("t_mbar_fault")((1,), (64,), (np.int32(mode),))


# ------------------------------------------------------------------------------------------------
# Named barriers, elect.sync, setmaxnreg

def test_emu_named_barriers_with_partial_counts(mod):
    """Barriers 1 and 3 pair warps 0 and 1 (bar.arrive by the producer, bar.sync by the consumer),
    barriers 2 and 4 pair warps 2 and 3: each completes with 64 of the block's 128 threads."""
    rounds = 3
    exp = np.zeros((rounds, 96), np.int32)
    for r in range(rounds):
        exp[r, :32] = 1000 + r   # warp 1 reads what warp 0 published
        exp[r, 32:] = 2000 + r   # warps 2 and 3 read what thread 64 published
    for seed in (None, 1, 2, 3, 4):
        out = emu.device_zeros((rounds, 96), np.int32)
        with emu.interleave(seed):
            mod.get_function("t_named")((1,), (128,), (out, np.int32(rounds), np.int32(0)))
        np.testing.assert_array_equal(out, exp, err_msg=f"seed {seed}")


def test_emu_named_barrier_never_completed_is_a_deadlock(mod):
    with pytest.raises(emu.EmulatorError,
                       match=r"deadlock: .*threads 32-63 wait at named barrier 5 \(bar.sync, 32 of 64 "
                             r"threads arrived\)"):
        mod.get_function("t_named")((1,), (128,), (emu.device_zeros((1, 96), np.int32), np.int32(1), np.int32(1)))


def test_emu_named_barrier_count_must_be_whole_warps(mod):
    with pytest.raises(emu.EmulatorError, match="the thread count must be a multiple of 32"):
        mod.get_function("t_named")((1,), (128,), (emu.device_zeros((1, 96), np.int32), np.int32(1), np.int32(2)))


def test_emu_elect_sync(mod):
    leaders = set()
    for seed in (None, 1, 2, 3, 4, 5, 6, 7, 8):
        out = emu.device_zeros(128, np.int32)
        with emu.interleave(seed):
            mod.get_function("t_elect")((1,), (128,), (out,))
        got = emu.to_host(out).reshape(4, 32)
        for w in range(4):
            lanes = np.flatnonzero(got[w])
            assert len(lanes) == 1 and got[w, lanes[0]] == 3, (seed, w, got[w])  # one leader, the same both times
            leaders.add(int(lanes[0]))
        if seed is None:
            assert (got[:, 0] == 3).all()
    # the ISA does not say which lane is elected: interleave mode does not always pick lane 0
    assert len(leaders) > 1


def test_emu_setmaxnreg(mod):
    out = emu.device_zeros(256, np.int32)
    mod.get_function("t_setmaxnreg")((1,), (256,), (np.int32(0), out))
    assert (emu.to_host(out) == 1).all()
    with pytest.raises(emu.EmulatorError, match=r"setmaxnreg is not uniform over warpgroup 1: thread \(128,0,0\) .* "
                                                r"setmaxnreg.dec 40 and thread \(200,0,0\) .* setmaxnreg.dec 48"):
        mod.get_function("t_setmaxnreg")((1,), (256,), (np.int32(1), out))
    with pytest.raises(emu.EmulatorError, match=r"setmaxnreg.inc 32 by warpgroup 0, whose limit is 40"):
        mod.get_function("t_setmaxnreg")((1,), (256,), (np.int32(2), out))
    with pytest.raises(emu.EmulatorError, match="warpgroup 1 is incomplete"):
        mod.get_function("t_setmaxnreg")((1,), (192,), (np.int32(0), out))


# ------------------------------------------------------------------------------------------------
# NVRTC: every primitive compiles for sm_90a without spills or stack; the header compiles for other
# architectures too (the Hopper kernels of a source sit inside `#if CA_SM90A`).

EVERY_PRIMITIVE = r"""
#include "hopper.cuh"
using namespace ca::sm90;
#if CA_SM90A
template <int N, class T>
__global__ void every_primitive(const __grid_constant__ TensorMap tm, float* out, int flag) {
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
  unsigned char* tile = smem + 1024;
  if (threadIdx.x == 0) mbar_init(bar, 1);
  __syncthreads();
  if (threadIdx.x < 128) setmaxnreg_inc<232>(); else setmaxnreg_dec<40>();
  if (threadIdx.x / 32 == 4) {
    if (elect_one_sync()) {
      mbar_arrive_expect_tx(bar, 8192);
      tma_load(tile, &tm, bar, 0);
      tma_load(tile, &tm, bar, 0, 0);
      tma_load(tile, &tm, bar, 0, 0, 0);
      tma_load(tile, &tm, bar, 0, 0, 0, 0);
      tma_load(tile, &tm, bar, 0, 0, 0, 0, 0);
      mbar_expect_tx(bar, 16);
      mbar_complete_tx(bar, 16);
      mbar_arrive(bar);
    }
    named_barrier_arrive(1, 256);
  } else if (threadIdx.x < 128) {
    mbar_wait(bar, 0);
    float d[N / 2];
    uint32_t a[4] = {1u, 2u, 3u, (uint32_t)flag};
    uint64_t da = make_smem_desc(tile, 16, 1024, Swizzle::B128);
    uint64_t db = desc_advance(da, 32);
    fence_operand(d);
    wgmma_fence();
    wgmma_ss<N, T>(d, da, db, false);
    wgmma_ss<N, T, Major::MN, Major::MN, true, true>(d, da, db, true);
    wgmma_rs<N, T>(d, a, db, true);
    wgmma_rs<N, T, Major::MN, true, false>(d, a, db, flag != 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operand(d);
    fence_operand(a);
    for (int i = 0; i < N / 2; ++i) out[threadIdx.x * (N / 2) + i] = d[i];
    named_barrier_sync(1, 256);
    fence_proxy_async_shared();
    if (threadIdx.x == 0) {
      tma_store(&tm, tile, 0);
      tma_store(&tm, tile, 0, 0);
      tma_store(&tm, tile, 0, 0, 0);
      tma_store(&tm, tile, 0, 0, 0, 0);
      tma_store(&tm, tile, 0, 0, 0, 0, 0);
      tma_store_commit();
      tma_store_wait_read<0>();
      tma_store_wait<0>();
    }
  }
}
#endif
extern "C" __global__ void portable(unsigned long long* out) {
  out[0] = make_smem_desc(0x400u, 16, 1024, Swizzle::B64, 1) + swizzle_address(0x580u, Swizzle::B128);
}
"""


def _nvrtc():
    """CuPy's NVRTC binding, or a skip (a failure where CI requires NVRTC, as in test_resources.py)."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0"):
            raise
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e})")
    return nvrtc


def _nvrtc_compile(arch, names):
    nvrtc = _nvrtc()
    from cupy_cosattn import _paths, resources

    prog = nvrtc.createProgram(EVERY_PRIMITIVE, "every_primitive.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", "-Xptxas=-v", "-std=c++17", f"-I{_paths.CUDA_SRC}"])
        except Exception as e:  # noqa: BLE001 - NVRTCError: show the log
            pytest.fail(f"NVRTC {arch}: {e}\n{nvrtc.getProgramLog(prog)}")
        rows = resources.parse_ptxas(nvrtc.getProgramLog(prog))
        return {n: rows[nvrtc.getLoweredName(prog, n)] for n in names}, rows
    finally:
        nvrtc.destroyProgram(prog)


def test_hopper_primitives_compile_for_sm90a_without_spills():
    names = [f"every_primitive<{n}, ca::{t}>" for n in (8, 64, 128, 256) for t in ("half_t", "bf16_t")]
    rows, _ = _nvrtc_compile("sm_90a", names)
    for n, r in rows.items():
        assert r["spill_st"] == 0 and r["spill_ld"] == 0 and r["stack"] == 0, (n, r)
        assert r["regs"] > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
def test_hopper_header_compiles_for_other_architectures(arch):
    _, rows = _nvrtc_compile(arch, [])
    assert list(rows) == ["portable"]  # only the arch-neutral kernel: every_primitive is guarded out


# ------------------------------------------------------------------------------------------------
# cupy_cosattn.tensormap

def test_tensormap_emulator_layout():
    """The 128 bytes follow caemu_tensormap (cuda_src/emu/hopper.h) field by field."""
    tm = tensormap.encode_tiled(0x7F0000001230, BF16, (64, 100, 7), (256, 25600), (64, 32, 2),
                                element_strides=(1, 2, 1),
                                swizzle=128, oob_fill="nan", l2_promotion=128, target="emulator")
    assert tm.dtype == tensormap.TENSOR_MAP_DTYPE and tm.dtype.itemsize == 128
    raw = tm.tobytes()
    magic, dt, rank, elem, sw, inter, oob, l2 = np.frombuffer(raw[:11], "<u4,u1,u1,u1,u1,u1,u1,u1")[0].tolist()
    assert (magic, dt, rank, elem, sw, inter, oob, l2) == (tensormap.EMULATOR_MAGIC, 9, 3, 2, 3, 0, 1, 2)
    assert raw[11:16] == bytes(5) and raw[121:] == bytes(7)
    assert np.frombuffer(raw[16:24], "<u8")[0] == 0x7F0000001230
    np.testing.assert_array_equal(np.frombuffer(raw[24:64], "<u8"), [64, 100, 7, 0, 0])
    np.testing.assert_array_equal(np.frombuffer(raw[64:96], "<u8"), [256, 25600, 0, 0])
    np.testing.assert_array_equal(np.frombuffer(raw[96:116], "<u4"), [64, 32, 2, 0, 0])
    np.testing.assert_array_equal(np.frombuffer(raw[116:121], "u1"), [1, 2, 1, 0, 0])


def test_tensormap_from_array_is_encode_tiled_in_numpy_order():
    x = emu.device_zeros((3, 40, 48), np.float16)
    a = tensormap.from_array(x, (2, 8, 32), swizzle=64, element_strides=(2, 1, 1), target="emulator")
    b = tensormap.encode_tiled(emu.device_ptr(x), np.float16, (48, 40, 3), (96, 3840), (32, 8, 2),
                               element_strides=(1, 1, 2), swizzle=64, target="emulator")
    assert a.tobytes() == b.tobytes()
    # a view with padded rows: the strides are the view's
    v = emu.device_zeros((16, 64), np.float32)[:, :32]
    tv = tensormap.from_array(v, (8, 32), target="emulator")
    assert np.frombuffer(tv.tobytes()[64:72], "<u8")[0] == 256 and np.frombuffer(tv.tobytes()[24:32], "<u8")[0] == 32


GOOD = dict(global_address=0x10000, dtype="bfloat16", global_dims=(64, 64), global_strides=(128,), box_dims=(64, 8),
            swizzle=128, target="emulator")
BAD_MAPS = [
    (dict(target="cpu"), ValueError, "target: 'cpu'"),
    (dict(global_address=0x10008), ValueError, "global_address: 0x10008 is not 16-byte aligned"),
    (dict(global_address=1.5), TypeError, "global_address: expected an integer"),
    (dict(dtype=np.complex64), ValueError, "dtype: 'complex64' has no tensor-map element type"),
    (dict(dtype=object()), TypeError, "dtype: .* is not a NumPy dtype"),
    (dict(global_dims=(), global_strides=(), box_dims=()), ValueError, "global_dims: rank 0, expected 1..5"),
    (dict(global_dims=(2,) * 6, global_strides=(16,) * 5, box_dims=(8,) * 6), ValueError, "rank 6"),
    (dict(global_dims=(64, 2**32 + 1)), ValueError, r"global_dims\[1\] = 4294967297"),
    (dict(global_dims=(64.0, 64)), TypeError, "global_dims: expected integers"),
    (dict(global_strides=(120,)), ValueError, r"global_strides\[0\] = 120 bytes, expected a positive multiple of 16"),
    (dict(global_strides=(128, 16)), ValueError, "global_strides: 2 strides for rank 2, expected 1"),
    (dict(box_dims=(64,)), ValueError, "box_dims: 1 dimensions for rank 2"),
    (dict(box_dims=(64, 257)), ValueError, r"box_dims\[1\] = 257, expected 1..256"),
    (dict(box_dims=(4, 8)), ValueError, "4 elements of 2 bytes = 8 bytes, expected a multiple of 16"),
    (dict(global_dims=(256, 64), global_strides=(512,), box_dims=(128, 8)), ValueError,
     "the inner box is 256 bytes, more than the 128-byte swizzle span"),
    (dict(box_dims=(32, 8), swizzle=32), ValueError, "the inner box is 64 bytes, more than the 32-byte swizzle span"),
    (dict(swizzle=96), ValueError, "swizzle: 96, expected the span in bytes"),
    (dict(element_strides=(1, 9)), ValueError, r"element_strides\[1\] = 9, expected 1..8"),
    (dict(element_strides=(1,)), ValueError, "element_strides: 1 strides for rank 2"),
    (dict(dtype="int32", box_dims=(32, 8), oob_fill="nan"), ValueError, "'nan' needs a floating-point dtype"),
    (dict(oob_fill="inf"), ValueError, "oob_fill: 'inf'"),
    (dict(l2_promotion=32), ValueError, "l2_promotion: 32"),
]


@pytest.mark.parametrize("change,exc,match", BAD_MAPS, ids=[m[2][:40] for m in BAD_MAPS])
def test_tensormap_rejects_what_the_driver_rejects(change, exc, match):
    kw = dict(GOOD, **change)
    with pytest.raises(exc, match=match):
        tensormap.encode_tiled(kw.pop("global_address"), kw.pop("dtype"), kw.pop("global_dims"),
                               kw.pop("global_strides"), kw.pop("box_dims"), **kw)
    if exc is ValueError and "target" not in change:  # the GPU path checks first, too (no driver call)
        kw = dict(GOOD, **change, target="gpu")
        with pytest.raises(exc, match=match):
            tensormap.encode_tiled(kw.pop("global_address"), kw.pop("dtype"), kw.pop("global_dims"),
                                   kw.pop("global_strides"), kw.pop("box_dims"), **kw)


def test_tensormap_from_array_checks():
    x = emu.device_zeros((16, 64), BF16)
    with pytest.raises(ValueError, match="box_shape: 1 dimensions for an array of 2"):
        tensormap.from_array(x, (64,), target="emulator")
    with pytest.raises(ValueError, match="the last dimension must be contiguous"):
        tensormap.from_array(emu.device_zeros((16, 64), BF16)[:, ::2], (8, 32), target="emulator")
    with pytest.raises(TypeError, match="target='gpu' needs a CuPy array"):
        tensormap.from_array(np.zeros((16, 64), np.float32), (8, 32), target="gpu")


# ------------------------------------------------------------------------------------------------
# GPU twins (an H100/H200): the same kernels through NVRTC, tensor maps from the driver.

def _gpu_module(names):
    cp = pytest.importorskip("cupy")
    cc = cp.cuda.Device().compute_capability
    if int(cc) < 90:
        pytest.skip(f"needs an sm_90 device, this one is sm_{cc}")
    from cupy_cosattn import _paths

    return cp, cp.RawModule(code=SRC, options=("-arch=sm_90a", "-std=c++17", f"-I{_paths.CUDA_SRC}"),
                            name_expressions=names)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [TMA_CASES[2], TMA_CASES[3], TMA_CASES[6], TMA_CASES[7], TMA_CASES[9]],
                         ids=[_tma_id(TMA_CASES[i]) for i in (2, 3, 6, 7, 9)])
def test_gpu_tma_load_matches_the_model(case):
    """The driver's tensor map and the GPU's TMA give the shared-memory bytes the emulator's model gives."""
    rank, dt, shape, box, coords, es, span = case
    cp, gmod = _gpu_module([f"t_tma_load<{rank}>"])
    G = (np.random.default_rng(rank).standard_normal(shape) * 10).astype(dt)
    dG = cp.asarray(G)
    tm = tensormap.from_array(dG, box, swizzle=span, element_strides=es, target="gpu")
    base = cp.zeros(1, np.uint32)
    dst_off = 1024
    nbox = int(np.prod([(b + e - 1) // e if i < rank - 1 else b for i, (b, e) in enumerate(zip(box, es))]))
    nbytes = nbox * np.dtype(dt).itemsize
    size = (nbytes + 127) // 128 * 128
    out = cp.zeros(size, np.uint8)
    gmod.get_function(f"t_tma_load<{rank}>")((1,), (128,), (tm, cp.asarray(np.array(coords[::-1], np.int32)),
                                                            np.uint32(dst_off), np.uint32(nbytes), np.uint32(size),
                                                            out, base), shared_mem=dst_off + size)
    exp, written = tma_image(G, box, coords, es, int(base.get()[0]) + dst_off, span)
    np.testing.assert_array_equal(out.get()[written], exp[written])


@pytest.mark.gpu
def test_gpu_tma_wgmma_gemm_64x64():
    cp, gmod = _gpu_module([])
    rng = np.random.default_rng(11)
    A = rng.standard_normal((64, 64)).astype(BF16)
    B = rng.standard_normal((64, 64)).astype(BF16)
    dA, dB = cp.asarray(A), cp.asarray(B)
    ta = tensormap.from_array(dA, (64, 64), swizzle=128, target="gpu")
    tb = tensormap.from_array(dB, (64, 64), swizzle=128, target="gpu")
    c = cp.zeros((64, 64), np.float32)
    gmod.get_function("t_gemm64")((1,), (128,), (ta, tb, c), shared_mem=1024 + 16384)
    np.testing.assert_allclose(c.get(), A.astype(np.float64) @ B.astype(np.float64).T, rtol=1e-4, atol=1e-4)


def test_emu_tma_stores_of_two_blocks_to_one_box_are_a_race(mod):
    """The race mode sees the global writes of TMA stores (performed by the runtime, not by
    instrumented kernel code): two blocks storing the same box race; one block alone does not."""
    box = (16, 32)
    Bx = np.arange(512, dtype=np.float32).reshape(box).astype(BF16)
    dG = emu.device_zeros(box, BF16)
    tm = tensormap.from_array(dG, box, swizzle=64, target="emulator")
    img, _ = tma_image(Bx, box, (0, 0), (1, 1), DYN_BASE + 1024, 64)
    k = mod.get_function("t_tma_store<2>")
    args = (tm, emu.to_device(np.zeros(2, np.int32)), emu.to_device(img), np.uint32(1024), np.uint32(len(img)),
            np.int32(1))
    with emu.race_check():
        k((1,), (128,), args, shared_mem=1024 + len(img))
        np.testing.assert_array_equal(emu.to_host(dG), Bx)
        with pytest.raises(emu.EmulatorError, match="data race in global memory between blocks"):
            k((2,), (128,), args, shared_mem=1024 + len(img))
