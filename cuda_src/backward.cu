// backward.cu — gradients of fused cosine-sim attention (docs/design.md section 1, "Backward").
//
// Three kernels, run in this order by cupy_cosattn/launch_backward.py:
//
//   bwd_prep   per query row: D_i = sum_d dO_id O_id (fp32) and lse2_i = lse_i * log2(e), with
//              lse2 = +inf for a row that saw no key (lse = -inf) and for the padding rows past Nq.
//              exp2(x - lse2) is then exactly 0 for those rows: they contribute nothing, never NaN.
//   bwd_dkdv   one block per (key tile, batch, kv head [, query-head split] [, head-dim chunk]).
//              dK and dV of the tile's keys stay in fp32 registers while the block streams the query
//              tiles of every query head that reads this kv head (GQA/MQA summed in registers, in a
//              fixed order), with cp.async double buffering of Qhat, dO, lse2 and D. Per query tile:
//                S^T  = Khat Qhat^T                (tensor cores, recomputed)
//                P^T  = exp2(S^T scale_h log2e + bias log2e - lse2)   on visible pairs, else 0
//                dV  += P^T dO
//                dP^T = V dO^T
//                dS^T = P^T (dP^T - D)             -> dbias (the unscaled dS)
//                dK  += (scale_h dS^T) Qhat
//                dQ  += (scale_h dS) Khat          (only when dq_atomic: fp32 atomics, atomic_add2)
//   bwd_dq     deterministic mode's dQ: one block per (query tile, batch, query head), dQ in
//              registers while streaming the key tiles that can be visible (recomputes S, P, dP, dS;
//              no atomics anywhere). Fully masked key tiles are skipped here as in bwd_dkdv.
//
// No running maximum anywhere: P = exp(s - lse) is bounded by 1 because lse >= every visible logit
// of its row, whatever the bias or the norm of q and k.
//
// dscale_h = sum_ij dS_ij S_ij (S = <qhat_i, khat_j>) is reduced by the launch layer from
// sum_i <qhat_i, dqhat_i> = scale_h sum_ij dS_ij S_ij. That sum cancels: sum_j dS_ij = 0 exactly, but
// D_i comes from the rounded O, and its error e_i adds -e_i c_i to row i, with c_i = sum_j P_ij S_ij
// (large against the true sum when a row's S_ij are close to each other). With p.dscale_rows the
// kernels that produce dqhat also write, per query row, c_i and r_i = sum_j scale_h dS_ij, the latter
// from the same rounded operand (times 1/f) as dqhat: the launch layer then takes
// sum_i (<qhat_i, dqhat_i> - c_i r_i) = scale_h sum_ij dS_ij (S_ij - c_i), in which the error of D_i
// drops out (its coefficient is sum_j P_ij (S_ij - c_i) = 0). r_i is one extra mma per k-step against
// an all-ones B operand; c_i a product per score, summed over the row's keys (across lanes in
// bwd_dkdv, whose accumulator rows are keys).
//
// Non-finite values (docs/kernels.md "Non-finite values"): a row poisoned in the forward has lse = NaN,
// so lse2 and with it P and dS are NaN on exactly its visible pairs. Invisible pairs (P = 0) must add
// exactly 0 everywhere, so every other factor they meet is finite: the launch layer's pre-pass zeroes
// the non-finite elements of qhat, khat and v (norm.cu NORM_ZERO_NONFINITE: the row operands of
// dK = dS^T Qhat, dQ = dS Khat and dP = dO V^T), and bwd_prep stores D = 0 for a row whose D is not
// finite (a poisoned row, whose dS is NaN through P anyway). No select in the main loops.
//
// float16 range: dS is rounded to T as the A operand of the dK and dQ products. Its magnitude is
// |dO| |V| (plus the scale), unrelated to the gradients' own, so in float16 each warp keeps a
// power-of-two factor f <= 1 with |scale_h dS f| <= DS_F16_LIMIT: the operand is scale_h dS f and the
// fp32 accumulators are rescaled by the exact ratio when f shrinks and divided by f at the end
// (DsRange). bf16 and fp32 have fp32's exponent range and need none of this.
//
// Matrix products use the warp-level primitives of common.cuh: mma.m16n8k16 with ldmatrix for
// fp16/bf16, and 3xTF32 m16n8k8 for fp32 (x = big + small, d += a_s b_b + a_b b_s + a_b b_b), whose
// operands are loaded with scalar shared-memory reads.
#include "tiles.cuh"
#include "params.cuh"

namespace ca {
namespace bwd {


// ---------------------------------------------------------------------------------------------
// Warp-level matrix products. Shared-memory tiles are row-major with a padded row stride `ld`
// (elements). Names say how the operand is stored: A "mk" = [m][k] (k contiguous), A "km" = [k][m];
// B "nk" = [n][k], B "kn" = [k][n]. b2 loaders fill the B fragments of two adjacent n8 tiles.
// a_from_c turns fp32 accumulators (C layout, 16 x 8 tiles) into an A operand without touching
// shared memory; the k order it implies is matched by load_b2_kn_c.
template <typename T>
struct Mma16 {
  static constexpr int KSTEP = 16;  // k of one mma
  static constexpr int PAD = 8;     // smem row padding in elements (16 bytes: conflict-free ldmatrix)
  struct A { uint32_t r[4]; };
  struct B { uint32_t r[2]; };

  static CA_DEVICE void load_a_mk(A& a, const T* s, int ld, int m0, int k0, int lane) {
    const int row = m0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = k0 + (lane >> 4) * 8;
    ldmatrix_x4(a.r, s + row * ld + col);
  }
  static CA_DEVICE void load_a_km(A& a, const T* s, int ld, int m0, int k0, int lane) {
    const int i = lane >> 3;
    ldmatrix_x4_trans(a.r, s + (k0 + (i >> 1) * 8 + (lane & 7)) * ld + m0 + (i & 1) * 8);
  }
  static CA_DEVICE void load_b2_nk(B* b, const T* s, int ld, int n0, int k0, int lane) {
    const int i = lane >> 3;
    uint32_t r[4];
    ldmatrix_x4(r, s + (n0 + (i >> 1) * 8 + (lane & 7)) * ld + k0 + (i & 1) * 8);
    b[0].r[0] = r[0]; b[0].r[1] = r[1]; b[1].r[0] = r[2]; b[1].r[1] = r[3];
  }
  static CA_DEVICE void load_b2_kn(B* b, const T* s, int ld, int k0, int n0, int lane) {
    const int i = lane >> 3;
    uint32_t r[4];
    ldmatrix_x4_trans(r, s + (k0 + (i & 1) * 8 + (lane & 7)) * ld + n0 + (i >> 1) * 8);
    b[0].r[0] = r[0]; b[0].r[1] = r[1]; b[1].r[0] = r[2]; b[1].r[1] = r[3];
  }
  static CA_DEVICE void load_b2_kn_c(B* b, const T* s, int ld, int k0, int n0, int lane) {
    load_b2_kn(b, s, ld, k0, n0, lane);
  }
  // k-step kk of a 16 x (8 NT) accumulator: its n8 tiles 2kk and 2kk+1 are exactly an A fragment.
  template <int NT>
  static CA_DEVICE void a_from_c(A& a, const float (&c)[NT][4], int kk) {
    a.r[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
    a.r[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
    a.r[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a.r[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
  static CA_DEVICE void mma(float* d, const A& a, const B& b) { mma_m16n8k16(d, a.r, b.r, T()); }
  // A B operand of ones: an mma with it sums each row of A.
  static CA_DEVICE B ones() {
    B b;
    b.r[0] = b.r[1] = pack2<T>(1.f, 1.f);
    return b;
  }
  // Two adjacent elements (columns c, c+1) of a row of a shared-memory tile.
  static CA_DEVICE void store2(T* s, float x0, float x1) { *reinterpret_cast<uint32_t*>(s) = pack2<T>(x0, x1); }
};

template <typename T> struct Mma;
template <> struct Mma<half_t> : Mma16<half_t> {};
template <> struct Mma<bf16_t> : Mma16<bf16_t> {};

// fp32 through 3xTF32 (m16n8k8). Fragments (g = lane/4, t = lane%4): A a0 (g, t) a1 (g+8, t)
// a2 (g, t+4) a3 (g+8, t+4); B b0 (k t, n g) b1 (k t+4, n g).
template <>
struct Mma<float> {
  static constexpr int KSTEP = 8;
  static constexpr int PAD = 4;  // 16 bytes; with a row stride = 4 (mod 32) words, loads are conflict-free
  struct A { uint32_t big[4], small[4]; };
  struct B { uint32_t big[2], small[2]; };

  static CA_DEVICE void set_a(A& a, float x0, float x1, float x2, float x3) {
    split_tf32(x0, a.big[0], a.small[0]);
    split_tf32(x1, a.big[1], a.small[1]);
    split_tf32(x2, a.big[2], a.small[2]);
    split_tf32(x3, a.big[3], a.small[3]);
  }
  static CA_DEVICE void set_b(B& b, float x0, float x1) {
    split_tf32(x0, b.big[0], b.small[0]);
    split_tf32(x1, b.big[1], b.small[1]);
  }
  static CA_DEVICE void load_a_mk(A& a, const float* s, int ld, int m0, int k0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (m0 + g) * ld + k0 + t;
    set_a(a, p[0], p[8 * ld], p[4], p[8 * ld + 4]);
  }
  static CA_DEVICE void load_a_km(A& a, const float* s, int ld, int m0, int k0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (k0 + t) * ld + m0 + g;
    set_a(a, p[0], p[8], p[4 * ld], p[4 * ld + 8]);
  }
  static CA_DEVICE void load_b2_nk(B* b, const float* s, int ld, int n0, int k0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (n0 + g) * ld + k0 + t;
    set_b(b[0], p[0], p[4]);
    set_b(b[1], p[8 * ld], p[8 * ld + 4]);
  }
  static CA_DEVICE void load_b2_kn(B* b, const float* s, int ld, int k0, int n0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (k0 + t) * ld + n0 + g;
    set_b(b[0], p[0], p[4 * ld]);
    set_b(b[1], p[8], p[4 * ld + 8]);
  }
  // a_from_c uses A column t <-> accumulator column 2t and t+4 <-> 2t+1, so B row t must be k0+2t
  // and row t+4 must be k0+2t+1.
  static CA_DEVICE void load_b2_kn_c(B* b, const float* s, int ld, int k0, int n0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (k0 + 2 * t) * ld + n0 + g;
    set_b(b[0], p[0], p[ld]);
    set_b(b[1], p[8], p[ld + 8]);
  }
  template <int NT>
  static CA_DEVICE void a_from_c(A& a, const float (&c)[NT][4], int kk) {
    set_a(a, c[kk][0], c[kk][2], c[kk][1], c[kk][3]);
  }
  static CA_DEVICE void mma(float* d, const A& a, const B& b) { mma_3xtf32(d, a.big, a.small, b.big, b.small); }
  static CA_DEVICE B ones() {
    B b;
    set_b(b, 1.f, 1.f);
    return b;
  }
  static CA_DEVICE void store2(float* s, float x0, float x1) { s[0] = x0; s[1] = x1; }
};

// acc[NT][4] += A (16 x K: rows m0.. of sA, [m][k]) * B (K x 8 NT: rows n0.. of sB, [n][k]).
template <typename T, int NT, int K>
CA_DEVICE void gemm_nk(float (&acc)[NT][4], const T* sA, int lda, int m0, const T* sB, int ldb, int n0, int lane) {
  typedef Mma<T> M;
  // Unrolled (fragment loads run ahead of the mma) while the registers allow: 16-bit fully up to 64
  // columns and by two steps up to 128; fp32 (3xTF32 fragments take twice the registers) and wider
  // 16-bit rows rolled (unrolled, bwd_dkdv spills there).
  constexpr int UNROLL = sizeof(T) == 4 || K > 128 ? 1 : (K <= 64 ? K / M::KSTEP : 2);
#pragma unroll UNROLL
  for (int k0 = 0; k0 < K; k0 += M::KSTEP) {
    typename M::A a;
    M::load_a_mk(a, sA, lda, m0, k0, lane);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      typename M::B b[2];
      M::load_b2_nk(b, sB, ldb, n0 + n * 8, k0, lane);
      M::mma(acc[n], a, b[0]);
      M::mma(acc[n + 1], a, b[1]);
    }
  }
}

// acc[NT][4] += C (16 x 8 KT, fp32 accumulators in registers) * B (rows 0.. of sB, [k][n], columns n0..).
template <typename T, int NT, int KT>
CA_DEVICE void gemm_ck(float (&acc)[NT][4], const float (&c)[KT][4], const T* sB, int ldb, int n0, int lane) {
  typedef Mma<T> M;
#pragma unroll
  for (int kk = 0; kk < KT * 8 / M::KSTEP; ++kk) {
    typename M::A a;
    M::a_from_c(a, c, kk);
#pragma unroll
    for (int n = 0; n < NT; n += 2) {
      typename M::B b[2];
      M::load_b2_kn_c(b, sB, ldb, kk * M::KSTEP, n0 + n * 8, lane);
      M::mma(acc[n], a, b[0]);
      M::mma(acc[n + 1], a, b[1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tiles.
// The widest multiple of 16 that divides d_pad and is at most limit: the head-dim columns one block
// accumulates (blocks for the other chunks recompute S and dP).
__host__ __device__ constexpr int chunk_cols(int d_pad, int limit, int c = 0) {
  return c == 0 ? chunk_cols(d_pad, limit, (limit < d_pad ? limit : d_pad) / 16 * 16)
                : (d_pad % c == 0 ? c : chunk_cols(d_pad, limit, c - 16));
}
#ifndef DQ_F32_MAX_COLS
#define DQ_F32_MAX_COLS 112
#endif

// Both main kernels use 16-row warp slabs; D_PAD (a multiple of 16, and of 32 above 128) is the
// head dim padded with zeros; DC the columns of dK/dV (or dQ) one block accumulates.
// SMALL selects the small-shared-memory variant, for devices whose opt-in shared memory per block
// (99 KB on sm_86/sm_89) the default tiles exceed: half the warps (so half the block's own rows) and
// a streamed tile of 16 rows. Its one-warp bwd_dkdv (fp32 above DP = 128) also stages scale_h dS^T
// in the current stage's dO tile (dead once dP^T = V dO^T is done) instead of a tile of its own:
// without that, fp32 DP = 256 misses 99 KB by 320 bytes (elsewhere it costs a barrier and, for fp32
// DP = 128, spills). The default (SMALL = false) is unchanged.
template <typename T, int D_PAD, bool SMALL = false>
struct KVTraits {
  static constexpr bool F32 = sizeof(T) == 4;
  static constexpr int NW_DEFAULT = (F32 && D_PAD > 128) ? 2 : 4;
  static constexpr int NW = SMALL ? NW_DEFAULT / 2 : NW_DEFAULT;  // warps; each owns 16 keys
  static constexpr int BC = 16 * NW;                        // keys per block
  static constexpr int BR = (F32 || SMALL) ? 16 : (D_PAD <= 64 ? 64 : 32);  // queries per streamed tile
  static constexpr int DC = chunk_cols(D_PAD, 128);
  static constexpr int NCHUNK = D_PAD / DC;
  static constexpr int SK = D_PAD + Mma<T>::PAD;            // row stride of the K, V, Q, dO tiles
  static constexpr int SDS = BR + 8;                        // row stride of the dS^T tile
  static constexpr bool DS_IN_DO = SMALL && NW == 1;        // dS^T staged in the current dO stage
  static constexpr int THREADS = 32 * NW;
  static constexpr int SMEM = (int)sizeof(T) * (2 * BC * SK + 4 * BR * SK + (DS_IN_DO ? 0 : BC * SDS)) +
                              (int)sizeof(float) * 4 * BR + (int)sizeof(int) * BC;
  static_assert(D_PAD % 16 == 0 && D_PAD <= 256 && (D_PAD <= 128 || D_PAD % 32 == 0), "bad D_PAD");
  static_assert(NW >= 1 && NW % (BR / 16) == 0, "dQ products need the query m-tiles to divide the warps");
  static_assert(!DS_IN_DO || BC * SDS <= BR * SK, "the dS^T tile must fit in a dO stage");
};

template <typename T, int D_PAD, bool SMALL = false>
struct QTraits {
  static constexpr bool F32 = sizeof(T) == 4;
  static constexpr int NW_DEFAULT = (F32 && D_PAD > 128) ? 2 : 4;
  static constexpr int NW = SMALL ? NW_DEFAULT / 2 : NW_DEFAULT;  // warps; each owns 16 queries
  static constexpr int BR = 16 * NW;                        // queries per block
  static constexpr int BC = (F32 || SMALL) ? 16 : (D_PAD <= 64 ? 64 : 32);  // keys per tile
  static constexpr int DC = chunk_cols(D_PAD, F32 ? DQ_F32_MAX_COLS : 128);
  static constexpr int NCHUNK = D_PAD / DC;
  static constexpr int SK = D_PAD + Mma<T>::PAD;
  static constexpr int THREADS = 32 * NW;
  static constexpr int SMEM = (int)sizeof(T) * (2 * BR * SK + 4 * BC * SK) + (int)sizeof(int) * 2 * BC;
};

// ---------------------------------------------------------------------------------------------
// Loads. A tile of ROWS rows x D_PAD columns from global rows g[r * g_sn] into shared rows
// s[r * SK], by 16-byte cp.async chunks; rows >= rows_valid and columns >= D are zero-filled.
// Each thread owns one column chunk and walks down the rows with a running pointer (a rolled
// loop), so no per-chunk 64-bit address is kept live across the caller's main loop.
__host__ __device__ constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }

template <typename T, int ROWS, int D_PAD, int SK, int THREADS>
CA_DEVICE void load_rows_async(T* s, const T* g, int64_t g_sn, int rows_valid, int D, int tid) {
  constexpr int EPC = 16 / (int)sizeof(T);   // elements per chunk
  constexpr int CPR = D_PAD / EPC;           // chunks per row
  constexpr int CW = pow2_ceil(CPR);         // threads per row (the extra ones idle)
  if constexpr (CW > THREADS) {
    // A row has more chunks than the block has threads (fp32 rows of 192+ columns in the one-warp
    // blocks of the SMALL variants): each thread takes chunks tid, tid + THREADS, ... of every row.
#pragma unroll 1
    for (int cc = tid; cc < CPR; cc += THREADS) {
      const int col = cc * EPC;
      const int rem = D - col;
      const int full = rem >= EPC ? 16 : (rem > 0 ? rem * (int)sizeof(T) : 0);
      const T* src = g + col;
      T* dst = s + col;
#pragma unroll 1
      for (int r = 0; r < ROWS; ++r) {
        const int bytes = r < rows_valid ? full : 0;
        cp_async_16(dst, bytes > 0 ? src : g, bytes);
        src += g_sn;
        dst += SK;
      }
    }
  } else {
    constexpr int STEP = THREADS / CW;         // rows per pass
    const int cc = tid % CW, r0 = tid / CW;
    if (cc < CPR && r0 < ROWS) {
      const int col = cc * EPC;
      const int rem = D - col;
      const int full = rem >= EPC ? 16 : (rem > 0 ? rem * (int)sizeof(T) : 0);
      const T* src = g + r0 * g_sn + col;
      T* dst = s + r0 * SK + col;
      // r0 < STEP, so pass k covers row r0 + k STEP: a compile-time trip count, unrolled when short
      // (a long unrolled walk keeps too many addresses live for the wide-row kernels' registers).
      constexpr int PASSES = (ROWS + STEP - 1) / STEP;
#pragma unroll (PASSES <= 4 ? PASSES : 1)
      for (int k = 0; k < PASSES; ++k) {
        const int r = r0 + k * STEP;
        if (ROWS % STEP == 0 || r < ROWS) {
          const int bytes = r < rows_valid ? full : 0;
          cp_async_16(dst, bytes > 0 ? src : g, bytes);
        }
        src += STEP * g_sn;
        dst += STEP * SK;
      }
    }
  }
}

// N floats (N % 4 == 0, 16-byte aligned, all in bounds) by cp.async.
template <int N, int THREADS>
CA_DEVICE void load_f32_async(float* s, const float* g, int tid) {
  static_assert(N / 4 <= THREADS, "one chunk per thread");
  if (tid < N / 4) cp_async_16(s + 4 * tid, g + 4 * tid, 16);
}

// A warp's bias fragment in log2 units, 0 without a bias or out of range: element (n, e) of an
// NT x 4 accumulator tile is bias[query i][key j] with {i, j} = at(n, e).
struct RowCol { int i, j; };
template <typename T, int NT, typename At>
CA_DEVICE void load_bias_frag(float (&b2)[NT][4], const BwdParams& p, int b, int h, At at) {
  fill_zero(b2);
  if (p.bias == nullptr) return;
  const int64_t bb = b * p.bias_sb + h * p.bias_sh;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const RowCol ij = at(n, e);
      if (ij.i < p.Nq && ij.j < p.Nk) b2[n][e] = load_f32_or<T>(p.bias, bb + ij.i * p.bias_sq + ij.j, p.bias_f32) * LOG2E;
    }
}

template <typename T>
CA_DEVICE void store_dbias(const BwdParams& p, int64_t off, float x) {
  if (p.dbias_mode == 2) {
    atomicAdd(static_cast<float*>(p.dbias) + off, x);
  } else if (p.dbias_f32) {
    static_cast<float*>(p.dbias)[off] = x;
  } else {
    static_cast<T*>(p.dbias)[off] = from_float<T>(x);
  }
}

// The float16 operand range of scale_h dS (file comment). DsRange<T>::value: whether T needs it.
template <typename T> struct DsRange { static constexpr bool value = false; };
template <> struct DsRange<half_t> { static constexpr bool value = true; };
constexpr float DS_F16_LIMIT = 32768.f;  // 2^15 < 65504: a rounded operand never overflows
constexpr int DS_F16_TARGET_EXP = 13;    // a new factor maps the warp's largest |scale_h dS| into [2^13, 2^14)

CA_DEVICE float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// The warp's factor f for this tile's c = scale_h dS (NT x 4 fp32 per lane), then c *= f. When the
// largest finite |c| times the current f exceeds DS_F16_LIMIT, f shrinks to a power of two that maps
// it into [2^13, 2^14) and the accumulators acc (in units of the old f) are multiplied by new f / old f
// (an exact power of two). An Inf or NaN in c is left to propagate. Warp-uniform.
// Returns new f / old f (1 when f is unchanged), for accumulators the caller keeps elsewhere.
template <int NT, int NA>
CA_DEVICE float ds_range_f16(float (&c)[NT][4], float& f, float (&acc)[NA][4]) {
  float ratio = 1.f;
  float mx = 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float a = fabsf(c[n][e]);
      if (a <= 3.402823466e38f) mx = fmaxf(mx, a);
    }
  mx = warp_max(mx);
  if (mx * f > DS_F16_LIMIT) {
    const int ex = (int)((__float_as_uint(mx) >> 23) & 0xffu) - 127;  // floor(log2 mx), mx is normal
    const float f_new = bits_as_float((uint32_t)(127 + DS_F16_TARGET_EXP - ex) << 23);
    ratio = f_new / f;
#pragma unroll
    for (int n = 0; n < NA; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] *= ratio;
    f = f_new;
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[n][e] *= f;
  return ratio;
}

// Sums v (a lane's K values, K a power of two) over the 8 row groups g = lane / 4 of a warp, for
// accumulators whose rows are g and g + 8 and whose K values are the lane's columns: a reduce-scatter
// (each xor step halves the values a lane keeps). Afterwards v[0 .. max(K / 8, 1)) hold the sums of
// values base, base + 1, ...; with K < 8 several lanes hold the same sum and only `owner` lanes hold
// it once. SIZE: values still held; STAGE: 0, 1, 2 for lane masks 16, 8, 4.
template <int SIZE, int STAGE, int K>
CA_DEVICE void sum_over_row_groups(float (&v)[K], int lane, int& base, bool& owner) {
  if constexpr (STAGE < 3) {
    const int m = 16 >> STAGE;
    const bool hi = (lane & m) != 0;
    if constexpr (SIZE > 1) {
      constexpr int HALF = SIZE / 2;
#pragma unroll
      for (int k = 0; k < HALF; ++k) {
        const float send = hi ? v[k] : v[k + HALF];
        const float keep = hi ? v[k + HALF] : v[k];
        v[k] = keep + __shfl_xor_sync(0xffffffffu, send, m);
      }
      if (hi) base += HALF;
      sum_over_row_groups<HALF, STAGE + 1>(v, lane, base, owner);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], m);
      if (hi) owner = false;
      sum_over_row_groups<1, STAGE + 1>(v, lane, base, owner);
    }
  }
}

// =============================================================================================
// bwd_prep: lse2 and D, one warp per row.
constexpr int PREP_WARPS = 4;
constexpr int PREP_ROWS_PER_WARP = 8;
constexpr int PREP_ROWS = PREP_WARPS * PREP_ROWS_PER_WARP;  // rows per block; divides nq_pad

template <typename T, int D_PAD, bool VARLEN = false>
__global__ void __launch_bounds__(32 * PREP_WARPS) bwd_prep(const BwdParams params) {
  const BwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / params.H));  // params.cuh
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t y = blockIdx.y; y < p.n_y; y += gridDim.y) {
    const int b = (int)(y / p.H), h = (int)(y % p.H);
    const T* o = static_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
    for (int rr = 0; rr < PREP_ROWS_PER_WARP; ++rr) {
      const int i = blockIdx.x * PREP_ROWS + warp * PREP_ROWS_PER_WARP + rr;
      float dsum = 0.f, l2 = pos_inf();
      if (i < p.Nq) {
#pragma unroll
        for (int d0 = 0; d0 < D_PAD; d0 += 32) {
          const int d = d0 + lane;
          if (d < p.D) dsum += to_float(dout[i * p.do_sn + d]) * to_float(o[i * p.o_sn + d]);
        }
        dsum = warp_sum(dsum);
        const float l = p.lse[b * p.lse_sb + h * p.lse_sh + i];
        l2 = l < -3.0e38f ? pos_inf() : l * LOG2E;  // lse = -inf: no visible key; NaN: poisoned row
        // A poisoned row's O is NaN; its D must not be, or 0 * (dP - D) would reach its invisible pairs.
        if (!(fabsf(dsum) <= 3.402823466e38f)) dsum = 0.f;
      }
      if (lane == 0) {
        p.lse2[y * p.nq_pad + i] = l2;
        p.dvec[y * p.nq_pad + i] = dsum;
      }
    }
  }
}

// =============================================================================================
// bwd_dkdv: see the file comment. Grid: x = key tile * n_chunks + chunk, y = (b, hk, split).
template <typename T, int D_PAD, bool SMALL = false, bool VARLEN = false>
__global__ void __launch_bounds__(KVTraits<T, D_PAD, SMALL>::THREADS, 1) bwd_dkdv(const BwdParams params) {
  typedef KVTraits<T, D_PAD, SMALL> C;
  typedef Mma<T> M;
  constexpr int BC = C::BC, BR = C::BR, DC = C::DC, SK = C::SK, SDS = C::SDS, NTH = C::THREADS;
  constexpr int NT = BR / 8;    // n8 tiles of a 16 x BR slab of S^T
  constexpr int ND = DC / 8;    // n8 tiles of the dK / dV accumulators

  CA_DYNAMIC_SHARED(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BC * SK;
  T* sQ = sV + BC * SK;          // [2][BR][SK]
  T* sdO = sQ + 2 * BR * SK;     // [2][BR][SK]
  T* sdS = sdO + 2 * BR * SK;    // [BC][SDS]: scale_h dS^T, for the dQ product (DS_IN_DO: none)
  float* sL = reinterpret_cast<float*>(sdS + (C::DS_IN_DO ? 0 : BC * SDS));  // [2][BR] lse2
  float* sDv = sL + 2 * BR;                                // [2][BR] D
  int* sOk = reinterpret_cast<int*>(sDv + 2 * BR);        // [BC] key visible (in range and unmasked)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const BwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / ((int64_t)params.nsplit * params.Hk)));
  const int chunk = blockIdx.x % p.n_chunks;
  const int j0 = (blockIdx.x / p.n_chunks) * BC;
  if (VARLEN && j0 >= p.Nk) return;  // a key tile past its sequence's end
  const int c0 = chunk * DC;
  const int off = p.Nk - p.Nq;
  const int qpk = p.H / p.Hk;
  const int nqt = (p.Nq + BR - 1) / BR;

  for (int64_t y = blockIdx.y; y < p.n_y; y += gridDim.y) {
    const int s = (int)(y % p.nsplit);
    const int hk = (int)((y / p.nsplit) % p.Hk);
    const int b = (int)(y / ((int64_t)p.nsplit * p.Hk));
    const int h_first = hk * qpk + s * p.heads_per_split;

    __syncthreads();  // the previous work item is done with shared memory
    if (tid < BC) {
      const int j = j0 + tid;
      sOk[tid] = j < p.Nk && (p.mask == nullptr || p.mask[b * p.mask_sb + j]);
    }
    __syncthreads();
    int any = 0, all_ok = 1;
    for (int r = 0; r < BC; ++r) {
      any |= sOk[r];
      all_ok &= sOk[r];
    }
    int key[2], key_ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      key[r] = j0 + 16 * warp + g + 8 * r;
      key_ok[r] = sOk[16 * warp + g + 8 * r];
    }
    // Query tiles that can see this key tile: causal hides it from queries i < j0 - off.
    const int q_first = p.causal ? max(0, j0 - off) : 0;
    const int qt0 = q_first / BR;
    const int per_head = (any && q_first < p.Nq) ? nqt - qt0 : 0;
    const int n_it = per_head * p.heads_per_split;

    float acc_dk[ND][4], acc_dv[ND][4];
    fill_zero(acc_dk);
    fill_zero(acc_dv);
    float ds_f = 1.f;  // float16: acc_dk holds dK times this warp's factor (DsRange)
    // dscale's row sums (file comment) come with the dqhat atomics; chunk 0 adds them.
    const bool stats = p.dscale_stats != 0;

    if (n_it > 0) {
      const T* gk = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + (int64_t)j0 * p.k_sn;
      const T* gv = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + (int64_t)j0 * p.v_sn;
      load_rows_async<T, BC, D_PAD, SK, NTH>(sK, gk, p.k_sn, p.Nk - j0, p.D, tid);
      load_rows_async<T, BC, D_PAD, SK, NTH>(sV, gv, p.v_sn, p.Nk - j0, p.D, tid);
    }

    // Stage loads of query head h_, query rows i0_.. (iteration it runs head h_first + it / per_head,
    // query tile qt0 + it % per_head; the loop below steps both without dividing).
#define CA_BWD_KV_LOAD_STAGE(h_, i0_, st_)                                                             \
    {                                                                                                  \
      const T* gq_ = static_cast<const T*>(p.q) + b * p.q_sb + h_ * p.q_sh + (int64_t)i0_ * p.q_sn;    \
      const T* gd_ = static_cast<const T*>(p.dout) + b * p.do_sb + h_ * p.do_sh + (int64_t)i0_ * p.do_sn; \
      load_rows_async<T, BR, D_PAD, SK, NTH>(sQ + (st_) * BR * SK, gq_, p.q_sn, p.Nq - i0_, p.D, tid);   \
      load_rows_async<T, BR, D_PAD, SK, NTH>(sdO + (st_) * BR * SK, gd_, p.do_sn, p.Nq - i0_, p.D, tid); \
      const int64_t row_ = ((int64_t)b * p.H + h_) * p.nq_pad + i0_;                                   \
      load_f32_async<BR, NTH>(sL + (st_) * BR, p.lse2 + row_, tid);                                    \
      load_f32_async<BR, NTH>(sDv + (st_) * BR, p.dvec + row_, tid);                                   \
      cp_async_commit();                                                                               \
    }

    if (n_it > 0) CA_BWD_KV_LOAD_STAGE(h_first, qt0 * BR, 0)  // commits K, V and stage 0 as one group

    // This iteration's head h, query rows i0.. and scale (loaded once per head).
    int h = h_first, i0 = qt0 * BR;
    float scale_h = n_it > 0 ? p.scale[h_first] : 0.f;
    for (int it = 0; it < n_it; ++it) {
      const int st = it & 1;
      const bool head_ends = i0 + BR >= nqt * BR;
      const int h_next = head_ends ? h + 1 : h, i0_next = head_ends ? qt0 * BR : i0 + BR;
      if (it + 1 < n_it) {
        CA_BWD_KV_LOAD_STAGE(h_next, i0_next, st ^ 1)
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this stage's copies (every thread's) have landed

      const T* cQ = sQ + st * BR * SK;
      const T* cdO = sdO + st * BR * SK;
      const float* cL = sL + st * BR;
      const float* cDv = sDv + st * BR;
      const float sl2 = scale_h * LOG2E;

      // Bias for this warp's slab (issued early; log2-scaled), element (key row, query column).
      float bias2[NT][4];
      load_bias_frag<T>(bias2, p, b, h, [&](int n, int e) { return RowCol{i0 + n * 8 + 2 * t + (e & 1), key[e >> 1]}; });

      // S^T = Khat Qhat^T, then P^T in place (with stats: cs = sum over this lane's two keys of P S
      // per query column, value 2n + c for column n * 8 + 2t + c).
      float acc_s[NT][4];
      fill_zero(acc_s);
      gemm_nk<T, NT, D_PAD>(acc_s, sK, SK, 16 * warp, cQ, SK, 0, lane);
      float cs[2 * NT];
      // check = false: every pair of the tile is visible (all keys in range and unmasked, and under
      // causal the block's last key at or before the tile's first query's horizon).
      const bool check = !all_ok || (p.causal && j0 + BC - 1 > i0 + off);
      const int cdiff = p.causal ? off : 0x7fffffff;  // tiles.cuh visible(): key - row <= cdiff
      auto probs = [&](const bool with_c, const bool check) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t + (e & 1);
            const bool vis = !check || visible(key[e >> 1], i0 + col, cdiff, key_ok[e >> 1]);
            const float sv = acc_s[n][e];
            const float x = fmaf(sv, sl2, bias2[n][e] - cL[col]);
            acc_s[n][e] = vis ? exp2_fast(x) : 0.f;  // x = -inf (lse2 = +inf) gives exactly 0
            if (with_c)
              cs[2 * n + (e & 1)] = e < 2 ? acc_s[n][e] * sv : fmaf(acc_s[n][e], sv, cs[2 * n + (e & 1)]);
          }
      };
      if (stats) {
        probs(true, true);
        int base = 0;
        bool owner = true;
        sum_over_row_groups<2 * NT, 0>(cs, lane, base, owner);
        float* const rows_c = p.dscale_rows + ((int64_t)b * p.H + h) * 2 * p.nq_pad + i0;
#pragma unroll
        for (int r = 0; r < (2 * NT >= 8 ? 2 * NT / 8 : 1); ++r) {
          const int k = base + r, col = (k >> 1) * 8 + 2 * t + (k & 1);
          if (owner && chunk == 0 && i0 + col < p.Nq) atomicAdd(rows_c + col, cs[r]);
        }
      } else if (check) {
        probs(false, true);
      } else {
        probs(false, false);
      }

      // dV += P^T dO.
      gemm_ck<T, ND, NT>(acc_dv, acc_s, cdO, SK, c0, lane);

      // dP^T = V dO^T, then dS^T = P^T (dP^T - D) in place.
      float acc_dp[NT][4];
      fill_zero(acc_dp);
      gemm_nk<T, NT, D_PAD>(acc_dp, sV, SK, 16 * warp, cdO, SK, 0, lane);
      // One uniform branch per tile: without a bias the element loop has no dbias code at all.
      auto grad_s = [&](const bool write_dbias) {
        const int64_t dbb = write_dbias ? b * p.dbias_sb + h * p.dbias_sh : 0;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t + (e & 1);
            const float ds = acc_s[n][e] * (acc_dp[n][e] - cDv[col]);
            if (write_dbias) {
              const int i = i0 + col, j = key[e >> 1];
              if (i < p.Nq && j < p.Nk) store_dbias<T>(p, dbb + i * p.dbias_sq + j, ds);
            }
            acc_dp[n][e] = ds * scale_h;
          }
      };
      if (p.dbias_mode != 0) grad_s(chunk == 0);
      else grad_s(false);
      if constexpr (DsRange<T>::value) ds_range_f16(acc_dp, ds_f, acc_dk);  // acc_dp = scale_h dS f

      // dK += (scale_h dS^T) Qhat.
      gemm_ck<T, ND, NT>(acc_dk, acc_dp, cQ, SK, c0, lane);

      // dQ += (scale_h dS) Khat, through shared memory: each warp takes 16 queries x 16 columns units.
      if (p.dq_atomic) {
        // DS_IN_DO: scale_h dS^T goes into this stage's dO tile, once every warp is done reading it.
        T* const tdS = C::DS_IN_DO ? sdO + st * BR * SK : sdS;
        if constexpr (C::DS_IN_DO) __syncthreads();
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            M::store2(tdS + (16 * warp + g + 8 * r) * SDS + n * 8 + 2 * t, acc_dp[n][2 * r], acc_dp[n][2 * r + 1]);
        // float16: warp w's keys (k-step w of the product below) carry its factor; 1 / f goes into
        // sOk, whose flags every thread has read into registers before the first stage barrier.
        float* const sInvF = reinterpret_cast<float*>(sOk);
        if constexpr (DsRange<T>::value) {
          if (lane == 0) sInvF[warp] = 1.f / ds_f;
        }
        __syncthreads();  // every warp's dS^T is staged before the dQ products read it
        constexpr int MT = BR / 16;
        const int mt = warp % MT;
        float* gdq = p.dq + b * p.dq_sb + h * p.dq_sh;
        // Units u = warp / MT + uu USTEP: a compile-time count per warp (the last may be short).
        constexpr int UNITS = DC / 16, USTEP = C::NW / MT, UPW = (UNITS + USTEP - 1) / USTEP;
#pragma unroll 1
        for (int uu = 0; uu < UPW; ++uu) {
          const int u = warp / MT + uu * USTEP;
          if (UNITS % USTEP != 0 && u >= UNITS) break;
          float acc[2][4];
          fill_zero(acc);
#pragma unroll (sizeof(T) == 4 || D_PAD > 128 ? 1 : BC / M::KSTEP)  // as gemm_nk: registers
          for (int k0 = 0; k0 < BC; k0 += M::KSTEP) {
            typename M::A a;
            typename M::B bf[2];
            M::load_a_km(a, tdS, SDS, mt * 16, k0, lane);
            M::load_b2_kn(bf, sK, SK, k0, c0 + u * 16, lane);
            if constexpr (DsRange<T>::value) {  // k-step k0 / 16 = the keys of warp k0 / 16
              float part[2][4];
              fill_zero(part);
              M::mma(part[0], a, bf[0]);
              M::mma(part[1], a, bf[1]);
              const float inv = sInvF[k0 / 16];
#pragma unroll
              for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[n][e] = fmaf(part[n][e], inv, acc[n][e]);
            } else {
              M::mma(acc[0], a, bf[0]);
              M::mma(acc[1], a, bf[1]);
            }
          }
          // Columns d, d + 1 (d even; p.D, the padded row, is a multiple of 16) in one reduction.
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int i = i0 + mt * 16 + g + 8 * r, d = c0 + u * 16 + n * 8 + 2 * t;
              if (i < p.Nq && d < p.D) atomic_add2(gdq + i * p.dq_sn + d, acc[n][2 * r], acc[n][2 * r + 1]);
            }
        }
        if (stats && chunk == 0 && warp < MT) {  // r_i: this m-tile's rows of the operand against ones
          float acc_r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 1
          for (int k0 = 0; k0 < BC; k0 += M::KSTEP) {
            typename M::A a;
            M::load_a_km(a, tdS, SDS, mt * 16, k0, lane);
            float part[4] = {0.f, 0.f, 0.f, 0.f};
            M::mma(part, a, M::ones());
            const float inv = DsRange<T>::value ? sInvF[k0 / 16] : 1.f;
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_r[e] = fmaf(part[e], inv, acc_r[e]);
          }
          float* const rows_r = p.dscale_rows + (((int64_t)b * p.H + h) * 2 + 1) * p.nq_pad;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int i = i0 + mt * 16 + g + 8 * r;
            if (t == 0 && i < p.Nq) atomicAdd(rows_r + i, acc_r[2 * r]);
          }
        }
      }
      __syncthreads();  // everyone is done with this stage (and sdS) before it is refilled
      if (head_ends && it + 1 < n_it) scale_h = p.scale[h_next];
      h = h_next;
      i0 = i0_next;
    }
#undef CA_BWD_KV_LOAD_STAGE

    // Epilogue: this block's columns of dK and dV (zeros when no query saw the tile).
    if constexpr (DsRange<T>::value) {
      const float inv = 1.f / ds_f;  // a power of two: exact
#pragma unroll
      for (int n = 0; n < ND; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[n][e] *= inv;
    }
    const int64_t ob = b * p.dkv_sb + ((int64_t)hk * p.nsplit + s) * p.dkv_sh;
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = key[e >> 1], d = c0 + n * 8 + 2 * t + (e & 1);
        if (j < p.Nk && d < p.D) {
          const int64_t o = ob + j * p.dkv_sn + d;
          if (p.dk_f32) static_cast<float*>(p.dk)[o] = acc_dk[n][e];
          else static_cast<T*>(p.dk)[o] = from_float<T>(acc_dk[n][e]);
          if (p.dv_f32) static_cast<float*>(p.dv)[o] = acc_dv[n][e];
          else static_cast<T*>(p.dv)[o] = from_float<T>(acc_dv[n][e]);
        }
      }
  }
}

// =============================================================================================
// bwd_dq (deterministic mode): grid x = query tile * n_chunks + chunk, y = (b, h). Each warp owns
// 16 query rows and keeps their dQ columns [c0, c0 + DC) in registers; key tiles stream through
// double-buffered shared memory, skipping those beyond the causal bound and those whose keys are all
// masked (tile_any, as in the forward). Every dq element is written exactly once: no atomics.
template <typename T, int D_PAD, bool SMALL = false, bool VARLEN = false>
__global__ void __launch_bounds__(QTraits<T, D_PAD, SMALL>::THREADS, 1) bwd_dq(const BwdParams params) {
  typedef QTraits<T, D_PAD, SMALL> C;
  typedef Mma<T> M;
  constexpr int BR = C::BR, BC = C::BC, DC = C::DC, SK = C::SK, NTH = C::THREADS;
  constexpr int NT = BC / 8;   // n8 tiles of a 16 x BC slab of S
  constexpr int ND = DC / 8;

  CA_DYNAMIC_SHARED(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BR][SK]
  T* sdO = sQ + BR * SK;                    // [BR][SK]
  T* sK = sdO + BR * SK;                    // [2][BC][SK]
  T* sV = sK + 2 * BC * SK;                 // [2][BC][SK]
  int* sOk = reinterpret_cast<int*>(sV + 2 * BC * SK);  // [2][BC]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const BwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / params.H));  // params.cuh
  const int chunk = blockIdx.x % p.n_chunks;
  const int i0 = (blockIdx.x / p.n_chunks) * BR;
  if (VARLEN && i0 >= p.Nq) return;  // a query tile past its sequence's end
  const int c0 = chunk * DC;
  const int off = p.Nk - p.Nq;
  const int qpk = p.H / p.Hk;

  for (int64_t y = blockIdx.y; y < p.n_y; y += gridDim.y) {
    const int b = (int)(y / p.H), h = (int)(y % p.H), hk = h / qpk;
    __syncthreads();  // the previous work item is done with shared memory

    // Keys [0, k_end) can be visible to some query of the tile.
    int k_end = p.Nk;
    if (p.causal) k_end = min(p.Nk, max(0, min(i0 + BR, p.Nq) - 1 + off + 1));
    const int n_kt = (k_end + BC - 1) / BC;

    int row[2];
    float lse2[2], dvv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[r] = i0 + 16 * warp + g + 8 * r;
      lse2[r] = p.lse2[y * p.nq_pad + row[r]];
      dvv[r] = p.dvec[y * p.nq_pad + row[r]];
    }
    const float scale_h = p.scale[h];
    const float sl2 = scale_h * LOG2E;

    float acc_dq[ND][4];
    fill_zero(acc_dq);
    float ds_f = 1.f;  // float16: acc_dq holds dQ times this warp's factor (DsRange)
    // dscale's row sums (file comment): c_part[r] = this lane's part of c of row[r]; acc_r = r_i of
    // rows g, g + 8 (columns 0 and 2) in units of ds_f. Chunk 0 writes them.
    const bool stats = p.dscale_stats != 0;
    float c_part[2] = {0.f, 0.f}, acc_r[4] = {0.f, 0.f, 0.f, 0.f};

    const T* gk = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* gv = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    // The next key tile at or after kt that has an unmasked key: tiles whose keys are all masked are
    // skipped (no loads, no math; their dS is 0 anyway, and NaN/Inf in their K or V never reaches dQ).
    // Every thread reads the same flags, so the loop and the barriers below stay uniform.
    const unsigned char* const tile_any = p.tile_any ? p.tile_any + b * p.tile_any_sb : nullptr;
    auto next_tile = [&](int kt) {
      if (tile_any != nullptr)
        while (kt < n_kt && !tile_any[kt]) ++kt;
      return kt;
    };
#define CA_BWD_Q_LOAD_STAGE(kt_, st_)                                                                  \
    {                                                                                                  \
      const int j0_ = (kt_) * BC;                                                                      \
      load_rows_async<T, BC, D_PAD, SK, NTH>(sK + (st_) * BC * SK, gk + (int64_t)j0_ * p.k_sn, p.k_sn, \
                                             p.Nk - j0_, p.D, tid);                                    \
      load_rows_async<T, BC, D_PAD, SK, NTH>(sV + (st_) * BC * SK, gv + (int64_t)j0_ * p.v_sn, p.v_sn, \
                                             p.Nk - j0_, p.D, tid);                                    \
      if (tid < BC) {                                                                                  \
        const int j_ = j0_ + tid;                                                                      \
        sOk[(st_) * BC + tid] = j_ < p.Nk && (p.mask == nullptr || p.mask[b * p.mask_sb + j_]);        \
      }                                                                                                \
      cp_async_commit();                                                                               \
    }

    // Visible tiles kt go through the stages alternately (stage = it & 1, it counting visible tiles
    // only). Iteration it prefetches the next visible tile into stage (it + 1) & 1, which iteration
    // it - 1 read and released with its closing barrier; the wait + barrier make tile kt's copies
    // (and its sOk stores) visible before any read.
    int kt = next_tile(0);
    if (kt < n_kt) {
      const T* gq = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (int64_t)i0 * p.q_sn;
      const T* gd = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + (int64_t)i0 * p.do_sn;
      load_rows_async<T, BR, D_PAD, SK, NTH>(sQ, gq, p.q_sn, p.Nq - i0, p.D, tid);
      load_rows_async<T, BR, D_PAD, SK, NTH>(sdO, gd, p.do_sn, p.Nq - i0, p.D, tid);
      CA_BWD_Q_LOAD_STAGE(kt, 0)  // one group with Q and dO
    }

    for (int it = 0; kt < n_kt; ++it) {
      const int st = it & 1;
      const int kt_next = next_tile(kt + 1);
      if (kt_next < n_kt) {
        CA_BWD_Q_LOAD_STAGE(kt_next, st ^ 1)
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // key tile kt's copies and flags have landed
      const int j0 = kt * BC;
      const T* cK = sK + st * BC * SK;
      const T* cV = sV + st * BC * SK;
      const int* cOk = sOk + st * BC;

      float bias2[NT][4];
      load_bias_frag<T>(bias2, p, b, h, [&](int n, int e) { return RowCol{row[e >> 1], j0 + n * 8 + 2 * t + (e & 1)}; });

      // S = Qhat Khat^T -> P in place.
      float acc_s[NT][4];
      fill_zero(acc_s);
      gemm_nk<T, NT, D_PAD>(acc_s, sQ, SK, 16 * warp, cK, SK, 0, lane);
      // check = false: every pair of the tile is visible (no mask, all keys in range, and under
      // causal the tile's last key at or before the block's first query's horizon).
      const bool check = p.mask != nullptr || j0 + BC > p.Nk || (p.causal && j0 + BC - 1 > i0 + off);
      const int cdiff = p.causal ? off : 0x7fffffff;  // tiles.cuh visible(): key - row <= cdiff
      auto probs = [&](const bool with_c, const bool check) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t + (e & 1), r = e >> 1;
            const bool vis = !check || visible(j0 + col, row[r], cdiff, cOk[col] != 0);
            const float sv = acc_s[n][e];
            const float x = fmaf(sv, sl2, bias2[n][e] - lse2[r]);
            acc_s[n][e] = vis ? exp2_fast(x) : 0.f;
            if (with_c) c_part[r] = fmaf(acc_s[n][e], sv, c_part[r]);
          }
      };
      if (stats) probs(true, true);
      else if (check) probs(false, true);
      else probs(false, false);

      // dP = dO V^T -> scale_h dS in place.
      float acc_dp[NT][4];
      fill_zero(acc_dp);
      gemm_nk<T, NT, D_PAD>(acc_dp, sdO, SK, 16 * warp, cV, SK, 0, lane);
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[n][e] = acc_s[n][e] * (acc_dp[n][e] - dvv[e >> 1]) * scale_h;
      float ratio = 1.f;
      if constexpr (DsRange<T>::value) ratio = ds_range_f16(acc_dp, ds_f, acc_dq);  // acc_dp = scale_h dS f

      // dQ += (scale_h dS) Khat.
      gemm_ck<T, ND, NT>(acc_dq, acc_dp, cK, SK, c0, lane);
      if (stats) {  // r_i += the same rounded operand against ones
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_r[e] *= ratio;
#pragma unroll
        for (int kk = 0; kk < NT * 8 / M::KSTEP; ++kk) {
          typename M::A a;
          M::a_from_c(a, acc_dp, kk);
          M::mma(acc_r, a, M::ones());
        }
      }
      __syncthreads();  // this stage may be refilled next iteration
      kt = kt_next;
    }
#undef CA_BWD_Q_LOAD_STAGE

    float* gdq = p.dq + b * p.dq_sb + h * p.dq_sh;
    const float inv_f = 1.f / ds_f;  // 1 but for float16 (a power of two: exact)
#pragma unroll
    for (int n = 0; n < ND; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row[e >> 1], d = c0 + n * 8 + 2 * t + (e & 1);
        if (i < p.Nq && d < p.D) gdq[i * p.dq_sn + d] = acc_dq[n][e] * inv_f;
      }
    if (stats) {
      float* const rows_c = p.dscale_rows + (int64_t)y * 2 * p.nq_pad;
      float* const rows_r = rows_c + p.nq_pad;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float c = quad_sum(c_part[r]);
        if (t == 0 && chunk == 0 && row[r] < p.Nq) {
          rows_c[row[r]] = c;
          rows_r[row[r]] = acc_r[2 * r] * inv_f;
        }
      }
    }
  }
}

// Tile configuration of an instantiation (SMALL: the small variants of both kernels), for the launch
// layer's checks (one thread writes 12 ints).
template <typename T, int D_PAD, bool SMALL = false>
__global__ void bwd_info(int* out) {
  typedef KVTraits<T, D_PAD, SMALL> K;
  typedef QTraits<T, D_PAD, SMALL> Q;
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    out[0] = K::THREADS; out[1] = K::BC; out[2] = K::BR; out[3] = K::DC; out[4] = K::NCHUNK; out[5] = K::SMEM;
    out[6] = Q::THREADS; out[7] = Q::BR; out[8] = Q::BC; out[9] = Q::DC; out[10] = Q::NCHUNK; out[11] = Q::SMEM;
  }
}

}  // namespace bwd
}  // namespace ca
