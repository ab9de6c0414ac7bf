"""Emulator self-tests, part 2: end-to-end kernels built from the common.cuh primitives (a tiled
ldmatrix + mma matmul with a cp.async double-buffered pipeline, a shuffle reduction, a cp.async copy
with zero-filled tails), __syncwarp ordering shared memory within a warp, planted faults that must
each be caught (missing barrier or __syncwarp, out-of-bounds reads and writes under each placement of
a buffer between its guards, reading before cp.async lands, deadlock, partial-warp collectives and
__syncwarp waiting for a lane that never arrives, ...), argument marshalling (params structs by
value, size checks), the build cache, and speed."""
import os
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from cupy_cosattn import emulator as emu

SRC = r"""
#include "common.cuh"

// C[M,N] (fp32) = A[M,K] * B[K,N], both row-major, M % 64 == 0, N % 32 == 0, K % 16 == 0.
// 4 warps per 64 x 32 tile; warp w owns rows 16w..16w+15 and four 8-column mma tiles.
// Tiles arrive by cp.async, double-buffered; A fragments by ldmatrix.x4, B by ldmatrix.x4.trans.
template <class T>
__global__ void e_matmul(const T* A, const T* B, float* C, int M, int N, int K) {
  CA_DYNAMIC_SHARED(smem);
  T* As = (T*)smem;            // [2][64][16]
  T* Bs = As + 2 * 64 * 16;    // [2][16][32]
  int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int m0 = blockIdx.y * 64, n0 = blockIdx.x * 32;
  auto load = [&](int stage, int k0) {
    int r = tid / 2, c = (tid % 2) * 8;
    ca::cp_async_16(As + stage * 1024 + r * 16 + c, A + (size_t)(m0 + r) * K + k0 + c);
    if (tid < 64) {
      int rb = tid / 4, cb = (tid % 4) * 8;
      ca::cp_async_16(Bs + stage * 512 + rb * 32 + cb, B + (size_t)(k0 + rb) * N + n0 + cb);
    }
  };
  float acc[4][4] = {};
  int KT = K / 16;
  load(0, 0);
  ca::cp_async_commit();
  for (int kt = 0; kt < KT; ++kt) {
    if (kt + 1 < KT) {
      load((kt + 1) & 1, (kt + 1) * 16);
      ca::cp_async_commit();
      ca::cp_async_wait<1>();
    } else {
      ca::cp_async_wait<0>();
    }
    __syncthreads();
    const T* as = As + (kt & 1) * 1024;
    const T* bs = Bs + (kt & 1) * 512;
    uint32_t a[4];
    ca::ldmatrix_x4(a, as + (warp * 16 + lane % 16) * 16 + (lane / 16) * 8);
#pragma unroll
    for (int nb = 0; nb < 2; ++nb) {
      uint32_t b[4];
      ca::ldmatrix_x4_trans(b, bs + (lane % 16) * 32 + nb * 16 + (lane / 16) * 8);
      ca::mma_m16n8k16(acc[2 * nb], a, b, T{});
      ca::mma_m16n8k16(acc[2 * nb + 1], a, b + 2, T{});
    }
    __syncthreads();
  }
  int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    size_t row = m0 + warp * 16 + g, col = n0 + j * 8 + 2 * t;
    C[row * N + col] = acc[j][0];
    C[row * N + col + 1] = acc[j][1];
    C[(row + 8) * N + col] = acc[j][2];
    C[(row + 8) * N + col + 1] = acc[j][3];
  }
}

extern "C" __global__ void e_block_sum(const float* x, float* out, int n) {
  __shared__ float part[32];
  float s = 0.f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) s += x[i];
  s = ca::warp_sum(s);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
    v = ca::warp_sum(v);
    if (threadIdx.x == 0) atomicAdd(out, v);
  }
}

// y[0 .. 128*ceil(n/128)) = x[0..n) followed by zeros, through shared memory, 32 threads x 16 bytes
// per chunk, double-buffered; each thread stores elements another thread loaded. refill_barrier = 0
// plants a fault: a buffer is refilled while other threads may still be reading it.
extern "C" __global__ void e_copy(const float* x, float* y, int n, int refill_barrier) {
  CA_DYNAMIC_SHARED(smem);
  float* buf = (float*)smem;  // [2][128]
  int t = threadIdx.x;
  int chunks = (n + 127) / 128;
  auto issue = [&](int c) {
    int e = c * 128 + t * 4;
    int valid = n - e;
    int bytes = valid >= 4 ? 16 : (valid > 0 ? valid * 4 : 0);
    ca::cp_async_16(buf + (c & 1) * 128 + t * 4, bytes ? x + e : x, bytes);
  };
  issue(0);
  ca::cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) {
      issue(c + 1);
      ca::cp_async_commit();
      ca::cp_async_wait<1>();
    } else {
      ca::cp_async_wait<0>();
    }
    __syncthreads();
    for (int j = 0; j < 4; ++j) {
      int i = (t * 4 + j + 64) % 128;
      y[c * 128 + i] = buf[(c & 1) * 128 + i];
    }
    if (refill_barrier) __syncthreads();
  }
}

// ---- planted faults ----
extern "C" __global__ void f_race(const float* x, float* out, int sync, int back) {
  __shared__ float s[128];
  int t = threadIdx.x;
  s[t] = x[t];
  if (sync) __syncthreads();
  int src = back ? (t >= 32 ? t - 32 : t) : (t + 37) % 128;
  out[t] = s[src];
}

extern "C" __global__ void f_oob_write(float* x, int n, int off) {
  if (threadIdx.x == 3) x[n + off] = 1.f;
}

extern "C" __global__ void f_oob_read(const float* x, float* out, int n, int off) {
  if (threadIdx.x == 5) out[0] = x[n + off];
}

extern "C" __global__ void f_early_read(const float* x, float* out) {
  __shared__ __align__(16) float s[2][128];
  int t = threadIdx.x;  // 32 threads
  for (int j = 0; j < 4; ++j) s[0][t * 4 + j] = s[1][t * 4 + j] = -1.f;
  __syncthreads();
  ca::cp_async_16(&s[0][t * 4], x + t * 4);
  ca::cp_async_commit();
  for (int j = 0; j < 4; ++j) out[t * 4 + j] = s[0][t * 4 + j];  // too early: stale
  ca::cp_async_16(&s[1][t * 4], x + 128 + t * 4);
  ca::cp_async_commit();
  ca::cp_async_wait<1>();  // the first group has landed, the second not necessarily
  for (int j = 0; j < 4; ++j) out[128 + t * 4 + j] = s[0][t * 4 + j];
  for (int j = 0; j < 4; ++j) out[256 + t * 4 + j] = s[1][t * 4 + j];
  ca::cp_async_wait<0>();
  for (int j = 0; j < 4; ++j) out[384 + t * 4 + j] = s[1][t * 4 + j];
}

extern "C" __global__ void f_deadlock(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.f;
}

extern "C" __global__ void f_partial_shfl(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

extern "C" __global__ void f_shfl_vs_barrier(float* out) {
  float v = (float)threadIdx.x;
  if (threadIdx.x < 16) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

extern "C" __global__ void f_partial_ldmatrix(uint32_t* out) {
  __shared__ __align__(16) uint16_t sm[8 * 8];
  uint32_t r[1];
  ca::ldmatrix_x1(r, sm + (threadIdx.x % 8) * 8);
  out[threadIdx.x] = r[0];
}

extern "C" __global__ void f_cp_inflight(const float* x) {
  __shared__ __align__(16) float s[4];
  if (threadIdx.x == 0) {
    ca::cp_async_16(s, x);
    ca::cp_async_commit();
  }
}

extern "C" __global__ void f_smem_oob(int i) {
  CA_DYNAMIC_SHARED(sm);
  ((float*)sm)[i] = 1.f;
}

extern "C" __global__ void f_smem_garbage(float* out) {
  CA_DYNAMIC_SHARED(sm);
  out[threadIdx.x] = ((float*)sm)[threadIdx.x];
}

extern "C" __global__ void f_stack(float* out, int n) {
  volatile char big[1 << 20];
  big[0] = 1;
  big[n] = 2;
  out[0] = big[n];
}

extern "C" __global__ void f_trap(float* out) {
  if (threadIdx.x == 7) __trap();
  out[threadIdx.x] = 1.f;
}

// ---- __syncwarp ----
// Each warp passes values round a ring through shared memory, ordered by __syncwarp alone: lane l
// writes its slot, syncs, reads its neighbour's (l + 1) and syncs again before the next round
// overwrites its slot. syncs = 2 is correct; 1 drops the second __syncwarp (a write-after-read race:
// a lane's next write can overwrite a slot its neighbour has not read yet); 0 drops both.
extern "C" __global__ void w_ring(const int* x, int* out, int rounds, int syncs) {
  __shared__ int s[4][32];
  int t = threadIdx.x, w = t / 32, l = t % 32;
  int v = x[t];
  for (int r = 0; r < rounds; ++r) {
    s[w][l] = v;
    if (syncs >= 1) __syncwarp();
    v = s[w][(l + 1) % 32] + 1;
    if (syncs >= 2) __syncwarp();
  }
  out[t] = v;
}

// The two halves of a warp, each a ring of 16 ordered by __syncwarp with its own member mask.
extern "C" __global__ void w_ring_halves(const int* x, int* out, int rounds) {
  __shared__ int s[32];
  int l = threadIdx.x;  // one warp
  unsigned mask = l < 16 ? 0x0000ffffu : 0xffff0000u;
  int base = l & 16;
  int v = x[l];
  for (int r = 0; r < rounds; ++r) {
    s[l] = v;
    __syncwarp(mask);
    v = s[base + ((l + 1) & 15)] + 1;
    __syncwarp(mask);
  }
  out[l] = v;
}

// Diverged lanes meet at different __syncwarp() call sites: allowed from sm_70 on (threads wait for
// every thread of the mask to execute a __syncwarp with the same mask, not the same instruction).
extern "C" __global__ void w_sites(const int* x, int* out) {
  __shared__ int s[32];
  int l = threadIdx.x;
  if (l < 16) {
    s[l] = 2 * x[l];
    __syncwarp();
    out[l] = s[31 - l];
  } else {
    s[l] = 3 * x[l];
    __syncwarp();
    out[l] = s[31 - l] + 1000;
  }
}

// Lanes >= k of every warp leave the kernel; the others then __syncwarp() with the full mask.
extern "C" __global__ void w_exited(int* out, int k) {
  if (threadIdx.x % 32 >= k) return;
  out[threadIdx.x] = 1;
  __syncwarp();
  out[threadIdx.x] = 2;
}

// Lanes < 16 wait at __syncwarp() for lanes that went to __syncthreads() / a shuffle instead.
extern "C" __global__ void w_vs_barrier(int* out) {
  if (threadIdx.x < 16) __syncwarp();
  else __syncthreads();
  out[threadIdx.x] = 1;
}

extern "C" __global__ void w_vs_shfl(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) __syncwarp();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The full mask in a block of 48 threads: lanes 16-31 of warp 1 do not exist.
extern "C" __global__ void w_partial_last_warp(int* out) {
  __syncwarp();
  out[threadIdx.x] = 1;
}

// A mask that does not name the calling lane.
extern "C" __global__ void w_not_self(int* out) {
  if (threadIdx.x == 3) __syncwarp(0x1u);
  out[threadIdx.x] = 1;
}

// ---- arguments ----
struct Params {
  const float* x;
  float* y;
  int n;
  float scale;
};

extern "C" __global__ void a_params(Params p) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) p.y[i] = p.x[i] * p.scale;
}

extern "C" __global__ void a_scalars(double* y, int i, long long j, float f, double d) {
  y[0] = i;
  y[1] = (double)j;
  y[2] = f;
  y[3] = d;
}

extern "C" __global__ void a_dims(int* out) {
  int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int nt = blockDim.x * blockDim.y * blockDim.z;
  out[b * nt + t] = b * 1000 + t;
}

namespace inner {
__global__ void a_namespaced(int* out) { out[threadIdx.x] = 7; }
}

// ---- speed ----
extern "C" __global__ void s_mma_loop(float* out, int iters) {
  uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u};  // 1.0
  uint32_t b[2] = {0x2c002c00u, 0x2c002c00u};                            // 2^-4
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < iters; ++i) ca::mma_m16n8k16(d, a, b, ca::half_t{});
  for (int j = 0; j < 4; ++j) out[threadIdx.x * 4 + j] = d[j];
}
"""

NAMES = ("e_matmul<ca::half_t>", "e_matmul<ca::bf16_t>")


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17", "--use_fast_math"), name_expressions=NAMES)


def _ok_after(mod):
    """The process stays usable after an error: a normal kernel still runs and gives the right answer."""
    x = np.arange(1000, dtype=np.float32)
    out = emu.device_zeros(1, np.float32)
    mod.get_function("e_block_sum")((3,), (128,), (emu.to_device(x), out, np.int32(1000)))
    assert out[0] == x.sum()


# ------------------------------------------------------------------------------------------------
# end to end

@pytest.mark.parametrize("dt,name", [(np.float16, NAMES[0]), (ml_dtypes.bfloat16, NAMES[1])])
def test_emu_matmul_ldmatrix_mma_cp_async(mod, dt, name):
    rng = np.random.default_rng(1)
    M, N, K = 128, 64, 96
    A = rng.standard_normal((M, K)).astype(dt)
    B = rng.standard_normal((K, N)).astype(dt)
    C = emu.device_empty((M, N), np.float32)
    k = mod.get_function(name)
    k((N // 32, M // 64), (128,), (emu.to_device(A), emu.to_device(B), C, np.int32(M), np.int32(N), np.int32(K)),
      shared_mem=2 * 64 * 16 * 2 + 2 * 16 * 32 * 2)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    assert np.linalg.norm(C - ref) / np.linalg.norm(ref) < 1e-6


def test_emu_matmul_same_result_every_interleaving(mod):
    rng = np.random.default_rng(2)
    M, N, K = 64, 32, 64
    A = emu.to_device(rng.standard_normal((M, K)).astype(np.float16))
    B = emu.to_device(rng.standard_normal((K, N)).astype(np.float16))
    results = []
    for seed in (None, 1, 2, 3):
        C = emu.device_empty((M, N), np.float32)
        with emu.interleave(seed):
            mod.get_function(NAMES[0])((1, 1), (128,), (A, B, C, np.int32(M), np.int32(N), np.int32(K)),
                                       shared_mem=6144)
        results.append(np.array(C))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_emu_warp_reduction(mod):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_000).astype(np.float32)
    out = emu.device_zeros(1, np.float32)
    mod.get_function("e_block_sum")((4,), (256,), (emu.to_device(x), out, np.int32(x.size)))
    np.testing.assert_allclose(out[0], x.astype(np.float64).sum(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [128, 1000, 1001, 1027])
def test_emu_cp_async_double_buffered_copy(mod, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    m = (n + 127) // 128 * 128
    y = emu.device_empty(m, np.float32)
    y[:] = 123.0
    for seed in (None, 1, 2, 3):  # copies land at the wait, or (interleave mode) half of them at issue
        y[:] = 123.0
        with emu.interleave(seed):
            mod.get_function("e_copy")((1,), (32,), (emu.to_device(x), y, np.int32(n), np.int32(1)),
                                       shared_mem=2 * 128 * 4)
        np.testing.assert_array_equal(y[:n], x)
        assert (y[n:] == 0).all()  # zero-filled by cp.async src-size


def test_emu_missing_barrier_before_cp_async_refill_is_exposed(mod):
    """A thread that refills a buffer (cp.async) while others still read it: on the GPU the copy may
    land at any time after its issue. Interleave mode lands copies early (seeded), so the missing
    barrier changes the result."""
    x = np.arange(5 * 128, dtype=np.float32) + 1
    xd = emu.to_device(x)
    wrong = 0
    for seed in range(1, 6):
        y = emu.device_zeros(x.size, np.float32)
        with emu.interleave(seed):
            mod.get_function("e_copy")((1,), (32,), (xd, y, np.int32(x.size), np.int32(0)), shared_mem=2 * 128 * 4)
        wrong += not np.array_equal(y, x)
    assert wrong >= 3, f"missing refill barrier exposed under only {wrong} of 5 seeds"


def test_emu_grid_and_block_dims(mod):
    grid, block = (3, 2, 2), (4, 3, 2)
    nb, nt = 12, 24
    out = emu.device_zeros(nb * nt, np.int32)
    mod.get_function("a_dims")(grid, block, (out,))
    exp = np.array([b * 1000 + t for b in range(nb) for t in range(nt)], np.int32)
    np.testing.assert_array_equal(out, exp)


# ------------------------------------------------------------------------------------------------
# planted faults

def test_emu_missing_barrier_is_exposed(mod):
    x = np.arange(128, dtype=np.float32)
    xd = emu.to_device(x)
    correct = x[(np.arange(128) + 37) % 128]
    seen = []
    for seed in (None, 1, 2, 3, 4):
        out = emu.device_zeros(128, np.float32)
        with emu.interleave(seed):
            mod.get_function("f_race")((1,), (128,), (xd, out, np.int32(1), np.int32(0)))
        np.testing.assert_array_equal(out, correct)  # with the barrier: always right
        out = emu.device_zeros(128, np.float32)
        with emu.interleave(seed):
            mod.get_function("f_race")((1,), (128,), (xd, out, np.int32(0), np.int32(0)))
        assert not np.array_equal(out, correct, equal_nan=True), f"missing barrier not exposed (seed {seed})"
        seen.append(out.tobytes())
    assert len(set(seen)) > 1  # and the result depends on the interleaving


def test_emu_interleave_exposes_race_that_round_robin_hides(mod):
    """Each thread reads what the thread 32 below wrote, without a barrier: in the fixed round-robin
    order earlier threads always finished first, so only the interleaving mode shows the race."""
    x = np.arange(128, dtype=np.float32) + 1
    xd = emu.to_device(x)
    t = np.arange(128)
    correct = x[np.where(t >= 32, t - 32, t)]
    out = emu.device_zeros(128, np.float32)
    with emu.interleave(None):
        mod.get_function("f_race")((1,), (128,), (xd, out, np.int32(0), np.int32(1)))
    np.testing.assert_array_equal(out, correct)
    wrong = 0
    for seed in range(1, 6):
        out = emu.device_zeros(128, np.float32)
        with emu.interleave(seed):
            mod.get_function("f_race")((1,), (128,), (xd, out, np.int32(0), np.int32(1)))
        wrong += not np.array_equal(out, correct, equal_nan=True)
    assert wrong >= 3


def test_emu_interleave_is_reproducible(mod):
    xd = emu.to_device(np.arange(128, dtype=np.float32))
    outs = []
    for _ in range(2):
        out = emu.device_zeros(128, np.float32)
        with emu.interleave(12345):
            mod.get_function("f_race")((1,), (128,), (xd, out, np.int32(0), np.int32(0)))
        outs.append(out.tobytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("place", ["end", "start", "exact"])
@pytest.mark.parametrize("n,idx", [(1000, 1000), (1000, 1001), (1000, 6000), (1001, 1001), (1001, 1003),
                                   (1000, -1), (1001, -3), (1024, -1000)])
def test_emu_out_of_bounds_write(mod, n, idx, place):
    """Caught under every placement: where the data is flush against a guard region, by the fault;
    elsewhere (the slack before or after the data, the rounding tail) by the canaries."""
    with emu.placement(place):
        x = emu.device_zeros(n, np.float32)
    with pytest.raises(emu.EmulatorError) as ei:
        mod.get_function("f_oob_write")((1,), (32,), (x, np.int32(0), np.int32(idx)))
    msg = str(ei.value)
    assert "f_oob_write" in msg and "out of bounds" in msg
    assert f"({n},)" in msg and "float32" in msg
    assert f"byte offset {idx * 4}" in msg
    _ok_after(mod)
    # the canaries were re-armed: the next clean launch on the same buffer raises nothing
    mod.get_function("f_oob_write")((1,), (32,), (x, np.int32(0), np.int32(0)))


@pytest.mark.parametrize("off", [0, 1000, -1025])
def test_emu_out_of_bounds_read(mod, off):
    n = 1024  # a multiple of 16 bytes: the data ends flush against the guard page
    x = emu.to_device(np.ones(n, np.float32))
    out = emu.device_zeros(1, np.float32)
    with pytest.raises(emu.EmulatorError) as ei:
        mod.get_function("f_oob_read")((1,), (32,), (x, out, np.int32(n), np.int32(off)))
    msg = str(ei.value)
    assert "f_oob_read" in msg and "thread (5,0,0)" in msg and "block (0,0,0)" in msg
    assert "(1024,)" in msg and "float32" in msg
    _ok_after(mod)


# (n, index read, the placements under which the read faults): "start" puts the guard right before
# x[0]; "end" right after the data rounded up to 16 bytes; "exact" right after the data itself.
OOB_READS = [
    (1000, -1, {"start"}),
    (3, -1, {"start"}),
    (3, 3, {"exact"}),             # inside the 16-byte rounding tail (12 bytes of data)
    (1001, 1001, {"exact"}),       # inside the rounding tail of a 4004-byte buffer
    (1001, 1004, {"end", "exact"}),  # the first element past the rounding tail
    (1000, 1000, {"end", "exact"}),  # a multiple of 16 bytes: no tail
    (1024, 1024, {"end", "start", "exact"}),  # exactly one page: flush against both guards
    (1024, -1, {"end", "start", "exact"}),
]


@pytest.mark.parametrize("n,idx,caught_under", OOB_READS)
def test_emu_out_of_bounds_read_placement(mod, n, idx, caught_under):
    """The same out-of-bounds read, with the buffer placed against each guard in turn: caught, with
    the kernel, the thread, the buffer and the offset, exactly under the placements that put a guard
    there (elsewhere it reads canary bytes unnoticed, as docs/emulator.md says)."""
    for place in ("end", "start", "exact"):
        with emu.placement(place):
            x = emu.to_device(np.ones(n, np.float32))
        out = emu.device_zeros(1, np.float32)
        args = (x, out, np.int32(n), np.int32(idx - n))
        if place not in caught_under:
            mod.get_function("f_oob_read")((1,), (32,), args)
            assert out[0] != 1.0  # a canary, not data
            continue
        with pytest.raises(emu.EmulatorError) as ei:
            mod.get_function("f_oob_read")((1,), (32,), args)
        msg = str(ei.value)
        assert "f_oob_read" in msg and "thread (5,0,0)" in msg and "block (0,0,0)" in msg, msg
        assert f"buffer of shape ({n},) dtype float32 ({4 * n} bytes, placement {place})" in msg, msg
        assert f"byte offset {4 * idx}, element {idx} ({'before its start' if idx < 0 else 'past its end'})" in msg
        _ok_after(mod)


def test_emu_alternate_placement_covers_both_ends(mod):
    """The default placement alternates between the end and the start guard by allocation, so of two
    buffers allocated in a row, one catches a read just before its start and the other a read just
    past its end; writes are caught on both sides of both (canaries)."""
    if not os.environ.get("CUPY_COSATTN_EMU_PLACE", "").strip():
        assert emu.get_placement() == "alternate"
    n = 1000  # 4000 bytes: a multiple of 16, so "end" has no rounding tail
    with emu.placement("alternate"):
        xs = [emu.to_device(np.ones(n, np.float32)) for _ in range(2)]
    out = emu.device_zeros(1, np.float32)

    def caught(kernel, x, idx):
        try:
            mod.get_function(kernel)((1,), (32,), (x, out, np.int32(0), np.int32(idx)) if kernel == "f_oob_read"
                                     else (x, np.int32(0), np.int32(idx)))
        except emu.EmulatorError:
            return True
        return False

    before = [caught("f_oob_read", x, -1) for x in xs]
    after = [caught("f_oob_read", x, n) for x in xs]
    assert sorted(before) == [False, True] and after == [not b for b in before]
    for x in xs:
        assert caught("f_oob_write", x, -1) and caught("f_oob_write", x, n)


def test_emu_placement_settings():
    old = emu.get_placement()
    with emu.placement("start"):
        assert emu.get_placement() == "start"
        emu.set_placement("exact")
        assert emu.get_placement() == "exact"
    assert emu.get_placement() == old
    with pytest.raises(ValueError, match="unknown placement"):
        emu.set_placement("middle")
    assert emu.get_placement() == old
    with emu.placement("exact"):
        a = emu.device_empty(3, np.float32)
    assert emu.device_ptr(a) % 16 == 4  # exact: ends at the guard, so only 4-byte aligned
    for place in ("end", "start", "alternate"):
        with emu.placement(place):
            assert all(emu.device_ptr(emu.device_empty(k, np.float32)) % 16 == 0 for k in (1, 3, 5, 1000))
    code = "from cupy_cosattn import emulator as e; print(e.get_placement())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "CUPY_COSATTN_EMU_PLACE": "start"})
    assert r.stdout.strip() == "start", r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       env={**os.environ, "CUPY_COSATTN_EMU_PLACE": "sideways"})
    assert r.returncode != 0 and "CUPY_COSATTN_EMU_PLACE" in r.stderr


def test_emu_plain_numpy_argument_is_guarded_too(mod):
    x = np.zeros(1000, np.float32)  # a plain array: copied into guarded memory for the launch
    with pytest.raises(emu.EmulatorError, match="out of bounds"):
        mod.get_function("f_oob_write")((1,), (32,), (x, np.int32(1000), np.int32(0)))
    mod.get_function("f_oob_write")((1,), (32,), (x, np.int32(10), np.int32(0)))
    assert x[10] == 1.0 and x.sum() == 1.0  # copied back


def test_emu_read_before_cp_async_wait_sees_stale_data(mod):
    x = np.arange(256, dtype=np.float32) + 1
    out = emu.device_zeros(512, np.float32)
    with emu.interleave(None):  # copies land exactly at the wait that retires them
        mod.get_function("f_early_read")((1,), (32,), (emu.to_device(x), out))
    assert (out[:128] == -1).all()              # read before the wait: stale
    np.testing.assert_array_equal(out[128:256], x[:128])  # wait<1> retired the first group
    assert (out[256:384] == -1).all()           # ... but not the second
    np.testing.assert_array_equal(out[384:], x[128:])     # wait<0> retired it
    # interleave mode: each copy lands at issue or at its wait (seeded); after the wait, always there
    early = []
    for seed in range(1, 4):
        out = emu.device_zeros(512, np.float32)
        with emu.interleave(seed):
            mod.get_function("f_early_read")((1,), (32,), (emu.to_device(x), out))
        np.testing.assert_array_equal(out[128:256], x[:128])
        np.testing.assert_array_equal(out[384:], x[128:])
        assert np.all((out[:128] == -1) | (out[:128] == x[:128]))
        early.append(out[:128] == x[:128])
    early = np.concatenate(early)
    assert early.any() and not early.all()  # some copies landed before their wait, some did not


def test_emu_fresh_shared_memory_is_garbage(mod):
    out = emu.device_zeros(64, np.float32)
    mod.get_function("f_smem_garbage")((1,), (64,), (out,), shared_mem=256)
    assert np.isnan(out).all()


@pytest.mark.parametrize("seed", [None, 7])
def test_emu_deadlock_is_an_error_not_a_hang(mod, seed):
    out = emu.device_zeros(128, np.float32)
    with emu.interleave(seed), pytest.raises(emu.EmulatorError) as ei:
        mod.get_function("f_deadlock")((1,), (128,), (out,))
    msg = str(ei.value)
    assert "f_deadlock" in msg and "deadlock" in msg and "__syncthreads" in msg and "block (0,0,0)" in msg
    _ok_after(mod)


@pytest.mark.parametrize("kernel,block", [("f_partial_shfl", 64), ("f_shfl_vs_barrier", 32)])
def test_emu_partial_warp_collective(mod, kernel, block):
    out = emu.device_zeros(block, np.float32)
    with pytest.raises(emu.EmulatorError) as ei:
        mod.get_function(kernel)((1,), (block,), (out,))
    msg = str(ei.value)
    assert kernel in msg and "partial warp" in msg and "__shfl_xor_sync" in msg
    _ok_after(mod)


def test_emu_collective_in_a_partial_last_warp(mod):
    out = emu.device_zeros(48, np.uint32)
    with pytest.raises(emu.EmulatorError, match="partial warp.*ldmatrix.x1.*do not exist"):
        mod.get_function("f_partial_ldmatrix")((1,), (48,), (out,))
    mod.get_function("f_partial_ldmatrix")((1,), (64,), (emu.device_zeros(64, np.uint32),))
    _ok_after(mod)


def test_emu_exit_with_cp_async_in_flight(mod):
    with pytest.raises(emu.EmulatorError, match=r"f_cp_inflight.*thread \(0,0,0\).*cp.async"):
        mod.get_function("f_cp_inflight")((1,), (32,), (emu.to_device(np.ones(4, np.float32)),))
    _ok_after(mod)


def test_emu_shared_memory_out_of_bounds(mod):
    mod.get_function("f_smem_oob")((1,), (32,), (np.int32(255),), shared_mem=1024)
    with pytest.raises(emu.EmulatorError, match="f_smem_oob.*dynamic shared memory.*byte offset 1024"):
        mod.get_function("f_smem_oob")((1,), (32,), (np.int32(256),), shared_mem=1024)
    _ok_after(mod)


def test_emu_stack_overflow(mod):
    out = emu.device_zeros(1, np.float32)
    with pytest.raises(emu.EmulatorError, match="f_stack.*stack overflow.*CUPY_COSATTN_EMU_STACK"):
        mod.get_function("f_stack")((1,), (32,), (out, np.int32(5)))
    _ok_after(mod)


def test_emu_trap(mod):
    with pytest.raises(emu.EmulatorError, match=r"__trap\(\).*thread \(7,0,0\)"):
        mod.get_function("f_trap")((1,), (32,), (emu.device_zeros(32, np.float32),))


def test_emu_shared_mem_limit(mod):
    k = mod.get_function("f_smem_oob")
    with pytest.raises(emu.EmulatorError, match="max_dynamic_shared_size_bytes"):
        k((1,), (32,), (np.int32(0),), shared_mem=64 * 1024)
    k.max_dynamic_shared_size_bytes = 64 * 1024
    k((1,), (32,), (np.int32(0),), shared_mem=64 * 1024)
    with pytest.raises(emu.EmulatorError, match="invalid launch configuration"):
        k((1,), (2048,), (np.int32(0),))


# ------------------------------------------------------------------------------------------------
# __syncwarp

def _ring_expected(x, rounds, group):
    """After each round lane l holds its neighbour's (l + 1 within its group of `group` lanes) value + 1."""
    v = x.copy()
    idx = np.arange(x.size)
    nb = idx - idx % group + (idx % group + 1) % group
    for _ in range(rounds):
        v = v[nb] + 1
    return v


def test_emu_syncwarp_orders_shared_memory_within_a_warp(mod):
    x = np.arange(128, dtype=np.int32) * 7
    xd = emu.to_device(x)
    exp = _ring_expected(x, 5, 32)
    wrong = {1: 0, 0: 0}
    for seed in (None, 1, 2, 3, 4):
        with emu.interleave(seed):
            out = emu.device_zeros(128, np.int32)
            mod.get_function("w_ring")((1,), (128,), (xd, out, np.int32(5), np.int32(2)))
            np.testing.assert_array_equal(out, exp, err_msg=f"seed {seed}")
            for syncs in (1, 0):
                out = emu.device_zeros(128, np.int32)
                mod.get_function("w_ring")((1,), (128,), (xd, out, np.int32(5), np.int32(syncs)))
                wrong[syncs] += not np.array_equal(out, exp)
    # without the __syncwarp()s the races show: the write-after-read one under most interleavings
    assert wrong[0] == 5 and wrong[1] >= 3, wrong


def test_emu_syncwarp_partial_masks_and_call_sites(mod):
    x = np.arange(32, dtype=np.int32) * 5 + 1
    for seed in (None, 1, 2, 3):
        with emu.interleave(seed):
            out = emu.device_zeros(32, np.int32)
            mod.get_function("w_ring_halves")((1,), (32,), (emu.to_device(x), out, np.int32(7)))
            np.testing.assert_array_equal(out, _ring_expected(x, 7, 16), err_msg=f"seed {seed}")
            out = emu.device_zeros(32, np.int32)
            mod.get_function("w_sites")((1,), (32,), (emu.to_device(x), out))
            wrote = np.where(np.arange(32) < 16, 2 * x, 3 * x)
            np.testing.assert_array_equal(out, wrote[::-1] + np.where(np.arange(32) < 16, 0, 1000))


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("k", [16, 31])
def test_emu_syncwarp_waiting_for_an_exited_lane(mod, k, seed):
    """On the GPU a __syncwarp whose mask names an exited lane is undefined (typically a hang); here
    it is an error naming the kernel, the warp, the lanes and __syncwarp."""
    out = emu.device_zeros(64, np.int32)
    with emu.interleave(seed), pytest.raises(emu.EmulatorError) as ei:
        mod.get_function("w_exited")((1,), (64,), (out, np.int32(k)))
    msg = str(ei.value)
    assert "w_exited" in msg and "partial warp" in msg and "__syncwarp" in msg and "exited" in msg, msg
    assert "0xffffffff" in msg, msg
    _ok_after(mod)


@pytest.mark.parametrize("seed", [None, 5])
@pytest.mark.parametrize("kernel,block,what", [
    ("w_vs_barrier", 32, "__syncthreads"),
    ("w_vs_shfl", 32, "__shfl_xor_sync"),
    ("w_partial_last_warp", 48, "do not exist"),
    ("w_not_self", 32, "does not name the calling lane"),
])
def test_emu_syncwarp_with_a_lane_that_never_arrives(mod, kernel, block, what, seed):
    out = emu.device_zeros(block, np.int32)
    with emu.interleave(seed), pytest.raises(emu.EmulatorError) as ei:
        mod.get_function(kernel)((1,), (block,), (out,))
    msg = str(ei.value)
    assert kernel in msg and "__syncwarp" in msg and what in msg, msg
    _ok_after(mod)


# ------------------------------------------------------------------------------------------------
# arguments

PARAMS = np.dtype([("x", np.uint64), ("y", np.uint64), ("n", np.int32), ("scale", np.float32)], align=True)


def test_emu_params_struct_by_value(mod):
    x = emu.to_device(np.arange(300, dtype=np.float32))
    y = emu.device_zeros(300, np.float32)
    p = np.zeros((), PARAMS)
    p["x"], p["y"], p["n"], p["scale"] = emu.device_ptr(x), emu.device_ptr(y), 300, 0.5
    mod.get_function("a_params")((3,), (128,), (p[()],))
    np.testing.assert_array_equal(y, np.arange(300, dtype=np.float32) * 0.5)


def test_emu_argument_size_mismatch_names_the_argument(mod):
    y = emu.device_zeros(4, np.float64)
    k = mod.get_function("a_scalars")
    k((1,), (1,), (y, np.int32(1), np.int64(2), np.float32(3), np.float64(4)))
    np.testing.assert_array_equal(y, [1, 2, 3, 4])
    with pytest.raises(TypeError, match="argument 1.*4 bytes.*8 bytes"):
        k((1,), (1,), (y, 1, np.int64(2), np.float32(3), np.float64(4)))  # Python int -> int64, as in CuPy
    with pytest.raises(TypeError, match="argument 3"):
        k((1,), (1,), (y, np.int32(1), np.int64(2), np.float64(3), np.float64(4)))
    with pytest.raises(TypeError, match="argument 2.*array"):
        k((1,), (1,), (y, np.int32(1), y, np.float32(3), np.float64(4)))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        k((1,), (1,), (y, np.int32(1)))
    small = np.zeros((), np.dtype([("x", np.uint64), ("n", np.int32)], align=True))
    with pytest.raises(TypeError, match="argument 0.*24 bytes"):
        mod.get_function("a_params")((1,), (32,), (small[()],))


def test_emu_device_arrays():
    a = emu.device_empty((3, 5), np.float16)
    assert a.shape == (3, 5) and a.dtype == np.float16 and emu.is_device_array(a)
    z = emu.device_zeros((7,), ml_dtypes.bfloat16)
    assert (z.astype(np.float32) == 0).all()
    src = np.arange(12, dtype=np.int64).reshape(3, 4)
    d = emu.to_device(src)
    np.testing.assert_array_equal(d, src)
    assert emu.device_ptr(d) % 16 == 0
    assert emu.device_ptr(d[1]) == emu.device_ptr(d) + 32
    assert emu.is_device_array(d[1:]) and not emu.is_device_array(src)
    with pytest.raises(TypeError, match="not a device array"):
        emu.device_ptr(src)
    e = emu.device_empty((0, 4), np.float32)
    assert e.size == 0


def test_emu_name_lookup(mod):
    assert mod.get_function("e_matmul<ca::half_t>") is mod.get_function("e_matmul<ca::half_t>")
    assert mod.get_function("e_matmul< ca::half_t >").num_args == 6
    out = emu.device_zeros(32, np.int32)
    mod.get_function("a_namespaced")((1,), (32,), (out,))
    assert (out == 7).all()
    with pytest.raises(emu.EmulatorError, match="no kernel named"):
        mod.get_function("nope")


def test_emu_options_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_COSATTN_CACHE", str(tmp_path / "cache"))
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "extra.cuh").write_text("#define EXTRA 5\n")
    code = textwrap.dedent("""
        #include "extra.cuh"
        extern "C" __global__ void k(int* out) { out[threadIdx.x] = VALUE * 100 + OTHER * 10 + EXTRA; }
    """)
    opts = ("-DVALUE=7", "--define-macro=OTHER=3", f"-I{inc}", "-arch=sm_90", "-Xptxas=-v", "--use_fast_math")
    out = emu.device_zeros(4, np.int32)
    emu.RawModule(code=code, options=opts).get_function("k")((1,), (4,), (out,))
    assert (out == 735).all()
    sos = list((tmp_path / "cache").glob("mod-*.so"))
    assert len(sos) == 1
    mtime = sos[0].stat().st_mtime_ns
    emu.RawModule(code=code, options=opts).get_function("k")((1,), (4,), (out,))
    assert sos[0].stat().st_mtime_ns == mtime
    # a changed included header is a different build
    (inc / "extra.cuh").write_text("#define EXTRA 6\n")
    emu.RawModule(code=code, options=opts).get_function("k")((1,), (4,), (out,))
    assert (out == 736).all()
    assert len(list((tmp_path / "cache").glob("mod-*.so"))) == 2
    with pytest.raises(emu.EmulatorError, match="building an emulated module"):
        emu.RawModule(code="__global__ void broken( {", options=()).get_function("broken")


def test_emu_interleave_settings():
    # tests/conftest.py turns the mode on unless CUPY_COSATTN_EMU_INTERLEAVE says otherwise
    if os.environ.get("CUPY_COSATTN_EMU_INTERLEAVE", "").strip().lower() not in ("", "off", "none", "no", "false"):
        assert emu.get_interleave() is not None
    old = emu.get_interleave()
    emu.set_interleave(None)
    assert emu.get_interleave() is None
    emu.set_interleave(5)
    with emu.interleave(9):
        assert emu.get_interleave() == 9
    assert emu.get_interleave() == 5
    emu.set_interleave(old)


def test_emu_module_does_not_import_cupy():
    code = "import sys, cupy_cosattn.emulator; print('cupy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.stdout.strip() == "False", r.stderr


# ------------------------------------------------------------------------------------------------
# speed

def test_emu_speed_mma_loop(mod):
    iters = 4096
    out = emu.device_zeros(128 * 4, np.float32)
    t0 = time.perf_counter()
    mod.get_function("s_mma_loop")((1,), (128,), (out, np.int32(iters)))
    dt = time.perf_counter() - t0
    assert (out == iters).all()  # each mma adds 16 * 1.0 * 2^-4 = 1
    assert dt < 20, f"4 warps x {iters} mma took {dt:.1f} s"


def test_emu_null_pointer_dereference(mod):
    out = emu.device_zeros(1, np.float32)
    with pytest.raises(emu.EmulatorError, match=r"f_oob_read.*thread \(5,0,0\).*invalid memory access.*0x10"):
        mod.get_function("f_oob_read")((1,), (32,), (None, out, np.int32(0), np.int32(4)))
    _ok_after(mod)
