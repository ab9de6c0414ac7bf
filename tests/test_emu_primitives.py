"""Emulator self-tests, part 1: every warp-level primitive of cuda_src/common.cuh, checked register by
register against the PTX ISA fragment tables, which are re-written here (independently of the C++)
from the PTX ISA documentation:

- ldmatrix (PTX ISA "ldmatrix"): for .x1/.x2/.x4, the 8 row addresses of matrix i come from lanes
  8i..8i+7; each row is 8 b16 elements. Thread l receives, in register i, elements (row l/4, columns
  2(l%4) and 2(l%4)+1) of matrix i; with .trans, elements (rows 2(l%4) and 2(l%4)+1, column l/4).
  The element with the smaller column (row, with .trans) index sits in the lower 16 bits.
- mma.m16n8k16 (.f16/.bf16), "Matrix fragments for mma.m16n8k16 with floating point type", with
  groupID = l >> 2, threadID_in_group = l % 4, element index i counting 16-bit halves:
    A (a0..a7): row = groupID if i < 2 or 4 <= i < 6 else groupID + 8;
                col = 2*tig + (i & 1) if i < 4 else 2*tig + (i & 1) + 8
    B (b0..b3): row = 2*tig + (i & 1) if i < 2 else 2*tig + (i & 1) + 8; col = groupID
    C/D (c0..c3): row = groupID if i < 2 else groupID + 8; col = 2*tig + (i & 1)
- mma.m16n8k8 .tf32: A (a0..a3): row = groupID for a0, a2, groupID + 8 for a1, a3;
  col = tig for a0, a1, tig + 4 for a2, a3. B (b0, b1): row = tig for b0, tig + 4 for b1; col = groupID.
  C/D as above.

Each kernel loads per-lane registers from global memory, calls the ca:: primitive, and stores the
per-lane results, so the test sees the registers themselves, not only a product.
"""
import ml_dtypes
import numpy as np
import pytest

from cupy_cosattn import emulator as emu

SRC = r"""
#include "common.cuh"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

template <int N, bool TRANS>
__global__ void t_ldmatrix(const uint16_t* rows, const int* row_of_lane, uint32_t* out) {
  // 32 rows of 8 halves in shared memory; lane l points at row row_of_lane[l].
  __shared__ __align__(16) uint16_t sm[32 * 8];
  int l = threadIdx.x;
  for (int j = 0; j < 8; ++j) sm[l * 8 + j] = rows[l * 8 + j];
  __syncthreads();
  uint32_t r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
  const void* p = sm + row_of_lane[l] * 8;
  if (N == 1) { if (TRANS) ca::ldmatrix_x1_trans(r, p); else ca::ldmatrix_x1(r, p); }
  if (N == 2) { if (TRANS) ca::ldmatrix_x2_trans(r, p); else ca::ldmatrix_x2(r, p); }
  if (N == 4) { if (TRANS) ca::ldmatrix_x4_trans(r, p); else ca::ldmatrix_x4(r, p); }
  for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}

template <class T>
__global__ void t_mma16(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  int l = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[l * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[l * 2 + i];
  for (int i = 0; i < 4; ++i) acc[i] = c[l * 4 + i];
  ca::mma_m16n8k16(acc, ra, rb, T{});
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = acc[i];
}

extern "C" __global__ void t_mma_tf32(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  int l = threadIdx.x;
  uint32_t ra[4], rb[2];
  float acc[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[l * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[l * 2 + i];
  for (int i = 0; i < 4; ++i) acc[i] = c[l * 4 + i];
  ca::mma_m16n8k8_tf32(acc, ra, rb);
  for (int i = 0; i < 4; ++i) d[l * 4 + i] = acc[i];
}

template <class T>
__global__ void t_shfl(const T* in, T* out, int mode, int b, int width) {
  int l = threadIdx.x;
  T v = in[l], r;
  if (mode == 0) r = __shfl_sync(0xffffffffu, v, b, width);
  else if (mode == 1) r = __shfl_up_sync(0xffffffffu, v, (unsigned)b, width);
  else if (mode == 2) r = __shfl_down_sync(0xffffffffu, v, (unsigned)b, width);
  else r = __shfl_xor_sync(0xffffffffu, v, b, width);
  out[l] = r;
}

// Two halves of the warp shuffle separately, each with its own member mask.
extern "C" __global__ void t_shfl_halves(const int* in, int* out) {
  int l = threadIdx.x;
  int v = in[l];
  if (l < 16) out[l] = __shfl_xor_sync(0x0000ffffu, v, 1);
  else out[l] = __shfl_down_sync(0xffff0000u, v, 2, 16);
}

extern "C" __global__ void t_quad(const float* in, float* out) {
  int l = threadIdx.x;
  out[l] = ca::quad_sum(in[l]);
  out[32 + l] = ca::quad_max(in[l]);
  out[64 + l] = ca::warp_sum(in[l]);
}

extern "C" __global__ void t_vote(const int* pred, unsigned* out) {
  int l = threadIdx.x;
  out[l] = __ballot_sync(0xffffffffu, pred[l]);
  out[32 + l] = __any_sync(0xffffffffu, pred[l]);
  out[64 + l] = __all_sync(0xffffffffu, pred[l]);
}

extern "C" __global__ void t_convert(const float* x, const uint16_t* h, int n, uint16_t* f16, uint16_t* bf16,
                                     uint32_t* tf32, float* h2f, float* bf2f, uint32_t* packed) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  f16[i] = ca::from_float<ca::half_t>(x[i]).bits;
  bf16[i] = ca::from_float<ca::bf16_t>(x[i]).bits;
  tf32[i] = ca::to_tf32(x[i]);
  ca::half_t hh; hh.bits = h[i];
  ca::bf16_t bb; bb.bits = h[i];
  h2f[i] = ca::to_float(hh);
  bf2f[i] = ca::to_float(bb);
  packed[i] = ca::pack2<ca::half_t>(x[i], -x[i]);
}

// The cuda_fp16.h / cuda_bf16.h spelling: __half and __nv_bfloat16 arrays, scalars and conversions.
extern "C" __global__ void t_cuda_fp16(const float* x, const __half* h, const __nv_bfloat16* b, int n,
                                       __half* f16, __nv_bfloat16* bf16, float* h2f, float* b2f,
                                       uint32_t* implicit_ok, __half hs, __nv_bfloat16 bs, float* scalars) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i == 0) {
    scalars[0] = __half2float(hs);
    scalars[1] = __bfloat162float(bs);
  }
  if (i >= n) return;
  f16[i] = __float2half_rn(x[i]);
  bf16[i] = __float2bfloat16_rn(x[i]);
  h2f[i] = __half2float(h[i]);
  b2f[i] = __bfloat162float(b[i]);
  // the other spellings give the same bits: __float2half, the implicit conversions, raw access
  __half hi = x[i];
  __nv_bfloat16 bi = x[i];
  float hw = h[i], bw = b[i];
  uint32_t ok = 0;
  ok |= (__half_as_ushort(__float2half(x[i])) == __half_as_ushort(f16[i])) << 0;
  ok |= (__half_as_ushort(hi) == __half_as_ushort(f16[i])) << 1;
  ok |= (__bfloat16_as_ushort(__float2bfloat16(x[i])) == __bfloat16_as_ushort(bf16[i])) << 2;
  ok |= (__bfloat16_as_ushort(bi) == __bfloat16_as_ushort(bf16[i])) << 3;
  ok |= (__float_as_uint(hw) == __float_as_uint(h2f[i])) << 4;
  ok |= (__float_as_uint(bw) == __float_as_uint(b2f[i])) << 5;
  ok |= (static_cast<__half_raw>(f16[i]).x == __half_as_ushort(f16[i])) << 6;
  ok |= (__half_as_ushort(__ushort_as_half(0x3c00)) == 0x3c00 && (float)__ushort_as_half(0x3c00) == 1.0f) << 7;
  half alias = __float2half_rn(2.0f);
  nv_bfloat16 balias = __float2bfloat16_rn(2.0f);
  ok |= ((float)alias == 2.0f && (float)balias == 2.0f) << 8;
  implicit_ok[i] = ok;
}
"""

NAMES = [f"t_ldmatrix<{n}, {str(t).lower()}>" for n in (1, 2, 4) for t in (False, True)] + [
    "t_mma16<ca::half_t>", "t_mma16<ca::bf16_t>",
    "t_shfl<int>", "t_shfl<unsigned>", "t_shfl<float>", "t_shfl<long long>", "t_shfl<double>"]


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_80"), name_expressions=NAMES)


# ------------------------------------------------------------------------------------------------
# ldmatrix

def _ldmatrix_expected(rows, row_of_lane, n, trans):
    """Per-lane registers from the PTX ldmatrix description (see the module docstring)."""
    exp = np.full((32, 4), 0xDEADBEEF, dtype=np.uint32)
    for i in range(n):
        # matrix i: row r is the 16 bytes at the address given by lane 8i + r
        mat = np.stack([rows[row_of_lane[8 * i + r]] for r in range(8)])  # (8, 8) uint16
        for lane in range(32):
            if not trans:
                lo, hi = mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1]
            else:
                lo, hi = mat[2 * (lane % 4), lane // 4], mat[2 * (lane % 4) + 1, lane // 4]
            exp[lane, i] = int(lo) | (int(hi) << 16)
    return exp


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_emu_ldmatrix_registers(mod, n, trans):
    rng = np.random.default_rng(10 * n + trans)
    rows = rng.integers(0, 2**16, size=(32, 8), dtype=np.uint16)
    row_of_lane = rng.permutation(32).astype(np.int32)
    out = emu.device_zeros((32, 4), np.uint32)
    k = mod.get_function(f"t_ldmatrix<{n}, {str(trans).lower()}>")
    k((1,), (32,), (emu.to_device(rows), emu.to_device(row_of_lane), out))
    exp = _ldmatrix_expected(rows, row_of_lane, n, trans)
    np.testing.assert_array_equal(out[:, :n], exp[:, :n])
    # registers beyond x{n} are untouched
    assert (out[:, n:] == 0xDEADBEEF).all()


def test_emu_ldmatrix_lane0_row0_layout(mod):
    """Spot values straight from the PTX figure: x1, lane 0 gets row 0 elements 0,1; lane 5 gets
    row 1 elements 2,3; with .trans lane 5 gets rows 2,3 of column 1."""
    rows = (np.arange(32 * 8, dtype=np.uint16).reshape(32, 8))  # element (r, c) = 8 r + c
    row_of_lane = np.arange(32, dtype=np.int32)
    out = emu.device_zeros((32, 4), np.uint32)
    mod.get_function("t_ldmatrix<1, false>")((1,), (32,), (emu.to_device(rows), emu.to_device(row_of_lane), out))
    assert out[0, 0] == (0 | 1 << 16)
    assert out[5, 0] == (10 | 11 << 16)
    mod.get_function("t_ldmatrix<1, true>")((1,), (32,), (emu.to_device(rows), emu.to_device(row_of_lane), out))
    assert out[5, 0] == (8 * 2 + 1 | (8 * 3 + 1) << 16)


# ------------------------------------------------------------------------------------------------
# mma

def _frag_m16n8k16(A, B, C):
    """Per-lane registers of A (16x16), B (16x8) as 16-bit patterns, and C (16x8 fp32)."""
    a = np.zeros((32, 8), np.uint16)
    b = np.zeros((32, 4), np.uint16)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(8):
            row = gid if (i < 2 or 4 <= i < 6) else gid + 8
            col = 2 * tig + (i & 1) + (8 if i >= 4 else 0)
            a[lane, i] = A[row, col]
        for i in range(4):
            row = 2 * tig + (i & 1) + (8 if i >= 2 else 0)
            b[lane, i] = B[row, gid]
        for i in range(4):
            row = gid if i < 2 else gid + 8
            c[lane, i] = C[row, 2 * tig + (i & 1)]
    # pairs of halves -> 32-bit registers, lower half = lower element index
    a32 = a[:, 0::2].astype(np.uint32) | (a[:, 1::2].astype(np.uint32) << 16)
    b32 = b[:, 0::2].astype(np.uint32) | (b[:, 1::2].astype(np.uint32) << 16)
    return a32, b32, c


def _unfrag_c(d):
    D = np.zeros((16, 8), np.float32)
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(4):
            D[gid if i < 2 else gid + 8, 2 * tig + (i & 1)] = d[lane, i]
    return D


@pytest.mark.parametrize("dt,name", [(np.float16, "t_mma16<ca::half_t>"), (ml_dtypes.bfloat16, "t_mma16<ca::bf16_t>")])
def test_emu_mma_m16n8k16_registers(mod, dt, name):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((16, 16)).astype(dt)
    B = rng.standard_normal((16, 8)).astype(dt)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a, b, c = _frag_m16n8k16(A.view(np.uint16), B.view(np.uint16), C)
    d = emu.device_zeros((32, 4), np.float32)
    mod.get_function(name)((1,), (32,), (emu.to_device(a), emu.to_device(b), emu.to_device(c), d))
    exp = (A.astype(np.float64) @ B.astype(np.float64) + C.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_unfrag_c(d), exp, rtol=1e-6, atol=1e-6)
    # per-lane check too: lane l's d registers hold its C/D fragment elements
    exp_frag = _frag_m16n8k16(np.zeros((16, 16), np.uint16), np.zeros((16, 8), np.uint16), exp)[2]
    np.testing.assert_allclose(d, exp_frag, rtol=1e-6, atol=1e-6)


def test_emu_mma_m16n8k16_single_element(mod):
    """One nonzero product lands exactly where the table says: A[r, k] * B[k, n] -> D[r, n]."""
    for (r, kk, n) in [(0, 0, 0), (9, 13, 5), (15, 8, 7), (3, 7, 2), (12, 1, 0), (4, 10, 3)]:
        A = np.zeros((16, 16), np.float16)
        B = np.zeros((16, 8), np.float16)
        A[r, kk] = 3.0
        B[kk, n] = -2.0
        a, b, c = _frag_m16n8k16(A.view(np.uint16), B.view(np.uint16), np.zeros((16, 8), np.float32))
        d = emu.device_zeros((32, 4), np.float32)
        mod.get_function("t_mma16<ca::half_t>")((1,), (32,), (emu.to_device(a), emu.to_device(b), emu.to_device(c), d))
        D = _unfrag_c(d)
        assert D[r, n] == -6.0 and np.count_nonzero(D) == 1


def test_emu_mma_m16n8k8_tf32_registers(mod):
    rng = np.random.default_rng(4)
    A = rng.standard_normal((16, 8)).astype(np.float32)
    B = rng.standard_normal((8, 8)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a = np.zeros((32, 4), np.float32)
    b = np.zeros((32, 2), np.float32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        gid, tig = lane >> 2, lane % 4
        for i in range(4):
            row = gid if i in (0, 2) else gid + 8
            col = tig if i in (0, 1) else tig + 4
            a[lane, i] = A[row, col]
        b[lane, 0] = B[tig, gid]
        b[lane, 1] = B[tig + 4, gid]
        for i in range(4):
            c[lane, i] = C[gid if i < 2 else gid + 8, 2 * tig + (i & 1)]
    d = emu.device_zeros((32, 4), np.float32)
    # raw fp32 bit patterns are passed: the low 13 mantissa bits must be ignored
    mod.get_function("t_mma_tf32")((1,), (32,), (emu.to_device(a.view(np.uint32)), emu.to_device(b.view(np.uint32)),
                                                 emu.to_device(c), d))

    def trunc(x):
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)

    exp = (trunc(A) @ trunc(B) + C.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_unfrag_c(d), exp, rtol=1e-6, atol=1e-6)
    full = (A.astype(np.float64) @ B.astype(np.float64) + C).astype(np.float32)
    assert not np.allclose(_unfrag_c(d), full, rtol=1e-7, atol=0)  # truncation is visible


# ------------------------------------------------------------------------------------------------
# shuffles and votes (CUDA programming guide semantics for the width argument)

def _shfl_expected(v, mode, b, w):
    out = v.copy()
    for lane in range(32):
        if mode == 0:
            src = (lane // w) * w + (b % w)
        elif mode == 1:
            src = lane - b if (lane % w) - b >= 0 else lane
        elif mode == 2:
            src = lane + b if (lane % w) + b < w else lane
        else:
            src = lane ^ b
            if src // w > lane // w:  # later groups are not accessible: own value
                src = lane
        out[lane] = v[src]
    return out


@pytest.mark.parametrize("tname,dt", [("int", np.int32), ("unsigned", np.uint32), ("float", np.float32),
                                      ("long long", np.int64), ("double", np.float64)])
def test_emu_shuffles(mod, tname, dt):
    rng = np.random.default_rng(5)
    if np.issubdtype(dt, np.integer):
        v = rng.integers(-2**31 if dt != np.uint32 else 0, 2**31, size=32).astype(dt)
        if dt == np.int64:
            v = v * np.int64(2**31 + 7)
    else:
        v = rng.standard_normal(32).astype(dt)
    k = mod.get_function(f"t_shfl<{tname}>")
    vin = emu.to_device(v)
    out = emu.device_zeros(32, dt)
    cases = [(0, 0, 32), (0, 5, 32), (0, 37, 32), (0, 3, 8), (0, 9, 4), (1, 1, 32), (1, 4, 16), (1, 3, 8),
             (2, 1, 32), (2, 7, 16), (2, 2, 4), (3, 1, 32), (3, 16, 32), (3, 5, 8), (3, 8, 8), (3, 24, 16)]
    for mode, b, w in cases:
        k((1,), (32,), (vin, out, np.int32(mode), np.int32(b), np.int32(w)))
        np.testing.assert_array_equal(out, _shfl_expected(v, mode, b, w), err_msg=f"mode {mode} b {b} width {w}")


def test_emu_shuffle_disjoint_masks(mod):
    v = np.arange(100, 132, dtype=np.int32)
    out = emu.device_zeros(32, np.int32)
    mod.get_function("t_shfl_halves")((1,), (32,), (emu.to_device(v), out))
    exp = np.empty(32, np.int32)
    for lane in range(16):
        exp[lane] = v[lane ^ 1]
    for lane in range(16, 32):
        exp[lane] = v[lane + 2] if (lane % 16) + 2 < 16 else v[lane]
    np.testing.assert_array_equal(out, exp)


def test_emu_quad_and_warp_reductions(mod):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(32).astype(np.float32)
    out = emu.device_zeros(96, np.float32)
    mod.get_function("t_quad")((1,), (32,), (emu.to_device(x), out))
    q = x.reshape(8, 4)
    np.testing.assert_allclose(out[:32], np.repeat(q.sum(1), 4), rtol=1e-6)
    np.testing.assert_array_equal(out[32:64], np.repeat(q.max(1), 4))
    np.testing.assert_allclose(out[64:], np.full(32, x.astype(np.float64).sum()), rtol=1e-5)
    assert len(set(out[64:].tolist())) == 1  # butterfly: every lane has the same bits


def test_emu_votes(mod):
    pred = np.array([(i * 7) % 3 == 0 for i in range(32)], np.int32)
    out = emu.device_zeros(96, np.uint32)
    mod.get_function("t_vote")((1,), (32,), (emu.to_device(pred), out))
    ballot = sum(1 << i for i in range(32) if pred[i])
    assert (out[:32] == ballot).all()
    assert (out[32:64] == 1).all()
    assert (out[64:] == 0).all()


# ------------------------------------------------------------------------------------------------
# conversions

def _tf32_rna_reference(x):
    """Round to 10 explicit mantissa bits, ties away from zero, computed in float64 arithmetic."""
    out = np.empty_like(x)
    for i, v in enumerate(x.astype(np.float64)):
        if not np.isfinite(v) or v == 0:
            out[i] = np.float32(v)
            continue
        _, e = np.frexp(abs(v))           # |v| = m * 2^e, m in [0.5, 1)
        q = 2.0 ** max(e - 11, -136)      # tf32 quantum (fp32 subnormal range: 2^-149 * 2^13)
        r = np.floor(abs(v) / q + 0.5) * q
        out[i] = np.float32(np.copysign(r, v)) if r < 2.0 ** 128 else np.float32(np.copysign(np.inf, v))
    return out


def _conversion_inputs():
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(3000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 3000)]
    # exact ties between neighbouring halfs (normal and subnormal), and between bf16 / tf32 neighbours
    h = rng.integers(0, 0x7BFF, 2000).astype(np.uint16)
    lo = h.view(np.float16).astype(np.float64)
    hi = (h + 1).view(np.float16).astype(np.float64)
    xs.append(((lo + hi) / 2).astype(np.float32))
    sub = np.arange(0, 0x400, 7, dtype=np.uint16)
    xs.append(((sub.view(np.float16).astype(np.float64) + (sub + 1).view(np.float16).astype(np.float64)) / 2)
              .astype(np.float32))
    bits = rng.integers(0, 2**32, 2000, dtype=np.uint64).astype(np.uint32)
    xs.append(((bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32))  # bf16 ties
    xs.append(((bits & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32))  # tf32 ties
    xs.append(bits.view(np.float32))  # anything, including nan/inf/fp32 subnormals
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.0**-24,
               2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 5.96e-8, 6.1e-5, 6.097555e-5, 3.4028235e38, 1e-45,
               -1e-40, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    xs.append(np.array(special, np.float32))
    xs = [np.nan_to_num(a, nan=np.nan) for a in xs]
    with np.errstate(all="ignore"):
        x = np.concatenate(xs).astype(np.float32)
    return np.concatenate([x, -x])


def test_emu_conversions(mod):
    x = _conversion_inputs()
    n = x.size
    allh = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    hbits = np.resize(allh, max(n, 2**16))[:n] if n >= 2**16 else allh[:n]
    outs = [emu.device_zeros(n, dt) for dt in (np.uint16, np.uint16, np.uint32, np.float32, np.float32, np.uint32)]
    mod.get_function("t_convert")(((n + 127) // 128,), (128,), (emu.to_device(x), emu.to_device(hbits),
                                                                 np.int32(n), *outs))
    f16, bf16, tf32, h2f, bf2f, packed = outs
    with np.errstate(all="ignore"):
        exp_h = x.astype(np.float16)
        exp_b = x.astype(ml_dtypes.bfloat16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(f16[~nan], exp_h.view(np.uint16)[~nan])
    assert (f16[nan] == 0x7FFF).all()  # the GPU's canonical NaN
    np.testing.assert_array_equal(bf16[~nan], exp_b.view(np.uint16)[~nan])
    assert (bf16[nan] == 0x7FFF).all()
    exp_t = _tf32_rna_reference(x)
    np.testing.assert_array_equal(tf32[~nan], exp_t.view(np.uint32)[~nan])
    assert np.isnan(tf32.view(np.float32)[nan]).all()
    assert ((tf32 & 0x1FFF) == 0).all()
    # widening: exact, bit for bit against numpy / ml_dtypes; a binary16 NaN gives the canonical NaN
    hnan = np.isnan(hbits.view(np.float16))
    np.testing.assert_array_equal(h2f.view(np.uint32)[~hnan],
                                  hbits.view(np.float16).astype(np.float32).view(np.uint32)[~hnan])
    assert (h2f.view(np.uint32)[hnan] == 0x7FFFFFFF).all()
    bfw = hbits.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(bf2f.view(np.uint32)[~np.isnan(bfw)], bfw.view(np.uint32)[~np.isnan(bfw)])
    assert np.isnan(bf2f[np.isnan(bfw)]).all()
    # pack2: lower 16 bits = first (smaller-column) element
    with np.errstate(all="ignore"):
        exp_p = (x.astype(np.float16).view(np.uint16).astype(np.uint32)
                 | ((-x).astype(np.float16).view(np.uint16).astype(np.uint32) << 16))
    np.testing.assert_array_equal(packed[~nan], exp_p[~nan])


def test_emu_cuda_fp16_bf16_types(mod):
    """__half / __nv_bfloat16 (cuda_fp16.h / cuda_bf16.h) under the emulator: __float2half_rn and
    __float2bfloat16_rn bit for bit against NumPy float16 and ml_dtypes.bfloat16 over ties (normal and
    subnormal), subnormals, overflow to inf, inf and fp32 noise; NaN gives the GPU's canonical NaN
    0x7fff. __half2float over every binary16 pattern (exact; NaN -> 0x7fffffff) and __bfloat162float
    over every bfloat16 pattern (a bit move, NaN payloads kept)."""
    # binary16 results by hand: ties to even, the largest finite, overflow, the subnormal range
    spot = {1.0 + 2.0**-11: 0x3C00, 1.0 + 3 * 2.0**-11: 0x3C02, 65504.0: 0x7BFF, 65519.0: 0x7BFF,
            65520.0: 0x7C00, -65520.0: 0xFC00, 1e6: 0x7C00, 2.0**-24: 0x0001, 2.0**-25: 0x0000,
            2.0**-24 * 1.5: 0x0002, 2.0**-24 * 2.5: 0x0002, 2.0**-14 - 2.0**-25: 0x0400, -0.0: 0x8000}
    x = _conversion_inputs()
    extra = np.array([np.inf, -np.inf, 3.3895314e38, 3.4028235e38, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, *spot],
                     np.float32)
    # NaNs of both signs, quiet and signalling, with payloads
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FC01234],
                    np.uint32).view(np.float32)
    x = np.concatenate([x, extra, nans])
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    n = max(x.size, patterns.size)
    x = np.resize(x, n)
    hb = np.resize(patterns, n)
    f16 = emu.device_zeros(n, np.float16)
    bf16 = emu.device_zeros(n, ml_dtypes.bfloat16)
    h2f = emu.device_zeros(n, np.float32)
    b2f = emu.device_zeros(n, np.float32)
    ok = emu.device_zeros(n, np.uint32)
    scalars = emu.device_zeros(2, np.float32)
    mod.get_function("t_cuda_fp16")(((n + 255) // 256,), (256,), (
        emu.to_device(x), emu.to_device(hb.view(np.float16)), emu.to_device(hb.view(ml_dtypes.bfloat16)),
        np.int32(n), f16, bf16, h2f, b2f, ok, np.float16(-1.5), ml_dtypes.bfloat16(3.25), scalars))
    nan = np.isnan(x)
    assert nan.any() and np.isinf(x).any() and (np.abs(x[~nan]) > 65520).any()
    with np.errstate(all="ignore"):
        exp_h = x.astype(np.float16).view(np.uint16)
        exp_b = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    got_h, got_b = f16.view(np.uint16), bf16.view(np.uint16)
    np.testing.assert_array_equal(got_h[~nan], exp_h[~nan])
    np.testing.assert_array_equal(got_b[~nan], exp_b[~nan])
    assert (got_h[nan] == 0x7FFF).all() and (got_b[nan] == 0x7FFF).all()
    for v, bits in spot.items():
        i = np.flatnonzero(x.view(np.uint32) == np.float32(v).view(np.uint32))[0]
        assert got_h[i] == bits, (v, hex(got_h[i]))
    # widening: every pattern
    hnan = np.isnan(hb.view(np.float16))
    exp_hw = hb.view(np.float16).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(h2f.view(np.uint32)[~hnan], exp_hw[~hnan])
    assert (h2f.view(np.uint32)[hnan] == 0x7FFFFFFF).all()
    bnan = np.isnan(hb.view(ml_dtypes.bfloat16).astype(np.float32))
    exp_bw = hb.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(b2f.view(np.uint32)[~bnan], exp_bw[~bnan])
    np.testing.assert_array_equal(b2f.view(np.uint32), hb.astype(np.uint32) << 16)
    # the other spellings agree, and by-value __half / __nv_bfloat16 arguments arrive intact
    assert (ok == 0x1FF).all(), np.unique(ok)
    np.testing.assert_array_equal(scalars, [-1.5, 3.25])


def test_emu_f16_all_patterns_roundtrip(mod):
    """Every binary16 pattern widens exactly and narrows back to itself (a NaN becomes the canonical
    NaN, 0x7fffffff widened and 0x7fff narrowed)."""
    h = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = h.view(np.float16).astype(np.float32)
    n = h.size
    outs = [emu.device_zeros(n, dt) for dt in (np.uint16, np.uint16, np.uint32, np.float32, np.float32, np.uint32)]
    mod.get_function("t_convert")(((n + 255) // 256,), (256,), (emu.to_device(x), emu.to_device(h), np.int32(n), *outs))
    f16, _, _, h2f, _, _ = outs
    nan = np.isnan(x)
    np.testing.assert_array_equal(f16[~nan], h[~nan])
    assert (f16[nan] == 0x7FFF).all()
    np.testing.assert_array_equal(h2f.view(np.uint32)[~nan], x.view(np.uint32)[~nan])
    assert (h2f.view(np.uint32)[nan] == 0x7FFFFFFF).all()
