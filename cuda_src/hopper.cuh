// hopper.cuh — sm_90a (Hopper) device primitives: warpgroup MMA (wgmma), shared-memory matrix
// descriptors, mbarriers, named barriers, proxy fences, elect.sync, setmaxnreg and TMA bulk tensor
// copies (cp.async.bulk.tensor).
//
// As in common.cuh, each primitive is written once for both builds: a line of inline PTX under NVRTC,
// a call into the CPU emulator's model (cuda_src/emu/hopper.cpp, interface emu/hopper.h) under
// CA_EMULATOR. docs/emulator.md ("The Hopper model") says what the emulator models and how.
//
// Availability. These instructions exist only on sm_90a ("arch-specific" features: wgmma, setmaxnreg)
// or sm_90+ (the rest). CA_SM90A is 1 when the primitives are usable: always in the emulator, and under
// NVRTC when compiling for -arch=sm_90a (NVRTC then defines __CUDA_ARCH_FEAT_SM90_ALL). Otherwise it
// is 0 and only the arch-neutral pieces (descriptor encoding, the TensorMap type, the enums) are
// defined, so a source that includes this header still compiles for sm_80/sm_86/sm_90; its Hopper
// kernels must sit inside `#if CA_SM90A`.
//
// Shared addresses. Descriptors and PTX operands use 32-bit shared-window addresses (window_addr).
// The swizzle patterns are functions of those addresses (bits 4-6 XOR bits 7-9), so swizzled tiles
// must be placed by shared address: the emulator puts dynamic shared memory at shared address 1024
// (1024-byte aligned, what `extern __shared__ __align__(1024)` gives on the GPU).
//
// Fragment layouts (PTX ISA "Matrix Fragments for wgmma.mma_async.m64nNk16"), for the thread with
// w = warp index within the warpgroup (0..3), g = lane / 4, t = lane % 4:
//   A (4 registers of 2 halves, element i = register i/2, low half first):
//     row = 16w + g + 8*((i >> 1) & 1), col = 2t + (i & 1) + 8*(i >> 2)          (i = 0..7)
//   D (N/2 fp32 registers):
//     row = 16w + g + 8*((i >> 1) & 1), col = 8*(i >> 2) + 2t + (i & 1)          (i = 0..N/2-1)
#pragma once

#include "common.cuh"

#if defined(CA_EMULATOR)
#include "emu/hopper.h"
#define CA_SM90A 1
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CA_SM90A 1
#else
#define CA_SM90A 0
#endif

namespace ca {
namespace sm90 {

// ---------------------------------------------------------------------------------------------
// Arch-neutral pieces.

// Shared-memory swizzle modes, by their span in bytes. The same four patterns serve the wgmma
// descriptors and the TMA (CU_TENSOR_MAP_SWIZZLE_32B/64B/128B): within each span-wide row, the
// 16-byte chunk index (address bits 4..) is XORed with the row index within the repeating pattern
// (address bits 7..); the pattern repeats every 8 rows (256, 512, 1024 bytes).
enum class Swizzle : uint32_t { None = 0, B32 = 32, B64 = 64, B128 = 128 };

// Which dimension is contiguous in a descriptor operand: K-major (imm-trans = 0) or M/N-major (1).
enum class Major : int { K = 0, MN = 1 };

// The swizzled shared address of byte `addr` (the XOR only changes bits 4-6, so a 16-byte chunk
// stays whole and stays inside its 128-byte line).
CA_DEVICE uint32_t swizzle_address(uint32_t addr, Swizzle s) {
  uint32_t mask = s == Swizzle::B128 ? 7u : s == Swizzle::B64 ? 3u : s == Swizzle::B32 ? 1u : 0u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

// The 2-bit layout-type field of a descriptor (PTX ISA "Matrix Descriptor Format", bits 63-62).
CA_DEVICE uint64_t desc_swizzle_code(Swizzle s) {
  return s == Swizzle::B128 ? 1u : s == Swizzle::B64 ? 2u : s == Swizzle::B32 ? 3u : 0u;
}

// 64-bit shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"):
//   bits 13-0   encode(start address)          encode(x) = (x & 0x3FFFF) >> 4
//   bits 29-16  encode(leading dimension byte offset, LBO)
//   bits 45-32  encode(stride dimension byte offset, SBO)
//   bits 51-49  matrix base offset (0 when the swizzle pattern starts on its 256/512/1024-byte
//               boundary; the emulator models only 0)
//   bits 63-62  swizzle: 0 none, 1 128B, 2 64B, 3 32B
// What LBO and SBO mean depends on the major-ness and the swizzle (PTX ISA "Canonical Layouts"),
// in units of T = 8 elements of 16 bits (16 bytes):
//   K-major,  no swizzle: ((8,m),(T,2k)) : ((1T,SBO),(1,LBO))    LBO = step between the two 8-wide K halves
//   K-major,  swizzle W:  ((8,m),(T,2k)) : ((W*T,SBO),(1,T))     LBO unused; W = span / 16
//   MN-major, no swizzle: ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO))
//   MN-major, swizzle W:  ((T,W,m),(8,k)) : ((1,T,LBO),(W*T,SBO))
// SBO is the step between 8-row groups (K-major) / 8-deep K groups (MN-major, swizzled).
CA_DEVICE uint64_t make_smem_desc(uint32_t start_addr, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle s,
                                  uint32_t base_offset = 0) {
  return (uint64_t)((start_addr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo_bytes & 0x3FFFFu) >> 4) << 16) |
         ((uint64_t)((sbo_bytes & 0x3FFFFu) >> 4) << 32) | ((uint64_t)(base_offset & 7u) << 49) |
         (desc_swizzle_code(s) << 62);
}

// The descriptor moved by `bytes` (a multiple of 16) in the start-address field: how a kernel steps
// along K inside a swizzled row, or to the next tile. The field is 14 bits; the emulator reports an
// operand that leaves shared memory.
CA_DEVICE uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// A tensor map (CUtensorMap): 128 opaque bytes, 64-byte aligned, made on the host by
// cupy_cosattn.tensormap (the driver's encoding on the GPU, the emulator's own in the emulator).
// Kernels take it by value as a `const __grid_constant__` parameter (or inside such a struct) and
// pass its address to tma_load / tma_store.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

template <class T> struct WgmmaInput;
template <> struct WgmmaInput<half_t> { static constexpr bool bf16 = false; };
template <> struct WgmmaInput<bf16_t> { static constexpr bool bf16 = true; };

#if CA_SM90A

// ---------------------------------------------------------------------------------------------
// Shared addresses.

// The 32-bit shared-window address of a pointer into shared memory, as descriptors, mbarriers and TMA
// take it. (common.cuh's smem_addr gives the tile-operand address, a host pointer in the emulator.)
CA_DEVICE uint32_t window_addr(const void* p) {
#ifdef CA_EMULATOR
  return emu::smem_addr(p);
#else
  return smem_u32(p);
#endif
}

CA_DEVICE uint64_t make_smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes, Swizzle s,
                                  uint32_t base_offset = 0) {
  return make_smem_desc(window_addr(start), lbo_bytes, sbo_bytes, s, base_offset);
}

// ---------------------------------------------------------------------------------------------
// Warpgroup MMA. A warpgroup is 4 consecutive warps whose first warp index is a multiple of 4; every
// wgmma instruction is executed by all 128 of its threads.
//
// The ISA's ordering rules, which the emulator checks (see docs/emulator.md):
//   wgmma_fence()  before the first wgmma of the warpgroup, and between any register access to the
//                  accumulators / A registers and a wgmma that uses them (after a wgmma_wait, say);
//   wgmma_commit() groups every wgmma issued since the last commit;
//   wgmma_wait<N>() returns once at most N committed groups are pending. Until then the
//                  accumulators and A registers of the pending wgmmas must not be touched, and the
//                  shared memory they read must not be overwritten.
// fence_operand(x) keeps the compiler from moving register accesses across these (it emits no
// instruction): call it on the accumulators after wgmma_wait and before the next wgmma.
CA_DEVICE void wgmma_fence() {
#ifdef CA_EMULATOR
  emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
CA_DEVICE void wgmma_commit() {
#ifdef CA_EMULATOR
  emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int N>
CA_DEVICE void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group N: 0..7");
#ifdef CA_EMULATOR
  emu::wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
#endif
}

template <int R>
CA_DEVICE void fence_operand(float (&x)[R]) {
#ifndef CA_EMULATOR
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(x[i])::"memory");
#endif
}
template <int R>
CA_DEVICE void fence_operand(uint32_t (&x)[R]) {
#ifndef CA_EMULATOR
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(x[i])::"memory");
#endif
}

#ifndef CA_EMULATOR
namespace detail {
// Inline PTX for wgmma.mma_async.m64nNk16.f32.{f16,bf16}, every N = 8..256 in steps of 8. Inline asm
// operands are numbered (NVRTC rejects named ones): the N/2 accumulators are %0..%(R-1), R = N/2,
// and the operands after them are numbered R, R+1, ... . The tables below spell those numbers out:
// CA_WG_SL<R> is the accumulator list "%0, ..., %(R-1)", CA_WG_FL<R>(d) the matching "+f"
// constraints, and each CA_WG_DEFINE line gives N, R and R+1..R+8.
#define CA_WG_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define CA_WG_SL4 "%0, %1, %2, %3"
#define CA_WG_SL8 CA_WG_SL4 ", %4, %5, %6, %7"
#define CA_WG_SL12 CA_WG_SL8 ", %8, %9, %10, %11"
#define CA_WG_SL16 CA_WG_SL12 ", %12, %13, %14, %15"
#define CA_WG_SL20 CA_WG_SL16 ", %16, %17, %18, %19"
#define CA_WG_SL24 CA_WG_SL20 ", %20, %21, %22, %23"
#define CA_WG_SL28 CA_WG_SL24 ", %24, %25, %26, %27"
#define CA_WG_SL32 CA_WG_SL28 ", %28, %29, %30, %31"
#define CA_WG_SL36 CA_WG_SL32 ", %32, %33, %34, %35"
#define CA_WG_SL40 CA_WG_SL36 ", %36, %37, %38, %39"
#define CA_WG_SL44 CA_WG_SL40 ", %40, %41, %42, %43"
#define CA_WG_SL48 CA_WG_SL44 ", %44, %45, %46, %47"
#define CA_WG_SL52 CA_WG_SL48 ", %48, %49, %50, %51"
#define CA_WG_SL56 CA_WG_SL52 ", %52, %53, %54, %55"
#define CA_WG_SL60 CA_WG_SL56 ", %56, %57, %58, %59"
#define CA_WG_SL64 CA_WG_SL60 ", %60, %61, %62, %63"
#define CA_WG_SL68 CA_WG_SL64 ", %64, %65, %66, %67"
#define CA_WG_SL72 CA_WG_SL68 ", %68, %69, %70, %71"
#define CA_WG_SL76 CA_WG_SL72 ", %72, %73, %74, %75"
#define CA_WG_SL80 CA_WG_SL76 ", %76, %77, %78, %79"
#define CA_WG_SL84 CA_WG_SL80 ", %80, %81, %82, %83"
#define CA_WG_SL88 CA_WG_SL84 ", %84, %85, %86, %87"
#define CA_WG_SL92 CA_WG_SL88 ", %88, %89, %90, %91"
#define CA_WG_SL96 CA_WG_SL92 ", %92, %93, %94, %95"
#define CA_WG_SL100 CA_WG_SL96 ", %96, %97, %98, %99"
#define CA_WG_SL104 CA_WG_SL100 ", %100, %101, %102, %103"
#define CA_WG_SL108 CA_WG_SL104 ", %104, %105, %106, %107"
#define CA_WG_SL112 CA_WG_SL108 ", %108, %109, %110, %111"
#define CA_WG_SL116 CA_WG_SL112 ", %112, %113, %114, %115"
#define CA_WG_SL120 CA_WG_SL116 ", %116, %117, %118, %119"
#define CA_WG_SL124 CA_WG_SL120 ", %120, %121, %122, %123"
#define CA_WG_SL128 CA_WG_SL124 ", %124, %125, %126, %127"
#define CA_WG_FL4(d) CA_WG_F4(d, 0)
#define CA_WG_FL8(d) CA_WG_FL4(d), CA_WG_F4(d, 4)
#define CA_WG_FL12(d) CA_WG_FL8(d), CA_WG_F4(d, 8)
#define CA_WG_FL16(d) CA_WG_FL12(d), CA_WG_F4(d, 12)
#define CA_WG_FL20(d) CA_WG_FL16(d), CA_WG_F4(d, 16)
#define CA_WG_FL24(d) CA_WG_FL20(d), CA_WG_F4(d, 20)
#define CA_WG_FL28(d) CA_WG_FL24(d), CA_WG_F4(d, 24)
#define CA_WG_FL32(d) CA_WG_FL28(d), CA_WG_F4(d, 28)
#define CA_WG_FL36(d) CA_WG_FL32(d), CA_WG_F4(d, 32)
#define CA_WG_FL40(d) CA_WG_FL36(d), CA_WG_F4(d, 36)
#define CA_WG_FL44(d) CA_WG_FL40(d), CA_WG_F4(d, 40)
#define CA_WG_FL48(d) CA_WG_FL44(d), CA_WG_F4(d, 44)
#define CA_WG_FL52(d) CA_WG_FL48(d), CA_WG_F4(d, 48)
#define CA_WG_FL56(d) CA_WG_FL52(d), CA_WG_F4(d, 52)
#define CA_WG_FL60(d) CA_WG_FL56(d), CA_WG_F4(d, 56)
#define CA_WG_FL64(d) CA_WG_FL60(d), CA_WG_F4(d, 60)
#define CA_WG_FL68(d) CA_WG_FL64(d), CA_WG_F4(d, 64)
#define CA_WG_FL72(d) CA_WG_FL68(d), CA_WG_F4(d, 68)
#define CA_WG_FL76(d) CA_WG_FL72(d), CA_WG_F4(d, 72)
#define CA_WG_FL80(d) CA_WG_FL76(d), CA_WG_F4(d, 76)
#define CA_WG_FL84(d) CA_WG_FL80(d), CA_WG_F4(d, 80)
#define CA_WG_FL88(d) CA_WG_FL84(d), CA_WG_F4(d, 84)
#define CA_WG_FL92(d) CA_WG_FL88(d), CA_WG_F4(d, 88)
#define CA_WG_FL96(d) CA_WG_FL92(d), CA_WG_F4(d, 92)
#define CA_WG_FL100(d) CA_WG_FL96(d), CA_WG_F4(d, 96)
#define CA_WG_FL104(d) CA_WG_FL100(d), CA_WG_F4(d, 100)
#define CA_WG_FL108(d) CA_WG_FL104(d), CA_WG_F4(d, 104)
#define CA_WG_FL112(d) CA_WG_FL108(d), CA_WG_F4(d, 108)
#define CA_WG_FL116(d) CA_WG_FL112(d), CA_WG_F4(d, 112)
#define CA_WG_FL120(d) CA_WG_FL116(d), CA_WG_F4(d, 116)
#define CA_WG_FL124(d) CA_WG_FL120(d), CA_WG_F4(d, 120)
#define CA_WG_FL128(d) CA_WG_FL124(d), CA_WG_F4(d, 124)

#define CA_WG_SS_TEXT(N, TY, R, IB, IS, ISA, ISB, ITA, ITB)                                                  \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" CA_WG_SL##R "}, %" #R ", %" #IB           \
  ", p, %" #ISA ", %" #ISB ", %" #ITA ", %" #ITB ";\n}\n"
#define CA_WG_RS_TEXT(N, TY, R, A1, A2, A3, IB, IS, ISA, ISB, ITB)                                           \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" #IS ", 0;\n"                                                          \
  "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" CA_WG_SL##R "}, {%" #R ", %" #A1          \
  ", %" #A2 ", %" #A3 "}, %" #IB ", p, %" #ISA ", %" #ISB ", %" #ITB ";\n}\n"

template <int N> struct Wgmma;

#define CA_WG_DEFINE(N, R, P1, P2, P3, P4, P5, P6, P7, P8)                                                    \
  template <> struct Wgmma<N> {                                                                              \
    template <bool BF16, int SA, int SB, int TA, int TB>                                                     \
    static __device__ __forceinline__ void ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {     \
      if constexpr (BF16)                                                                                    \
        asm volatile(CA_WG_SS_TEXT(N, "bf16", R, P1, P2, P3, P4, P5, P6)                                     \
                     : CA_WG_FL##R(d)                                                                        \
                     : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));          \
      else                                                                                                   \
        asm volatile(CA_WG_SS_TEXT(N, "f16", R, P1, P2, P3, P4, P5, P6)                                      \
                     : CA_WG_FL##R(d)                                                                        \
                     : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(SA), "n"(SB), "n"(TA), "n"(TB));          \
    }                                                                                                        \
    template <bool BF16, int SA, int SB, int TB>                                                             \
    static __device__ __forceinline__ void rs(float* d, const uint32_t* a, uint64_t desc_b, int scale_d) {   \
      if constexpr (BF16)                                                                                    \
        asm volatile(CA_WG_RS_TEXT(N, "bf16", R, P1, P2, P3, P4, P5, P6, P7, P8)                             \
                     : CA_WG_FL##R(d)                                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(SA),       \
                       "n"(SB), "n"(TB));                                                                    \
      else                                                                                                   \
        asm volatile(CA_WG_RS_TEXT(N, "f16", R, P1, P2, P3, P4, P5, P6, P7, P8)                              \
                     : CA_WG_FL##R(d)                                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(SA),       \
                       "n"(SB), "n"(TB));                                                                    \
    }                                                                                                        \
  };
CA_WG_DEFINE(8, 4, 5, 6, 7, 8, 9, 10, 11, 12)
CA_WG_DEFINE(16, 8, 9, 10, 11, 12, 13, 14, 15, 16)
CA_WG_DEFINE(24, 12, 13, 14, 15, 16, 17, 18, 19, 20)
CA_WG_DEFINE(32, 16, 17, 18, 19, 20, 21, 22, 23, 24)
CA_WG_DEFINE(40, 20, 21, 22, 23, 24, 25, 26, 27, 28)
CA_WG_DEFINE(48, 24, 25, 26, 27, 28, 29, 30, 31, 32)
CA_WG_DEFINE(56, 28, 29, 30, 31, 32, 33, 34, 35, 36)
CA_WG_DEFINE(64, 32, 33, 34, 35, 36, 37, 38, 39, 40)
CA_WG_DEFINE(72, 36, 37, 38, 39, 40, 41, 42, 43, 44)
CA_WG_DEFINE(80, 40, 41, 42, 43, 44, 45, 46, 47, 48)
CA_WG_DEFINE(88, 44, 45, 46, 47, 48, 49, 50, 51, 52)
CA_WG_DEFINE(96, 48, 49, 50, 51, 52, 53, 54, 55, 56)
CA_WG_DEFINE(104, 52, 53, 54, 55, 56, 57, 58, 59, 60)
CA_WG_DEFINE(112, 56, 57, 58, 59, 60, 61, 62, 63, 64)
CA_WG_DEFINE(120, 60, 61, 62, 63, 64, 65, 66, 67, 68)
CA_WG_DEFINE(128, 64, 65, 66, 67, 68, 69, 70, 71, 72)
CA_WG_DEFINE(136, 68, 69, 70, 71, 72, 73, 74, 75, 76)
CA_WG_DEFINE(144, 72, 73, 74, 75, 76, 77, 78, 79, 80)
CA_WG_DEFINE(152, 76, 77, 78, 79, 80, 81, 82, 83, 84)
CA_WG_DEFINE(160, 80, 81, 82, 83, 84, 85, 86, 87, 88)
CA_WG_DEFINE(168, 84, 85, 86, 87, 88, 89, 90, 91, 92)
CA_WG_DEFINE(176, 88, 89, 90, 91, 92, 93, 94, 95, 96)
CA_WG_DEFINE(184, 92, 93, 94, 95, 96, 97, 98, 99, 100)
CA_WG_DEFINE(192, 96, 97, 98, 99, 100, 101, 102, 103, 104)
CA_WG_DEFINE(200, 100, 101, 102, 103, 104, 105, 106, 107, 108)
CA_WG_DEFINE(208, 104, 105, 106, 107, 108, 109, 110, 111, 112)
CA_WG_DEFINE(216, 108, 109, 110, 111, 112, 113, 114, 115, 116)
CA_WG_DEFINE(224, 112, 113, 114, 115, 116, 117, 118, 119, 120)
CA_WG_DEFINE(232, 116, 117, 118, 119, 120, 121, 122, 123, 124)
CA_WG_DEFINE(240, 120, 121, 122, 123, 124, 125, 126, 127, 128)
CA_WG_DEFINE(248, 124, 125, 126, 127, 128, 129, 130, 131, 132)
CA_WG_DEFINE(256, 128, 129, 130, 131, 132, 133, 134, 135, 136)

#undef CA_WG_DEFINE
}  // namespace detail
#endif  // !CA_EMULATOR

// D (64 x N, fp32, the fragment layout above) = A (64 x 16) * B (16 x N) + (accumulate ? D : 0), A and
// B read from shared memory through their descriptors. MA / MB: K-major or M/N-major operands
// (imm-trans-a / imm-trans-b); NegA / NegB negate A / B (imm-scale-a / imm-scale-b = -1).
template <int N, class T, Major MA = Major::K, Major MB = Major::K, bool NegA = false, bool NegB = false>
CA_DEVICE void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma.m64nNk16: N = 8, 16, ..., 256");
#ifdef CA_EMULATOR
  emu::wgmma(d, nullptr, desc_a, desc_b, N, WgmmaInput<T>::bf16, accumulate, NegA, NegB, MA == Major::MN,
             MB == Major::MN);
#else
  detail::Wgmma<N>::template ss<WgmmaInput<T>::bf16, NegA ? -1 : 1, NegB ? -1 : 1, (int)MA, (int)MB>(
      d, desc_a, desc_b, accumulate ? 1 : 0);
#endif
}

// The same with A from registers (4 registers of 2 elements per thread, the A layout above; A is then
// K-major by definition).
template <int N, class T, Major MB = Major::K, bool NegA = false, bool NegB = false>
CA_DEVICE void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma.m64nNk16: N = 8, 16, ..., 256");
#ifdef CA_EMULATOR
  emu::wgmma(d, a, 0, desc_b, N, WgmmaInput<T>::bf16, accumulate, NegA, NegB, false, MB == Major::MN);
#else
  detail::Wgmma<N>::template rs<WgmmaInput<T>::bf16, NegA ? -1 : 1, NegB ? -1 : 1, (int)MB>(d, a, desc_b,
                                                                                               accumulate ? 1 : 0);
#endif
}

// ---------------------------------------------------------------------------------------------
// mbarrier: a 64-bit object in shared memory (8-byte aligned) with a phase, a pending-arrival count
// and a transaction (tx) count. A phase completes when all expected arrivals have happened and the
// tx-count is back to zero; then the next phase starts with the arrival count reset. Bulk copies
// (tma_load) decrement the tx-count by the bytes they deliver (complete_tx).
//   mbar_init(bar, n)            n arrivals per phase (1 .. 2^20-1); before any other use, followed by
//                                a barrier (e.g. __syncthreads) so the other threads see it
//   mbar_arrive(bar)             one arrival
//   mbar_arrive_expect_tx(bar,b) expect b more bytes in this phase, then arrive
//   mbar_expect_tx(bar, b)       expect b more bytes, without arriving
//   mbar_complete_tx(bar, b)     b bytes delivered (what a bulk copy does by itself)
//   mbar_try_wait(bar, parity)   true once the phase of that parity has completed: the current phase
//                                has the parity (number of completed phases) & 1, so a wait on the
//                                other parity (the phase before) succeeds at once. May return false
//                                spuriously (a time limit): loop, or use mbar_wait.
CA_DEVICE void mbar_init(uint64_t* bar, uint32_t count) {
#ifdef CA_EMULATOR
  emu::mbar_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
#endif
}
CA_DEVICE void mbar_arrive(uint64_t* bar) {
#ifdef CA_EMULATOR
  emu::mbar_arrive(bar, 1, 0);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
#endif
}
CA_DEVICE void mbar_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#ifdef CA_EMULATOR
  emu::mbar_arrive(bar, 1, tx_bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(tx_bytes)
               : "memory");
#endif
}
CA_DEVICE void mbar_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#ifdef CA_EMULATOR
  emu::mbar_expect_tx(bar, tx_bytes);
#else
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(tx_bytes)
               : "memory");
#endif
}
CA_DEVICE void mbar_complete_tx(uint64_t* bar, uint32_t tx_bytes) {
#ifdef CA_EMULATOR
  emu::mbar_complete_tx(bar, tx_bytes);
#else
  asm volatile("mbarrier.complete_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(tx_bytes)
               : "memory");
#endif
}
CA_DEVICE bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
#ifdef CA_EMULATOR
  return emu::mbar_try_wait_parity(bar, parity);
#else
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.b32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return ok != 0;
#endif
}
CA_DEVICE void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// ---------------------------------------------------------------------------------------------
// Named barriers (bar.sync / bar.arrive with a barrier id and a thread count, a multiple of 32):
// the barrier completes once `count` threads (whole warps) have arrived; bar.sync waits for that,
// bar.arrive only counts. Id 0 is __syncthreads()'s; kernels use 1..15.
CA_DEVICE void named_barrier_sync(uint32_t id, uint32_t count) {
#ifdef CA_EMULATOR
  emu::named_barrier(id, count, true);
#else
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}
CA_DEVICE void named_barrier_arrive(uint32_t id, uint32_t count) {
#ifdef CA_EMULATOR
  emu::named_barrier(id, count, false);
#else
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}

// Orders this thread's earlier shared-memory accesses (generic proxy: plain loads and stores) before
// later accesses by the async proxy (wgmma operands, TMA stores' sources): needed after writing a
// tile with plain stores and before a wgmma or TMA store reads it.
CA_DEVICE void fence_proxy_async_shared() {
#ifdef CA_EMULATOR
  emu::fence_proxy_async();
#else
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// elect.sync over the whole warp: true in exactly one lane (the ISA fixes no lane, only that the
// same mask elects the same lane).
CA_DEVICE bool elect_one_sync() {
#ifdef CA_EMULATOR
  return emu::elect_sync(0xffffffffu);
#else
  uint32_t ok;
  asm volatile("{\n.reg .pred p;\nelect.sync _|p, %1;\nselp.b32 %0, 1, 0, p;\n}\n" : "=r"(ok) : "r"(0xffffffffu));
  return ok != 0;
#endif
}

// setmaxnreg: raise (inc) or lower (dec) the per-thread register limit of the whole warpgroup to N
// (24..256, a multiple of 8). Every thread of the warpgroup executes the same instruction.
template <uint32_t N>
CA_DEVICE void setmaxnreg_inc() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
#ifdef CA_EMULATOR
  emu::setmaxnreg(true, N);
#else
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
#endif
}
template <uint32_t N>
CA_DEVICE void setmaxnreg_dec() {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
#ifdef CA_EMULATOR
  emu::setmaxnreg(false, N);
#else
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
#endif
}

// ---------------------------------------------------------------------------------------------
// TMA bulk tensor copies (tile mode). Coordinates are element indices, innermost dimension first,
// and may be negative or run past the tensor: out-of-bound elements of a load are filled (zeros, or
// NaN when the map asks for it), those of a store are not written.
//   tma_load(dst, map, bar, c0..)   global box -> shared `dst` (128-byte aligned), laid out densely
//                                   (innermost first) with the map's swizzle; when it has landed it
//                                   completes the box's bytes on `bar` (complete_tx)
//   tma_store(map, src, c0..)       shared box -> global, one bulk async-group per commit
//   tma_store_commit()              groups the stores issued since the last commit
//   tma_store_wait_read<N>()        at most N groups may still be reading their shared source
//   tma_store_wait<N>()             at most N groups may still be incomplete (writes not yet done)
// A thread that wrote the source box with plain stores must fence_proxy_async_shared() first.
CA_DEVICE void tma_load(void* dst, const TensorMap* map, uint64_t* bar, int c0) {
#ifdef CA_EMULATOR
  const int c[1] = {c0};
  emu::tma_load(dst, map, bar, 1, c);
#else
  asm volatile("cp.async.bulk.tensor.1d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3}], [%2];"
               ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(smem_u32(bar)), "r"(c0)
               : "memory");
#endif
}
CA_DEVICE void tma_load(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
#ifdef CA_EMULATOR
  const int c[2] = {c0, c1};
  emu::tma_load(dst, map, bar, 2, c);
#else
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
               ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
               : "memory");
#endif
}
CA_DEVICE void tma_load(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
#ifdef CA_EMULATOR
  const int c[3] = {c0, c1, c2};
  emu::tma_load(dst, map, bar, 3, c);
#else
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
               ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
#endif
}
CA_DEVICE void tma_load(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
#ifdef CA_EMULATOR
  const int c[4] = {c0, c1, c2, c3};
  emu::tma_load(dst, map, bar, 4, c);
#else
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];"
               ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
#endif
}
CA_DEVICE void tma_load(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3, int c4) {
#ifdef CA_EMULATOR
  const int c[5] = {c0, c1, c2, c3, c4};
  emu::tma_load(dst, map, bar, 5, c);
#else
  asm volatile("cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, %7}], [%2];"
               ::"r"(smem_u32(dst)), "l"((uint64_t)map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
               : "memory");
#endif
}

CA_DEVICE void tma_store(const TensorMap* map, const void* src, int c0) {
#ifdef CA_EMULATOR
  const int c[1] = {c0};
  emu::tma_store(map, src, 1, c);
#else
  asm volatile("cp.async.bulk.tensor.1d.global.shared::cta.bulk_group [%0, {%2}], [%1];"
               ::"l"((uint64_t)map), "r"(smem_u32(src)), "r"(c0)
               : "memory");
#endif
}
CA_DEVICE void tma_store(const TensorMap* map, const void* src, int c0, int c1) {
#ifdef CA_EMULATOR
  const int c[2] = {c0, c1};
  emu::tma_store(map, src, 2, c);
#else
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
               ::"l"((uint64_t)map), "r"(smem_u32(src)), "r"(c0), "r"(c1)
               : "memory");
#endif
}
CA_DEVICE void tma_store(const TensorMap* map, const void* src, int c0, int c1, int c2) {
#ifdef CA_EMULATOR
  const int c[3] = {c0, c1, c2};
  emu::tma_store(map, src, 3, c);
#else
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];"
               ::"l"((uint64_t)map), "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
#endif
}
CA_DEVICE void tma_store(const TensorMap* map, const void* src, int c0, int c1, int c2, int c3) {
#ifdef CA_EMULATOR
  const int c[4] = {c0, c1, c2, c3};
  emu::tma_store(map, src, 4, c);
#else
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];"
               ::"l"((uint64_t)map), "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
#endif
}
CA_DEVICE void tma_store(const TensorMap* map, const void* src, int c0, int c1, int c2, int c3, int c4) {
#ifdef CA_EMULATOR
  const int c[5] = {c0, c1, c2, c3, c4};
  emu::tma_store(map, src, 5, c);
#else
  asm volatile("cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];"
               ::"l"((uint64_t)map), "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
               : "memory");
#endif
}

CA_DEVICE void tma_store_commit() {
#ifdef CA_EMULATOR
  emu::bulk_commit();
#else
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
template <int N>
CA_DEVICE void tma_store_wait_read() {
  static_assert(N >= 0 && N <= 63, "cp.async.bulk.wait_group N: 0..63");
#ifdef CA_EMULATOR
  emu::bulk_wait(N, true);
#else
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
#endif
}
template <int N>
CA_DEVICE void tma_store_wait() {
  static_assert(N >= 0 && N <= 63, "cp.async.bulk.wait_group N: 0..63");
#ifdef CA_EMULATOR
  emu::bulk_wait(N, false);
#else
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
#endif
}

#endif  // CA_SM90A

}  // namespace sm90
}  // namespace ca
