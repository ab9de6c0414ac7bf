// decode.cu — attention of a few new queries per sequence against a (paged) KV cache, split over keys.
//
// Three kernels, launched in this order by cupy_cosattn/launch/decode.py:
//
//   kv_append      k_new, v_new (B, Hk, Nq, D) -> cache slots seqlens[b] .. seqlens[b] + Nq - 1
//                  (only when new keys are given; a launch of its own, so every block of the
//                  attention kernel sees the new keys: no ordering between blocks is needed).
//   decode_fwd     grid x = row tile + n_row_tiles * split, y = (batch, kv head). A block takes the
//                  rows of ALL query heads of its kv head's GQA group (row r = h_local Nq + i, so
//                  M = (H / Hk) Nq rows) and the key tiles [split start, split end) of its sequence,
//                  read through the block table; each K/V tile is loaded once for all those rows.
//   decode_combine with more than one split: out = sum_s O_s / sum_s l_s per row.
//
// Work split inside a block (4 warps, each holding one 16-row mma tile of the block's rows):
// WM warps along the rows and WN = 4 / WM along the keys of a tile. WM = 1 is the decode shape: the
// block's 16 rows (single-token decode with up to 16 query heads per kv head) are shared by all warps
// and each warp takes a quarter of every key tile (KT = BN / 4 keys); WM = 4 is the forward's shape
// (64 rows, each warp all BN keys) for many rows (speculative decoding, chunked prefill).
//
// Keys are raw in the cache (the cache contract; docs/kernels.md "KV-cache attention"): with
// l2norm_qk every landed K tile is normalized in shared memory before use (and the Q tile once), with
// norm.cu's arithmetic (fp32 sums, x / max(||x||, 1e-12), rounded to T). Keys at or past a sequence's
// length are never read: their rows are zero-filled by the tile load, and only tiles up to the block's
// last visible key exist.
//
// Non-finite values (docs/kernels.md "Non-finite values"): the dense forward's semantics. A NaN or Inf
// on a visible pair poisons its row (out and lse NaN, through every split); a key a row does not see
// never contributes. Keys past a sequence's length are never read; a key inside the block's range that
// some row must not see (Nq > 1 under causal) is on a tile whose V rows are scrubbed as in forward.cu
// (non-finite elements zeroed, the key flagged, a visible flagged pair gets P = NaN), so 0 * NaN never
// reaches an mma. A row whose partial O is not finite carries l = NaN into the warp join and the split
// combine, which keep NaN (l == 0, not l > 0, decides "no visible key").
//
// Fixed offset (the safe path: normalized q, k and logit bound scale_h groups small enough, see
// forward.cu): every split exponentiates against the same offset, so its partial numerator O_s and
// denominator l_s add across splits and warps with no maximum at all. RUNNING_MAX (l2norm_qk=False,
// or a bound too large for the dtype): each warp keeps the online-softmax maximum m; partials carry m
// and combine by the log-sum-exp rule (weights exp(m_s - max m)).
//
// Element types, the V scrub and flags are the forward's (forward.cu is included for them; the fp16
// headroom is fixed_offset.cuh's). The tile products are decode's own (below): one warp, one 16-row
// mma tile against KT keys, with the row sums of 16-bit P from a ones-mma; the forward's tiles.cuh
// products take several row tiles per warp and shared addresses of another layout.
#include "forward.cu"

namespace ca {
namespace dec {

using fwd::is_f32;
using fwd::quiet_nan;
using fwd::scrub_v;
using fwd::v_flagged;

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int COMBINE_WARPS = 4;  // decode_combine: one warp per output row
constexpr int APPEND_THREADS = 128;
constexpr float EPS = 1e-12f;     // problem.NORM_EPS, norm.cu EPS

// Shared rows of decode's tiles (Q, K, V): each padded by one 16-byte chunk, so that row starts move 4
// banks apart and ldmatrix (8 rows x 16 bytes) and the fp32 fragment loads (8 rows x 4 columns) are
// conflict-free; the padding's first element holds scrub_v's flag. BN (keys per tile) is part of the
// name only for the tile products' signatures: the pitch does not depend on it.
template <typename T, int DP, int BN>
struct Smem {
  static constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int ROW = DP + CHUNK;        // row pitch in elements
};

// ---------------------------------------------------------------------------------------------
// Decode's tile products: one warp's 16 rows (sQw, or qf in registers) against BN keys of a tile in
// shared memory (pitch Smem::ROW).
//
// fp16 / bf16 (mma.m16n8k16). Fragment layouts: common.cuh header.

// s[j] (keys 8j..8j+7) += Q_w K^T over the head dim. The A operand (16 rows x 16 dims) is qf[kk] when
// Q lives in registers, else one ldmatrix.x4 of the warp's Q rows; each ldmatrix.x4 of K yields the B
// operands of two 8-key column tiles (K rows are keys, so no transpose is needed).
template <typename T, int DP, int BN, bool Q_IN_REGS, int QF>
CA_DEVICE void tile_scores(float (&s)[BN / 8][4], const uint32_t (&qf)[QF][4], const T* sQw, const T* sK,
                           int lane) {
  constexpr int ROW = Smem<T, DP, BN>::ROW;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
    if constexpr (Q_IN_REGS) {
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qf[kk][i];
    } else {
      ldmatrix_x4(a, sQw + (lane % 16) * ROW + 16 * kk + (lane / 16) * 8);
    }
#pragma unroll
    for (int jj = 0; jj < BN / 16; ++jj) {
      uint32_t b[4];
      ldmatrix_x4(b, sK + (16 * jj + (lane / 16) * 8 + lane % 8) * ROW + 16 * kk + ((lane / 8) % 2) * 8);
      mma_m16n8k16(s[2 * jj], a, b, T());
      mma_m16n8k16(s[2 * jj + 1], a, b + 2, T());
    }
  }
}

// o[n] (dims 8n..8n+7) += P V. The accumulator layout of two adjacent 8-key tiles of P is exactly the
// A layout of one 16-key k-step, so P is packed to T in registers; ldmatrix.trans turns V's row-major
// (key, dim) tiles into B operands.
// The row sums come from the tensor cores too: one more mma per k-step against an all-ones B operand
// adds sum_k P[row][k] to every column of `lsum` (c0, c1: row g; c2, c3: row g+8). That sums exactly
// the rounded P that multiplies V (so a rounding shared by a row cancels in O / l), in fp32, and
// costs 1/(DP/8) of the P V products instead of a convert and an add per element.
template <typename T, int DP, int BN>
CA_DEVICE void tile_pv(float (&o)[DP / 8][4], float (&lsum)[4], const float (&s)[BN / 8][4], const T* sV, int lane) {
  constexpr int ROW = Smem<T, DP, BN>::ROW;
  const uint32_t ones[2] = {pack2<T>(1.f, 1.f), pack2<T>(1.f, 1.f)};
#pragma unroll
  for (int ks = 0; ks < BN / 16; ++ks) {
    const uint32_t a[4] = {pack2<T>(s[2 * ks][0], s[2 * ks][1]), pack2<T>(s[2 * ks][2], s[2 * ks][3]),
                           pack2<T>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                           pack2<T>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
    mma_m16n8k16(lsum, a, ones, T());
#pragma unroll
    for (int nn = 0; nn < DP / 16; ++nn) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sV + (16 * ks + ((lane / 8) % 2) * 8 + lane % 8) * ROW + 16 * nn + (lane / 16) * 8);
      mma_m16n8k16(o[2 * nn], a, b, T());
      mma_m16n8k16(o[2 * nn + 1], a, b + 2, T());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 tile products: 3xTF32 on mma.m16n8k8 (split_tf32 / mma_3xtf32 in common.cuh).

// s[j] += Q_w K^T. A (16 rows x 8 dims): a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4);
// B (8 dims x 8 keys): b0 = K[key g][dim t], b1 = K[key g][dim t+4]. An 8 x 4 block of fp32 is an
// 8 x 8 block of b16 to ldmatrix, and lane (g, t) receives 32-bit word t of row g: exactly these
// fragments. So the fp32 operands load with the same ldmatrix.x4 addressing as the 16-bit ones, with
// 4-float instead of 8-half column steps.
template <int DP, int BN>
CA_DEVICE void tile_scores_f32(float (&s)[BN / 8][4], const float* sQw, const float* sK, int lane) {
  constexpr int ROW = Smem<float, DP, BN>::ROW;
#pragma unroll
  for (int kk = 0; kk < DP / 8; ++kk) {
    uint32_t a[4], ab[4], as[4];
    ldmatrix_x4(a, sQw + (lane % 16) * ROW + 8 * kk + (lane / 16) * 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(bits_as_float(a[i]), ab[i], as[i]);
#pragma unroll
    for (int jj = 0; jj < BN / 16; ++jj) {
      uint32_t b[4], bb[4], bs[4];
      ldmatrix_x4(b, sK + (16 * jj + (lane / 16) * 8 + lane % 8) * ROW + 8 * kk + ((lane / 8) % 2) * 4);
#pragma unroll
      for (int i = 0; i < 4; ++i) split_tf32(bits_as_float(b[i]), bb[i], bs[i]);
      mma_3xtf32(s[2 * jj], ab, as, bb, bs);
      mma_3xtf32(s[2 * jj + 1], ab, as, bb + 2, bs + 2);
    }
  }
}

// o[n] += P V, one k-step per 8-key tile j of P. The k index is permuted so that P's accumulator
// layout is the A layout: A column t <-> key 2t and column t+4 <-> key 2t+1, hence
// a0 = c0 (g, 2t), a1 = c2 (g+8, 2t), a2 = c1 (g, 2t+1), a3 = c3 (g+8, 2t+1); V rows follow the same
// map: b0 = V[key 2t][dim g], b1 = V[key 2t+1][dim g]. V is read through one 32-bit shared address
// per k-step plus immediates (a generic pointer per element costs the registers that, at DP = 208
// with a running max, ptxas otherwise spills on sm_80).
template <int DP, int BN>
CA_DEVICE void tile_pv_f32(float (&o)[DP / 8][4], const float (&s)[BN / 8][4], const float* sV, int g, int t) {
  constexpr int ROW = Smem<float, DP, BN>::ROW;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    uint32_t ab[4], as[4];
    split_tf32(s[j][0], ab[0], as[0]);
    split_tf32(s[j][2], ab[1], as[1]);
    split_tf32(s[j][1], ab[2], as[2]);
    split_tf32(s[j][3], ab[3], as[3]);
    const saddr_t vj = smem_addr(sV + (8 * j + 2 * t) * ROW + g);
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const saddr_t vb = vj + (int)sizeof(float) * 8 * n;  // byte offsets
      uint32_t bb[2], bs[2];
      split_tf32(lds_f32(vb), bb[0], bs[0]);
      split_tf32(lds_f32(vb + (int)sizeof(float) * ROW), bb[1], bs[1]);
      mma_3xtf32(o[n], ab, as, bb, bs);
    }
  }
}


// A cache slot: physical page (the sequence itself for a contiguous cache) and row in the page.
struct Slot {
  int64_t page;
  int row;
};

// Where logical key `key` of sequence b lives. Only called for keys below the sequence's length, so
// the block table entries read are exactly those the launch layer checked on the host.
CA_DEVICE Slot locate(const DecodeParams& p, const int* bt_row, int b, int key) {
  if (bt_row == nullptr) return {b, key};
  const int lp = p.page_shift >= 0 ? key >> p.page_shift : key / p.page_size;
  const int row = p.page_shift >= 0 ? key & (p.page_size - 1) : key - lp * p.page_size;
  return {(int64_t)bt_row[lp], row};
}

// One K tile and one V tile (BN keys from key0, keys >= kend and columns >= D zero-filled, never
// read) into shared memory with cp.async. A page holds whole groups of 16 slots (page_size % 16 == 0)
// and tiles start on a group, so each warp takes whole groups: it locates its group's slots once (one
// block table read, one 64-bit page offset per cache) and then steps through the group's rows with
// 32-bit arithmetic, 16-byte pieces of consecutive rows on consecutive lanes.
template <typename T, int DP, int BN>
CA_DEVICE void load_kv_tile(T* sK, T* sV, const T* kc, const T* vc, const DecodeParams& p, const int* bt_row,
                            int b, int key0, int kend) {
  using L = Smem<T, DP, BN>;
  constexpr int CPR = DP / L::CHUNK;
  constexpr int GROUPS = BN / 16;         // 16-key groups per tile
  static_assert(BN % 16 == 0 && WARPS % GROUPS == 0, "whole groups per warp");
  constexpr int WPG = WARPS / GROUPS;     // warps sharing a group
  constexpr int PER_GROUP = 16 * CPR;     // 16-byte pieces of a group
  constexpr int STEP = 32 * WPG;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int grp = warp / WPG;
  const int key_g = key0 + 16 * grp;      // the group's first key
  const int k_sn = (int)p.k_sn, v_sn = (int)p.v_sn;  // 16 rows span < 2^31 elements (launch layer)
  const T* kb = kc;  // zero-fill: no byte is read, the address only has to be a valid one
  const T* vb = vc;
  if (key_g < kend) {
    const Slot s = locate(p, bt_row, b, key_g);
    kb = kc + s.page * p.k_sp + (int64_t)s.row * p.k_sn;
    vb = vc + s.page * p.v_sp + (int64_t)s.row * p.v_sn;
  }
#pragma unroll
  for (int it = 0; it < (PER_GROUP + STEP - 1) / STEP; ++it) {
    const int j = it * STEP + (warp % WPG) * 32 + lane;
    if (PER_GROUP % STEP == 0 || j < PER_GROUP) {
      const int rr = j / CPR, c = (j % CPR) * L::CHUNK;
      const bool in = key_g + rr < kend && c < p.D;
      T* const dst = sK + (16 * grp + rr) * L::ROW + c;
      cp_async_16(dst, in ? kb + rr * k_sn + c : kc, in ? 16 : 0);
      cp_async_16(dst + (sV - sK), in ? vb + rr * v_sn + c : vc, in ? 16 : 0);
    }
  }
}

// The block's query rows [0, rows) (row stride q_sn from q), zero past them and past column D.
template <typename T, int DP, int BM>
CA_DEVICE void load_q_tile(T* sQ, const T* q, const DecodeParams& p, int rows) {
  using L = Smem<T, DP, 16>;
  constexpr int CPR = DP / L::CHUNK;
  constexpr int TOTAL = BM * CPR;
#pragma unroll 1
  for (int i = threadIdx.x; i < TOTAL; i += THREADS) {
    const int r = i / CPR, c = (i % CPR) * L::CHUNK;
    const bool in = r < rows && c < p.D;
    cp_async_16(sQ + r * L::ROW + c, in ? q + r * p.q_sn + c : q, in ? 16 : 0);
  }
}

// Grouped l2 normalization in place of rows [0, ROWS) of a shared tile (pitch Smem::ROW): each of the
// `groups` chunks of the first D columns becomes x / max(||x||, EPS), rounded to T, as norm.cu does
// (columns past D are zero and stay zero). Two threads per row, each with half of it (whole 16-byte
// pieces), fp32 sums joined by one shuffle; rows are spread so that a warp holds 16 whole rows, which
// keeps the shuffle's warp complete (ROWS is a multiple of 16). Groups run one after the other: a
// group's scaling touches only its own columns, which no later group reads.
template <typename T, int DP, int ROWS>
CA_DEVICE void normalize_rows(T* tile, int D, int groups) {
  using L = Smem<T, DP, 16>;
  constexpr int CH = L::CHUNK;
  constexpr int HALF = DP / 2;
  constexpr int NCH = HALF / CH;  // 16-byte pieces per thread
  static_assert(HALF % CH == 0 && ROWS % 16 == 0, "half rows of whole 16-byte pieces, whole warps of rows");
  struct alignas(16) Piece { T e[CH]; };
  constexpr int PASSES = (ROWS + THREADS / 2 - 1) / (THREADS / 2);
  const int gs = D / groups;
  const int col0 = (threadIdx.x & 1) * HALF;
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
    const int row = pass * (THREADS / 2) + (int)threadIdx.x / 2;
    if (ROWS % (THREADS / 2) != 0 && row >= ROWS) break;  // (whole warps: see above)
    T* const base = tile + row * L::ROW + col0;
    for (int grp = 0; grp < groups; ++grp) {
      const int lo = grp * gs - col0, hi = lo + gs;  // the group's columns, relative to this half
      // A piece inside the group needs no per-element test (every piece, with one group).
      auto inside = [&](int c) { return c >= lo && c < hi; };
      float ss = 0.f;
#pragma unroll
      for (int ch = 0; ch < NCH; ++ch) {
        const int c0 = ch * CH;
        if (c0 + CH <= lo || c0 >= hi) continue;
        const bool whole = c0 >= lo && c0 + CH <= hi;
        const Piece x = *reinterpret_cast<const Piece*>(base + c0);
#pragma unroll
        for (int e = 0; e < CH; ++e) {
          const float f = to_float(x.e[e]);
          if (whole || inside(c0 + e)) ss += f * f;
        }
      }
      ss += __shfl_xor_sync(0xffffffffu, ss, 1);
      const float r = 1.f / fmaxf(sqrtf(ss), EPS);
#pragma unroll
      for (int ch = 0; ch < NCH; ++ch) {
        const int c0 = ch * CH;
        if (c0 + CH <= lo || c0 >= hi) continue;
        const bool whole = c0 >= lo && c0 + CH <= hi;
        Piece x = *reinterpret_cast<const Piece*>(base + c0);
        if (whole) {
#pragma unroll
          for (int e = 0; e < CH; e += 2) {
            if constexpr (sizeof(T) == 2) {  // pairs: one packed conversion each on the GPU
              const uint32_t pr = pack2<T>(to_float(x.e[e]) * r, to_float(x.e[e + 1]) * r);
              x.e[e].bits = (uint16_t)(pr & 0xffffu);
              x.e[e + 1].bits = (uint16_t)(pr >> 16);
            } else {
              x.e[e] = from_float<T>(to_float(x.e[e]) * r);
              x.e[e + 1] = from_float<T>(to_float(x.e[e + 1]) * r);
            }
          }
        } else {
#pragma unroll
          for (int e = 0; e < CH; ++e)
            if (inside(c0 + e)) x.e[e] = from_float<T>(to_float(x.e[e]) * r);
        }
        *reinterpret_cast<Piece*>(base + c0) = x;
      }
    }
  }
}

// With one l2norm group the keys are not rewritten: 1 / max(||k||, EPS) of each of the first ROWS rows
// goes to rnorm[row] and scales the row's scores (s = <qhat, k> / ||k||, the same value as <qhat, khat>
// without khat's rounding to T). Half the shared-memory traffic of normalize_rows and no stores to the
// tile. Same thread layout: two threads per row, fp32 sums joined by one shuffle.
template <typename T, int DP, int ROWS>
CA_DEVICE void key_rnorm(const T* tile, float* rnorm) {
  using L = Smem<T, DP, 16>;
  constexpr int CH = L::CHUNK;
  constexpr int HALF = DP / 2;
  constexpr int NCH = HALF / CH;
  constexpr int PASSES = (ROWS + THREADS / 2 - 1) / (THREADS / 2);
  static_assert(HALF % CH == 0 && ROWS % 16 == 0, "half rows of whole 16-byte pieces, whole warps of rows");
  struct alignas(16) Piece { T e[CH]; };
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
    const int row = pass * (THREADS / 2) + (int)threadIdx.x / 2;
    if (ROWS % (THREADS / 2) != 0 && row >= ROWS) break;  // whole warps
    const T* const base = tile + row * L::ROW + (threadIdx.x & 1) * HALF;
    float ss = 0.f;  // columns past D are zero
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
      const Piece x = *reinterpret_cast<const Piece*>(base + ch * CH);
#pragma unroll
      for (int e = 0; e < CH; ++e) {
        const float f = to_float(x.e[e]);
        ss += f * f;
      }
    }
    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
    if ((threadIdx.x & 1) == 0) rnorm[row] = 1.f / fmaxf(sqrtf(ss), EPS);
  }
}

// Staging of the warps' partial results after the key loop (fp32, over the Q/K/V area): the O rows of
// every warp (pitch DP + 4 floats: the float2 stores of a warp then hit distinct banks), then each
// warp's 16 row sums and 16 row maxima.
template <int DP>
struct Stage {
  static constexpr int PITCH = DP + 4;
  static constexpr int O = WARPS * 16 * PITCH;
  static constexpr int BYTES = (O + 2 * WARPS * 16) * 4;
};

// Blocks per SM the register allocation plans for (at most 255 registers per thread). Stated
// explicitly: with the block size alone ptxas picks register budgets that spill some instantiations.
// Two resident blocks keep two K/V tiles (64 KB at fp16 D = 128) in flight per SM, several times what
// covers HBM latency.
constexpr int MIN_BLOCKS = 2;

// ---------------------------------------------------------------------------------------------
// The attention kernel.
template <typename T, int DP, int BN, int WM, bool RUNNING_MAX>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS) decode_fwd(const DecodeParams p) {
  constexpr int WN = WARPS / WM;  // warps sharing the same rows, each with KT keys of a tile
  constexpr int KT = BN / WN;
  constexpr int BM = 16 * WM;     // rows per block
  static_assert(WM == 1 || WM == 2 || WM == 4, "warps along rows");
  static_assert(KT % 16 == 0 && KT >= 16, "whole 16-key k-steps per warp");
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= 256, "head dim padded to a multiple of 16, at most 256");
  constexpr bool F32 = is_f32<T>::value;
  constexpr bool Q_IN_REGS = !F32 && DP <= 128;
  using L = Smem<T, DP, BN>;
  constexpr int ROW = L::ROW;
  constexpr int QS = BM * ROW;
  constexpr int KV = BN * ROW;
  static_assert(Stage<DP>::BYTES <= (QS + 4 * KV) * (int)sizeof(T), "the staging fits over the tiles");
  // (shared memory: launch_decode.decode_smem_bytes = Q, 2 x K, 2 x V, 2 x BN key scales)

  CA_DYNAMIC_SHARED(smem);
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + QS;         // buffers: sK + buf * KV
  T* const sV = sK + 2 * KV;     // buffers: sV + buf * KV
  float* const stO = reinterpret_cast<float*>(smem);
  float* const stL = stO + Stage<DP>::O;
  float* const stM = stL + WARPS * 16;
  float* const sRn = reinterpret_cast<float*>(sV + 2 * KV);  // 1 / ||k|| per key: buffers sRn + buf * BN

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / WN, wn = warp % WN;
  T* const sQw = sQ + 16 * wm * ROW;

  const int G = p.H / p.Hk;
  const int M = G * p.Nq;  // rows of one kv head
  const int rt = (int)(blockIdx.x % (unsigned)p.n_row_tiles);
  const int split = (int)(blockIdx.x / (unsigned)p.n_row_tiles);
  const int r0 = rt * BM;
  const int rows = M - r0 < BM ? M - r0 : BM;  // real rows of this block
  const int64_t BHk = (int64_t)p.B * p.Hk;

  for (int64_t bk = blockIdx.y; bk < BHk; bk += gridDim.y) {
    const int b = (int)(bk / p.Hk), hk = (int)(bk % p.Hk);
    const int Lb = p.seqlens[b] + p.new_keys;  // keys of the sequence, after the append
    const int64_t row0 = ((int64_t)b * p.H + (int64_t)hk * G) * p.Nq + r0;  // flattened index of block row 0

    // Row R of the kv head (query i = R % Nq) sees keys below lim(R). Over the block's real rows the
    // smallest and largest limits: rows of several heads cover every i.
    auto limit = [&](int i) {
      const int l = Lb - p.Nq + i + 1;
      return p.causal ? (l < Lb ? l : Lb) : Lb;
    };
    const int R_last = r0 + rows - 1;
    const bool spans = r0 / p.Nq != R_last / p.Nq;
    const int lim_lo = limit(spans ? 0 : r0 % p.Nq);
    const int lim_hi = limit(spans ? p.Nq - 1 : R_last % p.Nq);
    const int kend = lim_hi > 0 ? lim_hi : 0;  // no key at or past it is read
    // Loaded keys some real row must not see: keys in [max(lim_lo, 0), kend) (causal with several
    // query positions in the block). Their tiles get V scrubbed.
    const bool hidden_keys = lim_lo < kend;
    const int n_tiles = (kend + BN - 1) / BN;
    const int tps = (n_tiles + p.num_splits - 1) / p.num_splits;
    const int tile_begin = split * tps < n_tiles ? split * tps : n_tiles;
    const int tile_end = tile_begin + tps < n_tiles ? tile_begin + tps : n_tiles;

    // This thread's accumulator rows g and g + 8 of its warp: key limit, scale and fixed offset (log2
    // units). Rows past the block's real rows compute on zero queries and are never stored.
    int lim[2];
    float scale_log2[2], offset_log2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int rr = 16 * wm + g + 8 * r;
      const bool real = rr < rows;
      const int R = r0 + (real ? rr : 0);
      lim[r] = real ? limit(R % p.Nq) : kend;
      const float sc = p.scale[hk * G + R / p.Nq];
      scale_log2[r] = sc * LOG2E;
      offset_log2[r] = (sc * p.groups - Headroom<T>::value) * LOG2E;
    }

    const T* const q = static_cast<const T*>(p.q) + row0 * p.q_sn;
    const T* const kc = static_cast<const T*>(p.k) + hk * p.k_sh;
    const T* const vc = static_cast<const T*>(p.v) + hk * p.v_sh;
    const int* const bt_row = p.block_table ? p.block_table + b * p.bt_sb : nullptr;

    float o[DP / 8][4];
    fill_zero(o);
    float lsum[4] = {0.f, 0.f, 0.f, 0.f};     // as in forward.cu (16-bit: complete; fp32: per thread)
    float row_m[2] = {neg_inf(), neg_inf()};  // RUNNING_MAX: running max of x (quad-uniform)
    uint32_t qf[Q_IN_REGS ? DP / 16 : 1][4];

    if (tile_begin < tile_end) {
      // Prologue: Q and the first K/V tile form one cp.async group.
      load_q_tile<T, DP, BM>(sQ, q, p, rows);
      load_kv_tile<T, DP, BN>(sK, sV, kc, vc, p, bt_row, b, tile_begin * BN, kend);
      cp_async_commit();

      for (int it = 0, tile = tile_begin; tile < tile_end; ++it, ++tile) {
        const int buf = it & 1;
        if (tile + 1 < tile_end)  // prefetch into the other buffer
          load_kv_tile<T, DP, BN>(sK + (buf ^ 1) * KV, sV + (buf ^ 1) * KV, kc, vc, p, bt_row, b, (tile + 1) * BN,
                                  kend);
        cp_async_commit();  // (possibly empty group: keeps the count uniform)
        cp_async_wait<1>();
        __syncthreads();    // tile `tile` (and, on the first one, Q) has landed for every thread
        // A tile holding a loaded key that some row must not see (block-uniform): V scrubbed.
        const bool scrub = hidden_keys && tile * BN + BN > lim_lo;
        if (p.norm_qk) {
          if (it == 0) normalize_rows<T, DP, BM>(sQ, p.D, p.groups);
          if (p.groups == 1) key_rnorm<T, DP, BN>(sK + buf * KV, sRn + buf * BN);
          else normalize_rows<T, DP, BN>(sK + buf * KV, p.D, p.groups);
        }
        if (scrub) scrub_v<T, DP, BN, ROW>(sV + buf * KV);  // (V only: disjoint from the normalization's rows)
        if (p.norm_qk || scrub) __syncthreads();  // normalized rows and scrubbed V visible to every warp
        if constexpr (Q_IN_REGS) {
          if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(qf[kk], sQw + (lane % 16) * ROW + 16 * kk + (lane / 16) * 8);
          }
        }
        const T* const sKw = sK + buf * KV + wn * KT * ROW;  // this warp's KT keys
        const T* const sVw = sV + buf * KV + wn * KT * ROW;
        const int key0 = tile * BN + wn * KT;

        float s[KT / 8][4];
        fill_zero(s);
        if constexpr (F32) tile_scores_f32<DP, KT>(s, sQw, sKw, lane);
        else tile_scores<T, DP, KT, Q_IN_REGS>(s, qf, sQw, sKw, lane);

        // Element (j, e): row g + 8 (e / 2), key key0 + 8j + 2t + e % 2. Per-element limits only on
        // tiles reaching the most restricted row's limit (block-uniform).
        if (p.norm_qk && p.groups == 1) {  // the keys' 1 / ||k|| (key_rnorm): column scales
#pragma unroll
          for (int j = 0; j < KT / 8; ++j) {
            const float* const rn = sRn + buf * BN + wn * KT + 8 * j + 2 * t;
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] *= rn[e & 1];
          }
        }
        const bool check = tile * BN + BN > lim_lo;
        auto visible = [&](int j, int e) { return key0 + 8 * j + 2 * t + (e & 1) < lim[e >> 1]; };
        // A visible key whose V row held a NaN or Inf (scrubbed tiles only) poisons the row through P.
        // The flags of this thread's 2 KT / 8 keys go to a bit mask first (one branch per tile), so
        // that the per-element tests below are selects.
        uint32_t vflags = 0;
        if (scrub) {
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c)
              vflags |= (uint32_t)v_flagged<T, DP, ROW>(sV + buf * KV, wn * KT + 8 * j + 2 * t + c) << (2 * j + c);
        }
        auto flagged = [&](int j, int e) { return ((vflags >> (2 * j + (e & 1))) & 1u) != 0; };
        // On tiles that need it, one pass of selects over the tile's elements: `hidden` where the row
        // does not see the key, NaN for a visible flagged key (one branch per tile, not per element).
        auto restrict_tile = [&](float hidden) {
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = !visible(j, e) ? hidden : (flagged(j, e) ? quiet_nan() : s[j][e]);
        };

        if constexpr (!RUNNING_MAX) {
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = exp2_fast(s[j][e] * scale_log2[e >> 1] - offset_log2[e >> 1]);
          if (check) restrict_tile(0.f);
          if constexpr (F32) {
#pragma unroll
            for (int j = 0; j < KT / 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) lsum[2 * (e >> 1)] += s[j][e];
          }
        } else {
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2[e >> 1];
          if (check) restrict_tile(neg_inf());
          float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(row_m[r], quad_max(tile_max[r]));
            const float m_use = m_new == neg_inf() ? 0.f : m_new;  // never (-inf) - (-inf)
            const float alpha = exp2_fast(row_m[r] - m_use);
            row_m[r] = m_new;
            tile_max[r] = m_use;
            lsum[2 * r] *= alpha;
            lsum[2 * r + 1] *= alpha;
#pragma unroll
            for (int n = 0; n < DP / 8; ++n) {
              o[n][2 * r] *= alpha;
              o[n][2 * r + 1] *= alpha;
            }
          }
#pragma unroll
          for (int j = 0; j < KT / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float pe = exp2_fast(s[j][e] - tile_max[e >> 1]);
              if constexpr (F32) lsum[2 * (e >> 1)] += pe;
              s[j][e] = pe;
            }
        }

        if constexpr (F32) tile_pv_f32<DP, KT>(o, s, sVw, g, t);
        else tile_pv<T, DP, KT>(o, lsum, s, sVw, lane);

        __syncthreads();  // every warp is done with this buffer before the next prefetch overwrites it
      }
    }

    // Epilogue: each warp's partial O, l and m (fp32) staged over the tiles. No barrier first: the key
    // loop ends on one (every warp has left the tiles), with only its last, empty cp.async group
    // pending, and a split without tiles loads nothing.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // poison = NaN when some element of the row's O is NaN or Inf (x * 0 is NaN exactly then), else
      // 0: the warp's l for the row becomes NaN, and so does everything the row's l reaches.
      float poison = 0.f;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) poison += o[n][2 * r] * 0.f + o[n][2 * r + 1] * 0.f;
      const float l = (F32 ? quad_sum(lsum[2 * r]) : lsum[2 * r]) + quad_sum(poison);
      float* const srow = stO + (warp * 16 + g + 8 * r) * Stage<DP>::PITCH;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        srow[8 * n + 2 * t] = o[n][2 * r];
        srow[8 * n + 2 * t + 1] = o[n][2 * r + 1];
      }
      if (t == 0) {
        stL[warp * 16 + g + 8 * r] = l;
        stM[warp * 16 + g + 8 * r] = row_m[r];
      }
    }
    __syncthreads();

    // Join the WN warps of each row and write: the final row (one split) or this split's partial.
    // Work item = (row, 4 columns); D is a multiple of 4.
    const int quads = p.D / 4;
    const bool direct = p.num_splits == 1;
    for (int idx = threadIdx.x; idx < BM * quads; idx += THREADS) {
      const int rr = idx / quads, c = (idx % quads) * 4;
      if (rr >= rows) break;  // rows are in order: every later item is past them too
      const int w0 = (rr / 16) * WN, lr = rr % 16;
      float m = 0.f;
      if constexpr (RUNNING_MAX) {
        m = neg_inf();
#pragma unroll
        for (int w = 0; w < WN; ++w) m = fmaxf(m, stM[(w0 + w) * 16 + lr]);
      }
      const float m_use = m == neg_inf() ? 0.f : m;
      float l = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int w = 0; w < WN; ++w) {
        // fixed offset: every warp used the same offset, so its sums add as they are
        const float wt = RUNNING_MAX ? exp2_fast(stM[(w0 + w) * 16 + lr] - m_use) : 1.f;
        const float* const src = stO + ((w0 + w) * 16 + lr) * Stage<DP>::PITCH + c;
        l += wt * stL[(w0 + w) * 16 + lr];
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += wt * src[k];
      }
      const int64_t row = row0 + rr;
      if (direct) {
        const float inv = l == 0.f ? 0.f : 1.f / l;  // no visible key: O = 0 (a NaN l stays NaN)
        T* const out = static_cast<T*>(p.o) + row * p.o_sn + c;
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = from_float<T>(acc[k] * inv);
        if (c == 0) {
          const float sc = p.scale[hk * G + (r0 + rr) / p.Nq];
          const float off = sc * p.groups - Headroom<T>::value;
          p.lse[row] = l == 0.f ? neg_inf() : (RUNNING_MAX ? m * LN2 + logf(l) : logf(l) + off);
        }
      } else {
        const int64_t prow = (int64_t)split * p.part_rows + row;
        float* const dst = p.opart + prow * p.D + c;
#pragma unroll
        for (int k = 0; k < 4; ++k) dst[k] = acc[k];
        if (c == 0) {
          p.lpart[prow] = l;
          if (RUNNING_MAX) p.mpart[prow] = l == 0.f ? neg_inf() : m;
        }
      }
    }
    __syncthreads();  // the staging area is the next (batch, kv head)'s Q/K/V tiles
  }
}

// ---------------------------------------------------------------------------------------------
// The split combine: one warp per output row (b, h, i), splits summed in index order (deterministic).
// Fixed offset: out = sum_s O_s / sum_s l_s, lse = log(sum_s l_s) + offset_h: plain sums, no maximum.
// RUNNING_MAX: weights w_s = exp2(m_s - max_s m_s), out = sum_s w_s O_s / sum_s w_s l_s,
// lse = (max m) ln 2 + log(sum_s w_s l_s). A row no split saw a key for gets O = 0, lse = -inf.
template <typename T, bool RUNNING_MAX>
__global__ void __launch_bounds__(COMBINE_WARPS * 32) decode_combine(const DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = p.num_splits;
  const int quads = p.D / 4;
  for (int64_t row = (int64_t)blockIdx.x * COMBINE_WARPS + warp; row < p.part_rows;
       row += (int64_t)gridDim.x * COMBINE_WARPS) {
    float m = 0.f;
    if constexpr (RUNNING_MAX) {
      m = neg_inf();
      for (int s = lane; s < S; s += 32) m = fmaxf(m, p.mpart[s * p.part_rows + row]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    const float m_use = m == neg_inf() ? 0.f : m;
    auto weight = [&](int s) { return RUNNING_MAX ? exp2_fast(p.mpart[s * p.part_rows + row] - m_use) : 1.f; };
    float l = 0.f;
    for (int s = lane; s < S; s += 32) l += weight(s) * p.lpart[s * p.part_rows + row];
    l = warp_sum(l);
    const float inv = l == 0.f ? 0.f : 1.f / l;  // a poisoned split's NaN l makes the row NaN
    T* const out = static_cast<T*>(p.o) + row * p.o_sn;
    for (int qd = lane; qd < quads; qd += 32) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int s = 0; s < S; ++s) {
        const float wt = weight(s);
        const float* const src = p.opart + (s * p.part_rows + row) * p.D + 4 * qd;
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += wt * src[k];
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) out[4 * qd + k] = from_float<T>(acc[k] * inv);
    }
    if (lane == 0) {
      const int h = (int)((row / p.Nq) % p.H);
      const float off = p.scale[h] * p.groups - Headroom<T>::value;
      p.lse[row] = l == 0.f ? neg_inf() : (RUNNING_MAX ? m * LN2 + logf(l) : logf(l) + off);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The append: row (b, hk, i) of k_new / v_new goes to slot seqlens[b] + i of its sequence, one
// 16-byte piece per thread (rows of D elements, contiguous k_new / v_new).
template <typename T>
__global__ void __launch_bounds__(APPEND_THREADS) kv_append(const DecodeParams p) {
  constexpr int CH = 16 / (int)sizeof(T);
  const int cpr = p.D / CH;
  const int64_t total = (int64_t)p.B * p.Hk * p.Nq * cpr;
  for (int64_t idx = (int64_t)blockIdx.x * APPEND_THREADS + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * APPEND_THREADS) {
    const int c = (int)(idx % cpr) * CH;
    const int64_t row = idx / cpr;  // (b Hk + hk) Nq + i
    const int i = (int)(row % p.Nq);
    const int64_t bh = row / p.Nq;
    const int hk = (int)(bh % p.Hk), b = (int)(bh / p.Hk);
    const int* const bt_row = p.block_table ? p.block_table + b * p.bt_sb : nullptr;
    const Slot s = locate(p, bt_row, b, p.seqlens[b] + i);
    T* const kd = static_cast<T*>(p.k) + s.page * p.k_sp + hk * p.k_sh + (int64_t)s.row * p.k_sn + c;
    T* const vd = static_cast<T*>(p.v) + s.page * p.v_sp + hk * p.v_sh + (int64_t)s.row * p.v_sn + c;
    copy16(kd, static_cast<const T*>(p.k_new) + row * p.D + c);
    copy16(vd, static_cast<const T*>(p.v_new) + row * p.D + c);
  }
}

}  // namespace dec
}  // namespace ca
