// forward.cu — fused cosine-sim attention, forward pass (FlashAttention-2 work split).
//
// One block = 4 warps = BM query rows of one (batch, head); warp w owns rows w * BM/4 .. for the whole
// kernel (MT = BM / 64 m16 row tiles), so a row's softmax statistics never leave the 4 lanes that
// hold it. With BM = 128 every K or V fragment read from shared memory feeds 4 mma (2 per row tile).
// The block streams the key/value tiles of BN keys through shared memory with cp.async and, per tile:
//
//   S = Qhat Khat^T            tensor cores, fp32 accumulators in registers (MT*16 x BN per warp)
//   P = exp(scale_h S - off)   on visible pairs only; 0 for invisible ones (excluded, not -large)
//   O += P V, l += rowsum(P)   P goes from accumulator registers straight into A operands; the row
//                              sum is one extra mma against ones (fp32: per-thread adds)
//
// and finally O / l and lse = log(l) + off. The offset is the point of cosine-sim attention: q and k
// are unit vectors, so |scale_h <qhat, khat>| <= scale_h (times the number of l2norm groups: each
// normalized chunk adds a cosine) and the fixed offset off = scale_h groups - headroom bounds every
// exp() without looking at the data: no running row maximum, no rescaling of O, no
// cross-lane max per tile. With a bias, or unnormalized q/k (l2norm_qk=False), nothing bounds the
// logits; the running-max instantiations (MODE, below) then do the classic online softmax (running
// max m, rescale O and l by exp(m_old - m_new)). The launch layer picks the MODE.
//
// K/V buffering (KV_BUFS): 2 = K and V double-buffered, the whole next tile in flight while this one
// is computed (one barrier per tile); 1 = one K and one V buffer with staggered loads, V of this tile
// in flight during S and the next K during P V (two barriers per tile), which halves the K/V shared
// memory: the launch layer (launch.tiles.fwd_tile) takes 2 where two blocks still fit on an SM.
//
// Tensor cores: fp16/bf16 use mma.m16n8k16 with ldmatrix fragment loads (Q stays in registers when
// MT x DP allows); fp32 uses 3xTF32 m16n8k8 (x = big + small, big*big + big*small + small*big) which
// keeps fp32 accuracy (docs/design.md: real fp32, not tf32). Tile products, loaders and the
// visibility rule are tiles.cuh's.
//
// Non-finite values (docs/kernels.md "Non-finite values"): a NaN or Inf on a visible pair poisons its
// row (O and lse NaN); a pair that is not visible never contributes, even when its key's V row holds a
// NaN or Inf. Scores are selected per element, so only P V needs care: 0 * NaN is NaN in an mma. Masked
// keys' V rows are zero-filled as they load; on a causal tile that some row of the block must not
// see, V's non-finite elements are zeroed and their keys flagged in the rows' padding (scrub_v), and
// a visible flagged pair gets P = NaN. Everything else is plain IEEE arithmetic, and the epilogue
// turns a row whose O is not finite into a NaN row (out and lse).
//
// Template parameters change code shape only: T (half_t, bf16_t, float), DP = head dim padded to a
// multiple of 16 (columns D..DP-1 are zero-filled in shared memory), BM = query rows per block, BN =
// keys per tile, KV_BUFS, MODE (fixed offset, running max, running max with a bias). Everything else
// (causal, mask, bias layout and dtype, sizes, strides) is a runtime field of FwdParams, branched on
// uniformly.
#include "tiles.cuh"
#include "params.cuh"
#include "fixed_offset.cuh"

namespace ca {
namespace fwd {

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;

// MODE: how P is formed. FIXED_OFFSET: exp(s - off) with the fixed offset (no bias, q and k normalized
// here, the logit bound within the dtype's range); RUNNING_MAX_ONLY: the online softmax without a
// bias; RUNNING_MAX_BIAS: the online softmax adding a bias (its own instantiation: the bias loads
// need registers the others spend on larger tiles). launch.registry FWD_MODES mirrors these.
constexpr int FIXED_OFFSET = 0, RUNNING_MAX_ONLY = 1, RUNNING_MAX_BIAS = 2;

template <typename T> struct is_f32 { static constexpr bool value = false; };
template <> struct is_f32<float> { static constexpr bool value = true; };
template <typename T> struct is_half { static constexpr bool value = false; };
template <> struct is_half<half_t> { static constexpr bool value = true; };

// Fixed-offset headroom (Headroom<T>) and LN2: fixed_offset.cuh, shared with hopper_fwd.cu.

// Shared memory (byte offsets): Q (BM rows), K and V (KV_BUFS buffers of BN rows each), and the mask
// bytes of two key tiles. Each row is padded by one 16-byte chunk: row starts then move 4 banks apart,
// which makes ldmatrix (8 rows x 16 bytes) and the fp32 fragment loads (8 rows x 4 columns)
// conflict-free. launch.tiles.fwd_smem_bytes mirrors BYTES.
template <typename T, int DP, int BM, int BN, int KV_BUFS>
struct Layout {
  static constexpr int CHUNK = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int CPR = DP / CHUNK;        // chunks per row
  static constexpr int ROW = DP + CHUNK;        // row pitch in elements
  static constexpr int PITCH = ROW * (int)sizeof(T);
  static constexpr int MT = BM / (16 * WARPS);  // m16 row tiles per warp
  static constexpr int WROWS = 16 * MT;         // query rows per warp
  static constexpr int KV_BYTES = BN * PITCH;
  static constexpr int K_OFF = BM * PITCH;
  static constexpr int V_OFF = K_OFF + KV_BUFS * KV_BYTES;
  static constexpr int MASK_OFF = V_OFF + KV_BUFS * KV_BYTES;
  static constexpr int BYTES = MASK_OFF + 2 * BN;
};

// Registers a thread may spend on O, S and Q's fragments together (the rest go to addresses, loop
// state and the fragments in flight; ptxas' limit is 255 at one block of 128 threads), less what the
// single-buffered loop's staggered loads and a packed batch's sequence bookkeeping keep live besides.
// Measured, not derived: budgets with which every instantiation compiles spill-free for sm_80 and
// sm_90 (python -m cupy_cosattn.resources).
constexpr int QK_REG_BUDGET = 184, QK_REG_SINGLE_BUFFER = 8, QK_REG_VARLEN = 40;

// QRegSteps::value: how many of Q's DP / 16 k-steps keep their A fragments (4 registers per row tile)
// in registers for the whole block. A fragment re-read per key tile costs one ldmatrix per BN / 8 mma;
// one kept costs registers beside O (MT * DP / 2) and S (MT * BN / 2). One row tile per warp: all of
// them up to DP = 128. Two: as many as the budget leaves room for (double buffers, dense: all up to
// DP = 96; DP = 128 with 32-key tiles: 3 of 8, 42 ldmatrix per 132 mma instead of 48). fp32 loads
// and splits its operands per k-step.
template <bool F32, int DP, int MT, int BN, int KV_BUFS, bool VARLEN>
struct QRegSteps {
  static constexpr int BUDGET =
      QK_REG_BUDGET - (KV_BUFS == 1 ? QK_REG_SINGLE_BUFFER : 0) - (VARLEN ? QK_REG_VARLEN : 0);
  static constexpr int FIT = (BUDGET - MT * DP / 2 - MT * BN / 2) / (4 * MT);
  static constexpr int value = F32 ? 0 : MT == 1 ? (DP <= 128 ? DP / 16 : 0) : FIT < 0 ? 0 : FIT < DP / 16 ? FIT : DP / 16;
};

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
template <typename T, int DP, int BN, int ROW>
CA_DEVICE void scrub_v(T* sVb) {
  constexpr int CHUNK = 16 / sizeof(T);
  if (threadIdx.x < BN) {
    T* const row = sVb + threadIdx.x * ROW;
    uint32_t any = 0;
#pragma unroll 1
    for (int c = 0; c < DP; c += CHUNK) {
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

template <typename T, int DP, int ROW>
CA_DEVICE bool v_flagged(const T* sVb, int kr) {
  return reinterpret_cast<const uint16_t*>(sVb + kr * ROW + DP)[0] != 0;
}

CA_DEVICE float quiet_nan() { return bits_as_float(0x7fffffffu); }

// ---------------------------------------------------------------------------------------------
// Per-element work on one key tile. Accumulator element (mt, j, e) of a warp is row rr = 16 mt + g +
// 8 (e / 2) of the warp's rows and key kr = 8 j + 2 t + (e % 2) of the tile.

// Visibility inside one key tile for one thread (tiles.cuh visible()). Keys and rows are counted from
// this thread's own first key 2t and row g (kr' = kr - 2t = 8j + e%2, rr' = rr - g = 16 mt + 8(e/2),
// cdiff' = cdiff - 2t + g): every test is then a register against a compile-time constant, and no
// per-element index needs a register of its own.
struct TileVis {
  int kl;                      // keys of the tile below Nk, minus 2t
  int cd;                      // causal bound in tile coordinates (tiles.cuh causal_cdiff), minus 2t, plus g
  const unsigned char* mask;   // the tile's mask bytes in shared memory from key 2t, or null
  CA_DEVICE TileVis(int keys_left, int cdiff, int g, int t, const unsigned char* tile_mask)
      : kl(keys_left - 2 * t), cd(cdiff - 2 * t + g), mask(tile_mask ? tile_mask + 2 * t : nullptr) {}
  // key 8j + 2t + c exists and is not masked
  CA_DEVICE bool key_ok(int j, int c) const { return 8 * j + c < kl && (mask == nullptr || mask[8 * j + c] != 0); }
  // element (mt, j, e) given its key's key_ok
  CA_DEVICE bool operator()(int mt, int j, int e, bool ok) const {
    return visible(8 * j + (e & 1), 16 * mt + 8 * (e >> 1), cd, ok);
  }
};

// Fixed offset: s <- exp2(s scale_log2 - offset_log2), 0 on invisible pairs when CHECK (a select: no
// branch per element; without CHECK no test at all). fp32 adds P to this thread's row sums.
template <bool CHECK, bool F32, int MT, int NJ>
CA_DEVICE void exp_fixed(float (&s)[MT][NJ][4], float (&lsum)[MT][4], const TileVis& v, float scale_log2,
                         float offset_log2) {
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const bool ok = !CHECK || v.key_ok(j, c);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int e = 2 * hh + c;
          float pe = exp2_fast(s[mt][j][e] * scale_log2 - offset_log2);
          if constexpr (CHECK) pe = v(mt, j, e, ok) ? pe : 0.f;
          if constexpr (F32) lsum[mt][2 * hh] += pe;
          s[mt][j][e] = pe;
        }
    }
}

// Running max, first half: s <- x = s scale_log2 (+ bias log2 e), -inf on invisible pairs when CHECK;
// tile_max[mt][hh] = this thread's max of row (mt, hh). BIAS: `bias` points at the bias of row `row0`
// (this thread's first row, g) and the tile's first key, rows `sq` bytes apart; rows past Nq read row
// Nq - 1 and keys past Nk the last key (values never used: never stored, or invisible). Each row's
// pointer is made where it is used, so that only one is live at a time.
template <bool CHECK, bool BIAS, typename T, int MT, int NJ>
CA_DEVICE void logits_rm(float (&s)[MT][NJ][4], float (&tile_max)[MT][2], const TileVis& v, float scale_log2,
                         const char* bias, int64_t row0, int64_t sq, int Nq, int keys_left, int t, bool bias_f32) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const char* brow = nullptr;
      if constexpr (BIAS) {
        const int64_t row = row0 + 16 * mt + 8 * hh;
        brow = bias + (row < Nq ? row : Nq - 1) * sq;
      }
      float m = neg_inf();
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int e = 2 * hh + c, kr = 8 * j + 2 * t + c;
          float x = s[mt][j][e] * scale_log2;
          if constexpr (BIAS) x += load_f32_or<T>(brow, kr < keys_left ? kr : keys_left - 1, bias_f32) * LOG2E;
          if constexpr (CHECK) x = v(mt, j, e, v.key_ok(j, c)) ? x : neg_inf();
          s[mt][j][e] = x;
          m = fmaxf(m, x);
        }
      tile_max[mt][hh] = m;
    }
}

// ---------------------------------------------------------------------------------------------
// What one block works on for one (batch, head): base pointers, sizes, the per-head constants. Built
// once per (batch, head) by block_work; everything after it reads only this and the tile constants.
template <typename T>
struct Work {
  const char* q;                   // (Nq, DP) rows q_sn elements apart
  const char* k;                   // (Nk, DP) of kv head hk
  const char* v;
  int b, hk;                       // batch and kv head (K and V addressed from the parameters per tile)
  T* o;                            // (Nq, DP) rows o_sn elements apart
  float* lse;                      // (Nq,)
  const unsigned char* mask;       // (Nk,) or null
  const unsigned char* tile_any;   // (key tiles,) or null
  const char* bias;                // (Nq, Nk) rows bias_sq elements apart, or null
  int Nq, Nk;
  int diag;                        // causal: key j visible to query i iff j <= i + diag (Nq, Nk >= 1: fits)
  float scale;                     // scale_h
};

template <typename T>
CA_DEVICE Work<T> block_work(const FwdParams& p, int64_t bh) {
  const int b = (int)(bh / p.H), h = (int)(bh % p.H), hk = h / (p.H / p.Hk);
  const int esz = (int)sizeof(T);
  Work<T> w;
  w.q = static_cast<const char*>(p.q) + (b * p.q_sb + h * p.q_sh) * esz;
  w.k = static_cast<const char*>(p.k) + (b * p.k_sb + hk * p.k_sh) * esz;
  w.v = static_cast<const char*>(p.v) + (b * p.v_sb + hk * p.v_sh) * esz;
  w.b = b;
  w.hk = hk;
  w.o = static_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh;
  w.lse = p.lse + b * p.lse_sb + h * p.lse_sh;
  w.mask = p.mask ? p.mask + b * p.mask_sb : nullptr;
  w.tile_any = p.tile_any ? p.tile_any + b * p.tile_any_sb : nullptr;
  w.bias = p.bias ? static_cast<const char*>(p.bias) + (b * p.bias_sb + h * p.bias_sh) * (p.bias_f32 ? 4 : esz)
                  : nullptr;
  w.Nq = p.Nq;
  w.Nk = p.Nk;
  w.diag = p.Nk - p.Nq;
  w.scale = p.scale[h];
  return w;
}

// ---------------------------------------------------------------------------------------------
// The kernel. Grid: x = query tile (reversed under causal so the longest tiles start first),
// y = (batch, head), looping by gridDim.y when B*H exceeds the grid's y limit.
template <typename T, int DP, int BM, int BN, int KV_BUFS, int MODE, bool VARLEN = false>
__global__ void __launch_bounds__(THREADS, 1) attn_fwd(const FwdParams params) {
  using L = Layout<T, DP, BM, BN, KV_BUFS>;
  constexpr bool F32 = is_f32<T>::value;
  constexpr bool RUNNING_MAX = MODE != FIXED_OFFSET, BIAS = MODE == RUNNING_MAX_BIAS;
  static_assert(MODE == FIXED_OFFSET || MODE == RUNNING_MAX_ONLY || MODE == RUNNING_MAX_BIAS, "forward mode");
  constexpr int MT = L::MT, PITCH = L::PITCH;
  static_assert(DP % 16 == 0 && DP >= 16 && DP <= 256, "head dim padded to a multiple of 16, at most 256");
  static_assert(BN % 16 == 0 && BN <= THREADS, "key tile of whole 16-key k-steps, one mask byte per thread");
  static_assert(BM % (16 * WARPS) == 0 && MT >= 1 && (!F32 || MT == 1), "whole m16 row tiles per warp (fp32: one)");
  static_assert(KV_BUFS == 1 || KV_BUFS == 2, "K/V single (staggered) or double buffered");
  // Q's A fragments of the first QRS k-steps stay in registers for the whole block; the others are
  // re-read from shared memory on every key tile (QRegSteps).
  constexpr int QRS = QRegSteps<F32, DP, MT, BN, KV_BUFS, VARLEN>::value;
  // K and V tile addresses: from base pointers held through the loop (two 64-bit registers), or
  // formed from the parameters per tile (a few more instructions per tile) where the running max's
  // row statistics leave no room for those pointers beside a partly register-held Q.
  constexpr bool KV_FROM_PARAMS = RUNNING_MAX && !VARLEN && QRS > 0 && QRS < DP / 16;

  CA_DYNAMIC_SHARED(smem);
  const saddr_t s0 = smem_addr(smem);
  unsigned char* const sMask = smem + L::MASK_OFF;  // + (tile parity) * BN

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // accumulator rows g and g+8, columns 2t and 2t+1
  // This warp's rows in shared memory (Q, and O's staging area in the epilogue), and the lanes'
  // ldmatrix addresses: constant offsets from here on.
  const int wrow = warp * L::WROWS;
  const saddr_t sQa = s0 + wrow * PITCH + a_lane_off<PITCH>(lane);
  const saddr_t sKa = s0 + L::K_OFF + bn_lane_off<PITCH>(lane);
  const saddr_t sVa = F32 ? s0 + L::V_OFF + 2 * t * PITCH + 4 * g : s0 + L::V_OFF + bk_lane_off<PITCH>(lane);

  const FwdParams& p = SeqView<VARLEN>::template of<T>(params, (int)(blockIdx.y / params.H));  // params.cuh
  const int qtile = p.causal ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  const int64_t BH = (int64_t)p.B * p.H;
  for (int64_t bh = blockIdx.y; bh < BH; bh += gridDim.y) {
    // ---- Block prologue: this (batch, head)'s pointers and sizes, this block's rows and key tiles.
    const Work<T> w = block_work<T>(p, bh);
    const int64_t m0 = (int64_t)qtile * BM;
    if (m0 >= w.Nq) continue;  // (block-uniform)
    const int64_t wrow0 = m0 + wrow;  // first query row of this warp
    const int64_t wdiag = wrow0 + w.diag;  // its causal horizon: keys up to wdiag are visible to it
    // Key tiles that can hold a visible key: all of them, or under causal those up to the one holding
    // key (last query row of the block) + diag.
    int n_tiles = (int)((w.Nk + BN - 1) / BN);
    if (p.causal) {
      const int64_t last_key = (m0 + BM - 1 < w.Nq - 1 ? m0 + BM - 1 : w.Nq - 1) + w.diag;
      n_tiles = last_key < 0 ? 0 : (int)(last_key / BN + 1 < n_tiles ? last_key / BN + 1 : n_tiles);
    }
    const int rows_left_q = (int)(w.Nq - m0 < BM ? w.Nq - m0 : BM);

    // Logits in log2 units: x = s * log2(e), so every exponential is one FFMA and one ex2.
    const float scale_log2 = w.scale * LOG2E;
    // Fixed-offset path: every logit is at most scale_h * groups (each of the `groups` normalized
    // chunks contributes a cosine <= 1), so exp(s - offset) <= exp(Headroom).
    const float offset = w.scale * p.groups - Headroom<T>::value;
    const float offset_log2 = offset * LOG2E;

    using CopyQ = TileCopy<BM, L::CPR, PITCH, THREADS>;
    using CopyKV = TileCopy<BN, L::CPR, PITCH, THREADS>;

    // The next key tile at or after j with a visible key (tiles whose keys are all masked are skipped;
    // every thread reads the same flags, so the loop is uniform).
    auto next_tile = [&](int j) {
      if (p.tile_any != nullptr)  // (the parameter itself: a test the compiler keeps uniform)
        while (j < n_tiles && !w.tile_any[j]) ++j;
      return j;
    };
    auto keys_in = [&](int j) { return (int)(w.Nk - (int64_t)j * BN < BN ? w.Nk - (int64_t)j * BN : BN); };
    // Tile j's K into K buffer kb, and its mask bytes into mask slot mb (plain stores: visible after
    // the barrier before their use).
    auto load_k = [&](int j, int kb, int mb) {
      const int keys = keys_in(j);
      const saddr_t dst = s0 + L::K_OFF + kb * L::KV_BYTES;
      const int pitch = (int)p.k_sn * (int)sizeof(T);
      const char* src = KV_FROM_PARAMS ? static_cast<const char*>(p.k) + (w.b * p.k_sb + w.hk * p.k_sh +
                                                                    (int64_t)j * BN * p.k_sn) * (int64_t)sizeof(T)
                                       : w.k + (int64_t)j * BN * p.k_sn * (int64_t)sizeof(T);
      if (keys == BN) CopyKV::template copy<true>(dst, src, pitch, BN, tid_reread());
      else CopyKV::template copy<false>(dst, src, pitch, keys, tid_reread());
      if (w.mask != nullptr && tid < BN) {
        const int64_t key = (int64_t)j * BN + tid;
        sMask[mb * BN + tid] = key < w.Nk ? w.mask[key] : 0;
      }
    };
    // Tile j's V into V buffer vb; masked keys' rows arrive as zeros (uniform branches).
    auto load_v = [&](int j, int vb) {
      const int keys = keys_in(j);
      const saddr_t dst = s0 + L::V_OFF + vb * L::KV_BYTES;
      const int pitch = (int)p.v_sn * (int)sizeof(T);
      const char* src = KV_FROM_PARAMS ? static_cast<const char*>(p.v) + (w.b * p.v_sb + w.hk * p.v_sh +
                                                                    (int64_t)j * BN * p.v_sn) * (int64_t)sizeof(T)
                                       : w.v + (int64_t)j * BN * p.v_sn * (int64_t)sizeof(T);
      if (w.mask != nullptr) CopyKV::template copy<false, true>(dst, src, pitch, keys, tid_reread(), w.mask + (int64_t)j * BN);
      else if (keys == BN) CopyKV::template copy<true>(dst, src, pitch, BN, tid_reread());
      else CopyKV::template copy<false>(dst, src, pitch, keys, tid_reread());
    };

    float o[MT][DP / 8][4];  // O accumulators: row tile mt, rows g / g+8, dims 8n + 2t, +1
    // Row sums l: lsum[mt][2r] for row g + 8r. 16-bit: complete sums, accumulated by the ones-mma.
    // fp32: this thread's partial sums (its columns), reduced across the quad in the epilogue.
    float lsum[MT][4];
    float row_m[MT][2];  // RUNNING_MAX: running max of x (quad-uniform)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      fill_zero(o[mt]);
#pragma unroll
      for (int e = 0; e < 4; ++e) lsum[mt][e] = 0.f;
      row_m[mt][0] = row_m[mt][1] = neg_inf();
    }
    uint32_t qf[QRS > 0 ? QRS : 1][MT][4];

    // Prologue: Q and the first visible tile's K (and V when double-buffered); two cp.async groups when
    // Q's fragments go to registers, taken as soon as Q has landed while the first tile is in flight.
    {
      const int pitch = (int)p.q_sn * (int)sizeof(T);
      const char* src = w.q + m0 * p.q_sn * (int64_t)sizeof(T);
      if (rows_left_q == BM) CopyQ::template copy<true>(s0, src, pitch, BM, tid);
      else CopyQ::template copy<false>(s0, src, pitch, rows_left_q, tid);
    }
    if constexpr (QRS > 0) cp_async_commit();
    int tile = next_tile(0);
    if (tile < n_tiles) {
      load_k(tile, 0, 0);
      if (KV_BUFS == 2) load_v(tile, 0);
    }
    cp_async_commit();
    if constexpr (QRS > 0) {
      cp_async_wait<1>();  // Q landed
      __syncthreads();     // ... for every thread's Q copies
#pragma unroll
      for (int kk = 0; kk < QRS; ++kk) load_a<MT, PITCH>(qf[kk], sQa + 32 * kk);
    }

    for (int it = 0; tile < n_tiles; ++it) {
      const int mb = it & 1;                   // mask slot (and K/V buffer when double-buffered)
      const int kvb = KV_BUFS == 2 ? mb : 0;
      int next;
      if constexpr (KV_BUFS == 2) {
        next = next_tile(tile + 1);
        if (next < n_tiles) {                  // prefetch the whole next tile into the other buffers
          load_k(next, kvb ^ 1, mb ^ 1);
          load_v(next, kvb ^ 1);
        }
        cp_async_commit();                     // (possibly empty group: keeps the count uniform)
        cp_async_wait<1>();                    // all but the newest group landed: this tile is in
        __syncthreads();                       // ... for every thread's copies
      } else {
        cp_async_wait<0>();                    // this tile's K landed (and Q)
        __syncthreads();                       // ... for every thread; every warp is done with V
        load_v(tile, 0);                       // V in flight while S is computed
        cp_async_commit();
      }

      const saddr_t sKb = sKa + kvb * L::KV_BYTES;
      const saddr_t sVb = sVa + kvb * L::KV_BYTES;
      T* const sVt = reinterpret_cast<T*>(smem + L::V_OFF + kvb * L::KV_BYTES);
      const unsigned char* const sMb = sMask + mb * BN;
      const int64_t key0 = (int64_t)tile * BN;
      const int keys_left = keys_in(tile);

      // A causal tile whose last key is beyond the block's first row's horizon: some row must not see
      // some key of it, so V's non-finite elements are zeroed (block-uniform test, diagonal tiles only).
      const bool scrub = p.causal && key0 + keys_left - 1 > wdiag - wrow;

      // 1. Scores S = Qhat Khat^T for this warp's rows x BN keys.
      float s[MT][BN / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) fill_zero(s[mt]);
      // (fp32 above DP = 128: a rolled k-loop, or ptxas hoists the fragment loads of all k-steps and
      // spills beside O's DP / 2 accumulators)
#pragma unroll (F32 && DP > 128 ? 1 : DP / 8)
      for (int kk = 0; kk < (F32 ? DP / 8 : DP / 16); ++kk) {
        if constexpr (F32) {
          mma_abt_step_f32<BN, PITCH>(s[0], sQa + 32 * kk, sKb + 32 * kk);
        } else if (kk < QRS) {
          mma_abt_step<T, MT, BN, PITCH>(s, qf[kk < QRS ? kk : 0], sKb + 32 * kk);  // (index in range for the dead kk >= QRS)
        } else {
          uint32_t a[MT][4];
          load_a<MT, PITCH>(a, sQa + 32 * kk);
          mma_abt_step<T, MT, BN, PITCH>(s, a, sKb + 32 * kk);
        }
      }

      // 2. Visibility (tiles.cuh visible()): element (mt, j, e) is row rr = 16 mt + g + 8(e/2) of the
      // warp and key kr = 8j + 2t + (e%2) of the tile. The per-element test runs only on tiles that
      // need it (warp-uniform): a tile past Nk, a mask, or a tile crossing this warp's diagonal.
      const int cdiff = causal_cdiff(p.causal, wdiag, key0, BN + L::WROWS);
      const bool check = keys_left < BN || w.mask != nullptr || cdiff < BN - 1 || scrub;
      const TileVis vis(keys_left, cdiff, g, t, w.mask != nullptr ? sMb : nullptr);

      // 3. Exponentials. P overwrites S in place; only tiles with `check` select per element.
      if constexpr (!RUNNING_MAX) {
        // Fixed offset: p = exp(scale_h s - off), bounded by construction; nothing to track per row.
        if (check) exp_fixed<true, F32>(s, lsum, vis, scale_log2, offset_log2);
        else exp_fixed<false, F32>(s, lsum, vis, scale_log2, offset_log2);
      } else {
        // Online softmax: x = (scale_h s + bias) log2 e on visible pairs, -inf elsewhere.
        float tile_max[MT][2];
        if constexpr (BIAS) {
          const int bsz = p.bias_f32 ? 4 : (int)sizeof(T);
          const char* bias = w.bias + key0 * bsz;
          const int64_t sq = p.bias_sq * bsz;
          if (check) logits_rm<true, true, T>(s, tile_max, vis, scale_log2, bias, wrow0 + g, sq, w.Nq, keys_left, t, p.bias_f32);
          else logits_rm<false, true, T>(s, tile_max, vis, scale_log2, bias, wrow0 + g, sq, w.Nq, keys_left, t, p.bias_f32);
        } else {
          if (check) logits_rm<true, false, T>(s, tile_max, vis, scale_log2, nullptr, 0, 0, 0, keys_left, t, false);
          else logits_rm<false, false, T>(s, tile_max, vis, scale_log2, nullptr, 0, 0, 0, keys_left, t, false);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(row_m[mt][r], quad_max(tile_max[mt][r]));
            // a row with nothing visible yet keeps m = -inf; subtract 0 then, never (-inf) - (-inf)
            const float m_use = m_new == neg_inf() ? 0.f : m_new;
            const float alpha = exp2_fast(row_m[mt][r] - m_use);  // 0 when row_m was -inf
            row_m[mt][r] = m_new;
            tile_max[mt][r] = m_use;
            lsum[mt][2 * r] *= alpha;
            lsum[mt][2 * r + 1] *= alpha;
#pragma unroll
            for (int n = 0; n < DP / 8; ++n) {
              o[mt][n][2 * r] *= alpha;
              o[mt][n][2 * r + 1] *= alpha;
            }
          }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float pe = exp2_fast(s[mt][j][e] - tile_max[mt][e >> 1]);  // exp2(-inf) = 0
              if constexpr (F32) lsum[mt][2 * (e >> 1)] += pe;
              s[mt][j][e] = pe;
            }
      }

      // 16-bit: P packed into the A operands of P V (pa[ks][mt]: keys 16 ks .. of row tile mt) right
      // away, so that what follows (the loads of the next tile, the scrub) runs beside half the registers.
      uint32_t pa[F32 ? 1 : BN / 16][MT][4];
      if constexpr (!F32) {
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) acc_to_a<T>(pa[ks][mt], s[mt][2 * ks], s[mt][2 * ks + 1]);
      }

      if constexpr (KV_BUFS == 1) {
        cp_async_wait<0>();  // this tile's V landed
        __syncthreads();     // ... for every thread; every warp is done with K (and this tile's mask slot
                             // is the only one read from here on)
        next = next_tile(tile + 1);
        if (next < n_tiles) load_k(next, 0, mb ^ 1);  // the next K in flight during P V
        cp_async_commit();
      }
      if (scrub) {
        scrub_v<T, DP, BN, L::ROW>(sVt);
        __syncthreads();
        // A visible key whose V row held a NaN or Inf poisons the row through P.
        const T* const flags = sVt + 2 * t * L::ROW;  // this thread's first key row
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const bool bad = vis.key_ok(j, c) && v_flagged<T, DP, L::ROW>(flags, 8 * j + c);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int hh = 0; hh < 2; ++hh) {
                const int e = 2 * hh + c;
                if (vis(mt, j, e, bad)) {
                  if constexpr (F32) s[mt][j][e] = quiet_nan();
                  else pa[j / 2][mt][2 * (j % 2) + e / 2] |= e % 2 ? 0xffff0000u : 0x0000ffffu;  // a NaN
                }
              }
          }
      }

      // 4. O += P V (16-bit: and l += rowsum(P) by one mma per k-step against ones).
      if constexpr (F32) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mma_pb_step_f32<DP, PITCH>(o[0], s[0][j], sVb + j * 8 * PITCH);
      } else {
        const uint32_t ones[2] = {pack2<T>(1.f, 1.f), pack2<T>(1.f, 1.f)};
#pragma unroll
        for (int ks = 0; ks < BN / 16; ++ks) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_m16n8k16(lsum[mt], pa[ks][mt], ones, T());
          mma_ab_step<T, MT, DP, PITCH>(o, pa[ks], sVb + ks * 16 * PITCH);
        }
      }

      if constexpr (KV_BUFS == 2) __syncthreads();  // every warp is done with these buffers before the next prefetch
      tile = next;
    }

    // Epilogue. Drain cp.async (with no visible tile the Q copies may still be in flight) and make
    // sure no warp still reads Q: each warp then stages its rows of O in its own Q rows. Its lane
    // coordinates are read anew (tid_reread): addresses derived from them are then computed here,
    // not kept in registers through the main loop.
    cp_async_wait<0>();
    __syncthreads();
    {
      const Work<T> we = block_work<T>(p, reread(bh));
      const int etid = tid_reread(), elane = etid % 32, eg = elane / 4, et = elane % 4;
      const int ewrow = (etid / 32) * L::WROWS;
      T* const sQe = reinterpret_cast<T*>(smem + ewrow * PITCH);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float l = F32 ? quad_sum(lsum[mt][2 * r]) : lsum[mt][2 * r];
          const float inv = l == 0.f ? 0.f : 1.f / l;  // no visible key: O = 0 (a NaN l stays NaN)
          // poison = NaN when some element of the row's O is NaN or Inf (x * 0 is NaN exactly then, also
          // under contraction into an FMA), else 0: a non-finite value row seen by this row makes all of
          // out and lse NaN, as a NaN logit does through l.
          float poison = 0.f;
#pragma unroll
          for (int n = 0; n < DP / 8; ++n) poison += o[mt][n][2 * r] * 0.f + o[mt][n][2 * r + 1] * 0.f;
          poison = quad_sum(poison);
          const int rr = 16 * mt + eg + 8 * r;
          const int64_t row = m0 + ewrow + rr;
          if (et == 0 && row < we.Nq) {
            float lse = neg_inf();  // (a NaN value row seen only through p = 0 still poisons it)
            if (l != 0.f) lse = RUNNING_MAX ? row_m[mt][r] * LN2 + logf(l) : logf(l) + offset;
            we.lse[row] = lse + poison;
          }
          T* const srow = sQe + rr * L::ROW + 2 * et;
#pragma unroll
          for (int n = 0; n < DP / 8; ++n) {
            srow[8 * n] = from_float<T>(o[mt][n][2 * r] * inv + poison);
            srow[8 * n + 1] = from_float<T>(o[mt][n][2 * r + 1] * inv + poison);
          }
        }
      __syncwarp();
      // 16-byte stores of the warp's rows (rows past Nq skipped; all DP columns: out rows are padded).
      const int64_t erow0 = m0 + ewrow;
      for (int i = elane; i < L::WROWS * L::CPR; i += 32) {
        const int r = i / L::CPR, c = (i % L::CPR) * L::CHUNK;
        if (erow0 + r < we.Nq) copy16(we.o + (erow0 + r) * p.o_sn + c, sQe + r * L::ROW + c);
      }
    }
    __syncthreads();  // the staging area is Q's: the next (batch, head) reloads it
  }
}

}  // namespace fwd
}  // namespace ca
