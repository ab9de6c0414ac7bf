// params.cuh — the parameter structs of every kernel family, passed BY VALUE as the kernel's only
// argument. The launch layer (cupy_cosattn/launch.py, make_record) builds the byte-identical NumPy
// structured scalar (dtype with align=True: natural alignment, the same rule as the C compiler), so the
// field order, types and names here and there must match one for one. Pointers are 64-bit device
// addresses (uint64 on the Python side); sizes that index memory are int64, so tensors beyond 2^31
// elements are fine; strides are in elements.
#pragma once
#include "common.cuh"

namespace ca {

// =============================================================================================
// Forward-engineer section: NormParams (norm.cu) and FwdParams (forward.cu).
// =============================================================================================

// Grouped l2 norm of `rows` rows of D elements: each row is split into `groups` chunks of D/groups
// and every chunk is divided by max(||chunk||, 1e-12).
struct NormParams {
  const void* x;       // (rows, D) input, dtype T, row stride x_stride
  void* xhat;          // fwd: (rows, xhat_cols) normalized rows, dtype T; columns D.. are written as 0
  float* rnorm;        // fwd: (rows, groups) 1 / max(||chunk||, eps), may be null
  const void* dxhat;   // bwd: (rows, D) gradient w.r.t. xhat, dtype TG (template), row stride dxhat_stride
  void* dx;            // bwd: (rows, D) gradient w.r.t. x, dtype T, row stride dx_stride
  int64_t rows;
  int64_t x_stride;
  int64_t xhat_stride;
  int64_t dxhat_stride;
  int64_t dx_stride;
  int D;
  int groups;
  int xhat_cols;       // fwd: columns written per xhat row (>= D; the padding is zero-filled)
  int pad_;
};

// Fused forward. Canonical layout (cupy_cosattn/problem.py): q (B, H, Nq, D), k/v (B, Hk, Nk, D),
// out (B, H, Nq, D), lse (B, H, Nq). Query head h reads kv head h / (H / Hk). The last dim of every
// tensor is contiguous, every row starts 16-byte aligned and holds the kernel's padded head dim DP
// (D rounded up to 16) elements, zero past D (the launch layer guarantees all three).
struct FwdParams {
  const void* q;                  // normalized queries (qhat), dtype T
  const void* k;                  // normalized keys (khat), dtype T
  const void* v;                  // values, dtype T
  void* o;                        // output, dtype T
  float* lse;                     // log-sum-exp of each row's visible logits (-inf: no visible key)
  const float* scale;             // (H,) per-head logit scale
  const unsigned char* mask;      // (B, Nk) bool, True = may attend; null = no mask
  const unsigned char* tile_any;  // (B, n_key_tiles): any key of (b, key tile) unmasked; null = all
  const void* bias;               // (Bb, Hb, Nq, Nk), dtype T or float32 (bias_f32); null = no bias
  int64_t q_sb, q_sh, q_sn;       // element strides of q over (b, h, row)
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sn;
  int64_t lse_sb, lse_sh;         // lse rows are contiguous
  int64_t bias_sb, bias_sh, bias_sq;  // 0 for a broadcast dim; keys are contiguous
  int64_t mask_sb;
  int64_t tile_any_sb;
  int B, H, Hk, Nq, Nk, D;          // D: the padded row length DP (kernels read whole rows)
  int causal;                     // key j visible to query i iff j <= i + (Nk - Nq)
  int bias_f32;                   // the bias is float32 (else dtype T)
  int n_key_tiles;                // ceil(Nk / BLOCK_N), the row length of tile_any
  int groups;                     // l2norm groups: |<qhat, khat>| <= groups, so |logit| <= scale_h groups
};

// =============================================================================================
// Backward-engineer section: BwdParams (backward.cu) goes below this line.
// =============================================================================================

}  // namespace ca
