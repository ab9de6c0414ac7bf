// forward.cu — fused cosine-sim attention, forward pass (FlashAttention-2 work split).
//
// One block = 4 warps = BLOCK_M = 64 query rows of one (batch, head); warp w owns rows 16w..16w+15
// for the whole kernel, so a row's softmax statistics never leave the 4 lanes that hold it. The block
// streams the key/value tiles of BN keys through shared memory (cp.async, double-buffered: tile j+1
// is in flight while tile j is computed) and, per tile:
//
//   S = Qhat Khat^T            tensor cores, fp32 accumulators in registers (16 x BN per warp)
//   P = exp(scale_h S - off)   on visible pairs only; 0 for invisible ones (excluded, not -large)
//   O += P V, l += rowsum(P)   P goes from accumulator registers straight into A operands; the row
//                              sum is one extra mma against ones (fp32: per-thread adds)
//
// and finally O / l and lse = log(l) + off. The offset is the point of cosine-sim attention: q and k
// are unit vectors, so |scale_h <qhat, khat>| <= scale_h (times the number of l2norm groups: each
// normalized chunk adds a cosine) and the fixed offset off = scale_h groups - headroom bounds every
// exp() without looking at the data: no running row maximum, no rescaling of O, no
// cross-lane max per tile. With a bias, or unnormalized q/k (l2norm_qk=False), nothing bounds the
// logits; the RUNNING_MAX instantiation then does the classic online softmax (running max m, rescale
// O and l by exp(m_old - m_new)). The launch layer picks RUNNING_MAX = !fixed-offset-safe.
//
// Tensor cores: fp16/bf16 use mma.m16n8k16 with ldmatrix fragment loads (Q stays in registers when
// the head dim allows); fp32 uses 3xTF32 m16n8k8 (x = big + small, big*big + big*small + small*big)
// with scalar fragment loads, which keeps fp32 accuracy (docs/design.md: real fp32, not tf32).
//
// Non-finite values (docs/kernels.md "Non-finite values"): a NaN or Inf on a visible pair poisons its
// row (O and lse NaN); a pair that is not visible never contributes, even when its key's V row holds a
// NaN or Inf. Scores are selected per element, so only P V needs care: 0 * NaN is NaN in an mma. Masked
// keys' V rows are zero-filled as they load (load_kv); on a causal tile that some row of the block must
// not see, V's non-finite elements are zeroed and their keys flagged in the rows' padding (scrub_v),
// and a visible flagged pair gets P = NaN. Everything else is plain IEEE arithmetic, and the epilogue
// turns a row whose O is not finite into a NaN row (out and lse).
//
// Template parameters change code shape only: T (half_t, bf16_t, float), DP = head dim padded to a
// multiple of 16 (columns D..DP-1 are zero-filled in shared memory), BN = keys per tile, RUNNING_MAX.
// Everything else (causal, mask, bias layout and dtype, sizes, strides) is a runtime field of
// FwdParams, branched on uniformly.
#include "common.cuh"
#include "params.cuh"
#include "fixed_offset.cuh"

namespace ca {
namespace fwd {

constexpr int BLOCK_M = 64;  // query rows per block
constexpr int WARPS = 4;     // 16 rows each
constexpr int THREADS = 32 * WARPS;

template <typename T> struct is_f32 { static constexpr bool value = false; };
template <> struct is_f32<float> { static constexpr bool value = true; };
template <typename T> struct is_half { static constexpr bool value = false; };
template <> struct is_half<half_t> { static constexpr bool value = true; };

// Fixed-offset headroom (Headroom<T>) and LN2: fixed_offset.cuh, shared with hopper_fwd.cu.

// Shared memory: Q (BLOCK_M rows), K and V (2 buffers of BN rows each), and the mask bytes of the two
// K/V buffers. Each row is padded by one 16-byte chunk: row starts then move 4 banks apart, which makes
// ldmatrix (8 rows x 16 bytes) and the fp32 fragment loads (8 rows x 4 columns) conflict-free.
template <typename T, int DP, int BN>
struct Smem {
  static constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int ROW = DP + CHUNK;        // row pitch in elements
  static constexpr int Q = BLOCK_M * ROW;
  static constexpr int KV = BN * ROW;
  static constexpr int BYTES = (Q + 4 * KV) * (int)sizeof(T) + 2 * BN;  // launch.fwd_smem_bytes
};

// Copy a ROWS x DP tile (the first rows_left rows valid) of a row-major global matrix (row pitch
// `stride` elements, starting at `src`) into shared memory, one 16-byte cp.async per chunk. Rows past
// rows_left are zero-filled (src_bytes = 0; the source address then points at the tile start, never
// out of bounds). Global rows hold DP elements, zero past D (the launch layer pads them), so there is
// no column check. Offsets inside a tile are 32-bit (the 64-bit part is in `src`).
// MASKED: rows whose byte in `row_ok` (the tile's mask bytes in global memory) is 0 are zero-filled
// too, so that a masked key's NaN or Inf never enters a product.
template <typename T, int ROWS, int DP, int UNROLL, bool MASKED = false>
CA_DEVICE void load_tile_async(T* dst, const T* src, int stride, int rows_left,
                               const unsigned char* row_ok = nullptr) {
  using L = Smem<T, DP, 16>;
  constexpr int CPR = DP / L::CHUNK;  // chunks per row
  constexpr int TOTAL = ROWS * CPR;
#pragma unroll UNROLL
  for (int it = 0; it < (TOTAL + THREADS - 1) / THREADS; ++it) {
    const int i = it * THREADS + (int)threadIdx.x;
    if (TOTAL % THREADS == 0 || i < TOTAL) {
      const int r = i / CPR, c = (i % CPR) * L::CHUNK;
      // inside = r < rows_left, as an all-ones/all-zeros mask rather than a predicate: these are
      // loop-invariant for the Q tile, and ptxas would otherwise keep (and spill) one predicate each.
      int inside = (rows_left - 1 - r) >> 31 ^ -1;
      if constexpr (MASKED) inside &= (r < rows_left && row_ok[r]) ? -1 : 0;
      cp_async_16(dst + r * L::ROW + c, src + ((r * stride + c) & inside), 16 & inside);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 tile products (mma.m16n8k16). Fragment layouts: common.cuh header.

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
// map: b0 = V[key 2t][dim g], b1 = V[key 2t+1][dim g].
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
#pragma unroll
    for (int n = 0; n < DP / 8; ++n) {
      const float* vb = sV + (8 * j + 2 * t) * ROW + 8 * n + g;
      uint32_t bb[2], bs[2];
      split_tf32(vb[0], bb[0], bs[0]);
      split_tf32(vb[ROW], bb[1], bs[1]);
      mma_3xtf32(o[n], ab, as, bb, bs);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Non-finite V on causal tiles.

// Bits of the non-finite elements of a 32-bit word of T (exponent all ones: Inf or NaN).
template <typename T>
CA_DEVICE uint32_t nonfinite_bits(uint32_t w) {
  if constexpr (sizeof(T) == 4) {
    return (w & 0x7f800000u) == 0x7f800000u ? 0xffffffffu : 0u;
  } else {
    constexpr uint32_t E = is_half<T>::value ? 0x7c00u : 0x7f80u;  // exponent field of one 16-bit element
    return ((w & E) == E ? 0x0000ffffu : 0u) | (((w >> 16) & E) == E ? 0xffff0000u : 0u);
  }
}

// One thread per key row r < BN of a V tile in shared memory: non-finite elements become 0, and the
// row's first padding element records whether there were any (read back by v_flagged). Block-wide;
// the caller's barrier publishes both.
template <typename T, int DP, int BN>
CA_DEVICE void scrub_v(T* sVb) {
  using L = Smem<T, DP, BN>;
  if (threadIdx.x < BN) {
    T* const row = sVb + threadIdx.x * L::ROW;
    uint32_t any = 0;
#pragma unroll 1
    for (int c = 0; c < DP; c += L::CHUNK) {
      bytes16 x = *reinterpret_cast<const bytes16*>(row + c);
      uint32_t bad = 0;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t m = nonfinite_bits<T>(x.w[w]);
        bad |= m;
        x.w[w] &= ~m;
      }
      if (bad) *reinterpret_cast<bytes16*>(row + c) = x;
      any |= bad;
    }
    reinterpret_cast<uint16_t*>(row + DP)[0] = any ? 1 : 0;
  }
}

template <typename T, int DP, int BN>
CA_DEVICE bool v_flagged(const T* sVb, int kr) {
  return reinterpret_cast<const uint16_t*>(sVb + kr * Smem<T, DP, BN>::ROW + DP)[0] != 0;
}

CA_DEVICE float quiet_nan() { return bits_as_float(0x7fffffffu); }

// ---------------------------------------------------------------------------------------------
// The kernel. Grid: x = query tile (reversed under causal so the longest tiles start first),
// y = (batch, head), looping by gridDim.y when B*H exceeds the grid's y limit.
template <typename T, int DP, int BN, bool RUNNING_MAX, bool VARLEN = false>
__global__ void __launch_bounds__(THREADS, 1) attn_fwd(const FwdParams params) {
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= 256, "head dim padded to a multiple of 16, at most 256");
  static_assert(BN % 16 == 0 && BN <= THREADS, "key tile of whole 16-key k-steps, one mask byte per thread");
  constexpr bool F32 = is_f32<T>::value;
  constexpr bool Q_IN_REGS = !F32 && DP <= 128;  // 16 rows x DP of A fragments: DP / 4 registers
  using L = Smem<T, DP, BN>;

  CA_DYNAMIC_SHARED(smem);
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = sQ + L::Q;       // buffers: sK + buf * L::KV
  T* const sV = sK + 2 * L::KV;  // buffers: sV + buf * L::KV
  unsigned char* const sMask = reinterpret_cast<unsigned char*>(sV + 2 * L::KV);  // + buf * BN

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // accumulator rows g and g+8, columns 2t and 2t+1
  T* const sQw = sQ + 16 * warp * L::ROW;  // this warp's 16 query rows

  const FwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / params.H));  // params.cuh
  const int qtile = p.causal ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  const int64_t m0 = (int64_t)qtile * BLOCK_M;
  if (VARLEN && m0 >= p.Nq) return;  // a tile past its sequence's end
  const int64_t diag = (int64_t)p.Nk - p.Nq;  // causal: key j visible to query i iff j <= i + diag
  const int64_t wrow0 = m0 + 16 * warp;       // first query row of this warp

  // Key tiles that can hold a visible key: all of them, or under causal those up to the one holding
  // key (last query row of the block) + diag.
  int n_tiles = (int)(((int64_t)p.Nk + BN - 1) / BN);
  if (p.causal) {
    const int64_t last_key = (m0 + BLOCK_M - 1 < p.Nq - 1 ? m0 + BLOCK_M - 1 : (int64_t)p.Nq - 1) + diag;
    n_tiles = last_key < 0 ? 0 : (int)(last_key / BN + 1 < n_tiles ? last_key / BN + 1 : n_tiles);
  }

  const int64_t BH = (int64_t)p.B * p.H;
  for (int64_t bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    const int b = (int)(bh / p.H), h = (int)(bh % p.H), hk = h / (p.H / p.Hk);
    const T* const q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const T* const k = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
    const T* const v = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
    const unsigned char* const mask = p.mask ? p.mask + b * p.mask_sb : nullptr;
    const unsigned char* const tile_any = p.tile_any ? p.tile_any + b * p.tile_any_sb : nullptr;
    const char* const bias = p.bias ? static_cast<const char*>(p.bias) +
                                          (b * p.bias_sb + h * p.bias_sh) * (p.bias_f32 ? 4 : (int)sizeof(T))
                                    : nullptr;

    // Logits in log2 units: x = s * log2(e), so every exponential is one ex2.
    const float scale_log2 = p.scale[h] * LOG2E;
    // Fixed-offset path: every logit is at most scale_h * groups (each of the `groups` normalized
    // chunks contributes a cosine <= 1), so exp(s - offset) <= exp(Headroom).
    const float offset = p.scale[h] * p.groups - Headroom<T>::value;
    const float offset_log2 = offset * LOG2E;

    // The next key tile at or after j with a visible key (tiles whose keys are all masked are skipped;
    // every thread reads the same flags, so the loop is uniform).
    auto next_tile = [&](int j) {
      if (tile_any != nullptr)
        while (j < n_tiles && !tile_any[j]) ++j;
      return j;
    };
    auto load_kv = [&](int j, int buf) {
      const int64_t key0 = (int64_t)j * BN;
      const int keys_left = (int)(p.Nk - key0 < BN ? p.Nk - key0 : BN);
      load_tile_async<T, BN, DP, 64>(sK + buf * L::KV, k + key0 * p.k_sn, (int)p.k_sn, keys_left);
      if (mask != nullptr)  // masked keys' V rows arrive as zeros (uniform branch)
        load_tile_async<T, BN, DP, 64, true>(sV + buf * L::KV, v + key0 * p.v_sn, (int)p.v_sn, keys_left, mask + key0);
      else
        load_tile_async<T, BN, DP, 64>(sV + buf * L::KV, v + key0 * p.v_sn, (int)p.v_sn, keys_left);
      if (mask != nullptr && threadIdx.x < BN) {  // plain stores: visible after the barrier before use
        const int64_t key = key0 + threadIdx.x;
        sMask[buf * BN + threadIdx.x] = key < p.Nk ? mask[key] : 0;
      }
    };

    float o[DP / 8][4];  // O accumulators: rows g / g+8, dims 8n + 2t, +1
    fill_zero(o);
    // Row sums l: lsum[2r] for row g + 8r. 16-bit: complete sums, accumulated by tile_pv's ones-mma.
    // fp32: this thread's partial sums (its columns), reduced across the quad in the epilogue.
    float lsum[4] = {0.f, 0.f, 0.f, 0.f};
    float row_m[2] = {neg_inf(), neg_inf()};  // RUNNING_MAX: running max of x (quad-uniform)
    uint32_t qf[Q_IN_REGS ? DP / 16 : 1][4];

    // Prologue: Q and the first visible K/V tile form one cp.async group.
    load_tile_async<T, BLOCK_M, DP, 1>(sQ, q + m0 * p.q_sn, (int)p.q_sn, (int)(p.Nq - m0 < BLOCK_M ? p.Nq - m0 : BLOCK_M));
    int tile = next_tile(0);
    if (tile < n_tiles) load_kv(tile, 0);
    cp_async_commit();

    for (int it = 0; tile < n_tiles; ++it) {
      const int buf = it & 1;
      const int next = next_tile(tile + 1);
      if (next < n_tiles) load_kv(next, buf ^ 1);  // prefetch into the other buffer
      cp_async_commit();                           // (possibly empty group: keeps the count uniform)
      cp_async_wait<1>();                          // all but the newest group landed: tile `tile` is in
      __syncthreads();                             // ... for every thread's copies

      if constexpr (Q_IN_REGS) {
        if (it == 0) {
#pragma unroll
          for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_x4(qf[kk], sQw + (lane % 16) * L::ROW + 16 * kk + (lane / 16) * 8);
        }
      }
      const T* const sKb = sK + buf * L::KV;
      T* const sVb = sV + buf * L::KV;
      const unsigned char* const sMb = sMask + buf * BN;
      const int64_t key0 = (int64_t)tile * BN;
      const int keys_left = (int)(p.Nk - key0 < BN ? p.Nk - key0 : BN);

      // A causal tile whose last key is beyond the block's first row's horizon: some row must not see
      // some key of it, so V's non-finite elements are zeroed (block-uniform test, diagonal tiles only).
      const bool scrub = p.causal && key0 + keys_left - 1 > m0 + diag;
      if (scrub) {
        scrub_v<T, DP, BN>(sVb);
        __syncthreads();
      }

      // 1. Scores S = Qhat Khat^T for this warp's 16 rows x BN keys.
      float s[BN / 8][4];
      fill_zero(s);
      if constexpr (F32) tile_scores_f32<DP, BN>(s, sQw, sKb, lane);
      else tile_scores<T, DP, BN, Q_IN_REGS>(s, qf, sQw, sKb, lane);

      // 2. Visibility, in tile-relative 32-bit coordinates: element (j, e) is row rr = g + 8(e/2) of
      // the warp and key kr = 8j + 2t + (e%2) of the tile. Causal: key0 + kr <= wrow0 + rr + diag, i.e.
      // kr - rr <= cdiff. Per-element checks only where the tile needs them (warp-uniform): a tile
      // past Nk, a mask, or a tile crossing this warp's causal diagonal.
      const int64_t cdiff64 = wrow0 + diag - key0;
      const int cdiff = p.causal ? (int)(cdiff64 < -BN ? -BN : (cdiff64 > BN ? BN : cdiff64)) : BN;
      const bool check = keys_left < BN || mask != nullptr || cdiff < BN - 1 || scrub;
      auto visible = [&](int j, int e) {
        const int kr = 8 * j + 2 * t + (e & 1), rr = g + 8 * (e >> 1);
        return kr < keys_left && kr - rr <= cdiff && (mask == nullptr || sMb[kr]);
      };
      // A visible key whose V row held a NaN or Inf (scrubbed tiles only) poisons the row through P.
      auto flagged = [&](int j, int e) { return scrub && v_flagged<T, DP, BN>(sVb, 8 * j + 2 * t + (e & 1)); };

      // 3. Exponentials. P overwrites S in place.
      if constexpr (!RUNNING_MAX) {
        // Fixed offset: p = exp(scale_h s - off), bounded by construction; nothing to track per row.
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float pe = 0.f;
            if (!check || visible(j, e)) pe = (check && flagged(j, e)) ? quiet_nan() : exp2_fast(s[j][e] * scale_log2 - offset_log2);
            if constexpr (F32) lsum[2 * (e >> 1)] += pe;
            s[j][e] = pe;
          }
      } else {
        // Online softmax: x = (scale_h s + bias) log2 e on visible pairs, -inf elsewhere.
        float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = neg_inf();
            if (!check || visible(j, e)) {
              x = s[j][e] * scale_log2;
              if (bias != nullptr) {
                // rows past Nq are computed but never stored: clamp them onto a real bias row
                const int64_t row = wrow0 + g + 8 * (e >> 1);
                const char* brow = bias + (row < p.Nq ? row : p.Nq - 1) * p.bias_sq * (p.bias_f32 ? 4 : (int)sizeof(T));
                x += load_f32_or<T>(brow, key0 + 8 * j + 2 * t + (e & 1), p.bias_f32) * LOG2E;
              }
              if (check && flagged(j, e)) x = quiet_nan();
            }
            s[j][e] = x;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
          }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float m_new = fmaxf(row_m[r], quad_max(tile_max[r]));
          // a row with nothing visible yet keeps m = -inf; subtract 0 then, never (-inf) - (-inf)
          const float m_use = m_new == neg_inf() ? 0.f : m_new;
          const float alpha = exp2_fast(row_m[r] - m_use);  // 0 when row_m was -inf
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
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float pe = exp2_fast(s[j][e] - tile_max[e >> 1]);  // exp2(-inf) = 0
            if constexpr (F32) lsum[2 * (e >> 1)] += pe;
            s[j][e] = pe;
          }
      }

      // 4. O += P V.
      if constexpr (F32) tile_pv_f32<DP, BN>(o, s, sVb, g, t);
      else tile_pv<T, DP, BN>(o, lsum, s, sVb, lane);

      __syncthreads();  // every warp is done with this buffer before the next prefetch overwrites it
      tile = next;
    }

    // Epilogue. Drain cp.async (with no visible tile the Q copies may still be in flight) and make
    // sure no warp still reads Q: each warp then stages its rows of O in its own Q rows.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = F32 ? quad_sum(lsum[2 * r]) : lsum[2 * r];
      const float inv = l == 0.f ? 0.f : 1.f / l;  // no visible key: O = 0 (a NaN l stays NaN)
      // poison = NaN when some element of the row's O is NaN or Inf (x * 0 is NaN exactly then, also
      // under contraction into an FMA), else 0: a non-finite value row seen by this row makes all of
      // out and lse NaN, as a NaN logit does through l.
      float poison = 0.f;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) poison += o[n][2 * r] * 0.f + o[n][2 * r + 1] * 0.f;
      poison = quad_sum(poison);
      const int64_t row = wrow0 + g + 8 * r;
      if (t == 0 && row < p.Nq) {
        float lse = neg_inf();  // (a NaN value row seen only through p = 0 still poisons it)
        if (l != 0.f) lse = RUNNING_MAX ? row_m[r] * LN2 + logf(l) : logf(l) + offset;
        p.lse[b * p.lse_sb + h * p.lse_sh + row] = lse + poison;
      }
      T* const srow = sQw + (g + 8 * r) * L::ROW;
#pragma unroll
      for (int n = 0; n < DP / 8; ++n) {
        srow[8 * n + 2 * t] = from_float<T>(o[n][2 * r] * inv + poison);
        srow[8 * n + 2 * t + 1] = from_float<T>(o[n][2 * r + 1] * inv + poison);
      }
    }
    __syncwarp();
    // 16-byte stores of the warp's 16 rows (rows past Nq skipped; all DP columns: out rows are padded).
    {
      constexpr int CPR = DP / L::CHUNK;
      T* const out = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
      for (int i = lane; i < 16 * CPR; i += 32) {
        const int r = i / CPR, c = (i % CPR) * L::CHUNK;
        if (wrow0 + r < p.Nq) copy16(out + (wrow0 + r) * p.o_sn + c, sQw + r * L::ROW + c);
      }
    }
    __syncthreads();  // the staging area is Q's: the next (batch, head) reloads it
  }
}

}  // namespace fwd
}  // namespace ca
