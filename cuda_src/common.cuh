// common.cuh — the one place where cupy-cosattn kernels touch hardware-specific instructions.
//
// Every warp-level primitive the kernels use sits behind a small inline function here. Under NVRTC
// (the GPU build) each is a line of inline PTX; under the CPU emulator (CA_EMULATOR defined, see
// cuda_src/emu/) each calls the emulator's C++ model of the same instruction, written from the PTX
// ISA's fragment tables. Nothing else in a kernel differs between the two builds.
//
// Fragment layouts used throughout (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 (the "group") and t = lane % 4 (the "thread in group"):
//   A (16x16, row-major, 4 regs of 2 halves): a0 = (g, 2t..2t+1)   a1 = (g+8, 2t..2t+1)
//                                              a2 = (g, 2t+8..+9)  a3 = (g+8, 2t+8..+9)
//   B (16x8, "col", 2 regs of 2 halves):      b0 = (k 2t..2t+1, n g)  b1 = (k 2t+8..+9, n g)
//   C/D (16x8 fp32, 4 floats):                c0,c1 = (g, 2t..2t+1)   c2,c3 = (g+8, 2t..2t+1)
// m16n8k8 tf32: A a0 = (g, t) a1 = (g+8, t) a2 = (g, t+4) a3 = (g+8, t+4); B b0 = (k t, n g)
//   b1 = (k t+4, n g); C as above.
#pragma once

#ifdef CA_EMULATOR
#include "emu/shim.h"
#define CA_DEVICE inline
#else
#define CA_DEVICE __device__ __forceinline__
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#endif

// Dynamic shared memory: one byte array per block, carved up by the kernel.
#ifdef CA_EMULATOR
#define CA_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared_memory()
#else
#define CA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace ca {

// ---------------------------------------------------------------------------------------------
// Element types. Storage is the raw 16-bit pattern, so no CUDA header (cuda_fp16.h) is needed
// under NVRTC and the emulator sees the same bits the GPU does.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

CA_DEVICE float to_float(float x) { return x; }

CA_DEVICE float to_float(half_t x) {
#ifdef CA_EMULATOR
  return emu::f16_to_f32(x.bits);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
#endif
}

CA_DEVICE float to_float(bf16_t x) {
  // bf16 is the top half of an fp32: widening is exact, so both builds share this line.
  unsigned int u = ((unsigned int)x.bits) << 16;
  float f;
#ifdef CA_EMULATOR
  __builtin_memcpy(&f, &u, 4);
#else
  f = __uint_as_float(u);
#endif
  return f;
}

// Round-to-nearest-even narrowing, and the packed pairs that mma operands are made of
// (the lower 16 bits hold the element with the smaller column index).
template <typename T> CA_DEVICE T from_float(float x);

template <> CA_DEVICE float from_float<float>(float x) { return x; }

template <> CA_DEVICE half_t from_float<half_t>(float x) {
  half_t h;
#ifdef CA_EMULATOR
  h.bits = emu::f32_to_f16_rn(x);
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#endif
  return h;
}

template <> CA_DEVICE bf16_t from_float<bf16_t>(float x) {
  bf16_t h;
#ifdef CA_EMULATOR
  h.bits = emu::f32_to_bf16_rn(x);
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
#endif
  return h;
}

template <typename T>
CA_DEVICE uint32_t pack2(float lo, float hi) {
  return (uint32_t)from_float<T>(lo).bits | ((uint32_t)from_float<T>(hi).bits << 16);
}
#ifndef CA_EMULATOR
// On the GPU one packed conversion does both halves (same round-to-nearest-even result as two
// scalar cvt.rn; the packed form's first source goes to the upper half).
template <> CA_DEVICE uint32_t pack2<half_t>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> CA_DEVICE uint32_t pack2<bf16_t>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif

// The fp32 whose bit pattern is u (tf32 values are fp32 bit patterns with the low 13 bits zero).
CA_DEVICE float bits_as_float(uint32_t u) {
#ifdef CA_EMULATOR
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

// The bit pattern of an fp32.
CA_DEVICE uint32_t float_bits(float x) {
#ifdef CA_EMULATOR
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#else
  return __float_as_uint(x);
#endif
}

CA_DEVICE float neg_inf() { return bits_as_float(0xff800000u); }
CA_DEVICE float pos_inf() { return bits_as_float(0x7f800000u); }

// exp(x) = exp2(x * LOG2E): the kernels work in log2 units (one FFMA + one ex2 per element).
constexpr float LOG2E = 1.4426950408889634f;

// Set an accumulator tile (M fragments of N registers) to zero.
template <int M, int N>
CA_DEVICE void fill_zero(float (&a)[M][N]) {
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int e = 0; e < N; ++e) a[m][e] = 0.f;
}

// Element i of an array that holds either fp32 or T (a bias has q's dtype or float32), as float.
template <typename T>
CA_DEVICE float load_f32_or(const void* base, int64_t i, bool is_f32) {
  return is_f32 ? static_cast<const float*>(base)[i] : to_float(static_cast<const T*>(base)[i]);
}

// One 16-byte move (the unit of cp.async and of the kernels' vectorized global stores); both
// pointers must be 16-byte aligned.
struct alignas(16) bytes16 { uint32_t w[4]; };
CA_DEVICE void copy16(void* dst, const void* src) {
  *static_cast<bytes16*>(dst) = *static_cast<const bytes16*>(src);
}

// fp32 -> tf32 (round to nearest, ties away from zero), as the value's fp32 bit pattern.
CA_DEVICE uint32_t to_tf32(float x) {
#ifdef CA_EMULATOR
  return emu::f32_to_tf32_rna(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

// 2^x. On the GPU the SFU's ex2.approx (max relative error 2^-22 over the whole range), which is
// the fast path for softmax; the emulator uses the correctly rounded exp2f.
CA_DEVICE float exp2_fast(float x) {
#ifdef CA_EMULATOR
  return emu::exp2_approx(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix: lanes 8i..8i+7 give the row addresses (16 bytes each, in shared memory) of matrix i;
// register i of every lane receives its piece of matrix i (row lane/4, columns 2(lane%4)..+1, or
// the transpose with .trans). x1 reads addresses from lanes 0-7, x2 from lanes 0-15.
#ifndef CA_EMULATOR
CA_DEVICE uint32_t smem_u32(const void* p) {
  uint32_t a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
#endif

CA_DEVICE void ldmatrix_x1(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 1, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_u32(row)));
#endif
}
CA_DEVICE void ldmatrix_x2(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 2, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
#endif
}
CA_DEVICE void ldmatrix_x4(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 4, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
#endif
}
CA_DEVICE void ldmatrix_x1_trans(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 1, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(smem_u32(row)));
#endif
}
CA_DEVICE void ldmatrix_x2_trans(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 2, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
#endif
}
CA_DEVICE void ldmatrix_x4_trans(uint32_t* r, const void* row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 4, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row)));
#endif
}

// Shared-memory addresses as values: the 32-bit shared-window address on the GPU (taken once per
// buffer with cvta; a constant offset then folds into the instruction's immediate), the host pointer
// in the emulator. Both take byte offsets with +.
#ifdef CA_EMULATOR
typedef unsigned char* saddr_t;
CA_DEVICE saddr_t smem_addr(const void* p) { return static_cast<unsigned char*>(const_cast<void*>(p)); }
#else
typedef uint32_t saddr_t;
CA_DEVICE saddr_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif

CA_DEVICE void ldsm_x4(uint32_t* r, saddr_t row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 4, false, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
#endif
}
CA_DEVICE void ldsm_x4_trans(uint32_t* r, saddr_t row) {
#ifdef CA_EMULATOR
  emu::ldmatrix(r, 4, true, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
#endif
}
// One fp32 from shared memory.
CA_DEVICE float lds_f32(saddr_t a) {
#ifdef CA_EMULATOR
  return *reinterpret_cast<const float*>(a);
#else
  float f;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(f) : "r"(a));
  return f;
#endif
}

// x, as a value the compiler cannot see through: what is derived from it is computed where this is
// called (e.g. a kernel's epilogue), not kept in registers from an earlier, equal computation.
CA_DEVICE int64_t reread(int64_t x) {
#ifdef CA_EMULATOR
  return x;
#else
  int64_t r;
  asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(x));
  return r;
#endif
}

// threadIdx.x, read anew: what is derived from it after a main loop is computed there instead of
// being kept in registers through the loop (the compiler would otherwise keep the values computed before).
CA_DEVICE int tid_reread() {
#ifdef CA_EMULATOR
  return (int)threadIdx.x;
#else
  int r;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(r));
  return r;
#endif
}

// ---------------------------------------------------------------------------------------------
// Tensor-core products, accumulating in place: d += a * b (fp32 accumulators).
CA_DEVICE void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, half_t) {
#ifdef CA_EMULATOR
  emu::mma_m16n8k16_f16(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
CA_DEVICE void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bf16_t) {
#ifdef CA_EMULATOR
  emu::mma_m16n8k16_bf16(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
CA_DEVICE void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) {
#ifdef CA_EMULATOR
  emu::mma_m16n8k8_tf32(d, a, b);
#else
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// fp32 accuracy on tf32 tensor cores (3xTF32): each operand x is split into big = tf32(x) and
// small = x - big (exact in fp32); big*big + big*small + small*big recovers ~fp32 accuracy (the
// dropped small*small term is ~2^-22 relative). Smaller products are accumulated first.
// The split is integer arithmetic on the bit pattern, 4 instructions instead of two cvt.rna.tf32
// (about 6 each): big = round-then-mask, adding half a tf32 ulp to the magnitude's bits and
// clearing the 13 low bits (round to nearest, ties away: cvt.rna for every finite x; an x that
// rounds past the largest tf32 becomes Inf, as with cvt.rna). small keeps its top 11 significant
// bits by masking (|small| <= 2^-11 |x|, so what the mask drops is below 2^-21 |x|; rounding small
// too would carry the GPU's canonical NaN 0x7fffffff into the sign bit and lose it). A NaN x gives a
// NaN small whatever big becomes (small = x - big, then masked: a quiet NaN keeps its quiet bit), so
// a NaN operand still makes the product NaN; Inf gives big = Inf and small = NaN, as with cvt.rna.
CA_DEVICE void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = (float_bits(x) + 0x1000u) & 0xffffe000u;
  small = float_bits(x - bits_as_float(big)) & 0xffffe000u;
}
CA_DEVICE void mma_3xtf32(float* d, const uint32_t* a_big, const uint32_t* a_small, const uint32_t* b_big,
                          const uint32_t* b_small) {
  mma_m16n8k8_tf32(d, a_small, b_big);
  mma_m16n8k8_tf32(d, a_big, b_small);
  mma_m16n8k8_tf32(d, a_big, b_big);
}

// ---------------------------------------------------------------------------------------------
// Two fp32 atomic adds to p[0] and p[1] (global memory, p 8-byte aligned), each atomic on its own,
// as two atomicAdd are: one vector reduction (red.global.add.v2.f32, PTX ISA 8.1) on sm_90 and later,
// two scalar atomics before (and in the emulator, which models it as exactly those two).
CA_DEVICE void atomic_add2(float* p, float a, float b) {
#if !defined(CA_EMULATOR) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .u64 g;\n cvta.to.global.u64 g, %0;\n red.global.add.v2.f32 [g], {%1, %2};\n}"
               :: "l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// ---------------------------------------------------------------------------------------------
// cp.async (16 bytes, bypassing L1). src_bytes < 16 copies that many bytes and zero-fills the rest,
// which is how tile loads past the end of a tensor become zeros without a branch around the copy.
// The data is only guaranteed to be in shared memory after the matching wait.
CA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
#ifdef CA_EMULATOR
  emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_u32(smem_dst)), "l"(gmem_src), "r"(src_bytes));
#endif
}
// The same copy to a shared address value (saddr_t).
CA_DEVICE void cp_async_16_s(saddr_t smem_dst, const void* gmem_src, int src_bytes) {
#ifdef CA_EMULATOR
  emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_dst), "l"(gmem_src), "r"(src_bytes));
#endif
}
CA_DEVICE void cp_async_commit() {
#ifdef CA_EMULATOR
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;");
#endif
}
// Wait until at most N committed groups are still in flight.
template <int N>
CA_DEVICE void cp_async_wait() {
#ifdef CA_EMULATOR
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" :: "n"(N));
#endif
}

// ---------------------------------------------------------------------------------------------
// Reductions across the 4 lanes of an mma row group (lanes 4g..4g+3 hold one accumulator row).
CA_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}
CA_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}
CA_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace ca
