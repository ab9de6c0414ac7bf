// params.cuh — the parameter structs of every kernel family, passed BY VALUE as the kernel's only
// argument. The launch layer builds the byte-identical NumPy structured scalar from one table
// (cupy_cosattn/launch/params.py, STRUCTS: the same fields in the same order, laid out by the same
// rules: natural alignment, a base struct first); tests/test_params_layout.py compares every offset
// and size with the C++ compiler's. Pointers are 64-bit device addresses (uint64 on the Python side);
// sizes that index memory are int64, so tensors beyond 2^31 elements are fine; strides are in elements.
#pragma once
#include "common.cuh"

namespace ca {

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
  int mode;            // fwd: NORM_COPY | NORM_ZERO_NONFINITE bits (norm.cu); 0 = normalize
};

// What the fused forward and the backward kernels both read. Canonical layout
// (cupy_cosattn/problem.py): q (B, H, Nq, D), k/v (B, Hk, Nk, D), o (B, H, Nq, D), lse (B, H, Nq).
// Query head h reads kv head h / (H / Hk). The last dim of every tensor is contiguous, every row
// starts 16-byte aligned and holds the kernel's padded head dim DP (D rounded up to 16) elements,
// zero past D (the launch layer guarantees all three).
struct AttnParams {
  const void* q;                  // normalized queries (qhat), dtype T
  const void* k;                  // normalized keys (khat), dtype T
  const void* v;                  // values, dtype T
  void* o;                        // output, dtype T (forward: written; backward: the forward's, read)
  float* lse;                     // (B, H, Nq) log-sum-exp of each row's visible logits (-inf: none)
  const float* scale;             // (H,) per-head logit scale
  const unsigned char* mask;      // (B, Nk) bool, True = may attend; null = no mask
  const unsigned char* tile_any;  // (B, tile_any_sb): any key of (b, key tile) unmasked, for the key
                                  // tile of the kernel that reads it; null = every tile may be visible
  const void* bias;               // (Bb, Hb, Nq, Nk), dtype T or float32 (bias_f32); null = no bias
  const int* cu_seqlens_q;        // (B + 1,) packed batch: sequence b holds query rows cu[b] .. cu[b+1]
  const int* cu_seqlens_k;        // (B + 1,) and key rows cu_k[b] .. cu_k[b+1]; null when dense (SeqView)
  int64_t q_sb, q_sh, q_sn;       // element strides of q over (b, h, row)
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sn;
  int64_t lse_sb, lse_sh;         // lse rows are contiguous
  int64_t bias_sb, bias_sh, bias_sq;  // 0 for a broadcast dim; keys are contiguous
  int64_t mask_sb;
  int64_t tile_any_sb;            // row length of tile_any (0 without it)
  int B, H, Hk, Nq, Nk, D;        // D: the padded row length DP (kernels read whole rows)
  int causal;                     // key j visible to query i iff j <= i + (Nk - Nq) (per sequence)
  int bias_f32;                   // the bias is float32 (else dtype T)
};

// Fused forward (forward.cu).
struct FwdParams : AttnParams {
  int n_key_tiles;                // ceil(Nk / BLOCK_N)
  int groups;                     // l2norm groups: |<qhat, khat>| <= groups, so |logit| <= scale_h groups
};

// The three backward kernels (backward.cu).
struct BwdParams : AttnParams {
  const void* dout;               // dL/dout, dtype T
  float* lse2;                    // (B*H, nq_pad) written by bwd_prep
  float* dvec;                    // (B*H, nq_pad) written by bwd_prep
  void* dbias;                    // where dS goes (dbias_mode), dtype float32 or T (dbias_f32)
  float* dq;                      // (B, H, Nq, D) fp32 dqhat
  void* dk;                       // (B, Hk * nsplit, Nk, D) dkhat, fp32 (dk_f32) or T
  void* dv;                       // same layout as dk, fp32 (dv_f32) or T
  float* dscale_rows;             // (B*H, 2, nq_pad) zeroed: per query row c_i = sum_j P_ij S_ij and
                                  // r_i = sum_j scale_h dS_ij as rounded for dqhat (dscale's
                                  // cancellation-free form, backward.cu), written when dscale_stats
  int64_t do_sb, do_sh, do_sn;
  int64_t dq_sb, dq_sh, dq_sn;
  int64_t dkv_sb, dkv_sh, dkv_sn;       // head index of dk/dv: hk * nsplit + split
  int64_t dbias_sb, dbias_sh, dbias_sq;
  int64_t n_y;                    // work items along grid y (the kernel loops past gridDim.y)
  int nq_pad;                     // row length of lse2 / dvec (a multiple of 128)
  int dbias_mode;                 // 0 none, 1 store dS, 2 fp32 atomicAdd of dS (broadcast bias, fast mode)
  int dbias_f32;                  // mode 1: dbias has dtype float32 (else T)
  int dq_atomic;                  // bwd_dkdv accumulates dqhat with fp32 atomicAdd
  int dk_f32;                     // dk is written as fp32 (else T)
  int dv_f32;                     // dv is written as fp32 (else T)
  int nsplit;                     // query-head splits per kv head
  int heads_per_split;            // query heads one bwd_dkdv block loops over: (H / Hk) / nsplit
  int n_chunks;                   // head-dim chunks (= D_PAD / DC of the launched kernel)
  int dscale_stats;               // write dscale_rows (dscale is needed)
};

// decode.cu (decode_fwd, decode_combine, kv_append): attention of Nq new queries per sequence against
// a (paged) KV cache, split over the keys. Rows of q, out and the partials are
// flattened (b, h, i) -> (b H + h) Nq + i. A cache row (page, kv head, slot) starts at
// base + page * sp + hk * sh + slot * sn elements; a contiguous cache is one page per sequence
// (page = b, slot = key, no block table). Every row starts 16-byte aligned and holds D elements.
struct DecodeParams {
  const void* q;              // (B, H, Nq, D) raw queries, dtype T, row stride q_sn
  void* k;                    // key cache (kv_append writes it), dtype T
  void* v;                    // value cache
  const void* k_new;          // kv_append: (B, Hk, Nq, D) keys to append, rows of D elements
  const void* v_new;
  const int* seqlens;         // (B,) valid keys per sequence before the append
  const int* block_table;     // (B, bt_sb) physical page of each logical page; null: contiguous
  const float* scale;         // (H,) per-head logit scale
  void* o;                    // (B*H*Nq, o_sn) final output, dtype T (decode_fwd with one split,
                              // decode_combine)
  float* lse;                 // (B*H*Nq) final log-sum-exp (-inf: no visible key)
  float* opart;               // (num_splits, B*H*Nq, D) fp32 partial numerators
  float* lpart;               // (num_splits, B*H*Nq) partial denominators
  float* mpart;               // (num_splits, B*H*Nq) partial maxima in log2 units (running max only)
  int64_t q_sn;
  int64_t k_sp, k_sh, k_sn;   // element strides of the key cache over (page, kv head, slot)
  int64_t v_sp, v_sh, v_sn;
  int64_t o_sn;
  int64_t bt_sb;              // row stride of block_table
  int64_t part_rows;          // B*H*Nq: rows per split of the partials
  int B, H, Hk, Nq, D;        // D: the head dim (a whole number of 16-byte chunks)
  int new_keys;               // keys appended before this launch (0 or Nq): L_b = seqlens[b] + new_keys
  int page_size;              // slots per page (a multiple of 16); unused without a block table
  int page_shift;             // log2(page_size) when it is a power of two, else -1
  int num_splits;             // key-range splits per (batch, kv head, row tile)
  int n_row_tiles;            // row tiles of the G*Nq rows of a kv head (grid x = tile + n_row_tiles*split)
  int causal;                 // query i sees key j iff j <= L_b - Nq + i
  int groups;                 // l2norm groups: |logit| <= scale_h groups on the fixed-offset path
  int norm_qk;                // normalize q and the cached keys on the fly (l2norm_qk)
  int pad_;
};

// ---------------------------------------------------------------------------------------------
// Packed variable-length batches (cu_seqlens). A varlen problem is laid out as q, o (total_q, H, DP),
// k, v (total_k, Hk, DP), lse (H, total_q); the launch layer sets B = number of sequences, Nq / Nk =
// the longest sequence (the grid), batch strides 0, and launches grid y = exactly the (batch, head)
// work items, so a block serves one sequence. The kernels' VARLEN instantiations take their record
// through SeqView<true>::of once at their start, which turns it into sequence b's own dense problem:
// pointers moved to its first row, Nq / Nk its lengths (so the causal diagonal Nk - Nq is bottom-right
// per sequence); a block whose tile starts past its sequence's end returns at once. The loops are
// unchanged, and SeqView<false> hands the record itself to the dense instantiations (no extra
// registers: the moved pointers and lengths live in registers, which the fp32 kernels do not have).
struct SeqBounds {
  int64_t q_base, k_base;  // first query / key row of the sequence in the packed tensors
  int nq, nk;              // its lengths
};

CA_DEVICE SeqBounds seq_bounds(const AttnParams& p, int b) {
  const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return SeqBounds{q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
}

template <typename E>
CA_DEVICE E* rows_at(E* x, int64_t row, int64_t stride, int elem_bytes) {
  return (E*)((const char*)x + row * stride * elem_bytes);
}

// The AttnParams part of sequence b's view.
template <typename T>
CA_DEVICE SeqBounds seq_view_attn(AttnParams& p, int b) {
  const SeqBounds s = seq_bounds(p, b);
  const int e = (int)sizeof(T);
  p.q = rows_at(p.q, s.q_base, p.q_sn, e);
  p.o = rows_at(p.o, s.q_base, p.o_sn, e);
  p.k = rows_at(p.k, s.k_base, p.k_sn, e);
  p.v = rows_at(p.v, s.k_base, p.v_sn, e);
  p.lse = rows_at(p.lse, s.q_base, 1, 4);
  p.Nq = s.nq;
  p.Nk = s.nk;
  return s;
}

template <typename T>
CA_DEVICE void seq_view(FwdParams& p, int b) {
  seq_view_attn<T>(p, b);
}

// The backward's rows: dout and dq like q, dk and dv like k. lse2 and dvec stay (B H, nq_pad).
template <typename T>
CA_DEVICE void seq_view(BwdParams& p, int b) {
  const SeqBounds s = seq_view_attn<T>(p, b);
  p.dout = rows_at(p.dout, s.q_base, p.do_sn, (int)sizeof(T));
  p.dq = rows_at(p.dq, s.q_base, p.dq_sn, 4);
  p.dk = rows_at(p.dk, s.k_base, p.dkv_sn, p.dk_f32 ? 4 : (int)sizeof(T));
  p.dv = rows_at(p.dv, s.k_base, p.dkv_sn, p.dv_f32 ? 4 : (int)sizeof(T));
}

// SeqView<VARLEN>::of<T>(params, b): the record a kernel works on (bind it to a const reference).
template <bool VARLEN> struct SeqView {
  template <typename T, typename P> static CA_DEVICE const P& of(const P& p, int) { return p; }
};
template <> struct SeqView<true> {
  // The view lives in shared memory: the loops re-read its fields after their barriers instead of
  // holding the moved pointers and lengths in registers (which the fused kernels do not have spare).
  template <typename T, typename P> static CA_DEVICE const P& of(const P& p, int b) {
    __shared__ P view;
    if (threadIdx.x == 0) {
      // word by word in a rolled loop, then moved in place: a struct assignment or a by-value view
      // is staged through local memory in some kernels (NVRTC 12.9 reports it as a spill)
      const unsigned* src = reinterpret_cast<const unsigned*>(&p);
      unsigned* dst = reinterpret_cast<unsigned*>(&view);
#pragma unroll 1
      for (int i = 0; i < (int)(sizeof(P) / 4); ++i) dst[i] = src[i];
      seq_view<T>(view, b);
    }
    __syncthreads();
    return view;
  }
};

}  // namespace ca
