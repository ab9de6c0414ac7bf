// shim.h — what CUDA device code needs from the GPU, re-created for the host C++ compiler.
//
// cupy_cosattn.emulator compiles kernel sources with `g++ -DCA_EMULATOR -include emu/shim.h` into a
// shared library and runs them on the CPU. Every CUDA thread is a fiber (see runtime.cpp); the
// functions below that involve more than one thread (barriers, shuffles, ldmatrix, mma) call into
// the runtime, which blocks the calling fiber until every participant has arrived and then computes
// the result exactly as the PTX ISA describes it. Pure per-thread operations (conversions, math,
// atomics) are defined inline here, and so are the __half and __nv_bfloat16 types of cuda_fp16.h and
// cuda_bf16.h (emu/cuda_fp16.h and emu/cuda_bf16.h, found first on the emulator's include path, only
// include this file).
#pragma once
#ifndef CA_EMULATOR
#error "emu/shim.h is only for the CPU emulator build (-DCA_EMULATOR)"
#endif

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>
#include <utility>
#include <type_traits>

// ---------------------------------------------------------------------------------------------
// Keywords.
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline
#define __constant__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one copy per OS worker thread. A worker runs one block at a time (all of
// the block's threads are fibers on that worker), so this is one copy per running block.
#define __shared__ static thread_local
// __restrict__ is understood by g++ as is.

// ---------------------------------------------------------------------------------------------
// Built-in vector types and the thread/block coordinates.
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __align__(8) int2 { int x, y; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

namespace emu {
// Per-thread (fiber) and per-block state visible to kernels; owned by the runtime.
struct ThreadPub { uint3 tid; int lane; int warp; };
struct BlockPub { uint3 bid; uint3 bdim; uint3 gdim; unsigned char* dyn_smem; size_t dyn_smem_bytes; };
}  // namespace emu

extern "C" {
// Defined in runtime.cpp (libcaemu), which the emulator loads process-wide before any module.
extern __thread emu::ThreadPub* caemu_tl_thread;
extern __thread emu::BlockPub* caemu_tl_block;

void caemu_syncthreads(void);
void caemu_syncwarp(unsigned mask);
void caemu_threadfence(void);
void caemu_maybe_yield(void);
unsigned long long caemu_shfl(int mode, unsigned mask, unsigned long long v, int b, int width);
unsigned long long caemu_shfl_c(int mode, unsigned mask, unsigned long long v, int b, int c);
unsigned caemu_vote(int mode, unsigned mask, int pred);
void caemu_ldmatrix(uint32_t* r, int num, int trans, const void* row);
void caemu_mma(int kind, float* d, const uint32_t* a, const uint32_t* b);
void caemu_cp_async(void* dst, const void* src, int cp_bytes, int src_bytes);
void caemu_cp_async_commit(void);
void caemu_cp_async_wait(int n);
void caemu_trap(const char* what);
}

#define threadIdx (caemu_tl_thread->tid)
#define blockIdx (caemu_tl_block->bid)
#define blockDim (caemu_tl_block->bdim)
#define gridDim (caemu_tl_block->gdim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Synchronisation.
inline void __syncthreads() { caemu_syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { caemu_syncwarp(mask); }
inline void __threadfence() { caemu_threadfence(); }
inline void __threadfence_block() { caemu_threadfence(); }
inline void __trap() { caemu_trap("__trap()"); }

// ---------------------------------------------------------------------------------------------
// Warp shuffles and votes (4- and 8-byte types). Modes follow PTX shfl: 0 idx, 1 up, 2 down, 3 bfly.
// The intrinsics build PTX's c operand from the width as CUDA's headers do; emu::shfl_sync takes b
// and c as shfl.sync.{idx,up,down,bfly}.b32 d, a, b, c, membermask does.
namespace emu {
template <class T>
inline T shfl_(int mode, unsigned mask, T var, int b, int width_or_c, bool raw_c) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "emulated shuffles take 4- or 8-byte values");
  unsigned long long u = 0;
  memcpy(&u, &var, sizeof(T));
  u = raw_c ? caemu_shfl_c(mode, mask, u, b, width_or_c) : caemu_shfl(mode, mask, u, b, width_or_c);
  T r;
  memcpy(&r, &u, sizeof(T));
  return r;
}
template <class T> inline T shfl_sync(int mode, unsigned mask, T var, unsigned b, unsigned c) {
  return shfl_(mode, mask, var, (int)b, (int)c, true);
}
}  // namespace emu
template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
  return emu::shfl_(0, mask, var, srcLane, width, false);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return emu::shfl_(1, mask, var, (int)delta, width, false);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return emu::shfl_(2, mask, var, (int)delta, width, false);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
  return emu::shfl_(3, mask, var, laneMask, width, false);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return caemu_vote(0, mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return caemu_vote(1, mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return caemu_vote(2, mask, pred) != 0; }

// ---------------------------------------------------------------------------------------------
// Atomics: real atomics, since blocks run concurrently on several OS threads.
namespace emu {
template <class T, class F>
inline T atomic_update_(T* p, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte atomics only");
  typedef typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type U;
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_RELAXED);
  for (;;) {
    T o;
    memcpy(&o, &old, sizeof(T));
    T n = f(o);
    U nu;
    memcpy(&nu, &n, sizeof(T));
    if (__atomic_compare_exchange_n(q, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return o;
  }
}
}  // namespace emu
inline int atomicAdd(int* p, int v) { caemu_maybe_yield(); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { caemu_maybe_yield(); return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  caemu_maybe_yield();
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
  caemu_maybe_yield();
  return emu::atomic_update_(p, [v](float o) { return o + v; });
}
inline double atomicAdd(double* p, double v) {
  caemu_maybe_yield();
  return emu::atomic_update_(p, [v](double o) { return o + v; });
}
inline int atomicSub(int* p, int v) { caemu_maybe_yield(); return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* p, unsigned v) { caemu_maybe_yield(); return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* p, int v) { caemu_maybe_yield(); return emu::atomic_update_(p, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  caemu_maybe_yield();
  return emu::atomic_update_(p, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) { caemu_maybe_yield(); return emu::atomic_update_(p, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
  caemu_maybe_yield();
  return emu::atomic_update_(p, [v](unsigned o) { return o < v ? o : v; });
}
inline int atomicCAS(int* p, int cmp, int v) {
  caemu_maybe_yield();
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
  caemu_maybe_yield();
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  caemu_maybe_yield();
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline int atomicExch(int* p, int v) { caemu_maybe_yield(); return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicExch(unsigned* p, unsigned v) { caemu_maybe_yield(); return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float atomicExch(float* p, float v) {
  caemu_maybe_yield();
  return emu::atomic_update_(p, [v](float) { return v; });
}

// ---------------------------------------------------------------------------------------------
// Math and bit casts.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }
inline long long __double_as_longlong(double f) { long long u; memcpy(&u, &f, 8); return u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

template <class T> inline T __ldg(const T* p) { return *p; }

// ---------------------------------------------------------------------------------------------
// The emu:: interface that common.cuh calls.
namespace emu {

inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

// NaN results. The GPU's conversions (cvt.f32.f16, cvt.rn.f16.f32, cvt.rn.bf16.f32) return the
// canonical NaN, all ones but the sign (0x7fffffff, 0x7fff), whatever the input NaN's sign and
// payload; NVIDIA's host implementations of __half2float, __float2half_rn and __float2bfloat16_rn in
// cuda_fp16.hpp / cuda_bf16.hpp, written to give the device's results, do the same. (bf16 -> fp32 is
// a bit move on the GPU and keeps every NaN as it is.)
const uint32_t kCanonicalNanF32 = 0x7fffffffu;
const uint16_t kCanonicalNan16 = 0x7fffu;

// IEEE binary16 -> binary32 (exact; NaN -> canonical NaN).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = man ? kCanonicalNanF32 : sign | 0x7f800000u;  // nan, or inf
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {
    // subnormal: value = man * 2^-24; normalise.
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  return bits_to_f32(u);
}

// binary32 -> binary16, round to nearest even, with subnormals, overflow to inf, nan -> canonical nan.
inline uint16_t f32_to_f16_rn(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return a == 0x7f800000u ? (uint16_t)(sign | 0x7c00u) : kCanonicalNan16;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65536 -> inf
  int e = (int)(a >> 23) - 127;  // unbiased exponent
  if (e >= -14) {
    // normal half: keep 10 mantissa bits, round the 13 dropped bits to nearest even.
    uint32_t m = a & 0x7fffffu;
    uint32_t h = ((uint32_t)(e + 15) << 10) | (m >> 13);
    uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;  // carry may bump the exponent: fine
    return sign | (uint16_t)h;
  }
  if (e < -25) return sign;  // below half the smallest subnormal (2^-25): rounds to zero
  // subnormal half: value = mant * 2^-24, mant = full significand (24 bits) >> shift.
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  // value = m * 2^(e-23) = h * 2^-24  =>  h = m >> (-e - 1), i.e. a shift of 14 (e = -15) to 24 (e = -25).
  int shift = -e - 1;
  uint32_t h = m >> shift;
  uint32_t rest = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) h += 1;
  return sign | (uint16_t)h;
}

// binary32 -> bfloat16, round to nearest even (fp32 subnormals round like any other value; overflow
// rounds to inf); nan -> canonical nan.
inline uint16_t f32_to_bf16_rn(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return kCanonicalNan16;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// binary32 -> tf32 (1+8+10 bits), round to nearest with ties away from zero, returned as the fp32
// bit pattern with the low 13 mantissa bits cleared.
inline uint32_t f32_to_tf32_rna(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    if (u & 0x7fffffu) return (u | 0x400000u) & 0xffffe000u;  // nan: quiet, stays nan
    return u;                                                 // inf
  }
  u += 0x1000u;  // half an ulp of tf32 on the magnitude: ties go away from zero
  return u & 0xffffe000u;
}

// bfloat16 -> binary32: the bits moved to the upper half (exact, NaN payloads kept).
inline float bf16_to_f32(uint16_t b) { return bits_to_f32((uint32_t)b << 16); }

inline float exp2_approx(float x) { return exp2f(x); }

inline void ldmatrix(uint32_t* r, int num_matrices, bool trans, const void* row_ptr) {
  caemu_ldmatrix(r, num_matrices, trans ? 1 : 0, row_ptr);
}
inline void mma_m16n8k16_f16(float* d, const uint32_t* a, const uint32_t* b) { caemu_mma(0, d, a, b); }
inline void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) { caemu_mma(1, d, a, b); }
inline void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) { caemu_mma(2, d, a, b); }

inline void cp_async(void* dst, const void* src, int cp_bytes, int src_bytes) {
  caemu_cp_async(dst, src, cp_bytes, src_bytes);
}
inline void cp_async_commit() { caemu_cp_async_commit(); }
inline void cp_async_wait(int n) { caemu_cp_async_wait(n); }

inline unsigned char* dynamic_shared_memory() { return caemu_tl_block->dyn_smem; }

// ---------------------------------------------------------------------------------------------
// Kernel registration: the emulator appends, for each kernel, wrappers built from these templates,
// so the runtime knows every argument's size and can call the kernel with a `void** args` array.
struct ArgInfo { size_t size; size_t align; int is_pointer; };

template <class T> inline T load_arg_(void* p) {
  T v;
  memcpy((void*)&v, p, sizeof(T));
  return v;
}
template <class... A, size_t... I>
inline void invoke_(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(load_arg_<typename std::decay<A>::type>(args[I])...);
}
template <class... A>
inline void invoke(void (*f)(A...), void** args) {
  invoke_(f, args, std::index_sequence_for<A...>{});
}
template <class... A>
inline int arg_info(void (*)(A...), ArgInfo* out, int max) {
  const ArgInfo info[sizeof...(A) + 1] = {
      {sizeof(typename std::decay<A>::type), alignof(typename std::decay<A>::type),
       std::is_pointer<typename std::decay<A>::type>::value ? 1 : 0}...,
      {0, 0, 0}};
  int n = (int)sizeof...(A);
  for (int i = 0; i < n && i < max; ++i) out[i] = info[i];
  return n;
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16 as cuda_fp16.h / cuda_bf16.h declare them (2-byte, 2-aligned, the raw
// bits in a protected member; __half_raw / __nv_bfloat16_raw give access to them), with the
// conversions to and from float. They round exactly as the GPU's cvt.rn instructions (the emu::
// functions above): to nearest even, subnormals kept, overflow to inf, NaN to the canonical NaN.
// As in CUDA, defining __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ removes the
// implicit conversions from and to float. No arithmetic operators or intrinsics (__hadd, __half2,
// ...) are modelled: convert to float, compute, and convert back.
struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __align__(2) __half {
 protected:
  unsigned short __x;

 public:
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
  operator __half_raw() const { return __half_raw{__x}; }
#if !defined(__CUDA_NO_HALF_CONVERSIONS__)
  __half(float f) : __x(emu::f32_to_f16_rn(f)) {}
  __half& operator=(float f) { __x = emu::f32_to_f16_rn(f); return *this; }
  operator float() const { return emu::f16_to_f32(__x); }
#endif
};

struct __align__(2) __nv_bfloat16 {
 protected:
  unsigned short __x;

 public:
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
#if !defined(__CUDA_NO_BFLOAT16_CONVERSIONS__)
  __nv_bfloat16(float f) : __x(emu::f32_to_bf16_rn(f)) {}
  __nv_bfloat16& operator=(float f) { __x = emu::f32_to_bf16_rn(f); return *this; }
  operator float() const { return emu::bf16_to_f32(__x); }
#endif
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half is 2 bytes");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 is 2 bytes");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_copyable<__nv_bfloat16>::value,
              "kernel arguments are copied bytewise");

inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline unsigned short __half_as_ushort(__half h) { return static_cast<__half_raw>(h).x; }
inline __half __float2half_rn(float f) { return __ushort_as_half(emu::f32_to_f16_rn(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }  // round to nearest even too
inline float __half2float(__half h) { return emu::f16_to_f32(__half_as_ushort(h)); }

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return static_cast<__nv_bfloat16_raw>(b).x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(emu::f32_to_bf16_rn(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }  // round to nearest even too
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_to_f32(__bfloat16_as_ushort(b)); }
