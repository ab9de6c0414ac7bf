// hopper.h — the emulator's interface for the sm_90a primitives of cuda_src/hopper.cuh.
//
// Kernel modules reach the model through the C functions below (defined in hopper.cpp, which is
// compiled into libcaemu as part of runtime.cpp); hopper.cuh calls them through the emu:: wrappers
// at the end of this file under CA_EMULATOR. The layout of the emulator's tensor map (the 128 bytes
// cupy_cosattn/tensormap.py writes for the emulator, standing in for the driver's opaque
// CUtensorMap) is defined here too, once, for both sides.
#pragma once
#ifndef CA_EMULATOR
#error "emu/hopper.h is only for the CPU emulator build (-DCA_EMULATOR)"
#endif

#include <stdint.h>

// The emulator's tensor map: 128 bytes, 64-byte aligned like CUtensorMap. Enumerations use the CUDA
// driver's values (CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapFloatOOBfill, ...), so the
// Python encoder validates one set of arguments for both targets.
//   offset  size  field
//   0       4     magic kCaemuTensorMapMagic
//   4       1     data type (CUtensorMapDataType)
//   5       1     rank (1..5)
//   6       1     element size in bytes
//   7       1     swizzle (CUtensorMapSwizzle: 0 none, 1 32B, 2 64B, 3 128B)
//   8       1     interleave (CUtensorMapInterleave: only 0, none, is modelled)
//   9       1     out-of-bound fill (0 zeros, 1 NaN)
//   10      1     L2 promotion (recorded, not modelled)
//   11      5     reserved, zero
//   16      8     global address
//   24      40    global dims[5] (elements, innermost first; unused dims 0)
//   64      32    global strides[4] (bytes, of dims 1..rank-1; unused 0)
//   96      20    box dims[5] (elements; unused 0)
//   116     5     element strides[5] (1..8; unused 0)
//   121     7     reserved, zero
struct caemu_tensormap {
  uint32_t magic;
  uint8_t dtype, rank, elem_bytes, swizzle;
  uint8_t interleave, oob_fill, l2_promotion, reserved0[5];
  uint64_t global_address;
  uint64_t global_dim[5];
  uint64_t global_stride[4];
  uint32_t box_dim[5];
  uint8_t element_stride[5];
  uint8_t reserved1[7];
};
static_assert(sizeof(caemu_tensormap) == 128, "the emulator's tensor map is 128 bytes, like CUtensorMap");
const uint32_t kCaemuTensorMapMagic = 0x31414d54u;  // "TMA1" in memory order

// Operands of one wgmma.mma_async, as one thread passes them.
struct caemu_wgmma_args {
  float* d;            // this thread's N/2 accumulator registers
  const uint32_t* a;   // its 4 registers of A (register variant), or null (A from a descriptor)
  uint64_t desc_a;     // descriptor of A (descriptor variant)
  uint64_t desc_b;     // descriptor of B
  int n;               // N of m64nNk16
  int bf16;            // 1: .bf16 inputs, 0: .f16
  int scale_d;         // 1: D = A*B + D, 0: D = A*B
  int neg_a, neg_b;    // imm-scale-a / imm-scale-b == -1
  int trans_a, trans_b;  // imm-trans-a / imm-trans-b: 1 = MN-major
};

extern "C" {
uint32_t caemu_smem_addr(const void* p);
void caemu_wgmma_fence(void);
void caemu_wgmma_commit(void);
void caemu_wgmma_wait(int n);
void caemu_wgmma(const caemu_wgmma_args* args);
void caemu_mbar_init(uint64_t* bar, uint32_t count);
void caemu_mbar_arrive(uint64_t* bar, uint32_t count, uint32_t expect_tx_bytes);
void caemu_mbar_expect_tx(uint64_t* bar, uint32_t tx_bytes);
void caemu_mbar_complete_tx(uint64_t* bar, uint32_t tx_bytes);
int caemu_mbar_try_wait_parity(uint64_t* bar, uint32_t parity);
void caemu_named_barrier(uint32_t id, uint32_t count, int sync);
void caemu_fence_proxy_async(void);
int caemu_elect_sync(uint32_t member_mask);
void caemu_setmaxnreg(int inc, uint32_t count);
void caemu_tma_load(void* smem_dst, const void* tensor_map, uint64_t* bar, int rank, const int32_t* coords);
void caemu_tma_store(const void* tensor_map, const void* smem_src, int rank, const int32_t* coords);
void caemu_bulk_commit(void);
void caemu_bulk_wait(int n, int read_only);
}

namespace emu {
inline uint32_t smem_addr(const void* p) { return caemu_smem_addr(p); }
inline void wgmma_fence() { caemu_wgmma_fence(); }
inline void wgmma_commit() { caemu_wgmma_commit(); }
inline void wgmma_wait(int n) { caemu_wgmma_wait(n); }
inline void wgmma(float* d, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int n, bool bf16, bool scale_d,
                  bool neg_a, bool neg_b, bool trans_a, bool trans_b) {
  caemu_wgmma_args args{d, a, desc_a, desc_b, n, bf16, scale_d, neg_a, neg_b, trans_a, trans_b};
  caemu_wgmma(&args);
}
inline void mbar_init(uint64_t* bar, uint32_t count) { caemu_mbar_init(bar, count); }
inline void mbar_arrive(uint64_t* bar, uint32_t count, uint32_t tx) { caemu_mbar_arrive(bar, count, tx); }
inline void mbar_expect_tx(uint64_t* bar, uint32_t tx) { caemu_mbar_expect_tx(bar, tx); }
inline void mbar_complete_tx(uint64_t* bar, uint32_t tx) { caemu_mbar_complete_tx(bar, tx); }
inline bool mbar_try_wait_parity(uint64_t* bar, uint32_t parity) { return caemu_mbar_try_wait_parity(bar, parity) != 0; }
inline void named_barrier(uint32_t id, uint32_t count, bool sync) { caemu_named_barrier(id, count, sync ? 1 : 0); }
inline void fence_proxy_async() { caemu_fence_proxy_async(); }
inline bool elect_sync(uint32_t mask) { return caemu_elect_sync(mask) != 0; }
inline void setmaxnreg(bool inc, uint32_t count) { caemu_setmaxnreg(inc ? 1 : 0, count); }
inline void tma_load(void* dst, const void* tmap, uint64_t* bar, int rank, const int32_t* c) {
  caemu_tma_load(dst, tmap, bar, rank, c);
}
inline void tma_store(const void* tmap, const void* src, int rank, const int32_t* c) { caemu_tma_store(tmap, src, rank, c); }
inline void bulk_commit() { caemu_bulk_commit(); }
inline void bulk_wait(int n, bool read_only) { caemu_bulk_wait(n, read_only ? 1 : 0); }
}  // namespace emu
