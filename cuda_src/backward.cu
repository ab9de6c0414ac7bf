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
// Tile loads and products are tiles.cuh's (the forward's tile layer): TileCopy, 32-bit shared lane
// addresses, and the dtype-generic k-steps abt_step / cb_step / load_km + atb_step / ones_step, on
// mma.m16n8k16 with ldmatrix for fp16/bf16 and 3xTF32 m16n8k8 for fp32 (x = big + small,
// d += a_s b_b + a_b b_s + a_b b_b).
#include "tiles.cuh"
#include "params.cuh"

namespace ca {
namespace bwd {


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
  static constexpr int SK = D_PAD + 16 / (int)sizeof(T);  // row stride of the K, V, Q, dO tiles (+16 bytes)
  static constexpr int SDS = BR + 8;                        // row stride of the dS^T tile
  static constexpr bool DS_IN_DO = SMALL && NW == 1;        // dS^T staged in the current dO stage
  static constexpr int THREADS = 32 * NW;
  // Shared memory, byte offsets: K, V (BC rows), Q and dO (2 stages of BR rows), dS^T (BC rows of
  // SDS), lse2 and D (2 stages of BR floats), the key flags (BC ints).
  static constexpr int PITCH = SK * (int)sizeof(T), SDSP = SDS * (int)sizeof(T), QST = BR * PITCH;
  static constexpr int K_OFF = 0, V_OFF = BC * PITCH, Q_OFF = 2 * BC * PITCH, DO_OFF = Q_OFF + 2 * QST;
  static constexpr int DS_OFF = DO_OFF + 2 * QST, L_OFF = DS_OFF + (DS_IN_DO ? 0 : BC * SDSP);
  static constexpr int DV_OFF = L_OFF + 2 * BR * (int)sizeof(float), OK_OFF = DV_OFF + 2 * BR * (int)sizeof(float);
  static constexpr int SMEM = OK_OFF + BC * (int)sizeof(int);
  // Unrolling of the k-loops of S^T and dP^T (16-bit: full up to 64 columns, by two k-steps above:
  // fully unrolled at 128 they spill) and of a warp's dQ units (16-bit up to 128 columns: at most 4
  // units), rolled where the fragments would not fit the registers (fp32, wider 16-bit rows).
  static constexpr int U_ABT = F32 ? 1 : (D_PAD <= 64 ? D_PAD / 16 : 2);
  static constexpr int U_DQ = F32 || D_PAD > 128 ? 1 : 4;
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
  static constexpr int SK = D_PAD + 16 / (int)sizeof(T);  // row stride of the Q, dO, K, V tiles (+16 bytes)
  static constexpr int THREADS = 32 * NW;
  // Shared memory, byte offsets: Q and dO (BR rows), K and V (2 stages of BC rows), the key flags
  // (2 stages of BC ints).
  static constexpr int PITCH = SK * (int)sizeof(T), KVST = BC * PITCH;
  static constexpr int Q_OFF = 0, DO_OFF = BR * PITCH, K_OFF = 2 * BR * PITCH, V_OFF = K_OFF + 2 * KVST;
  static constexpr int OK_OFF = V_OFF + 2 * KVST;
  static constexpr int SMEM = OK_OFF + 2 * BC * (int)sizeof(int);
  static constexpr int U_ABT = F32 ? 1 : (D_PAD <= 128 ? D_PAD / 16 : 2);
  // The A fragments of S = Qhat Khat^T and dP = dO V^T (the warp's own rows) stay in registers for
  // the whole key loop where they fit (16-bit, up to 64 columns).
  static constexpr bool A_IN_REGS = !F32 && D_PAD <= 64;
};


// ---------------------------------------------------------------------------------------------
// Loads (tiles.cuh TileCopy). ROWS rows of D_PAD columns from global rows src_sn elements apart into
// shared rows PITCH bytes apart; rows at or past rows_left are zero-filled, and so are the columns
// at or past D (the global rows' length: the launch layer's storage dim, below D_PAD only above 128).
template <typename T, int ROWS, int D_PAD, int PITCH, int NTH>
CA_DEVICE void load_tile(saddr_t dst, const T* src, int64_t src_sn, int rows_left, int D, int tid) {
  constexpr int CPR = D_PAD * (int)sizeof(T) / 16;  // 16-byte chunks per row
  using Copy = TileCopy<ROWS, CPR, PITCH, NTH>;
  const char* s = reinterpret_cast<const char*>(src);
  const int pitch = (int)src_sn * (int)sizeof(T);
  if constexpr (CPR > NTH) {
    // More chunks in a row than threads (fp32 rows of 192+ columns in the one-warp blocks of the
    // SMALL variants): a row at a time, in a rolled loop (the unrolled walk of the whole tile takes
    // registers those kernels' accumulators need).
    const int chunks = D * (int)sizeof(T) / 16;
#pragma unroll 1
    for (int r = 0; r < ROWS; ++r)
      TileCopy<1, CPR, PITCH, NTH>::template copy_cols<false>(dst + r * PITCH, s + (r < rows_left ? r : 0) * pitch,
                                                               pitch, r < rows_left, chunks, tid);
  } else if constexpr (D_PAD > 128) {
    const int chunks = D * (int)sizeof(T) / 16;
    if (rows_left >= ROWS) Copy::template copy_cols<true>(dst, s, pitch, ROWS, chunks, tid);
    else Copy::template copy_cols<false>(dst, s, pitch, rows_left, chunks, tid);
  } else {
    if (rows_left >= ROWS) Copy::template copy<true>(dst, s, pitch, ROWS, tid);
    else Copy::template copy<false>(dst, s, pitch, rows_left, tid);
  }
}

// N floats (N % 4 == 0, 16-byte aligned, all in bounds).
template <int N, int NTH>
CA_DEVICE void load_f32(saddr_t dst, const float* src, int tid) {
  TileCopy<1, N / 4, 0, NTH>::template copy<true>(dst, reinterpret_cast<const char*>(src), 0, 1, tid);
}

// Two adjacent elements (columns c, c + 1) of a row of a shared-memory tile.
template <typename T>
CA_DEVICE void store2(T* s, float x0, float x1) {
  if constexpr (sizeof(T) == 4) {
    s[0] = x0;
    s[1] = x1;
  } else {
    *reinterpret_cast<uint32_t*>(s) = pack2<T>(x0, x1);
  }
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
  constexpr float FMAX = 3.402823466e38f;
  float ratio = 1.f;
  // max |c| is one instruction per element (fmaxf drops NaN); only a warp that holds an Inf takes
  // a second pass for the largest finite |c| (warp-uniform).
  float mx = 0.f;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fabsf(c[n][e]));
  mx = warp_max(mx);
  if (mx > FMAX) {
    mx = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float a = fabsf(c[n][e]);
        if (a <= FMAX) mx = fmaxf(mx, a);
      }
    mx = warp_max(mx);
  }
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
  if (f != 1.f) {  // (x * 1 = x: a warp whose range never shrank skips the products)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[n][e] *= f;
  }
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
  constexpr int BC = C::BC, BR = C::BR, DC = C::DC, SDS = C::SDS, NTH = C::THREADS;
  constexpr int PITCH = C::PITCH, ESZ = (int)sizeof(T), KS = KStep<T>::value;
  constexpr int NT = BR / 8;    // n8 tiles of a 16 x BR slab of S^T
  constexpr int ND = DC / 8;    // n8 tiles of the dK / dV accumulators
  constexpr bool F32 = C::F32;

  CA_DYNAMIC_SHARED(smem_raw);
  const saddr_t s0 = smem_addr(smem_raw);
  float* const sL = reinterpret_cast<float*>(smem_raw + C::L_OFF);    // [2][BR] lse2
  float* const sDv = reinterpret_cast<float*>(smem_raw + C::DV_OFF);  // [2][BR] D
  int* const sOk = reinterpret_cast<int*>(smem_raw + C::OK_OFF);      // [BC] key visible (in range and unmasked)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const BwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / ((int64_t)params.nsplit * params.Hk)));
  const int chunk = blockIdx.x % p.n_chunks;
  const int j0 = (blockIdx.x / p.n_chunks) * BC;
  if (VARLEN && j0 >= p.Nk) return;  // a key tile past its sequence's end
  const int c0 = chunk * DC;
  const int off = p.Nk - p.Nq;
  const int cdiff = p.causal ? off : 0x7fffffff;  // tiles.cuh visible(): key - row <= cdiff
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

    // Stage st_ of query head h_, query rows i0_.. (iteration it runs head h_first + it / per_head,
    // query tile qt0 + it % per_head; the loop below steps both without dividing): Qhat, dO, lse2 and
    // D, committed as one cp.async group.
    auto load_q_stage = [&](int h_, int i0_, int st_) {
      const int ld = tid_reread();
      const T* gq = static_cast<const T*>(p.q) + b * p.q_sb + h_ * p.q_sh + (int64_t)i0_ * p.q_sn;
      const T* gd = static_cast<const T*>(p.dout) + b * p.do_sb + h_ * p.do_sh + (int64_t)i0_ * p.do_sn;
      load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::Q_OFF + st_ * C::QST, gq, p.q_sn, p.Nq - i0_, p.D, ld);
      load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::DO_OFF + st_ * C::QST, gd, p.do_sn, p.Nq - i0_, p.D, ld);
      const int64_t row = ((int64_t)b * p.H + h_) * p.nq_pad + i0_;
      load_f32<BR, NTH>(s0 + C::L_OFF + st_ * 4 * BR, p.lse2 + row, ld);
      load_f32<BR, NTH>(s0 + C::DV_OFF + st_ * 4 * BR, p.dvec + row, ld);
      cp_async_commit();
    };

    if (n_it > 0) {
      const T* gk = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + (int64_t)j0 * p.k_sn;
      const T* gv = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + (int64_t)j0 * p.v_sn;
      load_tile<T, BC, D_PAD, PITCH, NTH>(s0 + C::K_OFF, gk, p.k_sn, p.Nk - j0, p.D, tid);
      load_tile<T, BC, D_PAD, PITCH, NTH>(s0 + C::V_OFF, gv, p.v_sn, p.Nk - j0, p.D, tid);
      load_q_stage(h_first, qt0 * BR, 0);  // commits K, V and stage 0 as one group
    }

    // This iteration's head h, query rows i0.. and scale (loaded once per head).
    int h = h_first, i0 = qt0 * BR;
    float scale_h = n_it > 0 ? p.scale[h_first] : 0.f;
    for (int it = 0; it < n_it; ++it) {
      const int st = it & 1;
      const bool head_ends = i0 + BR >= nqt * BR;
      const int h_next = head_ends ? h + 1 : h, i0_next = head_ends ? qt0 * BR : i0 + BR;
      if (it + 1 < n_it) {
        load_q_stage(h_next, i0_next, st ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // this stage's copies (every thread's) have landed

      const int so = st * C::QST;  // this stage's byte offset in the Q and dO buffers
      // Lane addresses (tiles.cuh) in stage 0: this warp's 16 keys of K and V as A operands ("mk"), Q
      // and dO as the B operand of S^T and dP^T (rows n) and of dV and dK (rows k, from column c0).
      // fp32 makes them here from threadIdx anew, not keeping them through the loop (the registers
      // are the accumulators').
      const int ln = F32 ? tid_reread() % 32 : lane, wp = F32 ? tid_reread() / 32 : warp;
      const saddr_t kA = s0 + C::K_OFF + wp * 16 * PITCH + a_lane_off<PITCH>(ln);
      const saddr_t vA = kA + (C::V_OFF - C::K_OFF);
      const saddr_t qN = s0 + C::Q_OFF + bn_lane_off<PITCH>(ln);
      const saddr_t dON = qN + (C::DO_OFF - C::Q_OFF);
      const saddr_t qK = s0 + C::Q_OFF + cb_lane_off<T, PITCH>(ln) + c0 * ESZ;
      const saddr_t dOK = qK + (C::DO_OFF - C::Q_OFF);
      const float* cL = sL + st * BR;
      const float* cDv = sDv + st * BR;
      const float sl2 = scale_h * LOG2E;

      // S^T = Khat Qhat^T, then P^T in place (with stats: cs = sum over this lane's two keys of P S
      // per query column, value 2n + c for column n * 8 + 2t + c).
      float acc_s[NT][4];
      fill_zero(acc_s);
#pragma unroll (C::U_ABT)
      for (int ks = 0; ks < D_PAD / KS; ++ks) abt_step<T, BR, PITCH>(acc_s, kA, qN + so, ks);
      // Bias for this warp's slab (log2-scaled), element (key row, query column).
      float bias2[NT][4];
      load_bias_frag<T>(bias2, p, b, h, [&](int n, int e) { return RowCol{i0 + n * 8 + 2 * t + (e & 1), key[e >> 1]}; });
      float cs[2 * NT];
      // check = false: every pair of the tile is visible (all keys in range and unmasked, and under
      // causal the block's last key at or before the tile's first query's horizon).
      const bool check = !all_ok || (p.causal && j0 + BC - 1 > i0 + off);
      // (with_bias = false: bias2 is 0, and the fast path leaves it out)
      auto probs = [&](const bool with_c, const bool check, const bool with_bias) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t + (e & 1);
            const bool vis = !check || visible(key[e >> 1], i0 + col, cdiff, key_ok[e >> 1]);
            const float sv = acc_s[n][e];
            const float x = fmaf(sv, sl2, with_bias ? bias2[n][e] - cL[col] : -cL[col]);
            acc_s[n][e] = vis ? exp2_fast(x) : 0.f;  // x = -inf (lse2 = +inf) gives exactly 0
            if (with_c)
              cs[2 * n + (e & 1)] = e < 2 ? acc_s[n][e] * sv : fmaf(acc_s[n][e], sv, cs[2 * n + (e & 1)]);
          }
      };
      if (stats) {
        probs(true, true, true);
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
        probs(false, true, true);
      } else if (p.bias != nullptr) {
        probs(false, false, true);
      } else {
        probs(false, false, false);
      }

      // dV += P^T dO.
#pragma unroll
      for (int ks = 0; ks < BR / KS; ++ks) cb_step<T, DC, NT, PITCH>(acc_dv, acc_s, dOK + so, ks);

      // dP^T = V dO^T, then dS^T = P^T (dP^T - D) in place.
      float acc_dp[NT][4];
      fill_zero(acc_dp);
#pragma unroll (C::U_ABT)
      for (int ks = 0; ks < D_PAD / KS; ++ks) abt_step<T, BR, PITCH>(acc_dp, vA, dON + so, ks);
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
#pragma unroll
      for (int ks = 0; ks < BR / KS; ++ks) cb_step<T, DC, NT, PITCH>(acc_dk, acc_dp, qK + so, ks);

      // dQ += (scale_h dS) Khat, through shared memory: each warp takes 16 queries x 16 columns units.
      if (p.dq_atomic) {
        // DS_IN_DO: scale_h dS^T goes into this stage's dO tile, once every warp is done reading it.
        const int ds_off = C::DS_IN_DO ? C::DO_OFF + so : C::DS_OFF;
        T* const tdS = reinterpret_cast<T*>(smem_raw + ds_off);
        if constexpr (C::DS_IN_DO) __syncthreads();
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            store2<T>(tdS + (16 * warp + g + 8 * r) * SDS + n * 8 + 2 * t, acc_dp[n][2 * r], acc_dp[n][2 * r + 1]);
        // float16: warp w's keys (k-step w of the product below) carry its factor; 1 / f goes into
        // sOk, whose flags every thread has read into registers before the first stage barrier.
        float* const sInvF = reinterpret_cast<float*>(sOk);
        if constexpr (DsRange<T>::value) {
          if (lane == 0) sInvF[warp] = 1.f / ds_f;
        }
        __syncthreads();  // every warp's dS^T is staged before the dQ products read it
        constexpr int MT = BR / 16;
        const int mt = warp % MT;
        // dS's rows mt as the A operand ("km": stored as dS^T), K's rows as B ("kn") from column c0.
        const saddr_t dsA = s0 + ds_off + km_lane_off<T, C::SDSP>(lane) + mt * 16 * ESZ;
        const saddr_t kB = s0 + C::K_OFF + kn_lane_off<T, PITCH>(lane) + c0 * ESZ;
        // This lane's dq rows at column c0 + 2t, and how many columns exist from there.
        float* dq_row[2];
        bool row_ok[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = i0 + mt * 16 + g + 8 * r;
          row_ok[r] = i < p.Nq;
          dq_row[r] = p.dq + b * p.dq_sb + h * p.dq_sh + (int64_t)i * p.dq_sn + c0 + 2 * t;
        }
        const int dcols = p.D - c0 - 2 * t;
        // Units u = warp / MT + uu USTEP: a compile-time count per warp (the last may be short).
        constexpr int UNITS = DC / 16, USTEP = C::NW / MT, UPW = (UNITS + USTEP - 1) / USTEP;
        constexpr int KSN = BC / KS;  // k-steps over the block's keys
        // 16-bit: dS's fragments are read once for all of the warp's units (fp32's 3xTF32 fragments
        // take twice the registers: re-read per unit).
        constexpr bool A_HELD = !F32;
        FragA ah[A_HELD ? KSN : 1];
        if constexpr (A_HELD) {
#pragma unroll
          for (int ks = 0; ks < KSN; ++ks) ah[ks] = load_km<T, C::SDSP>(dsA, ks);
        }
        // float16: the k-steps carry their warps' factors, unless all of them are 1 (block-uniform).
        bool scaled = false;
        if constexpr (DsRange<T>::value) {
#pragma unroll
          for (int w = 0; w < C::NW; ++w) scaled = scaled || sInvF[w] != 1.f;
        }
        auto units = [&](const bool scaled) {
#pragma unroll (C::U_DQ)
          for (int uu = 0; uu < UPW; ++uu) {
            const int u = warp / MT + uu * USTEP;
            if (UNITS % USTEP != 0 && u >= UNITS) break;
            const saddr_t bu = kB + u * 16 * ESZ;
            float acc[2][4];
            fill_zero(acc);
#pragma unroll (A_HELD ? KSN : 1)
            for (int ks = 0; ks < KSN; ++ks) {
              FragA a;
              if constexpr (A_HELD) a = ah[ks];
              else a = load_km<T, C::SDSP>(dsA, ks);
              if (scaled) {  // k-step ks = the keys of warp ks
                float part[2][4];
                fill_zero(part);
                atb_step<T, 16, PITCH>(part, a, bu, ks);
                const float inv = sInvF[ks];
#pragma unroll
                for (int n = 0; n < 2; ++n)
#pragma unroll
                  for (int e = 0; e < 4; ++e) acc[n][e] = fmaf(part[n][e], inv, acc[n][e]);
              } else {
                atb_step<T, 16, PITCH>(acc, a, bu, ks);
              }
            }
            // Columns d, d + 1 (d = c0 + u * 16 + n * 8 + 2t, even; p.D is a multiple of 16) in one reduction.
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int x = u * 16 + n * 8;
                if (row_ok[r] && x < dcols) atomic_add2(dq_row[r] + x, acc[n][2 * r], acc[n][2 * r + 1]);
              }
          }
        };
        if (scaled) units(true);
        else units(false);
        if (stats && chunk == 0 && warp < MT) {  // r_i: this m-tile's rows of the operand against ones
          float acc_r[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll (A_HELD ? KSN : 1)
          for (int ks = 0; ks < KSN; ++ks) {
            FragA a;
            if constexpr (A_HELD) a = ah[ks];
            else a = load_km<T, C::SDSP>(dsA, ks);
            float part[4] = {0.f, 0.f, 0.f, 0.f};
            ones_step<T>(part, a);
            const float inv = scaled ? sInvF[ks] : 1.f;
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
  constexpr int BR = C::BR, BC = C::BC, DC = C::DC, NTH = C::THREADS;
  constexpr int PITCH = C::PITCH, ESZ = (int)sizeof(T), KS = KStep<T>::value;
  constexpr int NT = BC / 8;   // n8 tiles of a 16 x BC slab of S
  constexpr int ND = DC / 8;

  CA_DYNAMIC_SHARED(smem_raw);
  const saddr_t s0 = smem_addr(smem_raw);
  int* const sOk = reinterpret_cast<int*>(smem_raw + C::OK_OFF);  // [2][BC]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const BwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / params.H));  // params.cuh
  const int chunk = blockIdx.x % p.n_chunks;
  const int i0 = (blockIdx.x / p.n_chunks) * BR;
  if (VARLEN && i0 >= p.Nq) return;  // a query tile past its sequence's end
  const int c0 = chunk * DC;
  const int off = p.Nk - p.Nq;
  const int cdiff = p.causal ? off : 0x7fffffff;  // tiles.cuh visible(): key - row <= cdiff
  const int qpk = p.H / p.Hk;

  // Lane addresses (tiles.cuh) in stage 0: this warp's 16 rows of Q and dO as A operands ("mk"), K
  // and V as the B operand of S and dP (rows n), K as the B operand of dQ (rows k, from column c0).
  const saddr_t qA = s0 + C::Q_OFF + warp * 16 * PITCH + a_lane_off<PITCH>(lane);
  const saddr_t dOA = qA + (C::DO_OFF - C::Q_OFF);
  const saddr_t kN = s0 + C::K_OFF + bn_lane_off<PITCH>(lane);
  const saddr_t vN = kN + (C::V_OFF - C::K_OFF);
  const saddr_t kK = s0 + C::K_OFF + cb_lane_off<T, PITCH>(lane) + c0 * ESZ;

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
    // Key tile kt_ into stage st_: K, V (cp.async) and the keys' flags (plain stores, visible after
    // the barrier before their use), committed as one cp.async group.
    auto load_kv_stage = [&](int kt_, int st_) {
      const int ld = tid_reread();
      const int j0_ = kt_ * BC;
      load_tile<T, BC, D_PAD, PITCH, NTH>(s0 + C::K_OFF + st_ * C::KVST, gk + (int64_t)j0_ * p.k_sn, p.k_sn,
                                          p.Nk - j0_, p.D, ld);
      load_tile<T, BC, D_PAD, PITCH, NTH>(s0 + C::V_OFF + st_ * C::KVST, gv + (int64_t)j0_ * p.v_sn, p.v_sn,
                                          p.Nk - j0_, p.D, ld);
      if (ld < BC) {
        const int j_ = j0_ + ld;
        sOk[st_ * BC + ld] = j_ < p.Nk && (p.mask == nullptr || p.mask[b * p.mask_sb + j_]);
      }
      cp_async_commit();
    };

    // Visible tiles kt go through the stages alternately (stage = it & 1, it counting visible tiles
    // only). Iteration it prefetches the next visible tile into stage (it + 1) & 1, which iteration
    // it - 1 read and released with its closing barrier; the wait + barrier make tile kt's copies
    // (and its sOk stores) visible before any read.
    int kt = next_tile(0);
    if (kt < n_kt) {
      const T* gq = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (int64_t)i0 * p.q_sn;
      const T* gd = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + (int64_t)i0 * p.do_sn;
      load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::Q_OFF, gq, p.q_sn, p.Nq - i0, p.D, tid);
      load_tile<T, BR, D_PAD, PITCH, NTH>(s0 + C::DO_OFF, gd, p.do_sn, p.Nq - i0, p.D, tid);
      load_kv_stage(kt, 0);  // one group with Q and dO
    }

    constexpr int KQ = D_PAD / KS;  // k-steps of S and dP
    uint32_t qf[C::A_IN_REGS ? KQ : 1][4], df[C::A_IN_REGS ? KQ : 1][4];  // A_IN_REGS: Qhat's and dO's fragments
    for (int it = 0; kt < n_kt; ++it) {
      const int st = it & 1;
      const int kt_next = next_tile(kt + 1);
      if (kt_next < n_kt) {
        load_kv_stage(kt_next, st ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();  // key tile kt's copies and flags have landed
      if constexpr (C::A_IN_REGS) {
        if (it == 0) {  // Qhat and dO landed with the first key tile
#pragma unroll
          for (int ks = 0; ks < KQ; ++ks) {
            ldsm_x4(qf[ks], qA + 32 * ks);
            ldsm_x4(df[ks], dOA + 32 * ks);
          }
        }
      }
      const int j0 = kt * BC;
      const int so = st * C::KVST;  // this stage's byte offset in the K and V buffers
      const int* cOk = sOk + st * BC;

      float bias2[NT][4];
      load_bias_frag<T>(bias2, p, b, h, [&](int n, int e) { return RowCol{row[e >> 1], j0 + n * 8 + 2 * t + (e & 1)}; });

      // S = Qhat Khat^T -> P in place.
      float acc_s[NT][4];
      fill_zero(acc_s);
#pragma unroll (C::U_ABT)
      for (int ks = 0; ks < KQ; ++ks) {
        if constexpr (C::A_IN_REGS) abt_step_regs<T, BC, PITCH>(acc_s, qf[ks], kN + so, ks);
        else abt_step<T, BC, PITCH>(acc_s, qA, kN + so, ks);
      }
      // check = false: every pair of the tile is visible (no mask, all keys in range, and under
      // causal the tile's last key at or before the block's first query's horizon).
      const bool check = p.mask != nullptr || j0 + BC > p.Nk || (p.causal && j0 + BC - 1 > i0 + off);
      // (with_bias = false: bias2 is 0, and the fast path leaves it out)
      auto probs = [&](const bool with_c, const bool check, const bool with_bias) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = n * 8 + 2 * t + (e & 1), r = e >> 1;
            const bool vis = !check || visible(j0 + col, row[r], cdiff, cOk[col] != 0);
            const float sv = acc_s[n][e];
            const float x = fmaf(sv, sl2, with_bias ? bias2[n][e] - lse2[r] : -lse2[r]);
            acc_s[n][e] = vis ? exp2_fast(x) : 0.f;
            if (with_c) c_part[r] = fmaf(acc_s[n][e], sv, c_part[r]);
          }
      };
      if (stats) probs(true, true, true);
      else if (check) probs(false, true, true);
      else if (p.bias != nullptr) probs(false, false, true);
      else probs(false, false, false);

      // dP = dO V^T -> scale_h dS in place.
      float acc_dp[NT][4];
      fill_zero(acc_dp);
#pragma unroll (C::U_ABT)
      for (int ks = 0; ks < KQ; ++ks) {
        if constexpr (C::A_IN_REGS) abt_step_regs<T, BC, PITCH>(acc_dp, df[ks], vN + so, ks);
        else abt_step<T, BC, PITCH>(acc_dp, dOA, vN + so, ks);
      }
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[n][e] = acc_s[n][e] * (acc_dp[n][e] - dvv[e >> 1]) * scale_h;
      float ratio = 1.f;
      if constexpr (DsRange<T>::value) ratio = ds_range_f16(acc_dp, ds_f, acc_dq);  // acc_dp = scale_h dS f

      // dQ += (scale_h dS) Khat.
#pragma unroll
      for (int ks = 0; ks < BC / KS; ++ks) cb_step<T, DC, NT, PITCH>(acc_dq, acc_dp, kK + so, ks);
      if (stats) {  // r_i += the same rounded operand against ones
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_r[e] *= ratio;
#pragma unroll
        for (int ks = 0; ks < BC / KS; ++ks) c_ones_step<T, NT>(acc_r, acc_dp, ks);
      }
      __syncthreads();  // this stage may be refilled next iteration
      kt = kt_next;
    }

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
